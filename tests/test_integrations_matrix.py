"""The one-line integrations on real fine-tuning setups (issue 23): diagnostics never stop training,
gradient checkpointing, PEFT LoRA, gradient accumulation, bf16, evaluation between steps.

Each cell: parameters after training identical with and without the integration; statistics equal to the
float64 loop-of-autograd oracle where computed; every logged key present, or its absence explained by the
skip counter ``persample/skipped_steps``."""

import copy
import warnings

import pytest
import torch

import persample

from test_integrations import B, _hf_train, lm_examples, oracle_noise_scale
from zoo import gpt2_tiny

KEY, SKIPPED = "persample/b_simple", "persample/skipped_steps"


def _same_parameters(a, b, exact=True):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)


def _rewrite_gradient_hook(model):
    """A forward hook whose gradient hook rewrites the batch's gradient (clamps it): the observed backward
    cannot be split per example, so observe refuses (the vmap and loop engines apply it per example)."""

    def hook(module, args, output):
        output.register_hook(lambda g: g.clamp(-1e-2, 1e-2))

    return model.transformer.ln_f.register_forward_hook(hook)


def _logged(trainer):
    return [h for h in trainer.state.log_history if KEY in h or SKIPPED in h]


# ------------------------------------------------------------------------------ diagnostics never stop training


def test_hf_refused_statistics_skip_the_step_and_training_is_unchanged(tmp_path):
    torch.manual_seed(0)
    model = gpt2_tiny().double().train()
    _rewrite_gradient_hook(model)
    examples = lm_examples(2 * B)
    _hf_train(plain := copy.deepcopy(model), examples, tmp_path / "plain", tracked=False, steps=2, accumulation=1)
    with pytest.warns(persample.SkippedStatisticsWarning, match="gradient hook") as record:
        trainer, callback = _hf_train(
            tracked := copy.deepcopy(model), examples, tmp_path / "tracked", tracked=True, steps=2, accumulation=1
        )
    assert sum(issubclass(w.category, persample.SkippedStatisticsWarning) for w in record) == 1  # once
    _same_parameters(plain, tracked)
    logged = _logged(trainer)
    assert [h[SKIPPED] for h in logged] == [1, 2] and not any(KEY in h for h in logged)
    assert callback.tracker.skipped == [0, 1] and callback.last_stats is None
    assert all("gradient hook" in reason for _, reason in callback.tracker.refused)


def test_hf_refused_statistics_fall_back_to_the_exact_engines(tmp_path):
    torch.manual_seed(0)
    model = gpt2_tiny().double().train()
    examples = lm_examples(B)
    oracle_model = copy.deepcopy(model)
    _rewrite_gradient_hook(oracle_model)
    oracle = oracle_noise_scale(oracle_model, examples)  # the loop applies the hook to each example's gradient
    _rewrite_gradient_hook(model)
    _hf_train(plain := copy.deepcopy(model), examples, tmp_path / "plain", tracked=False, steps=1, accumulation=1)
    with pytest.warns(persample.SkippedStatisticsWarning, match="exact engines"):
        trainer, callback = _hf_train(
            tracked := copy.deepcopy(model),
            examples,
            tmp_path / "tracked",
            tracked=True,
            steps=1,
            accumulation=1,
            on_refusal="fallback",
        )
    _same_parameters(plain, tracked)
    logged = _logged(trainer)
    assert len(logged) == 1 and logged[0][SKIPPED] == 0
    torch.testing.assert_close(logged[0][KEY], oracle.b_simple, rtol=1e-6, atol=0)


def test_hf_on_refusal_raise_raises_after_the_backward(tmp_path):
    torch.manual_seed(0)
    model = gpt2_tiny().double().train()
    _rewrite_gradient_hook(model)
    with pytest.raises(persample.NotExact, match="gradient hook"):
        _hf_train(model, lm_examples(B), tmp_path, tracked=True, steps=1, accumulation=1, on_refusal="raise")


