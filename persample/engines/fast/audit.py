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

import torch
from torch import Tensor, nn

from ..._batch import flat_leaves, tensors_in
from ...contract import Finding
from .._autograd import is_reentrant_checkpoint_node
from .units import Call, Unit


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
    "re-entrant gradient checkpointing (use_reentrant=True) "
    "hides the checkpointed layers' inputs and output gradients from the fast engine; "
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


def _of_parameters_only(node, activations: frozenset | set = frozenset()) -> bool:
    return all(nxt is None or _is_parameter(nxt, activations) for nxt, _ in node.next_functions)


def _mixes_batch(
    node, batch_size: int | None, activations: frozenset | set = frozenset()
) -> tuple[bool, tuple, str] | None:
    """(certain, the tensor's shape, what) where the op of backward node ``node`` combines or reorders the
    rows of a tensor whose dim 0 has the batch's size along dim 0, else None. Certain for reductions, scans, sorts,
    rolls, flips and gathers over dim 0; not certain (dim 0 may be a position once some dim 0 moved)
    for slices, selections and indexing across rows, and ``a @ b`` with ``a`` a transposed activation."""
    if batch_size is None or batch_size < 2:
        return None
    name = node.name()
    base = name.rstrip("0123456789")
    try:
        if name in _FULL_REDUCTIONS or base in _ALONG_DIMS:
            if _of_parameters_only(node, activations):
                return None
            shape = _node_input_shape(node)
            if not shape or shape[0] != batch_size:
                return None
            dims = None if name in _FULL_REDUCTIONS else getattr(node, _ALONG_DIMS[base], None)
            if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0):
                return True, shape, f"{name} reduces or reorders all of a tensor of shape {shape}"
            dims = [dims] if isinstance(dims, int) else list(dims)
            if any(_signed(int(d)) % len(shape) == 0 for d in dims):
                # a gather or scatter of rows may be a reordering undone later (PackedSequence's sort)
                return base not in _ROW_INDEXING, shape, f"{name} works along dim 0 of a tensor of shape {shape}"
            return None
        if base in ("SliceBackward", "SelectBackward"):
            shape = tuple(int(s) for s in node._saved_self_sym_sizes)
            if not shape or shape[0] != batch_size or _signed(int(node._saved_dim)) % len(shape) != 0:
                return None
            if base == "SliceBackward":
                start, end, step = _signed(int(node._saved_start)), _signed(int(node._saved_end)), int(node._saved_step)
                if step == 1 and start in (0, -batch_size) and end >= batch_size:
                    return None
            return False, shape, f"{name} takes part of dim 0 of a tensor of shape {shape}"
        if base == "IndexBackward":
            shape = tuple(int(s) for s in node._saved_self_sym_sizes)
            indices = list(node._saved_indices)
            if not shape or shape[0] != batch_size or not indices or indices[0] is None:
                return None
            first = indices[0]
            if (
                first.dim() == 1
                and first.shape[0] == batch_size
                and (
                    bool(first.all())
                    if first.dtype == torch.bool
                    else bool(torch.equal(first.cpu(), torch.arange(batch_size)))
                )
            ):
                return None  # every row in place (x[arange(B), j], an all-true mask)
            return False, shape, f"{name} indexes dim 0 of a tensor of shape {shape} with rows of other examples"
        if base in ("MmBackward", "AddmmBackward"):
            self_node = node.next_functions[1 if base == "AddmmBackward" else 0][0]
            sizes = getattr(node, "_saved_self_sym_sizes", None) or getattr(node, "_saved_mat1_sym_sizes", None)
            if (
                self_node is not None
                and sizes is not None
                and int(sizes[-1]) == batch_size
                and not _is_parameter(self_node, activations)
                and _moves_dim_zero(self_node, activations)
            ):
                # a 2-D activation with B rows is batch-first (a sequence's rows are B·T)
                return True, (batch_size,), f"{name} contracts a transposed activation's dim 0 (x.T @ y) over the batch"
    except (AttributeError, IndexError, RuntimeError, TypeError, ValueError):
        return False, (), f"{name}, whose saved arguments cannot be read, works along some dim of the batch"
    return None


def _fallback_internals(units: list[Unit]) -> set:
    """Backward nodes created inside fallback calls: reachable from a call's outputs before its inputs."""
    inside: set = set()
    for unit in units:
        if unit.rule is not None:
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
    """
    with torch._C.DisableTorchFunction():  # the broadcast watcher may be on (observe): read the real tensors
        return _audit_graph(root, units, names, batch_size, outputs, inputs_moved, recomputed or {})


def _audit_graph(
    root: Tensor | list[Tensor],
    units: list[Unit],
    names: dict[int, str],
    batch_size: int | None = None,
    outputs: list | None = None,
    inputs_moved: bool = False,
    recomputed: dict | None = None,
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
            if node not in internal and (found := _mixes_batch(node, batch_size, detached)) is not None:
                mixing.append(found)
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
                if u.rule is None
            )
        )
        for certain, shape, what in mixing:
            if not seq_first or (certain and batch_size not in shape[1:]):
                return GraphAudit(batch_mixing(what), moved)
    expected: dict[int, int] = {}
    skip: set[int] = set()
    for unit in units:
        reached = sum(1 for call in unit.calls if _reached(call, seen))
        for p in unit.params.values():
            if unit.rule is None:
                skip.add(id(p))  # fallback units: checked by their sum against autograd instead
            expected[id(p)] = expected.get(id(p), 0) + reached
    if moved:
        for unit in units:
            for call in unit.calls:
                if call.batch_dim_ambiguous and _reached(call, seen):
                    return GraphAudit(
                        _ambiguous_expansion(f"module {unit.name or '<root>'}: its output was expanded over the batch"),
                        moved,
                    )
    for pid, count in uses.items():
        if pid in skip or pid not in names:
            continue
        if count != expected.get(pid, 0):
            return GraphAudit(
                Finding(
                    "PARAMETER_USED_OUTSIDE",
                    f"parameter {names[pid]!r} is used {count} "
                    f"time(s) in the graph but its module(s) were called {expected.get(pid, 0)} "
                    "time(s): it is used outside the module that owns it",
                ),
                moved,
            )
    return GraphAudit(None, moved)


def _reached(call: Call, seen: set) -> bool:
    leaves = flat_leaves(call.output)
    return any(isinstance(t, Tensor) and t.grad_fn is not None and t.grad_fn in seen for t in leaves)
