"""The same code on CUDA: results equal the float64 loop oracle computed on the CPU (independent of
persample), and the mean check holds (float32).

Skipped, and reported as skipped, on machines without CUDA (CI has none: .ci/run and the pytest summary say
so); ``python -m pytest -m cuda tests/test_cuda.py`` runs them where a GPU is.
"""

import pytest
import torch

import persample

from oracle_stats import oracle_stats
from zoo import CASE_IDS, CASES, assert_dicts_close

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: v.to(device) for k, v in obj.items()}
    return tuple(t.to(device) for t in obj)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_matches_cpu_in_float64(case):
    model, inputs, targets = case.instantiate(batch=6)
    cpu = oracle_stats(model, case.loss_fn, inputs, targets)  # float64 loop of autograd, on the CPU
    cuda_model = model.cuda()
    gpu = persample.grad_stats(
        cuda_model, case.loss_fn, _to(inputs, "cuda"), _to(targets, "cuda"), chunk_size=4, inner_products=True
    )
    gpu = gpu.to("cpu")
    assert_dicts_close(gpu.mean, cpu["mean"])
    assert_dicts_close(gpu.var, cpu["var"], atol=1e-11)
    assert_dicts_close(gpu.param_sq_norms, cpu["param_sq_norms"])
    torch.testing.assert_close(gpu.inner_products, cpu["inner_products"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gpu.losses, cpu["losses"], rtol=1e-9, atol=1e-12)
    grads = persample.per_sample_grads(cuda_model, case.loss_fn, _to(inputs, "cuda"), _to(targets, "cuda"))
    assert all(g.device.type == "cuda" for g in grads.values())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_check_mean_on_cuda_float32(case):
    model, inputs, targets = case.instantiate(batch=8, dtype=torch.float32)
    inputs = _to(inputs, "cuda")
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        inputs = inputs.float()
    elif isinstance(inputs, tuple):
        inputs = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    targets = _to(targets, "cuda")
    targets = targets.float() if targets.is_floating_point() else targets
    report = persample.check_mean(model.cuda(), case.loss_fn, inputs, targets)
    assert report.ok
