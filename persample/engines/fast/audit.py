"""The graph audit: one walk of the autograd graph after the forward.

- every call of a rule module puts exactly one edge into each of its parameters' ``AccumulateGrad`` nodes,
  so any other edge is a use no rule sees (say ``x @ self.embed.weight.T`` in a parent's ``forward``);
- transposes, permutes and stacks that move a tensor's dim 0 make a position dim of the batch's size
  ambiguous, and so an expansion that met a tensor with another dim of the batch's size;
- ops that reduce, sort, roll or index rows along the batch dim mix examples (:func:`batch_mixing`);
- re-entrant activation checkpointing hides layers from the capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import torch
from torch import Tensor, nn

from ..._batch import flat_leaves, tensors_in
from ...contract import Finding
from .._autograd import is_reentrant_checkpoint_node
from .places import Place, batch_first
from .units import Call, Unit, probing


def _ambiguous_expansion(label: str) -> Finding:
    return Finding(
        "BATCH_DIM_AMBIGUOUS",
        f"{label}; it meets a tensor whose dim 0 has the batch's size and "
        "another dim of that size, while the forward moves dim 0 of some tensor (a transpose or "
        "permute): that tensor may be sequence-first, so whether the expansion lines up with the batch "
        "is ambiguous",
    )


@dataclass(frozen=True)
class GraphAudit:
    """What one walk of the autograd graph found."""

    escape: Finding | None
    dim_zero_moved: bool


_HF_NON_REENTRANT = (
    "or for Hugging Face models gradient_checkpointing_enable(gradient_checkpointing_kwargs="
    "{'use_reentrant': False}) (TrainingArguments(gradient_checkpointing_kwargs={'use_reentrant': "
    "False}); Lightning: your own checkpoint(..., use_reentrant=False))"
)


REENTRANT_CHECKPOINT = Finding(
    "REENTRANT_CHECKPOINT",
    "re-entrant gradient checkpointing (use_reentrant=True) whose recomputation in the backward the fast "
    "engine cannot follow hides the checkpointed layers' inputs and output gradients from it; "
    "use checkpoint(..., use_reentrant=False), " + _HF_NON_REENTRANT,
)


def _signed(value: int) -> int:
    """Saved int64 dims come back as unsigned: map 2**64 - k back to -k."""
    return value - (1 << 64) if value >= (1 << 63) else value


def _is_parameter(node, activations: frozenset | set = frozenset()) -> bool:
    """Whether a backward node is a leaf's ``AccumulateGrad`` (a parameter's, unless it is one of
    ``activations``: the leaves a re-entrant checkpoint's recomputation detaches its block's inputs into)."""
    return hasattr(node, "variable") and node not in activations


def _moves_dim_zero(node, activations: frozenset | set = frozenset()) -> bool:
    """Whether a backward node belongs to an op that moved some activation's dim 0."""
    name = node.name()
    try:
        if name.startswith(("TransposeBackward", "PermuteBackward", "StackBackward")):
            ndim = len(node._input_metadata[0].shape)  # the op's output
            if name.startswith("TransposeBackward"):
                return 0 in (_signed(node._saved_dim0) % ndim, _signed(node._saved_dim1) % ndim)
            if name.startswith("PermuteBackward"):
                return _signed(tuple(node._saved_dims)[0]) % ndim != 0
            return _signed(node._saved_dim) % ndim == 0
        if name.startswith("TBackward"):  # .t() of a 2-D activation (not of a weight)
            return not all(_is_parameter(nxt, activations) for nxt, _ in node.next_functions if nxt is not None)
    except (AttributeError, IndexError, ZeroDivisionError):
        return True
    return False


def batch_mixing(what: str) -> Finding:
    return Finding(
        "BATCH_MIXED",
        f"the forward mixes the examples of the batch: {what}, so an example's output "
        "depends on other examples and its gradient cannot be read off the batch's backward; "
        "engine='auto' computes each example alone (the vmap engine or the loop: the gradient of "
        "loss_fn on a batch of one)",
    )


#: Backward nodes (their names without the trailing number) of ops that combine or reorder the rows of
#: their input along the dims that an attribute holds; None: along every dim (a full reduction).
_ALONG_DIMS = {
    "RollBackward": "_saved_dims",
    "FlipBackward": "_saved_dims",
    "SortBackward": "_saved_dim",
    "CumsumBackward": "_saved_dim",
    "CumprodBackward": "_saved_dim",
    "LogcumsumexpBackward": "_saved_dim",
    "CummaxBackward": "_saved_dim",
    "CumminBackward": "_saved_dim",
    "IndexSelectBackward": "_saved_dim",
    "GatherBackward": "_saved_dim",
    "IndexAddBackward": "_saved_dim",
    "ScatterAddBackward": "_saved_dim",
    "ScatterBackward": "_saved_dim",
    "MeanBackward": "_saved_dim",
    "SumBackward": "_saved_dim",
    "NansumBackward": "_saved_dim",
    "MaxBackward": "_saved_dim",
    "MinBackward": "_saved_dim",
    "AmaxBackward": "_saved_dim",
    "AminBackward": "_saved_dim",
    "StdBackward": "_saved_dim",
    "VarBackward": "_saved_dim",
    "StdMeanBackward": "_saved_dim",
    "VarMeanBackward": "_saved_dim",
    "SoftmaxBackward": "_saved_dim",
    "LogSoftmaxBackward": "_saved_dim",
    "LogsumexpBackward": "_saved_dim",
    "LinalgVectorNormBackward": "_saved_dim",
    "NormBackward": "_saved_dim",
    "TopkBackward": "_saved_dim",
    "ProdBackward": "_saved_dim",
    "MedianBackward": "_saved_dim",
    "NanmedianBackward": "_saved_dim",
    "KthvalueBackward": "_saved_dim",
    "ModeBackward": "_saved_dim",
}


