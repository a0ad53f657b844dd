"""Red-team harness: run every entry point on a case and compare with an independent float64 oracle.

A case is ``(make_model, loss_fn, x, y)``; the oracle is a Python loop of ``torch.autograd.grad`` on a
deepcopy of the model (fresh per example: each example alone starts from the buffers as found), one example
at a time. Every entry point must give the oracle's answer (1e-9 relative in float64) or raise a refusal with
a code. Anything else is printed as WRONG (a silently wrong number) or CRASH (an exception without a code).
"""

from __future__ import annotations

import copy
import traceback
import warnings

import torch

import persample


def split(obj, i):
    if isinstance(obj, torch.Tensor):
        return obj[i : i + 1]
    if isinstance(obj, dict):
        return {k: split(v, i) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(split(t, i) for t in obj)
    return obj


def call(model, x):
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def nbatch(x):
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    leaves = x.values() if isinstance(x, dict) else x
    return next(t for t in leaves if isinstance(t, torch.Tensor)).shape[0]


def oracle(make, loss_fn, x, y):
    model = make()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rows = {n: [] for n in names}
    losses = []
    for i in range(nbatch(x)):
        m = make()  # a fresh model per example (deterministic): buffers as found, globals rebound
        params = dict(m.named_parameters())
        out = call(m, split(x, i))
        loss = loss_fn(out) if y is None else loss_fn(out, split(y, i))
        gs = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, gs):
            rows[n].append(torch.zeros_like(params[n]) if g is None else (g.to_dense() if g.is_sparse else g).detach())
        losses.append(loss.detach())
    rows = {n: torch.stack(r) for n, r in rows.items()}
    return rows, torch.stack(losses)


def plain_grad(make, loss_fn, x, y):
    model = make()
    out = call(model, x)
    loss = loss_fn(out) if y is None else loss_fn(out, y)
    loss.backward()
    return {n: (None if p.grad is None else p.grad.to_dense().clone()) for n, p in model.named_parameters()}


def rel(a, b):
    if a is None or b is None:
        return 0.0 if (a is None and b is None) else float("inf")
    a, b = a.to_dense(), b.to_dense()
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("inf")
    if not torch.isfinite(b).all() or not torch.isfinite(a).all():
        same = torch.equal(torch.isnan(a), torch.isnan(b)) and torch.allclose(
            torch.nan_to_num(a), torch.nan_to_num(b), rtol=1e-9, atol=1e-12
        )
        return 0.0 if same else float("inf")
    d = (a - b).abs().max().item() if a.numel() else 0.0
    s = b.abs().max().item() if b.numel() else 0.0
    return d / (s + 1e-12)


def stats_err(stats, rows, losses):
    errs = {}
    if stats is None:  # skipped (non-finite): right only where the oracle is not finite
        finite = all(torch.isfinite(r).all() for r in rows.values()) and torch.isfinite(losses).all()
        return {"stats None (skipped) on finite oracle": float("inf")} if finite else {}
    for n, r in rows.items():
        if n not in stats.mean:
            errs[f"mean[{n}] missing"] = float("inf")
            continue
        errs[f"mean[{n}]"] = rel(stats.mean[n], r.mean(0))
        if stats.m2 is not None and r.shape[0] > 1:
            errs[f"var[{n}]"] = rel(stats.var[n], r.var(0, unbiased=True))
        errs[f"sqn[{n}]"] = rel(stats.param_sq_norms[n], r.flatten(1).pow(2).sum(1))
    if set(stats.mean) - set(rows):
        errs["extra keys " + str(set(stats.mean) - set(rows))] = float("inf")
    errs["losses"] = rel(stats.losses, losses)
    return errs


def grads_err(grads, rows):
    errs = {f"row[{n}]": rel(grads.get(n), r) for n, r in rows.items()}
    if set(grads) - set(rows):
        errs["extra keys"] = float("inf")
    return errs


def pgrad_err(model, ref):
    return {f"p.grad[{n}]": rel(p.grad, ref[n]) for n, p in model.named_parameters()}


def verdict(errs, tol):
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if not bad:
        return "exact"
    k = max(bad, key=lambda k: bad[k])
    return f"WRONG {k} rel={bad[k]:.3g}"


def refusal(e):
    code = getattr(e, "code", None)
    if code:
        return f"refused {code}"
    return f"CRASH {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"


ENTRIES = ("fast", "auto", "vmap", "loop", "psg-auto", "psg-fast", "step", "step2", "observe", "check_mean")


