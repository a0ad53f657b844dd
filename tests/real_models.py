"""Cases of the real-models exactness matrix (tests/test_real_models.py) and their float64 oracle.

Every case is a small, deterministic, float64 model of a kind users really train: Hugging Face models
built from tiny configs (no download), PEFT LoRA, timm-style layer subclasses reproduced here (timm is not
a dependency), user hooks, gradient checkpointing, odd ``torch.nn`` modules, the layer grids of Opacus'
and BackPACK's test suites, and a few ill-posed models that must be refused.

A case is a :class:`RealCase`: ``make()`` builds ``(model, inputs, targets)`` (called under seed 0 with
float64 as the default dtype) and ``loss_fn`` scores one example. ``ill_posed`` is None when an exact
answer exists, else a regex that every refusal's message must match (e.g. ``"randomness"``).

Losses are chosen so that the whole-batch loss is the mean of the per-example losses (what
``check_mean`` and ``Tracker`` assume): token-level cross entropy without padding (equal token counts),
and the per-row mean of :func:`masked_token_ce` on padded batches.

The oracle (:func:`oracle`) is the one of tests/zoo.py, extended: it densifies sparse gradients and, where
``torch.autograd.grad`` is refused (reentrant checkpointing), falls back to ``loss.backward()`` into
``p.grad`` (saving and restoring it). It calls the model on each example's slice (a batch of one) with
the same keyword arguments. Tensor hooks on parameters are honoured by both paths: they are ground truth.
:func:`batch_discrepancy` measures how far a model's whole-batch gradient is from the oracle's mean
(float32 internals of some Hugging Face models make it up to ~1e-7); the matrix widens its atol to that.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from zoo import batch_size, call_model, split_example

B = 3  # examples per batch
T = 6  # sequence length
V = 40  # vocabulary
H = 16  # hidden size of the Hugging Face models
PAD_LENGTHS = (6, 4, 3)  # real tokens per example in the padded batches

# ---------------------------------------------------------------------------------------- oracle


@dataclass(frozen=True)
class Oracle:
    """Per-example gradients ``rows[name]: [B, *shape]`` and losses ``[B]``, with their statistics."""

    rows: dict[str, Tensor]
    losses: Tensor

    @property
    def flat(self) -> Tensor:
        return torch.cat([g.reshape(len(g), -1) for g in self.rows.values()], 1)

    @property
    def mean(self) -> dict[str, Tensor]:
        return {k: g.mean(0) for k, g in self.rows.items()}

    @property
    def var(self) -> dict[str, Tensor]:
        return {k: g.var(0, unbiased=True) for k, g in self.rows.items()}

    @property
    def param_sq_norms(self) -> dict[str, Tensor]:
        return {k: g.reshape(len(g), -1).pow(2).sum(1) for k, g in self.rows.items()}

    @property
    def sq_norms(self) -> Tensor:
        return self.flat.pow(2).sum(1)

    @property
    def inner_products(self) -> Tensor:
        flat = self.flat
        return flat @ flat.mean(0)


def dense(t: Tensor) -> Tensor:
    return t.to_dense() if t.is_sparse else t


def _loss(model, loss_fn, inputs, targets):
    out = call_model(model, inputs)
    return loss_fn(out) if targets is None else loss_fn(out, targets)


def _gradients(model, loss_fn, inputs, targets) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of ``inputs`` and its dense gradient for every trainable parameter (zeros where unused).

    ``torch.autograd.grad`` first; where it is refused (reentrant checkpointing) the forward is run again
    and ``loss.backward()`` writes into ``p.grad``, which is saved before and restored after.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    loss = _loss(model, loss_fn, inputs, targets)
    try:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    except RuntimeError as err:
        if "checkpoint" not in str(err).lower():
            raise
        saved = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            loss = _loss(model, loss_fn, inputs, targets)
            loss.backward()
            grads = [p.grad for p in params]
        finally:
            for p, g in zip(params, saved):
                p.grad = g
    return loss.detach(), {n: torch.zeros_like(p) if g is None else dense(g) for (n, p), g in zip(named.items(), grads)}


def oracle(model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any = None) -> Oracle:
    """A Python loop of autograd, one example (a batch of one) at a time."""
    losses, rows = [], {}
    for i in range(batch_size(inputs)):
        loss, grads = _gradients(
            model, loss_fn, split_example(inputs, i), None if targets is None else split_example(targets, i)
        )
        losses.append(loss)
        for n, g in grads.items():
            rows.setdefault(n, []).append(g)
    return Oracle({n: torch.stack(r) for n, r in rows.items()}, torch.stack(losses))


def batch_discrepancy(model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any, want: Oracle) -> float:
    """max_n ‖∇_n(batch loss) − ḡ_n‖_∞ / max_n ‖ḡ_n‖_∞ over parameters n, ḡ the oracle mean: how far the
    model itself is from computing the same numbers for a batch as for its examples one at a time.

    ~1e-16 for most models. Hugging Face computes some norms in float32 inside a float64 model (Llama's
    RMSNorm, T5's LayerNorm), whose float32 reductions round differently for different batch sizes:
    there it is 1e-8 to 1e-7 (1e-11 for GPT-NeoX, OPT and ViT), and no engine can be closer than that to
    the oracle.
    """
    return max(batch_discrepancies(model, loss_fn, inputs, targets, want).values())


def batch_discrepancies(
    model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any, want: Oracle
) -> dict[str, float]:
    """Per parameter n, ‖∇_n(batch loss) − ḡ_n‖_∞ / max_m ‖ḡ_m‖_∞: :func:`batch_discrepancy` before the max
    over parameters (the scale is the model's largest mean element, so a parameter whose gradient is zero
    in exact arithmetic, such as an attention key bias, gets its absolute discrepancy, not 0/0)."""
    _, grads = _gradients(model, loss_fn, inputs, targets)
    scale = max(m.abs().max().item() for m in want.mean.values())
    return {n: (grads[n] - m).abs().max().item() / scale for n, m in want.mean.items()}


# ------------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class RealCase:
    """One model, batch and loss; ``id`` names it in the matrix (``hf-bert-mask-padded``)."""

    id: str
    make: Callable[[], tuple[nn.Module, Any, Any]]
    loss_fn: Callable
    ill_posed: str | None = None  # regex every refusal must match; None: an exact answer exists

    def instantiate(self, seed: int = 0):
        """A fresh ``(model, inputs, targets)``: same seed, same numbers, every call."""
        with float64_default():
            torch.manual_seed(seed)
            model, inputs, targets = self.make()
        return model.to(torch.float64), inputs, targets


@contextlib.contextmanager
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------------------------------- losses


def logits_of(out) -> Tensor:
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def token_ce(out, labels):
    """Cross entropy over all tokens, as users write it (closed-form per-example loss in persample)."""
    logits = logits_of(out)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def masked_token_ce(out, labels):
    """Per example: mean token CE over its labels != -100; over a batch: the mean of those."""
    logits = logits_of(out)
    tokens = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    mask = (labels != -100).to(tokens.dtype).reshape(labels.shape)
    return ((tokens.reshape(labels.shape) * mask).sum(1) / mask.sum(1)).mean()


def class_ce(out, y):
    return F.cross_entropy(logits_of(out), y)


def own_loss(out):
    """The loss the model computed itself (``labels=`` in its inputs)."""
    return out.loss if hasattr(out, "loss") else out[1]


# ----------------------------------------------------------------------------------- token batches


def tokens(shape=(B, T), low=3, high=V) -> Tensor:
    """Token ids that avoid the special ids 0-2 (pad / bos / eos of every config here)."""
    return torch.randint(low, high, shape)


def padding_mask(side: str, length: int = T) -> Tensor:
    """attention_mask of a padded batch: PAD_LENGTHS real tokens, zeros on ``side``."""
    mask = torch.zeros(len(PAD_LENGTHS), length, dtype=torch.long)
    for i, n in enumerate(PAD_LENGTHS):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, length - n :] = 1
    return mask


def padded(ids: Tensor, labels: Tensor, mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    return ids.masked_fill(mask == 0, pad_id), labels.masked_fill(mask == 0, -100)


# ---------------------------------------------------------------------------- Hugging Face models


def _transformers():
    return pytest.importorskip("transformers")


def _config(family: str, attn: str, **extra):
    """A tiny config of ``family`` (one layer, hidden 16, two heads, every dropout 0); ``extra`` overrides."""
    tf = _transformers()
    layers = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, max_position_embeddings=32)
    bert_like = dict(hidden_size=H, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **layers)
    llama_like = dict(hidden_size=H, num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2, **layers)
    moe = dict(experts_implementation="eager", output_router_logits=False)
    configs = {
        "bert": (tf.BertConfig, dict(pad_token_id=0, **bert_like)),
        "roberta": (tf.RobertaConfig, dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, **bert_like)),
        "distilbert": (
            tf.DistilBertConfig,
            dict(
                dim=H,
                n_layers=1,
                n_heads=2,
                hidden_dim=24,
                dropout=0.0,
                attention_dropout=0.0,
                seq_classif_dropout=0.0,
                max_position_embeddings=32,
                pad_token_id=0,
            ),
        ),
        "albert": (tf.AlbertConfig, dict(embedding_size=8, classifier_dropout_prob=0.0, pad_token_id=0, **bert_like)),
        "electra": (tf.ElectraConfig, dict(embedding_size=8, pad_token_id=0, **bert_like)),
        "mobilebert": (
            tf.MobileBertConfig,
            dict(
                embedding_size=8,
                intra_bottleneck_size=8,
                true_hidden_size=8,
                num_feedforward_networks=1,
                classifier_dropout=0.0,
                pad_token_id=0,
                **bert_like,
            ),
        ),
        "mpnet": (tf.MPNetConfig, dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, **bert_like)),
        "xlm_roberta": (tf.XLMRobertaConfig, dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, **bert_like)),
        "esm": (tf.EsmConfig, dict(pad_token_id=1, mask_token_id=2, position_embedding_type="absolute", **bert_like)),
        "deberta_v2": (
            tf.DebertaV2Config,
            dict(
                pad_token_id=0,
                relative_attention=True,
                position_buckets=8,
                max_relative_positions=16,
                pos_att_type=["p2c", "c2p"],
                pooler_dropout=0.0,
                **bert_like,
            ),
        ),
        "t5": (
            tf.T5Config,
            dict(
                d_model=H,
                d_kv=8,
                d_ff=24,
                num_layers=1,
                num_decoder_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
                dropout_rate=0.0,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            ),
        ),
        "bart": (
            tf.BartConfig,
            dict(
                d_model=H,
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
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
                decoder_start_token_id=2,
                forced_eos_token_id=None,
            ),
        ),
        "gpt2": (
            tf.GPT2Config,
            dict(
                n_embd=H,
                n_layer=1,
                n_head=2,
                n_positions=32,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
        ),
        "llama": (tf.LlamaConfig, llama_like),
        "mistral": (tf.MistralConfig, dict(sliding_window=4, **llama_like)),
        "qwen2": (tf.Qwen2Config, dict(use_sliding_window=False, **llama_like)),
        # issue 22, MoE: four experts, top-2 routing, eager experts (a loop over the experts that gathers their
        # tokens and index_add_s them back; the default grouped_mm refuses float64), no router aux loss
        # (output_router_logits=False, every config's default: that term couples the batch)
        "mixtral": (tf.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, **moe, **llama_like)),
        "qwen2_moe": (
            tf.Qwen2MoeConfig,
            dict(
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=8,
                shared_expert_intermediate_size=12,
                **moe,
                **llama_like,
            ),
        ),
        "olmoe": (tf.OlmoeConfig, dict(num_experts=4, num_experts_per_tok=2, **moe, **llama_like)),
        "granitemoe": (tf.GraniteMoeConfig, dict(num_local_experts=4, num_experts_per_tok=2, **moe, **llama_like)),
        "gpt_neox": (
            tf.GPTNeoXConfig,
            dict(
                hidden_size=H,
                rotary_pct=0.5,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                use_parallel_residual=True,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                **layers,
            ),
        ),
        "opt": (
            tf.OPTConfig,
            dict(
                hidden_size=H,
                ffn_dim=24,
                num_hidden_layers=1,
                num_attention_heads=2,
                word_embed_proj_dim=H,
                max_position_embeddings=32,
                dropout=0.0,
                attention_dropout=0.0,
                pad_token_id=1,
                bos_token_id=2,
                eos_token_id=2,
            ),
        ),
        "vit": (
            tf.ViTConfig,
            dict(
                hidden_size=H,
                image_size=8,
                patch_size=4,
                num_channels=3,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=24,
            ),
        ),
    }
    cls, kwargs = configs[family]
    return cls(**{**kwargs, "vocab_size": V, "num_labels": 3, "attn_implementation": attn, **extra})


def hf_model(family: str, head: str, attn: str = "eager", train: bool = False, **config_extra) -> nn.Module:
    """``transformers.<Family><head>`` from a tiny config, float64, in eval mode unless ``train``."""
    tf = _transformers()
    names = {
        "bert": "Bert",
        "roberta": "Roberta",
        "distilbert": "DistilBert",
        "albert": "Albert",
        "electra": "Electra",
        "mobilebert": "MobileBert",
        "mpnet": "MPNet",
        "xlm_roberta": "XLMRoberta",
        "esm": "Esm",
        "deberta_v2": "DebertaV2",
        "t5": "T5",
        "bart": "Bart",
        "gpt2": "GPT2",
        "llama": "Llama",
        "mistral": "Mistral",
        "qwen2": "Qwen2",
        "mixtral": "Mixtral",
        "qwen2_moe": "Qwen2Moe",
        "olmoe": "Olmoe",
        "granitemoe": "GraniteMoe",
        "gpt_neox": "GPTNeoX",
        "opt": "OPT",
        "vit": "ViT",
    }
    if family == "gpt2" and head == "ForCausalLM":
        head = "LMHeadModel"
    config = _config(family, attn, **config_extra)
    model = getattr(tf, names[family] + head)(config).to(torch.float64)
    return model.train(train)


def causal_lm_loss(logits, labels, vocab_size, ignore_index=-100, **kwargs):
    """HF's ``ForCausalLMLoss`` without its ``logits.float()``, which rounds a float64 model's loss to
    float32 (then no two computations agree to 1e-9). Installed as ``model.loss_function``, so the loss
    is still computed by the model's forward from ``labels=``."""
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, vocab_size), shifted.reshape(-1), ignore_index=ignore_index)


