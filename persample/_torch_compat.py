"""Every private torch internal persample reads, in one place, failing closed.

persample's exactness checks read a few things torch keeps private: the hook
registries of modules and tensors, the global module hooks, functorch's tensor
wrappers, the torch-function mode stack and DDP's communication hooks. A torch
release may rename any of them. Reading one with ``getattr(..., None)`` would
turn "renamed" into "nothing there", and a closed-form rule would then be
applied to a model whose hooks change its gradients: a silently wrong number.

Each accessor here instead raises :class:`~persample.errors.NotExact` with code
``TORCH_INTERNALS_UNKNOWN`` when the layout is not the one it knows, so the fast
engine refuses and ``engine="auto"`` moves on to the per-example loop, which
needs none of them.

>>> import torch
>>> module_hooks(torch.nn.Linear(2, 2))
False
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from torch import Tensor, nn

from .contract import refusal

__all__ = [
    "module_hooks",
    "module_backward_hooks",
    "global_module_hooks",
    "global_backward_hooks",
    "tensor_gradient_hooks",
    "tensor_gradient_hook_functions",
    "post_accumulate_grad_hooks",
    "set_post_accumulate_grad_hooks",
    "is_batched_tensor",
    "is_functorch_wrapped",
    "torch_function_mode_stack",
    "ddp_comm_hooks",
    "nll_loss_reduction",
    "checkpoint_run_function",
    "set_checkpoint_run_function",
    "FSDP2Reduction",
    "fsdp2_reduction",
    "mha_functions",
    "inert_hook",
    "is_inert_hook",
]

_MODULE_FORWARD = ("_forward_hooks", "_forward_pre_hooks")
_MODULE_BACKWARD = ("_backward_hooks", "_backward_pre_hooks")
_GLOBAL_FORWARD = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called")
_GLOBAL_BACKWARD = ("_global_backward_hooks", "_global_backward_pre_hooks")


def unknown(what: str) -> Exception:
    """The refusal for a torch internal whose layout is not the one persample knows."""
    import torch

    return refusal(
        "TORCH_INTERNALS_UNKNOWN",
        f"persample cannot read {what} in torch {torch.__version__} (renamed or changed), so it cannot "
        "show that no hook changes the gradients; the per-example loop needs no such internals "
        "(engine='auto' takes it)",
    )


def _read(owner: Any, name: str, what: str, kinds: tuple[type, ...] = (dict,)) -> Any:
    try:
        value = getattr(owner, name)
    except AttributeError:
        raise unknown(what) from None
    if value is not None and not isinstance(value, kinds):
        raise unknown(what)
    return value


def module_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own (any of its four registries)."""
    try:  # the attributes read directly: this runs for every module on every call
        return bool(
            module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
        )
    except AttributeError:
        raise unknown(
            f"{type(module).__name__}'s hook registries ({', '.join(_MODULE_FORWARD + _MODULE_BACKWARD)})"
        ) from None


