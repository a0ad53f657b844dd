"""Closed-form layer rules for the fast engine.

A rule turns one call of a module — its input ``x`` and the gradient ``gy`` of
its output with respect to the summed per-example loss (so unscaled) — into a
:class:`~persample.engines.fast.pieces.Piece` per parameter.

A rule is used only where it provably applies (see :class:`Rule`): the module
is an instance of the rule's class *and* runs that class's own ``forward``,
owns exactly the rule's parameters, and has no hooks. A subclass with its own
``forward``, a parametrised weight or a user hook gets no rule, and the module
takes the exact fallback (``torch.func`` on the module alone); an Embedding
subclass gets the ``embedding_recomputed`` rule, which re-runs its forward to
show what it computes. Rules with ``whole_call`` (MultiheadAttention,
EmbeddingBag, Embedding subclasses) read the whole recorded call.

| module                        | per-example gradient of example i                          |
|-------------------------------|------------------------------------------------------------|
| Linear, HF Conv1D             | W: Σ_t b_t a_tᵀ;  bias: Σ_t b_t                            |
| Conv1d/2d/3d                  | the same on unfolded input patches (t = output location)   |
| Embedding                     | W: Σ_t e_{id_t} b_tᵀ                                       |
| LayerNorm, RMSNorm, GroupNorm | γ: Σ_t b_t ∘ x̂_t;  β: Σ_t b_t                              |
| BatchNorm in eval mode        | the same, with x̂ from the running statistics              |
| InstanceNorm on input stats   | the same, with x̂ from example i's own statistics           |
| Embedding subclass            | W: c · Σ_t e_{id_t} b_tᵀ (ids, c: its forward re-run)      |
| EmbeddingBag (sum, mean)      | W: Σ_{j ∈ bag i} w_j e_{id_j} b_iᵀ (one bag per example)   |
| MultiheadAttention            | in_proj: [Σ_t ∂q_t Q_tᵀ; Σ_s ∂k_s K_sᵀ; Σ_s ∂v_s V_sᵀ];    |
|                               | out_proj: a Linear on the attention's output (mha_rule;    |
|                               | ∂q, ∂k, ∂v from the model's backward, .mha_capture)        |
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from ..._batch import flat_leaves
from ..._model import own_trainable_parameters
from .pieces import ConvPiece, DensePiece, OuterPiece, Piece, RowsPiece, padded_input
from ..._torch_compat import global_module_hooks, is_inert_hook, module_backward_hooks, module_hooks

__all__ = ["Rule", "find_rule", "Layout", "LayoutError"]


class LayoutError(ValueError):
    """A captured tensor is not laid out batch-first (or its batch dim is ambiguous): ``code`` is the
    precondition of :mod:`persample.contract` it breaks."""

    def __init__(self, message: str, code: str = "DIM_ZERO_MOVED"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Layout:
    """The batch size, and whether the forward moved dim 0 (then equal sizes are ambiguous)."""

    size: int
    dim_zero_moved: bool = False
    grad_scale: float = 1.0  # captured output gradients × grad_scale = gradients of Σ_i L_i


def _check_batch_first(t: Tensor, batch: Layout, *, positions_from: int, positions_to: int, what: str) -> None:
    """``t`` must have the batch on dim 0.

    If the forward moved some tensor's dim 0 (a transpose, permute, stack, …), a
    position dim of the batch's size could be the real batch dim: ambiguous.
    """
    if t.dim() == 0 or t.shape[0] != batch.size:
        raise LayoutError(f"{what} has shape {tuple(t.shape)}: dim 0 is not the batch of {batch.size}")
    if batch.dim_zero_moved and any(size == batch.size for size in t.shape[positions_from:positions_to]):
        raise LayoutError(
            f"{what} has shape {tuple(t.shape)}: the forward moves dim 0 of some tensor and a "
            f"position dim equals the batch size {batch.size}, so the batch dim is ambiguous",
            code="BATCH_DIM_AMBIGUOUS",
        )


def _sequence(t: Tensor, batch: Layout, feature_dims: int, what: str) -> Tensor:
    """``[B, *positions, *features]`` → ``[B, T, prod(features)]`` after checking the layout."""
    _check_batch_first(t, batch, positions_from=1, positions_to=t.dim() - feature_dims, what=what)
    return t.reshape(batch.size, -1, math.prod(t.shape[t.dim() - feature_dims :]))


def _channels(t: Tensor, batch: Layout, what: str) -> Tensor:
    """``[B, C, *spatial]`` → ``[B, C, L]`` after checking the layout."""
    _check_batch_first(t, batch, positions_from=1, positions_to=1, what=what)
    return t.reshape(batch.size, t.shape[1], -1)


def _positions_sum(b: Tensor) -> Tensor:
    """Σ_t over ``[B, T, p]``: a view when T = 1 (no kernel)."""
    return b[:, 0] if b.shape[1] == 1 else b.sum(1)


def _bias_piece(module: nn.Module, per_example: Tensor, batch: Layout) -> dict[str, Piece]:
    bias = getattr(module, "bias", None)
    if not (isinstance(bias, nn.Parameter) and bias.requires_grad):
        return {}
    return {"bias": DensePiece(per_example, batch.grad_scale)}


def _weight_pieces(module: nn.Module, weight: Callable[[], Piece]) -> dict[str, Piece]:
    w = getattr(module, "weight", None)
    return {"weight": weight()} if isinstance(w, nn.Parameter) and w.requires_grad else {}


# ------------------------------------------------------------------------------------ rules


def linear_rule(module: nn.Linear, x: Tensor, gy: Tensor, batch: Layout) -> dict[str, Piece]:
    """y = x Wᵀ + b on ``[B, *, d]``: W_i = Σ_t b_t a_tᵀ, bias_i = Σ_t b_t."""
    a, b = _sequence(x, batch, 1, "Linear input"), _sequence(gy, batch, 1, "Linear output gradient")
    return {
        **_weight_pieces(module, lambda: OuterPiece(a, b, module.weight.shape, scale=batch.grad_scale)),
        **_bias_piece(module, _positions_sum(b), batch),
    }


def hf_conv1d_rule(module: nn.Module, x: Tensor, gy: Tensor, batch: Layout) -> dict[str, Piece]:
    """Hugging Face ``Conv1D``: y = x W + b with W stored as d × p (a transposed Linear)."""
    a, b = _sequence(x, batch, 1, "Conv1D input"), _sequence(gy, batch, 1, "Conv1D output gradient")
    return {
        **_weight_pieces(
            # nn.Module.__getattr__ is typed Tensor | Module: here it is the Conv1D's weight
            module,
            lambda: OuterPiece(a, b, module.weight.shape, transposed=True, scale=batch.grad_scale),  # type: ignore[arg-type]
        ),
        **_bias_piece(module, _positions_sum(b), batch),
    }


def unfold_patches(conv: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Input patches of an N-d convolution: ``[B, L, C_in · prod(kernel)]`` (L output locations).

    Column order matches ``weight.reshape(C_out, -1)`` (channel-major, then kernel
    positions), so one group's weight gradient is Σ_l b_lᵀ patch_l. Built by stacking
    one strided slice of the padded input per kernel offset (row-contiguous copies),
    and returned as a transposed view of a contiguous ``[B, C·K, L]`` tensor.
    """
    x = padded_input(conv, x)
    out = [
        (n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(x.shape[2:], conv.kernel_size, conv.stride, conv.dilation)
    ]
    slices = []
    for offsets in itertools.product(*[range(k) for k in conv.kernel_size]):
        index = [slice(None), slice(None)] + [
            slice(o * d, o * d + s * (m - 1) + 1, s) for o, d, s, m in zip(offsets, conv.dilation, conv.stride, out)
        ]
        slices.append(x[tuple(index)])
    patches = torch.stack(slices, 2)  # [B, C, K, *out], contiguous
    return patches.reshape(x.shape[0], -1, math.prod(out)).transpose(1, 2)


def conv_rule(module: nn.modules.conv._ConvNd, x: Tensor, gy: Tensor, batch: Layout) -> dict[str, Piece]:
    """Convolution: per-example weight gradients by grouped ``convolution_backward`` when each group
    has several input channels; with one, as a Linear on unfolded patches (cheaper there)."""
    _channels(gy, batch, "Conv output gradient")

    def weight_piece() -> Piece:
        _check_batch_first(x, batch, positions_from=1, positions_to=1, what="Conv input")
        if module.in_channels // module.groups > 1:
            return ConvPiece(module, x, gy, module.weight.shape, scale=batch.grad_scale)
        b = gy.reshape(batch.size, module.out_channels, -1).transpose(1, 2)  # [B, L, C_out]
        patches = unfold_patches(module, x)  # [B, L, C_in · k]
        groups = module.groups
        if groups == 1:
            return OuterPiece(patches, b, module.weight.shape, scale=batch.grad_scale)
        c_out = module.out_channels // groups  # depthwise-style: one input channel per group
        a_blocks = patches.reshape(batch.size, patches.shape[1], groups, -1)
        b_blocks = b.reshape(batch.size, b.shape[1], groups, c_out) * batch.grad_scale
        per_example = torch.einsum("blgo,blgi->bgoi", b_blocks, a_blocks)
        return DensePiece(per_example.reshape(batch.size, *module.weight.shape))

    bias = gy.reshape(batch.size, module.out_channels, -1).sum(2)
    return {**_weight_pieces(module, weight_piece), **_bias_piece(module, bias, batch)}


def embedding_rule(module: nn.Embedding, ids: Tensor, gy: Tensor, batch: Layout) -> dict[str, Piece]:
    """Rows of W: g_i = Σ_t e_{id_t} b_tᵀ (padding_idx rows get nothing)."""
    _check_batch_first(ids, batch, positions_from=1, positions_to=ids.dim(), what="Embedding input")
    grad = _sequence(gy, batch, 1, "Embedding output gradient")
    return _weight_pieces(
        module,
        lambda: RowsPiece(
            ids.reshape(batch.size, -1), grad, module.weight.shape, module.padding_idx, scale=batch.grad_scale
        ),
    )


def _affine_pieces(module: nn.Module, x_hat: Tensor, gy: Tensor, batch: Layout) -> dict[str, Piece]:
    """γ_i = Σ_t b_t ∘ x̂_t, β_i = Σ_t b_t; x̂ and b are ``[B, T, *param_shape]``."""

    def weight() -> Piece:
        return DensePiece((gy * x_hat).sum(1), batch.grad_scale)

    return {**_weight_pieces(module, weight), **_bias_piece(module, gy.sum(1), batch)}


def layer_norm_rule(module: nn.Module, x: Tensor, gy: Tensor, batch: Layout) -> dict[str, Piece]:
    """LayerNorm / RMSNorm over the trailing ``normalized_shape`` dims."""
    shape = tuple(module.normalized_shape)  # type: ignore[arg-type]  # a LayerNorm/RMSNorm attribute (not a Tensor)
    with torch.no_grad():
        if isinstance(module, nn.LayerNorm):
            x_hat = F.layer_norm(x, shape, eps=module.eps)
        else:
            x_hat = F.rms_norm(x, shape, eps=module.eps)  # type: ignore[arg-type]  # RMSNorm.eps: float | None
    k = len(shape)
    flat = lambda t, what: _sequence(t, batch, k, what).reshape(batch.size, -1, *shape)  # noqa: E731
    return _affine_pieces(module, flat(x_hat, "norm input"), flat(gy, "norm output gradient"), batch)


def group_norm_rule(module: nn.GroupNorm, x: Tensor, gy: Tensor, batch: Layout) -> dict[str, Piece]:
    """GroupNorm on ``[B, C, *]``: per-channel γ, β."""
    with torch.no_grad():
        x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
    return _affine_pieces(
        module,
        _channels(x_hat, batch, "GroupNorm input").transpose(1, 2),
        _channels(gy, batch, "GroupNorm output gradient").transpose(1, 2),
        batch,
    )


def batch_norm_eval_rule(module: _BatchNorm, x: Tensor, gy: Tensor, batch: Layout) -> dict[str, Piece]:
    """Eval-mode BatchNorm: x̂ = (x − running_mean)/sqrt(running_var + eps), per channel."""
    with torch.no_grad():
        shape = (1, -1) + (1,) * (x.dim() - 2)
        # the rule accepts a module with running statistics only (its accepts=), so they are tensors
        x_hat = (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)  # type: ignore[union-attr, operator]
    return _affine_pieces(
        module,
        _channels(x_hat, batch, "BatchNorm input").transpose(1, 2),
        _channels(gy, batch, "BatchNorm output gradient").transpose(1, 2),
        batch,
    )


def instance_norm_rule(module: nn.Module, x: Tensor, gy: Tensor, batch: Layout) -> dict[str, Piece]:
    """InstanceNorm (``affine=True``) normalising with the input's own statistics (train mode, or no
    running statistics): x̂_{i,c} = (x_{i,c} − mean(x_{i,c})) / sqrt(var(x_{i,c}) + eps) over the
    spatial positions of example i and channel c alone, so γ_i = Σ_t b_t ∘ x̂_t, β_i = Σ_t b_t per
    channel. The running buffers (``track_running_stats=True``) are only written by such a forward,
    never read: the per-example gradients do not depend on them, and the rule recomputes x̂ without
    them (the one update stays the user's forward's). Eval mode with running statistics reads them:
    no rule (the exact fallback, which does not change them there)."""
    with torch.no_grad():
        x_hat = F.instance_norm(x, eps=module.eps)  # type: ignore[arg-type]  # an InstanceNorm's eps: float
    return _affine_pieces(
        module,
        _channels(x_hat, batch, "InstanceNorm input").transpose(1, 2),
        _channels(gy, batch, "InstanceNorm output gradient").transpose(1, 2),
        batch,
    )


def _instance_stats(module: nn.Module) -> bool:
    """An InstanceNorm that normalises with the input's own statistics (as ``forward`` decides)."""
    return bool(module.training or not module.track_running_stats)


#: Largest difference allowed between the recomputed and the captured attention output, relative to the
#: output's largest magnitude, by the captured output's dtype (rounding of another summation order).
_RECOMPUTE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _mha_arguments(args: tuple, kwargs: dict) -> dict:
    """The arguments of ``nn.MultiheadAttention.forward`` by name, defaults filled in."""
    bound = inspect.signature(nn.MultiheadAttention.forward).bind(None, *args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not attended) as 0 / −inf, a float mask as it is (added to the scores)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def mha_rule(module: nn.MultiheadAttention, call: Any, out_grads: dict, batch: Layout) -> dict[str, Piece]:
    """``nn.MultiheadAttention``: Linear maps around scaled dot-product attention.

    q = Q W_qᵀ + b_q, k = K W_kᵀ + b_k, v = V W_vᵀ + b_v ([W_q; W_k; W_v] = ``in_proj_weight``),
    per head c = softmax(q kᵀ/√d_h + mask) v, y = c W_oᵀ + b_o (``out_proj``). Attention never mixes
    examples, so with ∂L/∂q, ∂L/∂k, ∂L/∂v, ∂L/∂y of example i (its own loss):
    in_proj_weight_i = [Σ_t ∂q_t Q_tᵀ; Σ_s ∂k_s K_sᵀ; Σ_s ∂v_s V_sᵀ], in_proj_bias_i = [Σ_t ∂q_t; Σ_s ∂k_s;
    Σ_s ∂v_s], out_proj.weight_i = Σ_t ∂y_t c_tᵀ, out_proj.bias_i = Σ_t ∂y_t.

    Where the capture recorded the call's projections (``call.inner``, :mod:`.mha_capture`: the module's
    own ``F.multi_head_attention_forward`` run as torch's code with its ``linear`` calls recorded), ∂q, ∂k,
    ∂v are the gradients the model's own backward delivered at the in-projections' outputs (keys −1 − i of
    ``out_grads``), and c is the out-projection's recorded input: no second attention
    (:func:`_recorded_pieces`). Otherwise (a torch whose attention code is not the one checked, a call
    on an expansion, a recomputation under re-entrant checkpointing) the attention is
    recomputed from the call's inputs (masks as ``F.multi_head_attention_forward`` merges them:
    boolean True → −inf, float added, ``key_padding_mask`` per key; a query whose keys are all masked
    gets NaN with ``need_weights``, else 0 as from ``scaled_dot_product_attention``), checked against the captured
    output (a mismatch means the recomputation is not this module's function: no rule), and
    differentiated by autograd from ∂L/∂y (and ∂L/∂weights where ``need_weights`` returned them and
    they reach the loss) to ∂q, ∂k, ∂v: O(B·H·T·S) work, no per-example pass.
    """
    if call.broadcast:
        raise LayoutError("MultiheadAttention called with batch dim 1 and its output expanded")
    bound = _mha_arguments(call.args, call.kwargs)
    query, key, value = bound["query"], bound["key"], bound["value"]
    if not all(isinstance(t, Tensor) and t.dim() == 3 for t in (query, key, value)):
        raise LayoutError("MultiheadAttention called on unbatched inputs (not [B, T, E] or [T, B, E])")
    same_kv, self_attention = key is value, query is key and key is value
    grad_out = out_grads.get(0)
    dtype = (
        grad_out if grad_out is not None else out_grads[1] if 1 in out_grads else next(iter(out_grads.values()))
    ).dtype
    if grad_out is not None and not module.batch_first:
        grad_out = grad_out.transpose(0, 1)

    def batch_first(t: Tensor, what: str) -> Tensor:
        t = t if module.batch_first else t.transpose(0, 1)
        _check_batch_first(t, batch, positions_from=1, positions_to=2, what=f"MultiheadAttention {what}")
        if not module.batch_first and t.shape[1] == batch.size:  # dim 0 of a [T, B, E] input is also B long
            raise LayoutError(
                f"MultiheadAttention {what} of shape {tuple(t.shape)} (batch_first=False): the sequence "
                f"length equals the batch size {batch.size}, so the batch dim is ambiguous",
                code="BATCH_DIM_AMBIGUOUS",
            )
        return t.detach().to(dtype)

    q_in, k_in, v_in = batch_first(query, "query"), batch_first(key, "key"), batch_first(value, "value")
    recorded = _recorded_pieces(module, call, out_grads, batch, (query, key, value), grad_out, dtype)
    if recorded is not None:
        return recorded
    size, heads, embed = batch.size, module.num_heads, module.embed_dim
    head_dim, target, source = embed // heads, q_in.shape[1], k_in.shape[1]
    packed = module._qkv_same_embed_dim
    if packed:
        w_q, w_k, w_v = module.in_proj_weight.detach().to(dtype).chunk(3)
    else:  # kdim or vdim differ from embed_dim: three weights of their own
        w_q, w_k, w_v = (
            w.detach().to(dtype) for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        )
    bias = module.in_proj_bias.detach().to(dtype) if module.in_proj_bias is not None else None
    b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
    mask = _additive_mask(bound["attn_mask"], dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.view(size, heads, target, source)
    padding = _additive_mask(bound["key_padding_mask"], dtype)
    if padding is not None:
        padding = padding.view(size, 1, 1, source)
        mask = padding if mask is None else mask + padding
    with torch.enable_grad():
        q = F.linear(q_in, w_q, b_q).requires_grad_()
        k = F.linear(k_in, w_k, b_k).requires_grad_()
        v = F.linear(v_in, w_v, b_v).requires_grad_()

        def split(t: Tensor) -> Tensor:
            return t.view(size, -1, heads, head_dim).transpose(1, 2)

        if bound["need_weights"]:  # the explicit path: a query with every key masked gets NaN
            scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(head_dim)
            attention = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            heads_out = attention @ split(v)
        else:  # scaled_dot_product_attention, as the module calls it (such a query gets 0)
            heads_out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        context = heads_out.transpose(1, 2).reshape(size, target, embed)
        out_proj = module.out_proj
        y = F.linear(context, out_proj.weight.detach().to(dtype), _detached(out_proj.bias, dtype))
        _check_recomputed(y, flat_leaves(call.output)[0], module.batch_first)
        outputs, grads = [y], [grad_out if grad_out is not None else torch.zeros_like(y)]
        if 1 in out_grads:  # the attention weights reach the loss
            weights = attention.mean(dim=1) if bound["average_attn_weights"] else attention
            outputs.append(weights)
            grads.append(out_grads[1].to(dtype))
        d_q, d_k, d_v = torch.autograd.grad(outputs, (q, k, v), grads, allow_unused=True, materialize_grads=True)
    d_y, scale = grads[0], batch.grad_scale
    pieces: dict[str, Piece] = {}
    if not packed:
        for name, act, d in (("q_proj_weight", q_in, d_q), ("k_proj_weight", k_in, d_k), ("v_proj_weight", v_in, d_v)):
            if getattr(module, name).requires_grad:
                pieces[name] = OuterPiece(act, d, getattr(module, name).shape, scale=scale)
    elif module.in_proj_weight.requires_grad:
        if self_attention:  # one input: the three blocks are one outer product over the same positions
            act, grad = q_in, torch.cat([d_q, d_k, d_v], dim=-1)
        else:  # blocks over their own positions, the others' rows zero: Σ over T + 2S positions
            zeros_t, zeros_s = d_q.new_zeros(size, target, embed), d_k.new_zeros(size, source, embed)
            act = torch.cat([q_in, k_in, v_in] if not same_kv else [q_in, k_in], dim=1)
            rows_q = torch.cat([d_q, zeros_t, zeros_t], dim=-1)
            if same_kv:
                grad = torch.cat([rows_q, torch.cat([zeros_s, d_k, d_v], dim=-1)], dim=1)
            else:
                rows_k, rows_v = torch.cat([zeros_s, d_k, zeros_s], -1), torch.cat([zeros_s, zeros_s, d_v], -1)
                grad = torch.cat([rows_q, rows_k, rows_v], dim=1)
        pieces["in_proj_weight"] = OuterPiece(act, grad, module.in_proj_weight.shape, scale=scale)
    if module.in_proj_bias is not None and module.in_proj_bias.requires_grad:
        per_example = torch.cat([d_q.sum(1), d_k.sum(1), d_v.sum(1)], dim=-1)
        pieces["in_proj_bias"] = DensePiece(per_example, scale)
    if out_proj.weight.requires_grad:
        pieces["out_proj.weight"] = OuterPiece(context.detach(), d_y, out_proj.weight.shape, scale=scale)
    if isinstance(out_proj.bias, nn.Parameter) and out_proj.bias.requires_grad:
        pieces["out_proj.bias"] = DensePiece(_positions_sum(d_y), scale)
    return pieces


def _recorded_pieces(
    module: nn.MultiheadAttention,
    call: Any,
    out_grads: dict,
    batch: Layout,
    inputs: tuple,
    grad_out: Tensor | None,
    dtype: torch.dtype,
) -> dict[str, Piece] | None:
    """:func:`mha_rule`'s pieces from the recorded projections (``call.inner``), or None where there is no
    record or it is not laid out as expected (then the rule recomputes the attention).

    Each in-projection ``linear(X, W[r0:r1], b[r0:r1])`` has X one of the call's query, key, value in
    sequence-first form ([T, B, E], batch on dim 1) and rows [r0, r1) of ``in_proj_weight`` (disjoint
    blocks); example i's gradient of those rows is Σ_t ∂P_{t,i} X_{t,i}ᵀ, ∂P the gradient at that call's
    output. With kdim or vdim ≠ embed_dim the three are ``linear(Q, q_proj_weight, b[0:E])``,
    ``linear(K, k_proj_weight, b[E:2E])``, ``linear(V, v_proj_weight, b[2E:3E])``, each a weight of its
    own. The out-projection's input c is [T·B, E] with row t·B + b of example b: its output is the
    module's output (sequence first) viewed [T, B, E], checked by storage, shape and strides.
    """
    inner = getattr(call, "inner", None)
    if inner is None:
        return None
    size, embed = batch.size, module.embed_dim
    weight, bias, out_proj = module.in_proj_weight, module.in_proj_bias, module.out_proj
    separate = {id(w): j for j, w in enumerate((module.q_proj_weight, module.k_proj_weight, module.v_proj_weight))}
    #: (the weight's name, X batch first, ∂P batch first, rows r0, r1 of in_proj_weight and in_proj_bias)
    blocks: list[tuple[str, Tensor, Tensor | None, int, int]] = []
    context: Tensor | None = None
    for i, (x, w, b, projected) in enumerate(inner.linears):
        if w is out_proj.weight:
            if context is not None or b is not out_proj.bias:
                return None
            context = _context_by_example(module, call, x, projected, size, embed)
            if context is None:
                return None
            continue
        if weight is not None:  # packed: a block of rows of in_proj_weight, on the query, key or value
            name, rows, candidates = "in_proj_weight", _rows_of(w, weight), inputs
        elif id(w) in separate:  # q_proj_weight, k_proj_weight, v_proj_weight: on their own input alone
            j = separate[id(w)]
            name, rows, candidates = (
                ("q_proj_weight", "k_proj_weight", "v_proj_weight")[j],
                (j * embed, (j + 1) * embed),
                inputs[j : j + 1],
            )
        else:
            return None
        if rows is None or not _same_rows(b, bias, rows) or projected.shape != (*x.shape[:-1], rows[1] - rows[0]):
            return None
        x_first = _sequence_first_input(x, candidates, module.batch_first, size)
        if x_first is None:
            return None
        g = out_grads.get(-1 - i)
        blocks.append((name, x_first.transpose(0, 1), None if g is None else g.transpose(0, 1), *rows))
    names = [block[0] for block in blocks]
    if (
        context is None
        or not blocks
        or (weight is None and sorted(names) != ["k_proj_weight", "q_proj_weight", "v_proj_weight"])
    ):
        return None
    blocks.sort(key=lambda block: block[3])
    if any(a[4] > b[3] for a, b in zip(blocks, blocks[1:])):
        return None  # overlapping row blocks: not the packed projection
    target = context.shape[1]
    d_y = grad_out if grad_out is not None else context.new_zeros(size, target, embed, dtype=dtype)
    scale, width = batch.grad_scale, 3 * embed

    def padded(g: Tensor | None, x: Tensor, r0: int, r1: int) -> Tensor:
        if g is None:
            return x.new_zeros(size, x.shape[1], width, dtype=dtype)
        return g if (r0, r1) == (0, width) else F.pad(g, (r0, width - r1))

    pieces: dict[str, Piece] = {}
    if weight is not None and weight.requires_grad:
        acts = [x.detach().to(dtype) for _, x, _, _, _ in blocks]
        grads = [padded(g, x, r0, r1) for _, x, g, r0, r1 in blocks]
        act, grad = (acts[0], grads[0]) if len(blocks) == 1 else (torch.cat(acts, 1), torch.cat(grads, 1))
        pieces["in_proj_weight"] = OuterPiece(act, grad, weight.shape, scale=scale)
    for name, x, g, r0, r1 in blocks:
        w = getattr(module, name)
        if weight is None and w.requires_grad:  # separate weights
            grad = g if g is not None else x.new_zeros(size, x.shape[1], r1 - r0, dtype=dtype)
            pieces[name] = OuterPiece(x.detach().to(dtype), grad, w.shape, scale=scale)
    if bias is not None and bias.requires_grad:
        sums = [
            x.new_zeros(size, width, dtype=dtype) if g is None else F.pad(g.sum(1), (r0, width - r1))
            for _, x, g, r0, r1 in blocks
        ]
        pieces["in_proj_bias"] = DensePiece(functools.reduce(torch.add, sums), scale)
    if out_proj.weight.requires_grad:
        pieces["out_proj.weight"] = OuterPiece(context.detach().to(dtype), d_y, out_proj.weight.shape, scale=scale)
    if isinstance(out_proj.bias, nn.Parameter) and out_proj.bias.requires_grad:
        pieces["out_proj.bias"] = DensePiece(_positions_sum(d_y), scale)
    return pieces


def _rows_of(w: Tensor, weight: Tensor) -> tuple[int, int] | None:
    """The rows [r0, r1) of ``weight`` that ``w`` is (itself, or a view of a block of whole rows), or None."""
    if w is weight:
        return 0, weight.shape[0]
    if w._base is not weight or w.dim() != 2 or w.shape[1] != weight.shape[1] or w.stride() != weight.stride():
        return None
    offset = w.storage_offset() - weight.storage_offset()
    if offset < 0 or offset % weight.stride(0):
        return None
    r0 = offset // weight.stride(0)
    return (r0, r0 + w.shape[0]) if r0 + w.shape[0] <= weight.shape[0] else None


def _same_rows(b: Tensor | None, bias: Tensor | None, rows: tuple[int, int]) -> bool:
    """Whether ``b`` is the block ``rows`` of ``bias`` (both None where there is no bias)."""
    if bias is None or b is None:
        return bias is None and b is None
    if b is bias:
        return rows == (0, bias.shape[0])
    return (
        b._base is bias
        and b.dim() == 1
        and b.stride() == bias.stride()
        and b.storage_offset() - bias.storage_offset() == rows[0] * bias.stride(0)
        and b.shape[0] == rows[1] - rows[0]
    )


def _sequence_first_input(x: Tensor, inputs: tuple, batch_first: bool, size: int) -> Tensor | None:
    """``x`` where it is one of ``inputs`` (query, key, value as the module got them) in sequence-first form
    ([T, B, E]: the input itself, or its transpose with ``batch_first``), same storage, shape and strides."""
    if x.dim() != 3 or x.shape[1] != size:
        return None
    for t in inputs:
        seq = t.transpose(0, 1) if batch_first else t
        if x.data_ptr() == seq.data_ptr() and x.shape == seq.shape and x.stride() == seq.stride():
            return x
    return None


def _context_by_example(
    module: nn.MultiheadAttention, call: Any, c: Tensor, projected: Tensor, size: int, embed: int
) -> Tensor | None:
    """The out-projection's input ``c`` ([T·B, E], row t·B + b) as [B, T, E], where the projection's output
    is the module's output viewed [T, B, E] (sequence first); else None."""
    y = flat_leaves(call.output)[0]
    y_seq = y.transpose(0, 1) if module.batch_first else y
    if y_seq.dim() != 3 or y_seq.shape[1] != size or y_seq.shape[2] != embed:
        return None
    target = y_seq.shape[0]
    if (
        projected.shape != (target * size, embed)
        or c.shape != (target * size, embed)
        or not (projected.is_contiguous() and c.is_contiguous())
        or y_seq.data_ptr() != projected.data_ptr()
        or y_seq.stride() != (size * embed, embed, 1)
    ):
        return None
    return c.view(target, size, embed).transpose(0, 1)


def _detached(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.detach().to(dtype)


def _check_recomputed(y: Tensor, captured: Tensor, batch_first: bool) -> None:
    """The recomputed attention output ``y`` (batch first) must be the captured one up to rounding
    (:data:`_RECOMPUTE_RTOL` of its largest magnitude, NaN where it is NaN): else the closed form is
    not this module's function (a subclass's or a future torch's semantics), and no rule applies."""
    want = (captured if batch_first else captured.transpose(0, 1)).detach().to(y.dtype)
    rtol = _RECOMPUTE_RTOL.get(captured.dtype, 1e-2)
    got = y.detach()
    if want.shape != got.shape or not torch.equal(want.isnan(), got.isnan()):
        raise ValueError("the recomputed attention output differs from the module's (shape or NaNs)")
    largest = want.nan_to_num(0.0, 0.0, 0.0).abs().max()
    if bool((got - want).nan_to_num(0.0, 0.0, 0.0).abs().max() > rtol * largest.clamp_min(1e-30)):
        raise ValueError("the recomputed attention output differs from the module's beyond rounding")


class _TorchCalls(TorchFunctionMode):
    """Logs every top-level torch function call of a forward: ``(func, args, kwargs, result)``."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        self.log.append((func, args, kwargs, result))
        return result


_MULTIPLY = (torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__)

#: Functions that map each element on its own (with Python numbers or 0-d tensors beside): ids made
#: from the module's input by a chain of these keep its rows, so its batch dim.
_ELEMENTWISE = frozenset(
    "add __add__ __radd__ sub __sub__ __rsub__ mul __mul__ __rmul__ remainder __mod__ floor_divide "
    "__floordiv__ clamp clamp_min clamp_max to long int".split()
)


def _elementwise_of(t: Tensor, source: Any, log: list[tuple]) -> bool:
    """Whether ``t`` is ``source``, or made from it by logged :data:`_ELEMENTWISE` calls of the same shape."""
    made = {id(entry[3]): entry for entry in log if isinstance(entry[3], Tensor)}
    while t is not source:
        entry = made.get(id(t))
        if entry is None or getattr(entry[0], "__name__", None) not in _ELEMENTWISE:
            return False
        operands = [a for a in (*entry[1], *entry[2].values()) if isinstance(a, Tensor) and a.dim() > 0]
        if len(operands) != 1 or operands[0].shape != t.shape:
            return False
        t = operands[0]
    return True


def embedding_call_rule(module: nn.Embedding, call: Any, out_grads: dict, batch: Layout) -> dict[str, Piece]:
    """An ``nn.Embedding`` subclass with its own ``forward`` that computes ids from its arguments and
    returns ``F.embedding(ids, self.weight)`` (``super().forward(ids)``), or that times a constant c
    (a Python number, or a 0-d tensor without gradient such as Gemma's ``embed_scale`` buffer):
    Hugging Face's learned positional embeddings (BART: ``arange(T) + offset``, expanded to the
    batch or of batch 1) and scaled word embeddings. W_i = c · Σ_t e_{id_it} b_itᵀ, as for Embedding.

    The forward is re-run on the call's arguments (no gradients) with every torch call logged: there
    must be one ``F.embedding`` on ``self.weight``, its result returned as it is or times a Python
    number (the last call), and the re-run must return the captured output. The ids must be the
    module's input or made from it element by element (``ids + offset``, a clamp), or from a keyword
    argument that the capture found batched like the model's inputs (``Call.batched_kwargs``: OPT's
    ``position_ids``, a cumsum of the padding mask along the sequence), or the same row
    for every example (positions expanded to the batch), or of batch dim 1 or none (the engine then
    expanded the output over the batch): other ids made in the forward with dim 0 of the batch's
    size could be positions (``arange(T)`` with T = B). Anything else (another op on the result, a
    second lookup) is no rule's: the engine refuses with the reason.
    """
    calls = _TorchCalls()
    devices = [module.weight.device] if module.weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), calls:  # a random draw must not move the RNG
        returned = type(module).forward(module, *call.args, **call.kwargs)
    lookups = [entry for entry in calls.log if entry[0] is F.embedding]
    if len(lookups) != 1:
        raise ValueError(f"its forward makes {len(lookups)} embedding lookups (one is covered)")
    _, args, kwargs, looked_up = lookups[0]
    bound = inspect.signature(F.embedding).bind(*args, **kwargs)
    bound.apply_defaults()
    if bound.arguments["weight"] is not module.weight or bound.arguments["scale_grad_by_freq"]:
        raise ValueError("its lookup is not on its own weight, or scales gradients by frequency")
    factor = 1.0
    if returned is not looked_up:
        func, margs, _, result = calls.log[-1]
        others = [a for a in margs if a is not looked_up]
        if not (
            result is returned
            and func in _MULTIPLY
            and len(margs) == 2
            and len(others) == 1
            and (
                isinstance(others[0], (int, float))
                or (isinstance(others[0], Tensor) and others[0].dim() == 0 and not others[0].requires_grad)
            )
        ):
            raise ValueError("it returns something else than its lookup (or the lookup times a number)")
        factor = float(others[0])  # a 0-d tensor (Gemma's embed_scale buffer): one device sync
    captured = flat_leaves(call.output)[0]
    if not (isinstance(returned, Tensor) and torch.equal(returned.expand_as(captured), captured.detach())):
        raise ValueError("its forward, re-run, does not give the captured output")
    ids = bound.arguments["input"]
    if call.broadcast and captured.dim() == looked_up.dim() + 1:  # no batch dim: one example's ids
        ids = ids.unsqueeze(0).expand(batch.size, *ids.shape)
    elif call.broadcast:
        if ids.dim() == 0 or ids.shape[0] != 1:
            raise LayoutError(f"Embedding ids of shape {tuple(ids.shape)} for an output of batch 1")
        ids = ids.expand(batch.size, *ids.shape[1:])
    _check_batch_first(ids, batch, positions_from=1, positions_to=ids.dim(), what="Embedding ids")
    given = bool(call.args) and _elementwise_of(ids, call.args[0], calls.log)  # checked by the capture
    given = given or any(_elementwise_of(ids, call.kwargs[k], calls.log) for k in call.batched_kwargs)
    if not (call.broadcast or given or (ids.dim() >= 2 and bool((ids == ids[:1]).all()))):
        raise LayoutError(
            f"Embedding ids of shape {tuple(ids.shape)} made in its forward: dim 0 has the batch's size, but "
            "they are neither its input nor the same positions for every example, so dim 0 may not be the batch",
            code="BATCH_DIM_AMBIGUOUS",
        )
    grad = _sequence(out_grads[0], batch, 1, "Embedding output gradient")
    padding = bound.arguments["padding_idx"]
    if padding is not None and padding < 0:
        padding += module.weight.shape[0]
    return _weight_pieces(
        module,
        lambda: RowsPiece(
            ids.reshape(batch.size, -1), grad, module.weight.shape, padding, scale=batch.grad_scale * factor
        ),
    )


def embedding_bag_rule(module: nn.EmbeddingBag, call: Any, out_grads: dict, batch: Layout) -> dict[str, Piece]:
    """``nn.EmbeddingBag`` with one bag per example (``[B, L]`` ids, or 1-D ids with ``offsets``):
    W_i = Σ_{j ∈ bag i} w_j e_{id_j} b_iᵀ, with w_j the ``per_sample_weights`` (mode ``sum``), 1 (``sum``)
    or 1/n_i for the n_i entries of the bag that are not ``padding_idx`` (``mean``); padding entries
    give nothing. Bags are padded to the longest with an id no row has, so the Embedding piece applies
    (rows [B, L_max], output gradients b_i times w_j per entry). Mode ``max`` takes the fallback."""
    bound = inspect.signature(nn.EmbeddingBag.forward).bind(None, *call.args, **call.kwargs)
    bound.apply_defaults()
    ids, offsets, weights = bound.arguments["input"], bound.arguments["offsets"], bound.arguments["per_sample_weights"]
    grad = out_grads[0]
    _check_batch_first(grad, batch, positions_from=1, positions_to=1, what="EmbeddingBag output gradient")
    if ids.dim() == 2:
        bags = ids
        w = weights if weights is not None else torch.ones(bags.shape, dtype=grad.dtype, device=grad.device)
    else:
        starts = offsets[:-1] if module.include_last_offset else offsets
        if starts.shape[0] != batch.size:
            raise LayoutError(f"EmbeddingBag has {starts.shape[0]} bags for a batch of {batch.size}")
        ends = torch.cat([starts[1:], starts.new_tensor([ids.shape[0]])])
        if module.include_last_offset:
            ends[-1] = offsets[-1]
        lengths = ends - starts
        width = int(lengths.max()) if lengths.numel() else 0
        slot = torch.arange(width, device=ids.device)
        inside = slot < lengths[:, None]
        where = (starts[:, None] + slot).clamp(max=max(ids.shape[0] - 1, 0))
        bags = torch.where(inside, ids[where], -1)
        flat = weights if weights is not None else torch.ones(ids.shape, dtype=grad.dtype, device=grad.device)
        w = torch.where(inside, flat[where], 0).to(grad.dtype)
    w = w.to(grad.dtype)
    if module.padding_idx is not None:
        bags = bags.masked_fill(bags == module.padding_idx, -1)
    if module.mode == "mean":
        counts = (bags != -1).sum(1, keepdim=True).clamp(min=1)
        w = w / counts
    per_entry = w.unsqueeze(-1) * grad.unsqueeze(1)  # [B, L_max, d]
    return _weight_pieces(module, lambda: RowsPiece(bags, per_entry, module.weight.shape, -1, scale=batch.grad_scale))


# ------------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class Rule:
    """A closed form, and the assumptions under which it is the module's gradient.

    It applies to a module that is an instance of one of ``types`` (classes, or
    qualified names of optional classes such as Hugging Face's ``Conv1D``, matched
    through the MRO without importing them), whose trainable parameters are among
    ``params`` and are its own (no nested trainable modules), whose ``methods``
    are those of the matched base class (a subclass with its own ``forward``
    computes something else: timm's ``StdConv2d``, a channels-last ``LayerNorm2d``),
    which has no hooks (a forward hook that rescales the output changes the
    gradient), and which ``accepts`` (settings the closed form does not cover).

    ``unbatched(module, x)`` says whether the module treats an input ``x`` with
    no batch dim as one example, computing on ``x[None]`` what it computes on
    ``x`` (Linear and Embedding on any leading dims, a norm over trailing dims,
    a convolution's unbatched ``[C, *spatial]`` input): only then may such a
    call be expanded to the batch (:func:`.capture.capturing`). GroupNorm and
    BatchNorm read dim 0 of any input as their batch, so they never do.
    """

    name: str
    types: tuple
    params: tuple
    compute: Callable[..., dict[str, Piece]]
    methods: tuple = ("forward",)
    accepts: Callable[[nn.Module], bool] = lambda m: True
    unbatched: Callable[[nn.Module, Tensor], bool] = lambda m, x: False
    user: bool = False  # registered by persample.register_rule: its sums are checked against autograd's
    #: ``compute(module, call, out_grads, layout)`` on the whole recorded call (every argument, every output
    #: gradient by leaf index); the module's own ops are not audited (as a fallback's): the rule re-runs or
    #: recomputes the call and checks its output, or reads what the capture recorded of torch's own code as it
    #: ran (MultiheadAttention, :mod:`.mha_capture`). ``params`` may then name parameters of submodules
    #: (``out_proj.weight``).
    whole_call: bool = False
    #: an output of batch dim 1, or with no batch dim, is the same for every example: the engine expands
    #: it over the batch (a positional embedding made in the forward) and the rule finds out how
    batchless_output: bool = False
    #: a rule that computes each row of its input's leading dims alone (Linear, LayerNorm, Embedding): the
    #: number of trailing dims it computes over (None: not such a rule). Its call may then have the batch
    #: elsewhere among the leading dims (a ``(B·T, D)`` flattening, a ``(T, B, D)`` tensor): see
    #: :mod:`.layouts`
    feature_dims: Callable[[nn.Module], int] | None = None


def _any_leading_dims(module: nn.Module, x: Tensor) -> bool:
    return True


def rows_apart(rule: Rule) -> bool:
    """Whether ``rule`` computes row by row over any leading dims (Linear, Embedding, LayerNorm, RMSNorm, HF's
    Conv1D): then a call on ``[B·k, *features]`` rows is the call on ``[B, k, *features]``, and its pieces are
    the rule's on that reshape (per example, the sum over its k rows: a segment sum)."""
    return rule.unbatched is _any_leading_dims and not rule.whole_call and not rule.batchless_output


def _one_dim(module: nn.Module) -> int:
    return 1


def _unbatched_conv(module: nn.Module, x: Tensor) -> bool:
    return x.dim() == len(module.kernel_size) + 1  # type: ignore[arg-type]  # a conv's kernel_size tuple


def _rules() -> list[Rule]:
    rms = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
    return [
        Rule(
            "linear",
            (nn.Linear,),
            ("weight", "bias"),
            linear_rule,
            unbatched=_any_leading_dims,
            feature_dims=_one_dim,
        ),
        Rule(
            "conv",
            (nn.Conv1d, nn.Conv2d, nn.Conv3d),
            ("weight", "bias"),
            conv_rule,
            methods=("forward", "_conv_forward"),
            unbatched=_unbatched_conv,
        ),
        # max_norm renormalises rows in place, outside autograd: the gradient's form is unchanged.
        Rule(
            "embedding",
            (nn.Embedding,),
            ("weight",),
            embedding_rule,
            accepts=lambda m: not m.scale_grad_by_freq,
            unbatched=_any_leading_dims,
            feature_dims=lambda m: 0,
        ),
        Rule(
            "layer_norm",
            (nn.LayerNorm, *rms),
            ("weight", "bias"),
            layer_norm_rule,
            unbatched=_any_leading_dims,
            feature_dims=lambda m: len(m.normalized_shape),  # type: ignore[arg-type]  # a tuple of ints
        ),
        Rule("group_norm", (nn.GroupNorm,), ("weight", "bias"), group_norm_rule),
        Rule(
            "batch_norm_eval",
            (_BatchNorm,),
            ("weight", "bias"),
            batch_norm_eval_rule,
            accepts=lambda m: not m.training and m.running_mean is not None,
        ),
        Rule(
            "instance_norm",
            (nn.modules.instancenorm._InstanceNorm,),
            ("weight", "bias"),
            instance_norm_rule,
            methods=("forward", "_apply_instance_norm", "_handle_no_batch_input"),
            accepts=_instance_stats,
        ),
        Rule(
            "hf_conv1d",
            ("transformers.pytorch_utils.Conv1D",),
            ("weight", "bias"),
            hf_conv1d_rule,
            unbatched=_any_leading_dims,
            feature_dims=_one_dim,
        ),
        Rule(
            "multihead_attention",
            (nn.MultiheadAttention,),
            (
                "in_proj_weight",
                "q_proj_weight",
                "k_proj_weight",
                "v_proj_weight",
                "in_proj_bias",
                "out_proj.weight",
                "out_proj.bias",
            ),
            mha_rule,
            accepts=_mha_covered,
            whole_call=True,
        ),
        # nn.Embedding subclasses with their own forward (the rule above needs nn.Embedding's own)
        Rule(
            "embedding_recomputed",
            (nn.Embedding,),
            ("weight",),
            embedding_call_rule,
            methods=(),
            accepts=lambda m: not m.scale_grad_by_freq,
            whole_call=True,
            batchless_output=True,
        ),
        Rule(
            "embedding_bag",
            (nn.EmbeddingBag,),
            ("weight",),
            embedding_bag_rule,
            accepts=lambda m: m.mode in ("sum", "mean") and not m.scale_grad_by_freq and m.max_norm is None,
            whole_call=True,
        ),
    ]


def _mha_covered(module: nn.Module) -> bool:
    """The settings :func:`mha_rule` covers: a packed in-projection (kdim = vdim = embed_dim) or three
    separate ones, no ``add_bias_kv`` / ``add_zero_attn`` (extra key positions with parameters of their
    own), no attention dropout in training (random), ``out_proj`` a plain Linear. Other settings take the
    exact fallback."""
    m = cast(nn.MultiheadAttention, module)
    return (
        m.bias_k is None
        and m.bias_v is None
        and not m.add_zero_attn
        and (m.dropout == 0.0 or not m.training)
        and type(m.out_proj) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
        and not m.out_proj._forward_hooks  # never called (the attention uses its weight), but be strict
        and isinstance(m.out_proj.weight, nn.Parameter)
    )


_RULES: list[Rule] = _rules()


def add_rule(rule: Rule) -> None:
    """Put a user's rule (:func:`persample.register_rule`) before the built-in ones, replacing an earlier
    rule for the same types; class-level matches are recomputed from the next call on."""
    _RULES[:] = [rule] + [r for r in _RULES if r.types != rule.types]
    _rule_for_type.cache_clear()


def remove_rule(module_type: type) -> None:
    """Drop the user rule for ``module_type`` (built-in rules cannot be removed)."""
    builtin = {r.types for r in _rules()}
    _RULES[:] = [r for r in _RULES if r.types != (module_type,) or r.types in builtin]
    _rule_for_type.cache_clear()


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _matched_base(module_type: type, types: tuple) -> type | None:
    """The most derived class of ``module_type``'s MRO that is one of ``types`` (isinstance, by MRO)."""
    for cls in module_type.__mro__:
        if any(cls is t or (isinstance(t, str) and _qualified_name(cls) == t) for t in types):
            return cls
    return None


@functools.lru_cache(maxsize=None)
def _rule_for_type(module_type: type) -> tuple[Rule | None, bool]:
    """(the rule whose class ``module_type`` is an instance of, whether the type runs that class's own
    ``methods``): the class-level half of :func:`find_rule`, the same for every instance."""
    found: tuple[Rule | None, bool] = (None, False)
    for rule in _RULES:
        base = _matched_base(module_type, rule.types)
        if base is not None:
            if all(getattr(module_type, m, None) is getattr(base, m, None) for m in rule.methods):
                return rule, True
            found = found if found[0] is not None else (rule, False)  # a later rule may cover the subclass
    return found


def has_hooks(module: nn.Module) -> bool:
    """Whether forward or backward hooks (the module's own, or global ones) may change what it computes.
    Hooks that change no value and no gradient do not count: FSDP2's own pre- and post-forward hooks
    (:func:`persample._sharding.is_fsdp2_hook`: they all-gather, free and cast parameters) and the
    input-embedding hook of Hugging Face's and PEFT's gradient checkpointing
    (:func:`_marks_output_requires_grad`), and persample's own inert hooks (``_torch_compat.inert_hook``:
    the Tracker's on the model's root). ``module_hooks`` reads the registries first, failing closed
    on an unknown layout."""
    if global_module_hooks():
        return True
    return module_hooks(module) and not _only_harmless_hooks(module)


#: (module, function name) of the forward hooks ``output.requires_grad_(True)`` that
#: ``PreTrainedModel.enable_input_require_grads`` (``gradient_checkpointing_enable()``) and PEFT's
#: ``prepare_model_for_kbit_training`` / ``PeftModel`` put on the input embeddings.
_REQUIRES_GRAD_HOOKS = (("transformers.", "make_inputs_require_grads"), ("peft.", "make_inputs_require_grad"))


def _marks_output_requires_grad(hook) -> bool:
    """Whether ``hook`` is one of :data:`_REQUIRES_GRAD_HOOKS`: it only sets ``requires_grad`` on the
    module's output, which a module with a trainable parameter has anyway (values and gradients unchanged)."""
    module, name = getattr(hook, "__module__", None) or "", getattr(hook, "__name__", None)
    return any(module.startswith(prefix) and name == expected for prefix, expected in _REQUIRES_GRAD_HOOKS)


def _only_harmless_hooks(module: nn.Module) -> bool:
    """Whether every hook of ``module`` (which has some) is FSDP2's own or a forward hook of
    :data:`_REQUIRES_GRAD_HOOKS`; any backward hook counts."""
    from ..._sharding import is_fsdp2_hook

    if module_backward_hooks(module):
        return False
    return all(is_fsdp2_hook(h) for h in module._forward_pre_hooks.values()) and all(
        is_fsdp2_hook(h) or _marks_output_requires_grad(h) or is_inert_hook(h) for h in module._forward_hooks.values()
    )


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module`` if every assumption of it holds (see :class:`Rule`), else None."""
    rule, own_methods = _rule_for_type(type(module))  # type: ignore[arg-type]  # classes are hashable
    if rule is None or not own_methods or any(m in vars(module) for m in rule.methods):
        return None
    if rule.whole_call:  # its parameters may be its submodules': all must be the rule's
        direct, nested = {n for n, p in module.named_parameters() if p.requires_grad}, False
    else:
        direct = set(own_trainable_parameters(module))
        nested = any(p.requires_grad for c in module.children() for p in c.parameters())
    if direct and direct <= set(rule.params) and not nested and not has_hooks(module) and rule.accepts(module):
        return rule
    return None
