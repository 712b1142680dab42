#!/usr/bin/env python
"""The seed's training loop, plain against fused, side by side.

The seed trains D2L's ResNet-18 (in_channels=1, 10 classes) on Fashion-MNIST resized
to 96x96 with SGD (lr 0.05), batch 256, 10 epochs. This script runs that loop for the
plain model and for fuse_model() of it, from the same initial weights, on the same
batches in the same order, and prints per epoch each one's training loss, train and
test accuracy and images/s, with a progress bar; it writes metrics.json, metrics.csv
and curves.png (loss per step, test accuracy per epoch) to --out.

    python bench/train_seed.py --data ~/data          # torchvision's FashionMNIST folder
    python bench/train_seed.py                        # no data: scikit-learn's digits

Data: --data DIR holding torchvision's layout (DIR/FashionMNIST/raw/*-idx?-ubyte[.gz]).
Without it nothing is downloaded: the loop runs on scikit-learn's digits (1,797 real
8x8 handwritten digits shipped inside the package), upsampled like Fashion-MNIST, and
says so.

Do the curves agree? Two runs in floating point never agree bit for bit once their
kernels round differently: training is chaotic and amplifies every rounding
difference. So a third model, the "twin", is the plain model again, from the same
weights, whose weights after every optimizer step are moved by one rounding of the
dtype (each weight times 1 + eps*u, u uniform in [-1, 1], eps the dtype's machine
epsilon; storing an updated weight in that dtype already rounds by up to eps/2). How
far the twin drifts from plain is the noise of the dtype. Per epoch, fused passes when
|fused - plain| <= 3 x |twin - plain| + floor for the mean training loss (floor 2% of
the loss) and for the test accuracy (floor 1 percentage point plus one test image);
--check exits 1 otherwise.
"""
from __future__ import annotations

import argparse
import copy
import csv
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from resnet_fused import fuse_model, resnet18  # noqa: E402

FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
LOSS_FLOOR = 0.02       # relative to the plain model's loss
ACC_FLOOR = 0.01        # absolute (1 percentage point)
NOISE_FACTOR = 3.0


# ------------------------------------------------------------------ data
def _read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format), optionally gzipped."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 8:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: str, name: str) -> str:
    for base in (os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "raw"), root):
        for cand in (name, name + ".gz"):
            p = os.path.join(base, cand)
            if os.path.exists(p):
                return p
    raise FileNotFoundError(
        f"--data {root}: no {name}[.gz] under {root}/FashionMNIST/raw (torchvision's "
        "layout, e.g. from torchvision.datasets.FashionMNIST(root, download=True) run "
        "elsewhere), {root}/raw or {root}")


def load_fashion_mnist(root: str):
    out = {}
    for split, (img, lab) in FASHION_FILES.items():
        x = torch.from_numpy(_read_idx(_find(root, img)).copy())
        y = torch.from_numpy(_read_idx(_find(root, lab)).astype(np.int64))
        out[split] = (x.unsqueeze(1), y)  # N,1,28,28 uint8
    return out, "Fashion-MNIST from " + root


def load_digits(seed: int):
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:
        raise SystemExit("no --data given and scikit-learn is not installed, so there is no "
                         "local data set to train on (nothing is downloaded): pip install "
                         f"scikit-learn, or pass --data ({e})") from e
    d = _load()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return ({"train": (x[train], y[train]), "test": (x[test], y[test])},
            "scikit-learn's digits (8x8, 1,797 images; no --data given, nothing downloaded)")


def batches(x, y, batch: int, gen: torch.Generator = None, limit: int = None):
    n = len(y)
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    count = 0
    for i in range(0, n, batch):
        idx = order[i: i + batch]
        if gen is not None and len(idx) < 2:
            continue  # BatchNorm cannot train on one image
        if limit is not None and count >= limit:
            return
        count += 1
        yield x[idx], y[idx]