_ROW_INDEXING = frozenset(
    {"IndexSelectBackward", "GatherBackward", "IndexAddBackward", "ScatterAddBackward", "ScatterBackward"}
)


#: Full reductions (no dim saved): every row of the input meets every other.
_FULL_REDUCTIONS = frozenset(
    {
        "SumBackward0",
        "MeanBackward0",
        "MaxBackward1",
        "MinBackward1",
        "MedianBackward0",
        "NanmedianBackward0",
        "ProdBackward0",
        "NormBackward0",
        "StdBackward0",
        "VarBackward0",
    }
)


def _node_input_shape(node) -> tuple | None:
    """The shape of the tensor an op read: its saved sizes or self, else its output's (shape-keeping ops)."""
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    if sizes is not None:
        return tuple(int(s) for s in sizes)
    saved = getattr(node, "_saved_self", None)
    if isinstance(saved, Tensor):
        return tuple(saved.shape)
    metadata = getattr(node, "_input_metadata", None)
    return tuple(metadata[0].shape) if metadata else None


#: Batch norms, whose saved ``training`` says whether they normalise with the batch's own statistics.
_BATCH_NORMS = frozenset(
    {"NativeBatchNormBackward", "CudnnBatchNormBackward", "MiopenBatchNormBackward", "NativeBatchNormLegitBackward"}
)


def _every_row(index: Tensor, batch_size: int) -> bool:
    """Whether ``index`` along dim 0 keeps every row in place: ``arange(B)``, or a boolean mask of B rows
    (over dim 0 and the dims after it) with exactly one true entry in each row. ``x[mask]`` then has B rows,
    row i the one entry that example i's row of the mask selects (an all-true ``[B]`` mask; BART's and T5's
    classifiers pool ``h[input_ids.eq(eos)]`` with one ``<eos>`` per example), as ``x[arange(B), j]``."""
    if index.dim() == 0 or index.shape[0] != batch_size:
        return False
    if index.dtype == torch.bool:
        return bool(index.reshape(batch_size, -1).sum(1).eq(1).all())
    return index.dim() == 1 and bool(torch.equal(index.cpu(), torch.arange(batch_size)))


def _of_parameters_only(node, activations: frozenset | set = frozenset()) -> bool:
    return all(nxt is None or _is_parameter(nxt, activations) for nxt, _ in node.next_functions)


