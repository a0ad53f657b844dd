"""Model inspection and the "leave the model as it was found" guard."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .errors import UnsupportedModelError

__all__ = ["trainable_parameters", "check_supported", "preserved_state", "translate_vmap_error"]

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
            "there are no gradients to compute")
    return params


def dropout_probability(module: nn.Module) -> float:
    """The probability with which ``module`` drops values in training mode (0 for non-random modules)."""
    if not module.training:
        return 0.0
    if isinstance(module, (_DropoutNd, nn.AlphaDropout)):
        return module.p
    if isinstance(module, nn.RNNBase) and module.num_layers > 1:
        return module.dropout
    return 0.0


def check_supported(model: nn.Module, randomness: str) -> None:
    """Reject models whose per-example gradients are undefined, before any work.

    - Train-mode BatchNorm normalises with statistics of the whole batch, so
      example i's loss depends on every other example.
    - Random modules (dropout) in training mode under ``randomness="error"``.
    """
    require_module(model)
    if randomness not in RANDOMNESS_CHOICES:
        raise ValueError(f"randomness must be one of {RANDOMNESS_CHOICES}, got {randomness!r}")
    for name, module in model.named_modules():
        label = f"{name or '<root>'} ({type(module).__name__})"
        if isinstance(module, _BatchNorm) and module.training:
            raise UnsupportedModelError(
                f"module {label} is a BatchNorm in training mode: it couples the examples of a batch, "
                "so per-example gradients are undefined. Fixes: call model.eval() (or eval() on that "
                "module) to use its running statistics; replace it with nn.GroupNorm or nn.LayerNorm; "
                "or call torch.func.replace_all_batch_norm_modules_(model) to stop it tracking "
                "running statistics.")
        if isinstance(module, _BatchNorm) and module.running_mean is None:
            raise UnsupportedModelError(
                f"module {label} is a BatchNorm without running statistics (track_running_stats=False): "
                "it normalises with batch statistics even in eval mode, which couples the examples. "
                "Fixes: use track_running_stats=True and model.eval(), or nn.GroupNorm / nn.LayerNorm.")
        p = dropout_probability(module) if randomness == "error" else 0.0
        if p:
            raise UnsupportedModelError(
                f"module {label} draws random numbers (dropout p={p}) in training mode, which "
                "randomness='error' forbids. Pass randomness='different' (an independent mask "
                "per example, like a normal batch) or randomness='same' (one mask shared by "
                "all examples), or call model.eval().")


def translate_vmap_error(err: RuntimeError) -> RuntimeError | None:
    """A clearer error for failures that ``torch.func.vmap`` reports cryptically."""
    msg = str(err)
    if "randomness" in msg and "vmap" in msg:
        return RuntimeError(
            "the model calls a random operation (such as dropout) while randomness='error'. "
            "Pass randomness='different' for an independent draw per example (what a normal "
            "batch does) or randomness='same' for one draw shared by the batch; or call "
            "model.eval() to switch dropout off.")
    return None


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, restore_buffers: bool = True, fork_rng: bool = True) -> Iterator[None]:
    """Restore training flags, ``p.grad``, buffers and RNG state on exit (also on error).

    Buffers are restored in place, so references users hold stay valid.
    """
    flags = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    buffers = ([(b, b.detach().clone()) for b in model.buffers()] if restore_buffers else [])
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    rng = torch.random.fork_rng(devices=devices, enabled=fork_rng)
    with rng:
        try:
            yield
        finally:
            for m, flag in flags:
                m.training = flag
            for p, g in grads:
                p.grad = g
            with torch.no_grad():
                for b, saved in buffers:
                    if b.shape == saved.shape:
                        b.copy_(saved)


def detached_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Clones of the buffers, so that in-place updates inside a functional call never leak."""
    return {n: b.detach().clone() for n, b in model.named_buffers()}