def prepare(x_u8: torch.Tensor, size: int, mean: float, std: float, device, channels_last):
    x = x_u8.to(device, non_blocking=True).float().div_(255.0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ------------------------------------------------------------------ models
class Runner:
    """One model, its optimizer and its running per-epoch figures. With `jitter`, every
    parameter is multiplied by (1 + jitter * U(-1, 1)) after each step (the twin)."""

    def __init__(self, name, model, lr, amp_dtype, device, jitter=0.0, seed=0):
        self.name, self.model = name, model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)
        self.amp_dtype, self.device = amp_dtype, device
        self.jitter = jitter
        self.gen = torch.Generator(device=device).manual_seed(seed + 1) if jitter else None
        self.step_losses = []
        self.reset()

    @torch.no_grad()
    def _jitter(self):
        for p in self.model.parameters():
            u = torch.rand(p.shape, generator=self.gen, device=p.device, dtype=p.dtype)
            p.mul_(u.mul_(2 * self.jitter).add_(1 - self.jitter))

    def reset(self):
        self.loss_sum = self.correct = self.seen = 0
        self.seconds = 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, x, y):
        self.model.train()
        self._sync()
        t = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self._sync()
        self.seconds += time.perf_counter() - t
        if self.jitter:
            self._jitter()
        lv = loss.item()
        self.step_losses.append(lv)
        self.loss_sum += lv * len(y)
        self.correct += (logits.argmax(1) == y).sum().item()
        self.seen += len(y)
        return lv

    @torch.no_grad()
    def accuracy(self, data):
        self.model.eval()
        correct = total = 0
        for x, y in data():
            with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                enabled=self.amp_dtype is not None):
                correct += (self.model(x).argmax(1) == y).sum().item()
            total += len(y)
        return correct / max(total, 1)

    def epoch_row(self, test_acc):
        return {"loss": self.loss_sum / max(self.seen, 1), "train_acc": self.correct /
                max(self.seen, 1), "test_acc": test_acc,
                "img_per_s": self.seen / self.seconds if self.seconds else float("nan")}


# ------------------------------------------------------------------ judging
def agreement(plain: dict, fused: dict, twin: dict, n_test: int) -> dict:
    """Per-epoch verdict of the rule in the module docstring."""
    d_loss, n_loss = abs(fused["loss"] - plain["loss"]), abs(twin["loss"] - plain["loss"])
    d_acc = abs(fused["test_acc"] - plain["test_acc"])
    n_acc = abs(twin["test_acc"] - plain["test_acc"])
    b_loss = NOISE_FACTOR * n_loss + LOSS_FLOOR * abs(plain["loss"])
    b_acc = NOISE_FACTOR * n_acc + ACC_FLOOR + 1.0 / max(n_test, 1)
    return {"loss_diff": d_loss, "loss_noise": n_loss, "loss_bound": b_loss,
            "acc_diff": d_acc, "acc_noise": n_acc, "acc_bound": b_acc,
            "ok": d_loss <= b_loss and d_acc <= b_acc}


def progress(epoch, epochs, i, total, losses, start):
    width = 24
    done = int(width * i / max(total, 1))
    el = time.perf_counter() - start
    eta = el / max(i, 1) * (total - i)
    txt = " ".join(f"{k} {v:.3f}" for k, v in losses.items())
    sys.stderr.write(f"\repoch {epoch}/{epochs} [{'#' * done}{'.' * (width - done)}] "
                     f"{i}/{total} {txt} {el:.0f}s<{eta:.0f}s ")
    sys.stderr.flush()


def plot(path, runners, epochs_rows, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    style = {"plain": dict(color="C0"), "fused": dict(color="C3", linestyle="--"),
             "twin": dict(color="0.6", linewidth=0.8)}
    for r in runners:
        a.plot(range(1, len(r.step_losses) + 1), r.step_losses, label=r.name, **style[r.name])
        acc = [row[r.name]["test_acc"] for row in epochs_rows]
        b.plot(range(1, len(acc) + 1), acc, marker="o", label=r.name, **style[r.name])
    a.set(xlabel="step", ylabel="training loss", title="loss per step")
    b.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder with torchvision's FashionMNIST layout")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--size", type=int, default=96, help="image side after resizing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32, or autocast to bf16/fp16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--backend", default="auto", help="FusedResidual backend")
    p.add_argument("--max-steps", type=int, help="stop each epoch after this many steps")
    p.add_argument("--max-test", type=int, help="test on at most this many images")
    p.add_argument("--no-twin", action="store_true",
                   help="skip the noise twin (no agreement verdict)")
    p.add_argument("--check", action="store_true", help="exit 1 when the curves disagree")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default bench/out/train_seed_<time>)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch", "size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.batch < 2:
        p.error("--batch must be >= 2 (BatchNorm trains on more than one image)")
    return args


def _write_metrics(out: str, summary: dict, rows: list, runners: list) -> None:
    """metrics.json (everything) and metrics.csv (one row per epoch and model)."""
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "model", "loss", "train_acc", "test_acc", "img_per_s"])
        for row in rows:
            for r in runners:
                m = row[r.name]
                w.writerow([row["epoch"], r.name, m["loss"], m["train_acc"], m["test_acc"],
                            m["img_per_s"]])