def run_case(make, loss_fn, x, y, *, tol=1e-9, entries=ENTRIES, stats_kwargs=None, xs=None, verbose=False):
    """Return {entry: verdict}. ``xs``: extra (x, y) batches fed to a second call (plan caching)."""
    stats_kwargs = stats_kwargs or {}
    try:
        rows, losses = oracle(make, loss_fn, x, y)
    except Exception as e:  # noqa: BLE001  the model fails alone: every entry must refuse or raise
        rows = losses = None
        out_oracle = f"alone fails: {type(e).__name__}"
    try:
        ref = plain_grad(make, loss_fn, x, y)
    except Exception as e:  # noqa: BLE001
        ref = None
        ref_err = e
    out = {}
    if rows is None:
        out["oracle"] = out_oracle
    for entry in entries:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[entry] = _run(entry, make, loss_fn, x, y, rows, losses, ref, tol, stats_kwargs, xs)
        except Exception as e:  # noqa: BLE001
            out[entry] = refusal(e)
            if verbose and out[entry].startswith("CRASH"):
                traceback.print_exc()
    if ref is None:
        out["plain"] = f"plain backward raised {type(ref_err).__name__}"
    return out


def _run(entry, make, loss_fn, x, y, rows, losses, ref, tol, kw, xs):
    model = make()
    if rows is None:
        if entry in ("fast", "auto", "vmap", "loop"):
            persample.grad_stats(model, loss_fn, x, y, engine=entry, **kw)
        elif entry.startswith("psg"):
            persample.per_sample_grads(model, loss_fn, x, y, engine=entry.split("-")[1])
        elif entry == "step":
            persample.Tracker(model, loss_fn, randomness="error").step(x, y)
            return (
                "WRONG returned (alone fails)"
                if not pgrad_err(model, ref) or verdict(pgrad_err(model, ref), tol) == "exact"
                else "WRONG p.grad"
            )
        elif entry == "observe":
            tr = persample.Tracker(model, loss_fn)
            with tr.observe(y) as ob:
                o = call(model, x)
                (loss_fn(o) if y is None else loss_fn(o, y)).backward()
            if ob.stats is None:
                return "skipped"
        else:
            return "-"
        return "WRONG returned numbers where an example alone fails"
    if entry in ("fast", "auto", "vmap", "loop"):
        st = persample.grad_stats(model, loss_fn, x, y, engine=entry, **kw)
        return verdict(stats_err(st, rows, losses), tol)
    if entry.startswith("psg"):
        g = persample.per_sample_grads(model, loss_fn, x, y, engine=entry.split("-")[1])
        return verdict(grads_err(g, rows), tol)
    if entry == "step":
        tr = persample.Tracker(model, loss_fn, randomness="error")
        st = tr.step(x, y)
        errs = stats_err(st, rows, losses)
        errs.update(pgrad_err(model, ref))
        return verdict(errs, tol)
    if entry == "step2":  # second step on other batches (plan caches): stats of the last one
        if not xs:
            return "-"
        tr = persample.Tracker(model, loss_fn, randomness="error")
        tr.step(x, y)
        res = []
        for x2, y2 in xs:
            m = make()
            m.load_state_dict(model.state_dict())
            r2, l2 = oracle(lambda: copy.deepcopy(m), loss_fn, x2, y2)
            ref2 = plain_grad(lambda: copy.deepcopy(m), loss_fn, x2, y2)
            model.zero_grad(set_to_none=True)
            st = tr.step(x2, y2)
            errs = stats_err(st, r2, l2)
            errs.update(pgrad_err(model, ref2))
            res.append(verdict(errs, tol))
        bad = [r for r in res if r != "exact"]
        return bad[0] if bad else "exact"
    if entry == "observe":
        tr = persample.Tracker(model, loss_fn)
        with tr.observe(y) as ob:
            o = call(model, x)
            loss = loss_fn(o) if y is None else loss_fn(o, y)
            loss.backward()
        errs = stats_err(ob.stats, rows, losses)
        errs.update(pgrad_err(model, ref))
        return verdict(errs, tol)
    if entry == "check_mean":
        mean_rows = {n: r.mean(0) for n, r in rows.items()}
        coupled = any(rel(mean_rows[n], ref[n]) > 1e-7 for n in rows if ref[n] is not None)
        try:
            persample.check_mean(model, loss_fn, x, y)
        except persample.MeanMismatchError:
            return "exact (mismatch raised)" if coupled else "FALSE ALARM MeanMismatch"
        return "WRONG passed a coupled model" if coupled else "exact (ok)"
    raise ValueError(entry)
