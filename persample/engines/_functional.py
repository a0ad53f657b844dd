"""Forwards that compute what a module computes, in a form ``torch.func`` can batch.

- ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: the fused kernels behind
  ``nn.RNNBase.forward`` have no correct ``vmap`` rule (``vmap(grad(...))`` over
  an RNN or GRU fails with a broadcast-shape error). :func:`rnn_forward`
  computes the same function (same gate order and parameter names as PyTorch)
  from matmuls and pointwise ops.
- ``nn.InstanceNorm*`` in training mode with ``track_running_stats=True``
  normalises each example with its own statistics (so per-example gradients are
  well defined) but also updates the running statistics in place, which
  ``vmap`` cannot do with per-example values. :func:`instance_norm_forward`
  gives the same output without that side effect.

Inside the engines, :func:`vmap_friendly_modules` temporarily routes each such
module's ``forward`` through these; the module is restored on exit, also on error.

:class:`ParameterReads` guards every ``functional_call`` of the engines: a read of a trainable
parameter itself (not the tensor substituted for it) would be a term of the gradient lost.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode

from ..contract import PRECONDITIONS, refusal

__all__ = ["rnn_forward", "instance_norm_forward", "vmap_friendly_modules", "ParameterReads"]


def _cell_step(
    mode: str, x_proj: Tensor, h: Tensor, c: Tensor | None, w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """One time step given the precomputed input projection ``x_proj = x W_ihᵀ + b_ih``."""
    h_proj = F.linear(h, w_hh, b_hh)
    if mode == "LSTM":
        assert c is not None  # an LSTM carries its cell state
        i, f, g, o = (x_proj + h_proj).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr)), c
    if mode == "GRU":
        xr, xz, xn = x_proj.chunk(3, dim=-1)
        hr, hz, hn = h_proj.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(x_proj + h_proj), None


def _run_direction(
    module: nn.RNNBase, layer: int, reverse: bool, x: Tensor, h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run one layer in one direction over time-major ``x: [T, N, F]``."""
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    get: Callable[[str], Any] = lambda name: getattr(module, name + sfx, None)  # noqa: E731  (swapped by functional_call)
    x_proj = F.linear(x, get("weight_ih"), get("bias_ih"))
    w_hh, b_hh = get("weight_hh"), get("bias_hh")
    w_hr = get("weight_hr") if module.proj_size > 0 else None
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outs: list[Tensor] = [None] * x.shape[0]  # type: ignore[list-item]
    for t in steps:
        h, c = _cell_step(module.mode, x_proj[t], h, c, w_hh, b_hh, w_hr)
        outs[t] = h
    return torch.stack(outs), h, c


def rnn_forward(module: nn.RNNBase, input: Tensor, hx=None):
    """Same result as ``module(input, hx)``, computed with plain ops (see module docstring)."""
    if isinstance(input, PackedSequence):
        raise NotImplementedError(
            f"persample does not support PackedSequence inputs to {type(module).__name__} yet; "
            "pad the sequences instead (per-example gradients need no packing: each example is "
            "processed on its own)"
        )
    is_lstm = module.mode == "LSTM"
    unbatched = input.dim() == 2
    if unbatched:
        input = input.unsqueeze(1)
        if hx is not None:
            hx = tuple(t.unsqueeze(1) for t in hx) if is_lstm else hx.unsqueeze(1)
    elif module.batch_first:
        input = input.transpose(0, 1)
    dirs = 2 if module.bidirectional else 1
    batch = input.shape[1]
    out_size = module.proj_size if module.proj_size > 0 else module.hidden_size
    if hx is None:
        h0 = input.new_zeros(module.num_layers * dirs, batch, out_size)
        c0 = input.new_zeros(module.num_layers * dirs, batch, module.hidden_size) if is_lstm else None
    else:
        h0, c0 = hx if is_lstm else (hx, None)

    h_list: list[Tensor] = []
    c_list: list[Tensor | None] = []
    layer_input = input
    for layer in range(module.num_layers):
        outputs = []
        for d in range(dirs):
            k = layer * dirs + d
            out, h, c = _run_direction(module, layer, d == 1, layer_input, h0[k], None if c0 is None else c0[k])
            outputs.append(out)
            h_list.append(h)
            c_list.append(c)
        layer_input = torch.cat(outputs, dim=-1) if dirs == 2 else outputs[0]
        if module.dropout and module.training and layer < module.num_layers - 1:
            layer_input = F.dropout(layer_input, module.dropout, training=True)

    output, h_n = layer_input, torch.stack(h_list)
    c_n = torch.stack(cast("list[Tensor]", c_list)) if is_lstm else None  # an LSTM's cell states are tensors
    if unbatched:
        output, h_n = output.squeeze(1), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if is_lstm else None  # type: ignore[union-attr]  # set for an LSTM (above)
    elif module.batch_first:
        output = output.transpose(0, 1)
    return (output, (h_n, c_n)) if is_lstm else (output, h_n)


