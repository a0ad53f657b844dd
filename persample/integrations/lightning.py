"""Per-example gradient statistics in a PyTorch Lightning ``Trainer``, as one ``Callback``.

::

    from persample.integrations.lightning import PersampleCallback

    trainer = L.Trainer(callbacks=[PersampleCallback(F.cross_entropy)], accumulate_grad_batches=2,
                        precision="bf16-mixed")
    trainer.fit(module, loader)              # logs persample/b_simple, ... through pl_module.log

With automatic optimisation, the callback observes Lightning's own forward
(``training_step`` calling the module) and backward with
:meth:`persample.Tracker.observe`, from ``on_train_batch_start`` to
``on_after_backward``. Lightning zero-grads between ``training_step`` and the
backward; the callback takes its ``p.grad`` baseline in ``on_before_backward``,
after that. The micro-batches observed until the optimizer steps (``on_before_optimizer_step``:
``accumulate_grad_batches``, the end of an epoch, also of an ``IterableDataset``) make one step.
With manual optimisation the same holds for ``self.manual_backward(loss)`` (one per batch)
and ``opt.step()`` in ``training_step``, with whatever accumulation the module does.

- ``p.grad`` is never touched: training is identical with or without the callback.
- The statistics describe g_i = ∇ L_i with L_i = ``loss_fn(output_i, target_i)``
  on a batch of one, where ``output`` is what the LightningModule's ``forward``
  (or ``output_module``'s) returns. The loss's weight (a mean, a sum, the
  division by ``accumulate_grad_batches``) is read from the backward and checked.
- With Adam / AdamW, the preconditioned noise scale ``persample/b_precond`` is
  logged too, with P read before each optimizer step.
- Micro-batches of ``accumulate_grad_batches`` are merged exactly into the
  statistics of the whole accumulated batch; statistics are read before gradient
  clipping; under ``precision="bf16-mixed"`` they are computed in float32.

Diagnostics never stop training: a step whose statistics cannot be computed
exactly is skipped by default (``on_refusal="skip"``: one warning per reason,
counted in ``persample/skipped_steps``, logged with every row and alone on a
skipped step), or computed by the exact engines on the batch's inputs
(``on_refusal="fallback"``, one more pass), or raised (``"raise"``).

Needs ``lightning`` (``pip install -e ".[lightning]"`` from a source checkout).
Limits: one backward per batch; one process or ``DDPStrategy`` (statistics of the global batch).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from ..errors import ObservationError
from ..loggers import Diagnostics
from ..noise import DEFAULT_EMA_BETA
from ..stats import GradStats
from ..tracker import Tracker
from ._common import (
    DEFAULT_KEYS,
    diagnostics_row,
    require,
    skip_block_statistics,
    skipped_steps,
    snapshot_preconditioner,
)

L = require("lightning", "lightning")

__all__ = ["PersampleCallback"]


_TARGET_KEYS = ("labels", "target", "y")


def _last_element(batch: Any) -> Any:
    if isinstance(batch, dict):
        return batch["labels"] if "labels" in batch else batch.get("target", batch.get("y"))
    return batch[-1]


def _model_inputs(batch: Any) -> Any:
    """The model's inputs in a batch (for ``on_refusal="fallback"``): a dict's entries other than its
    targets, or every element but the last of a tuple (the first alone when there are two)."""
    if isinstance(batch, dict):
        target = next((k for k in _TARGET_KEYS if k in batch), None)
        return {k: v for k, v in batch.items() if k != target}
    return batch[0] if len(batch) == 2 else tuple(batch[:-1])


class PersampleCallback(L.pytorch.Callback):  # type: ignore[name-defined]  # L is loaded at run time (require)
    """A Lightning callback that logs per-example gradient diagnostics.

    Args:
        loss_fn: the per-example loss ``loss_fn(output, target)`` on a batch of one
            (as for :class:`persample.Tracker`), of the output of the module's ``forward``.
        targets: ``targets(batch)``, the targets of a batch (default: ``batch[-1]``, or
            ``batch["labels"]`` for a dict).
        every: statistics on every k-th optimizer step.
        output_module: ``output_module(pl_module)``, the submodule whose output the loss is
            computed from when ``training_step`` does not call the LightningModule itself
            (default: the LightningModule).
        keys, prefix, sinks, ema_beta, inner_products, var, on_refusal: as in
            :func:`persample.integrations.transformers.track` (``on_refusal="skip"`` by default:
            a step without exact statistics is counted in ``persample/skipped_steps``).
        inputs: ``inputs(batch)``, the inputs of the module's forward, for ``on_refusal="fallback"``
            (default: ``batch[0]``, or a dict's entries other than its targets).

    Attributes:
        last_stats: the merged statistics of the last optimizer step that had them.
        diagnostics: the :class:`persample.loggers.Diagnostics` (its ``rows`` keep the rows).
    """

    def __init__(
        self,
        loss_fn: Callable,
        *,
        targets: Callable[[Any], Any] = _last_element,
        every: int = 1,
        output_module: Callable[[Any], nn.Module] | None = None,
        keys: Sequence[str] | None = DEFAULT_KEYS,
        prefix: str = "persample/",
        sinks: Sequence[Any] = (),
        ema_beta: float = DEFAULT_EMA_BETA,
        inner_products: bool = False,
        var: bool = True,
        on_refusal: str = "skip",
        inputs: Callable[[Any], Any] = _model_inputs,
    ):
        self.loss_fn = loss_fn
        self.targets = targets
        self.every = every
        self.output_module = output_module
        self.keys = None if keys is None else tuple(keys)
        self.prefix = prefix
        self.options = dict(inner_products=inner_products, var=var, on_refusal=on_refusal)
        self.inputs = inputs
        self.diagnostics = Diagnostics(*sinks, ema_beta=ema_beta)
        if not inner_products:
            self.diagnostics._warned.add("inner")  # the inner-product tests are off by choice here: no warning
        self.tracker: Tracker | None = None
        self._pending_tracker_state: dict[str, Any] | None = None  # loaded before on_fit_start made the tracker
        self.last_stats: GradStats | None = None
        self._block = self._accumulation = self._observe = self._observation = None
        self._stepped = False  # an optimizer step ran during the current batch (on_before_optimizer_step)

    def state_dict(self) -> dict[str, Any]:
        """The tracker's and the diagnostics' state: Lightning stores it in its checkpoints, and
        ``trainer.fit(..., ckpt_path=...)`` restores it, so a resumed run logs what an uninterrupted one logs."""
        tracker = self.tracker.state_dict() if self.tracker is not None else self._pending_tracker_state
        return {"tracker": tracker, "diagnostics": self.diagnostics.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diagnostics.load_state_dict(state_dict["diagnostics"])
        if self.tracker is None:
            self._pending_tracker_state = state_dict["tracker"]
        elif state_dict["tracker"] is not None:
            self.tracker.load_state_dict(state_dict["tracker"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Lightning's own decision that this batch ends an optimizer step (after its backward): the block
        # closes at this batch's end. Counting batches cannot tell the last batch of an epoch whose
        # length is unknown (an IterableDataset), where Lightning steps too.
        self._stepped = True
        if self._block is not None and self.tracker.wants_stats():
            snapshot_preconditioner(self.diagnostics, optimizer, pl_module)

    def on_fit_start(self, trainer, pl_module):
        self.tracker = Tracker(pl_module, self.loss_fn, every=self.every, **self.options)
        self.diagnostics.reopen()  # closed by an earlier fit's on_train_end
        self._block = self._accumulation = self._observe = self._observation = None
        self._stepped = False
        if self._pending_tracker_state is not None:
            self.tracker.load_state_dict(self._pending_tracker_state)
            self._pending_tracker_state = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._block is None:
            self._block = self.tracker.accumulate()
            self._accumulation = self._block.__enter__()
        module = None if self.output_module is None else self.output_module(pl_module)
        inputs = self.inputs(batch) if self.options["on_refusal"] == "fallback" else None
        wrapper = trainer.strategy.model if trainer.strategy.model is not pl_module else None  # DDP's, say
        self._observe = self.tracker.observe(self.targets(batch), output_module=module, inputs=inputs, wrapper=wrapper)
        self._observation = self._observe.__enter__()

    def on_before_backward(self, trainer, pl_module, loss):
        if self._observe is None:  # a second backward in this batch (manual optimisation)
            self._second_backward()
        elif self._observation is not None:
            self._observation.rebase_grads()  # after Lightning's zero_grad

    def _second_backward(self) -> None:
        """The observed backward is not the batch's only one (``manual_backward`` twice): p.grad holds
        what the observation did not see, so this optimizer step has no statistics (skipped, with a reason)."""
        reason = (
            "more than one backward in a training batch (manual_backward called twice): the statistics "
            "observe the first only; call manual_backward once per batch, on the summed loss"
        )
        skip_block_statistics(self.tracker, self._accumulation, reason, stacklevel=2)

    def on_after_backward(self, trainer, pl_module):
        if self._observe is not None:
            observe, self._observe = self._observe, None
            observe.__exit__(None, None, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._observe is not None:  # no backward ran (a skipped step): nothing to observe
            observe, self._observe = self._observe, None
            try:
                observe.__exit__(None, None, None)
            except ObservationError:  # "no forward reached a backward": the step has no statistics
                pass
        stepped, self._stepped = self._stepped, False
        if self._block is None or not stepped:  # micro-batches until the optimizer steps
            return
        block, self._block = self._block, None
        block.__exit__(None, None, None)
        stats = self._accumulation.stats
        skipped = {f"{self.prefix}skipped_steps": float(skipped_steps(self.tracker))}
        if stats is None:
            if self._accumulation.with_stats:  # a skipped step: the counter tells why its keys are absent
                for name, value in skipped.items():
                    pl_module.log(name, value, on_step=True, on_epoch=False)
            return
        self.last_stats = stats
        row = diagnostics_row(self.diagnostics, stats, trainer.global_step, self.keys, self.prefix)
        for name, value in {**row, **skipped}.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=stats.n)

    def on_train_end(self, trainer, pl_module):
        self.diagnostics.close()
