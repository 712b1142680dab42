"""TRITON_INTERPRET and import order: Triton binds its own jit helpers (tl.sum, tl.cdiv)
to the interpreter only if the variable is on when triton.language is first imported,
and torch._dynamo (hence `import resnet_fused`) imports it. bench/run.py decides before
importing torch (bench/triton_interpret.py) and starts itself again when its guess was
wrong; the package names the late-set case with what to do.
"""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)
import triton_interpret as ti  # noqa: E402

sys.path.remove(BENCH)

# The smallest run that still has Triton numerics rows: one tiny shape, eval, fp32.
SMALL = ["--quick", "--shapes", "s2", "--batch", "2", "--modes", "eval",
         "--providers", "eager_fp32,fused", "--backends", "torch,triton", "--no-net",
         "--no-sweep", "--no-kernels", "--no-plot", "--numerics-dtypes", "fp32",
         "--no-bottleneck", "--no-overhead", "--budget-s", "60"]


def _env_without_interpret():
    env = {k: v for k, v in os.environ.items() if k not in (ti.VAR, ti.REEXEC_MARK)}
    env["PYTHONPATH"] = ROOT
    return env


def _run(cmd, tmp_path):
    res = subprocess.run(cmd + SMALL + ["--out", str(tmp_path)], cwd=ROOT, text=True,
                         capture_output=True, env=_env_without_interpret(), timeout=240)
    out = res.stdout + res.stderr
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return res.returncode, out, rows


def _assert_triton_rows_pass(rc, out, rows):
    assert rc == 0, out
    assert not [r for r in rows if r["status"] in ("ERROR", "FAIL")], out
    assert "Cannot call @triton.jit'd" not in out
    tri = [r for r in rows if r["section"] == "numerics" and r["provider"] == "fused_triton"]
    assert tri and all(r["status"] == "PASS" for r in tri), tri


def test_bench_run_on_cpu_without_the_variable(tmp_path):
    """A fresh `python bench/run.py --device cpu` with TRITON_INTERPRET unset: the
    variable is on before torch imports triton.language, so every Triton row passes."""
    rc, out, rows = _run([sys.executable, "bench/run.py", "--device", "cpu"], tmp_path)
    _assert_triton_rows_pass(rc, out, rows)
    assert "TRITON_INTERPRET=1 set" in out and "starting again" not in out


def test_bench_run_starts_again_when_the_early_guess_was_wrong(tmp_path):
    """--device auto on a machine whose GPU node exists but CUDA is not usable (faked:
    the early guess says "GPU may be there"): triton is imported with the variable off,
    torch then finds no CUDA, and the script re-executes itself with it on."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {BENCH!r})\n"
        "import triton_interpret\n"
        "triton_interpret.no_gpu_visible = lambda *a, **k: False\n"
        f"sys.argv = [{os.path.join(BENCH, 'run.py')!r}] + sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    out_dir = tmp_path / "out"
    rc, out, rows = _run([sys.executable, str(wrapper)], out_dir)
    _assert_triton_rows_pass(rc, out, rows)
    assert out.count("starting again with it") == 1, out
    assert "TRITON_INTERPRET=1 set" in out  # the re-executed run knows its parent set it


@pytest.mark.parametrize("argv,env,nodes,platform,want", [
    (["--device", "cpu"], {}, ["/dev/nvidia0"], "linux", True),
    (["--device=cpu"], {}, ["/dev/nvidia0"], "linux", True),
    (["--device", "cuda"], {}, [], "linux", False),
    ([], {}, [], "linux", True),                                   # auto, no device node
    ([], {}, ["/dev/nvidia0"], "linux", False),                     # auto, a GPU may be there
    ([], {"CUDA_VISIBLE_DEVICES": ""}, ["/dev/nvidia0"], "linux", True),
    ([], {"CUDA_VISIBLE_DEVICES": "-1"}, ["/dev/nvidia0"], "linux", True),
    ([], {"CUDA_VISIBLE_DEVICES": "1"}, ["/dev/nvidia1"], "linux", False),
    ([], {}, [], "win32", False),                                  # cannot tell: settle()
    ([], {}, [], "darwin", True),
    (["--device", "cpu"], {"TRITON_INTERPRET": "0"}, [], "linux", False),  # the user's
])
def test_early_guess(argv, env, nodes, platform, want):
    env = dict(env)
    had = env.get(ti.VAR)
    got = ti.early(argv, env, platform=platform, device_nodes=lambda: nodes)
    assert got is want
    assert env.get(ti.VAR) == ("1" if want else had)


def test_early_after_a_reexecution_does_not_guess_and_drops_the_mark():
    env = {ti.REEXEC_MARK: "unset"}
    assert ti.early(["--device", "cpu"], env) is False and env == {}
    env = {ti.REEXEC_MARK: "set", ti.VAR: "1"}
    assert ti.early([], env) is True and env == {ti.VAR: "1"}


class _Exec:
    def __init__(self):
        self.calls = []

    def __call__(self, exe, argv):
        self.calls.append((exe, argv))


def test_settle_sets_it_for_the_cpu_and_reexecutes_only_after_triton_was_imported():
    env, ex = {}, _Exec()
    assert ti.settle(False, False, True, env, modules={}, execv=ex) is True
    assert env == {ti.VAR: "1"} and not ex.calls  # nothing imported triton yet
    env = {}
    assert ti.settle(False, False, True, env, modules={"triton": object()}, execv=ex)
    assert env == {ti.VAR: "1", ti.REEXEC_MARK: "set"}
    assert ex.calls == [(sys.executable, [sys.executable, *sys.orig_argv[1:]])]


def test_settle_unsets_its_own_guess_for_a_gpu_and_leaves_the_users_setting():
    env, ex = {ti.VAR: "1"}, _Exec()
    assert ti.settle(True, True, True, env, modules={"triton": object()}, execv=ex) is False
    assert env == {ti.REEXEC_MARK: "unset"} and len(ex.calls) == 1
    for on_gpu, value in ((True, "1"), (False, "0"), (False, "1")):
        env, ex = {ti.VAR: value}, _Exec()
        assert ti.settle(on_gpu, False, True, env, modules={"triton": object()},
                         execv=ex) is False
        assert env == {ti.VAR: value} and not ex.calls


def test_settle_never_reexecutes_inside_a_test_process():
    env, ex = {}, _Exec()
    assert ti.settle(False, False, False, env, modules={"triton": object()}, execv=ex)
    assert env == {ti.VAR: "1"} and not ex.calls


def test_package_names_a_late_set_variable_and_what_to_do():
    """TRITON_INTERPRET=1 set after torch._dynamo imported triton.language, before
    resnet_fused's Triton kernels are defined: the backend reports itself unavailable on
    the CPU, saying why and where to set the variable, instead of failing in a kernel."""
    code = (
        "import os, torch, torch._dynamo\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import resnet_fused, torch\n"
        "from resnet_fused import backends\n"
        "assert 'triton' not in backends.available(torch.device('cpu'))\n"
        "print(backends.unavailable_reason('triton', torch.device('cpu')))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                         capture_output=True, env=_env_without_interpret(), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    msg = res.stdout
    assert "set after triton.language was imported" in msg, msg
    assert "Cannot call @triton.jit'd outside of the scope of a kernel" in msg
    assert "TRITON_INTERPRET=1 python" in msg