def test_tracker_on_refusal_options():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    def double_gradient(module, args, output):
        output.register_hook(lambda g: g * 2)

    model[1].register_forward_hook(double_gradient)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    loss = nn.functional.cross_entropy
    with pytest.raises(ValueError, match="on_refusal must be one of"):
        persample.Tracker(model, loss, on_refusal="ignore")
    fallback = persample.Tracker(model, loss, on_refusal="fallback")
    with pytest.raises(ValueError, match="inputs=inputs"):
        with fallback.observe(y):
            pass
    expected = persample.grad_stats(model, loss, x, y)
    for mode in ("skip", "fallback"):
        tracker = persample.Tracker(model, loss, on_refusal=mode)
        model.zero_grad()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with tracker.observe(y, inputs=x) as observed:
                loss(model(x), y).backward()
        assert len(record) == 1 and issubclass(record[0].category, persample.SkippedStatisticsWarning)
        plain = copy.deepcopy(model)
        plain.zero_grad()
        loss(plain(x), y).backward()
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)  # p.grad is the backward's own
        if mode == "skip":
            assert observed.stats is None and observed.skipped and tracker.skipped == [0]
        else:
            assert not observed.skipped and tracker.skipped == [] and tracker.last_stats is observed.stats
            for k in expected.mean:
                torch.testing.assert_close(observed.stats.mean[k], expected.mean[k], rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(observed.stats.var[k], expected.var[k], rtol=1e-9, atol=1e-12)
        assert len(tracker.refused) == 1 and "gradient hook" in tracker.refused[0][1]
    # a fallback that fails too (here: inputs that are not the batch's) skips the step, with both reasons
    tracker = persample.Tracker(model, loss, on_refusal="fallback")
    with pytest.warns(persample.SkippedStatisticsWarning, match="failed too: ValueError"):
        with tracker.observe(y, inputs=x[:2]) as observed:
            loss(model(x), y).backward()
    assert observed.stats is None and tracker.skipped == [0]
    # an error of the user's own code in the block is raised whatever on_refusal says
    tracker = persample.Tracker(model, loss, on_refusal="skip")
    with pytest.raises(persample.NotExact, match="mine"):
        with tracker.observe(y):
            raise persample.NotExact("mine", code="MODIFIED_IN_PLACE")


# ------------------------------------------------------------------------------------------------ the matrix


def llama_tiny():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def lora(model, targets, dropout=0.0, **kwargs):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=targets, lora_dropout=dropout, task_type="CAUSAL_LM", **kwargs
    )
    torch.manual_seed(1)
    model = peft.get_peft_model(model, config)
    for name, p in model.named_parameters():  # LoRA's B starts at 0: make every adapter gradient non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def hf_run(
    model, examples, tmp_path, *, tracked, steps=1, accumulation=1, eval_steps=None, track_kwargs=None, **args_kwargs
):
    transformers = pytest.importorskip("transformers")
    evaluation = dict(eval_strategy="steps", eval_steps=eval_steps) if eval_steps else {}
    args_kwargs.setdefault("save_strategy", "no")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=B // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=1e-2,
        max_grad_norm=0.5,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
        per_device_eval_batch_size=B,
        **evaluation,
        **args_kwargs,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=examples, eval_dataset=examples[:B] if eval_steps else None
    )
    callback = None
    if tracked:
        from persample.integrations.transformers import track

        callback = track(trainer, **(track_kwargs or {}))
    trainer.train()
    return trainer, callback


def run_cell(model, examples, tmp_path, *, steps=1, exact=True, track_kwargs=None, **kwargs):
    """Train ``model`` twice (plain, tracked) from the same start: identical parameters; returns the
    tracked run's (trainer, callback, logged rows). Every statistics step logs the diagnostics or the skip
    counter that explains their absence."""
    plain, tracked = copy.deepcopy(model), copy.deepcopy(model)
    hf_run(plain, examples, tmp_path / "plain", tracked=False, steps=steps, **kwargs)
    trainer, callback = hf_run(
        tracked, examples, tmp_path / "tracked", tracked=True, steps=steps, track_kwargs=track_kwargs, **kwargs
    )
    _same_parameters(plain, tracked, exact=exact)
    logged = _logged(trainer)
    assert len(logged) == steps
    for row in logged:
        present = all(f"persample/{k}" in row for k in ("b_simple", "trace_cov", "grad_sq", "grad_norm"))
        assert present or (row[SKIPPED] > 0 and KEY not in row), row
    return trainer, callback, logged


