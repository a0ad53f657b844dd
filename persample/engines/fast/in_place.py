"""Checks that what a unit's call computed with is what the capture holds.

- :func:`modified_in_place`: no input, parameter or output view of a call was changed in place after it, and
  no fallback module changed its buffers during the forward;
- :func:`_substituted_parameter`: every parameter slot holds the parameter itself when its module is called
  (``torch.func.functional_call`` with weights derived from it puts another tensor there).
"""

from __future__ import annotations


from torch import Tensor, nn

from ...contract import Finding
from .units import Unit


def _parameter_slots(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """``(owner, name, parameter)`` of every parameter slot in ``module``'s subtree, as found before the
    forward: a call of the module computes with these very tensors unless something swapped them in."""
    return [(owner, name, p) for owner in module.modules() for name, p in owner._parameters.items() if p is not None]


def _substituted_parameter(slots: list[tuple], resharded: dict) -> str | None:
    """The name of a parameter slot that holds another tensor than it held before the forward (at a
    call of its module), or None. ``torch.func.functional_call(module, {"weight": 1.1 * W}, x)`` puts
    the derived tensor in the slot for the call: what the call's output gradient gives is the gradient
    with respect to that tensor, which a closed-form rule (or a fallback's re-run with the module's own
    parameters) would credit to W itself, dropping the chain rule through the derivation.
    ``resharded`` maps FSDP2's slots to their sharded parameter, which FSDP2's post-forward hook puts
    back before this check runs (:func:`persample._sharding.fsdp2_sharded_slots`)."""
    for owner, name, p in slots:
        held = owner._parameters.get(name)
        if held is not p and (not resharded or resharded.get((id(owner), name)) is not held):
            return name
    return None


def _substitution(unit: Unit, name: str) -> Finding:
    label = f"{unit.name or '<root>'} ({type(unit.module).__name__})"
    return Finding(
        "PARAMETER_SUBSTITUTED",
        f"module {label} was called with its parameter {name!r} replaced by "
        "another tensor (torch.func.functional_call with weights derived from its own: 1.1·W, W + ε as "
        "in SAM, a hypernetwork's output, an inner MAML step), so the gradient its call receives is not "
        "the parameter's own; the vmap and loop engines differentiate through the substitution "
        "(engine='auto' takes them)",
        module=label,
    )


def modified_in_place(units: list[Unit]) -> Finding | None:
    """Why the captured inputs or output gradients cannot be trusted, or None: a unit's input was
    modified in place after the call (``y = self.proj(x); x.mul_(2)``), or an output that is a view
    was (``y = self.proj(x); y.mul_(2)`` on a 3-D input)."""
    for unit in units:
        label = f"module {unit.name or '<root>'} ({type(unit.module).__name__})"
        if any(call.input_modified_in_place(unit.params) for call in unit.calls):
            return Finding(
                "MODIFIED_IN_PLACE",
                f"an input or a parameter of {label} was modified in place after "
                "the module was called, so what the fast engine captured is not what the module "
                "computed with (autograd's own backward would refuse it too); use an out-of-place op "
                "(x = x * 2) or another engine",
                module=label,
            )
        if any(call.changed_buffers for call in unit.calls):
            return Finding(
                "BUFFERS_CHANGED",
                f"{label} changed its buffers during the forward (spectral norm's "
                "power iteration, a running average?), so the fast engine cannot re-run its call for "
                "per-example gradients; the vmap and loop engines compute every example from the "
                "buffers as found (engine='auto' takes them)",
                module=label,
            )
        if any(call.view_modified_in_place() for call in unit.calls):
            return Finding(
                "MODIFIED_IN_PLACE",
                f"the output of {label} is a view and was modified in place after "
                "the module returned, which hides its gradient from the fast engine's hooks; use an "
                "out-of-place op (y = y * 2) or another engine",
                module=label,
            )
    return None