def instance_norm_forward(module: nn.modules.instancenorm._InstanceNorm, input: Tensor) -> Tensor:
    """``module(input)`` in training mode, normalised by the input's own statistics, leaving the
    running statistics alone (the output does not depend on them in training mode)."""
    unbatched = input.dim() == module._get_no_batch_dim()
    x = input.unsqueeze(0) if unbatched else input
    out = F.instance_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)
    return out.squeeze(0) if unbatched else out


def _vmap_forward(module: nn.Module):
    """The vmap-friendly forward for ``module``, or None when its own is fine."""
    if isinstance(module, nn.RNNBase):
        return rnn_forward
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.training and module.track_running_stats:
        return instance_norm_forward
    return None


@contextlib.contextmanager
def vmap_friendly_modules(model: nn.Module) -> Iterator[None]:
    """Temporarily route RNNs and train-mode InstanceNorms through the forwards above."""
    patched = [(m, f) for m in model.modules() if (f := _vmap_forward(m)) is not None]
    try:
        for m, forward in patched:
            m.forward = forward.__get__(m)  # a bound method on the instance only
        yield
    finally:
        for m, _ in patched:
            m.__dict__.pop("forward", None)


#: Tensor functions and properties that read a parameter's metadata, or nothing a gradient flows through
#: (``p.shape``, ``p.dtype``, ``p.data``, ``p.detach()``): no term of the gradient is lost there.
_METADATA = frozenset(
    {
        *("dim", "size", "numel", "stride", "is_floating_point", "is_complex", "element_size", "detach"),
        *("shape", "dtype", "device", "data", "grad", "requires_grad", "is_leaf", "grad_fn", "ndim", "layout"),
        *("is_cuda", "is_sparse", "is_meta", "itemsize", "nbytes", "names", "_version"),
    }
)


def _function_name(func) -> str | None:
    """``func``'s name; for a property read (``p.T``, ``p.shape``: a ``__get__``), the property's."""
    name = getattr(func, "__name__", None)
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None)
    return name


class ParameterReads(TorchFunctionMode):
    """Refuses (``PARAMETER_NOT_SUBSTITUTED``) an op that reads a trainable parameter itself while
    ``functional_call`` substitutes the model's parameters: ``loss_fn`` reading ``model.weight`` (a
    regulariser), or a forward reading a reference kept outside the module tree. ``torch.func`` sees such a
    read as a constant, so that term of each example's gradient would be lost, silently."""

    def __init__(self, params: dict[str, nn.Parameter]):
        super().__init__()
        self.names = {id(p): n for n, p in params.items()}

    def _check(self, value) -> None:
        if isinstance(value, nn.Parameter):
            name = self.names.get(id(value))
            if name is not None:
                raise refusal(
                    "PARAMETER_NOT_SUBSTITUTED",
                    f"parameter {name!r} is read by the forward or loss_fn outside the modules that "
                    "torch.func.functional_call substitutes (loss_fn reading the model's weights, a reference kept "
                    "outside the module tree): torch.func would differentiate it as a constant and lose that term "
                    f"of each example's gradient. Fix: {PRECONDITIONS['PARAMETER_NOT_SUBSTITUTED'].fix}",
                )
        elif isinstance(value, (list, tuple)):
            for item in value:
                self._check(item)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _function_name(func) in _METADATA:  # reads no value that a gradient flows through
            return func(*args, **kwargs)
        self._check(args)  # (a Parameter does not show in ``types``: its __torch_function__ is disabled)
        if kwargs:
            self._check(tuple(kwargs.values()))
        return func(*args, **kwargs)
