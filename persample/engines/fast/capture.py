"""The capture's lifecycle: :func:`capturing` puts the hooks and watchers on for one forward (and its
backward) and takes them off on exit, also on error; :class:`Capture` holds what they saw.

For each call of a unit (:mod:`.units`) the capture records the call's inputs and the autograd edges of its
outputs; the gradients of those outputs come from asking autograd for the edges (the fast engine's own
backward) or from tensor hooks on the outputs (a training loop's ``loss.backward()``; not
``register_full_backward_hook``, which breaks in-place ops). The watchers (:mod:`.watchers`) see the ops as
they run; the graph audit (:mod:`.audit`) and the in-place checks (:mod:`.in_place`) read the result.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode

from ..._batch import flat_leaves, tensors_in
from ..._model import autocast_state
from ..._sharding import fsdp2_sharded_slots, sharding_of
from ..._torch_compat import checkpoint_run_function, set_checkpoint_run_function, torch_function_mode_stack
from .._autograd import graph_leaves, is_reentrant_checkpoint_node
from ...contract import Finding, refusal
from .rules import rows_apart
from .units import (
    Call,
    Unit,
    _buffers_changed,
    _storage,
    _versioned_buffer_slots,
    _versions,
    store_grad,
    token_rows,
)
from .mha_capture import MhaInterceptor
from .watchers import _BroadcastWatcher, _DimMoveWatcher, _Expansion, _UserCodeWatcher
from .places import output_place, through_rule
from .in_place import _parameter_slots, _substituted_parameter, _substitution
from .audit import _HF_NON_REENTRANT, _ambiguous_expansion, batch_mixing


@dataclass
class Capture:
    """What :func:`capturing` saw: the broadcast watcher's verdict."""

    watcher: _BroadcastWatcher
    dim_watcher: _DimMoveWatcher | None
    user_watcher: _UserCodeWatcher
    watching: bool = False  # the broadcast watcher is entered (at the first expanded or suspect output)
    forward_ended: bool = False  # later calls (activation checkpointing recomputing in backward) are not recorded
    lost_watch: bool = False  # torch dropped a watcher's mode (see _exit_mode): what it watched is unknown
    user_watcher_exited: bool = False
    no_grad_calls: bool = False  # a unit ran with gradients off in the forward (re-entrant checkpointing's first pass)
    recomputing: int = 0  # > 0 while a followed re-entrant checkpoint recomputes its block in the backward
    #: re-entrant checkpoint nodes followed (see :meth:`follow_checkpoints`) → (the recomputed outputs, the
    #: AccumulateGrad nodes of the leaves the recomputation detached its inputs into), None until the
    #: backward recomputed them: the graph audit walks on through them
    recomputed: dict = field(default_factory=dict)
    recompute_watchers: list = field(default_factory=list)  # user-code watchers of the recomputations
    #: called with the leaves (other than the block's detached inputs) that a recomputed block's graph reaches,
    #: before the checkpoint's inner backward accumulates into them (the fast engine empties their .grad)
    on_recomputed_leaves: Callable[[list], None] | None = None
    _followed: list = field(default_factory=list)  # (node, its own run_function), put back on exit
    token_rows: set = field(default_factory=set)  # the row counts B·k of the unit calls on token rows
    token_nodes: set = field(default_factory=set)  # grad_fns of those calls' tensors (and of gathered calls')
    packed: str | None = None  # the first module called on a PackedSequence (its data interleaves the examples)

    @property
    def escape(self) -> Finding | None:
        if self.lost_watch:
            return Finding(
                "REENTRANT_CHECKPOINT",
                "part of the forward ran where the fast engine's checks cannot "
                "follow it (re-entrant gradient checkpointing, use_reentrant=True?); use "
                "checkpoint(..., use_reentrant=False), " + _HF_NON_REENTRANT,
            )
        if self.rewritten_gradient is not None:
            return self.rewritten_gradient
        if self.packed is not None:  # before the sort of the lengths that packing did, which the watcher saw
            return Finding(
                "BATCH_MIXED",
                f"{self.packed} takes a PackedSequence (pack_padded_sequence or pack_sequence), whose data "
                "holds the examples' time steps interleaved in one time-major tensor, sorted by length: the "
                "fast engine cannot split it per example (and vmap cannot pack: each example's length is a "
                "shape of its own); engine='auto' computes each example alone (the per-example loop)",
            )
        mixed = next((w.mixed for w in (self.user_watcher, *self.recompute_watchers) if w.mixed is not None), None)
        if mixed is not None:
            return batch_mixing(mixed)
        mixed = next(
            (
                what
                for w in (self.user_watcher, *self.recompute_watchers)
                for rows, what in w.token_mixed.items()
                if rows in self.token_rows
            ),
            None,
        )
        if mixed is not None:  # a mask over the flattened batch's token rows (an expert capacity?)
            return batch_mixing(f"{mixed}, whose rows are the token rows of a flattened batch")
        if self.watcher.escape is not None:
            return self.watcher.escape
        if self.raw_input_moved and self.watcher.ambiguous:
            return _ambiguous_expansion(self.watcher.ambiguous[0])
        return None

    @property
    def rewritten_gradient(self) -> Finding | None:
        """Why the backward's gradients cannot be read per example: a tensor hook registered in the
        forward rewrote one (known once the backward has run), or None."""
        rewritten = next(
            (w.rewritten for w in (self.user_watcher, *self.recompute_watchers) if w.rewritten is not None), None
        )
        if rewritten is None:
            return None
        return Finding(
            "GRADIENT_REWRITTEN",
            "a gradient hook registered in the forward (tensor.register_hook on "
            f"{rewritten}) rewrote the batch's gradient, which the fast engine cannot "
            "apply to each example; the vmap and loop engines do (engine='auto' takes them)",
        )

    def watch_loss(self, outputs: list) -> None:
        """From now on (the model's forward has returned), note ops that read an activation other than
        ``outputs`` and whose results the backward reaches (see :class:`_UserCodeWatcher`)."""
        self.user_watcher.watch_loss(outputs)

    @property
    def auxiliary_term(self) -> str | None:
        """Where the backwarded loss read an activation other than the model's outputs (known once
        the backward has run), or None."""
        return self.user_watcher.aux_term

    @property
    def random_call(self) -> str | None:
        """The first call of the model's forward that drew random numbers (seen by what the model
        calls, not by the generators' state, which other threads share), or None."""
        return self.user_watcher.random

    @property
    def raw_input_moved(self) -> bool:
        return self.dim_watcher is not None and self.dim_watcher.moved is not None

    def follow_checkpoints(self, roots: list) -> None:
        """Follow every re-entrant checkpoint (``checkpoint(..., use_reentrant=True)``) in the graph of
        ``roots`` through the backward (``observe``: the capture stays on through the user's backward).

        Such a checkpoint runs its block under ``no_grad`` in the forward (its units' calls carry no
        gradient) and, in the backward, runs the block again with gradients on (from the inputs it saved,
        with the forward's random state) and backwards its outputs. Wrapped here, that recomputation is
        recorded as the block's calls (:meth:`recomputation`): their inputs have the forward's values and
        the inner backward delivers their output gradients, which is all a rule needs. Its outputs are kept
        for the graph audit, which walks on through them (a checkpoint not followed, or not recomputed,
        stays a refusal). Call with torch functions disabled."""
        stack, seen = [t.grad_fn for t in roots if isinstance(t, Tensor) and t.grad_fn is not None], set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if is_reentrant_checkpoint_node(node) and node not in self.recomputed:
                run = checkpoint_run_function(node)
                if run is not None:
                    self.recomputed[node] = None
                    self._followed.append((node, run))
                    set_checkpoint_run_function(node, self.recomputation(node, run))
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)

    def recomputation(self, node: Any, run: Callable) -> Callable:
        """``run`` (a checkpoint's block), recorded: its unit calls are recorded, a user-code watcher sees
        its ops (hooks it registers on activations, rows it mixes), and its outputs are kept under ``node``."""

        def recompute(*args):
            watcher = _UserCodeWatcher(self.watcher.batch_size)
            self.recompute_watchers.append(watcher)
            self.recomputing += 1
            try:
                with watcher:
                    out = run(*args)
            finally:
                self.recomputing -= 1
            with torch._C.DisableTorchFunction():
                roots = [t for t in tensors_in(out) if t.grad_fn is not None]
                inputs = {get_gradient_edge(t).node for t in tensors_in(args) if t.is_leaf and t.requires_grad}
                self.recomputed[node] = (roots, inputs)
                if self.on_recomputed_leaves is not None:
                    leaves = graph_leaves(roots)[0]
                    self.on_recomputed_leaves([t for t in leaves if get_gradient_edge(t).node not in inputs])
                self.follow_checkpoints(roots)  # re-entrant checkpoints nested in the block
            return out

        return recompute

    def unfollow_checkpoints(self) -> None:
        """Give the followed checkpoints their own functions back and drop what was kept of them (the
        wrappers refer to this capture: left in place they would keep it, and the graph, alive)."""
        for node, run in self._followed:
            set_checkpoint_run_function(node, run)
        self._followed.clear()
        self.recomputed.clear()

    def watch(self) -> None:
        if not self.watching:
            self.watcher.__enter__()
            self.watching = True

    def stop_recording(self) -> None:
        """Record no more unit calls (the model's forward has returned; a checkpointed layer's
        recomputation in the backward is not a call); the watchers stay on."""
        self.forward_ended = True

    def end_model_forward(self) -> None:
        """The model's forward has returned and the caller computes the loss itself (the fast engine):
        stop watching the user's code now, unless a watcher entered later is still on (modes leave in
        the reverse order), since every op under a torch-function mode costs microseconds."""
        if not self.watching:
            self._exit_user_watcher()

    def end_forward(self) -> None:
        """Stop watching ops and recording calls (call once the forward and the losses are done).
        Modes leave innermost first: the broadcast watcher (entered during the forward), the
        user-code watcher, the dim-move watcher (entered first)."""
        self.forward_ended = True
        if self.watching:
            self.watching = False
            self.lost_watch |= not _exit_mode(self.watcher)
        self._exit_user_watcher()
        if self.dim_watcher is not None and self.dim_watcher.active is not None:
            self.dim_watcher.active = None
            self.lost_watch |= not _exit_mode(self.dim_watcher)

    def _exit_user_watcher(self) -> None:
        if not self.user_watcher_exited:
            self.user_watcher_exited = True
            self.lost_watch |= not _exit_mode(self.user_watcher)