def _mixes_batch(
    node,
    batch_size: int | None,
    activations: frozenset | set = frozenset(),
    *,
    flattened: bool = False,
    seq_first: bool = False,
) -> tuple[bool, tuple, str] | None:
    """(certain, the tensor's shape, what) where the op of backward node ``node`` combines or reorders the
    rows of a tensor whose dim 0 has the batch's size along dim 0, else None. Certain for reductions, scans, sorts,
    rolls, flips and gathers over dim 0; not certain (dim 0 may be a position once some dim 0 moved)
    for slices, selections and indexing across rows, and ``a @ b`` with ``a`` a transposed activation.

    With calls on flattenings (``flattened``, :mod:`.places`), a dim 0 that is a multiple of the batch's size
    counts as the batch's too (``(B·T, D)``: a roll by 2T rows would swap examples of one parity, which the
    probe of the rows cannot tell); with calls on sequence-first tensors (``seq_first``), an op along
    another dim of the batch's size mixes the examples for certain (the shape returned is then ``()``)."""
    if batch_size is None or batch_size < 2:
        return None
    name = node.name()
    base = name.rstrip("0123456789")

    def rows(n: int) -> bool:
        return n == batch_size or (flattened and n > batch_size and n % batch_size == 0)

    try:
        if name in _FULL_REDUCTIONS or base in _ALONG_DIMS:
            if _of_parameters_only(node, activations):
                return None
            shape = _node_input_shape(node)
            if not shape:
                return None
            others = {a for a in range(1, len(shape)) if shape[a] == batch_size} if seq_first else set()
            if not rows(shape[0]) and not others:
                return None
            dims = None if name in _FULL_REDUCTIONS else getattr(node, _ALONG_DIMS[base], None)
            if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0):
                what = f"{name} reduces or reorders all of a tensor of shape {shape}"
                return (True, shape, what) if rows(shape[0]) else (True, (), what)
            dims = [dims] if isinstance(dims, int) else list(dims)
            normal = {_signed(int(d)) % len(shape) for d in dims}
            if 0 in normal and rows(shape[0]):
                # a gather or scatter of rows may be a reordering undone later (PackedSequence's sort)
                return base not in _ROW_INDEXING, shape, f"{name} works along dim 0 of a tensor of shape {shape}"
            if normal & others:
                return (
                    True,
                    (),
                    f"{name} works along dim {min(normal & others)} of a tensor of shape {shape}, "
                    + ("which holds the batch of a sequence-first call"),
                )
            return None
        if base in ("SliceBackward", "SelectBackward"):
            shape = tuple(int(s) for s in node._saved_self_sym_sizes)
            if not shape or not rows(shape[0]) or _signed(int(node._saved_dim)) % len(shape) != 0:
                return None
            if base == "SliceBackward":
                start, end, step = _signed(int(node._saved_start)), _signed(int(node._saved_end)), int(node._saved_step)
                if step == 1 and start in (0, -shape[0]) and end >= shape[0]:
                    return None
            return False, shape, f"{name} takes part of dim 0 of a tensor of shape {shape}"
        if base == "IndexBackward":
            shape = tuple(int(s) for s in node._saved_self_sym_sizes)
            indices = list(node._saved_indices)
            if not shape or not rows(shape[0]) or not indices or indices[0] is None:
                return None
            if _every_row(indices[0], shape[0]):
                return None  # every row in place (x[arange(B), j], an all-true mask)
            return False, shape, f"{name} indexes dim 0 of a tensor of shape {shape} with rows of other examples"
        if base in _BATCH_NORMS:
            shape = _node_input_shape(node)
            if getattr(node, "_saved_training", True) is False or not shape or shape[0] != batch_size:
                return None  # eval mode normalises each row with the running statistics
            return True, shape, f"{name} normalises with the statistics of the whole batch (training=True)"
        if base == "NativeLayerNormBackward":  # layer_norm(h, h.shape): statistics over every dim, dim 0 too
            shape = _node_input_shape(node)  # its output's: a saved tensor is freed by the backward (observe)
            normalized = tuple(node._saved_normalized_shape)
            if not shape or shape[0] != batch_size or len(normalized) < len(shape):
                return None
            return True, shape, f"{name} normalises over dim 0 too (normalized_shape {normalized} of shape {shape})"
        if base == "IndexPutBackward":  # out[idx] = h: row j of out gets row idx⁻¹(j) of h
            shape = _node_input_shape(node)
            if not shape or not rows(shape[0]):
                return None
            indices = list(node._saved_indices)  # freed by a backward (observe): then refused as unreadable
            if not indices or indices[0] is None or _every_row(indices[0], shape[0]):
                return None
            return False, shape, f"{name} writes rows of other examples into dim 0 of a tensor of shape {shape}"
        if base in ("MmBackward", "AddmmBackward"):
            self_node = node.next_functions[1 if base == "AddmmBackward" else 0][0]
            sizes = getattr(node, "_saved_self_sym_sizes", None) or getattr(node, "_saved_mat1_sym_sizes", None)
            if (
                self_node is not None
                and sizes is not None
                and rows(int(sizes[-1]))
                and not _is_parameter(self_node, activations)
                and _moves_dim_zero(self_node, activations)
            ):
                # a 2-D activation with B rows is batch-first (a sequence's rows are B·T)
                return True, (batch_size,), f"{name} contracts a transposed activation's dim 0 (x.T @ y) over the batch"
    except (AttributeError, IndexError, RuntimeError, TypeError, ValueError):
        return False, (), f"{name}, whose saved arguments cannot be read, works along some dim of the batch"
    return None


#: Unary elementwise ops, whose result keeps the rows of their input where they were (a transpose or a
#: contraction feeding them is a node of its own, checked for itself). A square activation (a width equal
#: to the batch's size) then runs no probe through a plain MLP. Binary ops are not here: with a width equal
#: to the batch's size, ``h + h.sum(1)`` broadcasts a per-example vector across the examples.
_ROW_WISE = frozenset(
    {
        "ReluBackward",
        "TanhBackward",
        "SigmoidBackward",
        "GeluBackward",
        "SiluBackward",
        "ThresholdBackward",
        "LeakyReluBackward",
        "EluBackward",
        "SoftplusBackward",
        "HardtanhBackward",
        "NativeDropoutBackward",
        "ToCopyBackward",
        "CloneBackward",
        "NegBackward",
        "ExpBackward",
        "LogBackward",
        "SqrtBackward",
        "RsqrtBackward",
    }
)


#: Ops that compute each index of their input's dim 0 on its own, whatever the other dims hold: pooling
#: (over spatial dims, per sample and channel), and, with parameter weights, convolution and GroupNorm
#: (per sample N). Their result keeps the batch on dim 0 where their input had it, so a channel count
#: equal to the batch's size (a CNN at B = 32 with 32 channels) runs no probe of the rows. An unbatched
#: call reaches them through an ``unsqueeze`` (a node of its own, checked for itself).
_PER_SAMPLE = frozenset(
    {
        "ConvolutionBackward",
        "NativeGroupNormBackward",
        "MaxPool2DWithIndicesBackward",
        "MaxPool3DWithIndicesBackward",
        "AvgPool2DBackward",
        "AvgPool3DBackward",
        "AdaptiveAvgPool2DBackward",
        "AdaptiveAvgPool3DBackward",
        "AdaptiveMaxPool2DBackward",
        "AdaptiveMaxPool3DBackward",
    }
)

#: Views and reshapes: where dim 0 keeps its size, row i of the result is row i of the input (they follow
#: the logical row-major order). Reductions, scans, sorts and softmaxes along dims other than 0
#: (:data:`_ALONG_DIMS`, not the row indexing ones) keep the rows too.
_RESHAPES = frozenset({"ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward"})

