"""Engines turn a batch into per-example gradient information.

Each engine is a plain function of ``(model, loss_fn, batch)``; none keeps
state on modules or parameters. Each is exact or raises
:class:`~persample.errors.NotExact`; ``engine="auto"`` tries them in this order:

- :mod:`.fast` (a package): one forward + backward, closed-form layer rules,
  no B × P gradients; refuses what it cannot prove.
- :mod:`.vmap`: ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``),
  streamed over chunks; refuses what ``torch.func`` cannot run.
- :mod:`.loop`: one ordinary forward + backward per example; exact for any model.

Beside them: :mod:`.streaming` (chunked reduction shared by vmap and loop),
:mod:`.directional` (per-example inner products from one forward-mode pass),
:mod:`._functional` (vmap-friendly forwards for RNNs and train-mode InstanceNorm),
:mod:`._autograd` (gradients without touching ``.grad``, also under re-entrant checkpointing).
"""
