""".ci/check_main_command.sh: runs README.md's main command (the line ending in
bench/run.py) as written, in a clean environment, and fails on a non-zero exit or any
FAIL/ERROR row. Driven here against a copy of the script beside a README whose main
command is a stand-in bench script, so every outcome is cheap to produce.
"""
import json
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "check_main_command.sh")

# What the stand-in does is read from outcome.json (the clean environment cannot carry
# it): its exit code, its rows' statuses, extra output lines.
FAKE_RUN = r'''
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
o = json.load(open(os.path.join(here, "outcome.json")))
json.dump(dict(os.environ), open(os.path.join(here, "env_seen.json"), "w"))
out = os.path.join(here, "out")
os.makedirs(out, exist_ok=True)
rows = [{"section": "numerics", "provider": "fused_torch", "mode": "eval", "dtype": "fp32",
         "kernel": "b", "quantity": "out", "status": s, "note": ""} for s in o["statuses"]]
json.dump({"env": {}, "skipped": [], "errors": o.get("errors", []), "rows": rows},
          open(os.path.join(out, "results.json"), "w"))
for line in o.get("lines", []):
    print(line)
print(f"results: {out}  (results.json)")
sys.exit(o.get("rc", 0))
'''

MAIN_LINE = "    python3 -m venv --help >/dev/null && python3 bench/run.py\n"
TEST_LINE = "    python3 -m venv .venv && .venv/bin/python -m pytest -q tests\n"


def _tree(tmp_path, readme_lines=(MAIN_LINE, TEST_LINE)):
    (tmp_path / ".ci").mkdir()
    shutil.copy(SCRIPT, tmp_path / ".ci" / "check_main_command.sh")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "run.py").write_text(FAKE_RUN)
    (tmp_path / "README.md").write_text("# x\n\nThe main job:\n\n" + "".join(readme_lines))
    return tmp_path


def _check(tree, outcome, **env_extra):
    (tree / "bench" / "outcome.json").write_text(json.dumps(outcome))
    env = dict(os.environ, **env_extra)
    return subprocess.run(["bash", str(tree / ".ci" / "check_main_command.sh"),
                           str(tree / "log.txt")], capture_output=True, text=True, env=env,
                          timeout=60)


def test_passing_run_in_a_clean_environment(tmp_path):
    tree = _tree(tmp_path)
    res = _check(tree, {"statuses": ["PASS", "OK"]}, TRITON_INTERPRET="1",
                 RESNET_FUSED_MARKER="leak", CUDA_HOME="/opt/cuda-x")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK, 2 rows" in res.stdout
    assert "python3 bench/run.py" in res.stdout  # it says what it runs
    seen = json.loads((tree / "bench" / "env_seen.json").read_text())
    # only PATH, HOME, CUDA_HOME and what bash itself sets; nothing the caller exported
    # (a python3 shim such as pyenv's puts its own folders in front of PATH)
    assert seen["PATH"].endswith(os.environ["PATH"]) and seen["CUDA_HOME"] == "/opt/cuda-x"
    assert seen["HOME"] == os.environ["HOME"]
    assert "TRITON_INTERPRET" not in seen and "RESNET_FUSED_MARKER" not in seen
    # nothing else but what bash, a python3 shim and Python's locale coercion (PEP 538)
    # set themselves
    assert {k for k in seen if "PYENV" not in k} <= {
        "PATH", "HOME", "CUDA_HOME", "PWD", "OLDPWD", "SHLVL", "_", "LC_CTYPE"}, seen
    assert (tree / "log.txt").read_text().count("results: ") == 1


def test_cuda_home_only_where_the_caller_has_it(tmp_path):
    tree = _tree(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    (tree / "bench" / "outcome.json").write_text(json.dumps({"statuses": ["PASS"]}))
    res = subprocess.run(["bash", str(tree / ".ci" / "check_main_command.sh")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "CUDA_HOME" not in json.loads((tree / "bench" / "env_seen.json").read_text())


@pytest.mark.parametrize("outcome,says", [
    ({"statuses": ["PASS"], "rc": 1}, "exited with 1"),
    ({"statuses": ["PASS", "FAIL"]}, "FAIL row: numerics fused_torch eval fp32"),
    ({"statuses": ["ERROR"]}, "ERROR row"),
    ({"statuses": ["PASS"], "errors": ["numerics x: RuntimeError"]}, "error: numerics x"),
    ({"statuses": []}, "no rows"),
    ({"statuses": ["PASS"], "lines": ["  ERROR: fused_triton fp32 eval out: boom"]},
     "FAIL/ERROR in the output"),
])
def test_failing_runs_fail(tmp_path, outcome, says):
    res = _check(_tree(tmp_path), outcome)
    assert res.returncode == 1, res.stdout + res.stderr
    assert says in res.stderr, res.stderr


@pytest.mark.parametrize("lines", [(TEST_LINE,), (MAIN_LINE, MAIN_LINE)])
def test_readme_needs_exactly_one_main_command(tmp_path, lines):
    res = _check(_tree(tmp_path, lines), {"statuses": ["PASS"]})
    assert res.returncode == 2 and "found" in res.stderr, res.stderr


def test_the_readme_has_one_main_command_and_ci_runs_it():
    with open(os.path.join(ROOT, "README.md")) as f:
        mains = [line for line in f if line.startswith("    python3 -m venv ")
                 and "bench/run.py" in line]
    assert len(mains) == 1 and mains[0].rstrip().split("&&")[-1].strip().startswith(
        ".venv/bin/python bench/run.py"), mains
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "bash .ci/check_main_command.sh" in f.read()