#: Ops that select, slice, split, squeeze, unsqueeze, concatenate or stack along their saved dims: where
#: dim 0 is not among them, row i of the result comes from row i of each operand alone. The dims count in
#: the input's dims ("in", with its sizes saved), the output's ("out"), or one more than the output's
#: ("unbound": unbind drops the dim).
_ALONG_OTHER_DIMS = {
    "SelectBackward": "in",
    "SliceBackward": "in",
    "SplitBackward": "in",
    "SplitWithSizesBackward": "in",
    "SqueezeBackward": "in",
    "UnbindBackward": "unbound",
    "UnsqueezeBackward": "out",
    "CatBackward": "out",
    "StackBackward": "out",
}

#: Fused scaled dot-product attention: out[i] = attention(q[i], k[i], v[i]) for every index i of the dims
#: before the last two, so row i of dim 0 of the result comes from rows i of its operands alone, where each
#: operand is an activation of the graph (checked for itself) or computed from parameters alone.
_ATTENTION = frozenset(
    {
        "ScaledDotProductFlashAttentionForCpuBackward",
        "ScaledDotProductFlashAttentionBackward",
        "ScaledDotProductEfficientAttentionBackward",
        "ScaledDotProductCudnnAttentionBackward",
    }
)


def _keeps_rows(node, base: str, activations: frozenset | set) -> bool:
    """Whether the op of ``node`` (name ``base`` without its number) maps row i of dim 0 of its activation
    input to row i of its result and nothing else there: see :data:`_PER_SAMPLE` and :data:`_RESHAPES`,
    a transpose or permute that leaves dim 0 in place (attention's ``[B, H, T, d] → [B, T, H, d]``,
    whatever H is), an expansion that keeps dim 0, :data:`_ALONG_OTHER_DIMS` and :data:`_ATTENTION`.
    The activation must be a node of the graph (checked for itself, so by induction its dim 0 holds the
    batch); the op's other inputs (weights, biases) must come from parameters alone. Unreadable saved
    arguments: not known to keep the rows (the probe runs)."""
    edges = [nxt for nxt, _ in node.next_functions]
    if base in _ATTENTION or base in ("CatBackward", "StackBackward"):  # several operands of the batch
        # each a node of the graph (no edge: a tensor the graph does not show), one of them an activation
        if not all(
            nxt is not None and (_of_parameters_only(nxt, activations) or not _is_parameter(nxt, activations))
            for nxt in edges
        ) or all(_of_parameters_only(nxt, activations) for nxt in edges):
            return False
    elif not edges or edges[0] is None or _is_parameter(edges[0], activations):
        return False
    elif not all(nxt is None or _of_parameters_only(nxt, activations) for nxt in edges[1:]):
        return False
    try:
        if base in _ATTENTION:
            return True
        if base in _RESHAPES:
            return int(node._saved_self_sym_sizes[0]) == int(node._input_metadata[0].shape[0])
        if base in ("TransposeBackward", "PermuteBackward"):  # other dims moved within each row of dim 0
            return not _moves_dim_zero(node, activations)
        if base in _ALONG_OTHER_DIMS:
            return _along_other_dims(node, base)
        if base == "ExpandBackward":  # sizes of 1 expanded, dim 0 kept (not new leading dims)
            sizes, shape = tuple(node._saved_self_sym_sizes), node._input_metadata[0].shape
            return len(sizes) == len(shape) and int(sizes[0]) == int(shape[0])
        if base in _ALONG_DIMS and base not in _ROW_INDEXING and node.name() not in _FULL_REDUCTIONS:
            # no dims saved: along every dim, dim 0 included
            return _other_dims_than_zero(getattr(node, _ALONG_DIMS[base], None), len(_node_input_shape(node) or ()))
    except (AttributeError, IndexError, RuntimeError, TypeError, ValueError, ZeroDivisionError):
        return False
    return base in _PER_SAMPLE


def _along_other_dims(node, base: str) -> bool:
    """Whether the op of ``node`` (one of :data:`_ALONG_OTHER_DIMS`) works along dims other than 0. Raises
    ``AttributeError`` and the like where its saved dims cannot be read (the caller: not known to keep rows)."""
    counted = _ALONG_OTHER_DIMS[base]
    if counted == "in":
        ndim = len(node._saved_self_sym_sizes)
    else:
        ndim = len(node._input_metadata[0].shape) + (counted == "unbound")
    return _other_dims_than_zero(node._saved_dim, ndim)


def _other_dims_than_zero(dims, ndim: int) -> bool:
    """Whether saved ``dims`` (an int or a sequence; negative ones come back unsigned) name some dims of a
    tensor of ``ndim`` dims, none of them dim 0."""
    dims = [dims] if isinstance(dims, int) else list(dims or ())
    return bool(dims) and ndim > 0 and 0 not in {_signed(int(d)) % ndim for d in dims}


def _seq_first(units: list[Unit], inputs_moved: bool) -> bool:
    """Whether some tensor may be sequence-first: a raw input's dim 0 moved, or a recurrent or
    ``batch_first=False`` module runs as a fallback."""
    return inputs_moved or any(
        isinstance(u.module, nn.RNNBase) or getattr(u.module, "batch_first", True) is False
        for u in units
        if u.rule is None
    )


