"""Output of ``python -m bench``: JSON, CSV, a printed table, a PNG of throughput against V; and
the regression check against a stored baseline (``--compare``)."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

CSV_FIELDS = ["op", "mode", "set", "case", "shape", "dtype", "provider", "status", "median_ms",
              "p20_ms", "p80_ms", "samples", "input_sets", "bytes", "flops", "GBps", "TFLOPs",
              "roofline_frac", "x_vs_torch", "x_vs_compile", "peak_bytes", "bound",
              "cost_formula"]
MACHINE_FIELDS = ["name", "device", "torch", "triton", "python", "dvae", "cuda", "date"]


def write_results(out_dir: Path, report: dict) -> dict[str, Path]:
    """results.json (everything) and results.csv (one row per op/shape/mode/provider, each
    with the machine's name, versions and date, so rows from several runs can be pooled)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str) + "\n")
    machine = report["machine"]
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + [f"machine_{k}" for k in MACHINE_FIELDS])
        w.writeheader()
        for row in report["rows"]:
            rec = {k: row.get(k) for k in CSV_FIELDS}
            rec.update({f"machine_{k}": machine.get(k) for k in MACHINE_FIELDS})
            w.writerow(rec)
    return paths


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def format_table(report: dict) -> str:
    """The results as text, one block per op and mode."""
    m, roof = report["machine"], report["roofline"]
    load0 = m["loadavg"][0] if m.get("loadavg") else None
    load1 = m["loadavg_end"][0] if m.get("loadavg_end") else None
    lines = [f"machine: {m['name']} ({m['device']}, {m['cpu_count']} cores, "
             f"{m.get('torch_threads')} torch threads, load average {_fmt(load0, '.2f')} at "
             f"start, {_fmt(load1, '.2f')} at end); torch "
             f"{m['torch']}, triton {m['triton']}, python {m['python']}, dvae {m['dvae']}; "
             f"{m['date']}",
             f"roofline (measured now): copy {roof['copy_GBps']:.1f} GB/s ({roof['copy_dtype']}), "
             f"matmul {roof['matmul_TFLOPs']:.3g} TFLOP/s ({roof['matmul_dtype']}, "
             f"n={roof['matmul_n']})"]
    groups: dict[tuple, list[dict]] = {}
    for row in report["rows"]:
        groups.setdefault((row["op"], row["mode"]), []).append(row)
    head = (f"{'case':<34} {'shape':<22} {'dtype':<8} {'provider':<16} {'median ms':>10} "
            f"{'p20-p80 ms':>17} {'GB/s':>8} {'TFLOP/s':>8} {'%roof':>6} {'x torch':>7} "
            f"{'x compile':>9} {'peak MiB':>8}")
    for (op, mode), rows in groups.items():
        lines += ["", f"== {op} [{mode}]  cost per call: {rows[0]['cost_formula']}  "
                  f"(b = bytes per logit, tb = bytes per token)", head]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"{r['case'][:34]:<34} {r['shape'][:22]:<22} {r['dtype']:<8} "
                             f"{r['provider']:<16} {r['status'][:110]}")
                continue
            frac = r.get("roofline_frac")
            peak = r.get("peak_bytes")
            lines.append(
                f"{r['case'][:34]:<34} {r['shape'][:22]:<22} {r['dtype']:<8} "
                f"{r['provider']:<16} {r['median_ms']:>10.4g} "
                f"{r['p20_ms']:>8.4g}-{r['p80_ms']:<8.4g} {_fmt(r.get('GBps'), '8.1f'):>8} "
                f"{_fmt(r.get('TFLOPs'), '8.3g'):>8} "
                f"{_fmt(None if frac is None else 100 * frac, '5.1f'):>6} "
                f"{_fmt(r.get('x_vs_torch'), '.2f'):>7} {_fmt(r.get('x_vs_compile'), '.2f'):>9} "
                f"{_fmt(None if peak is None else peak / 2**20, '.1f'):>8}")
    return "\n".join(lines)