def _exit_mode(mode: TorchFunctionMode) -> bool:
    """Leave ``mode`` if it is the innermost torch-function mode; False where torch dropped it: a mode
    entered inside a re-entrant checkpoint's forward (an ``autograd.Function``) is gone when it returns,
    and popping anyway would pop another mode."""
    stack = torch_function_mode_stack()
    if not stack or stack[-1] is not mode:
        return False
    mode.__exit__(None, None, None)
    return True


@contextlib.contextmanager
def capturing(
    units: list[Unit],
    model: nn.Module,
    batch_size: int,
    *,
    watch_dim_moves: bool = False,
    hook_outputs: bool = True,
    stop_random: bool = False,
    sharding: str | None | bool = True,
) -> Iterator[Capture]:
    """Record unit calls and output gradients within the block.

    With ``hook_outputs`` a tensor hook on every output stores the gradients of any backward pass
    (a training loop's own ``loss.backward()``); without, the caller asks autograd for the
    outputs' ``Call.edges`` itself and adds the results with :func:`add_gradient` (a hook on a
    fresh tensor costs about 12 µs, and runs Python during the backward).

    A rule unit called on an input whose dim 0 has size 1 (shared by the batch,
    such as position ids ``arange(T)[None]``), or that has no batch dim at all
    (``arange(T)``, for a rule that treats such an input as one example), gets
    its output expanded to the batch, so that its output gradient is per
    example; the rule then sees the input expanded the same way. From then on a
    ``TorchFunctionMode`` (:class:`_BroadcastWatcher`) checks that the
    expansion changes no value of the forward. An input whose dim 0 has the
    batch's size but that comes neither from the model's inputs nor from an
    activation (a constant ``arange(T)`` with T == B) is ambiguous; its output
    is watched for uses that treat dim 0 as a position.

    ``stop_random``: the forward's first call that would draw random numbers raises
    :class:`RandomCallStopped` instead (``Capture.random_call`` notes it either way).

    ``sharding``: :func:`..._sharding.sharding_of` ``(model)`` where the caller knows it (the per-model
    plan); True (the default) finds it.
    """
    watcher = _BroadcastWatcher(batch_size)
    handles = []
    active: list = []
    dim_watcher = _DimMoveWatcher(active) if watch_dim_moves else None
    input_storages: set[int] = set()  # also the user-code watcher's, which follows them through frozen ops

    def model_pre_hook(module, args, kwargs):
        if not capture.forward_ended:
            with torch._C.DisableTorchFunction():  # our own ops: not the user's code (and cheaper)
                for t in tensors_in((args, kwargs)):
                    if (storage := _storage(t)) is not None:
                        input_storages.add(storage)

    on_expansion: list = []  # (module, the expansion it was called on), innermost last
    rule_pre_hooks: list = []  # registered at the first expansion (with no dim watcher)
    fallbacks_entered: list = []  # rule-less units whose forward is running, innermost last
    fallback_pre_hooks: list = []  # registered at the first suspect output

    def fallback_pre_hook(module, args, kwargs):
        watcher.in_fallback += 1
        fallbacks_entered.append(module)

    def pre_hook(unit: Unit):
        def hook(module, args, kwargs):
            if dim_watcher is not None:
                active.append(module)
            if unit.rule is None or capture.forward_ended or not args:
                return
            entry = watcher.expanded.get(id(args[0])) if isinstance(args[0], Tensor) else None
            # A rule module computes row by row, so on an expansion it gives the expansion of its result
            # on the original: let its ops run on the expansion (the rule then sees a batched call).
            if entry is not None and (
                entry.original.dim() == args[0].dim() or unit.rule.unbatched(module, entry.original)
            ):
                watcher.paused += 1
                on_expansion.append((module, entry))

        return hook

    mha_entered: list = []  # (module, MhaInterceptor) of the MultiheadAttention calls running, innermost last

    def mha_pre_hook(module, args, kwargs):
        if not capture.forward_ended and torch.is_grad_enabled():
            mode = MhaInterceptor(module, plain)
            mode.__enter__()
            mha_entered.append((module, mode))

    def plain(t: Tensor) -> bool:
        """Not a tensor the broadcast watcher follows (an expansion, a suspect): a call on one runs as it is."""
        return id(t) not in watcher.expanded and id(t) not in watcher.suspects

    def post_hook(unit: Unit):
        def hook(module, args, kwargs, output):
            inner = None
            if mha_entered and mha_entered[-1][0] is module:
                mode = mha_entered.pop()[1]
                if _exit_mode(mode):
                    inner = mode.found
                else:  # a mode entered within the call is still on: what it watched is unknown
                    capture.lost_watch = True
            if active:
                active.pop()
            entry = None
            if on_expansion and on_expansion[-1][0] is module:
                entry = on_expansion.pop()[1]
                watcher.paused -= 1
            if fallbacks_entered and fallbacks_entered[-1] is module:
                fallbacks_entered.pop()
                watcher.in_fallback -= 1
            if capture.forward_ended and not capture.recomputing:
                return None
            if not torch.is_grad_enabled():
                # a call with gradients off carries none: its output can gain a grad_fn only as a custom
                # Function's output (re-entrant checkpointing's first pass), whose gradient is not this call's
                capture.no_grad_calls = True
                return None
            with torch._C.DisableTorchFunction():  # the watcher must not see (or redirect) our own ops
                return record(unit, args, kwargs, output, entry, inner)

        return hook

    def record(unit: Unit, args, kwargs, output, on: _Expansion | None, inner=None):
        if capture.packed is None and args and isinstance(args[0], PackedSequence):
            capture.packed = f"module {unit.name or '<root>'} ({type(unit.module).__name__})"
        substituted = _substituted_parameter(parameter_slots[id(unit)], resharded)
        if substituted is not None:  # the call computed with another tensor than the parameter a rule credits
            watcher.escape = watcher.escape or _substitution(unit, substituted)
            return None
        expanded = suspect = place = None
        rows = 1
        gathered = False
        x = args[0] if args and isinstance(args[0], Tensor) else None
        recomputing = capture.forward_ended  # record() runs after the forward only in a followed recomputation
        if on is not None:  # called on an expansion: its output is one too, or the forward must not trust it
            if not (isinstance(output, Tensor) and output.dim() > 0 and output.shape[0] == batch_size):
                watcher.escape = watcher.escape or Finding(
                    "EXPANSION_ESCAPES", f"{on.label}; module {unit.name or '<root>'} does not keep it one"
                )
                return None
            original = output[:1] if on.original.dim() == x.dim() else output[0]  # type: ignore[union-attr]  # on: x is set
        elif (
            unit.rule is not None
            and unit.rule.batchless_output
            and x is None
            and isinstance(output, Tensor)
            and output.requires_grad
            and output.dim() > 0
            and output.shape[0] != batch_size
            and not any(batch_dependent(t) for t in tensors_in((args, kwargs)))
        ):
            # made from no tensor of the batch (Blenderbot's positions from the input's shape alone): one
            # output for every example. Dim 0 of the batch's size could be positions: not expanded, left to
            # the watchers and the audit as any output
            expanded = output.unsqueeze(0).expand(batch_size, *output.shape)
            label = (
                f"module {unit.name or '<root>'}: its output of shape {tuple(output.shape)}, computed from no "
                f"tensor of the batch, has no batch dim (dim 0 is not the batch of {batch_size}), so it was "
                "expanded over the batch"
            )
        elif unit.rule is not None and isinstance(output, Tensor) and output.requires_grad and x is not None:
            shape = tuple(x.shape)
            if (
                rows_apart(unit.rule)
                and x.dim() > 1
                and (shape[0] != batch_size or x.dim() == 2)  # [B, T, d] after an MoE block: batch rows
                and output.dim() > 0
                and output.shape[0] == shape[0]
                and x.grad_fn is not None
                and capture.token_nodes
                and capture.user_watcher.place_of(x) is None  # a flattening with a place: read by it (.places)
                and _reaches(x.grad_fn, capture.token_nodes)
            ):
                gathered = True  # rows gathered from token rows (an expert Linear's x[token]): map from the probe
            elif batch_size > 1 and x.dim() > 0 and shape[0] == 1 and output.dim() > 0 and output.shape[0] == 1:
                expanded = output.expand(batch_size, *output.shape[1:])
                label = f"module {unit.name or '<root>'}: its input of shape {shape} has a batch dim of size 1"
            elif unit.rule.batchless_output and batch_size > 1 and output.dim() > 0 and output.shape[0] == 1:
                # a rule that re-runs the call (an embedding of positions made in its forward) finds its ids
                expanded = output.expand(batch_size, *output.shape[1:])
                label = f"module {unit.name or '<root>'}: its output of shape {tuple(output.shape)} has batch dim 1"
            elif unit.rule.batchless_output and output.dim() > 0 and output.shape[0] != batch_size:
                expanded = output.unsqueeze(0).expand(batch_size, *output.shape)
                label = (
                    f"module {unit.name or '<root>'}: its output of shape {tuple(output.shape)} has no batch dim "
                    f"(dim 0 is not the batch of {batch_size}), so it was expanded over the batch"
                )
            elif (
                x.dim() > 0
                and shape[0] != batch_size
                and not recomputing
                and (place := through_rule(unit.rule, unit.module, x, capture.user_watcher.place_of(x))) is not None
            ):
                pass  # a flattening or a sequence-first input of a row-wise rule: read by its place (.places)
            elif (x.dim() == 0 or shape[0] != batch_size) and unit.rule.unbatched(unit.module, x):
                expanded = output.unsqueeze(0).expand(batch_size, *output.shape)
                args = (x.unsqueeze(0), *args[1:])  # one example; the rule expands it to the batch
                label = (
                    f"module {unit.name or '<root>'}: its input of shape {shape} has no batch dim (dim 0 "
                    f"is not the batch of {batch_size}), so its output was expanded over the batch"
                )
            elif (
                batch_size > 1
                and shape
                and shape[0] == batch_size
                and x.grad_fn is None
                and not (recomputing and x.requires_grad)  # the block's input, detached by the checkpoint
                and _storage(x) not in input_storages
                and not capture.user_watcher.from_inputs(x)
            ):
                suspect = (
                    f"module {unit.name or '<root>'}: its input of shape {shape} has dim 0 of the batch's "
                    f"size {batch_size} but comes neither from the model's inputs nor from a differentiable "
                    "activation (a constant such as torch.arange(T) with T == B?)"
                )
        elif unit.rule is None and x is not None:  # a fallback on a flattened token batch (an MoE router, experts)
            rows = token_rows(x, [*tensors_in((args, kwargs)), *tensors_in(output)], batch_size, from_batch)
        # computed from parameters and constants alone (a relative-position bucket index): no dim holds the batch
        constant = expanded is not None and not any(batch_dependent(t) for t in tensors_in((args, kwargs)))
        if recomputing and (expanded is not None or suspect is not None):
            # the forward's first pass (no gradients) saw no such call, so no watcher checked its expansion
            watcher.escape = watcher.escape or Finding(
                "REENTRANT_CHECKPOINT",
                f"{label if expanded is not None else suspect}, in a block under re-entrant gradient "
                "checkpointing (use_reentrant=True), whose recomputation in the backward the fast engine's "
                "checks cannot follow for such an input; use checkpoint(..., use_reentrant=False), "
                + _HF_NON_REENTRANT,
            )
            return None
        call = Call(
            args,
            kwargs,
            output if expanded is None else expanded,
            broadcast=expanded is not None,
            autocast=autocast_state() if unit.rule is None else None,
            input_versions=_versions(args, kwargs, list(unit.params.values())),
            changed_buffers=unit.rule is None and _buffers_changed(fallback_buffers[id(unit)]),
            rows_per_example=rows,
            gathered=gathered,
            place=place,
            batched_kwargs=_batched_kwargs(unit, kwargs),
        )
        unit.calls.append(call)
        if rows > 1:
            capture.token_rows.add(batch_size * rows)
        if rows > 1 or gathered or place is not None:  # token rows: what is computed from them may be gathered
            capture.token_nodes.update(
                t.grad_fn for t in (*tensors_in((args, kwargs)), *tensors_in(output)) if t.grad_fn is not None
            )
        leaves = flat_leaves(call.output)
        for leaf_index, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor) and leaf.requires_grad:
                if hook_outputs or recomputing:  # a recomputed call's edges exist only within the backward
                    leaf.register_hook(store_grad(call.out_grads, leaf_index))
                call.edges[leaf_index] = get_gradient_edge(leaf)
                if leaf._is_view():
                    call.view_versions[leaf_index] = leaf._version
        if inner is not None and on is None and expanded is None:  # a MultiheadAttention's projections
            call.inner = inner
            out_proj_weight = getattr(getattr(unit.module, "out_proj", None), "weight", None)
            for i, (_, weight, _, projected) in enumerate(inner.linears):
                if weight is not out_proj_weight and projected.requires_grad:  # in-projections: key -1 - i
                    if hook_outputs:
                        projected.register_hook(store_grad(call.out_grads, -1 - i))
                    call.edges[-1 - i] = get_gradient_edge(projected)
        if on is not None:
            constant = on.constant and not any(batch_dependent(t) for t in tensors_in((call.args[1:], kwargs)))
            watcher.expanded[id(output)] = _Expansion(output, original, on.label, (*on.calls, call), constant)
            return None
        if place is not None:
            capture.user_watcher.set_place(output, place)
        elif x is not None and not recomputing and (kept := _output_place(unit, x, output)) is not None:
            capture.user_watcher.set_place(flat_leaves(output)[0], kept)
        if expanded is not None:
            watcher.watch_expansion(expanded, output, label, call, constant=constant)
            capture.watch()
            if dim_watcher is None and not rule_pre_hooks:  # from now on, rule modules may get expansions
                rule_pre_hooks.extend(
                    _hooked(unit.module.register_forward_pre_hook, pre_hook(unit), unit)
                    for unit in units
                    if unit.rule is not None
                )
            return expanded
        if suspect is not None:
            watcher.watch_suspect(output, suspect)
            capture.watch()
            if not fallback_pre_hooks:  # from now on, rule-less modules' own ops are theirs
                fallback_pre_hooks.extend(
                    _hooked(u.module.register_forward_pre_hook, fallback_pre_hook, u) for u in units if u.rule is None
                )
        return None

    def from_batch(x: Tensor) -> bool:
        """Whether ``x`` comes from the batch: an activation (not of parameters alone) or the inputs."""
        if x.grad_fn is not None and not all(
            nxt is None or hasattr(nxt, "variable") for nxt, _ in x.grad_fn.next_functions
        ):
            return True
        return _storage(x) in input_storages or capture.user_watcher.from_inputs(x)

    def _batched_kwargs(unit: Unit, kwargs: dict) -> tuple:
        if unit.rule is None or not unit.rule.whole_call or batch_size < 2:
            return ()
        return tuple(
            k
            for k, t in kwargs.items()
            if isinstance(t, Tensor)
            and t.dim() > 0
            and t.shape[0] == batch_size
            and (t.grad_fn is not None or capture.user_watcher.from_inputs(t))
        )

    def _output_place(unit: Unit, x: Tensor, output):
        leaves = flat_leaves(output)
        if not leaves or not isinstance(leaves[0], Tensor) or leaves[0].dim() == 0 or leaves[0].shape[0] == batch_size:
            return None
        return output_place(unit.rule, unit.module, x, capture.user_watcher.place_of(x))

    fallback_buffers = {id(u): _versioned_buffer_slots(u.module) for u in units if u.rule is None}
    parameter_slots = {id(u): _parameter_slots(u.module) for u in units}
    if sharding is True:
        sharding = sharding_of(model)
    resharded = fsdp2_sharded_slots(model) if sharding == "FSDP2" else {}
    capture = Capture(watcher, dim_watcher, _UserCodeWatcher(batch_size, stop_random))
    capture.user_watcher.input_storages = input_storages
    user_watcher = capture.user_watcher  # not the capture: the watcher would keep it alive

    def batch_dependent(t: Tensor) -> bool:
        """Whether ``t`` may carry the batch's data: an activation, an input (or a view of one), or a frozen
        result computed from one. Parameters, buffers and constants (``torch.arange(T)``) cannot."""
        return t.grad_fn is not None or _storage(t) in input_storages or user_watcher.from_inputs(t)

    watcher.batch_dependent = batch_dependent
    watcher.batch_first = lambda t: user_watcher.place_of(t) is None
    try:
        handles.append(_hooked(model.register_forward_pre_hook, model_pre_hook, None))
        for unit in units:
            if dim_watcher is not None:
                handles.append(_hooked(unit.module.register_forward_pre_hook, pre_hook(unit), unit))
            if unit.rule is not None and unit.rule.name == "multihead_attention":
                handles.append(_hooked(unit.module.register_forward_pre_hook, mha_pre_hook, unit))
            handles.append(_hooked(unit.module.register_forward_hook, post_hook(unit), unit))
        if dim_watcher is not None:
            dim_watcher.__enter__()
        capture.user_watcher.__enter__()  # inside the dim watcher, outside the broadcast watcher (end_forward)
        yield capture
    finally:
        for h in (*handles, *rule_pre_hooks, *fallback_pre_hooks):
            h.remove()
        while mha_entered:  # the forward raised within a MultiheadAttention call
            capture.lost_watch |= not _exit_mode(mha_entered.pop()[1])
        capture.unfollow_checkpoints()
        capture.end_forward()


def _reaches(node, targets: set, limit: int = 256) -> bool:
    """Whether the backward graph below ``node`` reaches one of ``targets`` within ``limit`` nodes (the
    rows of a call computed from token rows: gathered, and maybe passed through row-wise layers)."""
    stack, seen = [node], set[Any]()
    while stack and len(seen) < limit:
        current = stack.pop()
        if current is None or current in seen:
            continue
        if current in targets:
            return True
        seen.add(current)
        stack.extend(nxt for nxt, _ in current.next_functions)
    return False


def _hooked(register, hook, unit: Unit | None):
    """``register(hook, with_kwargs=True)``; a module that refuses hooks (a TorchScript module, a
    wrapper that overrides ``register_forward_hook``) is a refusal, never a crash: without the hook
    the capture cannot see the calls."""
    try:
        return register(hook, with_kwargs=True)
    except Exception as err:
        where = "the model" if unit is None else f"module {unit.name or '<root>'} ({type(unit.module).__name__})"
        raise refusal(
            "CAPTURE_HOOK_REFUSED",
            f"the fast engine cannot hook {where}: {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}",
        ) from err