def rows_check(outputs: list, units: list[Unit], batch_size: int | None) -> Finding | None:
    """The probe of the rows (:func:`rows_leak`) taken at the end of the model's forward, while its graph
    is alive, for an audit that runs after the backward (observe: ``audit_graph(..., rows=...)``). None
    where no model-side tensor holds the batch's size off dim 0 (:func:`_batch_dim_off_lead`), and where
    the model's side holds a re-entrant checkpoint (the probe cannot backward through one; the audit
    after the backward walks its recomputed block with the named checks)."""
    if batch_size is None or batch_size < 2:
        return None
    with torch._C.DisableTorchFunction():
        internal = _fallback_internals(units)
        stack: list = [
            t.grad_fn
            for t in outputs
            if isinstance(t, Tensor) and t.grad_fn is not None and t.dim() > 0 and t.shape[0] == batch_size
        ]
        seen: set = set()
        moved = False
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if is_reentrant_checkpoint_node(node):
                return None
            if not moved and node not in internal:
                moved = _batch_dim_off_lead(node, batch_size)
            stack.extend(nxt for nxt, _ in node.next_functions)
        if not moved and not any(_places(units).values()) and not _token_row_calls(units):
            return None
        leak = rows_leak(outputs, units, batch_size, seq_first=_seq_first(units, False))
    return None if leak is None else batch_mixing(leak)


def _token_row_calls(units: list[Unit]) -> bool:
    """Whether some call is on a flattened token batch (:func:`.units.token_rows`): its row map is a claim
    the probe of the rows (:func:`rows_leak`) must check."""
    return any(call.rows_per_example > 1 or call.gathered for unit in units for call in unit.calls)


def _batch_dim_off_lead(node, batch_size: int | None, activations: frozenset | set = frozenset()) -> bool:
    """Whether a model-side op's result may hold the batch elsewhere than on a leading dim 0: a dim other
    than 0 of the batch's size (``h.T``, ``h @ h.T``, ``cdist(h, h)``), a dim 0 that is not a multiple of
    the batch's size (``h.reshape(3, 8)``, ``h.mean(0)``), or no dim at all. Ops of parameters alone do
    not count; a result whose shape cannot be read does (fail closed: the probe then runs)."""
    if batch_size is None or batch_size < 2 or _of_parameters_only(node, activations):
        return False
    base = node.name().rstrip("0123456789")
    if base in _ROW_WISE or _keeps_rows(node, base, activations):
        return False  # whatever the shapes, row j of the result comes from row j of the inputs
    if base in ("AddmmBackward", "MmBackward"):  # x @ W.T with W a parameter: a contraction over features
        weight = node.next_functions[-1][0]
        if weight is not None and _of_parameters_only(weight, activations):
            return False
    try:
        shapes = [tuple(int(s) for s in m.shape) for m in node._input_metadata]  # the op's outputs
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return True
    return any(not shape or shape[0] % batch_size != 0 or batch_size in shape[1:] for shape in shapes)


def _probe_cotangent(t: Tensor, bit: int = 0, value: int = 0) -> Tensor:
    """A fixed cotangent for ``t`` (no generator drawn from: other threads share them) whose rows i along
    dim 0 with bit ``bit`` of i other than ``value`` are zero (by default: the odd rows): cos(1.618·k + 0.3)
    over its elements, signs and sizes varied so that no sum over rows cancels by construction."""
    k = torch.arange(t.numel(), device=t.device, dtype=torch.float64).reshape(t.shape)
    v = torch.cos(k * 1.618 + 0.3)
    v[(torch.arange(t.shape[0], device=t.device) >> bit) % 2 != value] = 0
    return v.to(t.dtype)


def _other_rows(g: Tensor, batch_size: int, k: int, bit: int, value: int) -> Tensor:
    """The rows of ``g`` (B·k rows, row r of example r // k; k = 1: batch rows) of the examples whose bit
    ``bit`` is not ``value`` (by default, the odd examples' rows)."""
    examples = (torch.arange(batch_size, device=g.device) >> bit) % 2 != value
    return g.reshape(batch_size, k, -1)[examples]


