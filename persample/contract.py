"""The exactness contract: every precondition persample checks, declared once, with a code.

persample returns the float64-oracle answer or refuses. Each refusal is one
:class:`Precondition` of the table below:

- ``code``: stable and machine-readable (``err.code``); tests match it, never the prose;
- ``error``: the exception class raised (:class:`~persample.errors.NotExact` lets
  ``engine="auto"`` move on to the next engine; the others reach the caller);
- ``stage``: when it is checked (``setup`` before any work, ``forward`` while the
  model runs, ``backward`` from the autograd graph or the gradients, ``loss`` on
  the loss function, ``result`` on the statistics);
- ``pipelines``: where it applies (``fast``, ``observe``, ``vmap``, ``loop``,
  ``tracker``, ``distributed``, ``check``);
- ``statement``: the precondition, in one sentence;
- ``fix``: what to do, tried on a model that raises it (``tests/test_contract.py``).

The watchers and the graph audit only collect evidence: a :class:`Finding` is the
text of what they saw, tagged with the code of the precondition it breaks.
:func:`refusal` turns a code and a detail into the exception to raise, and
``NotExact(finding)`` picks the code up from the finding itself. The table of
refusals on the documentation site (``docs/engines.md``, between the
``refusals:begin`` / ``refusals:end`` markers) is :func:`refusal_table`'s output:
``python -m persample.contract --write`` rewrites it, and a test keeps the two in step.

>>> from persample.contract import PRECONDITIONS, refusal
>>> PRECONDITIONS["BATCHNORM_TRAIN"].error.__name__
'UnsupportedModelError'
>>> err = refusal("MODIFIED_IN_PLACE", "an input of module 0 (Linear) was modified in place", module="0 (Linear)")
>>> type(err).__name__, err.code, err.module
('NotExact', 'MODIFIED_IN_PLACE', '0 (Linear)')
"""

from __future__ import annotations

from dataclasses import dataclass

from . import errors
from .errors import (
    BatchLossMismatch,
    MeanMismatchError,
    NotExact,
    ObservationError,
    OtherRankFailed,
    PersampleError,
    UnsupportedModelError,
)

__all__ = ["Precondition", "PRECONDITIONS", "Finding", "refusal", "enforce", "refusal_table"]

_PIPELINES = frozenset({"fast", "observe", "vmap", "loop", "tracker", "distributed", "check"})
_STAGES = ("setup", "forward", "loss", "backward", "result")


@dataclass(frozen=True)
class Precondition:
    """One declared precondition of exactness (see the module docstring for the fields)."""

    code: str
    error: type[PersampleError]
    stage: str
    pipelines: tuple[str, ...]
    statement: str
    fix: str

    def __post_init__(self):
        if self.stage not in _STAGES or not set(self.pipelines) <= _PIPELINES or not self.pipelines:
            raise ValueError(f"precondition {self.code}: bad stage {self.stage!r} or pipelines {self.pipelines}")


class Finding(str):
    """Evidence that a precondition fails: the text of what was seen, tagged with its ``code``.

    A ``str`` (messages are built from it as before); ``NotExact(finding)`` and
    :func:`refusal` carry its code.

    >>> f = Finding("MODIFIED_IN_PLACE", "an input of module 0 (Linear) was modified in place")
    >>> f.code, str(f)
    ('MODIFIED_IN_PLACE', 'an input of module 0 (Linear) was modified in place')
    """

    code: str
    module: str | None

    def __new__(cls, code: str, detail: str, module: str | None = None):
        if code not in PRECONDITIONS:
            raise KeyError(f"undeclared precondition code {code!r}")
        self = super().__new__(cls, detail)
        self.code, self.module = code, module
        return self

    def error(self) -> PersampleError:
        return refusal(self.code, str(self), module=self.module)


