"""Model inspection and the "leave the model as it was found" guard."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode

from ._sharding import refuse_wrapped
from .errors import UnsupportedModelError
from ._torch_compat import global_backward_hooks, module_backward_hooks, tensor_gradient_hooks

__all__ = [
    "trainable_parameters",
    "check_supported",
    "preserved_state",
    "translate_vmap_error",
    "module_label",
    "rng_snapshot",
    "rng_advanced",
    "restore_rng",
    "cuda_devices",
    "first_random_module",
    "randomness_error",
    "hooked_parameters",
    "backward_hooked_module",
    "has_gradient_hooks",
    "autocast_state",
    "autocast_as",
    "buffer_slots",
    "buffer_state",
    "restore_buffer_state",
    "random_call",
    "RandomCalls",
    "RandomCallStop",
]

RANDOMNESS_CHOICES = ("error", "different", "same")


def require_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")


def check_clip_norm(clip_norm) -> None:
    if clip_norm is not None and not (isinstance(clip_norm, (int, float)) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive number or None, got {clip_norm!r}")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``named_parameters()`` restricted to ``requires_grad``; raises if there are none."""
    require_module(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); "
            "there are no gradients to compute"
        )
    return params


#: Module types that may draw random numbers in training mode (see :func:`dropout_probability`).
_DROPPING = (_DropoutNd, nn.AlphaDropout, nn.RNNBase)


def dropout_probability(module: nn.Module) -> float:
    """The probability with which ``module`` drops values in training mode (0 for non-random modules)."""
    if not module.training or not isinstance(module, _DROPPING):
        return 0.0
    if isinstance(module, (_DropoutNd, nn.AlphaDropout)):
        return module.p
    if isinstance(module, nn.RNNBase) and module.num_layers > 1:
        return module.dropout
    return 0.0


def module_label(name: str, module: nn.Module) -> str:
    """``name (Class)`` for messages; the root module is ``<root>``."""
    return f"{name or '<root>'} ({type(module).__name__})"


def check_supported(
    model: nn.Module, randomness: str, sharding: Callable[[nn.Module], str | None] | None = None
) -> None:
    """Reject models whose per-example gradients are undefined, before any work.

    - Inside ``torch.inference_mode()`` nothing can be differentiated.
    - Train-mode BatchNorm normalises with statistics of the whole batch, so
      example i's loss depends on every other example.
    - Random modules (dropout) in training mode under ``randomness="error"``
      (random ops called as functions are caught while the engines run).
    - FSDP-sharded models and ``DistributedDataParallel`` wrappers
      (:func:`._sharding.refuse_wrapped`: pass ``ddp.module``; ``sharding`` finds out how the model
      is sharded, :func:`._sharding.sharding_of` by default).
    """
    require_module(model)
    refuse_wrapped(model, "persample", sharding)
    if randomness not in RANDOMNESS_CHOICES:
        raise ValueError(f"randomness must be one of {RANDOMNESS_CHOICES}, got {randomness!r}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "persample computes gradients, which torch.inference_mode() forbids: call it outside the "
            "`with torch.inference_mode():` block (torch.no_grad() around it is fine)"
        )
    for refused in unsupported_modules(model, randomness):
        raise refused


def unsupported_modules(model: nn.Module, randomness: str) -> Iterator[UnsupportedModelError]:
    """The refusal of every module that makes per-example gradients undefined as configured (one per
    module, in ``named_modules()`` order): train-mode BatchNorm, BatchNorm without running statistics,
    random modules in training mode under ``randomness="error"``. :func:`check_supported` raises the
    first; :func:`persample.explain` lists them all.
    """
    for name, module in model.named_modules():
        if not isinstance(module, (_BatchNorm, *_DROPPING)):
            continue  # only these can couple examples or draw random numbers
        label = module_label(name, module)
        if isinstance(module, _BatchNorm) and module.training:
            yield UnsupportedModelError(
                f"module {label} is a BatchNorm in training mode: it couples the examples of a batch, "
                "so per-example gradients are undefined. Fixes: persample.fix(model) replaces every "
                "BatchNorm by a GroupNorm (before training: it changes the architecture); or keep "
                "BatchNorm and measure the gradient noise from micro-batches, each with its own batch "
                "statistics: `with tracker.accumulate(estimator='micro-batch') as acc:` around k >= 2 "
                "tracker.step(x_m, y_m, scale=1/k) calls, then acc.noise; or, to use its running "
                "statistics (evaluation, fine-tuning), model.eval().",
                code="BATCHNORM_TRAIN",
                module=label,
            )
            continue
        if isinstance(module, _BatchNorm) and module.running_mean is None:
            yield UnsupportedModelError(
                f"module {label} is a BatchNorm without running statistics (track_running_stats=False): "
                "it normalises with batch statistics even in eval mode, which couples the examples. "
                "Fixes: use track_running_stats=True and model.eval(), or nn.GroupNorm / nn.LayerNorm.",
                code="BATCHNORM_NO_RUNNING_STATS",
                module=label,
            )
            continue
        p = dropout_probability(module) if randomness == "error" else 0.0
        if p:
            yield UnsupportedModelError(
                f"module {label} draws random numbers (dropout p={p}) in training mode, which "
                "randomness='error' forbids. Pass randomness='different' (an independent mask "
                "per example, like a normal batch) or randomness='same' (one mask shared by "
                "all examples), or call model.eval().",
                code="RANDOM_UNDER_ERROR",
                module=label,
            )


