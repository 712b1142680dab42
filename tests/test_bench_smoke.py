"""The benchmark's main job (bench/run.py) runs on the CPU and writes its documented
output; bench/make_preference.py picks the fastest backend from GPU rows.

The run is the quickest CPU mode (two tiny block shapes, one repeat budget), so CI
catches a broken main job in ~15-30 s without judging CPU speed.
"""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def _load_bench_module(name):
    sys.path.insert(0, BENCH)
    try:
        return __import__(name)
    finally:
        sys.path.remove(BENCH)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "run.py"), "--device", "cpu", "--quick",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def test_run_writes_the_documented_outputs(quick_run):
    proc, out = quick_run
    assert proc.returncode in (0, 1), f"run.py crashed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    for name in ("results.csv", "results.json", "results.md"):
        assert (out / name).is_file(), f"{name} missing; stdout tail:\n{proc.stdout[-2000:]}"
    bl = _load_bench_module("benchlib")
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bl.COLUMNS
        csv_rows = list(reader)
    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    assert len(rows) == len(csv_rows) > 0
    for r in rows:
        assert list(r) == bl.COLUMNS, f"row with other columns: {sorted(r)}"
        assert r["device"] == "cpu" and r["gpu"] == "cpu" and r["torch"] and r["timestamp"]
    # rc 1 exactly when some row failed or errored: the exit code is trustworthy.
    bad = [r for r in rows if r["status"] in ("FAIL", "ERROR")]
    assert (proc.returncode == 1) == bool(bad), (proc.returncode, bad[:3])
    assert doc["env"]["device"] == "cpu" and "package_version" in doc["env"]


def test_timing_rows_are_sane(quick_run):
    proc, out = quick_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    timed = [r for r in rows if r["metric"] == "time" and r["status"] == "OK"]
    sections = {r["section"] for r in timed}
    assert {"block", "net", "kernels"} <= sections, sections
    providers = {(r["section"], r["provider"]) for r in timed}
    for need in (("block", "eager_fp32"), ("block", "fused_torch"), ("net", "eager_fp32"),
                 ("net", "fused_torch"), ("kernels", "fused_torch")):
        assert need in providers, f"no timing for {need}; have {sorted(providers)}"
    for r in timed:
        assert r["unit"] == "ms"
        assert 0 < r["p20"] <= r["p50"] <= r["p80"], r
        if r["section"] in ("block", "net"):
            assert r["check_rel"] < 5e-2, f"{r['provider']} computes something else: {r}"
            assert r["tflops"] > 0
        if r["section"] == "net":
            assert r["img_s"] > 0
    fused = [r for r in timed if r["section"] == "block" and r["provider"] == "fused_torch"]
    assert all(r["speedup_vs_eager"] > 0 for r in fused)
    kernels = {r["kernel"] for r in timed if r["section"] == "kernels"}
    assert {"bn_act", "conv_bias_relu", "conv_bias_shortcut_relu"} <= kernels, kernels
    overhead = {(r["mode"], r["provider"]) for r in rows
                if r["section"] == "overhead" and r["status"] == "OK"}
    assert {("eval", "module_torch"), ("train", "module_torch")} <= overhead, overhead


def test_numerics_report_uses_the_tolerance_rule(quick_run):
    proc, out = quick_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    num = [r for r in rows if r["section"] == "numerics" and r["provider"] == "fused_torch"]
    got = {(r["dtype"], r["mode"], r["quantity"]) for r in num}
    for mode, qs in (("eval", ["out"]),
                     ("train", ["out", "grad_input", "grad_params", "running_stats"])):
        for q in qs:
            for dt in ("fp32", "fp16"):
                assert (dt, mode, q) in got, f"no numerics row for fused_torch {dt} {mode} {q}"
    for r in num:
        assert r["status"] in ("PASS", "FAIL")
        assert r["p50"] >= 0 and r["plain"] >= 0
    # The torch backend is the numerical twin of the plain block: fp32 must pass.
    fp32 = [r for r in num if r["dtype"] == "fp32"]
    assert fp32 and all(r["status"] == "PASS" for r in fp32), [r for r in fp32
                                                               if r["status"] != "PASS"]


