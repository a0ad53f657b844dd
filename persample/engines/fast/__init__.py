"""The ``fast`` engine: statistics from one forward + backward, without B × P gradients.

- :mod:`.engine`: the pipeline (capture → pieces → reductions) and its refusals;
- :mod:`.capture`: units, hooks on their inputs and output gradients, the graph audit;
- :mod:`.rules`: closed-form layer rules and the assumptions under which each applies;
- :mod:`.pieces`: one parameter's per-example gradients in factored form, and their reductions;
- :mod:`.losses`: closed-form per-example losses of standard PyTorch losses;
- :mod:`.observe`: the same statistics from the user's own backward (``Tracker.observe``).
"""

from .engine import fast_grad_stats, means_that_differ, output_leaves, per_example_losses

__all__ = ["fast_grad_stats", "means_that_differ", "output_leaves", "per_example_losses"]
