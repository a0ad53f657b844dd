"""The methods under comparison, and how their outputs are checked against persample's.

Each method is a function ``prepare(problem) -> Prepared``. Preparing (copying
the model, wrapping it, building functions) is not timed. ``Prepared.step()``
is one full training step's worth of work, forward pass included, and is what
gets timed; it returns the method's raw output. ``Prepared.convert(raw)``
(untimed) turns that output into persample's convention, a dict with some of:

- ``"grads"``: ``{name: Tensor[B, *shape]}``, unscaled per-example gradients g_i;
- ``"mean"``: ``{name: Tensor[*shape]}``, ḡ = (1/B) Σ g_i (autograd's gradient of the mean loss);
- ``"var"``: ``{name: Tensor[*shape]}``, unbiased per-element variance, 1/(B−1) Σ (g_i − ḡ)²;
- ``"sq_norms"``: ``{name: Tensor[B]}``, per-parameter squared norms ‖g_i[name]‖².

Peer scaling conventions, verified numerically against persample (see
``benchmarks/README.md``), with a mean-reduced loss over B examples:

- BackPACK ``BatchGrad``: g_i / B, so multiply by B.
- BackPACK ``BatchL2Grad``: ‖g_i / B‖², so multiply by B².
- BackPACK ``Variance``: (1/B) Σ (g_i/B − ḡ/B)², the biased variance of the
  1/B-scaled gradients, so multiply by B³ / (B − 1).
- Opacus ``grad_sample`` with ``loss_reduction="mean"``: g_i already (Opacus
  multiplies the backpropagated signal by B), so no conversion.

Every method copies the problem's model, so all start from the same weights
and none sees another's hooks.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

import persample
from persample.api import ENGINES

from cases import Problem

__all__ = [
    "Method",
    "Prepared",
    "Unsupported",
    "WrongResult",
    "all_methods",
    "select_methods",
    "reference_quantities",
    "max_rel_err",
]

Quantities = dict[str, dict[str, Tensor]]


class Unsupported(Exception):
    """The method cannot compute what is asked for on this model."""


class WrongResult(Exception):
    """The method's output cannot be compared (missing parameters, wrong shapes)."""


@dataclass
class Prepared:
    """A method made ready for one problem."""

    step: Callable[[], Any]
    convert: Callable[[Any], Quantities]
    release: Callable[[], None] = lambda: None
    notes: str = ""


