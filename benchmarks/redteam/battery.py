"""Red-team battery: models, losses and inputs a user could write; every entry point against the oracle.

Run: ``PYTHONPATH=$PWD:$PWD/benchmarks/redteam python benchmarks/redteam/battery.py [-k substring]``.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from harness import ENTRIES, run_case

torch.set_default_dtype(torch.float64)
B = 6
CASES = {}


def case(name, **kw):
    def deco(fn):
        CASES[name] = (fn, kw)
        return fn

    return deco


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def X(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed))


def mlp(seed=0, d=4, h=5, o=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, o))


class F_(nn.Module):
    """A Linear(4,5) -> tanh -> Linear(5,3) with a custom forward body f(self, x)."""

    def __init__(self, f, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.f = f

    def forward(self, x):
        return self.f(self, x)


def body(f):
    return lambda: F_(f)


yc = torch.randint(0, 3, (B,), generator=gen(1))
x4 = X(B, 4)


def std(name, f, **kw):
    CASES[name] = ((lambda: (body(f), F.cross_entropy, x4, yc)), kw)


# --------------------------------------------------------------- positions, indices
def _interior(s, x):
    m = torch.ones(x.shape[0], 1)
    m[2] = 0.5
    return s.l2(torch.tanh(s.l1(x * m)))


std("interior row scaled (mask[2]=0.5)", _interior)
std("x[:,0] + x[-1,0] raw", lambda s, x: s.l2(torch.tanh(s.l1(x + x[-1:, :1]))))
std("h + h[-1] act", lambda s, x: (lambda h: s.l2(h + h[-1]))(torch.tanh(s.l1(x))))


def _copy_interior(s, x):
    x = x.clone()
    x[3] = x[5]
    return s.l2(torch.tanh(s.l1(x)))


std("x[3]=x[5] raw", _copy_interior)


def _copy_interior_act(s, x):
    h = torch.tanh(s.l1(x)).clone()
    h[3] = h[5]
    return s.l2(h)


std("h[3]=h[5] act", _copy_interior_act)
std("x*arange(B)%2 (interior)", lambda s, x: s.l2(torch.tanh(s.l1(x * (torch.arange(x.shape[0]) % 2)[:, None]))))
std("x * (B>4)", lambda s, x: s.l2(torch.tanh(s.l1(x * (2.0 if x.shape[0] > 4 else 1.0)))))
std(
    "data dep: if x.abs().max()>2: mix",
    lambda s, x: s.l2(torch.tanh(s.l1(x + (x.mean(0) if x.abs().max() > 2 else 0)))),
)
std("x[1:-1]*2 interior", lambda s, x: s.l2(torch.tanh(s.l1(torch.cat([x[:1], x[1:-1] * 2, x[-1:]])))))
std("index_select fixed perm interior", lambda s, x: s.l2(torch.tanh(s.l1(x[torch.tensor([0, 2, 1, 3, 4, 5])]))))
std(
    "x.view(B//2,8) reshape pairs", lambda s, x: s.l2(torch.tanh(s.l1(x.reshape(-1, 8)[:, :4].repeat_interleave(2, 0))))
)
std(
    "sum over dim0 keepdim broadcast",
    lambda s, x: s.l2(torch.tanh(s.l1(x)) + torch.tanh(s.l1(x)).sum(0, keepdim=True) * 0.1),
)
std("x.T @ x gram", lambda s, x: s.l2(torch.tanh(s.l1(x @ (x.T @ x) / 10))))
std("softmax over batch dim", lambda s, x: s.l2(torch.tanh(s.l1(x)) * torch.softmax(x[:, :1], 0)))
std("x.std(0) normalise", lambda s, x: s.l2(torch.tanh(s.l1(x / (x.std(0) + 1)))))
std("torch.sort rows by value", lambda s, x: s.l2(torch.tanh(s.l1(x[x[:, 0].argsort()]))))
std("h.max(0)", lambda s, x: (lambda h: s.l2(h - h.max(0).values))(torch.tanh(s.l1(x))))
std("F.normalize dim0", lambda s, x: s.l2(torch.tanh(s.l1(F.normalize(x, dim=0)))))
std("batchwise layer_norm over all", lambda s, x: s.l2(torch.tanh(s.l1(F.layer_norm(x.T, (x.shape[0],)).T))))
std(
    "einsum bi,bj->ij mixing",
    lambda s, x: s.l2(torch.tanh(s.l1(x)) @ torch.einsum("bi,bj->ij", x, x)[:, :5].T[:5] * 0.01 + torch.tanh(s.l1(x))),
)
std("x.flatten() view trick", lambda s, x: s.l2(torch.tanh(s.l1(x.flatten().roll(1).view_as(x)))))
std("x.unfold over batch", lambda s, x: s.l2(torch.tanh(s.l1(torch.cat([x[:1], x.unfold(0, 2, 1).mean(-1)])))))
std("diff over batch", lambda s, x: s.l2(torch.tanh(s.l1(torch.cat([x[:1], x.diff(dim=0)])))))
std(
    "scatter_add over batch index",
    lambda s, x: s.l2(torch.tanh(s.l1(torch.zeros_like(x).index_add(0, torch.tensor([0, 0, 1, 2, 3, 4]), x)))),
)
std(
    "gather rows",
    lambda s, x: s.l2(torch.tanh(s.l1(x.gather(0, torch.tensor([[1], [0], [2], [3], [4], [5]]).expand(-1, 4))))),
)
std("x[torch.tensor(-1)] 0-dim index", lambda s, x: s.l2(torch.tanh(s.l1(x - x[torch.tensor(-1)]))))
std("x.select(0,-1)", lambda s, x: s.l2(torch.tanh(s.l1(x - x.select(0, -1)))))
std("x.chunk(2)[::-1] cat", lambda s, x: s.l2(torch.tanh(s.l1(torch.cat(x.chunk(2)[::-1])))))
std("x.transpose(0,1).reshape", lambda s, x: s.l2(torch.tanh(s.l1(x.transpose(0, 1).reshape(x.shape)))))
std("x[:3]*0 + x[3:]", lambda s, x: s.l2(torch.tanh(s.l1(torch.cat([x[:3] * 0, x[3:]])))))
std("x.expand(2,B,4).sum(0)", lambda s, x: s.l2(torch.tanh(s.l1(x.expand(2, *x.shape).sum(0)))))
std("as_strided shift", lambda s, x: s.l2(torch.tanh(s.l1(torch.cat([x, x[:1]]).as_strided(x.shape, (4, 1), 4)))))
std("tril mask along batch", lambda s, x: s.l2(torch.tanh(s.l1(torch.tril(torch.ones(x.shape[0], x.shape[0])) @ x))))
std("h.detach() mixing", lambda s, x: (lambda h: s.l2(h + h.detach().mean(0)))(torch.tanh(s.l1(x))))
std("x.mean(0) under no_grad", lambda s, x: s.l2(torch.tanh(s.l1(x - _ng(lambda: x.mean(0))))))
std("h.data mixing", lambda s, x: (lambda h: s.l2(h * h.data.mean(0)))(torch.tanh(s.l1(x))))


def _ng(f):
    with torch.no_grad():
        return f()


def _item_mix(s, x):
    return s.l2(torch.tanh(s.l1(x)) + float(x.sum().item()) * 0.01)


std(".item() of batch sum", _item_mix)
std("python float of x.max()", lambda s, x: s.l2(torch.tanh(s.l1(x / float(x.abs().max())))))
std("tolist mixing", lambda s, x: s.l2(torch.tanh(s.l1(x * sum(v for v in x[:, 0].tolist()) * 0.1))))
std("numpy mixing", lambda s, x: s.l2(torch.tanh(s.l1(x * float(x.numpy().mean())))))

# --------------------------------------------------------------- parameters
std("param .data in forward", lambda s, x: s.l2(torch.tanh(F.linear(x, s.l1.weight.data, s.l1.bias))))
std("param .detach() in forward", lambda s, x: s.l2(torch.tanh(s.l1(x) + x @ s.l1.weight.detach().T)))
std("param used twice (weight & act)", lambda s, x: s.l2(torch.tanh(s.l1(x)) * s.l2.weight.sum(0)))
std("param squared in forward", lambda s, x: s.l2(torch.tanh(F.linear(x, s.l1.weight**2, s.l1.bias))))
std("module called twice", lambda s, x: s.l2(torch.tanh(s.l1(x)) + torch.tanh(s.l1(x * 2))))
std("l1.weight.T used", lambda s, x: s.l2(torch.tanh(s.l1(x))) + (x @ s.l1.weight.T @ s.l2.weight.T) * 0.1)


class _InplaceParam(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        with torch.no_grad():
            self.l1.weight.mul_(1.0)  # in place on a parameter (no-op value, bumps version)
        return self.l2(torch.tanh(self.l1(x)))


CASES["in-place no_grad on param (x1)"] = (lambda: (_InplaceParam, F.cross_entropy, x4, yc), {})


class _Renorm(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        with torch.no_grad():
            self.l1.weight.mul_(5)

    def forward(self, x):
        with torch.no_grad():
            n = self.l1.weight.norm()
            if n > 1:
                self.l1.weight.div_(n)  # renormalise in place, first call only changes it
        return self.l2(torch.tanh(self.l1(x)))


CASES["param renormalised in place in forward"] = (lambda: (_Renorm, F.cross_entropy, x4, yc), {})


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return self.l2(torch.tanh(self.l1(x)) * self.count)


CASES["buffer counter used in forward"] = (lambda: (_Counter, F.cross_entropy, x4, yc), {})


class _RunAvg(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.register_buffer("avg", torch.zeros(5))

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        if self.training:
            self.avg.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return self.l2(h - self.avg)


CASES["running average buffer (train)"] = (lambda: (_RunAvg, F.cross_entropy, x4, yc), {})


class _RunAvgPer(nn.Module):
    """Running average updated per example count (mixing through buffer updated before use)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.register_buffer("avg", torch.zeros(4))

    def forward(self, x):
        with torch.no_grad():
            self.avg.copy_(x.mean(0))
        return self.l2(torch.tanh(self.l1(x - self.avg)))


