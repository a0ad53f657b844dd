"""Integrations with training frameworks, as optional extras.

- :mod:`persample.integrations.transformers`: Hugging Face ``Trainer``
  (``pip install -e ".[hf]"``).
- :mod:`persample.integrations.lightning`: PyTorch Lightning ``Trainer``
  (``pip install -e ".[lightning]"``).

Both observe the framework's own forward and backward (:meth:`persample.Tracker.observe`),
so they never change ``p.grad``: training is exactly what it is without them.
"""
