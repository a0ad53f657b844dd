"""Sweep every Hugging Face architecture in transformers' auto mappings against a float64 oracle (issue 22).

For every model type of ``MODEL_FOR_{CAUSAL_LM,SEQUENCE_CLASSIFICATION,TOKEN_CLASSIFICATION,MASKED_LM}_MAPPING_NAMES``
a tiny config is built generically (every size field found is shrunk: hidden 32, 2 heads, 2 layers, vocab 99,
4 experts, ...), the model in float64 and eval mode, B = 4, T = 8, in three variants:

- ``nomask``: ``input_ids`` only, a user loss (token cross entropy, or class cross entropy for a classifier);
- ``padded``: ``attention_mask`` with trailing zeros for 2 of the 4 examples (lengths 8, 8, 5, 3), the padded
  tokens' labels ``-100`` and a per-example mean over the real tokens;
- ``own``: the model's own loss (``labels=`` in the batch, ``out.loss``), no mask.

Each run records ``persample.explain``'s engine for ``grad_stats(engine="auto")`` (and the fast engine's refusal
code) and compares ``grad_stats(engine="auto")``, ``grad_stats(engine="fast")`` (when it does not refuse) and
``per_sample_grads(engine="auto")`` with an independent oracle: a Python loop of ``torch.autograd.grad`` on a
deepcopy of the model, one example at a time (an example alone gets its own mask row). A result that differs
from the oracle by more than ``tol`` (relative, max-abs) without raising is a MISMATCH; ``tol`` is 1e-8, or 30x
the model's own batch-vs-example discrepancy where that is float32 rounding (<= 1e-6: models that compute a norm
or the loss in float32 inside a float64 model), never above 3e-5.

Usage (runs in the background, resumable; results are appended as it goes)::

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/hf_sweep.py --out benchmarks/results/hf-sweep-cpu
    python benchmarks/hf_sweep.py --report benchmarks/results/hf-sweep-cpu    # .jsonl -> .json + .md
    python benchmarks/hf_sweep.py --one llama ForCausalLM padded              # one run, printed

A driver process runs the runs in a worker subprocess, restarts it after a crash or a hang (a run that prints
no result within ``--run-limit`` seconds is recorded as ``timeout``), and skips runs already in the ``.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from real_models import class_ce, logits_of, masked_token_ce, token_ce  # noqa: E402  (the matrix's losses)

B, T, V = 4, 8, 99
LENGTHS = (8, 8, 5, 3)  # real tokens per example in the padded variant
HEADS = ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification", "ForMaskedLM")
MAPPINGS = {
    "ForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "ForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "ForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "ForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
}
AUTO = {
    "ForCausalLM": "AutoModelForCausalLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForMaskedLM": "AutoModelForMaskedLM",
}
VARIANTS = ("nomask", "padded", "own")
HARD_TOL = 1e-8
MAX_PARAMS = 3_000_000

# ------------------------------------------------------------------------------------------ tiny configs

SIZE = {  # field -> value (only set where the default config has the field and its value is larger)
    "hidden_size": 32,
    "d_model": 32,
    "n_embd": 32,
    "n_embed": 32,
    "embed_dim": 32,
    "hidden_dim": 32,
    "dim": 32,
    "model_dim": 32,
    "word_embed_proj_dim": 32,
    "embedding_size": 16,
    "embedding_dim": 32,
    "d_embed": 32,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "d_ff": 64,
    "n_inner": 64,
    "ffn_hidden_size": 64,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "inner_hidden_size": 64,
    "hidden_dim_ffn": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "intermediate_size_mlp": 64,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_decoder_layers": 2,
    "num_encoder_layers": 2,
    "num_attention_heads": 2,
    "n_head": 2,
    "n_heads": 2,
    "num_heads": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "num_key_value_heads": 1,
    "n_kv_heads": 1,
    "num_kv_heads": 1,
    "multi_query_group_num": 1,
    "head_dim": 16,
    "d_kv": 16,
    "kv_channels": 16,
    "attention_head_size": 16,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "vocab_size": V,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "n_ctx": 64,
    "max_seq_len": 64,
    "seq_length": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "top_k": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "state_size": 8,
    "ssm_state_size": 8,
    "mamba_d_state": 8,
    "mamba_n_heads": 2,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "mamba_n_groups": 1,
    "n_groups": 1,
    "time_step_rank": 4,
    "num_buckets": 8,
    "relative_attention_num_buckets": 8,
    "position_buckets": 8,
    "max_relative_positions": 16,
    "sliding_window": 4,
    "attention_window": 4,
    "window_size": 4,
    "rotary_dim": 8,
    "rotary_emb_base": None,
    "type_vocab_size": 2,
    "emb_dim": 32,
}


def _shrunk(cfg_cls, default, depth=0):
    """kwargs for ``cfg_cls``: every SIZE field of the default config that is larger, dropouts 0."""
    kw = {}
    d = default.to_dict()
    for name, value in d.items():
        if name in SIZE and SIZE[name] is not None:
            want = SIZE[name]
            if isinstance(value, int) and not isinstance(value, bool) and value > want:
                kw[name] = want
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
                kw[name] = [min(v, want) for v in value]
        elif isinstance(value, float) and ("dropout" in name or name.endswith("_drop") or "drop_rate" in name):
            kw[name] = 0.0
    if "qk_rope_head_dim" in d and "head_dim" in d:  # MLA: head_dim is the rotary part
        kw["head_dim"] = kw.get("qk_rope_head_dim", d["qk_rope_head_dim"])
        if "num_key_value_heads" in kw:
            kw["num_key_value_heads"] = 2
    layers = kw.get("num_hidden_layers") or kw.get("num_layers") or kw.get("n_layer")
    for name in ("layer_types", "layers_block_type", "block_types", "attn_type_list"):
        value = d.get(name)
        if layers and isinstance(value, (list, tuple)) and len(value) > layers:
            kinds = list(dict.fromkeys(value))  # every kind of layer once (hybrids keep their attention layers)
            picked = kinds if len(kinds) >= layers else kinds + [value[0]] * (layers - len(kinds))
            kw[name] = picked
            for key in ("num_hidden_layers", "num_layers", "n_layer"):
                if key in kw:
                    kw[key] = len(picked)
    if "vocab_size" in d and d["vocab_size"] is None:
        kw["vocab_size"] = V
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "mask_token_id"):
        value = d.get(name)
        if isinstance(value, int) and value >= V:
            kw[name] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(name, 3)
        if isinstance(value, list):
            kw[name] = [v if v < V else 2 for v in value]
    if d.get("pad_token_id", 0) is None:
        kw["pad_token_id"] = 0
    if depth == 0:
        for name, sub in (getattr(cfg_cls, "sub_configs", None) or {}).items():
            value = getattr(default, name, None)
            if value is not None and hasattr(value, "to_dict"):
                kw[name] = {**value.to_dict(), **_shrunk(type(value), value, depth + 1)}
    return kw


def tiny_config(model_type: str, minimal: bool = False):
    """The tiny config; ``minimal``: only layers, vocabulary and labels shrunk (where the generic shrink breaks
    a model's own size relations)."""
    from transformers import CONFIG_MAPPING

    cfg_cls = CONFIG_MAPPING[model_type]
    default = cfg_cls()
    kw = _shrunk(cfg_cls, default)
    kw.update(num_labels=3, attn_implementation="eager", use_cache=False, experts_implementation="eager")
    keep = ("num_hidden_layers", "vocab_size", "num_labels", "attn_implementation", "pad_token_id", "use_cache")
    keep += ("experts_implementation", "hidden_size", "d_model", "n_embd", "intermediate_size", "num_layers", "n_layer")
    keep += ("num_attention_heads", "n_head", "max_position_embeddings", "num_local_experts", "num_experts")
    if minimal:
        kw = {k: v for k, v in kw.items() if k in keep}
    try:
        cfg = cfg_cls(**kw)
    except Exception:  # noqa: BLE001  the shrink broke a validation: keep only the main fields
        cfg = cfg_cls(**{k: v for k, v in kw.items() if k in keep})
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and getattr(c, "pad_token_id", None) is None:
            try:
                c.pad_token_id = 0
            except Exception:  # noqa: BLE001
                pass
    text = getattr(cfg, "text_config", None)
    if text is not None and getattr(text, "use_cache", False):  # a multimodal model's text model (Qwen3.5) too
        text.use_cache = False
    return cfg


# ------------------------------------------------------------------------------------------ one run


class RunTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise RunTimeout("per-run time limit")


def split(obj, i):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj[i : i + 1]
    if isinstance(obj, dict):
        return {k: split(v, i) for k, v in obj.items()}
    return obj


def own_loss(out):
    return out.loss if hasattr(out, "loss") else out[0]


def build(model_type: str, head: str, minimal: bool = False):
    import torch
    import transformers

    cfg = tiny_config(model_type, minimal)
    with torch.device("meta"):  # count first: a config the shrink missed is skipped, not built for minutes
        n = sum(p.numel() for p in getattr(transformers, AUTO[head]).from_config(cfg).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"still {n / 1e6:.1f} M parameters after the shrink (limit {MAX_PARAMS / 1e6:.0f} M)")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = getattr(transformers, AUTO[head]).from_config(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(torch.float64).eval(), cfg


def batch(cfg, head: str, variant: str, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", V)
    ids = torch.randint(5, min(V, vocab), (B, T), generator=g)
    inputs = {"input_ids": ids}
    if head == "ForSequenceClassification":
        labels = torch.randint(0, 3, (B,), generator=g)
    elif head == "ForTokenClassification":
        labels = torch.randint(0, 3, (B, T), generator=g)
    else:
        labels = torch.randint(5, min(V, vocab), (B, T), generator=g)
    if variant == "padded":
        mask = torch.zeros(B, T, dtype=torch.long)
        for i, n in enumerate(LENGTHS):
            mask[i, :n] = 1
        pad = getattr(cfg, "pad_token_id", None)
        pad = 0 if not isinstance(pad, int) else pad
        inputs["input_ids"] = ids.masked_fill(mask == 0, pad)
        inputs["attention_mask"] = mask
        if labels.dim() == 2:
            labels = labels.masked_fill(mask == 0, -100)
    eos = getattr(cfg, "eos_token_id", None)
    if head == "ForSequenceClassification" and getattr(cfg, "is_encoder_decoder", False) and isinstance(eos, int):
        ends = [n - 1 for n in LENGTHS] if variant == "padded" else [T - 1] * B  # BART pools at its <eos>
        inputs["input_ids"] = inputs["input_ids"].clone()
        inputs["input_ids"][range(B), ends] = eos
    if variant == "own":
        inputs["labels"] = labels
        return inputs, None, own_loss
    loss = class_ce if head == "ForSequenceClassification" else masked_token_ce if variant == "padded" else token_ce
    return inputs, labels, loss


def oracle(model, loss_fn, inputs, targets):
    """A Python loop of autograd on a deepcopy, one example at a time (with its own mask row)."""
    import torch

    m = copy.deepcopy(model)
    named = {n: p for n, p in m.named_parameters() if p.requires_grad}
    rows: dict = {n: [] for n in named}
    losses = []
    for i in range(B):
        out = m(**split(inputs, i))
        loss = loss_fn(out) if targets is None else loss_fn(out, split(targets, i))
        gs = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        for n, gr in zip(named, gs):
            rows[n].append(torch.zeros_like(named[n]) if gr is None else gr.detach())
        losses.append(loss.detach())
    return {n: torch.stack(r) for n, r in rows.items()}, torch.stack(losses)


def plain_grads(model, loss_fn, inputs, targets):
    import torch

    m = copy.deepcopy(model)
    named = {n: p for n, p in m.named_parameters() if p.requires_grad}
    out = m(**inputs)
    loss = loss_fn(out) if targets is None else loss_fn(out, targets)
    gs = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    grads = {n: (torch.zeros_like(named[n]) if gr is None else gr) for n, gr in zip(named, gs)}
    return grads, loss, logits_of(out).dtype


def rel(a, b) -> float:
    import torch

    if a is None or b is None:
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        same = torch.equal(torch.isnan(a), torch.isnan(b)) and torch.allclose(
            torch.nan_to_num(a), torch.nan_to_num(b), rtol=1e-9, atol=1e-12
        )
        return 0.0 if same else float("inf")
    if not a.numel():
        return 0.0
    return (a - b).abs().max().item() / (b.abs().max().item() + 1e-30)


def global_rel(errs: dict, scale: dict, parts) -> float:
    """max over parameters of max-abs error, relative to the largest |oracle| over all parameters."""
    big = max(scale.values()) if scale else 1.0
    return max((errs[n] * scale[n] / (big + 1e-30) for n in parts), default=0.0)


def stats_errors(st, rows, losses) -> dict:
    """Relative errors of mean, var, per-example norms and losses (each: max-abs diff / max-abs oracle, taken over
    the whole model: a parameter whose gradient is ~0 in exact arithmetic gets its absolute error, not 0/0)."""
    import torch

    out = {}
    mean_o = {n: r.mean(0) for n, r in rows.items()}
    var_o = {n: r.var(0, unbiased=True) for n, r in rows.items()}
    sqn_o = {n: r.flatten(1).pow(2).sum(1) for n, r in rows.items()}
    for key, got, want in (("mean", st.mean, mean_o), ("var", st.var, var_o), ("sqn", st.param_sq_norms, sqn_o)):
        missing = set(want) - set(got)
        if missing:
            out[key] = (float("inf"), f"missing {sorted(missing)[:3]}")
            continue
        big = max((w.abs().max().item() for w in want.values()), default=1.0) + 1e-30
        worst, where = 0.0, ""
        for n, w in want.items():
            g = got[n].detach().double()
            if g.shape != w.shape:
                worst, where = float("inf"), n
                break
            if not (torch.isfinite(g).all() and torch.isfinite(w).all()):
                e = rel(g, w)
            else:
                e = (g - w).abs().max().item() / big if w.numel() else 0.0
            if e > worst:
                worst, where = e, n
        out[key] = (worst, where)
    out["loss"] = (rel(st.losses, losses), "")
    return out


def grads_errors(g, rows) -> dict:
    missing = set(rows) - set(g)
    if missing:
        return {"rows": (float("inf"), f"missing {sorted(missing)[:3]}")}
    big = max((r.abs().max().item() for r in rows.values()), default=1.0) + 1e-30
    worst, where = 0.0, ""
    for n, r in rows.items():
        e = (g[n].detach().double() - r).abs().max().item() / big if r.numel() else 0.0
        if g[n].shape != r.shape:
            e = float("inf")
        if e > worst:
            worst, where = e, n
    return {"rows": (worst, where)}


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _outcome(fn):
    """('ok', value) | ('refused', code) | ('crash', 'Type: message')."""
    import persample

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", fn()
    except RunTimeout:
        raise
    except persample.PersampleError as e:
        if getattr(e, "code", None):
            return "refused", e.code
        return "crash", f"{type(e).__name__} without code: {str(e).splitlines()[0][:200] if str(e) else ''}"
    except Exception as e:  # noqa: BLE001
        return "crash", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def one_run(model_type: str, head: str, variant: str) -> dict:
    import torch

    import persample

    rec: dict = {"type": model_type, "head": head, "variant": variant}
    t0 = time.time()
    for minimal in (False, True):  # the generic shrink first; where the model then fails, only the main fields
        try:
            model, cfg = build(model_type, head, minimal)
        except RunTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            rec.update(status="skip", reason=f"build: {_short(e)}")
            continue
        rec["class"] = type(model).__name__
        rec["params"] = sum(p.numel() for p in model.parameters())
        rec["config"] = "minimal" if minimal else "tiny"
        inputs, targets, loss_fn = batch(cfg, head, variant)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref, batch_loss, logits_dtype = plain_grads(model, loss_fn, inputs, targets)
                if not torch.isfinite(batch_loss):
                    raise ValueError("non-finite batch loss")
                rows, losses = oracle(model, loss_fn, inputs, targets)
                if not all(torch.isfinite(r).all() for r in rows.values()) or not torch.isfinite(losses).all():
                    raise ValueError("the model's own gradient of an example alone is not finite")
        except RunTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            rec.update(status="skip", reason=f"plain autograd: {_short(e)}")
            continue
        rec.pop("reason", None)
        rec["status"] = "built"
        break
    if rec.get("status") == "skip":
        return rec
    # the model's own batch-vs-example discrepancy (float32 rounding inside a float64 model; or coupling)
    big = max((r.mean(0).abs().max().item() for r in rows.values()), default=1.0) + 1e-30
    disc = max(((ref[n] - r.mean(0)).abs().max().item() / big for n, r in rows.items()), default=0.0)
    rec["disc"] = disc
    floor = disc if disc <= 1e-6 else 1e-6
    tol = max(HARD_TOL, 30 * floor)
    if logits_dtype != torch.float64:  # the model computes its output in float32 inside a float64 model (Beam)
        tol = max(tol, 3e-5)
        rec["float32_logits"] = True
    rec["tol"] = tol
    # a loss the model computes in float32 (Hugging Face's token losses cast the logits with .float()):
    # the loss of a batch and of an example alone then agree to float32 rounding only
    loss_tol = tol if batch_loss.dtype == torch.float64 else max(tol, 1e-5)
    rec["loss_tol"] = loss_tol
    rec["status"] = "run"
    state = copy.deepcopy(model.state_dict())

    kind, ex = _outcome(lambda: persample.explain(model, loss_fn, inputs, targets))
    if kind == "ok":
        rec["auto_engine"] = ex.entry_points.get("grad_stats") or "refused"
        rec["psg_engine"] = ex.entry_points.get("per_sample_grads") or "refused"
        fast = ex.engines.get("fast")
        rec["fast_exact"] = bool(fast and fast.exact)
        rec["fast_code"] = None if fast is None or fast.refusal is None else fast.refusal.code
        vm = ex.engines.get("vmap")
        rec["vmap_code"] = None if vm is None or vm.refusal is None else vm.refusal.code
    else:
        rec["explain"] = f"{kind}: {ex}"
    results = {}
    for entry in ("auto", "fast", "psg-auto"):
        model.load_state_dict(state)
        if entry == "psg-auto":
            kind, val = _outcome(lambda: persample.per_sample_grads(model, loss_fn, inputs, targets))
        else:
            kind, val = _outcome(lambda e=entry: persample.grad_stats(model, loss_fn, inputs, targets, engine=e))
        if kind != "ok":
            results[entry] = {"outcome": kind, "why": val}
            continue
        errs = grads_errors(val, rows) if entry == "psg-auto" else stats_errors(val, rows, losses)
        worst = max(errs, key=lambda k: errs[k][0] / (loss_tol if k == "loss" else tol))
        verdict = "exact" if errs[worst][0] <= (loss_tol if worst == "loss" else tol) else "MISMATCH"
        results[entry] = {
            "outcome": verdict,
            "errors": {k: v[0] for k, v in errs.items()},
            "worst": f"{worst}[{errs[worst][1]}] rel={errs[worst][0]:.3g}",
        }
    rec["results"] = results
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


# ------------------------------------------------------------------------------------------ driver


def all_runs(only=None) -> list[tuple[str, str, str]]:
    from transformers.models.auto import modeling_auto

    runs = []
    types: dict[str, list[str]] = {}
    for head in HEADS:
        for model_type in getattr(modeling_auto, MAPPINGS[head]):
            types.setdefault(model_type, []).append(head)
    for model_type in sorted(types):
        if only and model_type not in only:
            continue
        for head in types[model_type]:
            for variant in VARIANTS:
                runs.append((model_type, head, variant))
    return runs


def _key(r) -> str:
    return f"{r[0]}|{r[1]}|{r[2]}"


def worker(todo_file: str, out: str, limit: int) -> None:
    import resource

    todo = json.loads(Path(todo_file).read_text())
    signal.signal(signal.SIGALRM, _alarm)
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a config left large fails to build, no swap
    for run in todo:
        with open(out + ".progress", "a") as f:
            f.write(_key(run) + "\n")
        signal.alarm(limit)
        try:
            rec = one_run(*run)
        except RunTimeout:
            rec = {"type": run[0], "head": run[1], "variant": run[2], "status": "timeout", "reason": f"> {limit} s"}
        except Exception as e:  # noqa: BLE001  the sweep's own failure: recorded, not hidden
            rec = {
                "type": run[0],
                "head": run[1],
                "variant": run[2],
                "status": "sweep-error",
                "reason": f"{type(e).__name__}: {e}"[:300],
                "trace": traceback.format_exc()[-1500:],
            }
        finally:
            signal.alarm(0)
        with open(out + ".jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def done_keys(out: str) -> set[str]:
    p = Path(out + ".jsonl")
    if not p.exists():
        return set()
    keys = set()
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        keys.add(_key((r["type"], r["head"], r["variant"])))
    return keys


def drive(out: str, limit: int, only=None) -> None:
    runs = all_runs(only)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    while True:
        done = done_keys(out)
        todo = [r for r in runs if _key(r) not in done]
        if not todo:
            break
        todo_file = out + ".todo.json"
        Path(todo_file).write_text(json.dumps(todo))
        Path(out + ".progress").write_text("")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        cmd = [sys.executable, __file__, "--worker", todo_file, "--out", out, "--run-limit", str(limit)]
        proc = subprocess.Popen(cmd, env=env)
        last, seen = time.time(), 0
        while proc.poll() is None:
            time.sleep(2)
            n = len(Path(out + ".progress").read_text().splitlines())
            if n != seen:
                seen, last = n, time.time()
            elif time.time() - last > limit + 60:  # hung in C code, past the alarm
                proc.kill()
                proc.wait()
                break
        # the run that started but wrote no result: crashed (segfault, OOM) or hung
        started = Path(out + ".progress").read_text().splitlines()
        if started and started[-1] not in done_keys(out):
            t, h, v = started[-1].split("|")
            with open(out + ".jsonl", "a") as f:
                f.write(
                    json.dumps(
                        {
                            "type": t,
                            "head": h,
                            "variant": v,
                            "status": "timeout",
                            "reason": f"worker died or hung (rc {proc.returncode})",
                        }
                    )
                    + "\n"
                )
    report(out)


# ------------------------------------------------------------------------------------------ report


def load(out: str) -> list[dict]:
    """The runs of ``out``: its checkpoint ``.jsonl`` (the last record of each run), or, without one, the
    ``.json`` a report wrote (the committed results keep only that)."""
    if not Path(out + ".jsonl").exists():
        return json.loads(Path(out + ".json").read_text())["runs"]
    recs = {}
    for line in Path(out + ".jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        recs[_key((r["type"], r["head"], r["variant"]))] = r
    return list(recs.values())


def report(out: str, title: str = "") -> None:
    recs = load(out)
    status = Counter(r["status"] for r in recs)
    ran = [r for r in recs if r["status"] == "run"]
    auto = Counter(r.get("auto_engine", "explain failed") for r in ran)
    auto_own = Counter(r.get("auto_engine", "explain failed") for r in ran if r["variant"] == "own")
    fast_codes = Counter(r.get("fast_code") for r in ran if not r.get("fast_exact", False))
    fast_codes_archs: dict = {}
    for r in ran:
        if not r.get("fast_exact", False):
            fast_codes_archs.setdefault(r.get("fast_code"), set()).add(r.get("class"))
    mism, crash = [], []
    for r in ran:
        for entry, res in r.get("results", {}).items():
            if res["outcome"] == "MISMATCH":
                mism.append((r, entry, res))
            elif res["outcome"] == "crash":
                crash.append((r, entry, res))
    skips = Counter(r.get("reason", "")[:90] for r in recs if r["status"] != "run")
    summary = {
        "runs": len(recs),
        "status": dict(status),
        "architectures_run": len({r["class"] for r in ran}),
        "model_types_run": len({r["type"] for r in ran}),
        "auto_engine": dict(auto),
        "auto_engine_own_loss": dict(auto_own),
        "fast_refusals": {str(k): v for k, v in fast_codes.most_common()},
        "fast_refusals_architectures": {str(k): len(v) for k, v in fast_codes_archs.items()},
        "mismatches": [
            {
                "run": _key((r["type"], r["head"], r["variant"])),
                "class": r.get("class"),
                "entry": e,
                "worst": res["worst"],
                "tol": r["tol"],
                "disc": r["disc"],
                "auto_engine": r.get("auto_engine"),
            }
            for r, e, res in mism
        ],
        "crashes": [
            {"run": _key((r["type"], r["head"], r["variant"])), "class": r.get("class"), "entry": e, "why": res["why"]}
            for r, e, res in crash
        ],
        "explain_failed": [
            {"run": _key((r["type"], r["head"], r["variant"])), "why": r["explain"]} for r in ran if "explain" in r
        ],
    }
    Path(out + ".json").write_text(json.dumps({"summary": summary, "runs": recs}, sort_keys=True))
    lines = [
        f"# Hugging Face architecture sweep (CPU, float64){title}",
        "",
        "Generated by `python benchmarks/hf_sweep.py --report`; method in docs/coverage-sweep.md.",
        "",
        f"- runs: {len(recs)} ({', '.join(f'{k} {v}' for k, v in status.most_common())})",
        f"- ran: {len(ran)} runs on {summary['architectures_run']} architectures"
        f" ({summary['model_types_run']} model types)",
        "",
        "## Engine `auto` takes (`persample.explain`, `grad_stats`)",
        "",
        "| engine | runs | % | own loss runs |",
        "|---|---:|---:|---:|",
    ]
    for k, v in auto.most_common():
        lines.append(f"| {k} | {v} | {100 * v / max(len(ran), 1):.0f} | {auto_own.get(k, 0)} |")
    lines += ["", "## The fast engine's refusals", "", "| code | runs | architectures |", "|---|---:|---:|"]
    for k, v in fast_codes.most_common():
        lines.append(f"| `{k}` | {v} | {len(fast_codes_archs[k])} |")
    lines += ["", f"## Mismatches ({len(mism)}): a number that differs from the oracle, without raising", ""]
    if mism:
        lines += ["| run | class | entry | worst | tol | auto |", "|---|---|---|---|---|---|"]
        for m in summary["mismatches"]:
            lines.append(
                f"| {m['run']} | {m['class']} | {m['entry']} | {m['worst']} | {m['tol']:.1g} | {m['auto_engine']} |"
            )
    else:
        lines.append("None.")
    lines += ["", f"## Crashes ({len(crash)}): an exception without a persample code", ""]
    if crash:
        lines += ["| run | class | entry | exception |", "|---|---|---|---|"]
        for c in summary["crashes"]:
            lines.append(f"| {c['run']} | {c['class']} | {c['entry']} | {c['why'][:160].replace('|', '/')} |")
    else:
        lines.append("None.")
    lines += [
        "",
        "## Not run (skipped: the model cannot be built or trained by plain autograd here)",
        "",
        "| reason | runs |",
        "|---|---:|",
    ]
    for k, v in skips.most_common():
        lines.append(f"| {k.replace('|', '/')} | {v} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/hf-sweep-cpu")
    ap.add_argument("--run-limit", type=int, default=180)
    ap.add_argument("--only", nargs="*", help="model types")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--title", default="", help="appended to the report's heading (which code it ran)")
    ap.add_argument("--one", nargs=3, metavar=("TYPE", "HEAD", "VARIANT"))
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.out, a.run_limit)
    elif a.report:
        report(a.out, a.title)
    elif a.one:
        print(json.dumps(one_run(*a.one), indent=1))
    else:
        drive(a.out, a.run_limit, a.only)


if __name__ == "__main__":
    main()
