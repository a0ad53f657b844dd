"""Hugging Face Trainer and Lightning integrations: training identical to the plain run, statistics equal
to the float64 loop-of-autograd oracle."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from oracle_stats import noise_scale
from zoo import gpt2_tiny, oracle_grads

B, T, VOCAB = 4, 8, 40
BF16_MEAN_RTOL, BF16_NOISE_RTOL = 0.02, 0.05  # bf16 autocast against the float64 oracle


def lm_examples(n, seed=0):
    """Causal-LM examples with right padding of different lengths (labels -100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (T,), generator=g)
        length = T if i == 0 else int(torch.randint(3, T + 1, (1,), generator=g))
        mask = (torch.arange(T) < length).long()
        rows.append(
            {
                "input_ids": ids * mask,
                "attention_mask": mask,
                "labels": torch.where(mask.bool(), ids, torch.full_like(ids, -100)),
            }
        )
    return rows


def summed_token_loss(out, labels):
    """L_i = Σ_t ℓ_it, HF's next-token loss of one example, summed over its counted tokens (written out here,
    not persample's causal_lm_loss)."""
    logits = out.logits[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def oracle_noise_scale(model, examples):
    """B_simple of the summed next-token losses, from the float64 loop of autograd (formula written out)."""
    inputs = {
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "attention_mask": torch.stack([e["attention_mask"] for e in examples]),
    }
    labels = torch.stack([e["labels"] for e in examples])
    grads, _ = oracle_grads(model.double(), summed_token_loss, inputs, labels)
    return SimpleNamespace(**noise_scale(grads, len(examples)), grads=grads)


# ---------------------------------------------------------------------------------------- transformers


def _hf_train(model, examples, tmp_path, *, tracked, steps, accumulation, bf16=False, **kwargs):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=B // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=1e-2,
        max_grad_norm=0.5,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
        bf16=bf16,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples)
    callback = None
    if tracked:
        from persample.integrations.transformers import track

        callback = track(trainer, **kwargs)
    trainer.train()
    return trainer, callback


@pytest.mark.parametrize("accumulation", [1, 2])
def test_hf_trainer_trains_identically_and_logs_the_oracles_noise_scale(tmp_path, accumulation):
    torch.manual_seed(0)
    model = gpt2_tiny().double().train()
    examples = lm_examples(B)
    oracle = oracle_noise_scale(copy.deepcopy(model), examples)
    _, _ = _hf_train(
        plain := copy.deepcopy(model), examples, tmp_path / "plain", tracked=False, steps=1, accumulation=accumulation
    )
    trainer, callback = _hf_train(
        tracked := copy.deepcopy(model),
        examples,
        tmp_path / "tracked",
        tracked=True,
        steps=1,
        accumulation=accumulation,
    )
    for (name, a), b in zip(plain.named_parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)  # observe never touches p.grad
    logged = [h for h in trainer.state.log_history if "persample/b_simple" in h]
    assert len(logged) == 1 and callback.last_stats.n == B
    # the statistics themselves: HF's loss upcasts logits with .float(), so even a float64 GPT-2 has a float32
    # loss; each field is held to float32 rounding of its largest element (measured: 4.9e-8)
    for name, g in oracle.grads.items():
        for field, want in (("mean", g.mean(0)), ("var", g.var(0))):
            got = getattr(callback.last_stats, field)[name].double()
            err = float((got - want).abs().max() / want.abs().max())
            assert err < 1e-6, f"{field}[{name}]: off by {err:.3g} of its largest element"
    # the Trainer's log history holds the row's values after a float32 round trip
    torch.testing.assert_close(logged[0]["persample/b_simple"], oracle.b_simple, rtol=1e-6, atol=0)
    torch.testing.assert_close(logged[0]["persample/trace_cov"], oracle.trace_cov, rtol=1e-6, atol=0)


def test_hf_trainer_several_steps_bf16_and_every(tmp_path):
    """float32 model, bf16 autocast, accumulation 2, statistics every 2nd step: same parameters as the plain
    run; statistics in float32; the other steps untouched."""
    torch.manual_seed(0)
    model = gpt2_tiny().train()
    examples = lm_examples(3 * B, seed=1)
    _hf_train(
        plain := copy.deepcopy(model), examples, tmp_path / "plain", tracked=False, steps=3, accumulation=2, bf16=True
    )
    trainer, callback = _hf_train(
        tracked := copy.deepcopy(model),
        examples,
        tmp_path / "tracked",
        tracked=True,
        steps=3,
        accumulation=2,
        bf16=True,
        every=2,
    )
    for (name, a), b in zip(plain.named_parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)  # observe never touches p.grad
    steps = [h["step"] for h in trainer.state.log_history if "persample/b_simple" in h]
    assert steps == [1, 3]
    assert all(v.dtype == torch.float32 for v in callback.last_stats.mean.values())


