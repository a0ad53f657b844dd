"""Per-example inner products ⟨g_i, v⟩ from one forward-mode pass, against the float64 oracle."""

import pytest
import torch
from torch import nn

from persample._batch import as_batch
from persample.engines.directional import per_example_directional_derivatives
from persample.errors import UnsupportedModelError

from zoo import CASE_IDS, CASES, oracle_grads


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_directional_derivatives_match_the_oracle(case):
    model, inputs, targets = case.instantiate(batch=5)
    grads, _ = oracle_grads(model, case.loss_fn, inputs, targets)
    g = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(v.shape[1:], generator=g, dtype=torch.float64) for n, v in grads.items()}
    expected = sum(grads[n].reshape(5, -1) @ direction[n].reshape(-1) for n in grads)
    got = per_example_directional_derivatives(model, case.loss_fn, as_batch(inputs, targets), direction)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_directional_derivatives_refuse_dropout_and_bad_directions():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    batch = as_batch(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))
    direction = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match=r"module 1 draws random numbers.*model.eval\(\)"):
        per_example_directional_derivatives(model, nn.functional.cross_entropy, batch, direction)
    model.eval()
    with pytest.raises(ValueError, match=r"no entry for the trainable parameters \['2.bias'\]"):
        per_example_directional_derivatives(
            model, nn.functional.cross_entropy, batch, {k: v for k, v in direction.items() if k != "2.bias"}
        )
    with pytest.raises(ValueError, match=r"direction\['0.weight'\] has shape \(3,\)"):
        per_example_directional_derivatives(
            model, nn.functional.cross_entropy, batch, {**direction, "0.weight": torch.zeros(3)}
        )
