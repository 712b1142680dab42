#!/usr/bin/env python
"""Benchmark result files -> markdown tables and a speedup plot (for the README).

    python bench/make_tables.py bench/results/nvidia-h200            # prints markdown
    python bench/make_tables.py RESULTS.json --md out.md --png out.png

Inputs are results.json files written by bench/run.py, or folders holding one.
bench/run.py uses the same functions for its own results.md / speedup.png / summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

PROVIDER_ORDER = ["eager_fp32", "eager", "compile", "cudnn_fused",
                  "fused_torch", "fused_native", "fused_triton"]
LABEL = {"eager_fp32": "eager fp32 NCHW", "eager": "eager", "compile": "compile",
         "cudnn_fused": "cuDNN fused", "fused_torch": "fused torch",
         "fused_native": "fused native", "fused_triton": "fused triton"}


def _f(v, digits=3):
    if v in (None, ""):
        return ""
    v = float(v)
    if v != v:
        return "nan"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    if abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.{digits}g}"


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _ordered(providers):
    return sorted(providers, key=lambda p: (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER
                                            else len(PROVIDER_ORDER), p))


def load(paths) -> tuple[list, dict, list]:
    """Rows, env (of the first file) and skip lines of results.json files or folders."""
    rows, env, skips = [], {}, []
    for p in paths:
        if os.path.isdir(p):
            p = os.path.join(p, "results.json")
        with open(p) as f:
            d = json.load(f)
        rows += d["rows"]
        env = env or d.get("env", {})
        skips += d.get("skipped", [])
    return rows, env, skips


def _timing(rows, section):
    """{mode: {x_value: {provider: row}}} of OK timing rows of a section, in row order."""
    out: dict = OrderedDict()
    for r in rows:
        if r.get("section") != section or r.get("metric") != "time" or r.get("status") != "OK":
            continue
        # Networks: one row per network and batch (ResNet-18 and ResNet-50 may share a
        # batch on the CPU).
        x = f"{r['kernel']} n={r['x_value']}" if section == "net" else str(r["x_value"])
        out.setdefault(r["mode"], OrderedDict()).setdefault(x, {})[r["provider"]] = r
    return out


def _best_fused(provs: dict):
    fused = [(float(r["p50"]), p) for p, r in provs.items() if p.startswith("fused_")]
    return min(fused) if fused else None


def header(env) -> str:
    where = env.get("gpu", "?")
    parts = [f"torch {env.get('torch', '?')}", f"triton {env.get('triton', '?')}",
             f"resnet_fused {env.get('package_version', '?')}",
             (env.get("timestamp") or "")[:10]]
    if env.get("device") == "cuda":
        parts.insert(0, f"CUDA {env.get('cuda', '?')}, cuDNN {env.get('cudnn', '?')}")
    s = f"**{where}**, " + ", ".join(parts)
    dt = env.get("bench_dtype")
    if dt:
        s += f"; timed dtype {dt}" + (" channels_last" if env.get("device") == "cuda" else "")
    if env.get("peak_tflops"):
        s += f"; compute floor at {env['peak_tflops']} TFLOP/s ({env.get('peak_source', '')})"
    if env.get("device") != "cuda":
        s += ".\n\nCPU: GPU figures need CUDA. These are small CPU shapes; they show that " \
             "every path runs, not what a GPU gains"
    return s + "."


def timing_table(rows, section, title, x_label) -> str:
    data = _timing(rows, section)
    if not data:
        return ""
    out = []
    for mode, by_x in data.items():
        provs = _ordered({p for d in by_x.values() for p in d})
        out.append(f"\n#### {title}, {'training forward+backward' if mode == 'train' else mode}"
                   f" (ms, median; in brackets the speedup over eager in the same dtype)\n")
        cols = [x_label] + [LABEL.get(p, p) for p in provs] + [
            "best fused vs eager", "vs compile", "TFLOP/s", "of peak"]
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        base = "eager" if "eager" in provs else "eager_fp32"
        for x, d in by_x.items():
            any_row = next(iter(d.values()))
            cells = [x if section != "net" else f"{x} ({any_row.get('shape', '')})"]
            for p in provs:
                r = d.get(p)
                if r is None:
                    cells.append("-")
                    continue
                sp = _num(r.get("speedup_vs_eager"))
                cells.append(_f(r["p50"]) + (f" ({sp:.2f}x)" if sp and p != base else ""))
            best = _best_fused(d)
            if best:
                r = d[best[1]]
                se, sc = _num(r.get("speedup_vs_eager")), _num(r.get("speedup_vs_compile"))
                cells += [f"{_f(se)}x {best[1][6:]}" if se else best[1][6:],
                          f"{_f(sc)}x" if sc else "-", _f(r.get("tflops")),
                          f"{100 * float(r['of_peak']):.0f}%" if _num(r.get("of_peak")) else "-"]
            else:
                cells += ["-"] * 4
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def numerics_table(rows) -> str:
    num = [r for r in rows if r.get("section") == "numerics" and r.get("metric") in
           ("rel_l2", "max_abs_rel")]
    if not num:
        return ""
    groups: dict = OrderedDict()
    for r in num:
        k = (r["provider"], r["dtype"], r["mode"], r["shape"], r["quantity"])
        groups.setdefault(k, {})[r["metric"]] = r
    out = ["\n#### Numerics: error against float64 (relative L2 / max-abs over max |ref|), "
           "fused next to the plain block in the same dtype; verdict by tests/tolerance.py "
           "(2x plain + floor for outputs and running statistics, 3x for gradients)\n",
           "| backend | dtype | mode | shape | quantity | fused rel L2 | plain rel L2 | "
           "fused max-abs | plain max-abs | verdict |", "|" + "---|" * 10]
    for (prov, dt, mode, shape, q), m in groups.items():
        a, b = m.get("rel_l2", {}), m.get("max_abs_rel", {})
        status = a.get("status") or b.get("status")
        note = a.get("note", "")
        if "worst:" in note:
            q = f"{q} ({note.split('worst:')[1].split(';')[0].strip()})"
        out.append(f"| {prov[6:] if prov.startswith('fused_') else prov} | {dt} | {mode} | "
                   f"{shape} | {q} | {_f(a.get('p50'))} | {_f(a.get('plain'))} | "
                   f"{_f(b.get('p50'))} | {_f(b.get('plain'))} | **{status}** |")
    return "\n".join(out) + "\n"


def kernels_table(rows) -> str:
    ks = [r for r in rows if r.get("section") == "kernels" and r.get("status") == "OK"]
    if not ks:
        return ""
    out = ["\n#### Fused ops, one call each (ms, median; GB/s counts each tensor read or "
           "written once)\n",
           "| backend | op | shape | dtype | ms | GB/s | of copy bw | TFLOP/s | of peak |",
           "|" + "---|" * 9]
    for r in ks:
        ob, op = _num(r.get("of_bw")), _num(r.get("of_peak"))
        out.append(f"| {r['provider'][6:]} | {r['kernel']} | {r['shape']} | {r['dtype']} | "
                   f"{_f(r['p50'])} | {_f(r.get('gbps'))} | {f'{100 * ob:.0f}%' if ob else '-'} | "
                   f"{_f(r.get('tflops'))} | {f'{100 * op:.0f}%' if op else '-'} |")
    return "\n".join(out) + "\n"


def overhead_rows(rows) -> dict:
    """{mode: {provider: row}} of the OK rows of the host-overhead section."""
    out: dict = OrderedDict()
    for r in rows:
        if r.get("section") == "overhead" and r.get("status") == "OK":
            out.setdefault(r["mode"], OrderedDict())[r["provider"]] = r
    return out


def overhead_table(rows) -> str:
    data = overhead_rows(rows)
    if not data:
        return ""
    any_row = next(iter(next(iter(data.values())).values()))
    out = [f"\n#### Host overhead per call (us; block {any_row.get('shape')}, batch "
           f"{any_row.get('batch')}, {any_row.get('dtype')}; module_<b> = FusedResidual minus "
           "its backend's ops called directly; *_alone: timed without kernels, "
           "bench/overhead.py)\n",
           "| mode | provider | p50 | p20 | p80 | in one-op dispatches |", "|" + "---|" * 6]
    for mode, provs in data.items():
        for p, r in provs.items():
            one = _num(provs.get("one_op_alone" if "alone" in p else "one_op", {}).get("p50"))
            p50 = _num(r.get("p50"))
            ops = f"{p50 / one:.1f}" if one and p50 is not None else "-"
            out.append(f"| {mode} | {p} | {_f(r['p50'])} | {_f(r.get('p20'))} | "
                       f"{_f(r.get('p80'))} | {ops} |")
    return "\n".join(out) + "\n"


def net_table(rows) -> str:
    data = _timing(rows, "net")
    if not data:
        return ""
    out = ["\n#### Whole networks: the D2L ResNet-18 and torchvision's ResNet-50 (images/s)\n",
           "| mode | network | provider | dtype | batch | input | ms | images/s | vs eager "
           "| vs eager fp32 | vs compile |", "|" + "---|" * 11]
    for mode, by_x in data.items():
        for x, d in by_x.items():
            for p in _ordered(d):
                r = d[p]
                out.append(f"| {mode} | {r['kernel']} | {LABEL.get(p, p)} | "
                           f"{r['dtype']} {r['layout']} | "
                           f"{r['batch']} | {r['shape']} | {_f(r['p50'])} | {_f(r.get('img_s'))} | "
                           + " | ".join(f"{_f(r.get(k))}x" if _num(r.get(k)) else "-" for k in
                                        ("speedup_vs_eager", "speedup_vs_fp32",
                                         "speedup_vs_compile")) + " |")
    return "\n".join(out) + "\n"


def markdown(rows, env, skips=()) -> str:
    parts = [f"### Benchmark results\n\n{header(env)}\n",
             timing_table(rows, "block", "Residual block at the ResNet-18 stage shapes "
                          "(cin-cout-h-w-stride, batch " + _batch(rows) + ")", "shape"),
             timing_table(rows, "bottleneck", "Bottleneck block at the ResNet-50 stage shapes "
                          "(b-cin-width-cout-h-w-stride, batch "
                          + _batch(rows, "bottleneck") + ")", "shape"),
             timing_table(rows, "gated", "SE-ResNet-50 / ResNet-50-D blocks (timm's "
                          "Bottleneck with an SE gate or the avg-pool shortcut; batch "
                          + _batch(rows, "gated") + ")", "block"),
             timing_table(rows, "sweep", "Batch sweep", "batch"),
             overhead_table(rows), net_table(rows), kernels_table(rows), numerics_table(rows)]
    if skips:
        parts.append("\n#### Skipped\n\n" + "\n".join(f"- {s}" for s in skips) + "\n")
    return "\n".join(p for p in parts if p)


def _batch(rows, section="block") -> str:
    bs = sorted({str(r.get("batch")) for r in rows if r.get("section") == section})
    return "/".join(bs) or "?"


def plot_speedup(rows, env, path) -> bool:
    """Bar chart: speedup over eager (same dtype) per shape and provider, one panel per
    mode, plus the whole network. Returns False when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for section in ("block", "bottleneck", "gated", "net"):
        for mode, by_x in _timing(rows, section).items():
            panels.append((section, mode, by_x))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 4.2), squeeze=False)
    # One colour per provider across every panel, and one legend listing them all (a
    # panel may lack a provider, e.g. compile in training on CPU).
    every = [p for p in _ordered({p for _, _, by_x in panels for d in by_x.values() for p in d})
             if p != "eager"]
    colour = {p: f"C{i % 10}" for i, p in enumerate(every)}
    for ax, (section, mode, by_x) in zip(axes[0], panels):
        provs = [p for p in every if any(p in d for d in by_x.values())]
        xs = list(by_x)
        width = 0.8 / max(len(provs), 1)
        for i, p in enumerate(provs):
            vals = [_num(by_x[x].get(p, {}).get("speedup_vs_eager")) or 0.0 for x in xs]
            ax.bar([j + (i - (len(provs) - 1) / 2) * width for j in range(len(xs))], vals,
                   width, color=colour[p])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{'network' if section == 'net' else section}, {mode}", fontsize=10)
        ax.set_ylabel("speedup over eager (same dtype)")
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[p]) for p in every]
    axes[0][-1].legend(handles, [LABEL.get(p, p) for p in every], fontsize=7,
                       loc="upper left", bbox_to_anchor=(1.0, 1.0))
    title = f"{env.get('gpu', '?')}, {env.get('bench_dtype', '')}, torch {env.get('torch', '')}, " \
            f"triton {env.get('triton', '')}, {(env.get('timestamp') or '')[:10]}"
    if env.get("device") != "cuda":
        title = "CPU: GPU figures need CUDA. " + title
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary_text(rows, env, skips=(), errors=()) -> str:
    """The short table printed last by bench/run.py."""
    lines = [f"=== summary: {env.get('gpu', '?')}, {env.get('bench_dtype', '')}"
             f"{' channels_last' if env.get('device') == 'cuda' else ''}, torch "
             f"{env.get('torch', '')}, triton {env.get('triton', '')} ==="]
    if env.get("device") != "cuda":
        lines.append("CPU: GPU figures need CUDA (small CPU shapes; timings say nothing "
                     "about a GPU)")
    num = [r for r in rows if r.get("section") == "numerics" and r.get("metric") == "rel_l2"]
    if num:
        per: dict = OrderedDict()
        for r in num:
            c = per.setdefault(r["provider"], {"PASS": 0, "FAIL": 0, "ERROR": 0})
            c[r["status"]] = c.get(r["status"], 0) + 1
        lines.append("numerics vs float64: " + "; ".join(
            f"{p}: {c['PASS']} pass, {c['FAIL']} fail" + (f", {c['ERROR']} error" if c["ERROR"]
                                                          else "") for p, c in per.items()))
        for r in num:
            if r["status"] != "PASS":
                lines.append(f"  {r['status']}: {r['provider']} {r['dtype']} {r['mode']} "
                             f"{r['shape']} {r['quantity']}: {r.get('note', '')[:160]}")
    for section in ("block", "bottleneck", "gated", "sweep", "net"):
        data = _timing(rows, section)
        if not data:
            continue
        lines.append(f"{section[:6]:<6}{'mode':<6}{'x':<24}{'eager':>9}{'compile':>9}{'cudnn':>9}"
                     f"   {'best fused':<21}{'vs eager':>9}{'vs comp':>9}")
        for mode, by_x in data.items():
            for x, d in by_x.items():
                eager = d.get("eager", d.get("eager_fp32"))
                best = _best_fused(d)
                bs = f"{best[1][6:]} {best[0]:.4f}" if best else "-"
                r = d[best[1]] if best else {}
                lines.append(
                    f"{'':<6}{mode:<6}{x:<24}"
                    + "".join(f"{float(v['p50']):9.4f}" if v else f"{'-':>9}"
                              for v in (eager, d.get("compile"), d.get("cudnn_fused")))
                    + f"   {bs:<21}"
                    + "".join(f"{float(r[k]):8.2f}x" if _num(r.get(k)) else f"{'-':>9}"
                              for k in ("speedup_vs_eager", "speedup_vs_compile"))
                    + ("" if eager else "  (no eager)"))
        if section == "net":
            for mode, by_x in data.items():
                for x, d in by_x.items():
                    lines.append(f"      {x} {mode} img/s: " + ", ".join(
                        f"{p} {float(r['img_s']):.0f}" for p, r in
                        ((p, d[p]) for p in _ordered(d)) if _num(r.get("img_s"))))
    for mode, provs in overhead_rows(rows).items():
        lines.append(f"overhead {mode} (host us/call, p50): " + ", ".join(
            f"{p} {float(r['p50']):.1f}" for p, r in provs.items()))
    if skips:
        lines.append(f"skipped ({len(skips)}): " + " | ".join(skips)[:1200])
    if errors:
        lines.append(f"ERRORS ({len(errors)}): " + " | ".join(errors)[:1200])
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="results.json files or folders holding one")
    p.add_argument("--md", help="write the markdown here (default: print it)")
    p.add_argument("--png", help="write the speedup plot here")
    a = p.parse_args(argv)
    rows, env, skips = load(a.inputs)
    md = markdown(rows, env, skips)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    else:
        print(md)
    if a.png:
        if not plot_speedup(rows, env, a.png):
            print("no timing rows to plot", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