def own_loss_in_float64(model: nn.Module, family: str) -> nn.Module:
    if family in DECODERS + MOE:
        model.loss_function = causal_lm_loss
    return model


PAD_ID = {
    "bert": 0,
    "roberta": 1,
    "distilbert": 0,
    "albert": 0,
    "electra": 0,
    "mobilebert": 0,
    "mpnet": 1,
    "xlm_roberta": 1,
    "esm": 1,
    "deberta_v2": 0,
    "t5": 0,
    "bart": 1,
    "gpt2": 0,
    "llama": 0,
    "mistral": 0,
    "qwen2": 0,
    "mixtral": 0,
    "qwen2_moe": 0,
    "olmoe": 0,
    "granitemoe": 0,
    "gpt_neox": 0,
    "opt": 1,
}
ENCODERS = ("bert", "roberta", "distilbert", "albert")
# encoders whose padded batches and position / token-type ids the matrix covers since issue 22
MORE_ENCODERS = ("electra", "mobilebert", "mpnet", "xlm_roberta", "esm", "deberta_v2")
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "gpt_neox", "opt")
MOE = ("mixtral", "qwen2_moe", "olmoe", "granitemoe")  # mixture-of-experts decoders (issue 22)
SEQ2SEQ = ("t5", "bart")


def _lm_head(family):
    return (
        "ForMaskedLM"
        if family in ENCODERS + MORE_ENCODERS
        else "ForConditionalGeneration"
        if family in SEQ2SEQ
        else "ForCausalLM"
    )


