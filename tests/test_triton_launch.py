"""How the Triton backend launches and autotunes its kernels
(resnet_fused/backends/triton/launcher.py and the autotune keys of conv.py).

- Eager calls launch the kernel object itself; torch.library.wrap_triton only while
  tracing. Outside a triton_op body, wrap_triton's eager path builds a new autotuner
  for every call (and so re-benchmarks every config each time).
- Every eager launch runs under a device guard for its tensors' CUDA device (Triton
  launches on the current device otherwise), nothing for CPU tensors.
- Every autotuned kernel's key names every constexpr but the tuned tile sizes and
  every argument its config pruning reads, so no variant reuses a config tuned (and
  pruned) for another.

Without a GPU the kernels run in Triton's interpreter; the GPU's routing is tested by
setting the launcher's INTERPRET flag off, which launches the same interpreted kernel
objects the way a GPU process would launch compiled ones.
"""
import contextlib
import inspect
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from triton.runtime.autotuner import Autotuner

from resnet_fused.backends.triton import bn, conv, conv_bwd, eval_ops, launcher, train

CL = torch.channels_last
MODULES = (bn, conv, conv_bwd, eval_ops, launcher, train)


def _cl(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).contiguous(memory_format=CL)


def _run_every_launcher():
    """conv2d_nhwc with statistics (conv kernel + both combine passes), conv_dgrad,
    conv_wgrad and a BN op: every kind of launch the backend makes."""
    x = _cl(2, 8, 9, 9)
    w = _cl(16, 8, 3, 3, scale=0.2)
    out, _, mean, var = conv.conv2d_nhwc(x, w, 1, 1, stats=True)
    g = conv_bwd.GradOperand(_cl(*out.shape))
    conv_bwd.conv_dgrad(g, w, (9, 9), 1, 1)
    conv_bwd.conv_wgrad(g, x, w.shape, 1, 1)
    bn.channel_stats_impl(out)
    return out


@pytest.fixture
def gpu_routing(monkeypatch):
    """The launcher routes as on a GPU (the interpreter's shortcut off)."""
    monkeypatch.setattr(launcher, "INTERPRET", False)


def test_eager_launches_bypass_wrap_triton_and_keep_one_autotuner(gpu_routing, monkeypatch):
    """Repeated eager calls of every launcher never go through wrap_triton, construct no
    autotuner, and benchmark each config of the conv kernel once for the shape."""
    wrapped = []

    def spy(kernel):
        wrapped.append(kernel)
        raise AssertionError("wrap_triton called in eager code")

    for mod in (torch.library, torch._library.triton) + MODULES:
        if hasattr(mod, "wrap_triton"):
            monkeypatch.setattr(mod, "wrap_triton", spy)
    made = []
    real_init = Autotuner.__init__

    def counting_init(self, *a, **k):
        made.append(self)
        real_init(self, *a, **k)

    monkeypatch.setattr(Autotuner, "__init__", counting_init)
    # Two configs and a stub benchmark, so the autotuner really tunes (the interpreter
    # has one config, which it would launch without tuning).
    benched = []
    tuner = conv._conv_kernel
    monkeypatch.setattr(tuner, "configs",
                        [conv._cfg(32, 16, 16, 4, 1), conv._cfg(64, 16, 16, 4, 1)])
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "_bench",
                        lambda *a, config, **k: benched.append(config) or [1.0] * 3)

    first = _run_every_launcher()
    torch.manual_seed(0)
    second = _run_every_launcher()
    assert not wrapped
    assert not made, f"{len(made)} autotuners built by eager calls"
    assert len(benched) == 2, f"{len(benched)} benchmark runs for 2 configs and one shape"
    assert len(tuner.cache) == 1
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_launch_routes_eager_to_the_kernel_and_traced_to_wrap_triton(gpu_routing, monkeypatch):
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(("direct", grid))

    def fake_wrap(kernel):
        return type("W", (), {"__getitem__": lambda s, grid: (
            lambda *a, **k: calls.append(("wrapped", grid)))})()

    monkeypatch.setattr(launcher, "wrap_triton", fake_wrap)
    k = Kernel()
    t = torch.zeros(4)
    p = torch.nn.Parameter(torch.zeros(4))
    launcher.launch(k, (1,), t, p, 4, FLAG=True)
    assert calls == [("direct", (1,))]
    calls.clear()
    with FakeTensorMode() as mode:
        ft = mode.from_tensor(t)
        launcher.launch(k, (2,), ft, 4)
    launcher.launch(k, (3,), ft, 4)                # a fake tensor outside the mode
    launcher.launch(k, (4,), torch.empty(4, device="meta"), 4)
    make_fx(lambda a: launcher.launch(k, (5,), a, 4) or a)(t)   # traced, real tensors
    assert calls == [("wrapped", (g,)) for g in (2, 3, 4, 5)], calls


