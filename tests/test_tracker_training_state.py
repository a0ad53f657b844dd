"""Tracker.step leaves the model as the plain step ``loss_fn(model(x), y).backward()`` would, beyond p.grad:

- buffers: the updates of ONE forward of the batch (spectral norm's power iteration, a counter, an EMA),
  on every path, never none and never two (the engines' own forwards leave no trace);
- post-accumulate-grad hooks (``p.register_post_accumulate_grad_hook``): run once per step, after p.grad
  has been accumulated, for the parameters the loss reaches;
- inputs that require grad: ``x.grad`` as the backward gives it, also under re-entrant checkpointing.

The functional API (grad_stats, per_sample_grads, check_mean) is no training step: it leaves all three
untouched. The oracle is a plain training loop on a deep copy, in float64.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import persample
from persample import Tracker

pytestmark = pytest.mark.filterwarnings("ignore::persample.SlowPathWarning")

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (on a loaded 2-core machine more threads only contend, ~10 ms an op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- models


class Counting(nn.Module):
    """An MLP whose forward counts its calls and keeps an EMA of its input's batch mean (buffers that a
    training forward updates). ``reassign``: the buffers are replaced (``self.n = self.n + 1``), else
    changed in place (``self.n += 1``; torch.func's vmap refuses that, so the vmap engine needs reassign)."""

    def __init__(self, reassign=False):
        super().__init__()
        self.reassign = reassign
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)
        self.register_buffer("forwards", torch.zeros(()))
        self.register_buffer("input_ema", torch.zeros(5))

    def forward(self, x):
        if self.reassign:
            self.forwards = self.forwards + 1
            self.input_ema = 0.9 * self.input_ema + 0.1 * x.detach().mean(0)
        else:
            self.forwards += 1
            self.input_ema.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return self.b(torch.tanh(self.a(x)))


def spectral(style):
    """An MLP whose last Linear is spectrally normalised: its forward runs one power iteration, which
    updates u and v (buffers), by a parametrization or by the older forward pre-hook."""
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    if style == "parametrization":
        nn.utils.parametrizations.spectral_norm(model[2])
    else:
        nn.utils.spectral_norm(model[2])
    return model


MODELS = {
    "spectral_parametrization": lambda: spectral("parametrization"),
    "spectral_hook": lambda: spectral("hook"),
    "counting": lambda: Counting(),
    "counting_reassigned": lambda: Counting(reassign=True),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]().to(F64)