def _text_batch(family: str, variant: str):
    """Inputs and targets of one variant: nomask, mask-ones, mask-padded[-left], own-loss."""
    ids, labels = tokens(), tokens()
    inputs: dict[str, Tensor] = {"input_ids": ids}
    dec_ids = dec_labels = None
    if family in SEQ2SEQ:
        dec_ids, dec_labels = tokens(), tokens()
        inputs["decoder_input_ids"] = dec_ids
        labels = dec_labels
    if variant == "mask-ones":
        inputs["attention_mask"] = torch.ones_like(ids)
        if dec_ids is not None:
            inputs["decoder_attention_mask"] = torch.ones_like(dec_ids)
    elif variant.startswith("mask-padded") or variant == "own-loss-padded":
        mask = padding_mask("left" if variant.endswith("left") else "right")
        inputs["input_ids"], enc_labels = padded(ids, labels, mask, PAD_ID[family])
        inputs["attention_mask"] = mask
        if dec_ids is None:
            labels = enc_labels
        else:
            dec_mask = padding_mask("right")
            inputs["decoder_input_ids"], labels = padded(dec_ids, dec_labels, dec_mask, PAD_ID[family])
            inputs["decoder_attention_mask"] = dec_mask
        if variant == "own-loss-padded":  # the model's own loss of a padded batch (labels -100 on padding)
            if family not in ENCODERS + MORE_ENCODERS:  # and on a few real tokens: 2 counted per example, so
                labels = labels.clone()  # that the batch loss is the mean of the examples' (the matrix's premise;
                labels[:, 3:] = -100  # unequal counts, weights n_i / N: tests/test_model_loss.py)
            inputs["labels"] = torch.randint(0, 3, (B,)) if family in ENCODERS + MORE_ENCODERS else labels
            return inputs, None
    elif variant == "own-loss":
        if family in SEQ2SEQ:
            del inputs["decoder_input_ids"]  # the model shifts the labels right itself
        inputs["labels"] = torch.randint(0, 3, (B,)) if family in ENCODERS + MORE_ENCODERS else labels
        return inputs, None
    return inputs, labels


