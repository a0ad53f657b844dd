"""One rank of the DDP cells of tests/test_integrations_matrix_ddp.py (run as a script, never collected).

    python tests/_distributed_observe_worker.py OUT_DIR

Like ``_distributed_worker.py`` (whose helpers it uses), for ``Tracker.observe`` around the backward of
``DistributedDataParallel`` with ``find_unused_parameters=True`` or ``static_graph=True``: DDP passes the
output through its ``_DDPSink``, whose backward the observed backward goes through.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)

import persample  # noqa: E402
from _distributed_worker import close, close_dicts, local_batches, main, mlp, rank_world  # noqa: E402

SCENARIOS: dict[str, tuple] = {}


def scenario(*worlds):
    def register(fn):
        SCENARIOS[fn.__name__] = (fn, worlds)
        return fn

    return register


class WithUnused(nn.Module):
    """An MLP with a head its forward never calls (find_unused_parameters has something to find)."""

    def __init__(self, seed=0):
        super().__init__()
        self.net = mlp(seed)
        self.unused = nn.Linear(3, 3).double()

    def forward(self, x):
        return self.net(x)


def _observe_equals_step(make, **ddp_kwargs):
    from torch.nn.parallel import DistributedDataParallel

    loss = F.cross_entropy
    observed = DistributedDataParallel(make(), **ddp_kwargs)
    stepped = DistributedDataParallel(make(), **ddp_kwargs)
    plain = DistributedDataParallel(make(), **ddp_kwargs)
    observing = persample.Tracker(observed, loss)
    stepping = persample.Tracker(stepped, loss)
    for step, (x, y, gx, gy) in enumerate(local_batches(3, seed=41)):
        for model in (observed, stepped, plain):
            model.zero_grad(set_to_none=True)
        with observing.observe(y) as obs:
            loss(observed(x), y).backward()
        reference = stepping.step(x, y)
        loss(plain(x), y).backward()
        assert obs.stats is not None, f"step {step}: observe gave no statistics"
        close_dicts(obs.stats.mean, reference.mean, f"step {step}: observed mean vs Tracker.step")
        close_dicts(obs.stats.var, reference.var, f"step {step}: observed var vs Tracker.step")
        close(obs.stats.sq_norms, reference.sq_norms, f"step {step}: observed per-example norms vs Tracker.step")
        for (n, a), b in zip(observed.named_parameters(), plain.parameters()):
            assert (a.grad is None) == (b.grad is None), n
            if a.grad is not None:
                close(a.grad, b.grad, f"step {step}: p.grad of {n} after observe")
        whole = persample.grad_stats(make(), loss, gx, gy)  # the global batch on one process (parameters
        if step == 0:  # have moved after step 0 only in the optimizer-free loop: none here)
            close_dicts(obs.stats.mean, whole.mean, "observed global mean vs one process")


@scenario(2)
def observe_equals_step_under_find_unused_parameters():
    _observe_equals_step(lambda: mlp(seed=7), find_unused_parameters=True)


@scenario(2)
def observe_equals_step_under_find_unused_parameters_with_an_unused_head():
    _observe_equals_step(lambda: WithUnused(seed=7), find_unused_parameters=True)


@scenario(2)
def observe_equals_step_under_static_graph():
    _observe_equals_step(lambda: mlp(seed=7), static_graph=True)


@scenario(2)
def a_refusal_on_one_rank_skips_the_step_on_every_rank():
    """on_refusal="skip": rank 0 refuses (a gradient hook that rewrites the gradient, here by x 1), rank 1
    could compute its part: the step is skipped on both (one outcome, nobody left waiting in a collective),
    and p.grad is DDP's average."""
    from torch.nn.parallel import DistributedDataParallel

    rank, _ = rank_world()
    model = mlp(seed=3)
    if rank == 0:

        def rewrite(module, args, output):
            output.register_hook(lambda g: g * 1.0)

        model[1].register_forward_hook(rewrite)
    observed, plain = DistributedDataParallel(model), DistributedDataParallel(mlp(seed=3))
    tracker = persample.Tracker(observed, F.cross_entropy, on_refusal="skip")
    x, y, _, _ = local_batches(1, seed=51)[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SkippedStatisticsWarning)
        with tracker.observe(y) as obs:
            F.cross_entropy(observed(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    assert obs.stats is None and obs.skipped and tracker.skipped == [0], (obs.stats, tracker.skipped)
    assert tracker.last_stats is None and len(tracker.refused) == 1
    for (n, a), b in zip(observed.named_parameters(), plain.parameters()):
        close(a.grad, b.grad, f"p.grad of {n}")


# ------------------------------------------------------------------ the HF Trainer and Lightning under DDP


def _gathered(tensor):
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor)
    return torch.cat(parts)


def _hf_under_ddp(**ddp_args):
    """track(trainer) under the Trainer's own DDP (gloo, 2 ranks, 2 examples each): parameters identical to
    the untracked run; the logged statistics are those of the global batch (the float64 oracle)."""
    import copy
    import tempfile

    import transformers

    from persample.integrations.transformers import track
    from test_integrations import lm_examples, oracle_noise_scale
    from zoo import gpt2_tiny

    torch.manual_seed(0)
    model = gpt2_tiny().double().train()
    examples = lm_examples(8)
    start = copy.deepcopy(model)

    def run(m, tracked):
        args = transformers.TrainingArguments(
            output_dir=tempfile.mkdtemp(),
            per_device_train_batch_size=2,
            max_steps=1,
            learning_rate=1e-2,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            dataloader_drop_last=True,
            disable_tqdm=True,
            ddp_backend="gloo",
            **ddp_args,
        )
        trainer = transformers.Trainer(model=m, args=args, train_dataset=examples)
        seen = []
        if tracked:
            track(trainer)
            inner = trainer.training_step

            def recording(model, inputs, *a, **k):
                seen.append({key: v.clone() for key, v in inputs.items()})
                return inner(model, inputs, *a, **k)

            trainer.training_step = recording
        trainer.train()
        return trainer, seen

    plain = copy.deepcopy(model)
    run(plain, False)
    trainer, seen = run(model, True)
    for (n, a), b in zip(plain.named_parameters(), model.parameters()):
        close(a, b, f"parameter {n}", rtol=0, atol=0)
    rows = [h for h in trainer.state.log_history if "persample/b_simple" in h]
    assert len(rows) == 1 and rows[0]["persample/skipped_steps"] == 0, trainer.state.log_history
    batch = [
        dict(input_ids=i, attention_mask=a, labels=y)
        for i, a, y in zip(
            _gathered(seen[0]["input_ids"]), _gathered(seen[0]["attention_mask"]), _gathered(seen[0]["labels"])
        )
    ]
    oracle = oracle_noise_scale(start, batch)
    close(rows[0]["persample/b_simple"], oracle.b_simple, "b_simple vs the oracle", rtol=1e-6, atol=0)
    close(rows[0]["persample/trace_cov"], oracle.trace_cov, "trace_cov vs the oracle", rtol=1e-6, atol=0)


@scenario(2)
def hf_trainer_under_ddp_default_find_unused_parameters():
    _hf_under_ddp()


@scenario(2)
def hf_trainer_under_ddp_static_graph():
    _hf_under_ddp(ddp_find_unused_parameters=False, ddp_static_graph=True)


def _lightning_under_ddp(**ddp_kwargs):
    """PersampleCallback under Lightning's DDPStrategy (gloo, 2 ranks, 4 examples each, 2 steps): parameters
    identical to the untracked run; the first step's statistics are the global batch's oracle."""
    import copy

    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from persample import noise
    from persample.integrations.lightning import PersampleCallback
    from test_integrations import _lightning_module
    from zoo import oracle_grads

    g = torch.Generator().manual_seed(0)
    data = (torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
    start = _lightning_module().double()
    seen = []

    class Record(L.pytorch.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([t.clone() for t in batch])

    def fit(module, tracked):
        callbacks = [PersampleCallback(F.cross_entropy), Record()] if tracked else []
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=4)
        trainer = L.Trainer(
            max_steps=2,
            strategy=DDPStrategy(process_group_backend="gloo", **ddp_kwargs),
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=2,
            precision="64-true",
        )
        trainer.fit(module, loader)
        return callbacks[0] if callbacks else None

    plain, tracked = copy.deepcopy(start), copy.deepcopy(start)
    fit(plain, False)
    callback = fit(tracked, True)
    for (n, a), b in zip(plain.named_parameters(), tracked.parameters()):
        close(a, b, f"parameter {n}", rtol=0, atol=0)
    assert callback.tracker.refused == [] and len(callback.diagnostics.rows) == 2, callback.tracker.refused
    x, y = _gathered(seen[0][0]), _gathered(seen[0][1])
    grads, _ = oracle_grads(copy.deepcopy(start.net), F.cross_entropy, x, y)
    oracle = noise.gradient_noise_scale(
        persample.GradStats.from_per_example(
            {f"net.{k}": v for k, v in grads.items()}, torch.zeros(len(y), dtype=torch.float64)
        )
    )
    close(callback.diagnostics.rows[0]["b_simple"], oracle.b_simple, "b_simple vs the oracle", rtol=1e-9, atol=0)


@scenario(2)
def lightning_under_ddp():
    _lightning_under_ddp()


@scenario(2)
def lightning_under_ddp_find_unused_parameters():
    _lightning_under_ddp(find_unused_parameters=True)


@scenario(2)
def lightning_under_ddp_static_graph():
    _lightning_under_ddp(static_graph=True)


if __name__ == "__main__":  # _distributed_worker's driver, with this registry
    main(sys.argv[1], SCENARIOS, {})
