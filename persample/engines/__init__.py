"""Engines turn a batch into per-example gradient information.

Each engine is a plain function of ``(model, loss_fn, batch)``; none keeps
state on modules or parameters.

- :mod:`.vmap`: ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``), exact for any model.
"""