def rows_leak(outputs: list, units: list[Unit], batch_size: int, *, seq_first: bool = False) -> str | None:
    """Where the gradient of the even examples' outputs reaches the rows of odd examples at a unit's
    input or output (then some op in between combines the rows of different examples), else None.

    This is the definition of batch mixing read off the graph itself, whatever the op (an einsum or
    tensordot over the batch letter, ``bmm``/``matmul`` of transposed views, ``cdist``, ``cov``,
    attention or a convolution run over the batch dim): for the layer rules to be exact, row j of every
    activation may reach example j's output only, so ∂(Σ_{i even} v_i·out_i)/∂a has zero odd rows.
    One backward to the activations alone (no parameter gradient), with the user's gradient hooks and
    the capture's own skipped (:func:`probing`). Pairs of rows of the same parity are not told apart; the
    graph audit's named checks (roll, flip, permutations) cover those. With a sequence-first module, an
    activation with another dim of the batch's size may have positions on dim 0: not counted.
    """
    roots = [
        t
        for t in outputs
        if isinstance(t, Tensor)
        and t.grad_fn is not None
        and t.dim() > 0
        and t.shape[0] == batch_size
        and (t.is_floating_point() or t.is_complex())
    ]
    seen: dict[int, tuple[Tensor, str, int]] = {}  # id → (tensor, label, rows per example; 0: gathered rows)
    placed: dict[int, Place] = {}  # tensors read by a place: their rows are example i's where it says
    gathered: dict[int, Call] = {}  # id of a gathered call's output → the call, whose row_examples are read here
    for unit in units:
        for call in unit.calls:
            if call.gathered:
                out = call.output
                if isinstance(out, Tensor) and out.requires_grad and out.layout == torch.strided:
                    label = f"module {unit.name or '<root>'}'s output of shape {tuple(out.shape)} (gathered token rows)"
                    seen[id(out)], gathered[id(out)] = (out, label, 0), call
                continue
            if call.place is not None:
                for where, t in (("input", call.args[0]), ("output", flat_leaves(call.output)[0])):
                    if isinstance(t, Tensor) and t.requires_grad and t.layout == torch.strided and id(t) not in seen:
                        seen[id(t)] = (
                            t,
                            f"module {unit.name or '<root>'}'s {where} of shape {tuple(t.shape)} "
                            f"({call.place.describe()})",
                            1,
                        )
                        placed[id(t)] = call.place
            k = call.rows_per_example  # a flattened token batch: row r is example r // k's (units.token_rows)
            for where, value in (("input", (call.args, call.kwargs)), ("output", call.output)):
                for t in tensors_in(value):
                    if (
                        t.requires_grad
                        and t.dim() > 0
                        and t.shape[0] == batch_size * k
                        and id(t) not in seen
                        and not (k == 1 and seq_first and batch_size in tuple(t.shape[1:]))
                        and t.layout == torch.strided
                        and t.stride(0) != 0  # an expansion over the batch: its rows are not examples
                    ):
                        label = f"module {unit.name or '<root>'}'s {where} of shape {tuple(t.shape)}"
                        seen[id(t)] = (t, label + (f" (token rows, {k} per example)" if k > 1 else ""), k)
    if not roots or not seen:
        return None
    # One pass, cotangents on the even examples' outputs, checks that no odd row is reached. A call on
    # token rows (units.token_rows) claims a map row → example that its rows may not show (a gather of
    # rows reorders them), so its tensors get the passes that pin every example's index bit by bit: for
    # each bit j of the example index and each value v, the examples with bit j = v reach no row claimed
    # by an example with bit j ≠ v (2·⌈log2 B⌉ passes in all, the first one shared). With token rows, every
    # call's rows get every pass (a gather of B rows from token rows is not batch rows, whatever its size).
    passes = [(0, 0)]
    reached: dict[int, dict[tuple[int, int], Tensor]] = {i: {} for i in gathered}  # rows each pass reaches
    if any(k != 1 for _, _, k in seen.values()):
        passes += [
            (bit, v) for bit in range(max(1, (batch_size - 1).bit_length())) for v in (0, 1) if (bit, v) != (0, 0)
        ]
    entries = list(seen.items())
    together = _passes_together(roots, [t for _, (t, _, _) in entries], passes)
    for index, (bit, value) in enumerate(passes):
        try:
            with probing():
                grads = (
                    together[index]
                    if together is not None
                    else torch.autograd.grad(
                        roots,
                        [t for _, (t, _, _) in entries],
                        grad_outputs=[_probe_cotangent(t, bit, value) for t in roots],
                        retain_graph=True,
                        allow_unused=True,
                    )
                )
        except RuntimeError as err:  # a graph the probe cannot run: refuse rather than trust the rows
            return f"the rows of the batch cannot be shown apart ({type(err).__name__}: {str(err).splitlines()[0]})"
        probed = []
        for (key, (t, label, k)), g in zip(entries, grads):
            if k == 0:  # gathered rows: note which rows the examples with bit j = v reach
                rows = torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
                if g is not None and g.layout == torch.strided:
                    rows = ((g != 0) & torch.isfinite(g)).reshape(t.shape[0], -1).any(1)
                reached[key][(bit, value)] = rows
                continue
            if g is None or g.layout != torch.strided:
                continue
            if key in placed:
                g = batch_first(g, placed[key], batch_size)
            probed.append((label, _other_rows(g, batch_size, k, bit, value)))
        if not probed:
            continue
        device = probed[0][1].device
        # one host read for every activation's flag (not one each)
        flags = torch.stack([((other != 0) & torch.isfinite(other)).any().to(device) for _, other in probed]).tolist()
        for (label, _), leaked in reversed(list(zip(probed, flags))):  # the last one names where it happens
            if leaked:
                return (
                    f"an op after {label} combines the rows of different examples (the gradient of some "
                    "examples' outputs reaches other examples' rows there: an einsum, tensordot, bmm or matmul "
                    "over the batch dim, cdist, cov, attention, a convolution across the batch, or a gather "
                    "that moves token rows to another example?)"
                )
    for i, call in gathered.items():
        examples = _examples_of_rows(reached[i], batch_size)
        if examples is None:
            return (
                f"an op after {seen[i][1]} combines the rows of different examples (one of its rows is "
                "reached by the outputs of two examples)"
            )
        call.row_examples = examples
    return None


#: The most numbers (passes × the probed activations' elements) that the probe's passes hold at once when they
#: run as one batched backward (32 MiB in float32); beyond it, they run one by one.
_PASSES_TOGETHER_ELEMENTS = 1 << 23