def randomness_error(where: str) -> UnsupportedModelError:
    """The error for random numbers drawn under ``randomness="error"``; ``where`` names the module."""
    return UnsupportedModelError(
        f"{where} draws random numbers (a dropout called as a function, attention dropout_p, ...) while "
        "randomness='error'. Pass randomness='different' for an independent draw per example (what a "
        "normal batch does) or randomness='same' for one draw shared by the batch; or call model.eval() "
        "(or set the probability to 0) to switch it off.",
        code="RANDOM_UNDER_ERROR",
    )


def is_vmap_randomness_error(err: BaseException) -> bool:
    msg = str(err)
    return isinstance(err, RuntimeError) and "randomness" in msg and "vmap" in msg


def translate_vmap_error(err: RuntimeError) -> Exception | None:
    """A clearer error for failures that ``torch.func.vmap`` reports cryptically."""
    if is_vmap_randomness_error(err):
        return randomness_error("the model")
    return None


# ------------------------------------------------------------------------ random numbers


def cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices the model's parameters are on (none without a walk while CUDA is uninitialised)."""
    if not torch.cuda.is_initialized():
        return []
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def rng_snapshot(model: nn.Module) -> list[Tensor]:
    """The states of the generators the model's ops draw from (CPU, and its CUDA devices)."""
    states = [torch.random.get_rng_state()]
    states += [torch.cuda.get_rng_state(d) for d in cuda_devices(model)]
    return states


def rng_advanced(model: nn.Module, snapshot: list[Tensor]) -> bool:
    """Whether any random number was drawn since ``snapshot`` (every random op advances its generator)."""
    return any(not torch.equal(a, b) for a, b in zip(snapshot, rng_snapshot(model)))


def restore_rng(model: nn.Module, snapshot: list[Tensor]) -> None:
    """Set the generators back to ``snapshot`` (from :func:`rng_snapshot` on the same model)."""
    torch.random.set_rng_state(snapshot[0])
    for device, state in zip(cuda_devices(model), snapshot[1:]):
        torch.cuda.set_rng_state(state, device)


def forward_hook_if_possible(module: nn.Module, hook) -> Any:
    """``module.register_forward_hook(hook)``'s handle, or None where the module takes no hooks (a
    TorchScript module raises): for hooks that only save work, never for ones a guard relies on."""
    try:
        return module.register_forward_hook(hook)
    except RuntimeError:
        return None


#: Calls that draw random numbers whatever their arguments (functions, ``Tensor`` methods).
_ALWAYS_RANDOM = frozenset(
    {
        "rand",
        "rand_like",
        "randint",
        "randint_like",
        "randn",
        "randn_like",
        "randperm",
        "bernoulli",
        "bernoulli_",
        "multinomial",
        "normal",
        "normal_",
        "poisson",
        "uniform_",
        "exponential_",
        "geometric_",
        "log_normal_",
        "cauchy_",
        "random_",
        "_standard_gamma",
        "_sample_dirichlet",
        "binomial",
        "gumbel_softmax",
        "fractional_max_pool2d",
        "fractional_max_pool3d",
        "fractional_max_pool2d_with_indices",
        "fractional_max_pool3d_with_indices",
    }
)
_DROPOUTS = frozenset(
    {
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
        "feature_dropout",
        "native_dropout",
        "dropout_",
        "alpha_dropout_",
        "feature_dropout_",
        "feature_alpha_dropout_",
    }
)
_RNN_OPS = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})
_MAYBE_RANDOM = (
    _ALWAYS_RANDOM
    | _DROPOUTS
    | _RNN_OPS
    | {"rrelu", "rrelu_", "scaled_dot_product_attention", "multi_head_attention_forward"}
)


