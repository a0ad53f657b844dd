"""Forwards that update state they read: buffers (spectral norm's power iteration) and random draws.

Every example's gradient is that of the model as found (the batch forward's view), however the engines
split the batch. The vmap engine copied the buffers once for all chunks, so spectral norm moved along
from chunk to chunk (statistics off by ~1e-4 relative, silently, with chunk_size < B); under
randomness="same" every chunk drew its own "shared" mask. The fast engine re-ran a parametrised module
whose forward had already advanced its buffers, and its sum check only sometimes noticed.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from zoo import assert_dicts_close


def _spectral_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(5, 6)), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(b=7):
    torch.manual_seed(1)
    return torch.randn(b, 5, dtype=torch.float64), torch.randint(0, 3, (b,))


def _oracle_mean(model, x, y):
    """autograd's gradient of the mean loss of one batch forward from the buffers as found (a copy)."""
    import copy

    twin = copy.deepcopy(model)
    params = [p for p in twin.parameters() if p.requires_grad]
    return dict(
        zip(
            [n for n, p in twin.named_parameters() if p.requires_grad],
            torch.autograd.grad(F.cross_entropy(twin(x), y), params),
        )
    )


@pytest.mark.parametrize("chunk_size", [None, 2, 3])
def test_vmap_engine_chunks_start_from_the_buffers_as_found(chunk_size):
    model, (x, y) = _spectral_model(), _batch()
    expected = _oracle_mean(model, x, y)
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="vmap", chunk_size=chunk_size)
    grads = persample.per_sample_grads(model, F.cross_entropy, x, y, engine="vmap", chunk_size=chunk_size)
    assert_dicts_close(stats.mean, expected)
    assert_dicts_close({n: g.mean(0) for n, g in grads.items()}, expected)
    persample.check_mean(model, F.cross_entropy, x, y, engine="vmap", chunk_size=chunk_size)


def test_the_fast_engine_refuses_a_module_that_changed_its_buffers_and_auto_is_exact():
    model, (x, y) = _spectral_model(), _batch()
    with pytest.raises(persample.NotExact, match=r"module 0 \(ParametrizedLinear\) changed its buffers"):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="auto")
    assert_dicts_close(stats.mean, _oracle_mean(model, x, y))


def test_randomness_same_shares_one_draw_across_chunks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double().train()
    x, y = _batch()
    results = []
    for chunk_size in (7, 2):
        torch.manual_seed(3)
        results.append(
            persample.grad_stats(model, F.cross_entropy, x, y, engine="vmap", randomness="same", chunk_size=chunk_size)
        )
    torch.testing.assert_close(results[1].sq_norms, results[0].sq_norms, rtol=1e-12, atol=0)
    assert_dicts_close(results[1].mean, results[0].mean)