@pytest.mark.parametrize("reentrant", [None, False, True])
def test_hf_gradient_checkpointing_is_exact(tmp_path, reentrant):
    """gradient_checkpointing=True installs enable_input_require_grads' hook on the input embeddings and
    recomputes each block in the backward: the statistics are the oracle's (transformers' default,
    use_reentrant=False, and use_reentrant=True, where observe follows the blocks' recomputation in the
    backward)."""
    torch.manual_seed(0)
    model = gpt2_tiny().double().train()
    examples = lm_examples(B)
    oracle = oracle_noise_scale(copy.deepcopy(model), examples)
    kwargs = {} if reentrant is None else dict(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    _, callback, logged = run_cell(model, examples, tmp_path, gradient_checkpointing=True, **kwargs)
    assert logged[0][SKIPPED] == 0 and callback.tracker.refused == []
    torch.testing.assert_close(logged[0][KEY], oracle.b_simple, rtol=1e-6, atol=0)  # HF: float32 loss
    torch.testing.assert_close(logged[0]["persample/trace_cov"], oracle.trace_cov, rtol=1e-6, atol=0)


def test_hf_reentrant_gradient_checkpointing_with_fallback_needs_no_fallback(tmp_path):
    """Re-entrant checkpointing was refused (and only on_refusal="fallback" gave statistics, from the loop
    engine): observe now computes the step itself, to the oracle, and nothing is refused or skipped."""
    torch.manual_seed(0)
    model = gpt2_tiny().double().train()
    examples = lm_examples(B)
    oracle = oracle_noise_scale(copy.deepcopy(model), examples)
    with warnings.catch_warnings():
        warnings.simplefilter("error", persample.SkippedStatisticsWarning)
        _, callback, logged = run_cell(
            model,
            examples,
            tmp_path,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True},
            track_kwargs=dict(on_refusal="fallback"),
        )
    assert logged[0][SKIPPED] == 0 and callback.tracker.skipped == [] and callback.tracker.refused == []
    torch.testing.assert_close(logged[0][KEY], oracle.b_simple, rtol=1e-6, atol=0)  # HF: float32 loss


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_peft_lora_with_reentrant_gradient_checkpointing_is_exact(tmp_path, arch):
    """PEFT LoRA under re-entrant gradient checkpointing (PEFT and transformers hook the input embeddings so
    that the checkpointed blocks get gradients): computed, not skipped, and the oracle's."""
    torch.manual_seed(0)
    if arch == "gpt2":
        model = lora(gpt2_tiny().double(), ["c_attn"], fan_in_fan_out=True)
    else:
        model = lora(llama_tiny().double(), ["q_proj", "v_proj"])
    model.train()
    examples = lm_examples(B)
    oracle = oracle_noise_scale(copy.deepcopy(model), examples)
    _, callback, logged = run_cell(
        model,
        examples,
        tmp_path,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    assert logged[0][SKIPPED] == 0 and callback.tracker.refused == []
    assert set(callback.last_stats.mean) == {n for n, p in model.named_parameters() if p.requires_grad}
    rtol = 1e-6  # HF computes its loss (and Llama its RMSNorm) in float32 inside a float64 model
    torch.testing.assert_close(logged[0][KEY], oracle.b_simple, rtol=rtol, atol=0)
    torch.testing.assert_close(logged[0]["persample/trace_cov"], oracle.trace_cov, rtol=rtol, atol=0)


def test_hf_peft_dora_refusal_names_the_setting_and_its_fix_works(tmp_path):
    """PEFT DoRA (use_dora=True) calls lora_A on an identity matrix for its weight norm: observe refuses it.
    The skip warning names the setting (it named only the module and an expansion), training is unchanged,
    and the fix it names, on_refusal='fallback', gives the oracle's statistics."""
    torch.manual_seed(0)
    model = lora(gpt2_tiny().double(), ["c_attn"], fan_in_fan_out=True, use_dora=True).train()
    examples = lm_examples(B)
    oracle = oracle_noise_scale(copy.deepcopy(model), examples)
    with pytest.warns(persample.SkippedStatisticsWarning, match=r"use_dora=True") as record:
        _, callback, logged = run_cell(model, examples, tmp_path / "skip")
    message = str([w for w in record if issubclass(w.category, persample.SkippedStatisticsWarning)][0].message)
    assert "PEFT's DoRA" in message and "on_refusal='fallback'" in message
    assert logged[0][SKIPPED] == 1
    with pytest.warns(persample.SkippedStatisticsWarning, match="exact engines instead"):
        _, callback, logged = run_cell(model, examples, tmp_path / "fallback", track_kwargs=dict(on_refusal="fallback"))
    assert logged[0][SKIPPED] == 0 and callback.tracker.skipped == []
    torch.testing.assert_close(logged[0][KEY], oracle.b_simple, rtol=1e-6, atol=0)  # HF: float32 loss


def test_refusals_name_peft_adapters_only():
    """The setting named is PEFT's only where the module is a PEFT LoRA layer (a model's own ``lora_A``
    is not PEFT's); a plain LoRA adapter is named, with no fix claimed."""
    from persample.engines.fast.observe import peft_setting

    class Own(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Module()
            self.layer.lora_A = torch.nn.Linear(2, 2)

    assert peft_setting(Own(), "module layer.lora_A: its input ...") is None
    model = lora(gpt2_tiny(), ["c_attn"], fan_in_fan_out=True)
    path = "base_model.model.transformer.h.0.attn.c_attn"
    assert (
        peft_setting(model, f"module {path}.lora_B.default: ...")
        == f"the setting involved: PEFT's LoRA adapter on {path}"
    )
    assert peft_setting(model, "module base_model.model.lm_head: ...") is None


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_peft_lora_is_exact(tmp_path, arch):
    """PEFT LoRA (GPT-2 c_attn; Llama q_proj and v_proj): the adapters' inputs are frozen activations of the
    batch; the statistics of the adapters' gradients are the oracle's."""
    torch.manual_seed(0)
    if arch == "gpt2":
        model = lora(gpt2_tiny().double(), ["c_attn"], fan_in_fan_out=True)
    else:
        model = lora(llama_tiny().double(), ["q_proj", "v_proj"])
    model.train()
    examples = lm_examples(B)
    oracle = oracle_noise_scale(copy.deepcopy(model), examples)
    _, callback, logged = run_cell(model, examples, tmp_path)
    assert logged[0][SKIPPED] == 0 and callback.tracker.refused == []
    assert set(callback.last_stats.mean) == {n for n, p in model.named_parameters() if p.requires_grad}
    rtol = 1e-6  # HF computes its loss (and Llama its RMSNorm) in float32 inside a float64 model
    torch.testing.assert_close(logged[0][KEY], oracle.b_simple, rtol=rtol, atol=0)
    torch.testing.assert_close(logged[0]["persample/trace_cov"], oracle.trace_cov, rtol=rtol, atol=0)


@pytest.mark.parametrize("reentrant", [None, True])
def test_hf_peft_lora_with_gradient_checkpointing_accumulation_and_evaluation(tmp_path, reentrant):
    """LoRA + gradient checkpointing (PEFT and transformers both hook the input embeddings; transformers'
    default, and re-entrant) + accumulation + evaluation between steps: trains as the plain run, with
    statistics on every step."""
    torch.manual_seed(0)
    model = lora(gpt2_tiny().double(), ["c_attn"], fan_in_fan_out=True).train()
    examples = lm_examples(3 * B, seed=2)
    kwargs = {} if reentrant is None else dict(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    _, callback, logged = run_cell(
        model, examples, tmp_path, steps=3, accumulation=2, eval_steps=1, gradient_checkpointing=True, **kwargs
    )
    assert [row[SKIPPED] for row in logged] == [0, 0, 0] and callback.last_stats.n == B


@pytest.mark.parametrize("reentrant", [None, True])
def test_hf_bf16_gradient_checkpointing_lora(tmp_path, reentrant):
    """bf16 autocast + gradient checkpointing (the re-entrant recomputation runs under the forward's
    autocast) + LoRA: statistics on every step, in float32."""
    torch.manual_seed(0)
    model = lora(gpt2_tiny(), ["c_attn"], fan_in_fan_out=True).train()
    kwargs = {} if reentrant is None else dict(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    _, callback, logged = run_cell(
        model,
        lm_examples(2 * B, seed=3),
        tmp_path,
        steps=2,
        exact=False,
        bf16=True,
        gradient_checkpointing=True,
        **kwargs,
    )
    assert [row[SKIPPED] for row in logged] == [0, 0]
    assert all(v.dtype == torch.float32 for v in callback.last_stats.mean.values())


def test_lora_dropout_statistics_describe_the_forwards_own_masks():
    """lora_dropout > 0 in training: observe's statistics equal a float64 loop that replays, for each example,
    the dropout masks of the observed forward; p.grad is the plain backward's."""
    torch.manual_seed(0)
    model = lora(gpt2_tiny().double(), ["c_attn"], dropout=0.5, fan_in_fan_out=True).train()
    rows = lm_examples(B)
    inputs = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    labels = torch.stack([r["labels"] for r in rows])
    dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(m.p == 0.5 for m in dropouts)
    plain = copy.deepcopy(model)
    masks = {}

    def record(module, args, output):
        masks[module] = torch.where(args[0] != 0, output / args[0], torch.zeros_like(output)).detach()

    handles = [m.register_forward_hook(record) for m in dropouts]
    loss_fn = persample.causal_lm_loss()
    tracker = persample.Tracker(model, loss_fn)
    with tracker.observe(labels) as observed:
        loss_fn(model(**inputs), labels).backward()  # the token mean, in float64 (HF's own loss is float32)
    for h in handles:
        h.remove()
    assert observed.stats is not None
    # the plain backward with the same masks gives the same p.grad
    example = {}
    replays = [
        m.register_forward_hook(lambda m, a, o: a[0] * masks[m][example.get("i", slice(None))])
        for m in [dict(plain.named_modules())[n] for n, mm in model.named_modules() if mm in masks]
    ]
    plain_masks = dict(
        zip(
            [dict(plain.named_modules())[n] for n, mm in model.named_modules() if mm in masks],
            [masks[mm] for n, mm in model.named_modules() if mm in masks],
        )
    )
    masks.update(plain_masks)
    loss_fn(plain(**inputs), labels).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-15)
    per_example = {n: [] for n, p in plain.named_parameters() if p.requires_grad}
    for i in range(B):
        example["i"] = slice(i, i + 1)
        out = plain(**{k: v[i : i + 1] for k, v in inputs.items()})
        loss = loss_fn.per_example(out, labels[i : i + 1])
        grads = torch.autograd.grad(loss, [p for p in plain.parameters() if p.requires_grad])
        for n, g in zip(per_example, grads):
            per_example[n].append(g)
    for h in replays:
        h.remove()
    for n, gs in per_example.items():
        g = torch.stack(gs)
        torch.testing.assert_close(observed.stats.mean[n], g.mean(0), rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(observed.stats.var[n], g.var(0), rtol=1e-9, atol=1e-14)


# --------------------------------------------------------------- outputs that carry an intermediate tensor


class _HiddenAndLogits(torch.nn.Module):
    """Returns its logits and the hidden state they are computed from (as ``last_hidden_state`` next to
    ``logits``, ``encoder_last_hidden_state`` in encoder-decoders)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(5, 6), torch.nn.Linear(6, 3)

    def forward(self, x, y=None, aux=0.0):
        h = torch.tanh(self.a(x))
        out = {"logits": self.b(h), "last_hidden_state": h, "first": h[:, :2]}
        if y is not None:  # a loss computed inside the model, with an auxiliary term on the hidden state
            out["loss"] = torch.nn.functional.cross_entropy(out["logits"], y)
            if aux:
                out["loss"] = out["loss"] + aux * h.pow(2).mean()
        return out


def test_observe_output_that_carries_an_intermediate_tensor_is_exact():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = _HiddenAndLogits().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))

    def loss(out, t):
        return F.cross_entropy(out["logits"], t)

    expected = persample.grad_stats(model, loss, x, y, engine="loop")
    tracker = persample.Tracker(model, loss)
    with tracker.observe(y) as observed:
        loss(model(x), y).backward()
    for k in expected.mean:
        torch.testing.assert_close(observed.stats.mean[k], expected.mean[k], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(observed.stats.var[k], expected.var[k], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(observed.stats.param_sq_norms[k], expected.param_sq_norms[k], rtol=1e-9, atol=0)
    # the loss computed inside the model: exact; with a term on the hidden state there: refused, not wrong
    model.zero_grad()
    with tracker.observe(y) as observed:
        model(x, y)["loss"].backward()
    for k in expected.mean:
        torch.testing.assert_close(observed.stats.var[k], expected.var[k], rtol=1e-9, atol=1e-15)
    model.zero_grad()
    with pytest.raises((persample.ObservationError, persample.BatchLossMismatch)):
        with tracker.observe(y):
            model(x, y, aux=0.1)["loss"].backward()
    # a loss that also reads the intermediate tensor has a term of an activation: refused, not wrong
    model.zero_grad()
    with pytest.raises(persample.ObservationError, match="other than its output"):
        with tracker.observe(y):
            out = model(x)
            (loss(out, y) + out["last_hidden_state"].pow(2).mean()).backward()


# ------------------------------------------------------------------------------------------------- Lightning


def _lm_module(model):
    L = pytest.importorskip("lightning")

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

        def training_step(self, batch, batch_idx):
            return persample.causal_lm_loss()(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.training_step(batch, batch_idx))

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    return LM()


def lightning_run(module, examples, *, tracked, steps, accumulation=1, precision="64-true", validate=False, **kwargs):
    L = pytest.importorskip("lightning")
    from persample.integrations.lightning import PersampleCallback

    callbacks = [PersampleCallback(persample.causal_lm_loss().per_example, **kwargs)] if tracked else []
    loader = torch.utils.data.DataLoader(examples, batch_size=B // accumulation)
    trainer = L.Trainer(
        max_steps=steps,
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
        limit_val_batches=1 if validate else 0,
        val_check_interval=1 if validate else None,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|smaller than the logging).*")
        trainer.fit(module, loader, loader if validate else None)
    return trainer, (callbacks[0] if callbacks else None)


def lightning_cell(model, examples, *, steps=1, exact=True, **kwargs):
    """Plain and tracked fits from the same start: identical parameters; each statistics step has a row of
    diagnostics or a skip counter that explains its absence."""
    start = _lm_module(model)
    plain, tracked = copy.deepcopy(start), copy.deepcopy(start)
    lightning_run(plain, examples, tracked=False, steps=steps, **kwargs)
    trainer, callback = lightning_run(tracked, examples, tracked=True, steps=steps, **kwargs)
    _same_parameters(plain, tracked, exact=exact)
    skipped = len(set(callback.tracker.skipped))
    assert len(callback.diagnostics.rows) + skipped == steps
    assert trainer.callback_metrics[SKIPPED] == skipped
    assert (KEY in trainer.callback_metrics) == (skipped < steps)
    return trainer, callback


def _lightning_oracle(model, examples):
    return oracle_noise_scale(copy.deepcopy(model), examples[:B])


@pytest.mark.parametrize(
    "setup",
    [
        "checkpointing",
        "checkpointing-reentrant",
        "lora-gpt2",
        "lora-llama",
        "lora-gpt2-reentrant",
        "lora-llama-reentrant",
    ],
)
def test_lightning_checkpointing_and_lora_are_exact(setup):
    """Gradient checkpointing (re-entrant or not), PEFT LoRA, and both: computed, never skipped, the oracle's."""
    torch.manual_seed(0)
    if setup.startswith("checkpointing"):
        model = gpt2_tiny().double().train()
    elif setup.startswith("lora-gpt2"):
        model = lora(gpt2_tiny().double(), ["c_attn"], fan_in_fan_out=True).train()
    else:
        model = lora(llama_tiny().double(), ["q_proj", "v_proj"]).train()
    examples = lm_examples(B)
    oracle = _lightning_oracle(model, examples)  # without checkpointing (re-entrant refuses autograd.grad)
    if setup.startswith("checkpointing") or setup.endswith("reentrant"):
        reentrant = setup.endswith("reentrant")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with warnings.catch_warnings():
        warnings.simplefilter("error", persample.SkippedStatisticsWarning)
        _, callback = lightning_cell(model, examples)
    assert callback.tracker.skipped == [] and callback.tracker.refused == []
    rtol = 1e-9 if "llama" not in setup else 1e-6  # Llama's RMSNorm computes in float32 in a float64 model
    torch.testing.assert_close(callback.diagnostics.rows[0]["b_simple"], oracle.b_simple, rtol=rtol, atol=0)
    torch.testing.assert_close(callback.diagnostics.rows[0]["trace_cov"], oracle.trace_cov, rtol=rtol, atol=0)


def test_lightning_lora_checkpointing_accumulation_and_validation():
    torch.manual_seed(0)
    model = lora(gpt2_tiny().double(), ["c_attn"], fan_in_fan_out=True).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, callback = lightning_cell(model, lm_examples(3 * B, seed=4), steps=3, accumulation=2, validate=True)
    assert callback.tracker.skipped == [] and callback.last_stats.n == B


def test_lightning_bf16_lora():
    torch.manual_seed(0)
    model = lora(gpt2_tiny(), ["c_attn"], fan_in_fan_out=True).train()
    _, callback = lightning_cell(model, lm_examples(2 * B, seed=5), steps=2, exact=False, precision="bf16-mixed")
    assert callback.tracker.skipped == []
    assert all(v.dtype == torch.float32 for v in callback.last_stats.mean.values())


def test_lightning_refused_step_falls_back_to_the_exact_engines():
    torch.manual_seed(0)
    model = gpt2_tiny().double().train()
    examples = lm_examples(B)
    oracle_model = copy.deepcopy(model)
    _rewrite_gradient_hook(oracle_model)
    oracle = _lightning_oracle(oracle_model, examples)
    _rewrite_gradient_hook(model)
    with pytest.warns(persample.SkippedStatisticsWarning, match="exact engines instead"):
        _, callback = lightning_cell(model, examples, on_refusal="fallback")
    assert callback.tracker.skipped == [] and len(callback.tracker.refused) == 1
    torch.testing.assert_close(callback.diagnostics.rows[0]["b_simple"], oracle.b_simple, rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------------- resume


def test_hf_resume_from_a_checkpoint(tmp_path):
    """A run resumed from a Trainer checkpoint trains as the untracked resumed run and logs its steps."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = lora(gpt2_tiny().double(), ["c_attn"], fan_in_fan_out=True).train()
    examples = lm_examples(3 * B, seed=6)
    first = copy.deepcopy(model)
    hf_run(first, examples, tmp_path / "first", tracked=False, steps=3, save_strategy="steps", save_steps=1)
    checkpoint = str(tmp_path / "first" / "checkpoint-1")
    runs = {}
    for tracked in (False, True):
        m = copy.deepcopy(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"resumed{tracked}"),
            per_device_train_batch_size=B,
            max_steps=3,
            learning_rate=1e-2,
            max_grad_norm=0.5,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            dataloader_drop_last=True,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=m, args=args, train_dataset=examples)
        if tracked:
            from persample.integrations.transformers import track

            track(trainer)
        trainer.train(resume_from_checkpoint=checkpoint)
        runs[tracked] = (m, trainer)
    _same_parameters(runs[False][0], runs[True][0])
    _same_parameters(first, runs[True][0])
    logged = _logged(runs[True][1])
    assert [h["step"] for h in logged] == [2, 3] and all(KEY in h and h[SKIPPED] == 0 for h in logged)


def test_observe_hf_output_with_hidden_states_and_cache_is_exact():
    """GPT-2 returning its hidden states and its key/value cache next to the logits (all computed before
    them): a token-mean loss on the logits is observed exactly (it was refused as 'not a weighted sum')."""
    torch.manual_seed(0)
    model = gpt2_tiny().double()
    model.config.output_hidden_states, model.config.use_cache = True, True
    ids = torch.randint(1, 40, (4, 8))
    loss = persample.causal_lm_loss()
    expected = persample.grad_stats(model, loss.per_example, {"input_ids": ids}, ids, engine="loop")
    tracker = persample.Tracker(model, loss)
    with tracker.observe(ids) as observed:
        out = model(input_ids=ids)
        assert len(out.hidden_states) == 3 and out.past_key_values is not None
        loss(out, ids).backward()
    for k in expected.mean:
        torch.testing.assert_close(observed.stats.mean[k], expected.mean[k], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(observed.stats.var[k], expected.var[k], rtol=1e-9, atol=1e-15)


def test_lightning_resume_from_a_checkpoint(tmp_path):
    """Lightning resumed from a checkpoint (ckpt_path): trains as the untracked resumed run, with statistics
    on the resumed steps."""
    L = pytest.importorskip("lightning")
    from persample.integrations.lightning import PersampleCallback

    torch.manual_seed(0)
    model = lora(gpt2_tiny().double(), ["c_attn"], fan_in_fan_out=True).train()
    examples = lm_examples(3 * B, seed=7)
    start = _lm_module(model)

    def fit(module, steps, tracked=False, ckpt_path=None, save=False):
        callbacks = [PersampleCallback(persample.causal_lm_loss().per_example)] if tracked else []
        if save:
            callbacks.append(
                L.pytorch.callbacks.ModelCheckpoint(
                    dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}"
                )
            )
        trainer = L.Trainer(
            max_steps=steps,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=save,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
            precision="64-true",
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(does not have many workers|smaller than the logging).*")
            trainer.fit(module, torch.utils.data.DataLoader(examples, batch_size=B), ckpt_path=ckpt_path)
        return callbacks[0] if tracked else None

    fit(copy.deepcopy(start), 3, save=True)
    checkpoint = str(tmp_path / "step=1.ckpt")
    plain, tracked = copy.deepcopy(start), copy.deepcopy(start)
    fit(plain, 3, ckpt_path=checkpoint)
    callback = fit(tracked, 3, tracked=True, ckpt_path=checkpoint)
    _same_parameters(plain, tracked)
    assert len(callback.diagnostics.rows) == 2 and callback.tracker.skipped == []


class _FrozenBaseAdapter(torch.nn.Module):
    """A frozen embedding and LayerNorm below a trainable adapter (LoRA's shape): the adapter's input has no
    gradient, but it is computed from the model's inputs, so dim 0 is the batch even when T == B."""

    def __init__(self, flip=False):
        super().__init__()
        self.flip = flip  # rows reordered along dim 0: no longer example i's activation at row i
        self.embed, self.norm = torch.nn.Embedding(11, 6), torch.nn.LayerNorm(6)
        self.adapter, self.head = torch.nn.Linear(6, 2, bias=False), torch.nn.Linear(2, 3)
        for p in (*self.embed.parameters(), *self.norm.parameters()):
            p.requires_grad_(False)

    def forward(self, ids):
        h = self.norm(self.embed(ids) * 2.0)
        h = h.flip(0) if self.flip else h
        a = self.adapter(h).reshape(h.shape[0], h.shape[1], 2)  # as attention splits heads
        return self.head(torch.tanh(a)).mean(1)


def test_observe_adapter_on_frozen_activations_is_exact_when_T_equals_B():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = _FrozenBaseAdapter().double()
    ids, y = torch.randint(0, 11, (6, 6)), torch.randint(0, 3, (6,))  # T == B
    expected = persample.grad_stats(model, F.cross_entropy, ids, y, engine="loop")
    tracker = persample.Tracker(model, F.cross_entropy)
    with tracker.observe(y) as observed:
        F.cross_entropy(model(ids), y).backward()
    for k in expected.mean:
        torch.testing.assert_close(observed.stats.var[k], expected.var[k], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(observed.stats.param_sq_norms[k], expected.param_sq_norms[k], rtol=1e-9, atol=0)
    flipped = _FrozenBaseAdapter(flip=True).double()
    tracker = persample.Tracker(flipped, F.cross_entropy)
    with pytest.raises(persample.NotExact) as refused:
        with tracker.observe(y):
            F.cross_entropy(flipped(ids), y).backward()
    assert refused.value.code == "BATCH_MIXED"  # flip(0) mixes the rows of examples
