"""FSDP through the frameworks, as a user runs them: 2 gloo processes on CPU, each bounded in time.

- Lightning ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in ``configure_model``) with
  :class:`persample.integrations.lightning.PersampleCallback`: the statistics of the first step are
  those of the global batch (a float64 per-example loop over both ranks' examples), sharded.
- Lightning ``FSDPStrategy`` is FSDP1: persample refuses it (``SHARDED_MODEL``, naming FSDP2 and DDP);
  Lightning itself refuses it on CPU ("requires a GPU accelerator"), so here it is skipped with
  that reason when Lightning refuses.
- The HF Trainer with an FSDP2 ``fsdp_config`` (``fsdp_version: 2``): accelerate shards the model in
  place inside ``train()``, after ``track(trainer)`` built the Tracker; the Tracker adopts the sharding
  on its first step (tests/_distributed_worker.py, ``fsdp2_tracker_built_before_fully_shard_adopts_it``).
  accelerate enables FSDP only for GPU-type distributed setups: on CPU it trains with DDP, and the
  test checks the global statistics under DDP, then skips the FSDP2 part with that reason.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from test_distributed import gloo_env, reap, spawn

TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(
    not __import__("torch").distributed.is_available(), reason="torch.distributed is not available"
)

COMMON = """
import json, os, sys, torch, torch.nn.functional as F
torch.set_num_threads(1)
RANK = int(os.environ["RANK"])
OUT = sys.argv[1]


def report(**values):
    with open(f"{OUT}/rank{RANK}.json", "w") as f:
        json.dump(values, f)


def oracle(model, loss, x, y):
    params = dict(model.named_parameters())
    rows, losses = [], []
    for i in range(len(x)):
        li = loss(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(li, list(params.values())))
        losses.append(li.detach())
    g = {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(params)}
    return {k: v.mean(0) for k, v in g.items()}, {k: v.var(0) for k, v in g.items()}, torch.stack(losses)


def compare(stats, mean, var, losses):
    errors = []
    if stats.n != len(losses):
        errors.append(f"n={stats.n}, expected {len(losses)}")
    for k in mean:
        rows = slice(*stats.shard.rows[k]) if stats.shard is not None else slice(None)
        for what, got, want in (("mean", stats.mean[k], mean[k][rows]), ("var", stats.var[k], var[k][rows])):
            if not torch.allclose(got.double(), want, rtol=1e-9, atol=1e-12):
                errors.append(f"{what}[{k}]: {(got.double() - want).abs().max().item():.3e} off")
    if not torch.allclose(stats.losses.double(), losses, rtol=1e-9, atol=1e-12):
        errors.append("losses")
    return errors
"""

LIGHTNING = (
    COMMON
    + """
import lightning as L
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from persample.integrations.lightning import PersampleCallback

STRATEGY = sys.argv[2]


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_model(self):
        if STRATEGY == "model_parallel":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FirstStats(L.Callback):
    stats = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if FirstStats.stats is None:
            FirstStats.stats = persample_callback.tracker.last_stats


g = torch.Generator().manual_seed(1)
x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
mine = slice(8 * RANK, 8 * RANK + 8)  # each rank its own examples (use_distributed_sampler=False)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[mine], y[mine]), batch_size=4)
persample_callback = PersampleCallback(F.cross_entropy)
try:  # Lightning refuses some strategies on CPU in the Trainer's constructor
    strategy = (
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        if STRATEGY == "model_parallel"
        else FSDPStrategy(process_group_backend="gloo")
    )
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                        use_distributed_sampler=False, callbacks=[persample_callback, FirstStats()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(), loader)
except Exception as err:  # noqa: BLE001 - reported to the test
    report(raised=type(err).__name__, code=getattr(err, "code", None), message=str(err))
    raise SystemExit(0)
