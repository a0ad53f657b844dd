"""Defects found by the architecture sweep (benchmarks/hf_sweep.py, docs/coverage-sweep.md), each on a tiny model
that has the same pattern as the Hugging Face architecture where the sweep found it."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from oracle_stats import assert_stats_match_rows, keyword_oracle_rows


class Attention(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.proj = nn.Linear(4, 3)  # draws (kaiming_uniform_)
        self.sparse = sparse

    def forward(self, x):
        if self.sparse:
            raise ValueError("the sparse attention cannot run this short sequence")
        return self.proj(x)


class SwitchingAttention(nn.Module):
    """Hugging Face BigBird's pattern: its first forward on a short sequence switches the attention. It
    sets the flag first, then builds the new attention module (whose Linear init draws random numbers) and
    moves the projection over; a forward stopped between the two leaves a flag that does not match the module."""

    def __init__(self):
        super().__init__()
        self.kind = "sparse"
        self.attention = Attention(sparse=True)

    def forward(self, x):
        if self.kind == "sparse":
            self.kind = "full"
            full = Attention(sparse=False)
            full.proj = self.attention.proj
            self.attention = full
        return self.attention(x)


def _oracle(model, x, y):
    rows = {n: [] for n, _ in model.named_parameters()}
    for i in range(len(x)):
        m = SwitchingAttention().double()
        m.load_state_dict(model.state_dict())
        loss = F.mse_loss(m(x[i : i + 1]), y[i : i + 1])
        for (n, p), g in zip(m.named_parameters(), torch.autograd.grad(loss, list(m.parameters()))):
            rows[n].append(g)
    return {n: torch.stack(r) for n, r in rows.items()}


@pytest.mark.parametrize("engine", ["auto", "fast", "vmap", "loop"])
def test_a_forward_stopped_at_its_first_draw_leaves_the_model_as_found(engine):
    """Under randomness="error" persample stops the forward at its first random call, before it draws. The
    refusal must leave the model as it was found: before the fix the flag stayed switched and the old module
    stayed in place, so every later forward raised, persample's and the user's own (all 12 BigBird runs of the
    sweep crashed with BigBird's ValueError, and the model was broken for training)."""
    torch.manual_seed(0)
    model = SwitchingAttention().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(persample.PersampleError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        persample.grad_stats(model, F.mse_loss, x, y, engine=engine)
    assert err.value.code == "RANDOM_UNDER_ERROR"
    assert model.kind == "sparse" and model.attention.sparse  # as found
    if engine == "vmap":  # torch.func cannot draw an unbatched init per example: NotExact, auto goes on to the loop
        with pytest.raises(persample.NotExact) as err:  # (was RANDOM_UNDER_ERROR naming randomness='error': the
            persample.grad_stats(model, F.mse_loss, x, y, engine=engine, randomness="different")  # fix it named)
        assert err.value.code == "VMAP_CANNOT_RUN"
        return
    # the fix the message names works, and is exact
    want = _oracle(model, x, y)
    stats = persample.grad_stats(model, F.mse_loss, x, y, engine=engine, randomness="different")
    for n, r in want.items():
        torch.testing.assert_close(stats.mean[n], r.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.var[n], r.var(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.param_sq_norms[n], r.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
    model(x)  # and the user's own forward runs


def _bart_causal_lm():
    transformers = pytest.importorskip("transformers")
    config = transformers.BartConfig(
        vocab_size=40,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.BartForCausalLM(config).double().eval()


def _own_loss_oracle(model, inputs):
    return keyword_oracle_rows(model, lambda out, i: out.loss, inputs, len(inputs["input_ids"]))


@pytest.mark.parametrize("padded", [False, True])
def test_the_unshifted_loss_of_a_causal_decoder_takes_the_fast_engine(padded):
    """BartForCausalLM (and Marian's, MBart's, BlenderBot's, BigBirdPegasus's causal decoders) score `labels` as
    they are, CE(logits_t, labels_t), leaving the shift to the caller; the fast engine recomputed every causal
    head's loss with the shift, its checks refused (MODEL_LOSS_NOT_RECOMPUTED) and auto fell to vmap or the loop
    (7 architectures in the sweep). The unshifted form is tried after the shifted one fails, held to the same
    checks, and is the float64 oracle's answer (BART's inline loss keeps the logits' dtype)."""
    model = _bart_causal_lm()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (4, 6), generator=g)
    labels = torch.randint(3, 40, (4, 6), generator=g)
    inputs = {"input_ids": ids, "labels": labels}
    if padded:  # two padded examples; their labels ignored there; each example keeps its own count
        mask = torch.ones(4, 6, dtype=torch.long)
        mask[2, 4:] = mask[3, 3:] = 0
        inputs.update(attention_mask=mask, labels=labels.masked_fill(mask == 0, -100))
    rows, losses = _own_loss_oracle(model, inputs)

    def own(out):
        return out.loss

    assert_stats_match_rows(persample.grad_stats(model, own, inputs, engine="fast"), rows, losses)
    if not padded:  # observe needs equal weights (a padded token mean is OBSERVE_WEIGHTS_DIFFER)
        tracker = persample.Tracker(model, own)
        with tracker.observe(batch_size=4) as observed:
            model(**inputs).loss.backward()
        assert_stats_match_rows(observed.stats, rows, losses)


class FlatteningRouter(nn.Module):
    """DeepSeek-V3's / GLM-4-MoE's router: a raw weight, the batch flattened inside (``h.view(-1, d)``),
    token rows out: ``[B, T, d]`` in, ``[B·T, E]`` out. ``mix``: each row also reads the batch's mean token
    (not per example: must be refused)."""

    def __init__(self, d: int = 5, experts: int = 3, mix: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d))
        self.mix = mix

    def forward(self, h):
        x = h.reshape(-1, h.shape[-1])
        if self.mix:
            x = x + x.mean(0, keepdim=True)
        logits = F.linear(x, self.weight)
        return logits.softmax(-1), logits


class RoutedModel(nn.Module):
    def __init__(self, mix: bool = False):
        super().__init__()
        self.embed = nn.Linear(4, 5)
        self.router = FlatteningRouter(mix=mix)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        probs, logits = self.router(h)
        mixed = probs * logits.tanh()
        return self.head(mixed.view(*x.shape[:2], -1)).mean(1)


def _plain_oracle(model, x, y):
    rows: dict[str, list] = {n: [] for n, _ in model.named_parameters()}
    for i in range(len(x)):
        loss = F.mse_loss(model(x[i : i + 1]), y[i : i + 1])
        for (n, _), g in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            rows[n].append(g)
    return {n: torch.stack(r) for n, r in rows.items()}


def test_a_module_that_flattens_the_batch_itself_takes_the_fast_engine():
    """A rule-less module with [B, T, d] in and [B·T, E] out (it flattens the batch inside, as DeepSeek-V3's,
    GLM-4-MoE's and Kimi's routers do) was refused FALLBACK_NOT_BATCHED, and auto took the per-example loop
    on their MoE models (6 model types in the sweep). Its per-example gradients are now segment sums over each
    example's T rows, each segment computed alone and compared with the batch's rows: the oracle's at 1e-9."""
    torch.manual_seed(0)
    model = RoutedModel().double()
    x, y = torch.randn(4, 6, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    want = _plain_oracle(model, x, y)
    stats = persample.grad_stats(model, F.mse_loss, x, y, engine="fast")
    for n, r in want.items():
        torch.testing.assert_close(stats.mean[n], r.mean(0), rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(stats.var[n], r.var(0), rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(stats.param_sq_norms[n], r.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
    grads = persample.per_sample_grads(model, F.mse_loss, x, y, engine="fast")
    for n, r in want.items():
        torch.testing.assert_close(grads[n], r, rtol=1e-9, atol=1e-12, msg=n)


def test_a_flattening_module_that_mixes_the_examples_is_refused():
    """The same module with every token row reading the batch's mean token: not per example. The fast engine
    refuses with a code (its rows differ alone, or the graph shows the mixing) and auto is the oracle's."""
    torch.manual_seed(0)
    model = RoutedModel(mix=True).double()
    x, y = torch.randn(4, 6, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(persample.NotExact) as err:
        persample.grad_stats(model, F.mse_loss, x, y, engine="fast")
    assert err.value.code
    want = _plain_oracle(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = persample.grad_stats(model, F.mse_loss, x, y, engine="auto")
    for n, r in want.items():
        torch.testing.assert_close(stats.mean[n], r.mean(0), rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(stats.var[n], r.var(0), rtol=1e-9, atol=1e-12, msg=n)


class SinkAttention(nn.Module):
    """GPT-OSS's attention in miniature: a raw parameter (its ``sinks``) makes the whole module a fallback,
    and it returns ``(output, weights)`` with the output computed from the weights."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.sink = nn.Parameter(torch.randn(1))

    def forward(self, x):
        weights = torch.cat([x @ x.transpose(1, 2), self.sink.expand(*x.shape[:2], 1)], -1).softmax(-1)[..., :-1]
        return self.proj(weights @ x), weights


class SinkModel(nn.Module):
    def __init__(self, use_weights: bool):
        super().__init__()
        self.attention = SinkAttention()
        self.head = nn.Linear(4, 2)
        self.use_weights = use_weights

    def forward(self, x):
        out, weights = self.attention(x)
        y = self.head(out).mean(1)
        return y + weights.sum((1, 2))[:, None] if self.use_weights else y


@pytest.mark.parametrize("use_weights", [False, True])
def test_a_fallback_whose_output_is_computed_from_another_output_counts_its_gradient_once(use_weights):
    """The hook on the weights sees the gradient that flows back from the output computed from them; the vmap
    fallback fed both outputs' captured gradients to one vjp and counted that part twice. Its check refused
    (FALLBACK_SUM_MISMATCH: GPT-OSS, MiMo-V2-Flash and OpenAI's privacy filter took the loop in the sweep);
    each output now gets the part of its gradient from outside the module, and the result is the oracle's."""
    torch.manual_seed(0)
    model = SinkModel(use_weights).double()
    x, y = torch.randn(4, 5, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    want = _plain_oracle(model, x, y)
    stats = persample.grad_stats(model, F.mse_loss, x, y, engine="fast")
    for n, r in want.items():
        torch.testing.assert_close(stats.mean[n], r.mean(0), rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(stats.var[n], r.var(0), rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(stats.param_sq_norms[n], r.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