def hf_text_case(family: str, variant: str, attn: str = "eager") -> RealCase:
    own = variant.startswith("own-loss")
    head = "ForSequenceClassification" if own and family in ENCODERS + MORE_ENCODERS else _lm_head(family)
    loss_fn = own_loss if own else masked_token_ce if "padded" in variant else token_ce

    def make():
        model = hf_model(family, head, attn)
        if own:
            own_loss_in_float64(model, family)
        return (model, *_text_batch(family, variant))

    name = family.replace("_", "") + ("" if attn == "eager" else "-" + attn)
    return RealCase(f"hf-{name}-{variant}", make, loss_fn)


def hf_head_case(family: str, head: str, variant: str, **config) -> RealCase:
    """A padded batch (right padding, PAD_LENGTHS) scored by the model's own loss of ``head``: masked LM and
    token classification (labels -100 on padding and on real tokens past the third), question answering,
    or sequence regression / multi-label classification (``config``)."""

    def make():
        model = hf_model(family, head, **config)
        mask = padding_mask("right")
        inputs: dict[str, Tensor] = {
            "input_ids": tokens().masked_fill(mask == 0, PAD_ID[family]),
            "attention_mask": mask,
        }
        if head == "ForQuestionAnswering":
            inputs["start_positions"], inputs["end_positions"] = torch.tensor([0, 2, 1]), torch.tensor([3, 3, 2])
        elif head == "ForSequenceClassification":
            classes = config.get("num_labels", 3)
            inputs["labels"] = torch.randn(B) if classes == 1 else torch.randint(0, 2, (B, classes)).double()
        else:
            labels = tokens() if head == "ForMaskedLM" else torch.randint(0, 3, mask.shape)
            labels[:, 3:] = -100  # 3 labels counted per example (padding and real tokens not scored), so that
            inputs["labels"] = labels  # the batch loss is the mean of the examples' (the matrix's premise)
        return model, inputs, None

    return RealCase(f"hf-{family.replace('_', '')}-{variant}", make, own_loss)


def hf_vit_case(variant: str) -> RealCase:
    def make():
        pixels, y = torch.randn(B, 3, 8, 8), torch.randint(0, 3, (B,))
        model = hf_model("vit", "ForImageClassification")
        return (
            (model, {"pixel_values": pixels, "labels": y}, None)
            if variant == "own-loss"
            else (model, {"pixel_values": pixels}, y)
        )

    return RealCase(f"hf-vit-{variant}", make, own_loss if variant == "own-loss" else class_ce)


def hf_checkpointing_case(family: str, reentrant: bool) -> RealCase:
    """HF gradient checkpointing (train mode, every dropout 0, two layers), user token loss."""

    def make():
        model = hf_model(
            family,
            "ForCausalLM",
            train=True,
            use_cache=False,
            **({"n_layer": 2} if family == "gpt2" else {"num_hidden_layers": 2}),
        )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        return model, {"input_ids": tokens()}, tokens()

    kind = "reentrant" if reentrant else "nonreentrant"
    return RealCase(f"hf-{family}-checkpointing-{kind}", make, token_ce)


