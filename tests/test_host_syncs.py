"""Host-device synchronisations per call, counted on CPU by benchmarks/call_counts.py's ``SyncCounter``
(a TorchDispatchMode that sees ``_local_scalar_dense``, ``nonzero``, data-dependent shapes, ..., plus
the host copies ``Tensor.tolist/cpu/numpy``). Counts are deterministic: no timing here.

Each limit is the count this code reaches on the benchmark case; a change that adds a host read to a
step fails here (lower the limit when a read is removed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def call_counts():
    sys.path.insert(0, str(BENCH))
    try:
        import call_counts as module
        import cases
    finally:
        sys.path.remove(str(BENCH))
    return module, cases


# Every model family of benchmarks/cases.py, at tiny sizes (the counts do not depend on the sizes, except where
# a size makes the batch dim ambiguous: GPT-2's B differs from its heads and positions here).
TINY = {
    "mlp": lambda cases: cases.mlp_problem(8),
    "cnn": lambda cases: cases.cnn_problem(4),
    "lstm": lambda cases: cases.lstm_problem(4, seq_len=6),
    "mha": lambda cases: cases.mha_problem(4, seq_len=6),
    "gpt2": lambda cases: cases.gpt2_problem(3, layers=1, width=32, heads=2, vocab=50, seq_len=8),
    "gpt2_masked": lambda cases: cases.gpt2_masked_problem(3, layers=1, width=32, heads=2, vocab=50, seq_len=8),
}

# case -> entry point -> most host reads allowed per call beyond the model's own (``plain``: GPT-2's
# forward reads one itself, which every entry point includes). Where the statistics step reads one,
# it is the one copy of every flag of the step (persample/_host_reads.py): the one-pass second moments'
# cancellation flags, the statistics' finiteness, the weights' checks and values. observe reads two:
# that copy where the weights are derived (the scale of its pieces depends on them), and the sums'
# checks (of the fallbacks, and against p.grad) with the cancellation flags at the end. Beyond them, per module kind:
# - Embedding (LSTM, MHA, GPT-2: wte and wpe): none (fixed-size segments: sort, not ``unique``);
# - LSTM: none in grad_stats and Tracker.step (its output check is read with the step's: rerun where it fails);
#   observe reads it at once (the user's backward has run);
# - MultiheadAttention: none (its projections are recorded as it runs: no recomputed output to check);
# - GPT-2's tied embedding without the variance: none (its cross term is one batched product, no ``bincount``).
LIMITS = {
    "mlp": {"grad_stats-fast": 1, "grad_stats-fast-novar": 0, "observe": 2, "observe-novar": 2},
    "cnn": {"grad_stats-fast": 1, "grad_stats-fast-novar": 0, "observe": 2, "observe-novar": 2},
    "lstm": {"grad_stats-fast": 1, "grad_stats-fast-novar": 1, "observe": 3, "observe-novar": 3},
    "mha": {"grad_stats-fast": 1, "grad_stats-fast-novar": 0, "observe": 2, "observe-novar": 2},
    # (the shifted next-token loss has its closed form: grad_stats has no check at the output to read; the
    # Tracker's statistics step derives the weights p.grad needs, one read)
    "gpt2": {
        "grad_stats-fast": 0,
        "grad_stats-fast-novar": 0,
        "observe": 2,
        "observe-novar": 2,
        "tracker-step-stats": 1,
    },
    "gpt2_masked": {"grad_stats-fast": 1, "grad_stats-fast-novar": 1, "observe": 2, "observe-novar": 2},
}
for _case, _limits in LIMITS.items():  # Tracker.step: as grad_stats on a statistics step, none on a plain step
    _limits.setdefault("tracker-step-stats", _limits["grad_stats-fast"])
    _limits.update({"plain": 0, "tracker-step-plain": 0})


def test_the_counter_sees_host_reads(call_counts):
    module, _ = call_counts
    x = torch.arange(6.0)
    with module.SyncCounter() as counter:
        x.sum().item()
        bool(x.any())
        x.nonzero()
        x.tolist()
        torch.unique(x)
        x.add(1)
    assert counter.counts["_local_scalar_dense"] == 2
    assert counter.counts["nonzero"] == 1
    assert counter.counts["Tensor.tolist"] == 1
    assert counter.total == 5
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist  # the patch is undone


def test_every_benchmark_family_is_counted(call_counts):
    _, cases = call_counts
    families = {
        c.builder.__name__.removesuffix("_problem").removeprefix("small_").removeprefix("large_")
        for c in cases.all_cases(quick=True, large=True) + cases.all_cases(large=True)
    }
    assert families == set(TINY)


@pytest.mark.parametrize("case", list(TINY))
def test_host_reads_per_call_stay_at_their_limits(call_counts, case):
    module, cases = call_counts
    torch.manual_seed(0)
    counts = module.count(TINY[case](cases))
    assert set(counts) == set(LIMITS[case])
    own = counts["plain"]["syncs"]
    over = {name: r["sync_ops"] for name, r in counts.items() if r["syncs"] - own > LIMITS[case][name]}
    assert not over, over


def test_a_cnn_with_as_many_channels_as_examples_reads_no_more(call_counts):
    """B = 16 equals the first convolution's channels: every activation has a dim of the batch's size off
    dim 0, which used to run the audit's probe of the rows (one more read, and a backward) on every call.
    Convolutions, pooling and a flattening keep each example's rows, so the counts stay the CNN's."""
    module, cases = call_counts
    torch.manual_seed(0)
    counts = module.count(cases.cnn_problem(16))
    over = {name: r["sync_ops"] for name, r in counts.items() if r["syncs"] > LIMITS["cnn"][name]}
    assert not over, over


@pytest.mark.parametrize("case", ["mlp", "gpt2"])
def test_plain_steps_of_a_tracker_with_every_k_read_nothing(call_counts, case):
    """Tracker(every=3): steps 1 and 2 are a plain forward and backward, with no host read of persample's."""
    import persample

    module, cases = call_counts
    torch.manual_seed(0)
    problem = TINY[case](cases)
    with module.SyncCounter() as own:
        problem.mean_loss().backward()
    tracker = persample.Tracker(problem.model, problem.loss_fn, every=3)
    assert tracker.step(problem.inputs, problem.targets) is not None  # step 0: statistics
    for _ in range(2):
        with module.SyncCounter() as counter:
            assert tracker.step(problem.inputs, problem.targets) is None
        assert counter.total == own.total, dict(counter.counts)