CASES["buffer set from batch mean then used"] = (lambda: (_RunAvgPer, F.cross_entropy, x4, yc), {})


class _BufParam(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.register_buffer("scale", torch.randn(5))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)) * self.scale)


CASES["buffer used as a weight"] = (lambda: (_BufParam, F.cross_entropy, x4, yc), {})


def _frozen():
    m = F_(lambda s, x: s.l2(torch.tanh(s.l1(x))))
    m.l1.weight.requires_grad_(False)
    return m


CASES["requires_grad_(False) l1.weight"] = (lambda: (_frozen, F.cross_entropy, x4, yc), {})


class _NoGradRegion(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.l1(x)
        return self.l2(torch.tanh(h))


CASES["no_grad region around l1"] = (lambda: (_NoGradRegion, F.cross_entropy, x4, yc), {})


class _Inplace(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.l1(x)
        h = F.relu(h, inplace=True)
        g = self.l2(h)
        g += h  # in place on the residual
        g.mul_(0.5)
        return self.l3(torch.tanh(g))


CASES["in-place activation ops"] = (lambda: (_Inplace, F.cross_entropy, x4, yc), {})


class _InplaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        x = x.clone()
        h = self.l1(x)
        x.mul_(2)  # change the layer's input after its call
        return self.l2(torch.tanh(h)) + x[:, :3]


CASES["input changed in place after call"] = (lambda: (_InplaceAfter, F.cross_entropy, x4, yc), {})


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 3  # a wrong-on-purpose straight-through style gradient


class _CustomFn(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(_Scale.apply(torch.tanh(self.l1(x))))


CASES["custom autograd.Function (STE)"] = (lambda: (_CustomFn, F.cross_entropy, x4, yc), {})


class _BatchFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g + g.mean(0, keepdim=True)  # mixes the batch in the backward only


class _CustomMix(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(_BatchFn.apply(torch.tanh(self.l1(x))))


CASES["custom Function mixing in backward"] = (lambda: (_CustomMix, F.cross_entropy, x4, yc), {})


class _GradRev(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class _GRL(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(_GradRev.apply(torch.tanh(self.l1(x))))


CASES["gradient reversal Function"] = (lambda: (_GRL, F.cross_entropy, x4, yc), {})


def _scaled_hook(s, x):
    h = torch.tanh(s.l1(x))
    if h.requires_grad:
        h.register_hook(lambda g: g * 2)
    return s.l2(h)


std("tensor hook scaling activation grad", _scaled_hook)


def _mix_hook(s, x):
    h = torch.tanh(s.l1(x))
    if h.requires_grad:
        h.register_hook(lambda g: g + g.mean(0))
    return s.l2(h)


std("tensor hook mixing activation grad", _mix_hook)

# --------------------------------------------------------------- embeddings
tok = torch.randint(0, 10, (B, 5), generator=gen(3))
tok[0, 0] = 0
tok[1, :2] = 0


class _Emb(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(10, 4, **kw)
        self.l = nn.Linear(4, 3)

    def forward(self, t):
        return self.l(torch.tanh(self.e(t)).mean(1))


for kw in (
    {},
    {"padding_idx": 0},
    {"scale_grad_by_freq": True},
    {"max_norm": 1.0},
    {"sparse": True},
    {"max_norm": 1.0, "norm_type": 1.0},
):
    CASES[f"Embedding{kw}"] = ((lambda kw=kw: (lambda: _Emb(**kw), F.cross_entropy, tok, yc)), {})


class _EmbBig(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(10, 4, max_norm=1.0)
        with torch.no_grad():
            self.e.weight.mul_(3)
        self.l = nn.Linear(4, 3)

    def forward(self, t):
        return self.l(torch.tanh(self.e(t)).mean(1))


CASES["Embedding max_norm with big rows"] = ((lambda: (_EmbBig, F.cross_entropy, tok, yc)), {})


class _EmbTied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(10, 4)
        self.l = nn.Linear(4, 10)
        self.l.weight = self.e.weight

    def forward(self, t):
        return self.l(torch.tanh(self.e(t)).mean(1))


yt = torch.randint(0, 10, (B,), generator=gen(4))
CASES["tied embedding/output"] = ((lambda: (_EmbTied, F.cross_entropy, tok, yt)), {})


class _EmbF(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(10, 4))
        self.l = nn.Linear(4, 3)

    def forward(self, t):
        return self.l(torch.tanh(F.embedding(t, self.w)).mean(1))


CASES["F.embedding on raw parameter"] = ((lambda: (_EmbF, F.cross_entropy, tok, yc)), {})


class _EmbIdxFromX(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(10, 4)
        self.l = nn.Linear(4, 3)

    def forward(self, t):
        pos = (t != 0).cumsum(0).clamp(max=9)  # cumsum over the BATCH dim
        return self.l(torch.tanh(self.e(t) + self.e(pos)).mean(1))


CASES["embedding index cumsum over batch"] = ((lambda: (_EmbIdxFromX, F.cross_entropy, tok, yc)), {})


class _EmbIdxFlip(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(10, 4)
        self.l = nn.Linear(4, 3)

    def forward(self, t):
        return self.l(torch.tanh(self.e(t.flip(0))).mean(1))


CASES["embedding index flipped batch"] = ((lambda: (_EmbIdxFlip, F.cross_entropy, tok, yc)), {})


class _EmbIdxLast(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(10, 4)
        self.l = nn.Linear(4, 3)

    def forward(self, t):
        return self.l(torch.tanh(self.e(t) + self.e(t[-1:])).mean(1))


CASES["embedding of t[-1:] broadcast"] = ((lambda: (_EmbIdxLast, F.cross_entropy, tok, yc)), {})


class _EmbIdxInterior(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(10, 4)
        self.l = nn.Linear(4, 3)

    def forward(self, t):
        t = t.clone()
        t[2] = t[3]
        return self.l(torch.tanh(self.e(t)).mean(1))


CASES["embedding idx t[2]=t[3] interior"] = ((lambda: (_EmbIdxInterior, F.cross_entropy, tok, yc)), {})


# --------------------------------------------------------------- derived weights
def _wn():
    m = mlp()
    torch.nn.utils.parametrizations.weight_norm(m[0])
    return m


def _sn():
    m = mlp()
    torch.nn.utils.parametrizations.spectral_norm(m[0])
    return m


def _sn_old():
    m = mlp()
    torch.nn.utils.spectral_norm(m[0])
    return m


def _wn_old():
    m = mlp()
    torch.nn.utils.weight_norm(m[0])
    return m


class _Sym(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


def _param_sym():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    torch.nn.utils.parametrize.register_parametrization(m[0], "weight", _Sym())
    return m


def _param_cached():
    return _param_sym()


for nm, mk in [
    ("weight_norm (parametrizations)", _wn),
    ("spectral_norm (parametrizations)", _sn),
    ("spectral_norm (old hook)", _sn_old),
    ("weight_norm (old hook)", _wn_old),
    ("parametrize symmetric", _param_sym),
]:
    CASES[nm] = ((lambda mk=mk: (mk, F.cross_entropy, x4, yc)), {})


def _sn_eval():
    m = _sn()
    m.eval()
    return m


CASES["spectral_norm eval"] = ((lambda: (_sn_eval, F.cross_entropy, x4, yc)), {})


class _FCall(nn.Module):
    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.how = how

    def forward(self, x):
        p = dict(self.inner.named_parameters())
        if self.how == "same":
            return torch.func.functional_call(self.inner, p, (x,))
        if self.how == "scaled":
            return torch.func.functional_call(self.inner, {k: v * 1.1 for k, v in p.items()}, (x,))
        if self.how == "swap":
            q = dict(p)
            q["0.bias"] = p["0.bias"] + p["2.bias"].sum()
            return torch.func.functional_call(self.inner, q, (x,))


for how in ("same", "scaled", "swap"):
    CASES[f"functional_call {how}"] = ((lambda how=how: (lambda: _FCall(how), F.cross_entropy, x4, yc)), {})


# --------------------------------------------------------------- norms, buffers
def _bn_eval():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    m[1].running_mean.normal_()
    m.eval()
    return m


def _bn_train():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))


def _in_train():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.Unflatten(1, (2, 3)),
        nn.InstanceNorm1d(2, affine=True, track_running_stats=True),
        nn.Flatten(),
        nn.Tanh(),
        nn.Linear(6, 3),
    )


CASES["BatchNorm eval"] = ((lambda: (_bn_eval, F.cross_entropy, x4, yc)), {})
CASES["BatchNorm train"] = ((lambda: (_bn_train, F.cross_entropy, x4, yc)), {})
CASES["InstanceNorm track_running_stats train"] = ((lambda: (_in_train, F.cross_entropy, x4, yc)), {})


class _FBN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.g = nn.Parameter(torch.ones(5))

    def forward(self, x):
        h = F.batch_norm(self.l1(x), None, None, self.g, None, training=True)
        return self.l2(torch.tanh(h))


CASES["F.batch_norm training raw"] = ((lambda: (_FBN, F.cross_entropy, x4, yc)), {})


# --------------------------------------------------------------- layouts
def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.GroupNorm(1, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 3))


xi = X(B, 2, 5, 5)
CASES["CNN channels_last"] = (
    (lambda: (_cnn, F.cross_entropy, xi.contiguous(memory_format=torch.channels_last), yc)),
    {},
)
CASES["CNN non-contig input (transpose)"] = ((lambda: (_cnn, F.cross_entropy, xi.transpose(2, 3), yc)), {})
CASES["MLP expanded input (stride 0 batch)"] = ((lambda: (mlp, F.cross_entropy, x4[:1].expand(B, 4), yc)), {})
CASES["MLP input batch stride non-contig"] = ((lambda: (mlp, F.cross_entropy, X(4, B).T, yc)), {})


# --------------------------------------------------------------- losses
def _ce_none(o, y):
    return F.cross_entropy(o, y, reduction="none")


def _sum_ce(o, y):
    return F.cross_entropy(o, y, reduction="sum")


w3 = torch.tensor([0.2, 1.0, 3.0])
yig = yc.clone()
yig[2] = -100
LOSSES = {
    "ce sum": (_sum_ce, yc),
    "ce label_smoothing": (lambda o, y: F.cross_entropy(o, y, label_smoothing=0.1), yc),
    "ce class weights": (lambda o, y: F.cross_entropy(o, y, weight=w3), yc),
    "ce ignore_index one ignored": (F.cross_entropy, yig),
    "ce/ B (divide by count from batch)": (lambda o, y: F.cross_entropy(o, y, reduction="sum") / o.shape[0], yc),
    "ce / (y>0).sum() count": (lambda o, y: F.cross_entropy(o, y, reduction="sum") / (y > 0).sum().clamp(min=1), yc),
    "mse": (lambda o, y: F.mse_loss(o, y), X(B, 3, seed=5)),
    "mse with batch-mean target centring": (lambda o, y: F.mse_loss(o - o.mean(0), y), X(B, 3, seed=5)),
    "huber sum": (lambda o, y: F.huber_loss(o, y, reduction="sum"), X(B, 3, seed=5)),
    "nll of log_softmax over batch dim": (lambda o, y: F.nll_loss(F.log_softmax(o, 0), y), yc),
    "loss reads o[0]": (lambda o, y: F.cross_entropy(o, y) + o[0].sum() * 0.1, yc),
    "loss max over batch": (lambda o, y: F.cross_entropy(o, y, reduction="none").max(), yc),
    "loss logsumexp over batch": (lambda o, y: F.cross_entropy(o, y, reduction="none").logsumexp(0), yc),
    "loss median": (lambda o, y: F.cross_entropy(o, y, reduction="none").median(), yc),
    "loss top-k hardest mean": (
        lambda o, y: F.cross_entropy(o, y, reduction="none").topk(max(1, o.shape[0] // 2)).values.mean(),
        yc,
    ),
    "loss squared mean": (lambda o, y: F.cross_entropy(o, y) ** 2, yc),
    "loss per-token mask": (
        lambda o, y: (F.cross_entropy(o, y[:, 0], reduction="none") * y[:, 1]).sum() / y[:, 1].sum().clamp(min=1),
        torch.stack([yc, (torch.arange(B) % 3 != 0).long()], 1),
    ),
    "nan in one example (target)": (
        lambda o, y: F.mse_loss(o, y),
        torch.where(torch.arange(B)[:, None] == 2, torch.nan, X(B, 3, seed=5)),
    ),
    "inf in one example (log 0)": (lambda o, y: -(torch.log(torch.relu(o[:, 0] - y))).mean(), torch.full((B,), 10.0)),
    "loss reads global model": (None, yc),
    "loss with regulariser of params": (None, yc),
    "kl_div batchmean": (
        lambda o, y: F.kl_div(F.log_softmax(o, -1), y, reduction="batchmean"),
        torch.softmax(X(B, 3, seed=6), -1),
    ),
    "BCE with pos_weight": (
        lambda o, y: F.binary_cross_entropy_with_logits(o, y, pos_weight=torch.tensor([1.0, 2.0, 3.0])),
        (X(B, 3, seed=7) > 0).double(),
    ),
    "cosine embedding loss": (lambda o, y: F.cosine_embedding_loss(o, y, torch.ones(o.shape[0])), X(B, 3, seed=8)),
    "position-weighted sum (arange+1)": (lambda o, y: (_ce_none(o, y) * torch.arange(1, o.shape[0] + 1)).sum(), yc),
    "position-weighted sum (arange)": (lambda o, y: (_ce_none(o, y) * torch.arange(o.shape[0])).mean(), yc),
    "first example only": (lambda o, y: F.cross_entropy(o[:1], y[:1]), yc),
    "ctc-like: loss.mean() of per-ex via numel": (lambda o, y: (o - y).pow(2).sum() / o.numel(), X(B, 3, seed=5)),
}
_GLOBAL = {}


def _make_loss_global():
    m = mlp()
    _GLOBAL["m"] = m
    return m


for nm, (lf, yy) in LOSSES.items():
    if nm == "loss reads global model":
        CASES["loss: " + nm] = (
            (
                lambda yy=yy: (
                    _make_loss_global,
                    lambda o, y: F.cross_entropy(o, y) + 0.1 * _GLOBAL["m"][0].weight.pow(2).sum(),
                    x4,
                    yy,
                )
            ),
            {},
        )
    elif nm == "loss with regulariser of params":
        CASES["loss: " + nm] = (
            (
                lambda yy=yy: (
                    _make_loss_global,
                    lambda o, y: F.cross_entropy(o, y) + 0.1 * _GLOBAL["m"](o.new_ones(1, 4)).pow(2).sum(),
                    x4,
                    yy,
                )
            ),
            {},
        )
    else:
        CASES["loss: " + nm] = ((lambda lf=lf, yy=yy: (mlp, lf, x4, yy)), {})

# --------------------------------------------------------------- misc
CASES["B=2 mlp"] = ((lambda: (mlp, F.cross_entropy, x4[:2], yc[:2])), {})
CASES["B=1 mlp"] = ((lambda: (mlp, F.cross_entropy, x4[:1], yc[:1])), {})


class _Compiled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.body = torch.compile(nn.Sequential(self.l1, nn.Tanh()), backend="eager")

    def forward(self, x):
        return self.l2(self.body(x))


CASES["torch.compile submodule (eager)"] = ((lambda: (_Compiled, F.cross_entropy, x4, yc)), {})


def _compiled_whole():
    return torch.compile(mlp(), backend="eager")


CASES["torch.compile whole (eager)"] = ((lambda: (_compiled_whole, F.cross_entropy, x4, yc)), {})


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.MultiheadAttention(4, 2, batch_first=True)
        self.l = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.a(x, x, x)
        return self.l(h.mean(1))


CASES["MHA batch_first"] = ((lambda: (_Attn, F.cross_entropy, X(B, 5, 4), yc)), {})


class _AttnSeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.MultiheadAttention(4, 2)
        self.l = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.a(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))
        return self.l(h.mean(0))


CASES["MHA seq-first transposed"] = ((lambda: (_AttnSeqFirst, F.cross_entropy, X(B, 5, 4), yc)), {})


class _LSTM(nn.Module):
    def __init__(self, bf=True):
        super().__init__()
        torch.manual_seed(0)
        self.r = nn.LSTM(4, 5, batch_first=bf)
        self.l = nn.Linear(5, 3)
        self.bf = bf

    def forward(self, x):
        if self.bf:
            return self.l(self.r(x)[0][:, -1])
        return self.l(self.r(x.transpose(0, 1))[0][-1])


CASES["LSTM batch_first"] = ((lambda: (_LSTM, F.cross_entropy, X(B, 5, 4), yc)), {})
CASES["LSTM seq-first"] = ((lambda: (lambda: _LSTM(False), F.cross_entropy, X(B, 5, 4), yc)), {})


class _LSTMState(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.r = nn.GRU(4, 5, batch_first=True)
        self.l = nn.Linear(5, 3)
        self.h0 = nn.Parameter(torch.randn(1, 1, 5))

    def forward(self, x):
        return self.l(self.r(x, self.h0.expand(1, x.shape[0], 5).contiguous())[0][:, -1])


CASES["GRU learned h0 expanded"] = ((lambda: (_LSTMState, F.cross_entropy, X(B, 5, 4), yc)), {})


class _LSTMStateMix(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.r = nn.GRU(4, 5, batch_first=True)
        self.l = nn.Linear(5, 3)

    def forward(self, x):
        h0 = x.mean(1).mean(0)[None, None, :].expand(1, x.shape[0], 4)
        h0 = torch.cat([h0, h0[..., :1]], -1).contiguous()
        return self.l(self.r(x, h0)[0][:, -1])


CASES["GRU h0 from batch mean"] = ((lambda: (_LSTMStateMix, F.cross_entropy, X(B, 5, 4), yc)), {})


class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x, z):
        return self.l2(torch.tanh(self.l1(x)) * z)


CASES["two inputs, second shared unbatched"] = ((lambda: (_Tuple, F.cross_entropy, (x4, X(5, seed=9)), yc)), {})
CASES["two inputs, second (1,5) broadcast"] = ((lambda: (_Tuple, F.cross_entropy, (x4, X(1, 5, seed=9)), yc)), {})
CASES["two inputs batched"] = ((lambda: (_Tuple, F.cross_entropy, (x4, X(B, 5, seed=9)), yc)), {})


def main(argv):
    sel = argv[1] if len(argv) > 1 else ""
    entries = ENTRIES
    for name, (mk, kw) in CASES.items():
        if sel and sel not in name:
            continue
        make, loss_fn, x, y = mk()
        try:
            res = run_case(make, loss_fn, x, y, verbose="-v" in argv, **kw)
        except Exception as e:  # oracle failed
            print(f"{name}: ORACLE FAILED {type(e).__name__}: {e}")
            continue
        flag = "!!" if any(v.startswith(("WRONG", "CRASH", "FALSE")) for v in res.values()) else "  "
        print(
            f"{flag} {name}: " + "; ".join(f"{k}={v}" for k, v in res.items() if k in entries or k == "plain"),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv)