@pytest.mark.parametrize("C,K,H,tile", [(24, 40, 9, (128, 32, 16)), (40, 24, 5, (32, 32, 32))],
                         ids=["c24-k40-9x9", "c40-k24-5x5"])
def test_interpreter_runs_the_forward_on_its_shape_tile_without_benchmarking(
        C, K, H, tile, monkeypatch):
    """Under the interpreter the conv forward runs interp_tile's config for the shape on
    the un-tuned kernel (launcher._sole_config) and never benchmarks: benchmarking needs
    a GPU driver the interpreter lacks, and triton 3.6's Autotuner benchmarks even a
    sole pruned config. Fails if the Autotuner runs or another tile is launched."""
    if not launcher.INTERPRET:
        pytest.skip("the interpreter's launch route (a GPU process autotunes)")
    from resnet_fused.testing.tolerance import assert_within
    tuner = conv._conv_kernel
    real_fn = tuner.fn
    launched = []

    class Spy:
        arg_names = real_fn.arg_names

        def __getitem__(self, grid):
            def run(*a, **k):
                launched.append(tuple(k[n] for n in ("BM", "BN", "BK")))
                return real_fn[grid](*a, **k)
            return run

    monkeypatch.setattr(tuner, "fn", Spy())
    monkeypatch.setattr(tuner, "run", lambda *a, **k: pytest.fail("the Autotuner ran"))
    monkeypatch.setattr(tuner, "_bench", lambda *a, **k: pytest.fail("benchmarked"))
    torch.manual_seed(0)
    x = _cl(2, C, H, H)                       # M = 2*H*H rows: a partial last row tile
    w = _cl(K, C, 3, 3, scale=C ** -0.5)
    out = conv.conv2d_nhwc(x, w, 1, 1).out
    assert launched == [tile]
    conv_ref = lambda d: torch.nn.functional.conv2d(x.to(d), w.to(d), padding=1)  # noqa: E731
    assert_within("conv forward", out, conv_ref(torch.float32), conv_ref(torch.float64))


def test_interpreter_never_wraps_and_skips_shape_only_calls(monkeypatch):
    """Under TRITON_INTERPRET=1 (torch 2.11's wrap_triton rejects interpreted kernels)
    launches run the kernel directly, and fake/meta calls launch nothing."""
    monkeypatch.setattr(launcher, "INTERPRET", True)
    monkeypatch.setattr(launcher, "wrap_triton", lambda k: pytest.fail("wrap_triton called"))
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(grid)

    launcher.launch(Kernel(), (1,), torch.zeros(2))
    launcher.launch(Kernel(), (2,), torch.empty(2, device="meta"))
    with FakeTensorMode() as mode:
        launcher.launch(Kernel(), (3,), mode.from_tensor(torch.zeros(2)))
    assert calls == [(1,)]


# --------------------------------------------------------------------------- device
def _on(device):
    """Stands in for a tensor on `device` (no CUDA here): device_guard reads .device only."""
    return types.SimpleNamespace(device=torch.device(device))


def test_device_guard_is_the_tensors_cuda_device_and_nothing_on_cpu(monkeypatch):
    g = launcher.device_guard([_on("cpu"), _on("cuda:1"), _on("cuda:1")])
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    assert launcher.device_guard([_on("cuda:0")]).idx == 0
    monkeypatch.setattr(torch.cuda, "device", lambda d: pytest.fail("CUDA asked for CPU"))
    assert isinstance(launcher.device_guard([_on("cpu"), _on("cpu")]),
                      contextlib.nullcontext)
    assert isinstance(launcher.device_guard([]), contextlib.nullcontext)
    with pytest.raises(AssertionError, match="cuda:0 and cuda:1"):
        launcher.device_guard([_on("cuda:0"), _on("cuda:1")])


class _GuardSpy:
    """launcher.device_guard, recording the tensors of each guard and whether a kernel
    runs inside one."""

    def __init__(self):
        self.guards, self.inside = [], False

    def __call__(self, tensors):
        self.guards.append(list(tensors))
        spy = self

        @contextlib.contextmanager
        def cm():
            spy.inside = True
            try:
                yield
            finally:
                spy.inside = False
        return cm()


