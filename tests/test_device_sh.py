"""bench/device.sh, the one script a lent GPU runs, checked without a GPU: its dry run
(every stage, cap and command, the files it returns), one test stage run for real on a
small pytest file (SIGINT at the cap, status from the file's own summary line), and the
real run's clear stop where no CUDA device is visible.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device.sh")
PLAN_LIMIT_S = 480  # one call of about 8 minutes, so that a second fits in a 15-minute lease

TEST_ORDER = ["native_ops", "triton_bn", "triton_conv", "triton_train", "triton_eval",
              "native_block", "block"]
LAST = ["graphs", "compile"]


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DRY_RUN", "TESTS", "SKIP_BUILD", "SKIP_TESTS", "SKIP_BENCH",
                        "PLAN_S", "WHEEL_DIR", "BENCH_FULL", "DEVICE_SH_LIB")}
    env.update(OUT=str(tmp_path / "out"), PYTHON=sys.executable, **extra)
    return env


def _dry(tmp_path, *args, **extra):
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", *args], cwd=ROOT,
                          env=_env(tmp_path, **extra), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _stages(text):
    """[(name, cap, [command lines])] in the order the dry run prints them."""
    out = []
    for line in text.splitlines():
        m = re.search(r"\] stage (\S+): cap (\d+) s", line)
        if m:
            out.append((m.group(1), int(m.group(2)), []))
        elif line.startswith("      $ ") and out:
            out[-1][2].append(line[8:])
    return out


def test_dry_run_plan_order_caps_and_files(tmp_path):
    text = _dry(tmp_path)
    stages = _stages(text)
    names = [n for n, _, _ in stages]
    # fixed stages first, tests in order from the most basic, graphs and compile last
    tests = [n for n in names if n not in ("env", "build", "ext", "bench", "post")]
    assert names[:3] == ["env", "build", "ext"] and names[-2:] == ["bench", "post"], names
    known = [n for n in tests if not n.startswith("other_")]
    assert known == TEST_ORDER + LAST, tests
    assert tests[-2:] == LAST
    caps = {n: c for n, c, _ in stages}
    total = sum(caps.values())
    assert total <= PLAN_LIMIT_S, caps
    assert f"caps sum to {total} s of the 480 s plan" in text
    assert all(c > 0 for c in caps.values()), caps
    assert caps["bench"] >= 50
    for name, cap, cmds in stages:
        assert cmds, f"stage {name} shows no command"
        # every command is capped, and within its stage's cap
        m = re.match(r"timeout -s INT -k (\d+) (\d+) ", cmds[0])
        assert m and int(m.group(1)) + int(m.group(2)) <= cap, (name, cap, cmds[0])
        if name in tests:
            cmd = cmds[0]
            for need in ("-m pytest", "-m cuda", "--maxfail=", "-rfE", "--timeout=", "tests/test_"):
                assert need in cmd, (name, need, cmd)
            assert " -x" not in cmd
            per = int(re.search(r"--timeout=(\d+)", cmd).group(1))
            assert 0 < per < cap, (name, per, cap)
    bench_cmd = dict((n, c) for n, _, c in stages)["bench"][0]
    budget = int(re.search(r"--budget-s (\d+)", bench_cmd).group(1))
    hard = int(re.search(r"--hard-timeout-s (\d+)", bench_cmd).group(1))
    assert 0 < budget < hard < caps["bench"]
    files = re.findall(r"^  file (\S+)$", text, re.M)
    assert 0 < len(files) <= 8 and len(set(files)) == len(files), files
    assert all(f.count("/") <= 1 for f in files), files
    for need in ("summary.txt", "log.txt", "nvidia-h200/results.csv",
                 "nvidia-h200/results.json", "nvidia-h200/measured.json"):
        assert need in files
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_dry_run_runs_every_file_that_has_cuda_tests(tmp_path):
    text = _dry(tmp_path)
    planned = set(re.findall(r"(tests/test_\w+\.py)", text))
    for f in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if not (f.startswith("test_") and f.endswith(".py")):
            continue
        src = open(os.path.join(ROOT, "tests", f)).read()
        if re.search(r"^\s*@pytest\.mark\.cuda|^pytestmark\s*=.*mark\.cuda|marks=pytest\.mark\.cuda"
                     r"|^from conftest import .*\bDEVICES\b", src, re.M):
            assert f"tests/{f}" in planned, f"{f} has CUDA tests but no stage"


def test_dry_run_with_wheels_and_selected_stages(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "expecttest-0.3.0-py3-none-any.whl").write_bytes(b"")
    text = _dry(tmp_path, WHEEL_DIR=str(wheels), TESTS="triton_conv,compile", SKIP_BUILD="1")
    stages = _stages(text)
    names = [n for n, _, _ in stages]
    assert names == ["wheels", "env", "ext", "triton_conv", "compile", "bench", "post"], names
    wcmd = stages[0][2][0]
    assert "pip install" in wcmd and "--target" in wcmd and "expecttest-0.3.0" in wcmd
    assert sum(c for _, c, _ in stages) <= PLAN_LIMIT_S
    # the time the left-out stages do not use goes to the tests (up to 3x) and the bench
    caps = {n: c for n, c, _ in stages}
    assert caps["triton_conv"] > 35 and caps["bench"] > 100, caps


# (The marker is spelt indirectly so that device.sh does not take this file, which holds
# the text, for one with CUDA tests.)
DEMO = """
import signal
import time
import pytest
cuda = getattr(pytest.mark, "cuda")

