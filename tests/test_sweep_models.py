"""The Hugging Face architectures on which the sweep (benchmarks/hf_sweep.py, docs/coverage-sweep.md) found
defects, from the sweep's tiny configs: each takes the engine it should and gives the float64 oracle's numbers,
or refuses with a code and leaves the model working. The patterns are in tests/test_sweep_finds.py."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import persample

transformers = pytest.importorskip("transformers")

B, T, V = 4, 8, 99
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
COMMON.update(intermediate_size=64, pad_token_id=0, use_cache=False, attn_implementation="eager")


#: Multi-head latent attention's sizes (DeepSeek-V3, LongCat-Flash): head_dim equal to the rotary part.
_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8)


def _build(config_class, model_class, **extra):
    config = config_class(**{**COMMON, **extra})
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        return model_class(config).double().eval()
    finally:
        torch.set_default_dtype(old)


def _batch(padded: bool):
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(5, V, (B, T), generator=g), torch.randint(5, V, (B, T), generator=g)
    inputs = {"input_ids": ids}
    if padded:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[2, 5:] = mask[3, 3:] = 0
        inputs.update(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask)
        labels = labels.masked_fill(mask == 0, -100)
    return inputs, labels


def _loss(out, labels):
    tokens = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    mask = (labels != -100).to(tokens.dtype)
    return ((tokens.reshape(labels.shape) * mask).sum(1) / mask.sum(1)).mean()


def _oracle(model, inputs, labels):
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    rows: dict[str, list] = {n: [] for n in params}
    for i in range(B):
        loss = _loss(m(**{k: v[i : i + 1] for k, v in inputs.items()}), labels[i : i + 1])
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            rows[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def _assert_oracle(stats, rows, rtol):
    """Max-abs errors relative to the largest oracle value of each statistic over the whole model."""
    for name, got, want in (
        ("mean", stats.mean, {n: r.mean(0) for n, r in rows.items()}),
        ("var", stats.var, {n: r.var(0) for n, r in rows.items()}),
        ("norms", stats.param_sq_norms, {n: r.flatten(1).pow(2).sum(1) for n, r in rows.items()}),
    ):
        scale = max(w.abs().max().item() for w in want.values())
        worst = max((got[n] - w).abs().max().item() for n, w in want.items()) / scale
        assert worst <= rtol, f"{name}: {worst:.3g}"


@pytest.mark.parametrize("padded", [False, True])
def test_gpt_oss_takes_the_fast_engine(padded):
    """GPT-OSS's attention is a fallback (its `sinks`) returning (output, weights): it was FALLBACK_SUM_MISMATCH
    and the loop (a gradient counted twice); its router flattens the batch itself (was FALLBACK_NOT_BATCHED)."""
    model = _build(
        transformers.GptOssConfig,
        transformers.GptOssForCausalLM,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        num_key_value_heads=1,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        experts_implementation="eager",
    )
    inputs, labels = _batch(padded)
    rows = _oracle(model, inputs, labels)
    assert persample.explain(model, _loss, inputs, labels).entry_points["grad_stats"] == "fast"
    _assert_oracle(persample.grad_stats(model, _loss, inputs, labels), rows, 1e-9)


def test_deepseek_v3_takes_the_fast_engine():
    """DeepSeek-V3's router ([B, T, d] in, [B·T, E] out) was FALLBACK_NOT_BATCHED and the loop. It computes in
    float32 inside the float64 model: compared at 1e-7 (its batch-vs-example discrepancy is ~1e-10)."""
    model = _build(
        transformers.DeepseekV3Config,
        transformers.DeepseekV3ForCausalLM,
        moe_intermediate_size=32,
        num_key_value_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        **_MLA,
        experts_implementation="eager",
    )
    inputs, labels = _batch(False)
    rows = _oracle(model, inputs, labels)
    assert persample.explain(model, _loss, inputs, labels).entry_points["grad_stats"] == "fast"
    _assert_oracle(persample.grad_stats(model, _loss, inputs, labels), rows, 1e-7)


def test_big_bird_is_refused_with_its_code_left_working_and_the_fix_is_exact():
    """BigBird: every entry point crashed with BigBird's own ValueError and left the model broken; now
    RANDOM_UNDER_ERROR, the model as found, and randomness="different" gives the oracle's numbers."""
    model = _build(transformers.BigBirdConfig, transformers.BigBirdForMaskedLM)
    inputs, labels = _batch(True)
    rows = _oracle(model, inputs, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(persample.PersampleError) as err:
            persample.grad_stats(model, _loss, inputs, labels)
        assert err.value.code == "RANDOM_UNDER_ERROR"
        assert model.bert.attention_type == "block_sparse"  # as found
        _assert_oracle(persample.grad_stats(model, _loss, inputs, labels, randomness="different"), rows, 1e-9)


#: Models whose parameter a module other than its owner uses (PARAMETER_USED_OUTSIDE; auto took the loop for
#: JetMoE and LongCat, vmap for LFM-3): the owner's parent is now one fallback unit (tests/test_widened_fallback.py).
_USED_BY_THE_PARENT = {
    # the mixture of attention experts is never called: the attention calls its map/reduce and reads its bias;
    # the attention returns its router's [B·T, E] logits beside its [B, T, d] output
    "jetmoe": lambda: _build(
        transformers.JetMoeConfig,
        transformers.JetMoeForCausalLM,
        num_local_experts=4,
        num_experts_per_tok=2,
        kv_channels=16,
        num_key_value_heads=2,
    ),
    # the MoE reads its router's classifier weight itself
    "longcat": lambda: _build(
        transformers.LongcatFlashConfig,
        transformers.LongcatFlashForCausalLM,
        n_routed_experts=4,
        moe_topk=2,
        num_key_value_heads=2,
        **_MLA,
        ffn_hidden_size=64,
        expert_ffn_hidden_size=32,
        zero_expert_num=2,
        experts_implementation="eager",
    ),
    # the short convolution hands its Conv1d's weight to a function
    "lfm3": lambda: _build(transformers.Lfm3Config, transformers.Lfm3ForCausalLM, num_key_value_heads=2),
}


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", sorted(_USED_BY_THE_PARENT))
def test_a_parameter_used_by_its_owners_parent_takes_the_fast_engine(name, padded):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (LFM-3's reference convolution and its config's token ids warn)
        model = _USED_BY_THE_PARENT[name]()
        inputs, labels = _batch(padded)
        rows = _oracle(model, inputs, labels)
        assert persample.explain(model, _loss, inputs, labels).entry_points["grad_stats"] == "fast"
        _assert_oracle(persample.grad_stats(model, _loss, inputs, labels, engine="fast"), rows, 1e-9)