def batches(n=4, size=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, dtype=F64, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def buffers_of(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def assert_state_close(tracked, plain, what=""):
    """Parameters and buffers (the whole state_dict) agree to 1e-10."""
    a, b = tracked.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-10, atol=1e-12, msg=f"{what} {name}")


CLASS_WEIGHTS = torch.tensor([1.0, 3.0, 0.5], dtype=F64)


def weighted_ce(out, y):
    return F.cross_entropy(out, y, weight=CLASS_WEIGHTS)


def train(model, data, *, tracker_kwargs=None, loss_fn=F.cross_entropy, input_grad=False, lr=0.5):
    """SGD on ``data``; with tracker_kwargs=None the backward line is the plain loss.backward().
    Returns the inputs' gradients of every step (with input_grad)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = None if tracker_kwargs is None else Tracker(model, loss_fn, **tracker_kwargs)
    input_grads = []
    for x, y in data:
        x = x.clone().requires_grad_(input_grad)
        opt.zero_grad()
        if tracker is None:
            loss_fn(model(x), y).backward()
        else:
            tracker.step(x, y)
        input_grads.append(x.grad)
        opt.step()
    return input_grads


# ------------------------------------------------------------------------------ buffers (bug 1)

#: (engine, model) pairs the engine can run. The fast engine refuses spectral norm (NotExact) after its
#: forward, so there "auto" falls back to vmap (and leaves that forward's buffer writes behind); the in-place
#: counter makes vmap refuse, so for it "auto" is the fast engine, and the loop where that cannot be used.
ENGINE_MODELS = [
    ("auto", "spectral_parametrization"),
    ("auto", "spectral_hook"),
    ("auto", "counting"),
    ("auto", "counting_reassigned"),
    ("fast", "counting"),
    ("fast", "counting_reassigned"),
    ("vmap", "spectral_parametrization"),
    ("vmap", "counting_reassigned"),
    ("loop", "spectral_hook"),
    ("loop", "counting"),
]

#: Tracker paths: p.grad from the statistics (no second forward), a plain step (every=2), the check's
#: independent engines, and one more forward + backward for p.grad (inputs that require grad, class weights).
PATHS = {
    "stats": ({}, F.cross_entropy, False),
    "every_2": ({"every": 2}, F.cross_entropy, False),
    "check_every": ({"check_every": 1}, F.cross_entropy, False),
    "input_grad": ({}, F.cross_entropy, True),
    "class_weights": ({}, weighted_ce, False),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("engine, model_name", ENGINE_MODELS, ids=[f"{e}-{m}" for e, m in ENGINE_MODELS])
def test_training_trajectory_keeps_one_forward_of_buffer_updates(engine, model_name, path):
    options, loss_fn, input_grad = PATHS[path]
    base, data = build(model_name), batches()
    plain, tracked = copy.deepcopy(base), copy.deepcopy(base)
    plain_x = train(plain, data, loss_fn=loss_fn, input_grad=input_grad)
    tracked_x = train(
        tracked, data, loss_fn=loss_fn, input_grad=input_grad, tracker_kwargs=dict(engine=engine, **options)
    )
    assert_state_close(tracked, plain, f"{engine} {path}")
    if input_grad:
        for a, b in zip(tracked_x, plain_x):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ["auto", "fast", "loop"])
def test_clipping_step_keeps_one_forward_of_buffer_updates(engine):
    base = build("counting")
    x, y = batches(1)[0]
    plain = copy.deepcopy(base)
    plain(x)
    Tracker(base, F.cross_entropy, engine=engine, clip_norm=0.01).step(x, y)
    assert base.forwards.item() == 1
    for name, b in plain.named_buffers():
        torch.testing.assert_close(dict(base.named_buffers())[name], b, rtol=1e-12, atol=0)


def test_accumulation_keeps_one_forward_per_micro_batch():
    base, data = build("spectral_parametrization"), batches(6, size=3)
    plain, tracked = copy.deepcopy(base), copy.deepcopy(base)
    opt_p, opt_t = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (plain, tracked))
    tracker = Tracker(tracked, F.cross_entropy)
    for step in range(3):
        micro = data[2 * step : 2 * step + 2]
        for x, y in micro:
            (F.cross_entropy(plain(x), y) / 2).backward()
        with tracker.accumulate():
            for x, y in micro:
                tracker.step(x, y, scale=1 / 2)
        for opt in (opt_p, opt_t):
            opt.step()
            opt.zero_grad()
    assert_state_close(tracked, plain, "accumulate")


class LossInside(nn.Module):
    """A model that computes its own (mean) loss from labels passed as an input, with a forward counter."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.register_buffer("forwards", torch.zeros(()))

    def forward(self, x, labels):
        self.forwards += 1
        return {"loss": F.cross_entropy(self.lin(x), labels)}


def test_loss_computed_inside_the_model_keeps_one_forward():
    torch.manual_seed(0)
    model = LossInside().to(F64)
    plain = copy.deepcopy(model)
    x, y = batches(1)[0]
    plain(x, y)["loss"].backward()
    Tracker(model, lambda out: out["loss"]).step({"x": x, "labels": y})
    assert model.forwards.item() == 1
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_name", ["counting", "counting_reassigned"])
def test_observe_keeps_the_users_own_forward(model_name):
    base, data = build(model_name), batches()
    plain, tracked = copy.deepcopy(base), copy.deepcopy(base)
    train(plain, data)
    tracker = Tracker(tracked, F.cross_entropy)
    opt = torch.optim.SGD(tracked.parameters(), lr=0.5)
    for x, y in data:
        opt.zero_grad()
        with tracker.observe(y):
            F.cross_entropy(tracked(x), y).backward()
        opt.step()
    assert_state_close(tracked, plain, "observe")


FUNCTIONAL = {
    "grad_stats": lambda m, x, y, engine: persample.grad_stats(m, F.cross_entropy, x, y, engine=engine),
    "per_sample_grads": lambda m, x, y, engine: persample.per_sample_grads(
        m, F.cross_entropy, x, y, engine="auto" if engine == "fast" else engine
    ),
    "check_mean": lambda m, x, y, engine: persample.check_mean(m, F.cross_entropy, x, y),
}


@pytest.mark.parametrize("function", list(FUNCTIONAL))
@pytest.mark.parametrize("engine, model_name", ENGINE_MODELS, ids=[f"{e}-{m}" for e, m in ENGINE_MODELS])
def test_functional_api_leaves_buffers_untouched(engine, model_name, function):
    """Not a training step: no buffer changes, in place or by reassignment (the same tensors stay in place)."""
    model = build(model_name)
    x, y = batches(1)[0]
    before = buffers_of(model)
    tensors = [b for _, b in model.named_buffers()]
    FUNCTIONAL[function](model, x, y, engine)
    assert all(a is b for (_, a), b in zip(model.named_buffers(), tensors))
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("model_name", ["spectral_parametrization", "spectral_hook"])
def test_loop_engine_gives_every_example_the_buffers_as_found(model_name, chunk_size):
    """A forward that updates a buffer it reads (a power iteration): every example's gradient is taken
    at the buffers a batch forward sees, not after the previous examples' updates (check_mean)."""
    model = build(model_name)
    x, y = batches(1, size=6)[0]
    persample.check_mean(model, F.cross_entropy, x, y, engine="loop", chunk_size=chunk_size)


# ----------------------------------------------------------------- post-accumulate-grad hooks (bug 2)


class Head2(nn.Module):
    """An MLP with an unused second head: the loss does not reach ``unused``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def halving_hooks(model, calls):
    """On every parameter, a post-accumulate-grad hook that halves p.grad and counts its calls."""

    def hook(name):
        def halve(p):
            calls[name] = calls.get(name, 0) + 1
            p.grad.mul_(0.5)

        return halve

    return [p.register_post_accumulate_grad_hook(hook(n)) for n, p in model.named_parameters()]


HOOK_PATHS = {
    "auto": {},
    "vmap": {"engine": "vmap"},
    "loop": {"engine": "loop"},
    "every_2": {"every": 2},
    "check_every": {"check_every": 1},
    "clip_norm": {"clip_norm": 1e6},
    "input_grad": {},
    "class_weights": {},
}


@pytest.mark.parametrize("path", list(HOOK_PATHS))
def test_post_accumulate_hooks_run_once_per_step_on_the_accumulated_grad(path):
    """Two steps without zero_grad: the hook halves g1, then (g1/2 + g2), as after two backward() calls;
    it never runs for the unused head."""
    torch.manual_seed(0)
    base = Head2().to(F64)
    loss_fn = weighted_ce if path == "class_weights" else F.cross_entropy
    plain, tracked = copy.deepcopy(base), copy.deepcopy(base)
    plain_calls, tracked_calls = {}, {}
    halving_hooks(plain, plain_calls)
    halving_hooks(tracked, tracked_calls)
    tracker = Tracker(tracked, loss_fn, **HOOK_PATHS[path])
    for i, (x, y) in enumerate(batches(2)):
        xp, xt = x.clone().requires_grad_(path == "input_grad"), x.clone().requires_grad_(path == "input_grad")
        loss_fn(plain(xp), y).backward()
        tracker.step(xt, y)
        assert tracked_calls == plain_calls == {n: i + 1 for n in ("a.weight", "a.bias", "b.weight", "b.bias")}
        for (n, a), b in zip(tracked.named_parameters(), plain.parameters()):
            if b.grad is None:
                assert a.grad is None, n
            else:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=n)
        if path == "input_grad":
            torch.testing.assert_close(xt.grad, xp.grad, rtol=1e-10, atol=1e-12)


def optimizer_in_backward(model):
    """One SGD+momentum per parameter, stepped (and its grad cleared) by a post-accumulate-grad hook."""
    optimizers = {p: torch.optim.SGD([p], lr=0.3, momentum=0.9) for p in model.parameters()}

    def step(p):
        optimizers[p].step()
        optimizers[p].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step)


@pytest.mark.parametrize(
    "options",
    [{}, {"engine": "fast"}, {"engine": "vmap"}, {"engine": "loop"}, {"every": 2}],
    ids=["auto", "fast", "vmap", "loop", "every_2"],
)
def test_optimizer_in_backward_trains_as_the_plain_loop(options):
    base = build("counting_reassigned")
    plain, tracked = copy.deepcopy(base), copy.deepcopy(base)
    optimizer_in_backward(plain)
    optimizer_in_backward(tracked)
    tracker = Tracker(tracked, F.cross_entropy, **options)
    for x, y in batches(4):
        F.cross_entropy(plain(x), y).backward()
        tracker.step(x, y)
    assert_state_close(tracked, plain, "optimizer in backward")
    assert all(p.grad is None for p in tracked.parameters())


def test_post_accumulate_hooks_run_per_micro_batch_inside_accumulate():
    torch.manual_seed(0)
    base = Head2().to(F64)
    plain, tracked = copy.deepcopy(base), copy.deepcopy(base)
    plain_calls, tracked_calls = {}, {}
    halving_hooks(plain, plain_calls)
    halving_hooks(tracked, tracked_calls)
    tracker = Tracker(tracked, F.cross_entropy)
    micro = batches(2, size=3)
    with tracker.accumulate() as acc:
        for x, y in micro:
            (F.cross_entropy(plain(x), y) / 2).backward()
            tracker.step(x, y, scale=1 / 2)
    assert acc.stats.n == 6 and tracker.steps == 1
    assert tracked_calls == plain_calls == {n: 2 for n in ("a.weight", "a.bias", "b.weight", "b.bias")}
    for a, b in zip(tracked.parameters(), plain.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_functional_api_runs_no_post_accumulate_hook():
    torch.manual_seed(0)
    model = Head2().to(F64)
    calls = {}
    halving_hooks(model, calls)
    x, y = batches(1)[0]
    for engine in ("auto", "vmap", "loop"):
        persample.grad_stats(model, F.cross_entropy, x, y, engine=engine)
    persample.per_sample_grads(model, F.cross_entropy, x, y)
    persample.check_mean(model, F.cross_entropy, x, y)
    assert calls == {} and all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------- re-entrant checkpointing (bug 3)


class Checkpointed(nn.Module):
    """A block under re-entrant activation checkpointing (autograd.grad is refused through it)."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(5, 8), nn.Linear(8, 3)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, x):
        return self.c(checkpoint(self.block, torch.tanh(self.a(x)), use_reentrant=True))


@pytest.mark.parametrize(
    "options",
    [{}, {"engine": "loop"}, {"check_every": 1}, {"every": 2}],
    ids=["auto", "loop", "check_every", "every_2"],
)
def test_reentrant_checkpoint_input_grad_is_the_backwards(options):
    torch.manual_seed(0)
    model = Checkpointed().to(F64)
    plain = copy.deepcopy(model)
    x, y = batches(1, size=6)[0]
    xp, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    xp.grad, xt.grad = torch.ones_like(x), torch.ones_like(x)  # accumulates into an existing x.grad
    F.cross_entropy(plain(xp), y).backward()
    Tracker(model, F.cross_entropy, **options).step(xt, y)
    torch.testing.assert_close(xt.grad, xp.grad, rtol=1e-10, atol=1e-12)
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("function", list(FUNCTIONAL))
@pytest.mark.parametrize("existing", [False, True], ids=["no_grad", "existing_grad"])
def test_reentrant_checkpoint_functional_api_leaves_input_grad(function, existing):
    torch.manual_seed(0)
    model = Checkpointed().to(F64)
    x, y = batches(1, size=6)[0]
    x.requires_grad_()
    x.grad = torch.ones_like(x) if existing else None
    FUNCTIONAL[function](model, x, y, "auto")
    if existing:
        assert torch.equal(x.grad, torch.ones_like(x))
    else:
        assert x.grad is None
    assert all(p.grad is None for p in model.parameters())


def test_reentrant_checkpoint_with_post_accumulate_hooks_runs_them_once():
    """The engines' backward() (re-entrant checkpointing refuses autograd.grad) does not run the hooks;
    the step runs them once, on the accumulated p.grad."""
    torch.manual_seed(0)
    model = Checkpointed().to(F64)
    plain = copy.deepcopy(model)
    plain_calls, tracked_calls = {}, {}
    halving_hooks(plain, plain_calls)
    halving_hooks(model, tracked_calls)
    x, y = batches(1, size=6)[0]
    F.cross_entropy(plain(x), y).backward()
    Tracker(model, F.cross_entropy).step(x, y)
    assert tracked_calls == plain_calls and set(plain_calls.values()) == {1} and len(plain_calls) == 6
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    persample.grad_stats(model, F.cross_entropy, x, y)
    assert set(tracked_calls.values()) == {1}


# ------------------------------------------------------------------------------------------- DDP


@pytest.fixture
def one_rank():
    """A gloo process group of one rank, in this process (destroyed afterwards)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, and no process group already")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_post_accumulate_hooks_run_once_under_ddp(one_rank):
    """A statistics step (the Tracker writes and averages p.grad, then runs the hooks) and a plain step
    (DDP's own backward, which runs them): each hook once per step, on the averaged p.grad."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    plain = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    plain_calls, tracked_calls = {}, {}
    halving_hooks(plain, plain_calls)
    halving_hooks(model, tracked_calls)
    tracker = Tracker(ddp, F.cross_entropy, every=2)
    for step, (x, y) in enumerate(batches(2)):
        for m in (plain, model):
            m.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        tracker.step(x, y)
        assert tracked_calls == plain_calls == {n: step + 1 for n, _ in model.named_parameters()}
        for a, b in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
