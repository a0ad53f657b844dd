"""Per-example gradient statistics in a Hugging Face ``Trainer``, in one line.

::

    from persample.integrations.transformers import track

    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    persample_callback = track(trainer)           # the one added line
    trainer.train()                               # logs persample/b_simple, ... with the Trainer's own log

How it works. A ``TrainerCallback`` never sees the batch, and the gradients
are zeroed before ``on_step_end``; so :func:`track` wraps the trainer's
``training_step`` (this instance only) in :meth:`persample.Tracker.observe`,
and adds a :class:`PersampleCallback` that merges the micro-batches of a
gradient-accumulation step and logs the diagnostics through ``trainer.log``
(so TensorBoard, W&B and ``trainer.state.log_history`` get them).

- ``p.grad`` is never touched: the Trainer's own forward, loss and backward
  run unchanged, so training is identical with or without :func:`track`.
- The statistics describe g_i = ∇ L_i with L_i = Σ_t ℓ_it, example i's summed
  next-token loss (:func:`persample.causal_lm_loss`) for causal LMs, or
  ``loss_fn(output_i, labels_i)`` on one example for other models. The
  weight of each example in the Trainer's loss (1/N_tokens, ``num_items_in_batch``,
  the division by the accumulation steps, a loss scale) is read from its
  backward and checked (:mod:`persample.batch_loss`).
- Statistics are read right after each backward: before ``max_grad_norm``
  clipping, which the Trainer applies later.
- bf16 / fp16 mixed precision: statistics are computed and kept in float32;
  an fp16 step that overflows is skipped, as the Trainer's scaler skips it.
- The micro-batches of one optimizer step are merged exactly into the
  statistics of the whole accumulated batch (``persample_callback.last_stats``).
- With Adam / AdamW (the Trainer's default), the preconditioned noise scale
  ``persample/b_precond`` is logged too, with P read before each optimizer step
  (:func:`persample.noise.preconditioned_noise_scale`).
- Checkpoints keep persample's state (``persample_state.json`` in each
  checkpoint directory: the EMA, ``every``'s step count), and
  ``trainer.train(resume_from_checkpoint=...)`` restores it, so a resumed run
  logs what an uninterrupted one logs.

- Diagnostics never stop training: a step whose statistics cannot be computed
  exactly (a model the fast engine cannot follow in the Trainer's own backward)
  is, by default (``on_refusal="skip"``), skipped with one warning per reason
  and counted in ``persample/skipped_steps``, which every logged row carries
  (a skipped step logs that counter alone); ``on_refusal="fallback"`` computes
  its statistics with the exact engines on the same batch (one more pass);
  ``"raise"`` raises.

Needs ``transformers`` (``pip install -e ".[hf]"`` from a source checkout).
Limits: one process, DDP or FSDP2 (statistics of the global batch; FSDP2 with accelerate is untested on
GPU); no FSDP1, no DeepSpeed.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import warnings
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
from torch import Tensor

from ..batch_loss import causal_lm_loss
from ..engines.fast.model_loss import head_kind
from ..loggers import Diagnostics
from ..noise import DEFAULT_EMA_BETA
from ..stats import GradStats
from ..tracker import Accumulation, Tracker
from ._common import (
    DEFAULT_KEYS,
    diagnostics_row,
    require,
    skip_block_statistics,
    skipped_steps,
    snapshot_preconditioner,
)

transformers = require("transformers", "hf")
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint  # noqa: E402

__all__ = ["track", "PersampleCallback", "model_own_loss", "smoothed_label_loss"]


class PersampleCallback(transformers.TrainerCallback):  # type: ignore[name-defined]  # loaded at run time (require)
    """Merges the observed micro-batches of each optimizer step and logs their diagnostics.

    Attributes:
        tracker: the :class:`persample.Tracker` (``every`` counts optimizer steps).
        diagnostics: the :class:`persample.loggers.Diagnostics` computing the rows (its
            ``rows`` keep them; pass ``sinks`` to :func:`track` to also write CSV files).
        last_stats: the merged statistics of the last optimizer step that had them.
    """

    def __init__(
        self, trainer: Any, tracker: Tracker, diagnostics: Diagnostics, keys: Sequence[str] | None, prefix: str
    ):
        self.trainer = trainer
        self.tracker = tracker
        self.diagnostics = diagnostics
        self.keys = None if keys is None else tuple(keys)
        self.prefix = prefix
        self.last_stats: GradStats | None = None
        self._block: ContextManager[Accumulation] | None = None
        self._accumulation: Accumulation | None = None
        self._resume_from: str | bool | None = None  # trainer.train's resume_from_checkpoint (see track)

    #: The file, in each checkpoint directory, that holds :meth:`state_dict` (JSON).
    STATE_FILE = "persample_state.json"

    def state_dict(self) -> dict[str, Any]:
        """The tracker's and the diagnostics' state (JSON-safe): written into every checkpoint
        directory as :attr:`STATE_FILE`, and read back by ``trainer.train(resume_from_checkpoint=...)``."""
        return {"tracker": self.tracker.state_dict(), "diagnostics": self.diagnostics.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.diagnostics.load_state_dict(state["diagnostics"])

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(directory):
            with open(os.path.join(directory, self.STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(self.state_dict(), f)

    def on_train_begin(self, args, state, control, **kwargs):
        self.diagnostics.reopen()  # closed by an earlier train()'s on_train_end
        resume = self._resume_from
        if isinstance(resume, bool):
            resume = get_last_checkpoint(args.output_dir) if resume else None
        path = None if resume is None else os.path.join(str(resume), self.STATE_FILE)
        if path is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.load_state_dict(json.load(f))
        elif state.global_step > 0:
            warnings.warn(
                f"persample: training resumes at step {state.global_step} but the checkpoint has no "
                f"{self.STATE_FILE}: the EMA of the noise scale starts over, and every= counts from here",
                stacklevel=2,
            )
            self.tracker.load_state_dict({"steps": state.global_step, "skipped": []})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._block is not None and self.tracker.wants_stats():
            snapshot_preconditioner(self.diagnostics, self.trainer.optimizer, self.tracker.model)

    def begin(self) -> None:
        """Open the accumulation block of an optimizer step (idempotent)."""
        if self._block is None:
            self._block = self.tracker.accumulate()
            self._accumulation = self._block.__enter__()

    def skip_step(self, reason: str) -> None:
        """This optimizer step has no statistics (``reason`` warned once, in ``tracker.refused``); training goes on."""
        skip_block_statistics(self.tracker, self._accumulation, reason, stacklevel=3)

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin()

    def on_step_end(self, args, state, control, **kwargs):
        if self._block is None:
            return
        block, self._block = self._block, None
        block.__exit__(None, None, None)
        stats = self._accumulation.stats
        skipped = {f"{self.prefix}skipped_steps": float(skipped_steps(self.tracker))}
        if stats is not None:
            self.last_stats = stats
            row = diagnostics_row(self.diagnostics, stats, state.global_step, self.keys, self.prefix)
            self.trainer.log({**row, **skipped})
        elif self._accumulation.with_stats:  # a skipped step: the counter tells why its keys are absent
            self.trainer.log(skipped)

    def on_train_end(self, args, state, control, **kwargs):
        if self._block is not None:
            self._block.__exit__(None, None, None)
            self._block = None
        self.diagnostics.close()


def model_own_loss(output: Any, labels: Any = None) -> Tensor:
    """``output.loss``: the model's own loss, from the ``labels`` in its inputs (``labels`` is ignored here).

    The fast engine recomputes it per example from the logits and checks it
    (:mod:`persample.engines.fast.model_loss`): L_i is the model's own loss on example i alone."""
    return output.loss


