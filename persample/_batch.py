"""Batches: validation, slicing and the per-example view.

A batch is ``(inputs, targets)``. ``inputs`` is a tensor, a tuple/list of
tensors (passed positionally to the model) or a mapping of tensors (passed as
keyword arguments); ``targets`` is a tensor, a tuple/list/mapping of tensors, or
``None``. Every tensor is batched on dim 0 and all batch sizes agree. Keyword
inputs that are settings (None, a bool, a number or a string, such as
``use_cache=False``) are options: every call, of the batch or of one example,
gets them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["Batch", "as_batch", "flat_leaves", "tensors_in"]


@dataclass(frozen=True)
class Batch:
    """A validated batch: positional args, keyword args and targets, all batched on dim 0."""

    args: tuple
    kwargs: dict  # keyword inputs that hold tensors, batched on dim 0
    targets: Any
    size: int
    options: dict = field(default_factory=dict)  # keyword inputs without tensors, passed as they are

    @cached_property
    def input_leaves(self) -> list[Tensor]:
        """The tensors of ``args`` and ``kwargs``, flattened once."""
        return flat_leaves((self.args, self.kwargs))

    def slice(self, start: int, stop: int) -> "Batch":
        """Examples ``start:stop`` as a new batch (views, no copies)."""
        cut = lambda t: t[start:stop]  # noqa: E731
        return Batch(
            tree_map(cut, self.args),
            tree_map(cut, self.kwargs),
            None if self.targets is None else tree_map(cut, self.targets),
            min(stop, self.size) - start,
            self.options,
        )

    def forward(self, model):
        """``model(*args, **kwargs, **options)``."""
        return model(*self.args, **self.kwargs, **self.options)

    def chunks(self, chunk_size: int):
        """Consecutive sub-batches of at most ``chunk_size`` examples."""
        for start in range(0, self.size, chunk_size):
            yield self.slice(start, min(start + chunk_size, self.size))

    def call(self, model, loss_fn):
        """``loss_fn(model(*args, **kwargs, **options), targets)`` (or without targets)."""
        out = self.forward(model)
        return loss_fn(out) if self.targets is None else loss_fn(out, self.targets)


#: Types that are always pytree leaves (never registered as pytree nodes), common among an op's arguments.
_SCALAR_LEAVES = frozenset({int, float, bool, complex, str, bytes, slice, type(Ellipsis), torch.dtype, torch.device})


def flat_leaves(obj: Any) -> list:
    """The leaves of ``obj`` in pytree's order (``tree_flatten(obj)[0]``): tensors, None (no leaf),
    scalars (``_SCALAR_LEAVES``: an op's ints, dtypes, ...) and plain tuples, lists and dicts (the usual
    inputs and outputs) are walked directly,
    anything else (named tuples, registered containers such as ``ModelOutput``) by pytree,
    which costs about 10 µs more per call and leaves a reference cycle for the collector."""
    if isinstance(obj, Tensor):
        return [obj]
    if obj is None:
        return []
    if type(obj) in _SCALAR_LEAVES:  # pytree's leaves too (no node type), without its ~10 µs
        return [obj]
    if type(obj) in (tuple, list):
        return [leaf for item in obj for leaf in flat_leaves(item)]
    if type(obj) is dict:
        return [leaf for item in obj.values() for leaf in flat_leaves(item)]
    return tree_flatten(obj)[0]


def tensors_in(obj: Any) -> list[Tensor]:
    """The tensors among ``obj``'s leaves (:func:`flat_leaves`)."""
    return [leaf for leaf in flat_leaves(obj) if isinstance(leaf, Tensor)]


def _leaves(obj: Any, what: str) -> list[Tensor]:
    leaves = flat_leaves(obj)
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"{what} must be tensors (or tuples/lists/dicts of tensors) batched on dim 0; "
                f"found {type(leaf).__name__}"
            )
        if leaf.dim() == 0:
            raise ValueError(f"{what} must be batched on dim 0, but a 0-d tensor was given")
    return leaves


def as_batch(inputs: Any, targets: Any = None) -> Batch:
    """Validate ``inputs``/``targets`` and return a :class:`Batch`.

    Raises ``TypeError`` for non-tensor leaves and ``ValueError`` for empty
    batches or batch sizes that disagree (naming both sizes).
    """
    options: dict = {}
    args: tuple[Any, ...]
    if isinstance(inputs, Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, Mapping):
        args = ()
        options = {k: v for k, v in inputs.items() if _is_option(v)}
        kwargs = {k: v for k, v in inputs.items() if k not in options}
    elif isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        args, kwargs = tuple(inputs), {}
    else:
        raise TypeError(
            "inputs must be a tensor, a tuple/list of tensors (positional) or a dict of tensors "
            f"(keyword), not {type(inputs).__name__}"
        )
    input_leaves = _leaves((args, kwargs), "inputs")
    if not input_leaves:
        raise ValueError("inputs contain no tensor: at least one tensor batched on dim 0 is needed")
    sizes = {int(t.shape[0]) for t in input_leaves}
    if len(sizes) > 1:
        raise ValueError(f"input tensors disagree on the batch size (dim 0): {sorted(sizes)}")
    size = sizes.pop()
    if targets is not None:
        target_sizes = {int(t.shape[0]) for t in _leaves(targets, "targets")}
        if len(target_sizes) > 1:
            raise ValueError(f"target tensors disagree on the batch size (dim 0): {sorted(target_sizes)}")
        if target_sizes and target_sizes != {size}:
            raise ValueError(
                f"batch sizes disagree: inputs have {size} examples but targets have "
                f"{target_sizes.pop()} (both must be batched on dim 0)"
            )
    if size == 0:
        raise ValueError("empty batch: inputs have 0 examples on dim 0")
    batch = Batch(args, kwargs, targets, size, options)
    batch.__dict__["input_leaves"] = input_leaves  # cached_property's slot: flattened once
    return batch


def _is_option(value: Any) -> bool:
    """A keyword input that is a setting rather than data: None, a bool, a number or a string."""
    return value is None or isinstance(value, (bool, int, float, str))


def one_example(obj: Any) -> Any:
    """Inside ``vmap``: turn each example-shaped leaf into a batch of one."""
    return tree_map(lambda t: t.unsqueeze(0), obj)


def device_of(batch: Batch) -> torch.device:
    return batch.input_leaves[0].device
