"""Closed forms for recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) in the fast engine.

These modules have no layer rule: they stay fallback units, whose per-example gradients the engine
checks, summed, against autograd's (unless the backward is split at the layer, :mod:`.cuts`). Instead of
``vmap`` over the ``vjp`` of the whole module, one captured call is worked out layer by layer (no autograd,
no per-example loop):

1. the top layer's hidden states h_t are the call's output, if the cell equations, evaluated on it
   (each step from the output's previous step), reproduce it to rounding; then h_{t-1} and every
   step's gates come out of a few batched ops (LSTM's cell state is an elementwise recurrence, one
   fused op per step). Lower layers, and an output that does not check out (changed in place after
   the call), are recomputed step by step from their inputs;
2. back-propagation through time written out (the cells' own derivatives, no autograd), which gives
   every example's gradient of every step's gate pre-activations: δ_t (input side) and δʰ_t (hidden
   side; the same tensor except for GRU's n gate, δʰ_n = δ_n ∘ r). Then, for example i, with x_t the
   layer's input and h_{t-1} the hidden state step t read (h0 at the first):

    W_ih: Σ_t δ_t x_tᵀ     W_hh: Σ_t δʰ_t h_{t-1}ᵀ     b_ih: Σ_t δ_t     b_hh: Σ_t δʰ_t

Weights become :class:`OuterPiece` (act = x or h_{t-1}, grad = δ; their norms, second moments and
inner products are the Linear-on-sequences forms), biases :class:`DensePiece`. Summed over examples
and directions, δ_t W_ih of layer 0 is the gradient at the call's input, which lets the engine skip
autograd's own backward through the layer (:mod:`.cuts`); the weights' means are then these sums.

Cells, as PyTorch defines them (gate blocks in this order):

- LSTM (i, f, g, o): z = W_ih x + b_ih + W_hh h + b_hh; i, f, o = σ, g = tanh; c' = f c + i g; h' = o tanh(c');
- GRU (r, z, n): r, z = σ(W_i· x + b_i· + W_h· h + b_h·); n = tanh(W_in x + b_in + r ∘ (W_hn h + b_hn));
  h' = (1 − z) n + z h;
- RNN: h' = tanh or relu(W_ih x + b_ih + W_hh h + b_hh).

Layers stack (layer l reads layer l−1's output, both directions concatenated), and a reverse direction
runs over the reversed sequence. Cotangents are the captured gradients of ``out``, ``h_n`` (and
``c_n``), which are of the mean loss: the pieces carry the engine's ``grad_scale``.

:func:`recurrent_pieces` returns None — and the module takes the ``torch.func`` fallback, which is
exact for any module — whenever any assumption of these formulas is not shown to hold: a subclass or an
instance-level override, hooks, weights that are not the module's own plain Parameters, ``proj_size``,
a PackedSequence or unbatched input, inter-layer dropout in training mode, autocast, a dtype other than
float32 / float64, or a call or output of an unexpected form.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable, TypeVar, cast

import torch
from torch import Tensor, nn

from ..._batch import flat_leaves, tensors_in
from ..._host_reads import HostChecks, open_checks
from .units import Call, Unit
from .pieces import DensePiece, OuterPiece, Piece
from .rules import has_hooks

__all__ = [
    "recurrent_pieces",
    "recurrent_mode",
    "recurrent_closed_form",
    "cuttable_call",
    "has_recurrent_layers",
    "output_checks_read_with_the_step",
    "raise_if_outputs_not_reproduced",
    "OutputNotReproduced",
]

#: The exact classes handled, and the cell each runs (``module.mode`` must agree).
_MODES = {nn.LSTM: ("LSTM",), nn.GRU: ("GRU",), nn.RNN: ("RNN_TANH", "RNN_RELU")}
#: Methods the module's forward runs: an instance that overrides one computes something else.
_METHODS = (
    "forward",
    "_update_flat_weights",
    "_init_flat_weights",
    "_weights_have_changed",
    "check_forward_args",
    "check_input",
    "check_hidden_size",
    "get_expected_hidden_size",
    "permute_hidden",
    "flatten_parameters",
)


@dataclass
class _Captured:
    """One call, batch-first: input ``[B, T, in]``, initial states and (unscaled) output cotangents."""

    x: Tensor
    h0: Tensor  # [L·D, B, H]
    c0: Tensor | None  # LSTM only
    out: Tensor  # [B, T, D·H]: the top layer's output as the call returned it
    d_out: Tensor  # [B, T, D·H]
    d_hn: Tensor  # [L·D, B, H]
    d_cn: Tensor | None


def recurrent_pieces(unit: Unit, call: Call, batch_size: int, grad_scale: float) -> dict[str, Piece] | None:
    """Pieces for the trainable weights of one call of an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` unit,
    or None where the closed form is not shown to apply (then the exact fallback runs)."""
    mode = recurrent_mode(unit)
    found = None if mode is None else recurrent_closed_form(unit, call, batch_size, grad_scale, mode)
    return None if found is None else found[0]


def recurrent_mode(unit: Unit) -> str | None:
    """The cell a rule-less unit runs, if it is a plain PyTorch recurrent layer the closed form covers
    (call it while no capture hook is on the module: hooks are a reason to refuse)."""
    return _supported_mode(unit.module, unit)


def recurrent_closed_form(
    unit: Unit, call: Call, batch_size: int, grad_scale: float, mode: str, input_grad: bool = False
) -> tuple[dict[str, Piece], Tensor | None] | None:
    """(pieces, with ``input_grad`` the gradient at the call's input, laid out as that input and of
    the loss the captured output gradients are of) for one call of a unit in ``mode``, or None where
    the call is not of the form the closed form covers. The input gradient is Σ over directions of
    δ_x W_ih of layer 0: what autograd's backward through the layer would give."""
    captured = _captured(cast(nn.RNNBase, unit.module), call, batch_size, mode)  # mode: a recurrent layer
    if captured is None:
        return None
    with torch.no_grad():
        pieces, d_x = _pieces(cast(nn.RNNBase, unit.module), unit, mode, captured, grad_scale, input_grad)
    if d_x is not None and not unit.module.batch_first:
        d_x = d_x.transpose(0, 1)
    return pieces, d_x


def cuttable_call(unit: Unit, call: Call) -> bool:
    """Whether a call's backward can come from the closed form alone: it is of the form the closed form
    covers, and of its inputs only the sequence may need a gradient (an initial state that requires
    one would need its own, which the closed form does not give)."""
    if _under_autocast(call) or call.broadcast or not call.args or len(call.args) > 2 or call.kwargs:
        return False
    if not isinstance(call.args[0], Tensor) or call.args[0].dtype not in (torch.float32, torch.float64):
        return False
    hx = call.args[1] if len(call.args) > 1 else None
    return not any(t.requires_grad for t in tensors_in(hx))


# ------------------------------------------------------------------------------ preconditions


def _supported_mode(module: nn.Module, unit: Unit) -> str | None:
    """The cell the module runs, if it is a plain PyTorch recurrent layer this closed form covers."""
    modes = _MODES.get(type(module))  # exact type: a subclass may compute something else
    mode = getattr(module, "mode", None)
    if modes is None or mode not in modes or any(m in vars(module) for m in _METHODS) or has_hooks(module):
        return None
    # from here the module's exact type is one of _MODES': an nn.RNNBase (attributes typed Tensor | Module)
    if getattr(module, "proj_size", 0) != 0 or module.hidden_size <= 0 or module.num_layers < 1:  # type: ignore[operator]
        return None
    if module.training and module.dropout > 0 and module.num_layers > 1:  # type: ignore[operator]
        return None  # random dropout between layers: the recompute cannot redraw it
    names = list(module._flat_weights_names)  # type: ignore[arg-type]
    if names != _weight_names(module) or not set(unit.params) <= set(names):  # type: ignore[arg-type]
        return None  # unexpected weights (or trainable tensors the forward does not read)
    for name in names:
        p = module._parameters.get(name)
        if not isinstance(p, nn.Parameter) or getattr(module, name) is not p:  # parametrised / replaced
            return None
    return mode


def _weight_names(module: nn.RNNBase) -> list[str]:
    """``_flat_weights_names`` as a module without projections has them."""
    names = []
    for layer in range(module.num_layers):
        for suffix in ("", "_reverse")[: 2 if module.bidirectional else 1]:
            kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if module.bias else ("weight_ih", "weight_hh")
            names += [f"{kind}_l{layer}{suffix}" for kind in kinds]
    return names


def _captured(module: nn.RNNBase, call: Call, batch_size: int, mode: str) -> _Captured | None:
    """The call's input, states and cotangents, batch-first, if the call has the expected form."""
    if call.broadcast or _under_autocast(call):
        return None  # under autocast the forward ran in lower precision than a recompute would
    args, kwargs = call.args, call.kwargs
    if (
        len(args) > 2
        or not set(kwargs) <= {"input", "hx"}
        or ("input" in kwargs) == bool(args)
        or ("hx" in kwargs and len(args) > 1)
    ):
        return None
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    weight = module._parameters["weight_ih_l0"]
    if (
        type(x) not in (Tensor, nn.Parameter)
        or x.dim() != 3
        or x.dtype not in (torch.float32, torch.float64)
        or x.dtype != weight.dtype  # type: ignore[union-attr]  # a Parameter (_supported_mode)
        or x.device != weight.device  # type: ignore[union-attr]
    ):
        return None  # PackedSequence (a tuple), unbatched input, other dtypes, tensor subclasses
    if any(p.dtype != x.dtype or p.device != x.device for p in module._parameters.values() if p is not None):
        return None
    x = x.detach() if module.batch_first else x.detach().transpose(0, 1)
    batch, steps = x.shape[:2]
    directions, hidden = 2 if module.bidirectional else 1, module.hidden_size
    states = (module.num_layers * directions, batch, hidden)
    if batch != batch_size or steps == 0 or x.shape[2] != module.input_size:
        return None
    lstm = mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(states)
        c0 = x.new_zeros(states) if lstm else None
    elif lstm:
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2 and all(_plain(t, states, x) for t in hx)):
            return None
        h0, c0 = hx[0].detach(), hx[1].detach()
    else:
        if not _plain(hx, states, x):
            return None
        h0, c0 = hx.detach(), None
    leaves = flat_leaves(call.output)
    out_shape = (batch, steps, directions * hidden) if module.batch_first else (steps, batch, directions * hidden)
    shapes = [out_shape, states, states] if lstm else [out_shape, states]
    if len(leaves) != len(shapes) or any(not _plain(t, s, x) for t, s in zip(leaves, shapes)):
        return None
    if not set(call.out_grads) <= set(range(len(leaves))):
        return None
    grads = []
    for i, leaf in enumerate(leaves):
        g = call.out_grads.get(i)
        if g is None:
            g = x.new_zeros(leaf.shape)
        elif g.shape != leaf.shape or g.dtype != x.dtype or g.device != x.device:
            return None
        grads.append(g)
    out, d_out = (
        (leaves[0].detach(), grads[0])
        if module.batch_first
        else (leaves[0].detach().transpose(0, 1), grads[0].transpose(0, 1))
    )
    return _Captured(x.contiguous(), h0, c0, out, d_out, grads[1], grads[2] if lstm else None)


def _under_autocast(call: Call) -> bool:
    return any(enabled for _, enabled, _ in (call.autocast or ()))


def _plain(t, shape: tuple, x: Tensor) -> bool:
    return isinstance(t, Tensor) and tuple(t.shape) == shape and t.dtype == x.dtype and t.device == x.device


# ---------------------------------------------------------------------------------- assembly


def _pieces(
    module: nn.RNNBase, unit: Unit, mode: str, cap: _Captured, grad_scale: float, input_grad: bool = False
) -> tuple[dict[str, Piece], Tensor | None]:
    """Every layer and direction forward (the top layer from the call's output where it checks
    out), then back-propagation top-down, collecting the pieces; and, with ``input_grad``, the
    gradient at layer 0's input (batch-first, unscaled like the captured cotangents)."""
    directions, layers = 2 if module.bidirectional else 1, module.num_layers
    hidden, batch, steps = module.hidden_size, cap.x.shape[0], cap.x.shape[1]
    # each is a Parameter (_supported_mode)
    weights = {name: module._parameters[name].detach() for name in module._flat_weights_names}  # type: ignore[union-attr]
    forward_steps = list(range(steps))
    orders = [forward_steps, forward_steps[::-1]][:directions]
    suffixes = [[f"_l{layer}" + ("_reverse" if d else "") for d in range(directions)] for layer in range(layers)]

    recorded = []  # per layer: (its input [B, T, in], a cell per direction)
    layer_input = cap.x
    for layer in range(layers):
        cells: list[Any] = []  # one cell class per mode (their backward's arguments differ)
        for d, order in enumerate(orders):
            k, suffix = layer * directions + d, suffixes[layer][d]
            top = layer == layers - 1 and not _RECOMPUTE.get()  # (a step run again: every layer recomputed)
            known = cap.out[..., d * hidden : (d + 1) * hidden] if top else None
            cells.append(
                _CELLS[mode](
                    layer_input,
                    known,
                    cap.h0[k],
                    None if cap.c0 is None else cap.c0[k],
                    weights["weight_ih" + suffix],
                    weights["weight_hh" + suffix],
                    weights.get("bias_ih" + suffix),
                    weights.get("bias_hh" + suffix),
                    order,
                    mode,
                )
            )
        recorded.append((layer_input, cells))
        if layer < layers - 1:
            layer_input = cells[0].out if directions == 1 else torch.cat([cell.out for cell in cells], 2)

    pieces: dict[str, Piece] = {}
    d_layer_out = cap.d_out
    for layer in reversed(range(layers)):
        layer_input, cells = recorded[layer]
        d_input = None
        for d, cell in enumerate(cells):
            k, suffix = layer * directions + d, suffixes[layer][d]
            d_cn = cap.d_cn[k] if cap.d_cn is not None else None
            delta_x, delta_h = cell.backward(d_layer_out[..., d * hidden : (d + 1) * hidden], cap.d_hn[k], d_cn)
            pieces.update(_layer_pieces(unit, suffix, layer_input, cell.h_prev, delta_x, delta_h, weights, grad_scale))
            if layer > 0 or input_grad:  # the gradient reaching the layer below through this direction's input
                flat = delta_x.reshape(batch * steps, -1) @ weights["weight_ih" + suffix]
                d_input = flat if d_input is None else d_input.add_(flat)
        if d_input is not None:
            d_layer_out = d_input.view(batch, steps, -1)
    return pieces, d_layer_out if input_grad else None


def _layer_pieces(
    unit: Unit,
    suffix: str,
    x: Tensor,
    h_prev: Tensor,
    delta_x: Tensor,
    delta_h: Tensor,
    weights: dict[str, Tensor],
    grad_scale: float,
) -> dict[str, Piece]:
    """The pieces of one layer and direction's trainable weights."""
    found: dict[str, Piece] = {}
    for kind, act, delta in (("ih", x, delta_x), ("hh", h_prev, delta_h)):
        if f"weight_{kind}{suffix}" in unit.params:
            found[f"weight_{kind}{suffix}"] = OuterPiece(
                act, delta, weights[f"weight_{kind}{suffix}"].shape, scale=grad_scale
            )
        if f"bias_{kind}{suffix}" in unit.params:
            same = kind == "hh" and delta is delta_x and f"bias_ih{suffix}" in found  # LSTM, RNN: b_hh's = b_ih's
            # found's bias_ih piece is the DensePiece made above
            per_example = found[f"bias_ih{suffix}"].per_example.clone() if same else delta.sum(1)  # type: ignore[attr-defined]
            found[f"bias_{kind}{suffix}"] = DensePiece(per_example, grad_scale)
    return found


# ------------------------------------------------------------------------------------ helpers


def _previous(seq: Tensor, first: Tensor, order: list[int]) -> Tensor:
    """``[B, T, H]``: at each time, the state the step read (``first`` at the first step of ``order``)."""
    if len(order) > 1 and order[0] > order[1]:  # reverse direction: time t read the state of t + 1
        return torch.cat([seq[:, 1:], first.unsqueeze(1)], 1)
    return torch.cat([first.unsqueeze(1), seq[:, :-1]], 1)


def _linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """x_t Wᵀ + bias for every step at once (``x``: ``[B, T, d]``), as ``[B, T, p]``."""
    flat = x.reshape(-1, x.shape[2])
    out = torch.mm(flat, w.t()) if bias is None else torch.addmm(bias, flat, w.t())
    return out.view(x.shape[0], x.shape[1], -1)


def _tanh_(t: Tensor) -> Tensor:
    """tanh in place, as 2σ(2t) − 1: the doubling is exact, so this is tanh to about an ulp of 1
    (absolute), the precision every value of the cell has. On CPU ``torch.tanh`` costs about four
    sigmoids, and the cells take one or two tanh per step."""
    return t.mul_(2).sigmoid_().mul_(2).sub_(1)


def _sigmoid_slope(a: Tensor) -> Tensor:
    """σ' from σ's output a: a − a² (one fused op)."""
    return torch.addcmul(a, a, a, value=-1)


def _tanh_slope(a: Tensor) -> Tensor:
    """tanh' from tanh's output a: 1 − a² (one fused op)."""
    return torch.addcmul(a.new_ones(()), a, a, value=-1)


#: How far (relative to 1 + max |h|) the call's output may be from the cell equations evaluated on it
#: (each step from the output's previous step) and still be taken as the layer's hidden states.
#: Recomputing in another order (matmul blocking, oneDNN's fused kernels) moves h by 1–3 ulps (float32,
#: T up to 300, H up to 256, two layers); anything beyond this (an output changed in place after the
#: call, TF32 kernels) makes the cell recompute the recurrence step by step instead.
_CONSISTENT_ULPS = 64


def _consistent(recomputed: Tensor, known: Tensor) -> Tensor:
    """0-d bool tensor: whether ``known`` equals ``recomputed`` to rounding (see ``_CONSISTENT_ULPS``),
    relative to 1 + its largest magnitude. Overwrites ``recomputed`` (a temporary of the caller's)."""
    tolerance = _CONSISTENT_ULPS * torch.finfo(known.dtype).eps
    return recomputed.sub_(known).abs_().max() <= tolerance * (1 + known.abs().max())


# How the check above is read. On its own, at once: one host read per recurrent call. Inside
# output_checks_read_with_the_step, with the step's other host reads: the call's output is taken as the
# top layer's states at once, the verdict is read at the end, and a step whose output did not check out
# runs again with every layer recomputed step by step (_RECOMPUTE).
_RECOMPUTE: contextvars.ContextVar[bool] = contextvars.ContextVar("persample_rnn_recompute", default=False)

_Result = TypeVar("_Result")


class _Verdicts:
    """The deferred checks of one step: each verdict tensor, and the values read so far."""

    def __init__(self) -> None:
        self.pending: list[Tensor] = []
        self.read: list[bool] = []

    def add(self, verdict: Tensor, checks: HostChecks) -> None:
        self.pending.append(verdict)
        checks.defer(verdict, self._took)

    def _took(self, read: list[float]) -> None:
        self.read.append(bool(read[0]))
        self.pending.pop(0)

    def held(self) -> bool:
        """Whether every output checked out: those read, and (one more host read, on this path only)
        those the step left unread because it raised first."""
        if not all(self.read):
            return False
        return not self.pending or bool(torch.stack([v.to(self.pending[0].device) for v in self.pending]).all())


_DEFERRED: contextvars.ContextVar[_Verdicts | None] = contextvars.ContextVar("persample_rnn_verdicts", default=None)


class OutputNotReproduced(BaseException):
    """Internal: a recurrent call's output, taken as its top layer's states in a step that reads its checks
    at the end, did not check out, and what the engine computed from it is void. A ``BaseException``, so
    that no ``except Exception`` between the engine and :func:`output_checks_read_with_the_step` (an
    engine chain moving on to the next engine, say) takes it for a refusal of its own."""


def raise_if_outputs_not_reproduced() -> None:
    """In an engine that is raising: :class:`OutputNotReproduced` instead where a deferred check failed
    (the error comes from states that were never the layer's), else nothing."""
    verdicts = _DEFERRED.get()
    if verdicts is not None and not verdicts.held():
        raise OutputNotReproduced()


def _takes_output(recomputed: Tensor, known: Tensor) -> bool:
    """Whether the cell takes the call's output ``known`` as the top layer's hidden states (``recomputed``:
    the cell equations evaluated on it). Read at once, or, inside :func:`output_checks_read_with_the_step`
    with a step collector open, taken and checked when the step's host reads are read."""
    verdict = _consistent(recomputed, known)
    verdicts, checks = _DEFERRED.get(), open_checks()
    if verdicts is None or checks is None or not isinstance(verdict, Tensor):
        return bool(verdict)
    verdicts.add(verdict, checks)
    return True


def has_recurrent_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds a layer this closed form may cover (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``)."""
    return any(type(m) in _MODES for m in model.modules())


def output_checks_read_with_the_step(attempt: Callable[[], _Result], reset: Callable[[], None]) -> _Result:
    """``attempt()``, a step that reads its host values once (it opens a
    :func:`persample._host_reads.one_host_read` and returns after it is read), with each recurrent
    call's check that its output is the cell equations' read in that one read instead of on its own.

    The output is taken as the top layer's states meanwhile. Where a check then fails (an output changed
    in place after the call; kernels that round differently, such as TF32), whatever the attempt
    computed or raised is dropped, ``reset()`` puts the model and the random generators back as the
    attempt found them, and ``attempt()`` runs again with every layer recomputed step by step from its
    inputs: the same numbers as a check read at once gives, at the cost of a second step, only then.
    """
    verdicts = _Verdicts()
    token = _DEFERRED.set(verdicts)
    try:
        result = attempt()
    except OutputNotReproduced:
        pass
    except BaseException:
        if verdicts.held():  # an error of the step itself, not of states that were never the layer's
            raise
    else:
        if verdicts.held():
            return result
    finally:
        _DEFERRED.reset(token)
    reset()
    recompute = _RECOMPUTE.set(True)
    try:
        return attempt()
    finally:
        _RECOMPUTE.reset(recompute)


# ---------------------------------------------------------------------------------------- cells
#
# A cell is one direction of one layer. Forward: given the layer's hidden states h_t (the call's
# output, for the top layer), h_{t−1} and every step's gates come out of a few batched ops, and
# the output is kept only if the cell equations reproduce it to rounding; otherwise (lower layers,
# an output changed after the call) the recurrence runs step by step. Then back-propagation
# through time, one matmul and a few elementwise ops per step.


class _LSTMCell:
    """LSTM gates i, f, g, o and cells c_t of every step, and back-propagation through time."""

    def __init__(self, x, known, h0, c0, w_ih, w_hh, b_ih, b_hh, order, mode):
        self.order, self.w_hh, self.c0 = order, w_hh, c0
        bias = None if b_ih is None else b_ih + b_hh
        if known is None or not self._from_output(x, known, h0, c0, w_ih, w_hh, bias):
            self._recurrence(x, h0, c0, w_ih, w_hh, bias)

    def _from_output(self, x, h, h0, c0, w_ih, w_hh, bias) -> bool:
        batch, steps, hidden = h.shape
        self.h_prev = _previous(h, h0, self.order)
        gates = (
            _linear(x, w_ih, bias)
            .view(batch * steps, 4 * hidden)
            .addmm_(self.h_prev.view(batch * steps, hidden), w_hh.t())
            .view(batch, steps, 4, hidden)
        )
        gates[:, :, 2].mul_(2)
        gates.sigmoid_()
        i, f, g, o = gates.unbind(2)
        g.mul_(2).sub_(1)  # tanh(z_g) = 2σ(2 z_g) − 1
        self.gates, self.cells, self.out = gates, torch.empty_like(h), h
        c, cells, inputs, forgets = c0, self.cells.unbind(1), (i * g).unbind(1), f.unbind(1)
        for t in self.order:  # c_t = f_t ∘ c_{t−1} + i_t ∘ g_t
            c = torch.addcmul(inputs[t], forgets[t], c, out=cells[t])
        self.tanh_cells = _tanh_(self.cells.clone())
        return _takes_output(o * self.tanh_cells, h)

    def _recurrence(self, x, h0, c0, w_ih, w_hh, bias):
        batch, steps = x.shape[:2]
        hidden = w_hh.shape[1]
        doubled = torch.ones(4 * hidden, 1, dtype=x.dtype, device=x.device)
        doubled[2 * hidden : 3 * hidden] = 2  # the g block doubled (exactly), for tanh(z) = 2σ(2z) − 1
        gates = _linear(x, w_ih * doubled, None if bias is None else bias * doubled[:, 0])
        gates = gates.view(batch, steps, 4, hidden)
        cells, tanh_cells, out = (x.new_empty(batch, steps, hidden) for _ in range(3))
        z = gates.view(batch, steps, 4 * hidden).unbind(1)
        i, f, g, o = (block.unbind(1) for block in gates.unbind(2))
        c_t, tanh_t, h_t = cells.unbind(1), tanh_cells.unbind(1), out.unbind(1)
        w_t = (w_hh * doubled).t()
        h, c = h0, c0
        for t in self.order:
            z[t].addmm_(h, w_t).sigmoid_()
            g[t].mul_(2).sub_(1)
            c = torch.mul(f[t], c, out=c_t[t]).addcmul_(i[t], g[t])
            h = torch.mul(o[t], _tanh_(tanh_t[t].copy_(c)), out=h_t[t])
        self.gates, self.cells, self.tanh_cells, self.out = gates, cells, tanh_cells, out
        self.h_prev = _previous(out, h0, self.order)

    def backward(self, d_out: Tensor, d_hn: Tensor, d_cn: Tensor) -> tuple[Tensor, Tensor]:
        """δ for the four gates, ``[B, T, 4H]`` (the same on the input and the hidden side).

        With dh, dc the total gradients at h_t, c_t: δ_o = dh ∘ tanh(c) ∘ o(1−o);
        dc = dc_{t+1} ∘ f_{t+1} + dh ∘ o ∘ (1 − tanh²c); δ_i = dc ∘ g ∘ i(1−i);
        δ_f = dc ∘ c_{t−1} ∘ f(1−f); δ_g = dc ∘ i ∘ (1−g²); and dh_{t−1} gets δ W_hh.
        """
        batch, steps, _, hidden = self.gates.shape
        i, f, g, o = self.gates.unbind(2)
        c_prev = _previous(self.cells, self.c0, self.order)
        tanh_c = self.tanh_cells
        # Everything but the recurrence, for all steps at once: δ_ifg = dc ∘ P, δ_o = dh ∘ Q, dc ∋ dh ∘ R;
        # stored time-major, so that every step reads and writes contiguous blocks.
        slope_i, slope_f, _, slope_o = _sigmoid_slope(self.gates).unbind(2)  # (the g block unused)
        p, q, r, forgets = (
            self.gates.new_empty(steps, batch, *shape) for shape in ((3, hidden), (hidden,), (hidden,), (hidden,))
        )
        torch.mul(g, slope_i, out=p.transpose(0, 1)[:, :, 0])
        torch.mul(c_prev, slope_f, out=p.transpose(0, 1)[:, :, 1])
        torch.mul(i, _tanh_slope(g), out=p.transpose(0, 1)[:, :, 2])
        torch.mul(tanh_c, slope_o, out=q.transpose(0, 1))
        torch.mul(o, _tanh_slope(tanh_c), out=r.transpose(0, 1))
        forgets.transpose(0, 1).copy_(f)
        delta = self.gates.new_empty(steps, batch, 4, hidden)
        # Per-step views made once (unbind costs a fraction of indexing at every step).
        # the per-step views replace the tensors of the same names
        p, q, r, forgets, d_outs = p.unbind(0), q.unbind(0), r.unbind(0), forgets.unbind(0), d_out.unbind(1)  # type: ignore[assignment]
        delta_flat, delta_ifg, delta_o = (
            delta.view(steps, batch, -1).unbind(0),
            delta[:, :, :3].unbind(0),
            delta[:, :, 3].unbind(0),
        )
        dc = d_cn.unsqueeze(1).clone()  # [B, 1, H], broadcast over the three blocks it scales
        dc_flat = dc.view(batch, hidden)
        later = None
        for t in reversed(self.order):
            dh = d_outs[t] + d_hn if later is None else torch.addmm(d_outs[t], delta_flat[later], self.w_hh)
            dc_flat.addcmul_(dh, r[t])
            torch.mul(p[t], dc, out=delta_ifg[t])
            torch.mul(q[t], dh, out=delta_o[t])
            dc_flat.mul_(forgets[t])  # the part of dc_{t−1} that flows through c_t
            later = t
        delta = delta.transpose(0, 1).reshape(batch, steps, 4 * hidden)
        return delta, delta


class _GRUCell:
    """GRU gates r, z, n and the hidden-side n pre-activation of every step, and BPTT."""

    def __init__(self, x, known, h0, c0, w_ih, w_hh, b_ih, b_hh, order, mode):
        self.order, self.w_hh = order, w_hh
        if known is None or not self._from_output(x, known, h0, w_ih, w_hh, b_ih, b_hh):
            self._recurrence(x, h0, w_ih, w_hh, b_ih, b_hh)

    def _from_output(self, x, h, h0, w_ih, w_hh, b_ih, b_hh) -> bool:
        hidden = h.shape[2]
        self.h_prev = _previous(h, h0, self.order)
        gi, gh = _linear(x, w_ih, b_ih), _linear(self.h_prev, w_hh, b_hh)  # r multiplies gh's n block
        gates = torch.empty_like(gi)
        torch.add(gi[..., : 2 * hidden], gh[..., : 2 * hidden], out=gates[..., : 2 * hidden]).sigmoid_()
        n = _tanh_(
            torch.addcmul(
                gi[..., 2 * hidden :], gates[..., :hidden], gh[..., 2 * hidden :], out=gates[..., 2 * hidden :]
            )
        )
        self.gates, self.hidden_n, self.out = gates, gh[..., 2 * hidden :], h
        return _takes_output(torch.addcmul(n, gates[..., hidden : 2 * hidden], self.h_prev - n), h)

    def _recurrence(self, x, h0, w_ih, w_hh, b_ih, b_hh):
        batch, steps = x.shape[:2]
        hidden = w_hh.shape[1]
        gi = _linear(x, w_ih, b_ih)
        gh, gates = torch.empty_like(gi), torch.empty_like(gi)
        out = x.new_empty(batch, steps, hidden)
        gh_t, gi_rz, gh_rz, rz = (
            t.unbind(1) for t in (gh, gi[..., : 2 * hidden], gh[..., : 2 * hidden], gates[..., : 2 * hidden])
        )
        gi_n, gh_n, r, z, n = (
            t.unbind(1)
            for t in (
                gi[..., 2 * hidden :],
                gh[..., 2 * hidden :],
                gates[..., :hidden],
                gates[..., hidden : 2 * hidden],
                gates[..., 2 * hidden :],
            )
        )
        h_t, w_t, h = out.unbind(1), w_hh.t(), h0
        for t in self.order:
            if b_hh is None:
                torch.mm(h, w_t, out=gh_t[t])
            else:
                torch.addmm(b_hh, h, w_t, out=gh_t[t])
            torch.add(gi_rz[t], gh_rz[t], out=rz[t]).sigmoid_()
            _tanh_(torch.addcmul(gi_n[t], r[t], gh_n[t], out=n[t]))
            h = torch.addcmul(n[t], z[t], h - n[t], out=h_t[t])  # (1 − z) n + z h
        self.gates, self.hidden_n, self.out = gates, gh[..., 2 * hidden :], out
        self.h_prev = _previous(out, h0, self.order)

    def backward(self, d_out: Tensor, d_hn: Tensor, d_cn: None) -> tuple[Tensor, Tensor]:
        """(δ ``[B, T, 3H]`` on the input side, δʰ on the hidden side).

        With dh the total gradient at h_t: δ_n = dh ∘ (1−z) ∘ (1−n²); δ_r = δ_n ∘ (W_hn h + b_hn) ∘ r(1−r);
        δ_z = dh ∘ (h_{t−1} − n) ∘ z(1−z); δʰ = (δ_r, δ_z, δ_n ∘ r); dh_{t−1} = dh ∘ z + δʰ W_hh.
        Each block is dh times a factor of the forward alone, so one product per step gives all four,
        laid out (r, z, n hidden, n input) so that δʰ is the first three.
        """
        batch, steps, width = self.gates.shape
        hidden = width // 3
        r, z, n = self.gates.view(batch, steps, 3, hidden).unbind(2)
        d_n = (1 - z) * _tanh_slope(n)
        factors = torch.stack(
            [d_n * self.hidden_n * _sigmoid_slope(r), (self.h_prev - n) * _sigmoid_slope(z), d_n * r, d_n], 2
        ).unbind(1)
        blocks = self.gates.new_empty(batch, steps, 4, hidden)
        block_steps, hidden_side = blocks.unbind(1), blocks[:, :, :3].reshape(batch, steps, width).unbind(1)
        updates, d_outs = z.unbind(1), d_out.unbind(1)
        dh, later = None, None
        for t in reversed(self.order):
            if later is None:
                dh = d_outs[t] + d_hn
            else:
                # dh was set at the first step (later is None there)
                dh = torch.addmm(torch.addcmul(d_outs[t], dh, updates[later]), hidden_side[later], self.w_hh)  # type: ignore[arg-type]
            torch.mul(factors[t], dh.unsqueeze(1), out=block_steps[t])
            later = t
        delta_h = blocks[:, :, :3].reshape(batch, steps, width).contiguous()
        delta_x = blocks[:, :, [0, 1, 3]].reshape(batch, steps, width)
        return delta_x, delta_h


class _RNNCell:
    """Elman RNN (tanh or relu), and BPTT: δ_t = dh_t ∘ act'(h_t)."""

    def __init__(self, x, known, h0, c0, w_ih, w_hh, b_ih, b_hh, order, mode):
        self.order, self.w_hh = order, w_hh
        bias = None if b_ih is None else b_ih + b_hh
        activation = _tanh_ if mode == "RNN_TANH" else torch.Tensor.relu_
        if known is not None:
            self.h_prev = _previous(known, h0, order)
            recomputed = activation(_linear(x, w_ih, bias).add_(_linear(self.h_prev, w_hh, None)))
            h = known if _takes_output(recomputed, known) else None
        if known is None or h is None:
            h = _linear(x, w_ih, bias)
            h_t, w_t, previous = h.unbind(1), w_hh.t(), h0
            for t in order:
                previous = activation(h_t[t].addmm_(previous, w_t))
            self.h_prev = _previous(h, h0, order)
        self.out = h
        # relu's gradient is taken where the output is > 0, as autograd's threshold_backward does.
        self.slope = _tanh_slope(h) if mode == "RNN_TANH" else (h > 0).to(h.dtype)

    def backward(self, d_out: Tensor, d_hn: Tensor, d_cn: None) -> tuple[Tensor, Tensor]:
        delta = torch.empty_like(self.slope)
        delta_steps, slopes, d_outs = delta.unbind(1), self.slope.unbind(1), d_out.unbind(1)
        later = None
        for t in reversed(self.order):
            dh = d_outs[t] + d_hn if later is None else torch.addmm(d_outs[t], delta_steps[later], self.w_hh)
            torch.mul(dh, slopes[t], out=delta_steps[t])
            later = t
        return delta, delta


_CELLS = {"LSTM": _LSTMCell, "GRU": _GRUCell, "RNN_TANH": _RNNCell, "RNN_RELU": _RNNCell}