def module_backward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has backward hooks of its own (``register_full_backward_hook`` and pre-hooks)."""
    try:
        return bool(module._backward_hooks or module._backward_pre_hooks)
    except AttributeError:
        raise unknown(f"{type(module).__name__}'s backward hook registries ({', '.join(_MODULE_BACKWARD)})") from None


#: The attribute that marks a forward hook of persample's own as inert (:func:`inert_hook`).
_INERT = "_persample_inert_hook"


def inert_hook(fn: Any) -> Any:
    """Mark ``fn``, a forward hook of persample's own that returns None and changes no value, no gradient
    and no module (the Tracker's hook that keeps the first forward's output), as inert: the plan's
    fingerprint (:func:`structure_key`) and the rules' hook check (``rules.has_hooks``) do not count it.
    Returns ``fn``."""
    setattr(fn, _INERT, True)
    return fn


def is_inert_hook(fn: Any) -> bool:
    """Whether ``fn`` was marked by :func:`inert_hook`."""
    return getattr(fn, _INERT, False) is True


def structure_key(module: nn.Module) -> tuple:
    """What the fast engine's plan (:mod:`persample.engines.fast.plan`) fingerprints of ``module``: its
    class, training flag and instance attribute names, the identities of its children and parameters,
    each parameter's ``requires_grad`` and gradient-hook handles, the handles of its backward hook
    registries, and, for a module with parameters of its own, of its forward hook registries (handle
    ids only grow, so any change of a registry changes them). A forward hook on a module without
    parameters (a container: the Tracker hooks the model's root each step) changes nothing the plan
    holds: such a module is never a rule unit, and forward hooks change no gradient hook; nor does an
    :func:`inert_hook` of persample's own on a module with parameters (the Tracker's on a root that has
    some)."""
    try:
        params = [p for p in module._parameters.values() if p is not None]
        forward = module._forward_hooks
        return (
            type(module),
            module.training,
            tuple(module.__dict__),
            tuple([id(c) for c in module._modules.values()]),
            tuple([(id(p), p.requires_grad, tuple(p._backward_hooks or ())) for p in params]),
            (
                tuple([k for k, h in forward.items() if not is_inert_hook(h)]) if forward else (),
                tuple(module._forward_pre_hooks),
            )
            if params
            else (),
            tuple(module._backward_hooks),
            tuple(module._backward_pre_hooks),
        )
    except AttributeError:
        raise unknown(f"{type(module).__name__}'s registries (_modules, _parameters, hooks)") from None


def _module_lib():
    from torch.nn.modules import module as module_lib

    return module_lib


def global_module_hooks() -> bool:
    """Whether hooks registered for every module (``register_module_forward_hook`` and friends) exist."""
    lib = _module_lib()
    return any(_read(lib, name, f"torch.nn.modules.module.{name}") for name in _GLOBAL_FORWARD + _GLOBAL_BACKWARD)


def global_backward_hooks() -> bool:
    """Whether global module backward hooks (``register_module_full_backward_hook``) exist."""
    lib = _module_lib()
    return any(_read(lib, name, f"torch.nn.modules.module.{name}") for name in _GLOBAL_BACKWARD)


def tensor_gradient_hooks(t: Tensor) -> bool:
    """Whether tensor ``t`` has hooks on its gradient (``t.register_hook``)."""
    try:
        return bool(t._backward_hooks)
    except AttributeError:
        raise unknown("Tensor._backward_hooks") from None


def tensor_gradient_hook_functions(t: Tensor) -> list[Callable]:
    """The hooks on tensor ``t``'s gradient (``t.register_hook``), in the order autograd calls them."""
    hooks = _read(t, "_backward_hooks", "Tensor._backward_hooks")
    functions = list((hooks or {}).values())
    if not all(callable(f) for f in functions):
        raise unknown("Tensor._backward_hooks")
    return functions


def post_accumulate_grad_hooks(t: Tensor) -> dict | None:
    """The post-accumulate-grad hooks of leaf ``t`` (``register_post_accumulate_grad_hook``), or None."""
    return _read(t, "_post_accumulate_grad_hooks", "Tensor._post_accumulate_grad_hooks")


def set_post_accumulate_grad_hooks(t: Tensor, hooks: dict | None) -> None:
    """Replace ``t``'s post-accumulate-grad registry (``OrderedDict()`` to silence it for a while)."""
    post_accumulate_grad_hooks(t)  # the attribute is the one torch reads
    t._post_accumulate_grad_hooks = hooks if hooks is not None else OrderedDict()


def _functorch(name: str) -> Callable[[Tensor], bool]:
    try:
        from torch._C import _functorch

        return getattr(_functorch, name)
    except (ImportError, AttributeError):

        def missing(_: Tensor) -> bool:
            raise unknown(f"torch._C._functorch.{name}")

        return missing


is_batched_tensor: Callable[[Tensor], bool] = _functorch("is_batchedtensor")
"""Whether a tensor is a vmap-batched tensor (inside ``torch.func.vmap``)."""

is_functorch_wrapped: Callable[[Tensor], bool] = _functorch("is_functorch_wrapped_tensor")
"""Whether a tensor is wrapped by a torch.func transform (grad, vmap, jvp)."""


def torch_function_mode_stack() -> list:
    """The active torch-function modes, innermost last."""
    try:
        from torch.overrides import _get_current_function_mode_stack
    except ImportError:
        raise unknown("torch.overrides._get_current_function_mode_stack") from None
    return _get_current_function_mode_stack()


def ddp_comm_hooks(ddp: nn.Module) -> bool:
    """Whether a ``DistributedDataParallel`` model has a communication hook (``register_comm_hook``)."""
    return bool(_read(ddp, "_comm_hooks", "DistributedDataParallel._comm_hooks", kinds=(list, tuple, dict)))


def nll_loss_reduction(node: Any) -> int:
    """The reduction an ``NllLoss`` autograd node was computed with: 0 none, 1 mean, 2 sum (its saved
    ``_saved_reduction``). Raises ``TORCH_INTERNALS_UNKNOWN`` when the node does not hold it as an int."""
    value = _read(node, "_saved_reduction", f"the reduction saved on {type(node).__name__}", (int,))
    if value not in (0, 1, 2):
        raise unknown(f"the reduction saved on {type(node).__name__} ({value!r})")
    return value


