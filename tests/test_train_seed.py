"""bench/train_seed.py, the seed's training loop plain against fused: a few steps on
CPU on scikit-learn's digits, and its Fashion-MNIST reader on a synthetic folder."""
import gzip
import importlib.util
import json
import os

import numpy as np
import pytest

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
                  "--max-test", "32", "--device", "cpu", "--out", str(tmp_path), "--check"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "scikit-learn's digits" in out and "nothing downloaded" in out
    assert "curves agree within fp32 noise: yes" in out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["agree"] is True and len(m["epochs"]) == 2
    for row in m["epochs"]:
        for name in ("plain", "fused", "twin"):
            assert {"loss", "train_acc", "test_acc", "img_per_s"} <= row[name].keys()
        assert row["agreement"]["ok"]
    # Same initial weights, same batches: the first step's loss is the same number.
    first = [m["step_losses"][n][0] for n in ("plain", "fused", "twin")]
    assert max(first) - min(first) < 1e-4 * abs(first[0])
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 2 * 3


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


def test_agreement_rule_fails_beyond_the_twins_noise():
    ts = _script()
    plain = {"loss": 1.00, "test_acc": 0.80}
    twin = {"loss": 1.01, "test_acc": 0.80}
    near = ts.agreement(plain, {"loss": 1.03, "test_acc": 0.805}, twin, n_test=1000)
    assert near["ok"]          # 0.03 <= 3 x 0.01 + 2% of 1.0
    far = ts.agreement(plain, {"loss": 1.10, "test_acc": 0.80}, twin, n_test=1000)
    assert not far["ok"] and far["loss_diff"] > far["loss_bound"]
    acc = ts.agreement(plain, {"loss": 1.0, "test_acc": 0.75}, twin, n_test=1000)
    assert not acc["ok"] and acc["acc_diff"] > acc["acc_bound"]
