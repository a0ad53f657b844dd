"""Random draws are detected by what the model calls, never by the process-wide generators' state.

Other threads (a data loader's augmentation) draw from torch's global generator too. Comparing its state
before and after a forward made ``Tracker.step`` fail with "draws random numbers" on a model without any
random op, and restoring it on return (``grad_stats``) rewound those threads: they drew the same numbers
again.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import UnsupportedModelError

from zoo import assert_dicts_close, oracle_grads


class Augmenter:
    """A background thread drawing from torch's global generator until stopped."""

    def __init__(self):
        self.draws: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.draws.append(int(torch.randint(0, 2**62, (1,)).item()))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return model, torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))


@pytest.mark.parametrize("engine", ["auto", "fast", "loop"])
def test_tracker_steps_are_not_refused_while_another_thread_draws(engine):
    model, x, y = _model()
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    tracker = persample.Tracker(model, F.cross_entropy, engine=engine)
    with warnings.catch_warnings(), Augmenter() as augmenter:
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        for _ in range(8):
            model.zero_grad()
            stats = tracker.step(x, y)
    assert len(augmenter.draws) > 8
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
def test_grad_stats_never_rewinds_another_threads_generator(engine):
    model, x, y = _model()
    with warnings.catch_warnings(), Augmenter() as augmenter:
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        for _ in range(8):
            persample.grad_stats(model, F.cross_entropy, x, y, engine=engine, inner_products=True, chunk_size=2)
            persample.per_sample_grads(model, F.cross_entropy, x, y, engine="loop" if engine == "loop" else "vmap")
    assert len(augmenter.draws) > 8
    assert len(set(augmenter.draws)) == len(augmenter.draws), "a rewound generator drew the same numbers again"


class PrivateNoise(nn.Module):
    """Draws from its own generator: the global state never moves, the forward is random all the same."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        return self.lin(x + 0.1 * torch.randn(x.shape, generator=self.generator, dtype=x.dtype))


class FunctionalDropout(nn.Module):
    def __init__(self, training: bool):
        super().__init__()
        self.lin, self.drop_training = nn.Linear(5, 3), training

    def forward(self, x):
        return self.lin(F.dropout(x, 0.3, self.drop_training))


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop", "auto"])
@pytest.mark.parametrize("build", [PrivateNoise, lambda: FunctionalDropout(True)], ids=["private-generator", "dropout"])
def test_random_calls_are_refused_under_randomness_error(engine, build):
    torch.manual_seed(0)
    model = build().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    state = torch.random.get_rng_state()
    with pytest.raises(UnsupportedModelError, match=r"draws random numbers.*\[RANDOM_UNDER_ERROR\]"):
        persample.grad_stats(model, F.cross_entropy, x, y, engine=engine)
    assert torch.equal(state, torch.random.get_rng_state())  # refused before drawing from the global generator


def test_dropout_that_is_off_is_not_a_random_call():
    torch.manual_seed(0)
    model = FunctionalDropout(False).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    for engine in ("fast", "loop"):
        assert_dicts_close(
            persample.grad_stats(model, F.cross_entropy, x, y, engine=engine).mean,
            {k: g.mean(0) for k, g in grads.items()},
        )
