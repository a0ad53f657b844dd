"""Defaults that work on real models: Tracker.step with default arguments on Hugging Face models in train
mode with their default dropout; its p.grad is the plain backward with the same draws, and its statistics
are those draws' per-example gradients (float64 loop oracle replaying the recorded masks)."""

import copy
import warnings

import pytest
import real_models as rm
import torch
import torch.nn.functional as F
from torch import nn

import persample

transformers = pytest.importorskip("transformers")

HIDDEN_DROPOUT = {
    "gpt2": dict(resid_pdrop=0.1, embd_pdrop=0.1),
    "bert": dict(hidden_dropout_prob=0.1, classifier_dropout=0.1),
}


def _cls_loss(out, y):
    return F.cross_entropy(rm.logits_of(out), y)


def _tiny(family):
    """float64 train-mode GPT-2 (LM head) or BERT (classifier) with dropout 0.1 in their nn.Dropout modules
    (attention dropout is a functional call inside attention, whose masks hooks cannot record: 0 here)."""
    with rm.float64_default():
        torch.manual_seed(0)
        if family == "gpt2":
            model = rm.hf_model("gpt2", "ForCausalLM", train=True, n_layer=2, **HIDDEN_DROPOUT["gpt2"])
            tokens = torch.randint(0, rm.V, (4, 6))
            return model, {"input_ids": tokens}, tokens, rm.token_ce
        model = rm.hf_model(
            "bert", "ForSequenceClassification", train=True, num_hidden_layers=2, **HIDDEN_DROPOUT["bert"]
        )
        tokens = torch.randint(0, rm.V, (4, 6))
        return (
            model,
            {"input_ids": tokens, "token_type_ids": torch.zeros_like(tokens)},
            torch.randint(0, 3, (4,)),
            _cls_loss,
        )


def _record_masks(model):
    """Forward hooks that keep each nn.Dropout's mask (output / (input / (1 − p)), 0 or 1) by module name."""
    masks, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:

            def hook(mod, args, out, name=name):
                assert name not in masks, "each dropout is called once per forward"
                (x,) = args
                assert bool((x != 0).all()), "a zero input hides its mask"
                masks[name] = (out * (1 - mod.p) / x).round()

            handles.append(module.register_forward_hook(hook))
    return masks, handles


def _replay_masks(model, masks, i):
    """Forward hooks that make each nn.Dropout apply example i's recorded mask."""
    handles = []
    for name, module in model.named_modules():
        if name in masks:

            def hook(mod, args, out, name=name):
                return args[0] * masks[name][i : i + 1] / (1 - mod.p)

            handles.append(module.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_tracker_default_describes_the_training_forwards_own_dropout_masks(family):
    model, inputs, targets, loss_fn = _tiny(family)
    plain, replay = copy.deepcopy(model), copy.deepcopy(model)
    masks, handles = _record_masks(plain)
    torch.manual_seed(7)
    loss_fn(plain(**inputs), targets).backward()
    for h in handles:
        h.remove()
    assert masks and 0 < float(torch.cat([m.detach().flatten() for m in masks.values()]).mean()) < 1

    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", persample.SlowPathWarning)
        stats = persample.Tracker(model, loss_fn, inner_products=True).step(inputs, targets)  # default randomness
    # p.grad: the plain backward with the same draws
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=name)
    # the statistics: per-example gradients under those draws (example i with row i of every mask)
    params = dict(replay.named_parameters())
    rows = {n: [] for n in params}
    for i in range(4):
        handles = _replay_masks(replay, masks, i)
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        loss = loss_fn(replay(**one), targets[i : i + 1])
        for h in handles:
            h.remove()
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            rows[n].append(torch.zeros_like(params[n]) if g is None else g)
    grads = {n: torch.stack(r) for n, r in rows.items()}
    for n, g in grads.items():
        torch.testing.assert_close(stats.mean[n], g.mean(0), rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(stats.var[n], g.var(0), rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(stats.param_sq_norms[n], g.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12, msg=n)
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    torch.testing.assert_close(stats.inner_products, flat @ flat.mean(0), rtol=1e-9, atol=1e-12)


def _with_default_dropout(family):
    """The matrix's tiny config of ``family`` with every dropout its library default (0.1 for most)."""
    config = rm._config(family, "eager")
    defaults = type(config)()
    for key, value in config.to_dict().items():
        if "drop" in key and isinstance(value, float):
            setattr(config, key, getattr(defaults, key))
    names = {
        "bert": "Bert",
        "roberta": "Roberta",
        "distilbert": "DistilBert",
        "albert": "Albert",
        "t5": "T5",
        "bart": "Bart",
        "gpt2": "GPT2",
        "llama": "Llama",
        "mistral": "Mistral",
        "qwen2": "Qwen2",
        "gpt_neox": "GPTNeoX",
        "opt": "OPT",
    }
    head = rm._lm_head(family)
    head = "LMHeadModel" if family == "gpt2" else head
    return getattr(transformers, names[family] + head)(config).to(torch.float64).train()


#: Families whose Tracker step runs on the fast engine: one forward for p.grad and the statistics, so
#: p.grad is bit for bit the plain backward from the same RNG state. The others fall back to vmap or the
#: loop, whose per-example forwards make their own draws; p.grad is then w·B·stats.mean (those draws).
ONE_FORWARD = ("gpt2", "llama", "mistral", "qwen2", "gpt_neox")


@pytest.mark.parametrize("variant", ["nomask", "mask-padded"])
@pytest.mark.parametrize("family", rm.ENCODERS + rm.SEQ2SEQ + rm.DECODERS)
def test_tracker_step_with_default_arguments_on_every_hf_family_in_train_mode(family, variant):
    with rm.float64_default():
        torch.manual_seed(0)
        model = _with_default_dropout(family)
        inputs, labels = rm._text_batch(family, variant)
    loss_fn = rm.masked_token_ce if variant == "mask-padded" else rm.token_ce
    plain = copy.deepcopy(model)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = persample.Tracker(model, loss_fn).step(inputs, labels)
    assert stats is not None and stats.n == rm.B
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads.values())
    if variant == "nomask":  # token_ce is a mean over B·T tokens: w = 1/B, and p.grad = mean of the g_i
        for n, g in grads.items():
            torch.testing.assert_close(g, stats.mean[n], rtol=1e-9, atol=1e-13, msg=n)
    if family in ONE_FORWARD:
        torch.manual_seed(3)
        loss_fn(plain(**inputs), labels).backward()
        for (n, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=n)