@cuda
def test_passes():
    pass

@cuda
def test_fails():
    assert 1 == 2, "one is not two"

@cuda
def test_hangs():
    # deaf to pytest-timeout's SIGALRM, like a test stuck in device code: only the
    # stage's SIGINT ends it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(100)

def test_not_cuda():
    raise AssertionError("deselected by -m cuda")
"""


def test_a_test_stage_reports_from_its_own_summary(tmp_path):
    """One stage run for real: SIGINT at the cap still gives pytest's summary line, the
    failure's first line and where it was interrupted; a collection error in another file
    is that file's status alone."""
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a GPU\n")
    (demo / "test_demo.py").write_text(textwrap.dedent(DEMO))
    (demo / "test_broken.py").write_text("import not_a_module_anywhere\n")
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        . {SCRIPT}
        cd {demo}
        run_test_stage demo 11 60 test_demo.py
        run_test_stage broken 10 5 test_broken.py
        run_test_stage none 10 5 test_demo.py "no_such_test"
    """)
    proc = subprocess.run(["bash", "-c", script], env=_env(tmp_path, DEVICE_SH_LIB="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    lines = {ln.split()[0]: ln for ln in summary.splitlines()[1:] if ln.startswith("  ") and
             ln.split() and ln.split()[0] in ("demo", "broken", "none")}
    assert "TIMEOUT (SIGINT at 6 s)" in lines["demo"], summary
    assert "1 failed, 1 passed, 1 deselected" in lines["demo"], summary
    assert "INTERRUPTED or collection error" in lines["broken"] and "1 error" in lines["broken"]
    assert "no tests: " in lines["none"], summary
    assert "[demo] FAILED test_demo.py::test_fails - AssertionError: one is not two" in summary
    # Where the SIGINT landed: test_hangs' sleep, or pytest's own code when a loaded
    # machine is still reporting the failure at the cap.
    # (log.txt in the message: one loaded CI run printed no location at all)
    assert re.search(r"\[demo\] interrupted in \S+\.py:\d+", summary), (
        summary + "\n--- log.txt ---\n" + (out / "log.txt").read_text()[-4000:])
    assert "[broken] ERROR test_broken.py" in summary
    log = (out / "log.txt").read_text()
    assert "-m cuda" in log and "--maxfail=20" in log
    try:
        import pytest_timeout  # noqa: F401
        assert "--timeout=" in log  # per-test timeouts where pytest-timeout is importable
    except ImportError:
        assert "--timeout=" not in log  # else an unknown option would fail every file


def test_without_cuda_the_real_run_stops_clearly(tmp_path):
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real run would run")
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=_env(tmp_path, WHEEL_DIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device visible" in proc.stdout
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "NO CUDA DEVICE" in summary