def checkpoint_run_function(node: Any) -> Callable | None:
    """The function that re-entrant checkpointing's backward node (``CheckpointFunctionBackward``, which is
    its ``ctx``) runs again during the backward (``ctx.run_function``), or None where torch keeps it
    elsewhere: the caller then cannot follow the recomputation and refuses (REENTRANT_CHECKPOINT), as it
    did before it could."""
    run = getattr(node, "run_function", None)
    return run if callable(run) else None


def set_checkpoint_run_function(node: Any, run: Callable) -> None:
    """Replace what ``node`` (see :func:`checkpoint_run_function`) runs again during the backward."""
    if checkpoint_run_function(node) is None:
        raise unknown("CheckpointFunctionBackward.run_function")
    node.run_function = run


class FSDP2Reduction:
    """FSDP2's post-backward gradient reduction of one model, deferred past its backward.

    FSDP2 reduce-scatters each parameter group's unsharded gradients in the group's post-backward
    (``FSDPParamGroup.post_backward``, run inside the backward). A statistics step that writes
    Σ_i g_i as some parameters' unsharded gradients (instead of autograd's weight-gradient product)
    knows those sums only after the backward. So :meth:`defer` turns the reduction off for the
    backward (``reduce_grads = False`` on every group, what ``set_requires_gradient_sync(False)``
    does: the unsharded gradients stay where autograd put them), and :meth:`reduce` then runs
    FSDP2's own end of backward (the root's ``_root_post_backward_final_callback``: every group's
    ``post_backward``, which reduce-scatters what the unsharded parameters hold into the sharded
    ``p.grad``, with FSDP2's dtype and divide factor, then ``finalize_backward``), once the sums are
    written (:meth:`write`). :meth:`discard` drops the unsharded gradients instead (a failed step).

    Made only by :func:`fsdp2_reduction`, which checks every attribute this reads (fail closed: the
    caller keeps FSDP2's own reduction inside the backward, today's path)."""

    def __init__(self, root_state: Any, groups: list, by_param: dict[int, Any]):
        self._root = root_state
        self._groups = groups
        self._by_param = by_param  # id(unsharded parameter) → its FSDPParam
        self._saved: list[bool] | None = None

    def divide_factor(self) -> float | None:
        """What FSDP2 divides the sum of the ranks' gradients by: ``set_gradient_divide_factor``'s factor,
        else the size of the reduce-scatter group (the mean over ranks); None where groups differ."""
        factors = set()
        for g in self._groups:
            factor = g.gradient_divide_factor
            factors.add(float(factor) if factor is not None else float(g._reduce_scatter_process_group.size()))
        return factors.pop() if len(factors) == 1 else None

    def reaches_every_group(self) -> bool:
        """Whether the root's end of backward (:meth:`reduce`) reaches every group: it walks the states of
        the root's context, which FSDP2 fills in its first forward (ask after the forward)."""
        try:
            reached = {id(g) for state in self._root._state_ctx.all_states for g in state._fsdp_param_groups}
        except (AttributeError, TypeError):
            return False
        return all(id(g) in reached for g in self._groups)

    def manages(self, param: Tensor) -> bool:
        """Whether ``param`` is one of this model's unsharded FSDP2 parameters."""
        return id(param) in self._by_param

    def defer(self) -> None:
        """No reduce-scatter in the coming backward (each group's ``reduce_grads`` saved, then False)."""
        self._saved = [g.reduce_grads for g in self._groups]
        for g in self._groups:
            g.reduce_grads = False

    def _restore_flags(self) -> None:
        if self._saved is not None:
            for g, flag in zip(self._groups, self._saved):
                g.reduce_grads = flag
            self._saved = None

    def write(self, param: Tensor, grad: Tensor) -> None:
        """Set ``param``'s unsharded gradient (it has none: autograd was not asked for it)."""
        fsdp_param = self._by_param[id(param)]
        if fsdp_param.unsharded_param.grad is not None or fsdp_param.unsharded_accumulated_grad is not None:
            raise unknown("FSDP2's unsharded gradient of a parameter autograd was not asked for (it has one)")
        fsdp_param.unsharded_param.grad = grad

    def reduce(self) -> None:
        """FSDP2's own reduction of what the unsharded parameters hold now (a collective: every rank)."""
        self._restore_flags()
        self._root._root_post_backward_final_callback()

    def discard(self) -> None:
        """Drop the deferred unsharded gradients (nothing is reduced; ``p.grad`` stays as it was)."""
        self._restore_flags()
        for fsdp_param in self._by_param.values():
            fsdp_param.unsharded_param.grad = None
            fsdp_param.unsharded_accumulated_grad = None