def refusal(code: str, detail: str | None = None, *, module: str | None = None) -> PersampleError:
    """The exception for precondition ``code``: its declared class, ``detail`` as the message (the
    statement when there is none), with ``code``, ``module`` and the declared ``fix`` attached."""
    pre = PRECONDITIONS[code]
    return pre.error(detail or f"{pre.statement}. Fix: {pre.fix}", code=code, module=module, fix=pre.fix)


def enforce(*findings: str | None) -> None:
    """Raise the refusal of the first finding that is not None (findings in the order declared by the
    caller: that order is the pipeline's order of checks)."""
    for finding in findings:
        if finding is not None:
            raise finding.error() if isinstance(finding, Finding) else NotExact(finding)


TABLE_PAGE = "docs/engines.md"
"""The documentation page that holds :func:`refusal_table` between its markers (relative to the checkout)."""
TABLE_MARKERS = ("<!-- refusals:begin -->", "<!-- refusals:end -->")


def refusal_table() -> str:
    """The documentation's table of refusals, generated from :data:`PRECONDITIONS` (markdown)."""
    rows = ["| code | raises | stage | applies to | precondition | fix |", "|---|---|---|---|---|---|"]
    for pre in PRECONDITIONS.values():
        rows.append(
            f"| `{pre.code}` | `{pre.error.__name__}` | {pre.stage} | {', '.join(pre.pipelines)} | "
            f"{pre.statement} | {pre.fix} |"
        )
    return "\n".join(rows)


def _declare(*preconditions: Precondition) -> dict[str, Precondition]:
    table: dict[str, Precondition] = {}
    for pre in preconditions:
        if pre.code in table:
            raise ValueError(f"precondition code {pre.code} declared twice")
        table[pre.code] = pre
    return table


_ALL_ENGINES = ("fast", "observe", "vmap", "loop", "tracker", "check")
_U, _N, _O, _B = UnsupportedModelError, NotExact, ObservationError, BatchLossMismatch

