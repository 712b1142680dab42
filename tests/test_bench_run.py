"""bench/run.py driven in-process at tiny CPU shapes: its budget holds in every section
(numerics included), rows reach the results files as they are made, and an interrupt or
its own hard timeout still leaves the results written.
"""
import csv
import json
import os
import sys
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


@pytest.fixture(scope="module")
def run():
    sys.path.insert(0, BENCH)
    try:
        import run as mod
    finally:
        sys.path.remove(BENCH)
    return mod


def _argv(out, *extra):
    # One tiny block shape, eval, eager_fp32 and the torch backend: each main() ~1 s.
    return ["--device", "cpu", "--quick", "--shapes", "s2", "--batch", "2", "--modes", "eval",
            "--providers", "eager_fp32,fused", "--backends", "torch", "--no-net",
            "--no-sweep", "--no-kernels", "--no-plot", "--numerics-dtypes", "fp32",
            "--no-bottleneck", "--out", str(out), *extra]


def _csv_rows(folder):
    with open(folder / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_import_does_no_work(run):
    assert run.ARGS is None and run.R is None  # nothing parsed or measured at import


# On CPU a shape's providers are timed together, interleaved (bench/run.py's
# _time_prepared through benchlib.time_interleaved): the timer the tests below stop.
def _two_shapes(argv):
    argv[argv.index("--shapes") + 1] = "s2,s3d"
    return argv


def test_rows_are_on_disk_as_they_are_made(run, tmp_path, monkeypatch):
    seen = []
    real = run.bl.time_interleaved

    def spy(fns, **kw):
        seen.append(len(_csv_rows(tmp_path)))  # what a kill at this moment would leave
        return real(fns, **kw)
    monkeypatch.setattr(run.bl, "time_interleaved", spy)
    assert run.main(_two_shapes(_argv(tmp_path))) == 0
    assert seen == [0, 2], seen  # the second shape's timing starts with the first's rows written
    rows = _csv_rows(tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == len(doc["rows"]) and (tmp_path / "results.md").is_file()
    timed = [r for r in rows if r["section"] == "block"]
    assert [r["provider"] for r in timed] == ["eager_fp32", "fused_torch"] * 2
    # the rewrite at the end of the shape added the speedups the appended rows lacked
    assert all(float(r["speedup_vs_eager"]) > 0 for r in timed)
    # timing first, numerics after it
    sections = [r["section"] for r in rows]
    assert sections.index("numerics") > max(i for i, s in enumerate(sections) if s == "block")


def test_bottleneck_section_and_resnet50(run, tmp_path):
    """The ResNet-50 rows: a downsampling bottleneck block in eval and training, and the
    whole torchvision ResNet-50, each fused provider checked against eager as written."""
    pytest.importorskip("torchvision")
    argv = [a for a in _argv(tmp_path, "--r50-shapes", "l1d", "--no-numerics", "--no-gated")
            if a not in ("--no-bottleneck", "--no-net")]
    argv[argv.index("--modes") + 1] = "eval,train"
    argv[argv.index("--shapes") + 1] = "s2"
    assert run.main(argv) == 0
    rows = _csv_rows(tmp_path)
    bott = [r for r in rows if r["section"] == "bottleneck"]
    assert {(r["mode"], r["provider"]) for r in bott} == {
        (m, p) for m in ("eval", "train") for p in ("eager_fp32", "fused_torch")}, bott
    assert all(r["status"] == "OK" and r["shape"] == "b-16-16-64-14-14-1"
               for r in bott)
    fused = [r for r in bott if r["provider"] == "fused_torch"]
    assert all(float(r["check_rel"]) < 1e-4 for r in fused), fused  # fp32: same function
    nets = {(r["kernel"], r["mode"], r["provider"]): r for r in rows if r["section"] == "net"}
    for mode in ("eval", "train"):
        r = nets[("resnet50", mode, "fused_torch")]
        assert r["status"] == "OK" and float(r["check_rel"]) < 1e-3, r
        assert ("resnet18", mode, "fused_torch") in nets


def test_gated_section(run, tmp_path):
    """The SE-ResNet-50 / ResNet-50-D rows: timm's SE bottleneck and ResNet-D
    downsampling block in eval and training, each named by its block (their shape keys
    can coincide), the fused provider checked against eager as written."""
    pytest.importorskip("timm")
    argv = [a for a in _argv(tmp_path, "--gated-shapes", "se1,d2d", "--no-numerics")
            if a != "--no-bottleneck"]
    argv[argv.index("--modes") + 1] = "eval,train"
    argv += ["--r50-shapes", "l1d"]
    assert run.main(argv) == 0
    gated = [r for r in _csv_rows(tmp_path) if r["section"] == "gated"]
    assert {(r["mode"], r["x_value"], r["provider"]) for r in gated} == {
        (m, x, p) for m in ("eval", "train") for x in ("se_r50_l1", "r50d_l2_down")
        for p in ("eager_fp32", "fused_torch")}, gated
    assert all(r["status"] == "OK" and r["x_name"] == "block" for r in gated)
    fused = [r for r in gated if r["provider"] == "fused_torch"]
    assert all(float(r["check_rel"]) < 1e-4 for r in fused), fused  # fp32: same function


def test_budget_holds_in_every_section(run, tmp_path):
    t = time.time()
    assert run.main(_argv(tmp_path, "--budget-s", "0.001")) == 0
    assert time.time() - t < 30
    doc = json.loads((tmp_path / "results.json").read_text())
    assert not [r for r in doc["rows"] if r["section"] in ("block", "numerics")], doc["rows"]
    skips = " | ".join(doc["skipped"])
    assert "fused_torch: time budget (--budget-s) spent" in skips
    assert "skip numerics: 2 of 2 cases not run: time budget" in skips


def test_numerics_keep_their_share_of_the_budget(run, tmp_path):
    run.configure(_argv(tmp_path))
    r = run.Run(budget_s=100, numerics_share=run.NUMERICS_SHARE)
    r.t0 = time.time() - 80  # past the timing sections' 75 s, inside the budget
    assert r.over_budget("timing") and not r.over_budget("numerics")
    r.t0 = time.time() - 101
    assert r.over_budget("timing") and r.over_budget("numerics")
    assert not run.Run(budget_s=0).over_budget("numerics")  # 0: no limit
    a = run.parse_args(["--budget-s", "200"])
    assert run.hard_timeout_s(a) == 250
    assert run.hard_timeout_s(run.parse_args([])) == 0
    assert run.hard_timeout_s(run.parse_args(["--budget-s", "10", "--hard-timeout-s", "15"])) == 15


def test_interrupt_leaves_the_results(run, tmp_path, monkeypatch):
    real = run.bl.time_interleaved
    calls = []

    def interrupted(fns, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what `timeout -s INT` delivers
        return real(fns, **kw)
    monkeypatch.setattr(run.bl, "time_interleaved", interrupted)
    assert run.main(_two_shapes(_argv(tmp_path))) == 130
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["provider"] for r in doc["rows"]] == ["eager_fp32", "fused_torch"]
    assert doc["env"]["stopped"] == "interrupted (SIGINT)"
    assert (tmp_path / "results.md").is_file() and len(_csv_rows(tmp_path)) == 2


def test_hard_timeout_writes_then_exits(run, tmp_path, monkeypatch, capsys):
    """The watchdog fires while the main thread is stuck: the results are written before
    the process would end (os._exit, here replaced) with rc 3."""
    fired = threading.Event()
    at_exit = {}

    def fake_exit(rc):
        at_exit["rc"] = rc
        at_exit["doc"] = json.loads((tmp_path / "results.json").read_text())
        fired.set()
    monkeypatch.setattr(run, "_EXIT", fake_exit)
    real = run.bl.time_interleaved

    def stuck(fns, **kw):
        if not fired.wait(20):  # a kernel that never returns, until the watchdog fires
            raise AssertionError("the watchdog did not fire")
        return real(fns, **kw)
    monkeypatch.setattr(run.bl, "time_interleaved", stuck)
    run.main(_argv(tmp_path, "--hard-timeout-s", "1", "--no-numerics"))
    assert at_exit["rc"] == run.HARD_EXIT_RC == 3
    assert at_exit["doc"]["env"]["stopped"].startswith("hard timeout after 1 s")
    assert "HARD TIMEOUT" in capsys.readouterr().out
    assert torch.get_num_threads() >= 1


def test_host_overhead_rows(run, tmp_path):
    """The host-overhead section (bench/overhead.py) in-process on the CPU: per mode the
    plain block, each backend's ops called directly, FusedResidual, and the differences
    (one op where a block runs, the module's own cost), in us, in every results file."""
    argv = _argv(tmp_path, "--modes", "eval,train", "--backends", "torch,native",
                 "--providers", "eager_fp32", "--no-numerics")
    assert run.main(argv) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = [r for r in doc["rows"] if r["section"] == "overhead"]
    backends = [b for b in ("torch", "native")
                if run.rf_backends.unavailable_reason(b, torch.device("cpu")) is None]
    for mode in ("eval", "train"):
        got = [r["provider"] for r in rows if r["mode"] == mode]
        want = {"one_op", "one_op_alone", "plain"} | {
            f"{k}_{b}" for b in backends for k in ("ops", "fused", "module", "module_alone")}
        assert set(got) == want, (mode, got)
    for r in rows:
        assert r["status"] == "OK" and r["unit"] == "us" and r["metric"] == "host_time"
        assert r["p20"] <= r["p50"] <= r["p80"], r
        if not r["provider"].startswith(("module_", "one_op")):  # differences may be < 0
            assert r["p20"] > 0, r
    assert "Host overhead per call" in (tmp_path / "results.md").read_text()
    assert len(_csv_rows(tmp_path)) == len(doc["rows"])
    assert run.main(argv + ["--no-overhead"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert not [r for r in doc["rows"] if r["section"] == "overhead"]


def test_cpu_speedups_are_paired_per_round(run, tmp_path, monkeypatch):
    """A CPU row's speedup is the median of per-round ratios (benchlib.paired_speedup),
    not the ratio of two medians: a slow phase of the machine that hit one provider's
    calls in some rounds and the other's in others cancels pair by pair."""
    bl = run.bl
    # Rounds where the two slow phases fall apart: the medians give 1.0, each pair 2.0.
    base = bl.Timing(20.0, 10.0, 40.0, rounds=(10.0, 20.0, 40.0, 40.0, 20.0), group=7)
    other = bl.Timing(20.0, 10.0, 20.0, rounds=(5.0, 10.0, 20.0, 20.0, 10.0), group=7)
    assert bl.paired_speedup(base, other) == pytest.approx(2.0)
    assert bl.paired_speedup(base, other._replace(group=8)) == pytest.approx(1.0)
    assert bl.paired_speedup(base, bl.Timing(10.0, 5.0, 20.0)) == pytest.approx(2.0)

    def fabricated(fns, **kw):  # the first provider (eager_fp32) as `base`, then `other`
        assert len(fns) == 2
        for fn, _ in fns:
            fn()
        g = next(bl._GROUPS)
        return [base._replace(group=g), other._replace(group=g)]
    monkeypatch.setattr(run.bl, "time_interleaved", fabricated)
    assert run.main(_argv(tmp_path, "--no-numerics")) == 0
    rows = {r["provider"]: r for r in _csv_rows(tmp_path) if r["section"] == "block"}
    assert float(rows["fused_torch"]["speedup_vs_fp32"]) == pytest.approx(2.0)
    assert float(rows["eager_fp32"]["speedup_vs_fp32"]) == pytest.approx(1.0)


def test_interleaved_rounds_floor(run):
    """min_rounds holds when the budget alone would stop earlier (a network's step on
    CPU outlasts a provider's share of it); every provider gets one sample a round,
    from the second of its two calls there."""
    calls = []
    fns = [(lambda: (calls.append(0), time.sleep(0.05)), None),
           (lambda: calls.append(1), None)]
    t = run.bl.time_interleaved(fns, quick=True, min_rounds=9)  # budget: 0.6 s, 6 rounds
    assert [len(x.rounds) for x in t] == [9, 9] and t[0].group == t[1].group
    assert calls.count(0) == calls.count(1) == 19  # the warm-up call, then two a round
    assert min(t[0].rounds) >= 50.0 > max(t[1].rounds)  # each sample is its own fn's


def test_cpu_run_fixes_the_host_allocator(run, tmp_path):
    """The CPU rows are timed with glibc malloc's thresholds fixed (benchlib's
    steady_host_allocator), and the results say so."""
    import platform
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        pytest.skip("glibc only")
    assert run.main(_argv(tmp_path, "--no-numerics")) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert "mmap threshold 32 MiB" in doc["env"]["host_allocator"]


def test_interleaved_order_is_shuffled_and_paired(run):
    """Each round calls every provider twice in a row (the timed call follows one of
    its own) in a shuffled order: no provider always follows the same other one."""
    calls = []
    fns = [((lambda k=k: calls.append(k)), None) for k in range(3)]
    run.bl.time_interleaved(fns, quick=True, min_rounds=20)
    body = calls[3:]  # after the warm-up calls
    pairs = [body[i:i + 2] for i in range(0, len(body), 2)]
    assert all(a == b for a, b in pairs)
    rounds = [tuple(p[0] for p in pairs[i:i + 3]) for i in range(0, len(pairs), 3)]
    assert all(sorted(r) == [0, 1, 2] for r in rounds)
    assert len(set(rounds)) > 1