def _passes_together(roots: list[Tensor], inputs: list[Tensor], passes: list[tuple[int, int]]) -> list | None:
    """The probe's passes (:func:`rows_leak`) as one backward with their cotangents stacked
    (``is_grads_batched``): each pass's gradients, as the pass alone computes them, else None (one pass,
    more numbers than ``_PASSES_TOGETHER_ELEMENTS``, or a graph that torch cannot run batched: the passes
    then run one by one). One run of the graph instead of 2·⌈log2 B⌉: what dominates on small models."""
    if len(passes) < 2 or len(passes) * sum(t.numel() for t in inputs) > _PASSES_TOGETHER_ELEMENTS:
        return None
    try:
        with probing(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a backward op without a batching rule runs in a loop: still exact
            stacked = torch.autograd.grad(
                roots,
                inputs,
                grad_outputs=[torch.stack([_probe_cotangent(t, bit, v) for bit, v in passes]) for t in roots],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
    except Exception:  # noqa: BLE001 - no batched backward for some op: the passes one by one decide
        return None
    return [[None if g is None else g[index] for g in stacked] for index in range(len(passes))]


def _examples_of_rows(reached: dict[tuple[int, int], Tensor], batch_size: int) -> Tensor | None:
    """Each row's example index from the probe's passes (``reached[(j, v)]``: the rows that the outputs of
    the examples with bit j = v reach): bit j of row r's example is v where only the pass (j, v) reaches it;
    −1 for a row no pass reaches; None where a row is reached for both values of a bit (two examples)."""
    bits = max(1, (batch_size - 1).bit_length())
    first = reached[(0, 0)]
    examples = torch.zeros(first.shape[0], dtype=torch.long, device=first.device)
    unreached = torch.ones_like(first)
    any_pass = first | reached[(0, 1)]
    for bit in range(bits):
        zero, one = reached[(bit, 0)], reached[(bit, 1)]
        if bool((zero & one).any()) or not torch.equal(zero | one, any_pass):
            return None
        examples |= one.long() << bit
        unreached &= ~(zero | one)
    return examples.masked_fill(unreached, -1)


def _places(units: list[Unit]) -> dict[str, bool]:
    """Whether some call read its input by a place (:mod:`.places`): a flattening, a sequence-first tensor
    (the keywords of :func:`_mixes_batch`). Such calls always get the probe of the rows."""
    found = [call.place for unit in units for call in unit.calls if call.place is not None]
    return {"flattened": any(p.positions for p in found), "seq_first": any(not p.positions for p in found)}


def _fallback_internals(units: list[Unit]) -> set:
    """Backward nodes created inside fallback calls (and calls of rules that recompute the whole call):
    reachable from a call's outputs before its inputs."""
    inside: set = set()
    for unit in units:
        if unit.rule is not None and not unit.rule.whole_call:
            continue
        for call in unit.calls:
            inputs = {t.grad_fn for t in tensors_in((call.args, call.kwargs)) if t.grad_fn is not None}
            stack = [t.grad_fn for t in tensors_in(call.output)]
            while stack:
                node = stack.pop()
                if node is None or node in inside or node in inputs:
                    continue
                inside.add(node)
                stack.extend(nxt for nxt, _ in node.next_functions)
    return inside


def audit_graph(
    root: Tensor | list[Tensor],
    units: list[Unit],
    names: dict[int, str],
    *,
    batch_size: int | None = None,
    outputs: list | None = None,
    inputs_moved: bool = False,
    recomputed: dict | None = None,
    rows: Finding | None | str = "probe",
) -> GraphAudit:
    """Walk the graph of ``root`` once: parameter uses per ``AccumulateGrad``, dim-0 moves and, with
    ``batch_size``, ops that mix the examples along the batch dim.

    Dim-0 moves inside fallback modules (an RNN or attention going time-major
    internally) do not count: those modules are handled as a whole. An expanded
    output that met a batch-first tensor with another dim of the batch's size
    is ambiguous when some dim 0 moved.

    The model's side of the graph is what the model's ``outputs`` batched on dim 0 are computed
    from (default: the roots themselves; the fast engine passes them, so that the loss's own mean
    over the examples is not the model's). There, an op that combines or reorders the rows of a
    tensor whose dim 0 has the batch's size (:func:`_mixes_batch`: roll, sort, flip, a scan or
    reduction over dim 0, an index or gather across rows, ``h.T @ h``) makes an example's output
    depend on other examples: the batch's backward then has no per-example reading. ``inputs_moved``:
    an op moved a raw input's dim 0 (which the graph does not show).

    A re-entrant checkpoint's node hides the graph of its block (built only in the backward): it is
    refused unless ``recomputed`` holds that graph's roots (the outputs of the block's recomputation,
    :meth:`.capture.Capture.follow_checkpoints`), through which the walk goes on as if the block's graph
    hung below the node (the recomputation's inputs are leaves detached from the node's own inputs,
    which the walk reaches through the node).

    ``rows``: ``"probe"`` probes the rows of the batch (:func:`rows_leak`) where the shapes call for it,
    which needs the graph before any backward (the fast engine); otherwise the verdict of that probe,
    taken earlier by :func:`rows_check` (observe: at the end of the forward), a Finding or None.
    """
    with torch._C.DisableTorchFunction():  # the broadcast watcher may be on (observe): read the real tensors
        return _audit_graph(root, units, names, batch_size, outputs, inputs_moved, recomputed or {}, rows)


def _audit_graph(
    root: Tensor | list[Tensor],
    units: list[Unit],
    names: dict[int, str],
    batch_size: int | None = None,
    outputs: list | None = None,
    inputs_moved: bool = False,
    recomputed: dict | None = None,
    rows: Finding | None | str = "probe",
) -> GraphAudit:
    uses: dict[int, int]
    seen, uses, moved = set(), {}, False
    internal = _fallback_internals(units)
    roots = list(root) if isinstance(root, (list, tuple)) else [root]
    model_side: set = set()
    if batch_size is not None:
        model_side = {
            t.grad_fn
            for t in (roots if outputs is None else outputs)
            if isinstance(t, Tensor) and t.grad_fn is not None and t.dim() > 0 and t.shape[0] == batch_size
        }
    checked: set = set()  # model-side nodes looked at for batch mixing
    places = _places(units)  # calls on flattenings or sequence-first tensors (.places)
    batch_moved = False  # some model-side tensor has the batch's size off dim 0 (see _batch_dim_off_lead)
    mixing: list[tuple[bool, tuple, str]] = []  # (certain, shape, what): certain unless dim 0 may not be the batch
    stack = [(t.grad_fn, False) for t in roots]
    reentrant = False
    detached: set = set()  # the AccumulateGrad nodes of recomputed blocks' inputs: activations, not parameters
    while stack:
        node, inside = stack.pop()
        if node is None:
            continue
        inside = inside or node in model_side
        first = node not in seen
        if not first and (not inside or node in checked):
            continue
        if inside:
            checked.add(node)
            if node not in internal and (found := _mixes_batch(node, batch_size, detached, **places)) is not None:
                mixing.append(found)
            if rows == "probe" and not batch_moved and node not in internal:
                batch_moved = _batch_dim_off_lead(node, batch_size, detached)
        if first:
            seen.add(node)
            moved = moved or (node not in internal and _moves_dim_zero(node, detached))
        if is_reentrant_checkpoint_node(node):
            block = (recomputed or {}).get(node)
            if block is None:  # not followed, or not recomputed: its block's graph is unknown
                reentrant = True
            else:
                block_roots, block_inputs = block
                detached.update(block_inputs)
                stack.extend((t.grad_fn, inside) for t in block_roots)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)
            if variable is not None and first:
                uses[id(variable)] = uses.get(id(variable), 0) + 1
            stack.append((nxt, inside))
    if reentrant:
        return GraphAudit(REENTRANT_CHECKPOINT, moved)
    if mixing:
        # Where some tensor may be sequence-first (a dim 0 moved, a recurrent or batch_first=False module),
        # dim 0 of a tensor with another dim of the batch's size may be a position: the layout checks decide.
        seq_first = (
            moved
            or inputs_moved
            or any(
                isinstance(u.module, nn.RNNBase) or getattr(u.module, "batch_first", True) is False
                for u in units
                if u.rule is None or u.rule.whole_call
            )
        )
        # With calls on token rows the probe of the rows pins every row's example bit by bit (rows_leak), so a
        # gather or scatter of a flattening's rows (an expert's x[token], index_add_) is left to it
        token_rows_probed = _token_row_calls(units)
        for certain, shape, what in mixing:
            if token_rows_probed and not certain and shape and shape[0] != batch_size:
                continue
            if not seq_first or (certain and batch_size not in shape[1:]):
                return GraphAudit(batch_mixing(what), moved)
    expected: dict[int, int] = {}
    skip: set[int] = set()
    owners: dict[int, str] = {}  # parameter id → the name of its unit's module ("<root>" for the model)
    for unit in units:
        reached = sum(1 for call in unit.calls if _reached(call, seen))
        for p in unit.params.values():
            owners.setdefault(id(p), unit.name or "<root>")
            if unit.rule is None and reached:
                skip.add(id(p))  # fallback units: checked by their sum against autograd instead (a fallback
                # never called whose parameters the graph uses, through another method, has no gradients)
            expected[id(p)] = expected.get(id(p), 0) + reached
    if moved:
        for unit in units:
            for call in unit.calls:
                if call.batch_dim_ambiguous and _reached(call, seen):
                    return GraphAudit(
                        _ambiguous_expansion(f"module {unit.name or '<root>'}: its output was expanded over the batch"),
                        moved,
                    )
    if isinstance(rows, Finding):
        return GraphAudit(rows, moved)
    if (
        batch_moved or (rows == "probe" and (any(places.values()) or _token_row_calls(units)))
    ) and batch_size is not None:
        leak = rows_leak(
            roots if outputs is None else outputs, units, batch_size, seq_first=_seq_first(units, inputs_moved)
        )
        if leak is not None:
            return GraphAudit(batch_mixing(leak), moved)
    outside = [
        (pid, count)
        for pid, count in uses.items()
        if pid not in skip and pid in names and count != expected.get(pid, 0)
    ]
    if outside:
        pid, count = outside[0]
        finding = Finding(
            "PARAMETER_USED_OUTSIDE",
            f"parameter {names[pid]!r} is used {count} "
            f"time(s) in the graph but its module(s) were called {expected.get(pid, 0)} "
            "time(s): it is used outside the module that owns it",
            module=owners.get(pid),
        )
        # every such parameter's unit (the engine widens them all at once: .plan.widened_refusal)
        finding.owners = tuple(dict.fromkeys(owners[p] for p, _ in outside if p in owners))  # type: ignore[attr-defined]
        return GraphAudit(finding, moved)
    return GraphAudit(None, moved)


def _reached(call: Call, seen: set) -> bool:
    leaves = flat_leaves(call.output)
    return any(isinstance(t, Tensor) and t.grad_fn is not None and t.grad_fn in seen for t in leaves)
