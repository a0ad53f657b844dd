"""The per-model plan: what the fast engine finds from the model's structure alone, found once and reused.

Every call of the fast engine (``grad_stats(engine="fast")``, ``Tracker.step``, ``Tracker.observe``) needs
the model's trainable parameters, its units (:func:`.units.find_units`: rules chosen per module, fallbacks
covering their subtrees), whether any hook changes the gradients (:func:`..vmap.refuse_unseen_hooks`) and
how the model is sharded (:func:`..._sharding.sharding_of`: once ``torch.distributed`` is imported, as
``torch._dynamo`` and Hugging Face import it, a walk over every module and parameter).
These depend only on the model's structure, yet finding them walks every module, every call: on a small
model they are a fifth of a call's Python work.

A :class:`Plan` keeps them, in a :class:`weakref.WeakKeyDictionary` keyed by the model (no state on the
model or its parameters). Every call re-validates it with a *fingerprint* (:func:`fingerprint`), read
from each module the plan saw, from the root down:

- the module's class, its training flag and the names in its ``__dict__`` (an instance attribute such
  as a patched ``forward`` adds one);
- the identity of every child and every parameter, each parameter's ``requires_grad`` and its gradient
  hooks' handles;
- the handles of the module's backward hook registries and, where the module has parameters of its
  own, of its forward hook registries (a hook added, removed or replaced changes them: handle ids only
  grow). A module without parameters is never a rule unit and its forward hooks change no gradient hook,
  so they change nothing the plan holds: the Tracker's own hook on the model's root each step keeps it.

The children's identities chain the walk: a module swapped anywhere changes its parent's entry. Global
module hooks are not fingerprinted: with any, there is no plan and everything is found as before. What
the fingerprint cannot vouch for is checked on every call as before: a rule's ``accepts`` reads the
module's settings (``Embedding.scale_grad_by_freq``, a BatchNorm's running statistics), so it runs again
for every rule unit; everything that depends on the call (inputs, the graph, in-place changes, random
draws) is checked by the capture and the audit on every call, as without a plan.

The plan holds its modules by weak reference (it must not keep the model alive through the dictionary's
value) and its parameters strongly (so that their ids cannot be reused while it lives).

What a call learns about the structure outlives the plan: a module whose parameter another module of it uses
(``PARAMETER_USED_OUTSIDE``) makes that module's parent one fallback unit covering its subtree
(:func:`widen`, :func:`widened_refusal`), for every later call, whatever the fingerprint (the widened modules
are held weakly, per model, apart from the plan).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import nn

from ..._model import has_gradient_hooks, trainable_parameters
from ..._sharding import sharding_of
from ..._torch_compat import global_module_hooks, structure_key
from ...errors import NotExact
from .units import Unit, find_units

__all__ = [
    "Plan",
    "Planned",
    "model_plan",
    "planned_sharding",
    "fingerprint",
    "forget",
    "checked_alone",
    "remember_alone",
    "widen",
    "widened_modules",
    "widened_refusal",
]


@dataclass(eq=False)
class Plan:
    """What the model's structure gives: see the module docstring."""

    key: tuple  # the fingerprint it was made under
    modules: list  # weak references to the modules, in ``model.modules()`` order (the root's is None)
    params: dict[str, nn.Parameter]  # the trainable parameters, in ``named_parameters()`` order
    units: list[tuple[str, int, Any, dict[str, nn.Parameter]]]  # (name, module index, rule, params)
    gradient_hooks: bool  # whether a parameter or module has a gradient hook (then refused as before)
    sharding: str | None  # :func:`..._sharding.sharding_of` (FSDP wraps change classes and parameters)
    alone: set = field(default_factory=set)  # input signatures whose spot check passed (:mod:`.alone`)

    def live_modules(self, model: nn.Module) -> list[nn.Module] | None:
        """The plan's modules (``model`` first), or None where one was garbage-collected."""
        found = [model]
        for ref in self.modules[1:]:
            module = ref()
            if module is None:
                return None
            found.append(module)
        return found

    def fresh_units(self, modules: list[nn.Module]) -> list[Unit]:
        """New :class:`Unit` objects (with no calls recorded) for one call. A rule's ``accepts`` reads the
        module's settings, which the fingerprint does not cover: it is asked again, and where it no
        longer accepts the module, None tells the caller to find the units afresh."""
        units = []
        for name, index, rule, params in self.units:
            module = modules[index]
            if rule is not None and not rule.accepts(module):
                return []
            units.append(Unit(name, module, rule, dict(params)))
        return units


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(modules: list[nn.Module]) -> tuple:
    """The structure of the tree under ``modules[0]`` as :func:`.._torch_compat.structure_key` reads it,
    module by module (see the module docstring)."""
    return tuple([structure_key(m) for m in modules])


class Planned(NamedTuple):
    """What one call of the fast engine takes from the plan (the dict and the list are the caller's)."""

    params: dict[str, nn.Parameter]
    units: list[Unit]
    gradient_hooks: bool
    sharding: str | None