def smoothed_label_loss(epsilon: float, *, shift: bool = False, ignore_index: int = -100) -> Callable:
    """L_i = Σ_t ℓ_it, example i's summed ε-smoothed cross entropy over its counted positions (labels not
    ``ignore_index``; next-token, labels shifted left by one, with ``shift``): the per-example part of the
    Trainer's ``label_smoothing_factor=ε`` loss, (1/N) Σ_i L_i with N the counted positions of the batch.
    ``output`` is the logits, or a model output holding them; half-precision logits are cast to float32.

    >>> import torch
    >>> loss = smoothed_label_loss(0.1)
    >>> round(float(loss(torch.zeros(1, 4), torch.tensor([2]))), 4)  # log 4, whatever the smoothing
    1.3863
    """
    import torch.nn.functional as F

    def per_example(output: Any, labels: Tensor) -> Tensor:
        logits = output if isinstance(output, Tensor) else output["logits"]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=ignore_index,
            label_smoothing=epsilon,
            reduction="sum",
        )

    return per_example


def track(
    trainer: Any,
    *,
    loss_fn: Callable | None = None,
    every: int = 1,
    labels: str = "labels",
    keys: Sequence[str] | None = DEFAULT_KEYS,
    prefix: str = "persample/",
    sinks: Sequence[Any] = (),
    ema_beta: float = DEFAULT_EMA_BETA,
    inner_products: bool = False,
    var: bool = True,
    on_refusal: str = "skip",
) -> PersampleCallback:
    """Add per-example gradient statistics to ``trainer`` (a ``transformers.Trainer``); returns the callback.

    Args:
        trainer: the Trainer, before ``train()``.
        loss_fn: the per-example loss ``loss_fn(output, labels)`` on a batch of one. With the Trainer's
            ``label_smoothing_factor`` = ε > 0, the default for these heads is :func:`smoothed_label_loss`
            (the ε-smoothed loss the Trainer backwards). Otherwise, default:
            :func:`persample.causal_lm_loss` (summed next-token loss) for causal LMs; for masked LM,
            seq2seq, token and sequence classification heads, the model's own loss
            (:func:`model_own_loss`: L_i is ``out.loss`` of example i alone, called as the Trainer calls
            the model, so with ``num_items_in_batch`` = K where the model's loss divides by it, L_i is
            example i's summed loss / K); other models need one
            (e.g. ``lambda out, y: F.cross_entropy(out.logits, y)``).
        every: statistics on every k-th optimizer step (the others run exactly as without persample).
        labels: the key of the batch that holds the targets.
        keys: the diagnostics logged (None: every column of :func:`persample.noise.diagnostics`).
        prefix: prefix of the logged names.
        sinks: extra row sinks (``persample.loggers.CSVLogger`` …) for every row, all columns.
        ema_beta, inner_products, var: as in :class:`persample.loggers.Diagnostics` and :class:`persample.Tracker`.
        on_refusal: a step whose statistics cannot be computed exactly: ``"skip"`` (default: one warning per
            reason, ``persample/skipped_steps`` counts it), ``"fallback"`` (the exact engines on the same
            batch, one more pass), or ``"raise"`` (see :class:`persample.Tracker`). Training is the same
            whatever happens to the statistics.
    """
    model = trainer.model
    output_module = None
    own_loss = False
    smoothing = float(getattr(getattr(trainer, "args", None), "label_smoothing_factor", 0.0) or 0.0)
    if loss_fn is None and smoothing > 0 and head_kind(model) in ("causal", "tokens", "sequence"):
        # The Trainer's LabelSmoother: labels popped from the inputs, ε-smoothed cross entropy of the logits,
        # a mean over the counted positions (labels shifted by one for causal LMs)
        causal = head_kind(model) == "causal"
        loss_fn = smoothed_label_loss(smoothing, shift=causal)
        output_module = model.get_output_embeddings() if causal else None
    elif loss_fn is None:
        kind = head_kind(model)
        if kind == "causal":
            loss_fn = causal_lm_loss()
            # HF computes its loss inside forward from the lm_head's logits (mixed precision then returns
            # float32 copies of them), so the per-example losses are read at the lm_head's output.
            output_module = model.get_output_embeddings()
        elif kind in ("tokens", "sequence"):
            loss_fn, own_loss = model_own_loss, True
        else:
            raise ValueError(
                f"track(trainer): pass loss_fn= for {type(model).__name__} (the per-example loss "
                "loss_fn(output, labels) on a batch of one); the default covers Hugging Face causal LM, "
                "masked LM, seq2seq, token and sequence classification heads only"
            )
    tracker = Tracker(model, loss_fn, every=every, inner_products=inner_products, var=var, on_refusal=on_refusal)
    diagnostics = Diagnostics(*sinks, ema_beta=ema_beta)
    if not inner_products:
        diagnostics._warned.add("inner")  # the inner-product tests are off by choice here: no warning
    callback = PersampleCallback(trainer, tracker, diagnostics, keys, prefix)
    original = trainer.training_step

    @functools.wraps(original)
    def training_step(model, inputs, *args, **kwargs):
        callback.begin()  # also when the Trainer calls training_step outside its loop
        targets = inputs.get(labels) if hasattr(inputs, "get") else None
        if targets is None:  # diagnostics never stop training: this step has no statistics, with a reason
            callback.skip_step(
                f"the batch has no {labels!r} entry (keys: {sorted(inputs) if hasattr(inputs, 'keys') else '?'}): "
                "pass track(trainer, labels=<the key of the targets>)"
            )
            return original(model, inputs, *args, **kwargs)
        model_inputs = None
        if on_refusal == "fallback":  # the model's own loss needs its labels among its inputs
            model_inputs = dict(inputs) if own_loss else {k: v for k, v in inputs.items() if k != labels}
        wrapper = model if model is not trainer.model else None  # DDP (accelerate's wrapper) passes the output on
        with tracker.observe(targets, output_module=output_module, inputs=model_inputs, wrapper=wrapper):
            return original(model, inputs, *args, **kwargs)

    trainer.training_step = training_step
    original_train = trainer.train
    signature = inspect.signature(original_train)

    @functools.wraps(original_train)
    def train(*args, **kwargs):
        # The checkpoint it resumes from holds persample's state (PersampleCallback.on_train_begin reads it).
        callback._resume_from = signature.bind(*args, **kwargs).arguments.get("resume_from_checkpoint")
        return original_train(*args, **kwargs)

    trainer.train = train
    trainer.add_callback(callback)
    return callback
