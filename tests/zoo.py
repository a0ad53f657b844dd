"""The model zoo and the float64 oracle that every engine is checked against.

The oracle is deliberately naive and independent of persample: a Python loop
over examples, one ``torch.autograd.grad`` call each, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------- oracle


def split_example(obj, i):
    """Example i of a tensor / tuple / dict batch, kept as a batch of one."""
    if isinstance(obj, torch.Tensor):
        return obj[i : i + 1]
    if isinstance(obj, dict):
        return {k: v[i : i + 1] for k, v in obj.items()}
    return tuple(t[i : i + 1] for t in obj)


def call_model(model, inputs):
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs)


def batch_size(inputs):
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    leaves = inputs.values() if isinstance(inputs, dict) else inputs
    return next(iter(leaves)).shape[0]


def oracle_grads(model, loss_fn, inputs, targets=None):
    """{name: [B, *shape]} and losses [B], by a loop of autograd over examples."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = {n: [] for n in params}
    losses = []
    for i in range(batch_size(inputs)):
        out = call_model(model, split_example(inputs, i))
        loss = loss_fn(out) if targets is None else loss_fn(out, split_example(targets, i))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads):
            rows[n].append(torch.zeros_like(p) if g is None else g)
        losses.append(loss.detach())
    return {n: torch.stack(r) for n, r in rows.items()}, torch.stack(losses)


def assert_dicts_close(actual, expected, rtol=1e-9, atol=1e-12):
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------------------- zoo


class RawParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4) * 0.5)
        self.b = nn.Parameter(torch.randn(4) * 0.1)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return torch.tanh(x @ self.w + self.b) * self.scale


class Reused(nn.Module):
    """One Linear applied twice in a forward."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


class TiedLM(nn.Module):
    """Embedding whose weight is also the output projection."""

    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.a(x))
        r = self.b(h)
        r += h
        return self.out(self.act(r))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fa = nn.Linear(5, 8)
        self.fb = nn.Linear(3, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, a, b):
        return self.out(torch.tanh(self.fa(a)) * torch.sigmoid(self.fb(b)))


class Recurrent(nn.Module):
    def __init__(self, cell, **kw):
        super().__init__()
        self.embed = nn.Embedding(30, 6)
        self.rnn = cell(6, 8, batch_first=True, **kw)
        width = 8 * (2 if kw.get("bidirectional") else 1)
        if kw.get("proj_size"):
            width = kw["proj_size"] * (2 if kw.get("bidirectional") else 1)
        self.out = nn.Linear(width, 3)

    def forward(self, tokens):
        h, _ = self.rnn(self.embed(tokens))
        return self.out(h[:, -1])


class CentersBatch(nn.Module):
    """Couples the examples of a batch (subtracts half the batch mean): per-example gradients of
    the isolated examples do not average to the batch gradient, which check_mean must catch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return h - 0.5 * h.mean(0, keepdim=True)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h)
        return self.out(a.mean(1))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.layer(self.inp(x)).mean(1))


def _conv1d_bn_eval():
    model = nn.Sequential(
        nn.Conv1d(3, 6, 3),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Conv1d(6, 4, 3),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _partly_frozen():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


def gpt2_tiny():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=40,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def lm_loss(out, tokens):
    """Next-token cross-entropy, for a model returning logits or a ModelOutput."""
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def cls_batch(shape, classes=3):
    def make(b):
        return torch.randn(b, *shape, dtype=torch.float64), torch.randint(0, classes, (b,))

    return make


def token_batch(vocab, length, classes=None):
    def make(b):
        tokens = torch.randint(0, vocab, (b, length))
        return tokens, (tokens if classes is None else torch.randint(0, classes, (b,)))

    return make


def two_input_batch(b):
    return (
        (torch.randn(b, 5, dtype=torch.float64), torch.randn(b, 3, dtype=torch.float64)),
        torch.randn(b, 2, dtype=torch.float64),
    )


@dataclass
class Case:
    """A model family: how to build it, make a batch of B, and score it."""

    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[int], tuple]
    loss_fn: Callable = F.cross_entropy

    def instantiate(self, batch=5, seed=0, dtype=torch.float64):
        torch.manual_seed(seed)
        model = self.build().to(dtype)
        inputs, targets = self.make_batch(batch)
        return model, inputs, targets


CASES = [
    Case(
        "mlp",
        lambda: nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3)),
        cls_batch((6,)),
    ),
    Case(
        "cnn_groupnorm_pool",
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(6, 3),
        ),
        cls_batch((2, 8, 8)),
    ),
    Case("conv1d_batchnorm_eval", _conv1d_bn_eval, cls_batch((3, 10))),
    Case(
        "raw_parameters",
        RawParams,
        lambda b: (torch.randn(b, 6, dtype=torch.float64), torch.randn(b, 4, dtype=torch.float64)),
        F.mse_loss,
    ),
    Case("module_reused", Reused, cls_batch((6,))),
    Case("tied_weights", TiedLM, token_batch(20, 7), lm_loss),
    Case("in_place", InPlace, cls_batch((6,))),
    Case("two_inputs", TwoInputs, two_input_batch, F.mse_loss),
    Case("partly_frozen", _partly_frozen, cls_batch((6,))),
    Case("multihead_attention", Attention, cls_batch((5, 4))),
    Case("transformer_encoder", Encoder, cls_batch((5, 4))),
    Case("rnn", lambda: Recurrent(nn.RNN), token_batch(30, 6, classes=3)),
    Case("gru", lambda: Recurrent(nn.GRU, num_layers=2), token_batch(30, 6, classes=3)),
    Case("lstm", lambda: Recurrent(nn.LSTM), token_batch(30, 6, classes=3)),
    Case(
        "lstm_bidirectional_proj",
        lambda: Recurrent(nn.LSTM, num_layers=2, bidirectional=True, proj_size=5),
        token_batch(30, 6, classes=3),
    ),
    Case("hf_gpt2", gpt2_tiny, token_batch(40, 8), lm_loss),
]

CASE_IDS = [c.name for c in CASES]


class CheckpointedPositions(nn.Module):
    """A layer called on positions shared by the batch (``arange(T)[None]``) inside a checkpointed block:
    re-entrant (``reentrant = True``) the fast engine and observe refuse it (REENTRANT_CHECKPOINT);
    non-re-entrant, the fix their message names, it is exact."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(10, 4), nn.Embedding(5, 4), nn.Linear(4, 3)
        self.reentrant = True

    def _block(self, h):
        return torch.tanh(h + self.pos(torch.arange(h.shape[1])[None]))

    def forward(self, ids):
        h = checkpoint(self._block, self.tok(ids), use_reentrant=self.reentrant)
        return self.head(h).mean(1)