def fsdp2_reduction(root: nn.Module, modules: list[nn.Module]) -> FSDP2Reduction | None:
    """An :class:`FSDP2Reduction` of the FSDP2 ``modules`` (the root first, unsharded by the caller),
    or None where the layout is not the one it knows or the reduction cannot be deferred exactly:
    a ``MixedPrecisionPolicy`` that casts (``param_dtype`` or ``reduce_dtype`` other than the
    parameter's: FSDP2's product in bf16 is not the sums' float32), CPU offload, gradient sync turned
    off by the user (``set_requires_gradient_sync(False)``), an unsharded gradient already held (an
    accumulation without sync), or a parameter that is not unsharded."""
    try:
        root_state = root._get_fsdp_state()  # type: ignore[operator]
        if not callable(getattr(root_state, "_root_post_backward_final_callback", None)):
            return None
        groups: list = []
        by_param: dict[int, Any] = {}
        for m in modules:
            for group in m._get_fsdp_state()._fsdp_param_groups:  # type: ignore[operator]
                if (
                    group.reduce_grads is not True
                    or not isinstance(group.fsdp_params, list)
                    or not isinstance(group.gradient_divide_factor, (float, int, type(None)))
                    or not callable(getattr(group._reduce_scatter_process_group, "size", None))
                ):
                    return None
                groups.append(group)
                for fsdp_param in group.fsdp_params:
                    param = fsdp_param._unsharded_param
                    if (
                        not isinstance(param, nn.Parameter)
                        or fsdp_param.param_dtype is not None
                        or fsdp_param.reduce_dtype is not None
                        or fsdp_param.offload_to_cpu
                        or param.grad is not None
                        or fsdp_param.unsharded_accumulated_grad is not None
                    ):
                        return None
                    by_param[id(param)] = fsdp_param
    except (AttributeError, AssertionError, TypeError):
        return None
    return FSDP2Reduction(root_state, groups, by_param)


#: Fingerprints (:func:`_source_fingerprint`) of ``F.multi_head_attention_forward``,
#: ``F._in_projection_packed`` and ``F._in_projection`` whose code persample's MultiheadAttention capture
#: was checked against (tests/test_mha_rule.py): with the covered settings, the projection weights
#: (``in_proj_weight`` or its row blocks; ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``), the
#: blocks of ``in_proj_bias`` and ``out_proj.weight`` / ``out_proj.bias`` enter only ``linear`` calls.
#: torch 2.13.
_KNOWN_MHA_CODE = frozenset({("f1fe7b58852beaff", "37b12309f520826d", "0163899bd8347f48")})


def _source_fingerprint(fn: Callable) -> str:
    """sha256 (16 hex digits) of ``fn``'s source without comments, layout and docstring (``ast.unparse``)."""
    import ast
    import hashlib
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    node = tree.body[0]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            node.body = node.body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]


_MHA_FUNCTIONS: list = []  # [the answer of mha_functions()], filled at its first call


def mha_functions() -> tuple[Callable, Callable, Callable] | None:
    """``(F.multi_head_attention_forward, F._in_projection_packed, F._in_projection)`` where their code is one of
    :data:`_KNOWN_MHA_CODE`, else None: another torch's attention code may use the projection weights
    elsewhere than in the ``linear`` calls that the fast engine's MultiheadAttention capture records
    (:mod:`persample.engines.fast.mha_capture`), so the caller keeps its recomputing path (which checks
    itself against the module's output). Computed once per process.

    >>> mha_functions() is None or callable(mha_functions()[0])
    True
    """
    if not _MHA_FUNCTIONS:
        import torch.nn.functional as F

        found = None
        try:
            functions = (
                F.multi_head_attention_forward,
                getattr(F, "_in_projection_packed"),
                getattr(F, "_in_projection"),
            )
            if tuple(_source_fingerprint(fn) for fn in functions) in _KNOWN_MHA_CODE:
                found = functions
        except (AttributeError, OSError, TypeError, SyntaxError):  # renamed, or no source to read
            found = None
        _MHA_FUNCTIONS.append(found)
    return _MHA_FUNCTIONS[0]
