"""The check at the model output (``derive_weights``, ``all_finite``) reads an output-sized tensor few times.

On a language model the output is the largest tensor of the step (B × T × vocab logits), and every
pass over it costs about as much as a LayerNorm's. These tests pin the answers of the cheaper
forms against the plain ones (``torch.isfinite(t).all()``, ``t.abs().amax(1)``) at random positions
of NaN and ±inf, and count the output-sized tensors the weights' check writes: no timing."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from persample.batch_loss import BatchLossMismatch, _row_abs_max, all_finite, derive_weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_and_row_maxima_agree_with_the_plain_forms(dtype):
    generator = torch.Generator().manual_seed(0)
    for trial in range(40):  # past 8192 columns the large-tensor forms (aminmax, amax and amin)
        t = torch.randn(4, 1 + trial * 37 + (trial % 2) * 9000, generator=generator).to(dtype)
        if trial % 4:
            flat = t.view(-1)
            at = torch.randint(0, flat.numel(), (1 + trial % 3,), generator=generator)
            flat[at] = [float("nan"), float("inf"), -float("inf")][trial % 3]
        assert bool(all_finite(t)) == bool(torch.isfinite(t).all()), trial
        torch.testing.assert_close(_row_abs_max(t), t.abs().amax(1), equal_nan=True, rtol=0, atol=0)
    assert bool(all_finite(torch.empty(0))) and bool(all_finite(torch.tensor([1, 2])))
    assert _row_abs_max(torch.empty(3, 0)).tolist() == [0.0, 0.0, 0.0]


_VIEWS = {"view", "_unsafe_view", "detach", "alias", "reshape", "expand", "t", "transpose", "slice", "select"}


class _LargeWrites(TorchDispatchMode):
    """Counts the aten ops (views aside) whose output has at least ``size`` elements."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.ops = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if isinstance(out, torch.Tensor) and out.numel() >= self.size and name not in _VIEWS:
            self.ops.append(func.overloadpacket.__name__)
        return out


def test_the_weights_check_writes_three_output_sized_tensors():
    """a·b and b·b for the float64 dot products, and a − w b for the residual: the finiteness checks and
    the maxima read a and b without writing (before: fifteen; torch.isfinite alone writes four, abs, ne,
    eq and mul, and ran twice, then w·b, a − w·b and three |·|)."""
    torch.manual_seed(0)
    b = torch.randn(8, 5000)  # past the size below which the plain forms are used
    w = torch.rand(8) + 0.5
    a = b * w[:, None]
    with _LargeWrites(b.numel()) as mode:
        got = derive_weights([a], [b], 8)
    torch.testing.assert_close(got, w.double(), rtol=1e-5, atol=0)
    assert len(mode.ops) == 3, mode.ops


def test_the_weights_check_still_refuses_what_it_refused():
    torch.manual_seed(0)
    b = torch.randn(4, 50)
    a = b * 2.0
    a[2, 7] += 1.0  # example 2 is not a multiple of its own loss's gradient
    with pytest.raises(BatchLossMismatch, match="at example 2"):
        derive_weights([a], [b], 4)
    a = b * 2.0
    a[1, 3] = float("nan")
    with pytest.raises(BatchLossMismatch, match="not finite"):
        derive_weights([a], [b], 4)
    bad = b.clone()
    bad[3, 0] = float("inf")
    with pytest.raises(BatchLossMismatch, match=r"examples \[3\]"):
        derive_weights([b * 2.0], [bad], 4)