@pytest.mark.parametrize("interpret", [True, False])
def test_every_eager_launch_runs_inside_its_tensors_device_guard(interpret, monkeypatch):
    monkeypatch.setattr(launcher, "INTERPRET", interpret)
    spy = _GuardSpy()
    monkeypatch.setattr(launcher, "device_guard", spy)
    monkeypatch.setattr(launcher, "wrap_triton", lambda k: type("W", (), {
        "__getitem__": lambda s, grid: lambda *a, **kw: ran.append(("wrapped", spy.inside))})())
    ran = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: ran.append(("direct", spy.inside))

    a, b = torch.zeros(2), torch.ones(3)
    launcher.launch(Kernel(), (1,), a, b, 4, out=a)
    assert ran == [("direct", True)] and len(spy.guards) == 1
    assert [t is a or t is b for t in spy.guards[0]] == [True, True]  # each tensor once
    if not interpret:  # traced: the compiled code guards its kernels itself
        ran.clear()
        make_fx(lambda x: launcher.launch(Kernel(), (2,), x) or x)(a)
        assert ran == [("wrapped", False)] and len(spy.guards) == 1


def test_the_backends_launches_all_take_the_guard(monkeypatch):
    """conv, dgrad, wgrad, the statistics passes and a BN op, for real (interpreter):
    every launch passes through device_guard, which on CPU tensors is a null context."""
    real, seen = launcher.device_guard, []

    def spy(tensors):
        g = real(tensors)
        seen.append(type(g))
        return g
    monkeypatch.setattr(launcher, "device_guard", spy)
    _run_every_launcher()
    assert len(seen) >= 5 and set(seen) == {contextlib.nullcontext}, seen


# --------------------------------------------------------------------------- keys
def _autotuners():
    found = {}
    for mod in MODULES:
        for name, obj in vars(mod).items():
            if isinstance(obj, Autotuner):
                found[f"{mod.__name__}.{name}"] = obj
    return found


def _constexprs(tuner):
    """The kernel's tl.constexpr parameters (from the Python function under the JIT or
    interpreter wrapper; annotations may be strings)."""
    fn = tuner.fn.fn
    return [n for n, p in inspect.signature(fn).parameters.items()
            if "constexpr" in str(p.annotation)]


def _tuned(tuner):
    return set().union(*(set(c.kwargs) for c in tuner.configs))


