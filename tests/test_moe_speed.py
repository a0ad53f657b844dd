"""The MoE paths of the fast engine made cheaper (issue 22, moespeed): the same numbers as before, in fewer calls.

- The probe of the rows (``audit.rows_leak``) runs its 2·⌈log2 B⌉ passes as one batched backward
  (``is_grads_batched``) where torch can; each pass's gradients must be the pass's own, bit for bit, since the
  rows it reaches (exact zeros or not) decide the row → example map.
- A rule-less module on token rows recomputes its B segments forward one by one, then backward all at once
  (``engine._token_rows_pieces``); its per-example gradients must be the float64 loop's (test_moe_routing.py
  checks the statistics; here ``per_sample_grads`` on a router with raw weights, 3-D experts and B = 5, whose
  bits leave example indices unused).
"""

from __future__ import annotations

import pytest
import torch

import persample
from persample.engines.fast import audit
from persample.engines.fast.units import probing

from test_moe_routing import close, problem, token_ce
from zoo import oracle_grads


def _graph(batch: int):
    """The MoE problem's output and the token-row tensors the probe reads (the experts' input and output)."""
    torch.manual_seed(1)
    model, _, _ = problem()
    ids = torch.randint(0, 11, (batch, 5))
    h = model.embed(ids)
    x = h.reshape(-1, h.shape[-1])
    _, weights, index = model.router(x)
    out = model.experts(x, index, weights)
    return model.head(h + out.reshape(h.shape)), [x, out]


@pytest.mark.parametrize("batch", [3, 5, 8])
def test_the_probe_passes_together_equal_the_passes_one_by_one(batch):
    root, rows = _graph(batch)
    passes = [(bit, v) for bit in range(max(1, (batch - 1).bit_length())) for v in (0, 1)]
    together = audit._passes_together([root], rows, passes)
    assert together is not None  # the batched backward runs on this graph
    for (bit, value), grads in zip(passes, together):
        with probing():
            alone = torch.autograd.grad(
                [root], rows, [audit._probe_cotangent(root, bit, value)], retain_graph=True, allow_unused=True
            )
        for g, want in zip(grads, alone):
            assert torch.equal(g, want)


def test_passes_that_would_hold_too_many_numbers_run_one_by_one(monkeypatch):
    root, rows = _graph(4)
    monkeypatch.setattr(audit, "_PASSES_TOGETHER_ELEMENTS", 10)
    assert audit._passes_together([root], rows, [(0, 0), (0, 1)]) is None
    assert audit._passes_together([root], rows, [(0, 0)]) is None  # one pass: nothing to batch


def test_segments_backward_together_give_each_examples_gradient():
    """B = 5 with a raw-weight router (three outputs, the weights computed from the logits: the external
    part of each cotangent) and 3-D experts: per_sample_grads against the float64 loop at 1e-9."""
    torch.manual_seed(3)
    model, _, _ = problem(seed=3)
    ids, y = torch.randint(0, 11, (5, 4)), torch.randint(0, 3, (5, 4))
    rows, _ = oracle_grads(model, token_ce, ids, y)
    close(persample.per_sample_grads(model, token_ce, ids, y, engine="fast"), rows)
