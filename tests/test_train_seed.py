"""bench/train_seed.py, the seed's training loop plain against fused: a few steps on
CPU on scikit-learn's digits, and its Fashion-MNIST reader on a synthetic folder."""
import gzip
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location(
        "train_seed", os.path.join(ROOT, "bench", "train_seed.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_few_steps_on_digits(tmp_path, capsys):
    pytest.importorskip("sklearn")
    ts = _script()
    rc = ts.main(["--epochs", "2", "--max-steps", "2", "--batch", "8", "--size", "16",
                  "--max-test", "32", "--device", "cpu", "--twins", "2", "--out",
                  str(tmp_path), "--check"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "scikit-learn's digits" in out and "nothing downloaded" in out
    assert "curves agree within fp32 noise: yes" in out
    assert "first update agrees within fp32 rounding: yes" in out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["agree"] is True and len(m["epochs"]) == 2 and m["first_update"]["ok"]
    for row in m["epochs"]:
        for name in ("plain", "fused", "twin1", "twin2"):
            assert {"loss", "train_acc", "test_acc", "img_per_s"} <= row[name].keys()
        assert row["agreement"]["ok"]
    # Same initial weights, same batches: the first step's loss is the same number.
    first = [m["step_losses"][n][0] for n in ("plain", "fused", "twin1", "twin2")]
    assert max(first) - min(first) < 1e-4 * abs(first[0])
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 2 * 4


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_reads_torchvisions_fashion_mnist_folder(tmp_path):
    ts = _script()
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    data, source = ts.load_fashion_mnist(str(tmp_path))
    assert tuple(data["train"][0].shape) == (12, 1, 28, 28)
    assert tuple(data["test"][1].shape) == (5,) and "Fashion-MNIST" in source
    with pytest.raises(FileNotFoundError, match="FashionMNIST/raw"):
        ts.load_fashion_mnist(str(tmp_path / "missing"))


def test_curves_rule_is_a_prediction_interval_over_plain_and_the_twins():
    ts = _script()
    # Student's t quantiles (tables): 2.776 at 0.975 with 4 degrees of freedom.
    assert abs(ts.t_quantile(0.975, 4) - 2.776) < 2e-3
    assert abs(ts.t_quantile(0.995, 10) - 3.169) < 2e-3
    plain = {"loss": 1.00, "test_acc": 0.80}
    twins = [{"loss": 1.02, "test_acc": 0.82}, {"loss": 0.98, "test_acc": 0.78},
             {"loss": 1.01, "test_acc": 0.80}]
    near = ts.agreement(plain, {"loss": 1.05, "test_acc": 0.83}, twins, n_test=1000)
    assert near["ok"], near
    # sd 0.0171 over 4 runs, t(3, 0.975) = 3.182: bound 0.0609 + 2% of the loss
    assert abs(near["loss_bound"] - (3.182 * 0.017078 * (1.25 ** 0.5) + 0.02)) < 1e-3
    far = ts.agreement(plain, {"loss": 1.10, "test_acc": 0.80}, twins, n_test=1000)
    assert not far["ok"] and far["loss_diff"] > far["loss_bound"]
    acc = ts.agreement(plain, {"loss": 1.0, "test_acc": 0.70}, twins, n_test=1000)
    assert not acc["ok"] and acc["acc_diff"] > acc["acc_bound"]
    # more comparisons in a run (Bonferroni): a wider interval
    wide = ts.agreement(plain, {"loss": 1.05, "test_acc": 0.83}, twins, 1000, n_tests=20)
    assert wide["loss_bound"] > near["loss_bound"]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times `factor`: a backward-only defect."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


SMALL = ["--epochs", "2", "--max-steps", "2", "--batch", "8", "--size", "16",
         "--max-test", "32", "--device", "cpu", "--backend", "torch", "--twins", "3",
         "--check"]


def test_check_passes_a_correct_backend_and_fails_a_backward_off_by_1e3(tmp_path,
                                                                        monkeypatch):
    """--check on three seeds, at settings small enough for CI: the torch backend (which
    rounds differently from the plain model) passes, and the same backend with a backward
    wrong by one part in a thousand per block (the size check_model's block checks catch)
    fails on every seed, at the first update. The rule's false-failure rate is 5% at
    most (19 of 20 seeds pass; measured in bench/NOTES.md), so two of three passing is
    asked of the correct backend."""
    pytest.importorskip("sklearn")
    ts = _script()
    seeds = (0, 1, 2)

    def run(seed, tag):
        out = tmp_path / f"{tag}{seed}"
        rc = ts.main(SMALL + ["--seed", str(seed), "--out", str(out)])
        return rc, json.loads((out / "metrics.json").read_text())

    good = [run(s, "ok") for s in seeds]
    assert sum(rc == 0 for rc, _ in good) >= 2, [m["first_update"] for _, m in good]
    assert all(m["first_update"]["ok"] for _, m in good)
    from resnet_fused.backends.composite import TorchBackend
    exact = TorchBackend.forward_train
    monkeypatch.setattr(TorchBackend, "forward_train", lambda self, parts, x, groups=None:
                        _ScaleGrad.apply(exact(self, parts, x, groups), 1.001))
    bad = [run(s, "bad") for s in seeds]
    assert all(rc == 1 and not m["first_update"]["ok"] and not m["agree"]
               for rc, m in bad), [m["first_update"] for _, m in bad]