def plot_throughput(report: dict, path: Path) -> Path | None:
    """Throughput (GB/s, or TFLOP/s for compute-bound ops) against V, one panel per op and
    mode, one line per provider, the measured roofline dashed. None without matplotlib (it
    comes with the ``train`` extra, not with the kernels-only install)."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed (pip install \"dvae[train]\"); no plot")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, dict[str, list]] = {}
    for r in report["rows"]:
        if r["status"] != "ok" or "V=" not in r["shape"]:
            continue
        V = int(re.search(r"\bV=(\d+)", r["shape"]).group(1))
        y = r["TFLOPs"] if r["bound"] == "compute" else r["GBps"]
        if y is None:
            continue
        panels.setdefault((r["op"], r["mode"], r["bound"]), {}).setdefault(
            r["provider"], []).append((V, y))
    if not panels:
        return None
    n = len(panels)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4 * rows_n), squeeze=False)
    roof = report["roofline"]
    for ax, ((op, mode, bound), lines) in zip(axes.flat, panels.items()):
        for prov, pts in sorted(lines.items()):
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ceiling = roof["matmul_TFLOPs"] if bound == "compute" else roof["copy_GBps"]
        ax.axhline(ceiling, ls="--", color="grey", label="measured roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # the roofline can sit decades above a slow provider
        ax.set_xlabel("V")
        ax.set_ylabel("TFLOP/s" if bound == "compute" else "GB/s")
        ax.set_title(f"{op} [{mode}]", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    m = report["machine"]
    fig.suptitle(f"{m['name']} - torch {m['torch']} - {m['date']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Regression check
# ---------------------------------------------------------------------------------------------

DEFAULT_TOLERANCE = 0.15


def row_key(row: dict) -> tuple:
    return (row["op"], row["mode"], row["shape"], row["dtype"], row["provider"])


@dataclass
class Comparison:
    compared: list[tuple[tuple, float, float]] = field(default_factory=list)  # key, base, new
    regressions: list[tuple[tuple, float, float]] = field(default_factory=list)
    baseline_machine: str | None = None
    machine: str | None = None

    @property
    def exit_code(self) -> int:
        """1 when a figure regressed, 2 when nothing was compared, else 0."""
        if self.regressions:
            return 1
        return 0 if self.compared else 2


def load_report(path: str | Path, names: Sequence[str] = ("baseline.json", "results.json")
                ) -> dict:
    """A results file, or a folder holding one of ``names`` (the first found)."""
    p = Path(path)
    if p.is_dir():
        for name in names:
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise FileNotFoundError(f"--compare: {path} holds none of {', '.join(names)}")
    if not p.is_file():
        raise FileNotFoundError(f"--compare: no such file {path}")
    return json.loads(p.read_text())


def compare(baseline: dict, current: dict, tolerance: float = DEFAULT_TOLERANCE, *,
            key: Callable[[dict], tuple] = row_key) -> Comparison:
    """Compare median times row by row (same op, mode, shape, dtype, provider: ``key``). A row
    regresses when its median is more than ``tolerance`` (a fraction) slower than the
    baseline's. Rows without a timing on either side are not compared."""
    if not (0 <= tolerance < 10):
        raise ValueError(f"tolerance must be a fraction in [0, 10), got {tolerance!r}")
    base = {key(r): r for r in baseline.get("rows", []) if r.get("median_ms")}
    result = Comparison(baseline_machine=baseline.get("machine", {}).get("name"),
                        machine=current.get("machine", {}).get("name"))
    for row in current.get("rows", []):
        b = base.get(key(row))
        if b is None or not row.get("median_ms"):
            continue
        entry = (key(row), b["median_ms"], row["median_ms"])
        result.compared.append(entry)
        if row["median_ms"] > b["median_ms"] * (1 + tolerance):
            result.regressions.append(entry)
    return result


def format_comparison(c: Comparison, tolerance: float, baseline_path: str) -> str:
    lines = [f"== compare with {baseline_path} (tolerance: a median more than "
             f"{100 * tolerance:.0f}% slower is a regression)"]
    if c.baseline_machine != c.machine:
        lines.append(f"warning: the baseline was measured on {c.baseline_machine!r}, this run on "
                     f"{c.machine!r}; times from different machines are not comparable")
    if not c.compared:
        lines.append("nothing was compared: no row of this run (op, mode, shape, dtype, "
                     "provider) has a timed match in the baseline")
        return "\n".join(lines)
    bad = {k for k, _, _ in c.regressions}
    for key, b, n in c.compared:
        flag = "REGRESSION" if key in bad else "ok"
        lines.append(f"{flag:<10} {'/'.join(key):<80} {b:9.4g} ms -> {n:9.4g} ms "
                     f"({100 * (n / b - 1):+.0f}%)")
    lines.append(f"{len(c.compared)} compared, {len(c.regressions)} regressed")
    return "\n".join(lines)
