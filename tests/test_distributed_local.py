"""persample.distributed without a process group: clear errors, and no change to single-process use."""

import pytest
import torch
from torch import nn

import persample
from persample.distributed import all_reduce_gradients, all_reduce_stats, is_distributed


def _model_and_batch():
    torch.manual_seed(0)
    return nn.Linear(3, 2).double(), torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))


def test_collectives_need_a_process_group():
    model, x, y = _model_and_batch()
    stats = persample.grad_stats(model, nn.functional.cross_entropy, x, y)
    assert not is_distributed()
    with pytest.raises(RuntimeError, match=r"all_reduce_stats needs an initialized torch.distributed process group"):
        all_reduce_stats(stats)
    with pytest.raises(RuntimeError, match="all_reduce_gradients needs an initialized"):
        all_reduce_gradients(dict(model.named_parameters()))
    with pytest.raises(RuntimeError, match="Tracker\\(distributed=True\\) needs an initialized"):
        persample.Tracker(model, nn.functional.cross_entropy, distributed=True)


def test_tracker_without_a_process_group_is_single_process():
    model, x, y = _model_and_batch()
    tracker = persample.Tracker(model, nn.functional.cross_entropy)
    stats = tracker.step(x, y)
    assert stats.part_sizes is None and tracker._replicas is None
    with pytest.raises(ValueError, match="all-reduced record"):
        persample.noise.rank_noise_scale(stats)