def _argument(args, kwargs, position: int, keyword: str, default=None):
    return args[position] if len(args) > position else kwargs.get(keyword, default)


def random_call(func, args, kwargs) -> str | None:
    """The name of ``func`` when this call draws random numbers (from any generator), else None.

    Read from the call itself, never from the generators' state (which other threads share): dropouts
    with p > 0 in training, ``scaled_dot_product_attention`` / ``multi_head_attention_forward`` with
    ``dropout_p > 0``, ``rrelu`` in training, multi-layer RNN ops with dropout in training, and the
    sampling functions and methods (``rand*``, ``bernoulli_``, ``normal_``, ``randperm``, ...).
    """
    name = getattr(func, "__name__", None)
    if name not in _MAYBE_RANDOM:
        return None
    try:
        if name in _ALWAYS_RANDOM:
            return name
        if name in _DROPOUTS:
            p = _argument(args, kwargs, 1, "p", 0.5)
            training = _argument(args, kwargs, 2, "training", kwargs.get("train", True))
            return name if (training is None or training) and p != 0 else None
        if name in ("rrelu", "rrelu_"):
            return name if _argument(args, kwargs, 3, "training", False) else None
        if name == "scaled_dot_product_attention":
            return name if _argument(args, kwargs, 4, "dropout_p", 0.0) else None
        if name == "multi_head_attention_forward":
            p = _argument(args, kwargs, 10, "dropout_p", 0.0)
            return name if p and _argument(args, kwargs, 13, "training", True) else None
        # _VF.lstm / gru / rnn_*: (..., num_layers, dropout, train, ...): dropout between layers only
        for i in range(1, len(args) - 1):
            if isinstance(args[i], float) and isinstance(args[i + 1], bool):
                layers = args[i - 1] if isinstance(args[i - 1], int) else 2
                return name if args[i] > 0 and args[i + 1] and layers > 1 else None
        return None
    except Exception:  # arguments we cannot read: fail closed
        return name


class RandomCalls(TorchFunctionMode):
    """A torch-function mode noting the first call that draws random numbers (:func:`random_call`);
    with ``stop``, raising :class:`RandomCallStop` there instead of drawing."""

    def __init__(self, stop: bool = False):
        super().__init__()
        self.found: str | None = None
        self.stop = stop

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.found is None:
            self.found = random_call(func, args, kwargs)
            if self.found is not None and self.stop:
                raise RandomCallStop(self.found)
        return func(*args, **kwargs)


class RandomCallStop(Exception):
    """:class:`RandomCalls` stopped a run at its first random call, before it drew."""


def first_random_module(model: nn.Module, run) -> str:
    """The innermost module whose forward draws random numbers while ``run()`` runs (a label).

    Diagnostic only (an error path): ``run()`` is called once more under ``no_grad`` with a
    pre- and post-hook on every module, and stopped at its first random call, before it draws
    (the generators, which other threads share, are neither advanced nor rewound).
    """
    stack: list[str] = []
    handles = []

    def pre(name):
        def hook(module, args):
            stack.append(module_label(name, module))

        return hook

    def post(module, args, output):
        if stack:
            stack.pop()

    watcher = RandomCalls(stop=True)
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post))
        with torch.no_grad(), watcher:
            run()
    except RandomCallStop:
        return f"module {stack[-1]}" if stack else "the model or its loss_fn"
    except Exception:  # the diagnosis is best effort: the caller raises its own error anyway
        pass
    finally:
        for h in handles:
            h.remove()
    return "the model or its loss_fn"


# ----------------------------------------------------------------------------- autocast

#: ``((device_type, enabled, dtype), ...)`` for the device types autocast knows here.
AutocastState = tuple


def _autocast_devices() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def autocast_state() -> AutocastState:
    """The autocast settings in effect now, to re-enter later with :func:`autocast_as`."""
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _autocast_devices())


@contextlib.contextmanager
def autocast_as(state: AutocastState | None) -> Iterator[None]:
    """Run under the autocast settings ``state``; ``None`` switches autocast off everywhere
    (statistics are reduced in the precision of their inputs, float32 or better)."""
    wanted = state or tuple((d, False, None) for d in _autocast_devices())
    if all(not enabled and not torch.is_autocast_enabled(device) for device, enabled, _ in wanted):
        yield  # off already, and to stay off: nothing to enter (the usual case, on every call)
        return
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype in wanted:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