def lora_case(family: str, variant: str) -> RealCase:
    """PEFT LoRA (r=2, random A and B) on a causal LM: only the LoRA matrices train."""
    targets = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[family]

    def make():
        peft = pytest.importorskip("peft")
        base = own_loss_in_float64(hf_model(family, "ForCausalLM"), family)
        config = peft.LoraConfig(
            r=2,
            lora_alpha=4,
            lora_dropout=0.0,
            target_modules=targets,
            init_lora_weights=False,
            fan_in_fan_out=family == "gpt2",
        )
        model = peft.get_peft_model(base, config).to(torch.float64).eval()
        return (model, *_text_batch(family, variant))

    loss_fn = own_loss if variant == "own-loss" else masked_token_ce if "padded" in variant else token_ce
    return RealCase(f"peft-lora-{family}-{variant}", make, loss_fn)


def hf_cases() -> list[RealCase]:
    cases = []
    for family in ENCODERS + SEQ2SEQ + DECODERS:
        cases += [hf_text_case(family, v) for v in ("nomask", "mask-ones", "mask-padded", "own-loss")]
        if family in DECODERS:
            # Eager attention of HF 5.x gives NaN on the fully masked query rows of left padding (and NaN
            # gradients everywhere); GPT-2 and every model's SDPA path keep them finite.
            cases.append(hf_text_case(family, "mask-padded-left", "eager" if family == "gpt2" else "sdpa"))
    cases += [
        hf_text_case("bert", "mask-padded", "sdpa"),
        hf_text_case("gpt2", "mask-padded", "sdpa"),
        hf_text_case("llama", "mask-padded", "sdpa"),
    ]
    # issue 22: more encoders (padding, position and token-type ids), and the model's own loss of padded batches
    for family in MORE_ENCODERS:
        cases += [hf_text_case(family, v) for v in ("mask-padded", "own-loss")]
    cases += [hf_text_case(family, "own-loss-padded") for family in ("bert", "roberta", "electra", "gpt2", "llama")]
    cases += [
        hf_head_case("bert", "ForMaskedLM", "own-loss-mlm-padded"),
        hf_head_case("roberta", "ForTokenClassification", "own-loss-tokens-padded"),
        hf_head_case("bert", "ForQuestionAnswering", "own-loss-qa-padded", num_labels=2),
        hf_head_case("distilbert", "ForSequenceClassification", "own-loss-regression", num_labels=1),
        hf_head_case(
            "electra", "ForSequenceClassification", "own-loss-multilabel", problem_type="multi_label_classification"
        ),
    ]
    cases += [hf_vit_case("logits"), hf_vit_case("own-loss")]
    # issue 22: mixture-of-experts routing (tokens of different examples meet in one expert)
    cases += [hf_text_case(family, v) for family in MOE for v in ("nomask", "mask-padded", "own-loss")]
    cases += [hf_checkpointing_case(f, r) for f in ("gpt2", "llama") for r in (True, False)]
    cases += [
        lora_case("gpt2", "mask-padded"),
        lora_case("gpt2", "own-loss"),
        lora_case("llama", "nomask"),
        lora_case("llama", "own-loss"),
    ]
    return cases


