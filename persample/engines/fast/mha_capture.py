"""``nn.MultiheadAttention``'s projections, seen as the module runs (read by :func:`.rules.mha_rule`).

Its in-projection and out-projection are ``linear`` calls inside ``F.multi_head_attention_forward``, where
no torch-function mode sees them (the function hands itself whole to the modes, and runs its body with
them off). While a covered module's forward runs, the capture puts a :class:`MhaInterceptor` on the mode
stack; it runs that call as torch's own code (the same code object, :func:`_recorded_forward`), with
its ``linear`` calls recorded: each call's input, weight, bias and output. The lower modes (the capture's
watchers) still see one ``multi_head_attention_forward`` call with the same arguments and result, so what
they note is unchanged. The rule then takes ∂q, ∂k, ∂v from the model's own backward, at the recorded
in-projection outputs, and the attention's output (the out-projection's input) as it was computed: no
second attention.

Only where the code is the one checked (:func:`persample._torch_compat.mha_functions`: there, for the
covered settings, the projection weights enter nothing but those ``linear`` calls), the call passes the
module's own parameters with the covered settings (:func:`covered_call`), and every tensor argument is a
plain tensor the capture's watchers do not follow (``plain``). Otherwise the call runs as it is, nothing
is recorded, and the rule recomputes the attention (and checks it against the module's output).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..._torch_compat import mha_functions

__all__ = ["MhaInterceptor", "Projections", "covered_call"]

_LINEAR = F.linear
_LOCAL = threading.local()  # .log: the linear calls of the innermost running body; .sink: where bodies report


@dataclass(eq=False)
class Projections:
    """The ``linear`` calls of one ``F.multi_head_attention_forward`` run, in order: ``(input, weight,
    bias, output)``; ``output`` is the run's first result (the attention output, sequence first)."""

    linears: list[tuple[Tensor, Tensor, Tensor | None, Tensor]]
    output: Tensor


@contextlib.contextmanager
def _thread_local(name: str, value: list) -> Iterator[None]:
    """``_LOCAL.<name>`` is ``value`` while the block runs (this thread only), then what it was."""
    outer = getattr(_LOCAL, name, None)
    setattr(_LOCAL, name, value)
    try:
        yield
    finally:
        setattr(_LOCAL, name, outer)


def _recording_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = _LINEAR(input, weight, bias)
    log = getattr(_LOCAL, "log", None)
    if log is not None:
        log.append((input, weight, bias, out))
    return out


@functools.lru_cache(maxsize=1)
def _recorded_forward() -> Callable | None:
    """``F.multi_head_attention_forward`` as torch's own code objects (its body and
    ``_in_projection_packed``'s) in a private copy of ``torch.nn.functional``'s namespace where ``linear``
    records its calls; None where :func:`mha_functions` does not vouch for the code. Nothing global changes."""
    found = mha_functions()
    if found is None:
        return None
    forward, packed, separate = found
    namespace = dict(forward.__globals__)

    def clone(fn: Any) -> Any:
        copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__ = fn.__kwdefaults__
        return copy

    body = clone(forward)

    def multi_head_attention_forward(*args: Any, **kwargs: Any) -> Any:
        log: list = []
        with _thread_local("log", log):
            result = body(*args, **kwargs)
        sink = getattr(_LOCAL, "sink", None)
        if log and sink is not None:  # the body ran here (not handed on to a lower mode)
            sink.append((result, log))
        return result

    namespace["linear"] = _recording_linear
    namespace["_in_projection_packed"] = clone(packed)
    namespace["_in_projection"] = clone(separate)
    namespace["multi_head_attention_forward"] = multi_head_attention_forward  # handed to lower modes by name
    return multi_head_attention_forward


@functools.lru_cache(maxsize=1)
def _parameter_names() -> tuple[str, ...]:
    return tuple(inspect.signature(F.multi_head_attention_forward).parameters)


def covered_call(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> bool:
    """Whether ``F.multi_head_attention_forward(*args, **kwargs)`` is ``module``'s own call with the settings
    the recorded form covers: its own in-projection (packed, or separate weights where kdim or vdim differ
    from embed_dim) and out-projection parameters, no ``bias_k``/``bias_v``, ``add_zero_attn`` or static
    keys, no dropout."""
    names = _parameter_names()
    if len(args) > len(names) or any(k not in names or k in names[: len(args)] for k in kwargs):
        return False
    a = dict(zip(names, args), **kwargs)  # the arguments passed, by name (defaults: None, False, True)
    out_proj = module.out_proj
    return (
        a.get("in_proj_weight") is module.in_proj_weight
        and a.get("q_proj_weight") is module.q_proj_weight
        and a.get("k_proj_weight") is module.k_proj_weight
        and a.get("v_proj_weight") is module.v_proj_weight
        and bool(a.get("use_separate_proj_weight", False)) is not module._qkv_same_embed_dim
        and a.get("in_proj_bias") is module.in_proj_bias
        and a.get("out_proj_weight") is out_proj.weight
        and a.get("out_proj_bias") is out_proj.bias
        and a.get("bias_k") is None
        and a.get("bias_v") is None
        and a.get("add_zero_attn") is False
        and a.get("static_k") is None
        and a.get("static_v") is None
        and (a.get("dropout_p") == 0.0 or a.get("training", True) is False)
    )


class MhaInterceptor(TorchFunctionMode):
    """On the mode stack during one call of ``module`` (a covered ``nn.MultiheadAttention``): runs its
    ``F.multi_head_attention_forward`` call recorded (see the module docstring); ``found`` holds the
    :class:`Projections` of that run, or stays None (the call ran as it is). Every other op passes."""

    def __init__(self, module: nn.MultiheadAttention, plain: Callable[[Tensor], bool]):
        super().__init__()
        self.module, self.plain = module, plain
        self.found: Projections | None = None
        self.seen = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward or self.seen:
            return func(*args, **kwargs)
        self.seen = True  # one call per module call: a second one is not the module's own
        recorded = _recorded_forward()
        operands = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        if (
            recorded is None
            or not covered_call(self.module, args, kwargs)
            or not all(type(t) in (Tensor, nn.Parameter) and self.plain(t) for t in operands)
        ):
            return func(*args, **kwargs)
        sink: list = []
        with _thread_local("sink", sink):
            result = recorded(*args, **kwargs)
        output = result[0] if isinstance(result, tuple) and result else None
        for ran, log in sink:
            if isinstance(ran, tuple) and ran and ran[0] is output and isinstance(output, Tensor):
                self.found = Projections(log, output)
        return result
