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

Do the runs agree? Two runs in floating point never agree bit for bit once their
kernels round differently, and training at this learning rate is chaotic: a difference
of one rounding grows to the run-to-run spread within a few steps (on the digits at
16x16, a correct fused model's loss is 1e-6 from plain's after the first update and
1e-3 to 1e-1 three updates later). So the verdict has two parts (--check exits 1 when
either fails):

1. The first update, before chaos: every parameter's change in the first SGD step,
   concatenated, is compared by the package's rule (resnet_fused.testing.compare:
   relative L2 and max-abs error against a float64 copy of the plain model stepped on
   the same batch, at most 3x the plain model's own error plus the dtype's floor).
   This is where a defect of the size check_model's block checks catch (a backward
   wrong by one part in a thousand) shows: it moves the first update by ~1e-3, the
   rounding by ~1e-6.
2. The curves, for what only a long run shows: --twins K "twins" (default 4) are the
   plain model again, from the same weights, each with its own random stream, whose
   every optimizer step is moved by an error as large as a kernel's rounding: each
   parameter's update times (1 + e*z), z ~ N(0, 1), e the plain model's own relative L2
   error of the first update against float64 (rule 1 measures it), then each weight
   times (1 + eps*u), u uniform in [-1, 1], eps the dtype's machine epsilon (storing an
   updated weight rounds by up to eps/2). Weight rounding alone drifts ten times slower
   than two kernels' rounding of the gradients does. Plain and the twins
   are K+1 equally valid runs: per epoch, for the mean training loss and the test
   accuracy, fused passes when it lies within their prediction interval,
   |fused - mean| <= t * sd * sqrt(1 + 1/(K+1)) + floor, where mean and sd are the
   K+1 runs' mean and standard deviation and t is Student's t quantile (K degrees of
   freedom) at 1 - ALPHA / (2 * epochs * 2) (Bonferroni over the epochs and the two
   quantities); floor: 2% of the loss, 1 percentage point plus one test image of
   accuracy. A correct backend whose run is one more sample of the same spread then
   fails with probability at most ALPHA (5%) in all: designed to pass on 19 of 20 seeds
   (what was measured, and where the twins still drift less than a correct fused model:
   bench/NOTES.md, "train_seed --check: error rates").
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
from resnet_fused.testing.tolerance import compare  # noqa: E402

FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
LOSS_FLOOR = 0.02       # relative to the plain model's loss
ACC_FLOOR = 0.01        # absolute (1 percentage point)
ALPHA = 0.05            # the curves' false-failure rate for a correct backend, in all
UPDATE_FACTOR = 3.0     # the first update: the package's factor for gradients
TWINS = 4


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
    """One model, its optimizer and its running per-epoch figures. A twin (`jitter`):
    after each step every parameter's update is moved by update_noise times itself times
    N(0, 1) (update_noise: the plain model's own relative error of the first update,
    set before the twin's first step), then every parameter is multiplied by
    (1 + jitter * U(-1, 1))."""

    def __init__(self, name, model, lr, amp_dtype, device, jitter=0.0, seed=0):
        self.name, self.model = name, model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)
        self.amp_dtype, self.device = amp_dtype, device
        self.jitter = jitter
        self.update_noise = 0.0
        self.gen = torch.Generator(device=device).manual_seed(seed + 1) if jitter else None
        self.step_losses = []
        self.reset()

    @torch.no_grad()
    def _jitter(self, old):
        for p, o in zip(self.model.parameters(), old):
            if self.update_noise:
                z = torch.randn(p.shape, generator=self.gen, device=p.device, dtype=p.dtype)
                p.add_(z.mul_(p - o).mul_(self.update_noise))
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
        old = [p.detach().clone() for p in self.model.parameters()] if self.jitter else None
        self.opt.step()
        self._sync()
        self.seconds += time.perf_counter() - t
        if self.jitter:
            self._jitter(old)
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
def _t_cdf(x: float, df: int) -> float:
    """Student's t distribution function (Simpson's rule on the density: no scipy)."""
    if x < 0:
        return 1.0 - _t_cdf(-x, df)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n = 2000
    h = x / n
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom, by bisection."""
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def agreement(plain: dict, fused: dict, twins: list, n_test: int, n_tests: int = 1) -> dict:
    """One epoch's verdict on the curves (rule 2 of the module docstring): fused within
    the prediction interval of plain and the twins, for the loss and the test accuracy.
    n_tests: how many such comparisons the run makes (epochs x 2), for Bonferroni."""
    if not twins:
        raise ValueError("agreement needs at least one twin")
    runs = [plain] + list(twins)
    n = len(runs)
    t = t_quantile(1 - ALPHA / (2 * n_tests), n - 1)
    out = {"t": t, "runs": n}
    floors = {"loss": LOSS_FLOOR * abs(plain["loss"]),
              "acc": ACC_FLOOR + 1.0 / max(n_test, 1)}
    ok = True
    for q, key in (("loss", "loss"), ("acc", "test_acc")):
        vals = [r[key] for r in runs]
        mean = sum(vals) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
        bound = t * sd * math.sqrt(1 + 1 / n) + floors[q]
        diff = abs(fused[key] - mean)
        out.update({f"{q}_diff": diff, f"{q}_noise": sd, f"{q}_bound": bound})
        ok = ok and diff <= bound
    out["ok"] = ok
    return out


def params(model) -> dict:
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def first_update(before: dict, plain, fused, ref, dtype) -> dict:
    """Rule 1 of the module docstring: the first SGD step's change of every parameter
    (concatenated), fused against plain against the float64 reference."""
    def update(m):
        after = params(m)
        return torch.cat([(after[n] - before[n]).flatten() for n in sorted(before)])
    c = compare("first update", update(fused), update(plain), update(ref),
                factor=UPDATE_FACTOR, dtype=dtype)
    return {"fused_l2": c.fused_l2, "fused_max": c.fused_max, "plain_l2": c.plain_l2,
            "plain_max": c.plain_max, "bound_l2": c.bound_l2, "bound_max": c.bound_max,
            "ok": c.ok, "problem": c.problem}


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
        kind = "twin" if r.name.startswith("twin") else r.name
        label = r.name if kind != "twin" or r.name == "twin1" else None
        a.plot(range(1, len(r.step_losses) + 1), r.step_losses, label=label, **style[kind])
        acc = [row[r.name]["test_acc"] for row in epochs_rows]
        b.plot(range(1, len(acc) + 1), acc, marker="o", label=label, **style[kind])
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
    p.add_argument("--twins", type=int, default=TWINS,
                   help=f"noise twins for the curves' verdict (default {TWINS}; 0: none)")
    p.add_argument("--no-twin", action="store_true", help="the same as --twins 0")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when the first update or the curves disagree")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default bench/out/train_seed_<time>)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch", "size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.no_twin:
        args.twins = 0
    if args.twins < 0 or args.twins == 1:
        p.error("--twins must be 0 or >= 2 (one twin is one sample of the noise: no spread)")
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


def _print_verdict(rows: list, verdicts: list, dtype: str, first: dict) -> None:
    """The first update's and the curves' verdicts (the curves' worst epoch), and the
    speed ratio."""
    last = rows[-1]
    speed = last["fused"]["img_per_s"] / last["plain"]["img_per_s"]
    if first:
        print(f"first update agrees within {dtype} rounding: "
              f"{'yes' if first['ok'] else 'NO'} (relative L2 error against float64 "
              f"{first['fused_l2']:.1e}, plain {first['plain_l2']:.1e}, bound "
              f"{first['bound_l2']:.1e}; max-abs {first['fused_max']:.1e}, bound "
              f"{first['bound_max']:.1e})")
    if verdicts:
        worst = max((r["agreement"] for r in rows),
                    key=lambda a: max(a["loss_diff"] / a["loss_bound"],
                                      a["acc_diff"] / a["acc_bound"]))
        print(f"curves agree within {dtype} noise: {'yes' if all(verdicts) else 'NO'} "
              f"(worst epoch: |loss fused - mean| {worst['loss_diff']:.4f}, sd of "
              f"{worst['runs']} runs {worst['loss_noise']:.4f}, bound {worst['loss_bound']:.4f}; "
              f"|test acc| {worst['acc_diff']:.2%}, sd {worst['acc_noise']:.2%}, bound "
              f"{worst['acc_bound']:.2%}; t = {worst['t']:.2f}, false-failure rate "
              f"<= {ALPHA:.0%} for a correct backend)")
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
    models = [("plain", plain, 0.0, args.seed), ("fused", fused, 0.0, args.seed)]
    models += [(f"twin{k}", copy.deepcopy(plain), eps, args.seed + 1000 * k)
               for k in range(1, args.twins + 1)]
    fmt = {"memory_format": torch.channels_last} if args.channels_last else {}
    # The float64 plain model for the first update's reference (rule 1).
    ref = copy.deepcopy(plain).to(device=device, dtype=torch.float64, **fmt)
    runners = [Runner(n, m.to(device, **fmt), args.lr, amp, device, jitter, seed)
               for n, m, jitter, seed in models]
    print(f"model: D2L ResNet-18, SGD lr {args.lr}, batch {args.batch}, {args.epochs} "
          f"epoch(s), {args.dtype}{' channels_last' if args.channels_last else ''} on "
          f"{device}, fused backend {args.backend}"
          + ("" if not args.twins else f"; {args.twins} twins = plain, each update x "
                                       "(1 + e N(0,1)) (e: plain's first-update error), "
                                       f"weights x (1 + {eps:.1e} U(-1,1)) after each step"))

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
    first = {}
    for epoch in range(1, args.epochs + 1):
        for r in runners:
            r.reset()
        start = time.perf_counter()
        for i, (x, y) in enumerate(batches(xtr, ytr, args.batch, gen, args.max_steps), 1):
            x, y = to_dev(x, y)
            if not first:
                before = params(plain)
            losses = {}
            for r in runners:
                if r.jitter and not first:  # the twins' update noise: plain's own error
                    _sgd_step(ref, x, y, args.lr)
                    first = first_update(before, runners[0].model, runners[1].model, ref,
                                         amp or torch.float32)
                    for t in runners[2:]:
                        t.update_noise = first["plain_l2"]
                losses[r.name] = r.step(x, y)
            if not first:  # no twins
                _sgd_step(ref, x, y, args.lr)
                first = first_update(before, runners[0].model, runners[1].model, ref,
                                     amp or torch.float32)
            progress(epoch, args.epochs, i, steps_per_epoch, losses, start)
        sys.stderr.write("\n")
        row = {r.name: r.epoch_row(r.accuracy(test_data)) for r in runners}
        row["epoch"] = epoch
        twins = [row[r.name] for r in runners[2:]]
        if twins:
            row["agreement"] = agreement(row["plain"], row["fused"], twins, len(yte),
                                         n_tests=2 * args.epochs)
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
               "first_update": first,
               "agree": first.get("ok", True) and all(verdicts),
               "rule": {"alpha": ALPHA, "twins": args.twins, "update_factor": UPDATE_FACTOR,
                        "loss_floor_rel": LOSS_FLOOR, "acc_floor_abs": ACC_FLOOR,
                        "twin_eps": eps},
               "step_losses": {r.name: r.step_losses for r in runners}}
    _write_metrics(out, summary, rows, runners)
    plot(os.path.join(out, "curves.png"), runners, rows,
         f"ResNet-18 plain vs fused ({args.backend}), {source.split(' (')[0]}, {args.dtype}")
    _print_verdict(rows, verdicts, args.dtype, first)
    print(f"wrote {out}/metrics.json, metrics.csv, curves.png")
    return 1 if args.check and not summary["agree"] else 0


def _sgd_step(model, x, y, lr: float) -> None:
    """One plain SGD step of `model` (the float64 reference) on the batch, as Runner does."""
    model.train()
    p = next(model.parameters())
    loss = F.cross_entropy(model(x.to(p.dtype)).double(), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        for q in model.parameters():
            if q.grad is not None:
                q.sub_(lr * q.grad)


if __name__ == "__main__":
    raise SystemExit(main())