# ----------------------------------------------------------------------- timm-style layers (copied)


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight is standardised per output channel (batch_norm over the weight)."""

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2dMeanVar(nn.Conv2d):
    """Weight standardisation written out with mean and var (timm's ScaledStdConv2d, gain 1)."""

    def forward(self, x):
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (self.weight - mean) / torch.sqrt(var + 1e-6)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow 'SAME' padding computed from the input size in forward."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s, d in zip((iw, ih), self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's LayerNorm2d: channels-last layer norm of an NCHW tensor."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class EqualLinear(nn.Linear):
    """Equalised-learning-rate Linear (StyleGAN): the weight is scaled in forward."""

    def forward(self, x):
        return F.linear(x, self.weight * 0.1, self.bias)


class PositionEmbedding(nn.Embedding):
    """Looks up positions ``arange(T)`` instead of its input (one table row per position, shared)."""

    def forward(self, ids):
        return super().forward(torch.arange(ids.shape[1], device=ids.device))


class ClampedEmbedding(nn.Embedding):
    """Out-of-range ids are clamped to the last row."""

    def forward(self, ids):
        return super().forward(ids.clamp(max=self.num_embeddings - 1))


class OffsetEmbedding(nn.Embedding):
    """Ids are shifted by a fixed offset before the lookup (OPT's learned positions do this)."""

    offset = 2

    def forward(self, ids):
        return super().forward(ids + self.offset)


def conv_classifier(conv: nn.Module, channels_in: int = 3) -> nn.Module:
    """conv → GELU → global average pool → Linear(…, 3)."""
    return nn.Sequential(conv, nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(conv.out_channels, 3))


class TokenClassifier(nn.Module):
    """token embedding (+ optional position embedding) → tanh → mean over T → Linear(…, 3)."""

    def __init__(self, embed: nn.Module, positions: nn.Module | None = None):
        super().__init__()
        self.embed, self.positions = embed, positions
        self.out = nn.Linear(embed.embedding_dim, 3)

    def forward(self, ids):
        h = self.embed(ids)
        if self.positions is not None:
            h = h + self.positions(ids)
        return self.out(torch.tanh(h).mean(1))


def image_case(id: str, build: Callable[[], nn.Module], shape=(3, 7, 7)) -> RealCase:
    def make():
        return build().eval(), torch.randn(B, *shape), torch.randint(0, 3, (B,))

    return RealCase(id, make, class_ce)


def token_case(id: str, build: Callable[[], nn.Module], high: int = 20, loss_fn=class_ce) -> RealCase:
    def make():
        return build(), torch.randint(0, high, (B, T)), torch.randint(0, 3, (B,))

    return RealCase(id, make, loss_fn)


def vector_case(
    id: str, build: Callable[[], nn.Module], shape=(6,), train: bool = False, ill_posed: str | None = None
) -> RealCase:
    def make():
        return build().train(train), torch.randn(B, *shape), torch.randint(0, 3, (B,))

    return RealCase(id, make, class_ce, ill_posed)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def timm_cases() -> list[RealCase]:
    def ln2d(width):
        def build():
            norm = LayerNorm2d(4)
            _perturb(norm)
            return nn.Sequential(
                nn.Conv2d(3, 4, 1), norm, nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
            )

        return image_case(f"timm-layernorm2d-w{'-eq' if width == 4 else '-ne'}-c", build, (3, 5, width))

    return [
        image_case("timm-stdconv2d-batchnorm-trick", lambda: conv_classifier(StdConv2d(3, 4, 3, padding=1))),
        image_case("timm-stdconv2d-mean-var", lambda: conv_classifier(StdConv2dMeanVar(3, 4, 3))),
        image_case("timm-conv2d-same", lambda: conv_classifier(Conv2dSame(3, 4, 3, stride=2))),
        ln2d(4),
        ln2d(6),
        vector_case("timm-equal-linear", lambda: nn.Sequential(EqualLinear(6, 8), nn.Tanh(), EqualLinear(8, 3))),
        token_case(
            "timm-position-embedding-arange", lambda: TokenClassifier(nn.Embedding(20, 8), PositionEmbedding(T, 8))
        ),
        token_case("timm-clamped-embedding", lambda: TokenClassifier(ClampedEmbedding(16, 8)), high=20),
        token_case("timm-offset-embedding", lambda: TokenClassifier(OffsetEmbedding(22, 8)), high=20),
    ]


# ---------------------------------------------------------------------------------------- user hooks


def hooked_mlp(register: Callable[[nn.Sequential], Any]) -> Callable[[], nn.Module]:
    def build():
        model = mlp()
        register(model)
        return model

    return build


def hook_cases() -> list[RealCase]:
    calls = []
    return [
        vector_case(
            "hook-forward-output-x2", hooked_mlp(lambda m: m[2].register_forward_hook(lambda mod, args, out: out * 2))
        ),
        vector_case(
            "hook-forward-pre-scales-input",
            hooked_mlp(lambda m: m[2].register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))),
        ),
        vector_case("hook-param-grad-halved", hooked_mlp(lambda m: m[2].weight.register_hook(lambda g: g * 0.5))),
        vector_case(
            "hook-full-backward-returns-none",
            hooked_mlp(lambda m: m[2].register_full_backward_hook(lambda mod, gin, gout: calls.append(len(gin)))),
        ),
        vector_case(
            "hook-full-backward-scales-grad-input",
            hooked_mlp(lambda m: m[2].register_full_backward_hook(lambda mod, gin, gout: (gin[0] * 0.5,))),
        ),
    ]


# -------------------------------------------------------------------------- gradient checkpointing


class Checkpointed(nn.Module):
    """Linear → checkpoint(block) → Linear, block = Linear-Tanh-Linear."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.out(torch.tanh(h))


def checkpoint_cases() -> list[RealCase]:
    return [
        vector_case(f"torch-checkpoint-{'reentrant' if r else 'nonreentrant'}", lambda r=r: Checkpointed(r))
        for r in (True, False)
    ]


# ------------------------------------------------------------------------------------- odd modules


class PackedLSTM(nn.Module):
    """pack_padded_sequence → LSTM → pad_packed_sequence; classifies each sequence's last valid state."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, ids, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(ids), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        h, _ = self.lstm(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=ids.shape[1])
        last = h[torch.arange(len(ids)), lengths - 1]
        return self.out(torch.tanh(last))


class AdaptiveSoftmaxLM(nn.Module):
    """Linear → AdaptiveLogSoftmaxWithLoss; returns its (output, loss) named tuple."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.asm = nn.AdaptiveLogSoftmaxWithLoss(8, 12, cutoffs=[4, 8], div_value=2.0)

    def forward(self, x, target):
        return self.asm(torch.tanh(self.inp(x)), target)


class OwnBatchLoss(nn.Module):
    """Returns (logits, cross_entropy(logits, y)): a batch loss computed inside the model."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x, y):
        logits = self.net(x)
        return logits, F.cross_entropy(logits, y)