#: Every precondition, in the order a pipeline checks them (setup first).
PRECONDITIONS: dict[str, Precondition] = _declare(
    # ------------------------------------------------------------------ setup: the model as configured
    Precondition(
        "BATCHNORM_TRAIN",
        _U,
        "setup",
        _ALL_ENGINES,
        "No BatchNorm runs in training mode: it normalises with the statistics of the whole batch, "
        "so example i's loss depends on every other example",
        "persample.fix(model) replaces it with GroupNorm; or keep it and measure the noise from "
        "micro-batch gradients (Tracker.accumulate(estimator='micro-batch')); model.eval() trains "
        "another function",
    ),
    Precondition(
        "BATCHNORM_NO_RUNNING_STATS",
        _U,
        "setup",
        _ALL_ENGINES,
        "No BatchNorm normalises with batch statistics in eval mode (track_running_stats=False)",
        "track_running_stats=True and eval(), or GroupNorm / LayerNorm",
    ),
    Precondition(
        "RANDOM_UNDER_ERROR",
        _U,
        "forward",
        ("fast", "vmap", "loop", "tracker", "check"),
        "No random numbers are drawn under randomness='error'",
        "randomness='different' (an independent draw per example, as a batch does) or 'same', or model.eval()",
    ),
    Precondition(
        "SHARDED_MODEL",
        _U,
        "setup",
        ("fast", "vmap", "loop", "tracker", "check"),
        "The model's parameters are not sharded by FSDP",
        "wrap it with DistributedDataParallel, or compute statistics on an unsharded replica",
    ),
    Precondition(
        "FSDP2_OPTION",
        _U,
        "setup",
        ("fast", "tracker"),
        "On an FSDP2 model the statistics come from FSDP2's own one backward, observed, so no option "
        "needs another pass",
        "leave out clip_norm, check_every, inner_products=True and engines other than 'fast' / 'auto' "
        "(or train with DDP)",
    ),
    Precondition(
        "FSDP2_EMPTY_RANK",
        _U,
        "setup",
        ("fast", "observe", "tracker"),
        "Under FSDP2, every rank has at least one example on a statistics step: each rank's statistics "
        "come from the fast engine's capture of FSDP2's own backward on that rank's examples",
        "give every rank at least one example (DistributedSampler pads the ranks to equal sizes), or take "
        "that step without statistics (Tracker(every=k)); every rank raises it, before any collective",
    ),
    Precondition(
        "EMPTY_RANK",
        _U,
        "setup",
        ("observe", "tracker", "distributed"),
        "Under DDP (replicas in a process group), every rank has at least one example in a Tracker step or "
        "an observed step: p.grad is the average of the ranks' mean gradients, undefined for 0 examples",
        "give every rank at least one example (DistributedSampler pads the ranks to equal sizes, "
        "drop_last=True drops a short last batch); every rank raises it, before any collective",
    ),
    Precondition(
        "DDP_WRAPPER",
        _U,
        "setup",
        ("fast", "vmap", "loop", "check"),
        "The functional entry points get the module, not a DistributedDataParallel wrapper",
        "pass ddp.module and combine ranks with persample.distributed.all_reduce_stats, or use "
        "persample.Tracker(ddp_model, loss_fn)",
    ),
    Precondition(
        "DDP_COMM_HOOK",
        _U,
        "setup",
        ("tracker", "distributed"),
        "Tracker.step averages gradients itself, so DDP has no communication hook to apply",
        "use Tracker.observe around your own DDP backward, or DDP without the hook",
    ),
    Precondition(
        "DDP_MIXED_PRECISION",
        _U,
        "setup",
        ("tracker", "distributed"),
        "Tracker.step averages gradients in the parameters' dtype, so DDP has no mixed_precision",
        "use torch.autocast, or Tracker.observe around your own DDP backward",
    ),
    Precondition(
        "RANDOM_INNER_PRODUCTS",
        _U,
        "setup",
        ("fast", "vmap", "loop"),
        "Inner products against a second forward need the same random draws as the statistics",
        "model.eval(), or inner_products=False",
    ),
    Precondition(
        "TORCH_INTERNALS_UNKNOWN",
        _N,
        "setup",
        ("fast", "observe", "vmap", "tracker"),
        "persample can read the torch internals it needs (hook registries, functorch wrappers) in the layout it knows",
        "engine='auto' takes the per-example loop, which needs none of them; report the torch version",
    ),
    # ---------------------------------------------------------------- hooks that change gradients
    Precondition(
        "PARAMETER_GRADIENT_HOOK",
        _N,
        "setup",
        ("fast", "observe", "vmap"),
        "A parameter's tensor hook (p.register_hook) can be applied to each example's gradient (the fast "
        "engine: the parameter's modules have a built-in rule and are called on the whole batch)",
        "engine='auto' takes an engine that applies it to each example (the fast engine where it can, else "
        "the per-example loop)",
    ),
    Precondition(
        "MODULE_BACKWARD_HOOK",
        _N,
        "setup",
        ("fast", "observe", "vmap"),
        "No module has a backward hook, which may change the gradients of the modules before it",
        "engine='auto' takes the per-example loop, which applies it to each example",
    ),
    Precondition(
        "GRADIENT_REWRITTEN",
        _N,
        "backward",
        ("fast", "observe"),
        "No tensor hook registered in the forward rewrites an activation's gradient",
        "engine='auto' takes the vmap or loop engine, which apply it per example",
    ),
    # ------------------------------------------------------------------ forward: what the model does
    Precondition(
        "VMAP_CANNOT_RUN",
        _N,
        "forward",
        ("vmap",),
        "torch.func.vmap can run the model (no data-dependent control flow, .item(), or op without a batching rule)",
        "engine='auto' takes the per-example loop",
    ),
    Precondition(
        "PARAMETER_NOT_SUBSTITUTED",
        _N,
        "forward",
        ("vmap",),
        "Every trainable parameter the forward and loss_fn read is reached through the model's modules, where "
        "torch.func.functional_call substitutes it (not read by loss_fn from the model, as a regulariser "
        "of the weights, nor through a reference kept outside the module tree): a read of the parameter itself "
        "is a constant to torch.func, and its term of the gradient would be lost",
        "engine='auto' takes the per-example loop, which differentiates every read",
    ),
    Precondition(
        "RANDOM_SAME_BATCHED",
        _N,
        "forward",
        ("fast",),
        "Under randomness='same' the forward draws no random numbers (a batched forward draws per element)",
        "randomness='different', or engine='vmap' (engine='auto' takes it)",
    ),
    Precondition(
        "REENTRANT_CHECKPOINT",
        _N,
        "backward",
        ("fast", "observe"),
        "A re-entrant activation checkpoint's recomputation in the backward can be followed (no layer in its "
        "block is called on an input shared by the batch; torch exposes the block's function)",
        "checkpoint(..., use_reentrant=False) (Hugging Face: gradient_checkpointing_kwargs={'use_reentrant': False})",
    ),
    Precondition(
        "EXPANSION_ESCAPES",
        _N,
        "forward",
        ("fast", "observe"),
        "A layer output expanded over the batch (its input shared by all examples) is used only "
        "in broadcasts with batched tensors",
        "engine='auto' takes the vmap or loop engine",
    ),
    Precondition(
        "BATCH_DIM_AMBIGUOUS",
        _N,
        "forward",
        ("fast", "observe"),
        "Every layer input with dim 0 of the batch's size is batched on dim 0 (not a position "
        "table of length B, nor sequence-first)",
        "pass batch_first tensors, or engine='auto' (vmap or the loop)",
    ),
    Precondition(
        "DIM_ZERO_MOVED",
        _N,
        "backward",
        ("fast", "observe"),
        "Every activation a closed-form rule reads has the examples on dim 0, unambiguously",
        "engine='auto' takes the vmap or loop engine",
    ),
    Precondition(
        "MODIFIED_IN_PLACE",
        _N,
        "backward",
        ("fast", "observe"),
        "No layer input, parameter or output view is changed in place after the layer's call",
        "use an out-of-place op (x = x * 2), or engine='auto'",
    ),
    Precondition(
        "BUFFERS_CHANGED",
        _N,
        "backward",
        ("fast", "observe"),
        "A module the fast engine re-runs does not change its buffers during the forward",
        "engine='auto' takes the vmap or loop engine, which start from the buffers as found",
    ),
    Precondition(
        "PARAMETER_USED_OUTSIDE",
        _N,
        "backward",
        ("fast", "observe"),
        "Every parameter a rule covers is used only by the module that owns it (a use by a module between "
        "the owner and the root is covered: that module becomes one fallback unit for its subtree, from the "
        "call that finds it on)",
        "engine='auto' takes the vmap or loop engine",
    ),
    Precondition(
        "PARAMETER_SUBSTITUTED",
        _N,
        "forward",
        ("fast", "observe"),
        "Every call of a module computes with its own parameters (not with weights derived from them "
        "through torch.func.functional_call: 1.1·W, W + ε, a hypernetwork's, an inner MAML step's)",
        "engine='auto' takes the vmap or loop engine, which differentiate through the derivation",
    ),
    Precondition(
        "BATCH_MIXED",
        _N,
        "backward",
        ("fast", "observe"),
        "The forward keeps the examples apart along the batch dim (no roll, sort, flip, scan, "
        "reduction, cross-row index or x.T @ x over dim 0 on the way to the loss)",
        "engine='auto' computes each example alone (vmap or the loop: loss_fn on a batch of one); "
        "or take the op out of the forward",
    ),
    Precondition(
        "EXAMPLE_DIFFERS_ALONE",
        _N,
        "result",
        ("fast", "tracker"),
        "The forward treats every example as it treats it alone: examples 0 and B-1 computed alone, on a "
        "batch of one (plain autograd), give the fast engine's loss and gradient for them; checked once per "
        "model structure and input signature (no position or batch-size effect: x[0], x.shape[0], "
        "arange(B), narrow/split/unbind along dim 0)",
        "engine='auto' computes each example alone (vmap or the loop: loss_fn on a batch of one); or take "
        "the position or batch-size dependence out of the forward",
    ),
    Precondition(
        "BATCH_OF_ONE_FAILS",
        _U,
        "forward",
        ("vmap", "loop"),
        "Where the forward mixes the examples (BATCH_MIXED, EXAMPLE_DIFFERS_ALONE), engine='auto' computes "
        "each example alone: "
        "the model must run on a batch of one",
        "take the op that combines the examples out of the forward (a train-mode batch norm: persample.fix; "
        "a fixed permutation or index of the batch's rows: apply it to the data outside the model)",
    ),
    Precondition(
        "TORCHSCRIPT_MODULE",
        _N,
        "setup",
        ("fast", "observe"),
        "No module of the model is a TorchScript module (torch.jit.script or torch.jit.trace)",
        "engine='auto' takes the vmap engine or the loop; or use the eager module",
    ),
    Precondition(
        "CAPTURE_HOOK_REFUSED",
        _N,
        "setup",
        ("fast", "observe"),
        "Every module the fast engine watches accepts forward hooks",
        "engine='auto' takes the vmap engine or the loop",
    ),
    # -------------------------------------------------------------------- layers: rules and fallbacks
    Precondition(
        "RULE_NOT_APPLICABLE",
        _N,
        "backward",
        ("fast", "observe"),
        "Every layer with a closed-form rule is called the way its rule covers",
        "engine='auto' takes the vmap or loop engine",
    ),
    Precondition(
        "FALLBACK_NOT_BATCHED",
        _N,
        "backward",
        ("fast", "observe"),
        "Every layer without a rule keeps the examples on its batch dim, in and out",
        "engine='auto' takes the vmap or loop engine",
    ),
    Precondition(
        "FALLBACK_NOT_ISOLATED",
        _N,
        "backward",
        ("fast", "observe"),
        "torch.func can run every layer without a rule on its own, example by example",
        "engine='auto' takes the vmap or loop engine",
    ),
    Precondition(
        "FALLBACK_SUM_MISMATCH",
        _N,
        "result",
        ("fast", "observe"),
        "A layer without a rule gives per-example gradients that add up to autograd's gradient",
        "engine='auto' takes the vmap or loop engine",
    ),
    Precondition(
        "TOKEN_ROWS_DIFFER",
        _N,
        "result",
        ("fast", "observe"),
        "A layer without a rule called on a flattened token batch (an MoE router or its experts on "
        "h.view(-1, d)) computes each example's rows alone as it computed them in the batch (no expert "
        "capacity or other routing that depends on other examples' tokens)",
        "engine='auto' takes the vmap or loop engine (each example alone)",
    ),
    Precondition(
        "CUSTOM_RULE_SUM_MISMATCH",
        _N,
        "result",
        ("fast", "observe"),
        "A rule registered with persample.register_rule gives per-example gradients that add up to autograd's gradient",
        "fix the rule (persample.check_rule tests it against a float64 loop), or unregister_rule",
    ),
    # --------------------------------------------------------------------------------- the loss
    Precondition(
        "OUTPUT_NOT_BATCHED",
        _N,
        "loss",
        ("fast", "observe"),
        "The model's output has a tensor batched on dim 0",
        "return per-example outputs, or engine='auto'",
    ),
    Precondition(
        "LOSS_NOT_PER_EXAMPLE",
        _N,
        "loss",
        ("fast", "observe"),
        "loss_fn's value for an example depends on that example's output alone (not on a loss "
        "the model computed for the whole batch)",
        "give a loss_fn of the logits and the labels (persample.causal_lm_loss() for causal LMs), or engine='auto'",
    ),
    Precondition(
        "MODEL_LOSS_NOT_RECOMPUTED",
        _N,
        "loss",
        ("fast", "observe", "tracker"),
        "A Hugging Face model's own loss (out.loss with labels=) is the Hugging Face loss of its head, "
        "Σ_i w_i L_i of per-example losses recomputed from its logits (no other term, no example "
        "with every label ignored)",
        "give a loss_fn of the logits and the labels (persample.causal_lm_loss() for causal LMs), or "
        "engine='auto' (each example alone)",
    ),
    Precondition(
        "LOSS_NOT_VMAPPABLE",
        _N,
        "loss",
        ("fast", "observe"),
        "torch.func.vmap can evaluate loss_fn on each example of the batched output",
        "engine='auto' takes the per-example loop",
    ),
    # ---------------------------------------------------------------- observe: the user's backward
    Precondition(
        "OBSERVE_NO_BACKWARD",
        _O,
        "backward",
        ("observe",),
        "A forward of the model reached a backward inside the observe block",
        "run loss_fn(model(inputs), targets).backward() inside `with tracker.observe(...)`",
    ),
    Precondition(
        "OBSERVE_AUXILIARY_TERM",
        _O,
        "backward",
        ("observe",),
        "The backwarded loss has no term computed from an activation other than the model's output",
        "keep such terms out of the observed backward, or use Tracker.step / grad_stats",
    ),
    Precondition(
        "OBSERVE_LOSS_NOT_FROM_OUTPUT",
        _O,
        "loss",
        ("observe",),
        "loss_fn(output, targets) depends on the model's batched outputs",
        "give the Tracker a loss_fn of the output and the targets",
    ),
    Precondition(
        "OBSERVE_NOT_WEIGHTED_SUM",
        _O,
        "loss",
        ("observe",),
        "The backwarded loss is a weighted sum Σ_i w_i L_i of the declared per-example losses",
        "declare the per-example loss the backward combines, or pass the targets the loss uses",
    ),
    Precondition(
        "OBSERVE_NO_OUTPUT_GRADIENT",
        _O,
        "loss",
        ("observe",),
        "The backwarded loss has a gradient at the model output that grows with the per-example losses",
        "backward the loss of the model's output inside the block",
    ),
    Precondition(
        "OBSERVE_WEIGHTS_DIFFER",
        _O,
        "loss",
        ("observe",),
        "The backwarded loss weighs every example alike (ℓ = w Σ_i L_i)",
        "a per-example loss that carries the weights (persample.BatchLoss), or Tracker.step",
    ),
    Precondition(
        "OBSERVE_REDUCTION_MISMATCH",
        _O,
        "loss",
        ("observe",),
        "The loss's gradient at the output matches the declared reduction of the per-example losses",
        "declare the reduction the loss uses (reduction=None reads it from the backward)",
    ),
    Precondition(
        "OBSERVE_SUM_MISMATCH",
        _O,
        "result",
        ("observe",),
        "The per-example gradients add up to the change in p.grad",
        "keep regularisers and other backwards out of the observe block",
    ),
    # ------------------------------------------------------------------ the invariant, asserted
    Precondition(
        "MEAN_MISMATCH",
        MeanMismatchError,
        "result",
        ("check", "tracker"),
        "The mean of the per-example gradients equals autograd's gradient of the mean loss",
        "the model couples examples or draws random numbers differently per call: see "
        "the report's largest differences, and explain(model, ...)",
    ),
    # ------------------------------------------------------------------------ batch losses (Tracker)
    Precondition(
        "BATCH_LOSS_COUPLED",
        _B,
        "loss",
        ("fast", "vmap", "loop"),
        "grad_stats / per_sample_grads: loss_fn on the whole batch is a weighted sum Σ_i w_i L_i of "
        "loss_fn on each example alone (not NT-Xent, CLIP, batch-hard triplets, batch-centred errors "
        "or a load-balancing term over the batch)",
        "batch_loss_check=False for the batch-of-one gradients on purpose; or a per-example loss",
    ),
    Precondition(
        "BATCH_LOSS_MISMATCH",
        _B,
        "loss",
        ("tracker", "observe"),
        "The batch loss is Σ_i w_i L_i of the declared per-example losses",
        "declare the per-example loss the batch loss combines (persample.BatchLoss), or pass the targets the loss uses",
    ),
    Precondition(
        "BATCH_LOSS_NOT_FINITE",
        _B,
        "loss",
        ("tracker", "observe"),
        "The batch loss's gradient at the model output is finite",
        "find the example that overflows (grad_stats reports per-example losses), or lower the learning rate",
    ),
    Precondition(
        "EXAMPLE_LOSS_NOT_FINITE",
        _B,
        "loss",
        ("tracker", "observe"),
        "Every per-example loss is finite where the batch loss is (no example with all targets ignored)",
        "describe each example by a sum: persample.BatchLoss(loss_fn, per_example=<reduction='sum'>), "
        "or persample.causal_lm_loss()",
    ),
    Precondition(
        "OPAQUE_LOSS_NOT_MEAN",
        _B,
        "loss",
        ("tracker",),
        "A loss computed inside the model gives p.grad that is a multiple of the mean per-example gradient",
        "give a loss_fn of the output and the targets (persample.causal_lm_loss() for token losses)",
    ),
    Precondition(
        "CLIP_NEEDS_EQUAL_WEIGHTS",
        _B,
        "loss",
        ("tracker",),
        "With clip_norm, the batch loss weighs every example equally",
        "a per-example loss that carries the weights, or no clip_norm",
    ),
    Precondition(
        "OTHER_RANK_FAILED",
        OtherRankFailed,
        "result",
        ("tracker", "distributed"),
        "Every rank of the process group completes the step: where one rank raises, every other rank raises "
        "OtherRankFailed in the same collective step, so that all ranks have one outcome",
        "read the failed ranks' own errors in their logs (err.ranks lists them) and fix that; this rank "
        "undid the same work",
    ),
)