# ------------------------------------------------------------------------------- hooks


def has_gradient_hooks(model: nn.Module) -> bool:
    """Whether a trainable parameter has a tensor hook or a module a backward hook (its own or global):
    one walk over the modules' own dicts; :func:`hooked_parameters` and :func:`backward_hooked_module`
    then name them."""
    if global_backward_hooks():
        return True
    return any(
        module_backward_hooks(m) or any(tensor_gradient_hooks(p) for p in own_trainable_parameters(m).values())
        for m in model.modules()
    )


def hooked_parameters(model: nn.Module) -> list[str]:
    """Trainable parameters with tensor hooks (``p.register_hook``), which change their gradient."""
    return [n for n, p in model.named_parameters() if p.requires_grad and tensor_gradient_hooks(p)]


def backward_hooked_module(model: nn.Module) -> str | None:
    """The first module with a backward hook (module or global), which may change the gradients
    that reach the modules before it; None when there is none."""
    if global_backward_hooks():
        return "a global module backward hook (register_module_full_backward_hook)"
    for name, module in model.named_modules():
        if module_backward_hooks(module):
            return f"module {module_label(name, module)}"
    return None


def mutated_in_forward(modules) -> list[Tensor]:
    """Parameters that a forward changes in place (``nn.Embedding(max_norm=...)`` renormalises rows),
    among ``modules`` (a model's ``modules()``)."""
    return [m.weight for m in modules if isinstance(m, nn.Embedding) and m.max_norm is not None]


def own_trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """``named_parameters(recurse=False)`` restricted to ``requires_grad``, read from the module's own
    dict (each parameter once, under its first name)."""
    seen: set[int] = set()
    return {
        n: p
        for n, p in module._parameters.items()
        # set.add returns None: `not seen.add(...)` records the id and keeps the item
        if p is not None and p.requires_grad and id(p) not in seen and not seen.add(id(p))  # type: ignore[func-returns-value]
    }


def _unique(tensors) -> list[Tensor]:
    """The tensors that are not None, each once (shared parameters and buffers), in order: what
    ``model.parameters()`` / ``model.buffers()`` give, gathered from the modules' own dicts in one walk."""
    seen: set[int] = set()
    # set.add returns None: `not seen.add(...)` records the id and keeps the item
    return [t for t in tensors if t is not None and id(t) not in seen and not seen.add(id(t))]  # type: ignore[func-returns-value]


#: A model's buffer slots with what they held: ``[(module, name, tensor, a copy of its value)]``.
BufferState = list