class DictOutput(nn.Module):
    """Returns {"logits", "aux"}; the loss uses both."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.aux = nn.Linear(6, 2)

    def forward(self, x):
        return {"logits": self.net(x), "aux": self.aux(x)}


def dict_output_loss(out, y):
    return F.cross_entropy(out["logits"], y) + 0.1 * out["aux"].pow(2).mean()


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(F.dropout(x, 0.5, training=True))


class SDPADropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(6, 24)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        return self.out(a.transpose(1, 2).flatten(2).mean(1))


def odd_cases() -> list[RealCase]:
    def embed_case(id, **kw):
        return token_case(id, lambda: TokenClassifier(nn.Embedding(20, 8, **kw)))

    def instance_norm_case(dim):
        def build():
            norm = (nn.InstanceNorm1d if dim == 1 else nn.InstanceNorm2d)(3, affine=True, track_running_stats=True)
            _perturb(norm)
            pool = nn.AdaptiveAvgPool1d(1) if dim == 1 else nn.AdaptiveAvgPool2d(1)
            return nn.Sequential(norm, nn.Tanh(), pool, nn.Flatten(), nn.Linear(3, 3))

        return vector_case(
            f"odd-instancenorm{dim}d-train-tracked", build, (3, 7) if dim == 1 else (3, 5, 5), train=True
        )

    def packed_lstm():
        lengths = torch.tensor([6, 3, 2])
        return PackedLSTM(), {"ids": torch.randint(0, 20, (B, T)), "lengths": lengths}, torch.randint(0, 3, (B,))

    def adaptive_softmax():
        return AdaptiveSoftmaxLM(), (torch.randn(B, 6), torch.tensor([0, 5, 11])), None

    def own_batch_loss():
        return OwnBatchLoss(), (torch.randn(B, 6), torch.randint(0, 3, (B,))), None

    def dict_output():
        return DictOutput(), torch.randn(B, 6), torch.randint(0, 3, (B,))

    def bn_train():
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    return [
        embed_case("odd-embedding-max-norm", max_norm=1.0),
        embed_case("odd-embedding-sparse", sparse=True),
        instance_norm_case(1),
        instance_norm_case(2),
        RealCase("odd-packed-sequence-lstm", packed_lstm, class_ce),
        RealCase("odd-adaptive-log-softmax", adaptive_softmax, own_loss),
        RealCase("odd-model-computes-batch-loss", own_batch_loss, own_loss),
        RealCase("odd-dict-output", dict_output, dict_output_loss),
        vector_case("odd-functional-dropout", FunctionalDropout, ill_posed="randomness"),
        vector_case("odd-sdpa-dropout", SDPADropout, (5, 6), ill_posed="randomness"),
        vector_case("odd-batchnorm-train", bn_train, train=True, ill_posed="BatchNorm|batch norm"),
    ]


# ----------------------------------------------------------------------------- Opacus/BackPACK grids


def _perturb(model: nn.Module) -> nn.Module:
    """Move every parameter (and BatchNorm running statistic) off its initial value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


class Probe(nn.Module):
    """A classifier around one layer: layer → first tensor of its output → tanh → flatten → Linear(…, 3).

    ``seq_first``: the layer gets its input as [T, B, …] (the batch is on dim 1 inside the forward).
    ``call(layer, x)`` applies the layer (default ``layer(x)``).
    """

    def __init__(
        self,
        layer: nn.Module,
        example: Tensor,
        seq_first: bool = False,
        call: Callable[[nn.Module, Tensor], Any] | None = None,
    ):
        super().__init__()
        self.layer, self.seq_first, self.call = layer, seq_first, call
        with torch.no_grad():
            width = self.features(example).shape[1]
        self.head = nn.Linear(width, 3)

    def features(self, x):
        if self.seq_first:
            x = x.transpose(0, 1)
        h = self.call(self.layer, x) if self.call is not None else self.layer(x)
        h = h[0] if isinstance(h, tuple) else h
        if self.seq_first:
            h = h.transpose(0, 1)
        return torch.tanh(h).flatten(1)

    def forward(self, x):
        return self.head(self.features(x))


def layer_case(
    id: str,
    layer: Callable[[], nn.Module],
    shape: tuple,
    *,
    ints: int | None = None,
    seq_first: bool = False,
    call=None,
) -> RealCase:
    """One layer in a :class:`Probe`, eval mode, on a float (or, with ``ints``, token) batch of ``shape``."""

    def make():
        x = torch.randint(0, ints, (B, *shape)) if ints else torch.randn(B, *shape)
        model = Probe(_perturb(layer()), x, seq_first, call)
        return model.eval(), x, torch.randint(0, 3, (B,))

    return RealCase(f"layer-{id}", make, class_ce)


class RawParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(6))
        self.w = nn.Parameter(torch.randn(6, 3) * 0.5)
        self.bias = nn.Parameter(torch.randn(3) * 0.1)

    def forward(self, x):
        return torch.tanh(x * self.gain) @ self.w + self.bias


def _attend(layer, x):
    return layer(x, x, x, need_weights=False)


