"""The HF Trainer and Lightning integrations keep persample's state in their checkpoints: a run interrupted
after a checkpoint and resumed from it in a new process logs the same rows, to the last digit, as the run
that was never interrupted (rows, log_history, the CSV sink), and every=k stays aligned to the global step."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, os, sys, warnings
    import torch
    torch.set_num_threads(1)  # float32 sums are then the same in every process, whatever else runs
    from persample.loggers import CSVLogger

    def lm_examples(n, T=8, vocab=40):
        g = torch.Generator().manual_seed(0)
        rows = []
        for i in range(n):
            ids = torch.randint(1, vocab, (T,), generator=g)
            length = int(torch.randint(3, T + 1, (1,), generator=g))
            mask = (torch.arange(T) < length).long()
            rows.append({"input_ids": ids * mask, "attention_mask": mask,
                         "labels": torch.where(mask.bool(), ids, torch.full_like(ids, -100))})
        return rows

    def hf(out, resume=None, stop_at=None):
        import transformers
        from persample.integrations.transformers import track
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6,
            learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="steps", save_steps=3, use_cpu=True,
            seed=0, dataloader_drop_last=True, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=lm_examples(24))
        track(trainer, every=2, ema_beta=0.5, sinks=[CSVLogger(os.path.join(out, "persample.csv"))])

        class Stop(transformers.TrainerCallback):  # the run dies after step stop_at
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == stop_at:
                    control.should_training_stop = True

        if stop_at is not None:
            trainer.add_callback(Stop())
        trainer.train(resume_from_checkpoint=resume)
        return [{k: v for k, v in h.items() if k.startswith("persample/") or k == "step"}
                for h in trainer.state.log_history if any(k.startswith("persample/") for k in h)]

    def lightning(out, resume=None, max_epochs=3):
        import lightning as L
        import torch.nn.functional as F
        from torch import nn
        from persample.integrations.lightning import PersampleCallback
        logged = []

        class Classifier(L.LightningModule):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

            def forward(self, x):
                return self.net(x)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self(x), y)

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-2)

        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g))
        loader = torch.utils.data.DataLoader(data, batch_size=4)     # 5 steps an epoch: every=2 must stay aligned
        callback = PersampleCallback(F.cross_entropy, every=2, ema_beta=0.5,
                                     sinks=[CSVLogger(os.path.join(out, "persample.csv"))])
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1)
        trainer = L.Trainer(max_epochs=max_epochs, callbacks=[callback, checkpoints], logger=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
        trainer.fit(Classifier(), loader, ckpt_path=resume)
        return [{k: (v if isinstance(v, (int, float)) else v) for k, v in r.items()} for r in callback.diagnostics.rows]

    if __name__ == "__main__":
        warnings.simplefilter("ignore")
        which, out, resume, result = sys.argv[1:5]
        rows = hf(out, resume=resume) if which == "hf" else lightning(out, resume=resume)
        with open(result, "w") as f:
            json.dump(rows, f)
""")


def _namespace(tmp_path):
    script = tmp_path / "runs.py"
    script.write_text(SCRIPT)
    namespace = {"__name__": "runs"}
    exec(compile(SCRIPT, str(script), "exec"), namespace)
    return script, namespace


def _resume_in_new_process(script, which, out, checkpoint, tmp_path):
    result = tmp_path / f"{which}-resumed.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, str(script), which, str(out), str(checkpoint), str(result)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(result.read_text())


def test_hf_trainer_resumed_from_a_checkpoint_logs_the_same_rows(tmp_path):
    pytest.importorskip("transformers")
    script, ns = _namespace(tmp_path)
    full = ns["hf"](str(tmp_path / "full"))
    assert [r["step"] for r in full] == [1, 3, 5]  # statistics on optimizer steps 0, 2, 4 (logged after them)
    # AdamW's preconditioned noise scale: undefined (not logged) before its first step, logged after
    assert ["persample/b_precond" in r for r in full] == [False, True, True]
    part = tmp_path / "part"
    ns["hf"](str(part), stop_at=5)  # checkpoint-3 saved; rows past it logged; then the run died
    resumed = _resume_in_new_process(script, "hf", part, part / "checkpoint-3", tmp_path)
    assert json.dumps(resumed, sort_keys=True) == json.dumps(full, sort_keys=True)  # to the last digit
    assert (part / "persample.csv").read_text() == (tmp_path / "full" / "persample.csv").read_text()


def test_lightning_resumed_from_a_checkpoint_logs_the_same_rows(tmp_path):
    pytest.importorskip("lightning")
    script, ns = _namespace(tmp_path)
    full_dir, part = tmp_path / "full", tmp_path / "part"
    full = ns["lightning"](str(full_dir))
    assert len(full) == 8  # steps 0, 2, …, 14 of 15 (5 an epoch)
    assert all(r["b_precond"] == r["b_precond"] for r in full[1:])  # AdamW: logged from its second step
    ns["lightning"](str(part), max_epochs=2)  # checkpoints after epochs 1 and 2
    resumed = _resume_in_new_process(script, "lightning", part, part / "epoch=0-step=5.ckpt", tmp_path)
    assert json.dumps(resumed) == json.dumps(full[3:])  # the rows this process logged, from step 6 on
    assert (part / "persample.csv").read_text() == (full_dir / "persample.csv").read_text()
