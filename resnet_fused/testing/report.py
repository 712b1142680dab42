"""The result of check_model: a printable table, a dict for tooling, an assert form."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .tolerance import Comparison


@dataclass
class Row:
    backend: str
    dtype: str
    mode: str
    comparison: Comparison


def _fmt(v: float) -> str:
    return "-" if v != v else f"{v:.1e}"


@dataclass
class ModelReport:
    rows: list = field(default_factory=list)       # Row
    skipped: list = field(default_factory=list)    # (backend, dtype, mode, reason)
    notes: list = field(default_factory=list)      # what was checked, how
    problems: list = field(default_factory=list)   # failures outside the numbers
    # Per-geometry checks (check_model, by_geometry): "<block> (checked at <shape>, in the
    # model <shape>) stands for <blocks>", one line per distinct block geometry.
    geometries: list = field(default_factory=list)

    @property
    def failures(self) -> list:
        return [r for r in self.rows if not r.comparison.ok]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failures and bool(self.rows)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "notes": list(self.notes),
            "problems": list(self.problems),
            "geometries": list(self.geometries),
            "skipped": [dict(zip(("backend", "dtype", "mode", "reason"), s))
                        for s in self.skipped],
            "results": [{"backend": r.backend, "dtype": r.dtype, "mode": r.mode,
                         **asdict(r.comparison), "ratio": r.comparison.ratio}
                        for r in self.rows],
        }

    def _shown(self, verbose: bool) -> list:
        """Every row when verbose; else per backend/dtype/mode the output and input
        gradient, the worst parameter gradient and the worst buffer (with how many
        there were), and every failure."""
        if verbose:
            return [(r, "") for r in self.rows]
        shown, groups = [], {}
        for r in self.rows:
            key = (r.backend, r.dtype, r.mode)
            kind = r.comparison.name.split(" ")[0]
            if kind in ("grad", "buffer") and not r.comparison.name.startswith("grad input"):
                groups.setdefault(key + (kind,), []).append(r)
                if not r.comparison.ok:
                    shown.append((r, ""))
            else:
                shown.append((r, ""))
        for (_, _, _, kind), rs in groups.items():
            worst = max(rs, key=lambda r: r.comparison.ratio)
            if worst.comparison.ok:
                label = "parameter gradients" if kind == "grad" else "buffers"
                shown.append((worst, f"{len(rs)} {label}, worst: "))
        order = {id(r): i for i, r in enumerate(self.rows)}
        return sorted(shown, key=lambda t: order[id(t[0])])

    def table(self, verbose: bool = False) -> str:
        n_fail = len(self.failures) + len(self.problems)
        head = "PASS" if self.ok else f"FAIL ({n_fail} problem(s))"
        lines = [f"resnet_fused.testing.check_model: {head}"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  FAIL: {p}" for p in self.problems]
        lines += [f"  geometry: {g}" for g in self.geometries]
        cols = ("backend", "dtype", "mode", "quantity", "fused err L2/max",
                "plain err L2/max", "of bound", "verdict")
        body = []
        for r, prefix in self._shown(verbose):
            c = r.comparison
            verdict = "ok" if c.ok else ("FAIL: " + c.problem if c.problem else "FAIL")
            ratio = "-" if c.problem else f"{c.ratio:.2f}"
            body.append((r.backend, r.dtype, r.mode, prefix + c.name,
                         f"{_fmt(c.fused_l2)} / {_fmt(c.fused_max)}",
                         f"{_fmt(c.plain_l2)} / {_fmt(c.plain_max)}", ratio, verdict))
        body += [(b, d, m, "skipped", "", "", "", reason) for b, d, m, reason in self.skipped]
        if body:
            widths = [max(len(str(x)) for x in col) for col in zip(cols, *body)]
            for row in [cols] + body:
                lines.append("  " + "  ".join(str(x).ljust(w) for x, w in
                                              zip(row, widths)).rstrip())
        lines.append("  (rule: fused error <= 2x (outputs, buffers) or 3x (gradients) the "
                     "plain model's error in the same dtype, against float64, plus a floor; "
                     "in training the plain error is its worst at the input and at copies "
                     "perturbed by a few ulps, and a fused error over the bound there is "
                     "judged again at those copies ('at probe k'); 'of bound' <= 1 passes)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def assert_ok(self) -> None:
        """AssertionError whose message is the table (every row) when anything failed."""
        if not self.ok:
            raise AssertionError("\n" + self.table())
