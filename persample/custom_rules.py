"""Closed-form rules for your own layers: :func:`register_rule`, and :func:`check_rule` to prove one.

The fast engine gives a layer with a rule its per-example gradients from the layer's
input x and output gradient δ alone, without torch.func. A rule for your own layer
``MyLayer`` is a function ``per_example(module, x, grad_output) -> {param name: g}``
where, for the batch's x ``[B, ...]`` and δ ``[B, ...]`` (the gradient of Σ_i L_i at
the layer's output), ``g[i]`` is example i's gradient of that parameter: unscaled, of
shape ``[B, *param.shape]``, and linear in δ.

The rule is used under the same assumptions as the built-in ones, checked on every call:
the module is an instance of the registered type and runs that type's own ``forward``
(a subclass with its own forward takes the exact fallback), owns exactly the declared
parameters (no nested trainable modules), has no hooks, is called with its input as first
positional argument, and ``accepts(module)`` (a predicate for settings the formula does not
cover). Where one fails, the module takes the exact torch.func fallback. On every call the rule's
(1/B) Σ_i g_i is also checked against autograd's gradient (``CUSTOM_RULE_SUM_MISMATCH`` otherwise).

:func:`check_rule` compares a rule's statistics with a float64 loop of autograd, one
example at a time; run it over random shapes (``tests/test_custom_rules.py`` does, with
hypothesis, for every built-in rule too).

>>> import torch, persample
>>> from torch import nn
>>> class Scale(nn.Module):          # y = x ∘ w, w of the feature size
...     def __init__(self, d):
...         super().__init__()
...         self.w = nn.Parameter(torch.randn(d))
...     def forward(self, x):
...         return x * self.w
>>> persample.register_rule(Scale, lambda m, x, gy: {"w": (x * gy).reshape(len(x), -1, x.shape[-1]).sum(1)},
...                         params=("w",))
>>> persample.check_rule(Scale(4), torch.randn(6, 3, 4)).rule
'Scale'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["register_rule", "unregister_rule", "check_rule", "RuleCheck"]

PerExample = Callable[[nn.Module, Tensor, Tensor], "dict[str, Tensor]"]


def register_rule(
    module_type: type,
    per_example: PerExample,
    *,
    params: tuple[str, ...] = ("weight", "bias"),
    name: str | None = None,
    accepts: Callable[[nn.Module], bool] | None = None,
    methods: tuple[str, ...] = ("forward",),
) -> None:
    """Give the fast engine a closed form for ``module_type`` (and subclasses that keep its ``methods``).

    Args:
        module_type: the ``nn.Module`` class the rule is for.
        per_example: ``per_example(module, x, grad_output)`` → ``{param name: Tensor[B, *param.shape]}``,
            example i's gradient of each trainable parameter, for the gradient of Σ_i L_i at the output
            (unscaled; linear in ``grad_output``). Parameters that do not require grad may be left out.
        params: the names of the parameters the rule covers (the module's own ``_parameters``).
        name: the rule's name in :func:`persample.explain` (default: the class name).
        accepts: an extra precondition on the module (settings the formula does not cover).
        methods: the methods that must be the registered class's own for the rule to apply.

    A later registration for the same type replaces the earlier one. The rule applies from the next call.
    """
    from .engines.fast.rules import Rule, add_rule
    from .engines.fast.pieces import DensePiece

    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(per_example):
        raise TypeError(f"per_example must be callable, got {type(per_example).__name__}")
    if not params or not all(isinstance(p, str) for p in params):
        raise ValueError(f"params must be a non-empty tuple of parameter names, got {params!r}")

    def compute(module: nn.Module, x: Tensor, gy: Tensor, layout) -> dict:
        if x.dim() == 0 or x.shape[0] != layout.size or gy.dim() == 0 or gy.shape[0] != layout.size:
            from .engines.fast.rules import LayoutError

            raise LayoutError(
                f"{type(module).__name__}: input {tuple(x.shape)} or output gradient "
                f"{tuple(gy.shape)} is not batched on dim 0 (batch of {layout.size})"
            )
        grads = per_example(module, x, gy)
        pieces = {}
        for pname in params:
            p = module._parameters.get(pname)
            if p is None or not p.requires_grad:
                continue
            g = grads.get(pname) if isinstance(grads, dict) else None
            if not isinstance(g, Tensor) or tuple(g.shape) != (layout.size, *p.shape):
                raise ValueError(
                    f"the {name or module_type.__name__} rule gave "
                    f"{None if g is None else tuple(g.shape)} for {pname!r}, expected "
                    f"{(layout.size, *p.shape)}"
                )
            pieces[pname] = DensePiece(g, layout.grad_scale)
        return pieces

    add_rule(
        Rule(
            name or module_type.__name__,
            (module_type,),
            tuple(params),
            compute,
            methods=tuple(methods),
            accepts=accepts or (lambda m: True),
            user=True,
        )
    )


def unregister_rule(module_type: type) -> None:
    """Remove the rule registered for ``module_type`` (built-in rules stay)."""
    from .engines.fast.rules import remove_rule

    remove_rule(module_type)


@dataclass(frozen=True)
class RuleCheck:
    """The result of :func:`check_rule`: the rule used and the largest relative errors against the oracle."""

    rule: str
    mean_error: float
    var_error: float
    norms_error: float


def check_rule(module: nn.Module, *inputs: Tensor, rtol: float = 1e-9, seed: int = 0) -> RuleCheck:
    """Check the fast engine's statistics for ``module`` against a float64 loop of autograd.

    ``module`` (copied and cast to float64) is run on ``inputs`` (batched on dim 0) with the loss
    L_i = ⟨r_i, module(x_i)⟩ for random r; mean, unbiased variance and per-example squared norms
    from ``grad_stats(engine="fast")`` must match the loop at ``rtol`` (relative to each field's
    largest value). Raises ``AssertionError`` naming the field otherwise, and
    :class:`~persample.NotExact` when the module does not take its rule (the fallback would hide it).
    """
    import copy

    from .api import grad_stats
    from .engines.fast.alone import without_spot_check
    from .errors import NotExact
    from .explain import explain

    model = copy.deepcopy(module).double()
    xs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        out = model(*xs)
    generator = torch.Generator().manual_seed(seed)
    r = torch.randn(out.shape, generator=generator, dtype=torch.float64)

    def loss_fn(output, target):
        return (output * target).sum()

    report = explain(model, loss_fn, xs if len(xs) > 1 else xs[0], r)
    treatment = next((m.treatment for m in report.modules if m.name == ""), "no parameters")
    if not treatment.startswith("rule: "):
        raise NotExact(
            f"{type(module).__name__} does not take a closed-form rule here ({treatment})",
            code="RULE_NOT_APPLICABLE",
            module=type(module).__name__,
        )
    with without_spot_check():  # every example is compared with the loop below: the rule's error is named there
        stats = grad_stats(model, loss_fn, xs if len(xs) > 1 else xs[0], r, engine="fast")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(len(r)):
        loss = loss_fn(model(*(x[i : i + 1] for x in xs)), r[i : i + 1])
        grads = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names], allow_unused=True)
        rows.append(
            {
                n: (g if g is not None else torch.zeros_like(dict(model.named_parameters())[n]))
                for n, g in zip(names, grads)
            }
        )
    oracle = {n: torch.stack([row[n] for row in rows]) for n in names}

    def error(field: str, got: dict | None, want: dict) -> float:
        assert got is not None  # the engine computed this field (param_sq_norms included)
        worst = 0.0
        for n in names:
            scale = want[n].abs().max().item() or 1.0
            worst = max(worst, (got[n] - want[n]).abs().max().item() / scale)
        if worst > rtol:
            raise AssertionError(
                f"{treatment}: {field} differs from the float64 oracle by {worst:.2e} relative (rtol {rtol:g})"
            )
        return worst

    return RuleCheck(
        treatment.removeprefix("rule: "),
        error("mean", stats.mean, {n: g.mean(0) for n, g in oracle.items()}),
        error("var", stats.var, {n: g.var(0) for n, g in oracle.items()}),
        error(
            "param_sq_norms", stats.param_sq_norms, {n: g.reshape(len(g), -1).pow(2).sum(1) for n, g in oracle.items()}
        ),
    )