@dataclass(frozen=True)
class Method:
    """A named way of computing per-example gradients or their statistics."""

    name: str
    prepare: Callable[[Problem], Prepared]
    requires: tuple[str, ...] = field(default=())

    def missing_requirements(self) -> list[str]:
        """Importable modules this method needs that are not installed."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


# ------------------------------------------------------------------ helpers
def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _clear_grads(model: nn.Module, *extra_fields: str) -> None:
    """Drop ``p.grad`` and any per-example fields a peer attached to the parameters."""
    for p in model.parameters():
        p.grad = None
        for name in extra_fields:
            if hasattr(p, name):
                delattr(p, name)


def _owner_types(model: nn.Module, names: list[str]) -> list[str]:
    """The class names of the modules that own the parameters ``names``."""
    modules = dict(model.named_modules())
    return sorted({type(modules[n.rpartition(".")[0]]).__name__ for n in names})


def _collect(model: nn.Module, field_name: str, peer: str) -> dict[str, Tensor]:
    """``{name: getattr(p, field_name)}``; raises :class:`Unsupported` if a parameter has none."""
    params = _trainable(model)
    out = {n: getattr(p, field_name, None) for n, p in params.items()}
    missing = [n for n, v in out.items() if v is None]
    if missing:
        raise Unsupported(
            f"{peer} computed no {field_name} for {len(missing)} of {len(out)} parameters "
            f"(modules {', '.join(_owner_types(model, missing))}), e.g. {missing[0]}"
        )
    return out


# ------------------------------------------------------------------ baselines
def plain(problem: Problem) -> Prepared:
    """The floor: zero grads, forward, mean loss, backward. Checked by its mean gradient."""
    model = copy.deepcopy(problem.model)

    def step():
        _clear_grads(model)
        problem.mean_loss(model).backward()
        return {n: p.grad for n, p in _trainable(model).items()}

    quantity = "mean" if problem.example_weights is None else "weighted_sum"  # (Σ_i w_i g_i: cases.Problem)
    return Prepared(step, lambda raw: {quantity: raw}, lambda: _clear_grads(model))


def loop(problem: Problem) -> Prepared:
    """One example at a time: B forward/backward passes with ``torch.autograd.grad``, then stack."""
    model = copy.deepcopy(problem.model)
    params = _trainable(model)
    y = problem.targets

    def step():
        rows = [
            torch.autograd.grad(
                problem.loss_fn(problem.forward(model, problem.rows(i, i + 1)), y[i : i + 1]), list(params.values())
            )
            for i in range(problem.batch_size)
        ]
        return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(params)}

    return Prepared(step, lambda raw: {"grads": raw})


def torch_func(problem: Problem) -> Prepared:
    """Hand-written ``vmap(grad(functional_call))`` over the batch, no chunking."""
    from torch.func import functional_call, grad, vmap

    model = copy.deepcopy(problem.model)
    buffers = dict(model.named_buffers())

    def example_loss(params, x, y):
        if isinstance(x, dict):  # keyword inputs
            out = functional_call(model, (params, buffers), (), {k: v.unsqueeze(0) for k, v in x.items()})
        else:
            out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return problem.loss_fn(out, y.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def step():
        params = {n: p.detach() for n, p in _trainable(model).items()}
        return per_example(params, problem.inputs, problem.targets)

    return Prepared(step, lambda raw: {"grads": raw})


def floor_hooks(var: bool) -> Callable[[Problem], Prepared]:
    """The floor for Linear-only models: a hand-written hooks pass with none of persample's checks.

    Forward hooks keep each Linear's input a, tensor hooks its output
    gradient b; one ``autograd.grad`` of the mean of the per-example
    cross-entropies gives ḡ; then ‖g_i‖² = ‖a_i‖²‖b_i‖² (Goodfellow) and
    Σ_i g_i∘g_i = (b∘b)ᵀ(a∘a). It assumes what persample verifies (no other
    parametrised module, no reuse, cross-entropy, 2-D inputs), so it is the
    least any hook-based method can cost, not a usable method.
    """

    def prepare(problem: Problem) -> Prepared:
        model = copy.deepcopy(problem.model)
        params = _trainable(model)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        owned = {f"{n}.{k}" for n, m in linears.items() for k, _ in m.named_parameters()}
        if owned != set(params) or not isinstance(problem.inputs, Tensor) or problem.inputs.dim() != 2:
            raise Unsupported("the hand-written floor covers only models of Linear layers on 2-D inputs")
        batch = problem.batch_size

        def step():
            acts, grads = {}, {}

            def keep(name):
                def hook(module, inputs, output):
                    acts[name] = inputs[0].detach()
                    output.register_hook(lambda g: grads.__setitem__(name, g))

                return hook

            handles = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
            try:
                losses = torch.nn.functional.cross_entropy(model(problem.inputs), problem.targets, reduction="none")
                mean = dict(zip(params, torch.autograd.grad(losses.mean(), list(params.values()))))
            finally:
                for h in handles:
                    h.remove()
            sq_norms, m2 = {}, {}
            for name in linears:
                a2, b2 = acts[name].square(), grads[name].square().mul_(batch**2)
                b_sq = b2.sum(1)
                sq_norms[f"{name}.weight"], sq_norms[f"{name}.bias"] = a2.sum(1) * b_sq, b_sq
                if var:
                    m2[f"{name}.weight"] = (b2.t() @ a2).addcmul_(
                        mean[f"{name}.weight"], mean[f"{name}.weight"], value=-batch
                    )
                    m2[f"{name}.bias"] = b2.sum(0).addcmul_(mean[f"{name}.bias"], mean[f"{name}.bias"], value=-batch)
            return mean, sq_norms, m2

        def convert(raw):
            mean, sq_norms, m2 = raw
            out = {"mean": mean, "sq_norms": sq_norms}
            if var:
                out["var"] = {n: v / (batch - 1) for n, v in m2.items()}
            return out

        return Prepared(step, convert)

    return prepare


# ------------------------------------------------------------------ persample
def persample_grads(problem: Problem) -> Prepared:
    """``persample.per_sample_grads``: materialised per-example gradients."""
    model = copy.deepcopy(problem.model)

    def step():
        return persample.per_sample_grads(model, problem.loss_fn, problem.inputs, problem.targets)

    return Prepared(step, lambda raw: {"grads": raw})


def persample_stats(engine: str, var: bool) -> Callable[[Problem], Prepared]:
    """``persample.grad_stats(..., engine=engine, var=var)``: statistics only."""

    def prepare(problem: Problem) -> Prepared:
        model = copy.deepcopy(problem.model)

        def step():
            return persample.grad_stats(model, problem.loss_fn, problem.inputs, problem.targets, engine=engine, var=var)

        return Prepared(step, lambda stats: _stats_quantities(stats, var))

    return prepare


def _stats_quantities(stats: persample.GradStats, var: bool) -> Quantities:
    """A GradStats as the quantities to check (the variance only when it was asked for)."""
    out = {"mean": stats.mean, "sq_norms": stats.param_sq_norms}
    if var:
        out["var"] = stats.var
    elif stats.m2 is not None:
        raise WrongResult("var=False still computed the variance")
    return out


def persample_observe(var: bool) -> Callable[[Problem], Prepared]:
    """Drop-in mode: the training loop's own forward + ``loss.backward()`` inside
    ``Tracker.observe``, which adds the statistics (and checks them against ``p.grad``)."""

    def prepare(problem: Problem) -> Prepared:
        model = copy.deepcopy(problem.model)
        tracker = persample.Tracker(model, problem.loss_fn, var=var)

        def step():
            _clear_grads(model)
            with tracker.observe(problem.targets) as observed:
                problem.mean_loss(model).backward()
            return observed.stats

        return Prepared(step, lambda stats: _stats_quantities(stats, var), lambda: _clear_grads(model))

    return prepare


def persample_step(var: bool) -> Callable[[Problem], Prepared]:
    """Drop-in mode: ``Tracker.step(x, y)`` in place of ``loss.backward()``, statistics on every step;
    ``p.grad`` as that backward leaves it."""

    def prepare(problem: Problem) -> Prepared:
        model = copy.deepcopy(problem.model)
        tracker = persample.Tracker(model, problem.loss_fn, var=var)

        def step():
            _clear_grads(model)
            return tracker.step(problem.inputs, problem.targets)

        return Prepared(step, lambda stats: _stats_quantities(stats, var), lambda: _clear_grads(model))

    return prepare


# ------------------------------------------------------------------ Opacus
def opacus(force_functorch: bool) -> Callable[[Problem], Prepared]:
    """Opacus ``GradSampleModule`` (``loss_reduction="mean"``): hooks, or functorch for every layer.

    The model first goes through ``ModuleValidator.fix``, the standard Opacus
    preparation (it swaps ``nn.LSTM`` for the drop-in ``DPLSTM``, with the same
    weights and parameter names).
    """

    def prepare(problem: Problem) -> Prepared:
        from opacus import GradSampleModule
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(copy.deepcopy(problem.model))
        swapped = sorted(
            {type(m).__name__ for m in model.modules()} - {type(m).__name__ for m in problem.model.modules()}
        )
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=force_functorch)

        def step():
            wrapped.zero_grad(set_to_none=True)
            problem.loss_fn(problem.forward(wrapped), problem.targets).backward()
            return (_collect(model, "grad_sample", "Opacus"), {n: p.grad for n, p in _trainable(model).items()})

        def convert(raw):
            grad_sample, mean = raw
            return {"grads": grad_sample, "mean": mean}

        notes = f"model fixed by ModuleValidator ({', '.join(swapped)})" if swapped else ""
        return Prepared(step, convert, lambda: wrapped.zero_grad(set_to_none=True), notes)

    return prepare


# ------------------------------------------------------------------ BackPACK
def _backpack_method(
    extension_name: str, field_name: str, to_persample: Callable[[Tensor, int], Tensor], quantity: str
):
    def prepare(problem: Problem) -> Prepared:
        import backpack
        from backpack import extensions

        model = backpack.extend(copy.deepcopy(problem.model))
        extension = getattr(extensions, extension_name)
        B = problem.batch_size

        def step():
            _clear_grads(model, field_name)
            loss = problem.mean_loss(model)
            with backpack.backpack(extension()):
                loss.backward()
            return (_collect(model, field_name, "BackPACK"), {n: p.grad for n, p in _trainable(model).items()})

        def convert(raw):
            values, mean = raw
            return {quantity: {n: to_persample(v, B) for n, v in values.items()}, "mean": mean}

        return Prepared(step, convert, lambda: _clear_grads(model, field_name))

    return prepare


backpack_batchgrad = _backpack_method("BatchGrad", "grad_batch", lambda g, B: g * B, "grads")
backpack_variance = _backpack_method("Variance", "variance", lambda v, B: v * (B**3 / (B - 1)), "var")
backpack_batchl2 = _backpack_method("BatchL2Grad", "batch_l2", lambda s, B: s * B**2, "sq_norms")


# ------------------------------------------------------------------ registry
def persample_methods() -> list[Method]:
    """One stats method per engine in ``persample.api.ENGINES`` (with and without variance), the
    drop-in ``Tracker.observe`` and ``Tracker.step`` (likewise), plus grads."""
    out = [Method("persample-grads", persample_grads)]
    for engine in ENGINES:
        if engine == "auto":
            continue
        out.append(Method(f"persample-stats-{engine}", persample_stats(engine, var=True)))
        out.append(Method(f"persample-stats-{engine}-novar", persample_stats(engine, var=False)))
    out.append(Method("persample-observe", persample_observe(var=True)))
    out.append(Method("persample-observe-novar", persample_observe(var=False)))
    out.append(Method("persample-step", persample_step(var=True)))
    out.append(Method("persample-step-novar", persample_step(var=False)))
    return out


def all_methods() -> list[Method]:
    """Every method, ``plain`` first."""
    return [
        Method("plain", plain),
        Method("loop", loop),
        Method("torch.func", torch_func),
        Method("floor-hooks", floor_hooks(var=True)),
        Method("floor-hooks-novar", floor_hooks(var=False)),
        *persample_methods(),
        Method("opacus-hooks", opacus(force_functorch=False), requires=("opacus",)),
        Method("opacus-functorch", opacus(force_functorch=True), requires=("opacus",)),
        Method("backpack-batchgrad", backpack_batchgrad, requires=("backpack",)),
        Method("backpack-variance", backpack_variance, requires=("backpack",)),
        Method("backpack-batchl2", backpack_batchl2, requires=("backpack",)),
    ]


def select_methods(methods: list[Method], patterns: list[str] | None) -> list[Method]:
    """``plain`` (always: it is the denominator of every ratio) and the methods whose name contains a pattern."""
    if not patterns:
        return list(methods)
    return [m for m in methods if m.name == "plain" or any(p in m.name for p in patterns)]


# ------------------------------------------------------------------ checking
def reference_quantities(grads: dict[str, Tensor], weights: Tensor | None = None) -> Quantities:
    """Every quantity a method may report, from reference per-example gradients (and the batch loss's
    weights w_i, where they are not 1/B: then ``weighted_sum`` is Σ_i w_i g_i)."""
    quantities = {
        "grads": grads,
        "mean": {n: g.mean(0) for n, g in grads.items()},
        "var": {n: g.var(0) for n, g in grads.items()},
        "sq_norms": {n: g.flatten(1).pow(2).sum(1) for n, g in grads.items()},
    }
    if weights is not None:
        quantities["weighted_sum"] = {n: torch.tensordot(weights.to(g), g, dims=1) for n, g in grads.items()}
    return quantities


def max_rel_err(outputs: Quantities, reference: Quantities) -> tuple[float | None, str, list[str]]:
    """The largest relative error over the quantities a method reported, where it is worst, and mismatches.

    For each quantity, the error is max |a − b| / max |b|, both maxima taken
    over every element of every parameter that has the expected shape.
    Missing or unexpected parameters and wrong shapes are listed as
    mismatches (and left out of the error, which is None if nothing compared).
    """
    worst, where, mismatches = None, "", []
    for quantity, values in outputs.items():
        expected = reference[quantity]
        for name in sorted(set(values) ^ set(expected)):
            mismatches.append(f"{quantity}[{name}] is {'missing' if name in expected else 'unexpected'}")
        scale, err, err_name = 0.0, 0.0, ""
        for name in expected.keys() & values.keys():
            a, b = values[name], expected[name]
            if a.shape != b.shape:
                mismatches.append(f"{quantity}[{name}] has shape {tuple(a.shape)}, expected {tuple(b.shape)}")
                continue
            scale = max(scale, b.double().abs().max().item())
            e = (a.double() - b.double()).abs().max().item()
            e = math.inf if math.isnan(e) else e
            if e > err or not err_name:
                err, err_name = e, name
        if not err_name:
            continue
        rel = err / scale if scale > 0 else err
        if worst is None or rel > worst:
            worst, where = rel, f"{quantity}[{err_name}]"
    return worst, where, mismatches