def test_hf_trainer_bf16_accumulation_statistics_are_the_oracles_to_bf16_rounding(tmp_path):
    """bf16 autocast with accumulation 2: the merged statistics of the step are the float64 oracle's on the
    whole batch, to bf16's rounding (measured on this model: the mean within 0.42 % of its largest element;
    allowed 2 %; B_simple within 1.4 %, allowed 5 %)."""
    torch.manual_seed(0)
    model = gpt2_tiny().train()
    examples = lm_examples(B, seed=1)
    inputs = {
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "attention_mask": torch.stack([e["attention_mask"] for e in examples]),
    }
    grads, _ = oracle_grads(
        copy.deepcopy(model).double(), summed_token_loss, inputs, torch.stack([e["labels"] for e in examples])
    )
    oracle = noise_scale(grads, B)
    trainer, callback = _hf_train(model, examples, tmp_path, tracked=True, steps=1, accumulation=2, bf16=True)
    stats = callback.last_stats
    assert stats.n == B and all(v.dtype == torch.float32 for v in stats.mean.values())
    for name, g in grads.items():
        mean = g.mean(0)
        err = (stats.mean[name].double() - mean).abs().max() / mean.abs().max()
        assert err < BF16_MEAN_RTOL, f"{name}: mean off by {err:.3g} of its largest element"
    logged = [h for h in trainer.state.log_history if "persample/b_simple" in h]
    torch.testing.assert_close(logged[0]["persample/b_simple"], oracle["b_simple"], rtol=BF16_NOISE_RTOL, atol=0)
    torch.testing.assert_close(logged[0]["persample/trace_cov"], oracle["trace_cov"], rtol=BF16_NOISE_RTOL, atol=0)


def test_hf_track_needs_a_loss_for_models_without_a_known_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, num_labels=3
    )
    model = transformers.BertModel(config)
    trainer = transformers.Trainer(
        model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    )
    from persample.integrations.transformers import track

    with pytest.raises(ValueError, match="pass loss_fn="):
        track(trainer)


def test_hf_trainer_sequence_classifier_with_its_own_loss(tmp_path):
    """A sequence classifier needs no loss_fn: the statistics are those of the model's own loss (out.loss,
    recomputed per example from the logits), equal to the float64 loop over examples. (Used to raise
    "pass loss_fn=".) The Trainer passes num_items_in_batch, which BERT's inline loss ignores."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config).double().train()
    examples = [{**e, "labels": torch.tensor(i % 3)} for i, e in enumerate(lm_examples(B))]
    inputs = {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "attention_mask", "labels")}
    grads, _ = oracle_grads(copy.deepcopy(model), lambda out: out.loss, inputs)
    _, callback = _hf_train(model, examples, tmp_path, tracked=True, steps=1, accumulation=1)
    stats = callback.last_stats
    assert stats.n == B
    for name, g in grads.items():
        torch.testing.assert_close(stats.mean[name], g.mean(0), rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(stats.var[name], g.var(0), rtol=1e-9, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------------- lightning


def _lightning_module(seed=0):
    L = pytest.importorskip("lightning")
    from torch import nn

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    return Classifier()


def _lightning_fit(module, data, *, tracked, accumulation=1, precision="64-true", batch_size=4, **kwargs):
    L = pytest.importorskip("lightning")
    callbacks = []
    if tracked:
        from persample.integrations.lightning import PersampleCallback

        callbacks.append(PersampleCallback(F.cross_entropy, **kwargs))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=batch_size)
    trainer = L.Trainer(
        max_epochs=1,
        accumulate_grad_batches=accumulation,
        precision=precision,
        gradient_clip_val=0.5,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, loader)
    return trainer, (callbacks[0] if callbacks else None)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_lightning_trains_identically_and_its_statistics_are_the_oracles(accumulation):
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
    start = _lightning_module().double()
    first = data[0][: 4 * accumulation], data[1][: 4 * accumulation]
    grads, _ = oracle_grads(copy.deepcopy(start.net), F.cross_entropy, *first)
    plain = copy.deepcopy(start)
    _lightning_fit(plain, data, tracked=False, accumulation=accumulation)
    tracked = copy.deepcopy(start)
    trainer, callback = _lightning_fit(tracked, data, tracked=True, accumulation=accumulation)
    for (name, a), b in zip(plain.named_parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    first_stats = callback.diagnostics.rows[0]
    oracle = noise_scale(grads, 4 * accumulation)
    torch.testing.assert_close(first_stats["b_simple"], oracle["b_simple"], rtol=1e-9, atol=0)
    torch.testing.assert_close(first_stats["trace_cov"], oracle["trace_cov"], rtol=1e-9, atol=0)
    assert len(callback.diagnostics.rows) == 2 // accumulation
    assert "persample/b_simple" in trainer.callback_metrics


def test_lightning_bf16_mixed_with_accumulation_trains_identically():
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
    start = _lightning_module()
    plain, tracked = copy.deepcopy(start), copy.deepcopy(start)
    _lightning_fit(plain, data, tracked=False, accumulation=2, precision="bf16-mixed")
    grads, _ = oracle_grads(copy.deepcopy(start.net).double(), F.cross_entropy, data[0][:8].double(), data[1][:8])
    oracle = noise_scale(grads, 8)
    _, callback = _lightning_fit(tracked, data, tracked=True, accumulation=2, precision="bf16-mixed")
    for (name, a), b in zip(plain.named_parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)  # observe never touches p.grad
    assert len(callback.diagnostics.rows) == 2 and callback.last_stats.n == 8
    assert all(v.dtype == torch.float32 for v in callback.last_stats.mean.values())
    # the first step's merged statistics (8 examples, two micro-batches) against the float64 oracle
    torch.testing.assert_close(
        callback.diagnostics.rows[0]["b_simple"], oracle["b_simple"], rtol=BF16_NOISE_RTOL, atol=0
    )
    torch.testing.assert_close(
        callback.diagnostics.rows[0]["trace_cov"], oracle["trace_cov"], rtol=BF16_NOISE_RTOL, atol=0
    )