stats = FirstStats.stats
first = [0, 1, 2, 3, 8, 9, 10, 11]  # the first batch of each rank, in rank order
torch.manual_seed(0)
reference = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
mean, var, losses = oracle(reference, F.cross_entropy, x[first], y[first])
mean = {"net." + k: v for k, v in mean.items()}
var = {"net." + k: v for k, v in var.items()}
report(errors=compare(stats, mean, var, losses), sharded=stats.shard is not None, n=stats.n)
"""
)

HF = (
    COMMON
    + """
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
import persample
from persample.integrations.transformers import track

torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.randint(1, 64, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


args = TrainingArguments(output_dir=f"{OUT}/hf", per_device_train_batch_size=4, max_steps=1, use_cpu=True,
                         fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]},
                         report_to=[], save_strategy="no", ddp_backend="gloo")
trainer = Trainer(model=model, args=args, train_dataset=Tokens())
callback = track(trainer)
trainer.train()
from persample._sharding import sharding_of

stats = callback.tracker.last_stats
report(sharding=sharding_of(trainer.model), wrapped=type(trainer.model_wrapped).__name__, n=stats.n,
       sharded=stats.shard is not None)
"""
)


def _run(tmp_path: Path, source: str, *args: str) -> list[dict]:
    script = tmp_path / "user.py"
    script.write_text(source)
    env = gloo_env(2, LOCAL_WORLD_SIZE="2", GROUP_RANK="0", TORCHELASTIC_RUN_ID="persample-test")
    procs = spawn(2, [sys.executable, str(script), str(tmp_path), *args], env, cwd=tmp_path)
    outputs = reap(procs, timeout=TIMEOUT_S)
    results = []
    for rank, ((proc, _), out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0 and "terminate called" not in out, (
            f"rank {rank} exited with {proc.returncode}:\n{out[-3000:]}"
        )
        results.append(json.loads((tmp_path / f"rank{rank}.json").read_text()))
    return results


def test_lightning_model_parallel_strategy_fsdp2_gives_the_global_statistics(tmp_path):
    pytest.importorskip("lightning")
    for rank, result in enumerate(_run(tmp_path, LIGHTNING, "model_parallel")):
        assert "raised" not in result, (rank, result)
        assert result["errors"] == [] and result["sharded"] and result["n"] == 8, (rank, result)


def test_lightning_fsdp_strategy_is_fsdp1_refused_clearly(tmp_path):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.strategies import FSDPStrategy

    try:  # Lightning checks the accelerator in the Trainer's constructor, before any process starts
        L.Trainer(accelerator="cpu", devices=2, strategy=FSDPStrategy(process_group_backend="gloo"), logger=False)
    except ValueError as err:
        if "requires a GPU accelerator" in str(err):
            pytest.skip(f"Lightning's FSDPStrategy refuses CPU itself: {str(err)[:160]}")
    results = _run(tmp_path, LIGHTNING, "fsdp")
    for rank, result in enumerate(results):
        assert "raised" in result, (rank, result)  # FSDP1 never trains with persample's statistics
        if "requires a GPU accelerator" in result["message"]:
            pytest.skip(f"Lightning's FSDPStrategy refuses CPU itself: {result['message'][:160]}")
        assert result["code"] == "SHARDED_MODEL" and "FSDP1" in result["message"], (rank, result)
        assert "fully_shard" in result["message"] and "DistributedDataParallel" in result["message"], result


def test_hf_trainer_with_an_fsdp2_config(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    results = _run(tmp_path, HF)
    for rank, result in enumerate(results):
        assert result["n"] == 8, (rank, result)  # the global batch's statistics, whatever the backend
        if result["sharding"] is None:
            import accelerate

            pytest.skip(
                f"accelerate {accelerate.__version__} enables FSDP only for GPU-type distributed setups: on "
                f"CPU the Trainer trained with {result['wrapped']} (global statistics checked, n = 8)"
            )
        assert result["sharding"] == "FSDP2" and result["sharded"], (rank, result)
