"""Red-team findings in the layer users touch in training loops (the Tracker's options and the integrations):
each test trains against a plain loop without persample and checks the statistics against the float64 loop of
autograd (docs/redteam-integrations.md lists the scenarios tried)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from zoo import oracle_grads


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _batches(n_steps, dtype=torch.float32, sizes=(4, 3, 5, 2)):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(sizes[i % len(sizes)], 5, generator=g, dtype=dtype), torch.randint(0, 3, (sizes[i % len(sizes)],)))
        for i in range(n_steps)
    ]


def test_step_takes_a_fresh_grad_scaler_as_its_scale_and_trains_as_the_plain_loop():
    """`step(scale=scaler)` on a fresh GradScaler: the documented `scale=scaler.get_scale()` left the scaler
    uninitialised, and `scaler.step` then raised on the first step (AssertionError: _scale is None)."""
    plain, tracked = _mlp(torch.float64), _mlp(torch.float64)
    opt_p, opt_t = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, tracked))
    scaler_p, scaler_t = (torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2))
    tracker = persample.Tracker(tracked, F.cross_entropy)
    for x, y in _batches(3, torch.float64):
        opt_p.zero_grad()
        opt_t.zero_grad()
        scaler_p.scale(F.cross_entropy(plain(x), y)).backward()
        start = copy.deepcopy(tracked)
        stats = tracker.step(x, y, scale=scaler_t)
        grads, _ = oracle_grads(start, F.cross_entropy, x, y)
        for name, g in grads.items():  # the statistics never include the scale
            torch.testing.assert_close(stats.mean[name], g.mean(0), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(stats.var[name], g.var(0), rtol=1e-9, atol=1e-12)
        for scaler, opt in ((scaler_p, opt_p), (scaler_t, opt_t)):
            scaler.step(opt)
            scaler.update()
    assert scaler_t.get_scale() == scaler_p.get_scale()
    for a, b in zip(plain.parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_step_under_bf16_autocast_with_a_grad_scaler_trains_as_the_plain_loop():
    plain, tracked = _mlp(), _mlp()
    opt_p, opt_t = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, tracked))
    scaler_p, scaler_t = (torch.amp.GradScaler("cpu") for _ in range(2))
    tracker = persample.Tracker(tracked, F.cross_entropy)
    for x, y in _batches(3):
        opt_p.zero_grad()
        opt_t.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(plain(x), y)
        scaler_p.scale(loss).backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stats = tracker.step(x, y, scale=scaler_t)
        assert stats is not None and stats.n == x.shape[0]
        for scaler, opt in ((scaler_p, opt_p), (scaler_t, opt_t)):
            scaler.step(opt)
            scaler.update()
    for a, b in zip(plain.parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_disabled_grad_scaler_is_scale_one_and_a_bad_scale_names_the_scaler():
    model = _mlp(torch.float64)
    x, y = _batches(1, torch.float64)[0]
    tracker = persample.Tracker(model, F.cross_entropy)
    tracker.step(x, y, scale=torch.amp.GradScaler("cpu", enabled=False))
    want = torch.autograd.grad(F.cross_entropy(model(x), y), model[0].weight)[0]
    torch.testing.assert_close(model[0].weight.grad, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="GradScaler"):
        tracker.step(x, y, scale=float("inf"))


def test_observe_around_a_scaled_fp16_backward_trains_bit_for_bit_and_skips_the_overflowing_steps():
    """fp16 autocast + GradScaler with an overflowing first step: observe around `scaler.scale(loss).backward()`
    leaves p.grad as the plain loop's (the scaler skips the same steps), and the overflowing steps have no
    statistics (handled on main; kept as the recommended fp16 recipe)."""
    plain, tracked = _mlp(), _mlp()
    opt_p, opt_t = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, tracked))
    scaler_p, scaler_t = (torch.amp.GradScaler("cpu", init_scale=2.0**20) for _ in range(2))
    tracker = persample.Tracker(tracked, F.cross_entropy)
    data = _batches(4)
    data[1] = (data[1][0] * 1e6, data[1][1])
    for x, y in data:
        opt_p.zero_grad()
        opt_t.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(plain(x), y)
        scaler_p.scale(loss).backward()
        with tracker.observe(y):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(tracked(x), y)
            scaler_t.scale(loss).backward()
        for scaler, opt in ((scaler_p, opt_p), (scaler_t, opt_t)):
            scaler.step(opt)
            scaler.update()
    assert tracker.skipped and scaler_t.get_scale() == scaler_p.get_scale()
    for a, b in zip(plain.parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_lightning_accumulation_over_an_iterable_dataset_merges_only_each_optimizer_steps_batches():
    """An IterableDataset (epoch length unknown to Lightning's batch count): Lightning steps the optimizer
    at the end of each epoch whatever the accumulation; the callback counted batches and merged the
    epoch's last micro-batch with the next epoch's first ones (statistics of 11 examples that no step used)."""
    L = pytest.importorskip("lightning")
    from persample.integrations.lightning import PersampleCallback

    g = torch.Generator().manual_seed(0)
    x_all, y_all = torch.randn(11, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (11,), generator=g)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x_all, y_all))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp(torch.float64)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    class Record(L.pytorch.Callback):  # the model and the batches of each optimizer step
        def __init__(self):
            self.steps = {}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            model, batches = self.steps.setdefault(trainer.global_step, (copy.deepcopy(module.net), []))
            batches.append(batch)

    def fit(module, callbacks):
        trainer = L.Trainer(
            max_epochs=2,
            accumulate_grad_batches=3,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(module, torch.utils.data.DataLoader(Stream(), batch_size=3))

    plain, tracked = Module(), Module()
    fit(plain, [])
    record, callback = Record(), PersampleCallback(F.cross_entropy)
    published = []
    start = callback.on_fit_start

    def on_fit_start(trainer, module):
        start(trainer, module)
        callback.tracker.register_hook(lambda _, stats: published.append((trainer.global_step - 1, stats)))

    callback.on_fit_start = on_fit_start
    fit(tracked, [record, callback])
    for a, b in zip(plain.parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert [stats.n for _, stats in published] == [9, 2, 9, 2]
    for step, stats in published:
        model, batches = record.steps[step]
        grads, _ = oracle_grads(
            model, F.cross_entropy, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        )
        for name, g in grads.items():
            torch.testing.assert_close(stats.mean[f"net.{name}"], g.mean(0), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(stats.var[f"net.{name}"], g.var(0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("how", ["step", "observe"])
def test_an_accumulated_step_with_a_non_finite_micro_batch_has_no_statistics(how):
    """A micro-batch whose statistics are not finite (a NaN input; an fp16 overflow) inside accumulate():
    the block published the other micro-batches' statistics as the step's (n = 3 of 7 examples, while
    the step itself was in tracker.skipped and its p.grad NaN)."""
    model = _mlp(torch.float64)
    tracker = persample.Tracker(model, F.cross_entropy)
    published = []
    tracker.register_hook(lambda _, stats: published.append(stats))
    (x1, y1), (x2, y2) = _batches(2, torch.float64)
    x1 = x1.clone()
    x1[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):  # (observe skipped it silently)
        with tracker.accumulate() as acc:
            for x, y in ((x1, y1), (x2, y2)):
                if how == "step":
                    tracker.step(x, y, scale=0.5)
                else:
                    with tracker.observe(y):
                        (F.cross_entropy(model(x), y) * 0.5).backward()
    assert acc.stats is None and published == [] and tracker.skipped[-1] == 0 and tracker.steps == 1
    with tracker.accumulate() as acc:  # the next block is whole again
        for x, y in ((x2, y2), (x2, y2)):
            tracker.step(x, y, scale=0.5)
    assert acc.stats is not None and acc.stats.n == 2 * x2.shape[0] and len(published) == 1


def test_step_with_on_refusal_skip_trains_through_a_refused_step_as_the_plain_loop():
    """Tracker(on_refusal="skip").step on a model every exact engine refuses in training mode (BatchNorm)
    raised UnsupportedModelError and stopped training; now the step is the plain backward (the same
    dropout draws), skipped with the reason, and the eval-mode steps between have the oracle's statistics."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Dropout(0.3), nn.Tanh(), nn.Linear(7, 3)).double()

    plain, tracked = make(), make()
    opt_p, opt_t = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, tracked))
    tracker = persample.Tracker(tracked, F.cross_entropy, on_refusal="skip")
    with pytest.warns(persample.SkippedStatisticsWarning, match="BATCHNORM_TRAIN"):
        for i, (x, y) in enumerate(_batches(4, torch.float64, sizes=(6,))):
            training = i % 2 == 0
            plain.train(training)
            tracked.train(training)
            opt_p.zero_grad()
            opt_t.zero_grad()
            torch.manual_seed(100 + i)
            F.cross_entropy(plain(x), y).backward()
            start = copy.deepcopy(tracked)
            torch.manual_seed(100 + i)
            stats = tracker.step(x, y)
            if training:
                assert stats is None
            else:
                grads, _ = oracle_grads(start, F.cross_entropy, x, y)
                for name, g in grads.items():
                    torch.testing.assert_close(stats.mean[name], g.mean(0), rtol=1e-9, atol=1e-12)
                    torch.testing.assert_close(stats.var[name], g.var(0), rtol=1e-9, atol=1e-12)
            for a, b in zip(plain.parameters(), tracked.parameters()):
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-14)
            opt_p.step()
            opt_t.step()
    assert tracker.skipped == [0, 2] and [s for s, _ in tracker.refused] == [0, 2]
    for a, b in zip([*plain.parameters(), *plain.buffers()], [*tracked.parameters(), *tracked.buffers()]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    clipping = persample.Tracker(make(), F.cross_entropy, on_refusal="skip", clip_norm=1.0)
    with pytest.raises(persample.UnsupportedModelError):  # clipping needs the per-example gradients
        clipping.step(*_batches(1, torch.float64, sizes=(6,))[0])


def test_lightning_manual_optimization_with_its_own_accumulation_is_exact():
    """Manual optimisation (zero_grad, manual_backward, opt.step every 2 batches in training_step): the callback
    raised ValueError at fit start, stopping training; it now follows the module's own optimizer steps."""
    L = pytest.importorskip("lightning")
    from persample.integrations.lightning import PersampleCallback

    g = torch.Generator().manual_seed(0)
    x_all, y_all = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp(torch.float64)
            self.automatic_optimization = False

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            if batch_idx % 2 == 0:
                opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]) / 2)
            if batch_idx % 2 == 1:
                opt.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def fit(module, callbacks):
        trainer = L.Trainer(
            max_epochs=1,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_all, y_all), batch_size=3)
        trainer.fit(module, loader)

    plain, tracked = Module(), Module()
    fit(plain, [])
    callback = PersampleCallback(F.cross_entropy)
    starts = []  # the parameters before each optimizer step

    class Record(L.pytorch.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx % 2 == 0:
                starts.append(copy.deepcopy(module.net))

    fit(tracked, [Record(), callback])
    for a, b in zip(plain.parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert [row["n"] for row in callback.diagnostics.rows] == [6, 6]
    grads, _ = oracle_grads(starts[1], F.cross_entropy, x_all[6:], y_all[6:])
    for name, g in grads.items():  # the last step's merged statistics (two micro-batches of 3)
        torch.testing.assert_close(callback.last_stats.mean[f"net.{name}"], g.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(callback.last_stats.var[f"net.{name}"], g.var(0), rtol=1e-9, atol=1e-12)


def test_lightning_two_manual_backwards_in_a_batch_skip_the_step_with_a_reason():
    L = pytest.importorskip("lightning")
    from persample.integrations.lightning import PersampleCallback

    g = torch.Generator().manual_seed(0)
    x_all, y_all = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp(torch.float64)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
            self.manual_backward(self(batch[0]).pow(2).mean())  # a second loss the observation never sees
            opt.step()

        def forward(self, x):
            return self.net(x)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = PersampleCallback(F.cross_entropy)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with pytest.warns(persample.SkippedStatisticsWarning, match="more than one backward"):
        trainer.fit(Module(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_all, y_all), batch_size=3))
    assert callback.diagnostics.rows == [] and callback.tracker.skipped == [0, 1]


def test_hf_trainer_batch_without_the_labels_key_trains_on_and_skips_the_statistics(tmp_path):
    """track(trainer, labels=<a key the batches lack>): training_step raised ValueError on the first step and
    stopped training; now the steps run as without persample, each skipped with the reason (one warning)."""
    pytest.importorskip("transformers")
    from test_integrations import _hf_train, lm_examples

    from zoo import gpt2_tiny

    torch.manual_seed(0)
    model = gpt2_tiny().double().train()
    examples = lm_examples(4)
    plain, tracked = copy.deepcopy(model), copy.deepcopy(model)
    _hf_train(plain, examples, tmp_path / "plain", tracked=False, steps=2, accumulation=2)
    with pytest.warns(persample.SkippedStatisticsWarning, match="no 'targets' entry"):
        trainer, callback = _hf_train(
            tracked, examples, tmp_path / "tracked", tracked=True, steps=2, accumulation=2, labels="targets"
        )
    for a, b in zip(plain.parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert callback.tracker.skipped == [0, 1] and callback.last_stats is None
    assert [h["persample/skipped_steps"] for h in trainer.state.log_history if "persample/skipped_steps" in h] == [1, 2]


@pytest.mark.parametrize("head", ["causal", "sequence"])
def test_hf_trainer_label_smoothing_statistics_are_the_smoothed_losses(tmp_path, monkeypatch, head):
    """TrainingArguments(label_smoothing_factor=0.1): the Trainer backwards the ε-smoothed loss (its
    LabelSmoother), and the default per-example loss was the unsmoothed one, so every step was skipped
    (OBSERVE_NOT_WEIGHTED_SUM). Now the statistics are those of the smoothed losses, as the float64 loop."""
    transformers = pytest.importorskip("transformers")
    from test_integrations import VOCAB, _hf_train, lm_examples

    from zoo import gpt2_tiny

    torch.manual_seed(0)
    examples = lm_examples(4)
    if head == "causal":
        model = gpt2_tiny().double().train()

        def smoothed(out, labels):  # example i's summed smoothed next-token loss, written out
            logits = out.logits[:, :-1]
            return F.cross_entropy(
                logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), label_smoothing=0.1, reduction="sum"
            )
    else:
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
        examples = [{**e, "labels": torch.tensor(i % 3)} for i, e in enumerate(examples)]

        def smoothed(out, labels):
            return F.cross_entropy(out.logits, labels, label_smoothing=0.1, reduction="sum")

    inputs = {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "attention_mask")}
    labels = torch.stack([e["labels"] for e in examples])
    grads, _ = oracle_grads(copy.deepcopy(model), smoothed, inputs, labels)
    original = transformers.TrainingArguments.__init__

    def smoothing_args(self, *args, **kwargs):  # the helper's arguments, plus the smoothing
        original(self, *args, **{**kwargs, "label_smoothing_factor": 0.1})

    monkeypatch.setattr(transformers.TrainingArguments, "__init__", smoothing_args)
    plain, tracked = copy.deepcopy(model), copy.deepcopy(model)
    _hf_train(plain, examples, tmp_path / "plain", tracked=False, steps=1, accumulation=2)
    _, callback = _hf_train(tracked, examples, tmp_path / "tracked", tracked=True, steps=1, accumulation=2)
    for a, b in zip(plain.parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert callback.tracker.skipped == [] and callback.last_stats.n == 4
    # HF's smoothing sums in float32: each field held to float32 rounding of its largest element in the model
    # (attention's key bias has an identically zero gradient: rounding noise there)
    for field, reduce in (("mean", lambda g: g.mean(0)), ("var", lambda g: g.var(0))):
        scale = max(float(reduce(g).abs().max()) for g in grads.values())
        for name, g in grads.items():
            got = getattr(callback.last_stats, field)[name].double()
            assert float((got - reduce(g)).abs().max()) < 1e-6 * scale, (field, name)


def test_hf_trainer_trained_twice_with_a_csv_sink_writes_on(tmp_path):
    """trainer.train() twice (a notebook re-run; train(resume_from_checkpoint=...) on the same trainer): the
    callback closes its sinks when training ends, and the second train() raised ValueError ("CSVLogger is
    closed") on its first step. The integrations now reopen their file sinks when training starts again
    (resume rules)."""
    pytest.importorskip("transformers")
    from test_integrations import _hf_train, lm_examples

    from persample.loggers import CSVLogger, JSONLLogger, read_metrics
    from zoo import gpt2_tiny

    torch.manual_seed(0)
    csv_path, jsonl_path = tmp_path / "rows.csv", tmp_path / "rows.jsonl"
    trainer, callback = _hf_train(
        gpt2_tiny().double().train(),
        lm_examples(4),
        tmp_path / "run",
        tracked=True,
        steps=2,
        accumulation=2,
        sinks=[CSVLogger(csv_path), JSONLLogger(jsonl_path)],
    )
    first = read_metrics(csv_path)
    with pytest.warns(UserWarning, match="replaced by this run's rows"):
        trainer.train()  # from step 0 again: its rows replace the first run's, which are kept aside
    for path in (csv_path, jsonl_path):
        rows = read_metrics(path)
        assert [r["step"] for r in rows] == [1, 2] and rows[0]["b_simple"] != first[0]["b_simple"]
        assert rows[-1]["b_simple"] == callback.diagnostics.rows[-1]["b_simple"]
    assert [r["step"] for r in read_metrics(tmp_path / "rows.replaced-1.csv")] == [1, 2]


@pytest.mark.parametrize("how", ["step", "observe"])
def test_a_parameter_frozen_between_micro_batches_skips_the_step_instead_of_raising(how):
    """requires_grad_(False) between the micro-batches of one accumulate() block: the block's exit raised
    ValueError ("cannot merge GradStats over different parameters") and stopped training."""
    model = _mlp(torch.float64)
    reference = _mlp(torch.float64)
    tracker = persample.Tracker(model, F.cross_entropy)
    x, y = _batches(1, torch.float64)[0]
    with pytest.warns(persample.SkippedStatisticsWarning, match="trainable parameters changed"):
        with tracker.accumulate() as acc:
            for net in (model, reference):
                net[0].weight.requires_grad_(True)
            for _ in range(2):
                if how == "step":
                    tracker.step(x, y, scale=0.5)
                else:
                    with tracker.observe(y):
                        (F.cross_entropy(model(x), y) * 0.5).backward()
                (F.cross_entropy(reference(x), y) * 0.5).backward()
                for net in (model, reference):
                    net[0].weight.requires_grad_(False)
    assert acc.stats is None and tracker.skipped == [0] and tracker.steps == 1
    for a, b in zip(reference.parameters(), model.parameters()):  # p.grad as the plain loop leaves it
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-14)