def model_plan(model: nn.Module) -> Planned:
    """``(trainable parameters, fresh units, gradient hooks, sharding)`` for one call of the fast engine: from
    the plan where its fingerprint still matches, else found afresh (raising as
    :func:`.._model.trainable_parameters` and :func:`.units.find_units` do) and planned for the next
    call. The parameters' dict and the units are the caller's to change."""
    if not isinstance(model, nn.Module) or global_module_hooks():
        return _found(model)
    plan = _PLANS.get(model)
    if plan is not None:
        modules = plan.live_modules(model)
        if modules is not None and fingerprint(modules) == plan.key:
            units = plan.fresh_units(modules)
            if units or not plan.units:
                return Planned(dict(plan.params), units, plan.gradient_hooks, plan.sharding)
    found = _found(model)
    modules = list(model.modules())
    index = {id(m): i for i, m in enumerate(modules)}
    _PLANS[model] = Plan(
        key=fingerprint(modules),
        modules=[None, *(weakref.ref(m) for m in modules[1:])],
        params=dict(found.params),
        units=[(u.name, index[id(u.module)], u.rule, dict(u.params)) for u in found.units],
        gradient_hooks=found.gradient_hooks,
        sharding=found.sharding,
    )
    return found


def planned_sharding(model: nn.Module) -> str | None:
    """:func:`..._sharding.sharding_of` ``(model)``, from the model's plan where there is one and its
    fingerprint still matches (no walk of every module and parameter), else found by that walk (no plan is
    made here). Sound because every way of sharding a model changes what the fingerprint reads:
    ``fully_shard`` changes the class of the modules it shards and replaces their parameters by DTensors,
    FSDP1 wraps a module in a new one and flattens its parameters into new ``FlatParameter``s.

    >>> import torch
    >>> planned_sharding(torch.nn.Linear(2, 1)) is None
    True
    """
    plan = _PLANS.get(model) if isinstance(model, nn.Module) else None
    if plan is not None:
        try:
            modules = None if global_module_hooks() else plan.live_modules(model)
            if modules is not None and fingerprint(modules) == plan.key:
                return plan.sharding
        except NotExact:  # torch internals it cannot read: the walk needs none (the engines refuse later)
            pass
    return sharding_of(model)


def _found(model: nn.Module) -> Planned:
    params = trainable_parameters(model)
    return Planned(params, find_units(model, widened_modules(model)), has_gradient_hooks(model), sharding_of(model))


#: Per model, the modules learned to be fallback units covering their subtree (:func:`widen`), held weakly:
#: no state on the model, and a module dropped from the model is forgotten with it.
_WIDENED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def widened_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that :func:`widen` made fallback units covering their subtree."""
    found = _WIDENED.get(model) if isinstance(model, nn.Module) else None
    return list(found) if found else []


def widen(model: nn.Module, module: nn.Module) -> bool:
    """Make ``module`` (of ``model``) one fallback unit covering its subtree from the next call on, and drop
    the plan; False where it is one already.

    Where a parameter is used outside the module that owns it (``PARAMETER_USED_OUTSIDE``: its owner is
    never called, or its weight is handed to a function by the parent, as JetMoE's mixture of attention
    experts and LongCat's router are), the parent's call covers that use. Its per-example gradients then
    come from the parent's fallback (vmap of the parent's call alone, else each example alone, its outputs
    compared with the batch's rows), and their sum is checked against autograd's as every fallback's is: a
    use outside the parent too still refuses (``FALLBACK_SUM_MISMATCH``)."""
    found = _WIDENED.setdefault(model, weakref.WeakSet())
    if module in found:
        return False
    found.add(module)
    forget(model)
    return True


def checked_alone(model: nn.Module, key: tuple) -> bool:
    """Whether the spot check (:mod:`.alone`) passed for input signature ``key`` under ``model``'s current
    plan (a plan made afresh, the structure having changed, has no verdict). Call it after
    :func:`model_plan` in the same call: that is what validated the plan. No plan: False (checked every call)."""
    plan = _PLANS.get(model) if isinstance(model, nn.Module) and not global_module_hooks() else None
    return plan is not None and key in plan.alone


def remember_alone(model: nn.Module, key: tuple) -> None:
    """Record that the spot check passed for ``key`` in ``model``'s plan (nothing where there is none)."""
    plan = _PLANS.get(model) if isinstance(model, nn.Module) and not global_module_hooks() else None
    if plan is not None:
        plan.alone.add(key)


def forget(model: nn.Module) -> None:
    """Drop ``model``'s plan (tests; the next call finds everything afresh)."""
    _PLANS.pop(model, None)


def widened_refusal(model: nn.Module, finding) -> NotExact:
    """``NotExact(finding)``; where ``finding`` is a ``PARAMETER_USED_OUTSIDE``, the parent of each unit whose
    parameter is used outside it (``finding.owners``, else ``finding.module``) is widened (:func:`widen`)
    where that unit's module is neither the model's root nor a child of it, and the error's ``widened`` is
    True where one was: the same engine, run again, may be exact (``engine="auto"`` runs it again before the
    next engine; ``observe`` has it from the next step on). Where the parent would be the root, the refusal
    stands (the widenings made stay: the same refusal comes at once on later calls, with no new attempt)."""
    err = NotExact(finding)
    err.widened = False  # type: ignore[attr-defined]
    if getattr(finding, "code", None) != "PARAMETER_USED_OUTSIDE":
        return err
    for owner in getattr(finding, "owners", None) or (getattr(finding, "module", None),):
        if not owner or owner == "<root>":
            continue
        parent_name = owner.rpartition(".")[0]
        if not parent_name:  # the owner is a child of the root: the root's call is the whole model's
            continue
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:  # a name the model does not resolve (not expected): the refusal as it is
            continue
        if widen(model, parent):
            err.widened = True  # type: ignore[attr-defined]
    return err
