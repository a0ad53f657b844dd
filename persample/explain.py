"""``persample.explain``: what each engine makes of a model and a batch, before you trust or wait.

One call answers the questions asked before a long run:

- per module with parameters: its closed-form rule, the exact fallback it takes
  (and why no rule applies), or the refusal;
- every refusal of the model as configured (all of them, not the first): train-mode
  BatchNorm, random layers under ``randomness="error"``, gradient hooks;
- per engine (fast, vmap, loop): exact, or refused with its code
  (:mod:`persample.contract`) and the reason, found by running it on the batch;
- the engine each entry point takes (``engine="auto"`` is the first exact one of
  fast, vmap, loop for ``grad_stats`` and ``per_sample_grads``; the
  fast engine alone for ``Tracker.observe``);
- the expected peak extra memory and relative cost of each engine.

The engines' verdicts come from running them, so ``explain`` costs about one
forward + backward per engine tried (the loop is not run: it is exact for any model
whose per-example gradients are defined, at B passes).

>>> import torch, persample
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> report = persample.explain(model, nn.functional.cross_entropy, torch.randn(6, 4), torch.randint(0, 2, (6,)))
>>> report.entry_points["grad_stats"], report.modules[0].treatment
('fast', 'rule: linear')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor, nn

from ._batch import as_batch
from ._model import (
    hooked_parameters,
    preserved_state,
    require_module,
    restore_as_found,
    trainable_parameters,
)
from .contract import PRECONDITIONS
from .errors import PersampleError, UnsupportedModelError

__all__ = ["explain", "Explanation", "ModuleTreatment", "EngineVerdict", "Refusal"]

LossFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Refusal:
    """One refusal: its ``code`` (:data:`persample.contract.PRECONDITIONS`), the module, the message, the fix."""

    code: str | None
    module: str | None
    message: str
    fix: str | None
    error: str = "NotExact"  # the class raised: only NotExact lets engine="auto" move on

    @classmethod
    def of(cls, err: PersampleError) -> "Refusal":
        return cls(err.code, err.module, Exception.__str__(err), err.fix, type(err).__name__)

    @classmethod
    def declared(cls, code: str, module: str | None, message: str | None = None) -> "Refusal":
        pre = PRECONDITIONS[code]
        return cls(code, module, message or pre.statement, pre.fix, pre.error.__name__)


@dataclass(frozen=True)
class ModuleTreatment:
    """How the fast engine treats one module that owns trainable parameters."""

    name: str
    type: str
    parameters: int
    treatment: str  # "rule: linear", "closed form: lstm", "fallback (torch.func): <why no rule>"


@dataclass(frozen=True)
class EngineVerdict:
    """Whether an engine is exact on this model and batch (``refusal`` says why not)."""

    engine: str
    exact: bool
    refusal: Refusal | None = None
    peak_extra_bytes: int = 0
    cost: str = ""


@dataclass(frozen=True)
class Explanation:
    """The answer of :func:`explain`; ``str()`` prints it as tables, :meth:`to_dict` gives it as data."""

    batch_size: int
    parameters: int
    modules: tuple[ModuleTreatment, ...]
    refusals: tuple[Refusal, ...]
    engines: Mapping[str, EngineVerdict]
    entry_points: Mapping[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"persample.explain: B = {self.batch_size}, {self.parameters:,} trainable parameters",
            "",
            "| module | type | parameters | treatment |",
            "|---|---|---:|---|",
        ]
        lines += [f"| {m.name or '<root>'} | {m.type} | {m.parameters:,} | {m.treatment} |" for m in self.modules]
        lines += ["", "| engine | exact | peak extra memory | cost | refusal |", "|---|---|---:|---|---|"]
        for v in self.engines.values():
            why = f"`{v.refusal.code}`: {v.refusal.message}" if v.refusal else ""
            lines.append(
                f"| {v.engine} | {'yes' if v.exact else 'no'} | {_bytes(v.peak_extra_bytes)} | {v.cost} | {why} |"
            )
        lines += ["", "| entry point (engine='auto') | engine |", "|---|---|"]
        lines += [f"| {k} | {v or 'refused'} |" for k, v in self.entry_points.items()]
        if self.refusals:
            lines += ["", "Refusals of the model as configured (every one found):"]
            lines += [f"- `{r.code}` {r.module or ''}: {r.message} Fix: {r.fix}" for r in self.refusals]
        return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def explain(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any = None,
    *,
    randomness: str = "error",
    chunk_size: int | None = None,
) -> Explanation:
    """What each engine makes of ``model`` on this batch, and which one each entry point takes.

    Arguments as for :func:`persample.grad_stats` (``loss_fn`` is called on a batch of ONE
    example; per-example gradients are unscaled). Runs the fast and vmap engines once each
    on the batch (the model is left as found); the loop engine is exact wherever the model's
    per-example gradients are defined, so it is not run.

    Returns an :class:`Explanation`: ``print(report)`` shows tables, ``report.to_dict()`` the data.
    """
    from .api import _CHAINS, _GRADS_CHAINS, _widening
    from .engines.fast import fast_grad_stats
    from .engines.fast.plan import widened_modules
    from .engines.fast.units import find_units
    from .engines.vmap import auto_chunk_size, vmap_grad_stats

    require_module(model)
    batch = as_batch(inputs, targets)
    params = trainable_parameters(model)
    count = sum(p.numel() for p in params.values())
    element = max((p.element_size() for p in params.values()), default=4)
    setup = tuple(_setup_refusals(model, randomness))
    verdicts: dict[str, EngineVerdict] = {}
    chunk = chunk_size or auto_chunk_size(count, batch.size)

    def run(name: str, fn: Callable[[], Any]) -> EngineVerdict:
        memory, cost = _estimate(name, count, element, batch.size, chunk)
        refused = next(
            (
                r
                for r in setup
                if r.code is None
                or (name in PRECONDITIONS[r.code].pipelines and (name, r.code) not in _DECIDED_BY_RUNNING)
            ),
            None,
        )
        if refused is not None:
            return EngineVerdict(name, False, refused, memory, cost)
        try:
            with preserved_state(model):
                fn()
        except PersampleError as err:
            return EngineVerdict(name, False, Refusal.of(err), memory, cost)
        return EngineVerdict(name, True, None, memory, cost)

    def fast() -> None:  # as auto runs it: again, from the model as found, after it widened a fallback unit
        with preserved_state(model) as found:
            _widening(
                lambda _: fast_grad_stats(model, loss_fn, batch, randomness=randomness),
                reset=lambda: restore_as_found(found),
            )

    verdicts["fast"] = run("fast", fast)
    verdicts["vmap"] = run(
        "vmap", lambda: vmap_grad_stats(model, loss_fn, batch, randomness=randomness, chunk_size=chunk_size)
    )
    verdicts["loop"] = run("loop", lambda: None)

    def first_exact(chain: tuple) -> str | None:
        """The engine ``auto`` takes: the first exact one; a refusal other than NotExact ends the chain."""
        for name in chain:
            verdict = verdicts[name]
            if verdict.exact:
                return name
            if verdict.refusal is not None and verdict.refusal.error != "NotExact":
                return None
        return None

    modules = tuple(_treatment(unit) for unit in find_units(model, widened_modules(model)))  # (as the run left them)
    entry_points = {
        "grad_stats": first_exact(_CHAINS["auto"]),
        "per_sample_grads": first_exact(_GRADS_CHAINS["auto"]),
        "Tracker.observe": first_exact(("fast",)),
    }
    return Explanation(batch.size, count, modules, setup, verdicts, entry_points)


#: (engine, code) pairs that the setup refusal does not decide: the engine, run, applies the precondition where
#: it can (the fast engine hands each example's gradient to a parameter's hooks where its rule forms them)
_DECIDED_BY_RUNNING = {("fast", "PARAMETER_GRADIENT_HOOK")}


def _setup_refusals(model: nn.Module, randomness: str) -> list[Refusal]:
    """Every refusal of the model as configured, found without running it (all, not the first)."""
    from ._model import backward_hooked_module, check_supported, unsupported_modules

    found = [Refusal.of(err) for err in unsupported_modules(model, randomness)]
    try:
        check_supported(model, randomness)  # also what is not a module's (sharding, DDP wrappers)
    except UnsupportedModelError as err:
        if not any(r.code == err.code and r.module == err.module for r in found):
            found.append(Refusal.of(err))
    found += [
        Refusal.declared("PARAMETER_GRADIENT_HOOK", name, f"parameter {name!r} has a gradient hook")
        for name in hooked_parameters(model)
    ]
    owner = backward_hooked_module(model)
    if owner is not None:
        found.append(Refusal.declared("MODULE_BACKWARD_HOOK", owner, f"{owner} has a backward hook"))
    return found


def _treatment(unit) -> ModuleTreatment:
    from .engines.fast.recurrent import recurrent_mode
    from .engines.fast.rules import _rule_for_type, has_hooks

    count = sum(p.numel() for p in unit.params.values())
    if unit.rule is not None:
        how = f"rule: {unit.rule.name}"
    elif (mode := recurrent_mode(unit)) is not None:
        how = f"closed form: {mode} (checked against autograd)"
    else:
        rule, own_methods = _rule_for_type(type(unit.module))  # type: ignore[arg-type]  # classes are hashable
        if rule is None:
            why = "no rule for this type"
        elif not own_methods:
            why = f"a {rule.name} subclass with its own forward"
        elif has_hooks(unit.module):
            why = "forward or backward hooks"
        else:
            why = f"outside the {rule.name} rule's assumptions (nested or extra parameters, options)"
        how = f"fallback (torch.func, checked against autograd): {why}"
    return ModuleTreatment(unit.name, type(unit.module).__name__, count, how)


def _estimate(engine: str, params: int, element: int, batch: int, chunk: int) -> tuple[int, str]:
    """(peak extra bytes beyond a plain step, relative cost in words) of one statistics call."""
    if engine == "fast":
        return 3 * params * element, "about one forward + backward, plus per-layer reductions"
    if engine == "vmap":
        return (min(chunk, batch) + 3) * params * element, "one vmapped forward + backward per chunk of examples"
    return 4 * params * element, f"{batch} forward + backward passes (one per example)"