def _print_verdict(rows: list, verdicts: list, dtype: str) -> None:
    """The agreement verdict with its worst epoch, and the speed ratio."""
    last = rows[-1]
    speed = last["fused"]["img_per_s"] / last["plain"]["img_per_s"]
    if verdicts:
        worst = max((r["agreement"] for r in rows),
                    key=lambda a: max(a["loss_diff"] / a["loss_bound"],
                                      a["acc_diff"] / a["acc_bound"]))
        print(f"curves agree within {dtype} noise: {'yes' if all(verdicts) else 'NO'} "
              f"(worst epoch: |loss fused-plain| {worst['loss_diff']:.4f} vs twin "
              f"{worst['loss_noise']:.4f}, bound {worst['loss_bound']:.4f}; |test acc| "
              f"{worst['acc_diff']:.2%} vs twin {worst['acc_noise']:.2%}, bound "
              f"{worst['acc_bound']:.2%})")
    print(f"fused / plain training speed, last epoch: {speed:.2f}x")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    eps = torch.finfo(amp or torch.float32).eps
    data, source = load_fashion_mnist(args.data) if args.data else load_digits(args.seed)
    xtr, ytr = data["train"]
    xte, yte = data["test"]
    if args.max_test:
        xte, yte = xte[: args.max_test], yte[: args.max_test]
    mean = xtr.float().div(255).mean().item()
    std = xtr.float().div(255).std().item()
    print(f"data: {source}: {len(ytr)} train, {len(yte)} test images, resized to "
          f"{args.size}x{args.size}")

    torch.manual_seed(args.seed)
    plain = resnet18(in_channels=1, num_classes=10)
    fused = fuse_model(plain, backend=args.backend)
    models = [("plain", plain, 0.0), ("fused", fused, 0.0)]
    if not args.no_twin:
        models.append(("twin", copy.deepcopy(plain), eps))
    fmt = {"memory_format": torch.channels_last} if args.channels_last else {}
    runners = [Runner(n, m.to(device, **fmt), args.lr, amp, device, jitter, args.seed)
               for n, m, jitter in models]
    print(f"model: D2L ResNet-18, SGD lr {args.lr}, batch {args.batch}, {args.epochs} "
          f"epoch(s), {args.dtype}{' channels_last' if args.channels_last else ''} on "
          f"{device}, fused backend {args.backend}"
          + ("" if args.no_twin else f"; twin = plain, weights x (1 + {eps:.1e} U(-1,1)) "
                                     "after each step"))

    def to_dev(x, y):
        return prepare(x, args.size, mean, std, device, args.channels_last), y.to(device)

    def test_data():
        return (to_dev(x, y) for x, y in batches(xte, yte, 512))

    rows = []
    steps_per_epoch = math.ceil(len(ytr) / args.batch)
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    gen = torch.Generator().manual_seed(args.seed)
    header = (f"{'epoch':>5} | " + " | ".join(f"{r.name:>5}: loss  train  test   img/s"
                                              for r in runners) + " | agree")
    for epoch in range(1, args.epochs + 1):
        for r in runners:
            r.reset()
        start = time.perf_counter()
        for i, (x, y) in enumerate(batches(xtr, ytr, args.batch, gen, args.max_steps), 1):
            x, y = to_dev(x, y)
            losses = {r.name: r.step(x, y) for r in runners}
            progress(epoch, args.epochs, i, steps_per_epoch, losses, start)
        sys.stderr.write("\n")
        row = {r.name: r.epoch_row(r.accuracy(test_data)) for r in runners}
        row["epoch"] = epoch
        if "twin" in row:
            row["agreement"] = agreement(row["plain"], row["fused"], row["twin"], len(yte))
        rows.append(row)
        if epoch == 1:
            print(header)
        cells = " | ".join(f"{'':>5}  {row[r.name]['loss']:.3f} {row[r.name]['train_acc']:6.1%} "
                           f"{row[r.name]['test_acc']:6.1%} {row[r.name]['img_per_s']:7.0f}"
                           for r in runners)
        verdict = ("-" if "agreement" not in row else
                   "yes" if row["agreement"]["ok"] else "NO")
        print(f"{epoch:>5} | {cells} | {verdict}", flush=True)

    out = args.out or os.path.join(HERE, "out", time.strftime("train_seed_%Y%m%d_%H%M%S"))
    os.makedirs(out, exist_ok=True)
    verdicts = [r["agreement"]["ok"] for r in rows if "agreement" in r]
    summary = {"data": source, "args": vars(args), "device": str(device),
               "torch": torch.__version__, "epochs": rows,
               "agree": all(verdicts) if verdicts else None,
               "rule": {"noise_factor": NOISE_FACTOR, "loss_floor_rel": LOSS_FLOOR,
                        "acc_floor_abs": ACC_FLOOR, "twin_eps": eps},
               "step_losses": {r.name: r.step_losses for r in runners}}
    _write_metrics(out, summary, rows, runners)
    plot(os.path.join(out, "curves.png"), runners, rows,
         f"ResNet-18 plain vs fused ({args.backend}), {source.split(' (')[0]}, {args.dtype}")
    _print_verdict(rows, verdicts, args.dtype)
    print(f"wrote {out}/metrics.json, metrics.csv, curves.png")
    return 1 if args.check and verdicts and not all(verdicts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