def layer_cases() -> list[RealCase]:
    seq = (5, 6)
    return [
        layer_case("linear-2d", lambda: nn.Linear(6, 8), (6,)),
        layer_case("linear-3d", lambda: nn.Linear(6, 8), seq),
        layer_case("conv1d-stride2-pad1", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 9)),
        layer_case("conv1d-same-dilation2", lambda: nn.Conv1d(3, 4, 3, padding="same", dilation=2), (3, 9)),
        layer_case(
            "conv1d-groups2-reflect", lambda: nn.Conv1d(4, 4, 3, padding=1, groups=2, padding_mode="reflect"), (4, 9)
        ),
        layer_case("conv2d-stride2-pad1", lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1), (2, 7, 7)),
        layer_case("conv2d-valid-dilation2", lambda: nn.Conv2d(2, 4, 3, padding="valid", dilation=2), (2, 7, 7)),
        layer_case(
            "conv2d-same-circular", lambda: nn.Conv2d(2, 4, 3, padding="same", padding_mode="circular"), (2, 6, 6)
        ),
        layer_case("conv2d-depthwise", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 6, 6)),
        layer_case(
            "conv2d-groups2-rect-nobias",
            lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2, bias=False),
            (4, 7, 6),
        ),
        layer_case("conv3d-stride-pad", lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), (2, 4, 5, 4)),
        layer_case(
            "conv3d-same-groups2-reflect",
            lambda: nn.Conv3d(2, 4, 3, padding="same", groups=2, padding_mode="reflect"),
            (2, 4, 4, 4),
        ),
        layer_case("convtranspose1d-stride2", lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (3, 5)),
        layer_case(
            "convtranspose2d-groups2-outpad",
            lambda: nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
            (2, 4, 4),
        ),
        layer_case("embedding-padding-idx", lambda: nn.Embedding(20, 8, padding_idx=0), (T,), ints=20),
        layer_case("layernorm", lambda: nn.LayerNorm(6), seq),
        layer_case("rmsnorm", lambda: nn.RMSNorm(6), seq),
        layer_case("groupnorm", lambda: nn.GroupNorm(2, 4), (4, 6)),
        layer_case("instancenorm2d-affine", lambda: nn.InstanceNorm2d(3, affine=True), (3, 5, 5)),
        layer_case("batchnorm1d-eval", lambda: nn.BatchNorm1d(6), (6,)),
        layer_case("batchnorm2d-eval", lambda: nn.BatchNorm2d(3), (3, 5, 5)),
        layer_case("rnn-seq-first", lambda: nn.RNN(6, 8), seq, seq_first=True),
        layer_case(
            "gru-2layer-bidirectional", lambda: nn.GRU(6, 8, num_layers=2, bidirectional=True, batch_first=True), seq
        ),
        layer_case("lstm-bidirectional-seq-first", lambda: nn.LSTM(6, 8, bidirectional=True), seq, seq_first=True),
        layer_case("lstm-2layer", lambda: nn.LSTM(6, 8, num_layers=2, batch_first=True), seq),
        layer_case("mha-batch-first", lambda: nn.MultiheadAttention(6, 2, batch_first=True), seq, call=_attend),
        layer_case("mha-seq-first", lambda: nn.MultiheadAttention(6, 2), seq, seq_first=True, call=_attend),
        layer_case(
            "mha-need-weights-causal",
            lambda: nn.MultiheadAttention(6, 2, batch_first=True),
            seq,
            call=lambda layer, x: layer(x, x, x, attn_mask=torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)),
        ),
        layer_case("embedding-bag-mean", lambda: nn.EmbeddingBag(20, 8, mode="mean", padding_idx=0), (T,), ints=20),
        layer_case("embedding-bag-sum", lambda: nn.EmbeddingBag(20, 8, mode="sum"), (T,), ints=20),
        layer_case(
            "transformer-encoder-layer-norm-first",
            lambda: nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True, norm_first=True),
            seq,
        ),
        layer_case(
            "transformer-encoder-layer-seq-first",
            lambda: nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0),
            seq,
            seq_first=True,
        ),
        layer_case("bilinear", lambda: nn.Bilinear(4, 3, 5), (7,), call=lambda m, x: m(x[:, :4], x[:, 4:])),
        layer_case("prelu-channels", lambda: nn.PReLU(3), (3, 5)),
        layer_case("raw-parameters", RawParameters, (6,)),
    ]


# ------------------------------------------------------------------------------------------ all


def all_cases() -> list[RealCase]:
    cases = hf_cases() + timm_cases() + hook_cases() + checkpoint_cases() + odd_cases() + layer_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


# ------------------------------------------------------------------------------------- numerics


def high_snr_problem(ratio: float, batch: int = 32, bf16_grid: bool = False):
    """A float32 Linear(8, 4) whose per-example gradients have |mean|/std ≈ ``ratio`` per element.

    The Linear is zero, so its output is exactly 0 and the output gradient of the MSE loss is
    b_i = −y_i / 2 = 1 + δ m_i; the inputs are x_i = 1 + δ n_i, so g_i = b_i x_iᵀ ≈ 1 + δ (m_i + n_i),
    and δ = 1/(ratio·√2). The only rounding left in float32 is that of the gradients themselves.
    ``bf16_grid`` puts x and y on bfloat16's grid, so that autocast does not round the inputs.
    """
    gen = torch.Generator().manual_seed(0)
    delta = 1.0 / (ratio * math.sqrt(2.0))
    x = 1 + delta * torch.randn(batch, 8, generator=gen)
    y = -2 * (1 + delta * torch.randn(batch, 4, generator=gen))
    if bf16_grid:
        x, y = x.bfloat16().float(), y.bfloat16().float()
    model = nn.Linear(8, 4)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model, x, y