@pytest.mark.parametrize("entry", ["step", "observe"])
def test_the_deferred_cancellation_flag_still_picks_the_two_pass_form(entry):
    """Inside Tracker.step and observe the second moments' cancellation flags are read with the step's
    other reads, after the statistics are built: the two-pass M2 must still replace the one-pass one
    where it cancelled (|ḡ|/σ = 1e4 per element: Σg² − Bḡ² in float32 loses every digit)."""
    import torch.nn.functional as F
    from torch import nn

    import persample

    torch.manual_seed(0)
    B, d = 64, 16
    x = 1.0 + torch.randn(B, d) / 1e4
    model = nn.Sequential(nn.Linear(d, 1, bias=False))  # a rule's closed form: M2 = (b∘b)ᵀ(a∘a) − Bḡ∘ḡ
    y = torch.full((B, 1), -5.0)
    tracker = persample.Tracker(model, F.mse_loss)
    if entry == "step":
        stats = tracker.step(x, y)
    else:
        with tracker.observe(y) as observed:
            F.mse_loss(model(x), y).backward()
        stats = observed.stats
    rows = []
    model64 = nn.Sequential(nn.Linear(d, 1, bias=False)).double()
    model64.load_state_dict(model.state_dict())
    for i in range(B):  # the oracle: a float64 loop
        loss = F.mse_loss(model64(x[i : i + 1].double()), y[i : i + 1].double())
        rows.append(torch.autograd.grad(loss, [model64[0].weight])[0])
    exact = torch.stack(rows).var(0)
    relative = ((stats.var["0.weight"].double() - exact).abs() / exact).max().item()
    assert relative < 1e-3, relative


def test_observe_still_refuses_a_wrong_fallback_when_the_step_reads_its_checks():
    """observe adds a fallback's sum check to the step's reads (no engine to fall back to): a fallback
    whose batch of one is not a row of the batch (its output scales with B) is still refused, naming it."""
    import torch.nn.functional as F
    from torch import nn

    import persample

    class PerBatch(nn.Module):  # no closed-form rule: torch.func's fallback, held to its sums
        def __init__(self, d):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

        def forward(self, x):
            return torch.tanh(x @ self.w) @ self.w.T * x.shape[0] / 8

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), PerBatch(8), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(persample.NotExact) as info:
        with tracker.observe(y):
            F.cross_entropy(model(x), y).backward()
    assert info.value.code == "FALLBACK_SUM_MISMATCH" and "'1.w'" in str(info.value)