def test_console_says_cpu_and_ends_with_the_summary(quick_run):
    proc, out = quick_run
    text = proc.stdout
    assert "CPU: GPU figures need CUDA" in text
    assert "=== summary" in text
    tail = text[text.rindex("=== summary"):]
    assert "numerics vs float64" in tail and "results:" in tail
    assert text.rstrip().splitlines()[-1].startswith("total ")
    # every skipped provider is explained
    for line in text.splitlines():
        if "] skip " in line:
            assert ": " in line.split("] skip ", 1)[1], line
    md = (out / "results.md").read_text()
    assert "Residual block" in md and "Numerics" in md and "GPU figures need CUDA" in md


def test_bad_option_is_a_clear_error():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--device", "cpu",
                           "--backends", "torch,warp"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "unknown backend 'warp'" in proc.stderr


def test_make_preference_picks_the_fastest_gpu_backend(tmp_path):
    mp = _load_bench_module("make_preference")
    bl = _load_bench_module("benchlib")

    def row(provider, ms, mode="eval", shape="64-64-56-56-1", device="cuda", status="OK",
            note=""):
        r = dict.fromkeys(bl.COLUMNS, "")
        r.update(section="block", kernel="residual_block", provider=provider, mode=mode,
                 metric="time", unit="ms", p50=ms, dtype="bf16", shape=shape, batch=128,
                 device=device, gpu="NVIDIA H200" if device == "cuda" else "cpu",
                 status=status, note=note, torch="2.11.0", triton="3.6.0")
        return r
    rows = [row("eager", 0.5), row("fused_native", 0.20), row("fused_triton", 0.15),
            row("fused_torch", 0.30),
            row("fused_triton", 0.01, mode="train", note="MISMATCH: output differs"),
            row("fused_native", 1.0, mode="train"), row("fused_torch", 1.2, mode="train"),
            row("fused_triton", 0.1, status="ERROR", shape="128-128-28-28-1"),
            row("fused_torch", 0.3, shape="128-128-28-28-1"),
            row("fused_native", 0.01, device="cpu", shape="512-512-7-7-1")]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    old = {"format": 1, "entries": [{"gpu": "NVIDIA H100 80GB HBM3", "mode": "eval",
                                     "dtype": "bfloat16", "shape": "64-64-56-56-1",
                                     "backend": "triton"}]}
    dest = tmp_path / "measured.json"
    dest.write_text(json.dumps(old))
    assert mp.main([str(tmp_path), "--out", str(dest)]) == 0
    doc = json.loads(dest.read_text())
    assert doc["format"] == 1
    got = {(e["gpu"], e["mode"], e["dtype"], e["shape"]): e["backend"] for e in doc["entries"]}
    assert got == {
        ("NVIDIA H100 80GB HBM3", "eval", "bfloat16", "64-64-56-56-1"): "triton",  # kept
        ("NVIDIA H200", "eval", "bfloat16", "64-64-56-56-1"): "triton",
        ("NVIDIA H200", "train", "bfloat16", "64-64-56-56-1"): "native",  # mismatch excluded
        ("NVIDIA H200", "eval", "bfloat16", "128-128-28-28-1"): "torch",  # error excluded
    }
    # CPU rows alone decide nothing
    (tmp_path / "cpu.json").write_text(json.dumps({"rows": [rows[-1]]}))
    assert mp.main([str(tmp_path / "cpu.json"), "--out", str(tmp_path / "x.json")]) == 1
    assert not (tmp_path / "x.json").exists()


def test_conversion_benchmark_rows(capsys):
    """bench/conversion.py prints a p50/p20/p80 row per model and phase (no timing is
    judged: it is a benchmark row, not a timed test)."""
    conversion = _load_bench_module("conversion")
    assert conversion.main(["--models", "d2l_resnet18", "--repeats", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("d2l_resnet18")]
    assert [r[1] for r in rows] == ["copy", "fuse_model", "inplace"]
    assert all(r[2] == "8" and float(r[3]) > 0 for r in rows)