def _fix_of(code: str) -> str | None:
    pre = PRECONDITIONS.get(code)
    return pre.fix if pre is not None else None


errors.declared_fix = _fix_of  # errors sits below the registry: it is told the fixes, it does not import them


def with_refusal_table(page: str) -> str:
    r"""``page`` (markdown text) with the text between :data:`TABLE_MARKERS` replaced by :func:`refusal_table`.

    Raises ``ValueError`` when the page does not hold both markers, in that order.

    >>> print(with_refusal_table("intro\n<!-- refusals:begin -->\nold\n<!-- refusals:end -->\n").splitlines()[2])
    | code | raises | stage | applies to | precondition | fix |
    """
    begin, end = TABLE_MARKERS
    head, sep, rest = page.partition(begin)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise ValueError(f"the page has no {begin} ... {end} markers")
    return f"{head}{begin}\n{refusal_table()}\n{end}{tail}"


def main(argv: list[str] | None = None) -> None:
    """``python -m persample.contract``: print the table; ``--write [PAGE]``: rewrite it in PAGE (from a checkout)."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m persample.contract", description=main.__doc__)
    parser.add_argument("--write", nargs="?", const=TABLE_PAGE, metavar="PAGE", help=f"default: {TABLE_PAGE}")
    args = parser.parse_args(argv)
    if args.write is None:
        print(refusal_table())
        return
    path = Path(args.write)
    path.write_text(with_refusal_table(path.read_text()))
    print(f"wrote the table of {len(PRECONDITIONS)} refusals into {path}")


if __name__ == "__main__":  # python -m persample.contract [--write]: the documentation's table of refusals
    main()