class _Reads(dict):
    """A dict that records which keys were read."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.read.add(k)
        return super().get(k, default)


def _prune_reads(tuner):
    """Every argument name the config pruning reads, over flag settings that take each
    branch (all flags off reads all of _heavy's; HAS_X2 reads C2)."""
    prune = tuner.early_config_prune
    read = set()
    for flags_on in ((), ("HAS_X2",), ("INPUT_PRECISION",)):
        named = _Reads()
        for name in tuner.arg_names:
            if name.endswith("_ptr"):
                named[name] = torch.empty(1, dtype=torch.float32)
            elif name == "INPUT_PRECISION":
                named[name] = "ieee" if "INPUT_PRECISION" in flags_on else "tf32"
            elif name.isupper() and name not in ("M", "K", "C", "H", "W", "P", "Q", "N",
                                                 "H2", "W2", "C2"):
                named[name] = name in flags_on
            else:
                named[name] = 64
        prune(list(tuner.configs), named)
        read |= named.read
    return read


def test_there_are_autotuned_kernels():
    assert set(_autotuners()) >= {"resnet_fused.backends.triton.conv._conv_kernel",
                                  "resnet_fused.backends.triton.conv._conv_tma_kernel"}


@pytest.mark.parametrize("name", sorted(_autotuners()))
def test_autotune_key_names_every_constexpr_and_pruned_argument(name):
    tuner = _autotuners()[name]
    keys = set(tuner.keys)
    unknown = keys - set(tuner.arg_names)
    assert not unknown, f"{name}: key names no argument {sorted(unknown)} (silently ignored)"
    missing = set(_constexprs(tuner)) - _tuned(tuner) - keys
    assert not missing, f"{name}: constexprs missing from the autotune key: {sorted(missing)}"
    if tuner.early_config_prune is not None:
        # Tensor arguments join the key through their dtype (all the pruning reads of
        # them); names the kernel does not have (a shared helper's) read as defaults.
        read = {r for r in _prune_reads(tuner) & set(tuner.arg_names) if not r.endswith("_ptr")}
        assert read <= keys, f"{name}: pruning reads {sorted(read - keys)}, not in the key"


def _autotune_key(tuner, args, kwargs):
    """The cache key triton's Autotuner.run computes (triton 3.6 and 3.8)."""
    all_args = {**dict(zip(tuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in all_args.items() if k in tuner.arg_names}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def _recorded_launches(monkeypatch, fn):
    seen = []
    real = conv.launch

    def recording(kernel, grid, *a, **k):
        seen.append((kernel, a, k))
        return real(kernel, grid, *a, **k)

    monkeypatch.setattr(conv, "launch", recording)
    fn()
    monkeypatch.setattr(conv, "launch", real)
    return [(a, k) for kernel, a, k in seen if isinstance(kernel, Autotuner)], \
        [kernel for kernel, a, k in seen if isinstance(kernel, Autotuner)]


@pytest.mark.parametrize("path", ["pointer", "tma"])
def test_eval_k1_and_k2_of_an_identity_block_tune_separately(path, monkeypatch):
    """K1 relu(conv + b) and K2 relu(conv + b + x) of an identity block have the same
    sizes; only HAS_RES tells them apart (K2's pruning drops the configs that spill
    with the residual read). And fp32 TF32 vs IEEE (INPUT_PRECISION)."""
    x = _cl(2, 16, 6, 8)
    w1, w2 = _cl(16, 16, 3, 3, scale=0.1), _cl(16, 16, 3, 3, scale=0.1)
    b1, b2 = torch.randn(16), torch.randn(16)

    def k1_k2():
        y = conv.conv2d_nhwc(x, w1, 1, 1, epilogue=conv.Epilogue(b1, relu=True), _path=path).out
        conv.conv2d_nhwc(y, w2, 1, 1, residual=conv.ResidualAdd(x),
                         epilogue=conv.Epilogue(b2, relu=True), _path=path)

    launches, kernels = _recorded_launches(monkeypatch, k1_k2)
    assert len(launches) == 2 and kernels[0] is kernels[1]
    tuner = kernels[0]
    k1, k2 = (_autotune_key(tuner, a, k) for a, k in launches)
    assert k1 != k2, "eval K1 and K2 share an autotune key"
    a, k = launches[0]
    tf32 = _autotune_key(tuner, a, dict(k, INPUT_PRECISION="tf32"))
    ieee = _autotune_key(tuner, a, dict(k, INPUT_PRECISION="ieee"))
    assert tf32 != ieee, "a TF32 winner would be reused for IEEE fp32"


def test_eval_ops_launch_the_same_variants(monkeypatch):
    """The registered eval ops K1 and K2 (identity) launch with distinct keys too."""
    x = _cl(2, 16, 6, 8)
    w1, w2 = _cl(16, 16, 3, 3, scale=0.1), _cl(16, 16, 3, 3, scale=0.1)
    b1, b2 = torch.randn(16), torch.randn(16)

    def ops():
        y = eval_ops.conv_bias_relu(x, w1, b1, 1, 1)
        eval_ops.conv_bias_shortcut_relu(y, w2, b2, x, None, 1, 1, 0)

    launches, kernels = _recorded_launches(monkeypatch, ops)
    keys = {_autotune_key(kernels[i], a, k) for i, (a, k) in enumerate(launches)}
    assert len(launches) == 2 and len(keys) == 2


def test_launcher_is_the_only_launch_path():
    """No module of the backend calls wrap_triton or kernel[grid] itself."""
    for mod in (bn, conv, conv_bwd, eval_ops, train):
        src = inspect.getsource(mod)
        assert "wrap_triton(" not in src, mod.__name__
        assert "kernel)[" not in src and "_kernel[" not in src, mod.__name__


def test_triton_ops_list_every_kernel_for_the_compile_cache(monkeypatch):
    """torch's registry of the kernels a triton_op runs (hashed into the AOTAutograd
    cache key) gets every kernel of the backend for every op of its namespace, since
    launch() hides the kernels from torch's source scan; other namespaces untouched."""
    import torch._library.triton as tlib

    registry = {"resnet_fused_triton::some_op": [conv._conv_kernel], "other::op": []}
    monkeypatch.setattr(tlib, "triton_ops_to_kernels", registry)
    added = launcher.declare_kernels("resnet_fused_triton", (bn, conv, conv_bwd))
    listed = registry["resnet_fused_triton::some_op"]
    for kernel in (conv._conv_kernel, conv._conv_tma_kernel, conv._tile_stats_combine_kernel,
                   conv_bwd._dgrad_kernel, conv_bwd._wgrad_kernel, bn._bn_act_kernel,
                   bn._stats_partial_kernel):
        assert sum(k is kernel for k in listed) == 1, kernel
    assert added == len(listed) - 1 and registry["other::op"] == []
    assert launcher.declare_kernels("resnet_fused_triton", (bn, conv, conv_bwd)) == 0