def buffer_slots(model: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """``(owner, name, tensor)`` for every buffer slot in ``model``'s subtree that holds a tensor."""
    return [(owner, name, b) for owner in model.modules() for name, b in owner._buffers.items() if b is not None]


def buffer_state(model: nn.Module) -> BufferState:
    """The model's buffers as they are now, for :func:`restore_buffer_state`: each slot's tensor and a
    copy of its value (one copy per tensor, however many slots share it)."""
    copies: dict[int, Tensor] = {}
    state = []
    for module, name, b in buffer_slots(model):
        if id(b) not in copies:
            copies[id(b)] = b.detach().clone()
        state.append((module, name, b, copies[id(b)]))
    return state


def restore_buffer_state(state: BufferState) -> None:
    """Put the buffers back as :func:`buffer_state` found them: each slot holds its recorded tensor
    again (a forward may have assigned a new one, ``self.n = self.n + 1``), with the recorded value
    copied into it in place, so references users hold stay valid. A tensor whose shape changed (a
    lazy module's buffer, materialised) keeps its new value."""
    with torch.no_grad():
        for module, name, tensor, value in state:
            if module._buffers.get(name) is not tensor:
                module._buffers[name] = tensor
            if tensor.shape == value.shape:
                tensor.copy_(value)


#: Each module's own attributes as found: ``[(module, its __dict__, its child modules)]`` (shallow copies).
ModuleAttributes = list

#: Entries of a module's ``__dict__`` that :func:`restore_module_attributes` leaves alone: the training
#: flag, parameters and buffers (restored by :func:`preserved_state` itself) and hook registries.
_OWN_STATE = frozenset({"training", "_parameters", "_buffers", "_modules"})


def module_attributes(modules: list[nn.Module]) -> ModuleAttributes:
    """Shallow copies of each module's attributes and child modules, for :func:`restore_module_attributes`."""
    return [(m, m.__dict__.copy(), dict(m._modules)) for m in modules]


def restore_module_attributes(saved: ModuleAttributes) -> None:
    """After a call that raised: each module's plain attributes and child modules as found.

    A forward that persample stopped midway (at its first random call, before it draws, under
    ``randomness="error"``) may have changed some of its own state and not the rest: Hugging Face's
    BigBird, on its first short batch, sets ``attention_type = "original_full"``, then builds the new
    attention module (whose Linear init draws) and would only then install it. Left so, the model
    raises on every later forward, persample's or the user's own. Attributes the forward set or added
    are put back as found (by identity; the objects themselves are not copied); hook registries,
    parameters and buffers are left to their own restorers.
    """
    missing = object()
    for module, attrs, children in saved:
        now = module.__dict__
        for key in [k for k in now if k not in attrs]:
            del now[key]
        for key, value in attrs.items():
            if key not in _OWN_STATE and not key.endswith("hooks") and now.get(key, missing) is not value:
                now[key] = value
        if not isinstance(module._modules, dict):  # a TorchScript module's: its own, read-only
            continue
        if module._modules != children or any(module._modules[k] is not v for k, v in children.items()):
            module._modules.clear()
            module._modules.update(children)


class FoundState(list):
    """What :func:`preserved_state` yields: the buffers as found (a :data:`BufferState`, for
    :func:`restore_buffer_state`) and, in ``attributes``, the modules' own attributes as found
    (:func:`restore_module_attributes`); :func:`restore_as_found` puts back both."""

    attributes: ModuleAttributes = []


def restore_as_found(found: BufferState) -> None:
    """Buffers and, where ``found`` has them (:class:`FoundState`), module attributes as found: what an
    engine that raised midway left is not what the next engine starts from."""
    restore_buffer_state(found)
    restore_module_attributes(getattr(found, "attributes", []))


@contextlib.contextmanager
def preserved_state(
    model: nn.Module, *, restore_buffers: bool = True, fork_rng: bool = True, rewind_rng: bool | None = None
) -> Iterator[BufferState]:
    """Restore training flags, ``p.grad``, buffers and RNG state on exit (also on error).

    Buffers are restored in place, a buffer the forward replaced included
    (:func:`restore_buffer_state`), so references users hold stay valid. On an exception, the
    modules' own attributes are put back as found too (:func:`restore_module_attributes`). Yields
    the buffers as found (a :class:`FoundState`: a :func:`buffer_state`, empty without
    ``restore_buffers``, with the modules' attributes), to go back to midway (:func:`restore_as_found`).
    With ``fork_rng`` (not a training step), parameters that a forward changes in place
    (``Embedding(max_norm=...)``) are restored too.
    ``rewind_rng`` (default: ``fork_rng``) restores the global generators on exit; pass False where
    the model may not draw (``randomness="error"``): other threads share them, and rewinding would
    make a thread that drew in the meantime draw the same numbers again.
    """
    modules = list(model.modules())
    flags = [(m, m.training) for m in modules]
    grads = [(p, p.grad) for p in _unique(t for m in modules for t in m._parameters.values())]
    buffers = buffer_state(model) if restore_buffers else []
    mutated = [(p, p.detach().clone()) for p in (mutated_in_forward(modules) if fork_rng else [])]
    found = FoundState(buffers)
    found.attributes = module_attributes(modules)
    rng = torch.random.fork_rng(devices=cuda_devices(model), enabled=fork_rng if rewind_rng is None else rewind_rng)
    with rng:
        try:
            yield found
        except BaseException:
            restore_module_attributes(found.attributes)
            raise
        finally:
            for m, flag in flags:
                if m.training is not flag:  # (nn.Module.__setattr__ costs microseconds per module)
                    m.training = flag
            for p, g in grads:
                if p.grad is not g:
                    p.grad = g
            restore_buffer_state(buffers)
            with torch.no_grad():
                for p, saved in mutated:
                    if p.shape == saved.shape:
                        p.copy_(saved)


def random_state() -> tuple[Any, Any]:
    """The global random generators' states (CPU, and CUDA's where initialised), for :func:`set_random_state`."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_random_state(state: tuple[Any, Any]) -> None:
    """Put the global random generators back as :func:`random_state` found them."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def detached_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Clones of the buffers, so that in-place updates inside a functional call never leak."""
    return {n: b.detach().clone() for n, b in model.named_buffers()}
