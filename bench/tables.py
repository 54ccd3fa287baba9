"""The results tables: measurements (and predictions) kept as rows, one CSV per kind.

    python -m bench.tables record PATH [PATH ...] [--note TEXT] [--commit REV]
    python -m bench.tables show TABLE [--last N] [--where KEY=VALUE ...]
    python -m bench.tables plot [--out DIR]

Every benchmark command writes its full output where ``--out`` says (JSON, CSV, logs, SASS:
regenerable, ignored by git). ``record`` reads such an output, keeps the figures that matter
as rows and appends them to ``bench/results/<table>.csv``, each row stamped with the date, the
commit the code was at (``-dirty`` when the working tree had changes), the machine (GPU name
on a GPU, else the CPU's) and the torch and triton versions. The tables only grow: a new
measurement is a new row, never an edit of an old one. ``plot`` draws each table's rows over
commits, one PNG per table.

What ``record`` recognises (by file name, or a folder holding one):

==============================  ===========  ==================================================
file                            table        written by
==============================  ===========  ==================================================
``results.json``                microbench   ``python -m bench``, ``python -m bench.cpu_native``
``e2e.json``                    e2e          ``python -m bench.e2e``
``ab.json``                     ab           ``python -m bench.ab``
``memory.json``                 memory       ``python -m bench.memory``
``static.json``                 static       ``python -m bench.static`` (predictions)
``gpu_model*.json``             gpu_model    ``python -m bench.gpu_model --json`` (predictions)
``result.json``                 replication  ``python -m bench.replicate`` (and ``generation``,
                                             with ``--prior-minutes``)
==============================  ===========  ==================================================
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

#: Columns every row starts with.
STAMP = ["date", "commit", "machine", "device", "torch", "triton", "note"]

#: Each table's own columns, in order.
TABLES: dict[str, list[str]] = {
    "microbench": ["op", "mode", "set", "case", "shape", "dtype", "provider", "status",
                   "median_ms", "p20_ms", "p80_ms", "gbps", "tflops", "roofline_frac",
                   "x_vs_torch", "x_vs_compile", "peak_mib", "threads"],
    "e2e": ["preset", "batch_size", "K", "provider", "kernel_backend", "compile", "status",
            "median_ms", "p20_ms", "p80_ms", "images_per_s", "x_vs_torch", "sample_ms",
            "reward_ms", "teacher_forced_ms", "weights_ms", "losses_ms", "optimizer_ms",
            "loop_ms", "loop_over_step", "threads"],
    "ab": ["preset", "batch_size", "provider", "base_commit", "rounds", "base_ms", "new_ms",
           "new_over_base"],
    "memory": ["provider", "N", "D", "V", "status", "extra_mib", "seconds"],
    "static": ["op", "phase", "kernel", "arch", "shape", "regs", "spills", "smem_bytes",
               "ctas_per_sm", "atomics", "instr_per_warp", "gb_moved", "gb_min", "bound",
               "h100_ms", "h100_frac", "h200_ms", "h200_frac"],
    "gpu_model": ["preset", "gpu", "overrides", "launches", "ms_eager", "ms_graphed",
                  "ms_sampler_graphed", "ms_bytes_bound", "sampler_launches_per_position",
                  "gpu_hours_sampler_graphed", "sample_ms", "reward_ms", "teacher_forced_ms",
                  "weights_ms", "losses_ms", "optimizer_ms"],
    "generation": ["method", "preset", "bits", "minutes", "steps", "test_psnr",
                   "prior_minutes", "prior_steps", "prior_ms_per_step", "prior_loss",
                   "guidance", "generated", "fd", "fd_data", "fd_recon", "fid", "fid_data",
                   "fid_recon", "precision", "recall", "label_accuracy",
                   "classifier_test_accuracy", "threads", "overrides"],
    "replication": ["method", "preset", "bits", "minutes", "steps", "train_seconds",
                    "ms_per_step", "test_psnr", "test_ssim", "test_beta_elbo", "test_log_px",
                    "test_kl", "codebook_usage", "perplexity", "threads", "overrides"],
}

PHASES = ("sample", "reward", "teacher_forced", "weights", "losses", "optimizer")


# ---------------------------------------------------------------------------------------------
# Stamps
# ---------------------------------------------------------------------------------------------


def current_commit(root: Path = ROOT) -> str:
    """The short commit of ``root``'s checkout, with ``-dirty`` when tracked files outside
    ``bench/results/`` differ from it."""
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=7", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        # the tables themselves do not make the code measured dirty
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no", "--", ".", ":!bench/results"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def stamp(machine: dict, commit: str, note: str = "") -> dict:
    """The leading columns of a row from a result file's machine record."""
    name = machine.get("gpu") or machine.get("name") or machine.get("cpu") or "unknown"
    device = machine.get("device") or ("cuda" if machine.get("gpu") else "cpu")
    date = machine.get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat(
        timespec="seconds")
    return {"date": date, "commit": commit, "machine": name, "device": device,
            "torch": machine.get("torch"), "triton": machine.get("triton"), "note": note}


def _phase_ms(phases: dict | None) -> dict:
    return {f"{p}_ms": (phases or {}).get(p) for p in PHASES}


# ---------------------------------------------------------------------------------------------
# Readers: one result file -> (table, rows)
# ---------------------------------------------------------------------------------------------


def _microbench(doc: dict) -> list[dict]:
    threads = doc["machine"].get("torch_threads")
    out = []
    for r in doc["rows"]:
        peak = r.get("peak_bytes")
        out.append({**{k: r.get(k) for k in ("op", "mode", "set", "case", "shape", "dtype",
                                             "provider", "status", "median_ms", "p20_ms",
                                             "p80_ms", "roofline_frac", "x_vs_torch",
                                             "x_vs_compile")},
                    "gbps": r.get("GBps"), "tflops": r.get("TFLOPs"),
                    "peak_mib": peak / 2**20 if peak is not None else None,
                    "threads": threads})
    return out


def _e2e(doc: dict) -> list[dict]:
    threads = doc["machine"].get("torch_threads")
    loops = {(lp.get("preset"), lp.get("batch_size"), lp.get("K")): lp
             for lp in doc.get("loop", [])}
    out = []
    for r in doc["rows"]:
        lp = loops.get((r.get("preset"), r.get("batch_size"), r.get("K")), {})
        fused = r.get("provider") == "fused"  # the trainer's loop runs the default path
        out.append({**{k: r.get(k) for k in ("preset", "batch_size", "K", "provider",
                                             "kernel_backend", "compile", "status",
                                             "median_ms", "p20_ms", "p80_ms", "images_per_s",
                                             "x_vs_torch")},
                    **_phase_ms(r.get("phases_ms")),
                    "loop_ms": lp.get("loop_ms") if fused else None,
                    "loop_over_step": lp.get("loop_over_step") if fused else None,
                    "threads": threads})
    for key, lp in loops.items():  # a loop measured without a matching step row
        if not any((r.get("preset"), r.get("batch_size"), r.get("K")) == key
                   for r in doc["rows"]):
            out.append({"preset": key[0], "batch_size": key[1], "K": key[2],
                        "provider": "trainer", "status": lp.get("status"),
                        "median_ms": lp.get("step_ms"), "loop_ms": lp.get("loop_ms"),
                        "loop_over_step": lp.get("loop_over_step"), "threads": threads})
    return out


def _ab(doc: dict) -> list[dict]:
    base = doc.get("base_commit") or doc.get("base")
    return [{"preset": r["preset"], "batch_size": r["batch_size"], "provider": r["provider"],
             "base_commit": base, "rounds": len(r.get("new_rounds_ms", [])),
             "base_ms": r["base_ms"], "new_ms": r["new_ms"],
             "new_over_base": r["new_over_base"]} for r in doc["rows"]]


def _memory(doc: dict) -> list[dict]:
    out = []
    for r in doc["rows"]:
        extra = r.get("extra_bytes")
        out.append({"provider": r["provider"], "N": r["N"], "D": r["D"], "V": r["V"],
                    "status": r.get("skipped") and f"skipped: {r['skipped']}" or "ok",
                    "extra_mib": extra / 2**20 if extra is not None else None,
                    "seconds": r.get("seconds")})
    return out


def _shape(shape: dict | None) -> str:
    if not shape:
        return ""
    return ",".join(f"{k}={v}" for k, v in shape.items())


def _static(records: list[dict]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["op"], r["phase"], r["kernel"], r["arch"], _shape(r.get("shape")))
        row = rows.setdefault(key, {
            "op": r["op"], "phase": r["phase"], "kernel": r["kernel"], "arch": r["arch"],
            "shape": key[-1], "regs": r.get("regs"), "spills": r.get("spills"),
            "smem_bytes": r.get("smem_bytes"), "ctas_per_sm": r.get("ctas_per_sm"),
            "atomics": r.get("atomics"),
            "instr_per_warp": sum((r.get("dynamic_per_warp") or {}).values()) or None,
            "gb_moved": r["bytes_moved"] / 1e9 if r.get("bytes_moved") is not None else None,
            "gb_min": r["bytes_min"] / 1e9 if r.get("bytes_min") is not None else None,
            "bound": r.get("bound")})
        gpu = (r.get("gpu") or "").lower()
        if gpu in ("h100", "h200"):
            row[f"{gpu}_ms"] = r.get("predicted_ms")
            row[f"{gpu}_frac"] = r.get("roofline_fraction")
            if gpu == "h100":
                row["bound"] = r.get("bound")
    return list(rows.values())


def _gpu_model(doc: dict) -> list[dict]:
    graphed = {name: p.get("ms_graphed") for name, p in (doc.get("phases") or {}).items()}
    return [{"preset": doc["preset"], "gpu": doc["gpu"],
             "overrides": " ".join(doc.get("overrides") or []),
             "launches": doc.get("launches_per_step"), "ms_eager": doc.get("total_ms_eager"),
             "ms_graphed": doc.get("total_ms_graphed"),
             "ms_sampler_graphed": doc.get("total_ms_sampler_graphed"),
             "ms_bytes_bound": doc.get("total_ms_bytes_bound"),
             "sampler_launches_per_position": doc.get("sampler_launches_per_position"),
             "gpu_hours_sampler_graphed": doc.get("gpu_hours_sampler_graphed"),
             **{f"{p}_ms": graphed.get(p) for p in PHASES}}]


def _replication(doc: dict) -> list[dict]:
    return [{"method": doc["method"], "preset": doc["preset"],
             "bits": doc.get("bits_per_image"), "minutes": doc.get("budget_minutes"),
             "steps": doc.get("steps"), "train_seconds": doc.get("train_seconds"),
             "ms_per_step": doc.get("ms_per_step"), "test_psnr": doc.get("test_psnr"),
             "test_ssim": doc.get("test_ssim"), "test_beta_elbo": doc.get("test_beta_elbo"),
             "test_log_px": doc.get("test_log_px"), "test_kl": doc.get("test_kl"),
             "codebook_usage": doc.get("test_codebook_usage"),
             "perplexity": doc.get("test_perplexity"), "threads": doc.get("threads"),
             "overrides": " ".join(doc.get("overrides") or [])}]


def _generation(doc: dict) -> list[dict]:
    prior = doc["prior"]
    return [{"method": doc["method"], "preset": doc["preset"],
             "bits": doc.get("bits_per_image"), "minutes": doc.get("budget_minutes"),
             "steps": doc.get("steps"), "test_psnr": doc.get("test_psnr"),
             "prior_minutes": prior.get("budget_minutes"), "prior_steps": prior.get("steps"),
             "prior_ms_per_step": prior.get("ms_per_step"),
             "prior_loss": prior.get("test_loss"), "guidance": prior.get("test_guidance"),
             "generated": prior.get("test_generated"),
             **{k: prior.get(f"test_{k}") for k in (
                 "fd", "fd_data", "fd_recon", "fid", "fid_data", "fid_recon", "precision",
                 "recall", "label_accuracy", "classifier_test_accuracy")},
             "threads": doc.get("threads"),
             "overrides": " ".join([*(doc.get("overrides") or []),
                                    *(f"prior:{o}" for o in prior.get("overrides") or [])])}]


def _machine_of(doc) -> dict:
    if isinstance(doc, dict) and isinstance(doc.get("machine"), dict):
        return doc["machine"]
    return {}


def read(path: Path) -> tuple[str, dict, list[dict]]:
    """(table, machine record, rows) of one result file."""
    doc = json.loads(path.read_text())
    name = path.name
    if name == "static.json":
        return "static", {}, _static(doc)
    if name.startswith("gpu_model") or (isinstance(doc, dict) and "launches_per_step" in doc):
        return "gpu_model", {}, _gpu_model(doc)
    readers = {"results.json": ("microbench", _microbench), "e2e.json": ("e2e", _e2e),
               "ab.json": ("ab", _ab), "memory.json": ("memory", _memory),
               "result.json": ("replication", _replication)}
    if name not in readers:
        raise ValueError(f"{path}: not a result file this command knows (expected one of "
                         f"{', '.join(sorted(readers))}, static.json or gpu_model*.json)")
    table, reader = readers[name]
    return table, _machine_of(doc), reader(doc)


def result_files(path: Path) -> list[Path]:
    """``path`` itself, or the result files directly inside a folder."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    known = ("results.json", "e2e.json", "ab.json", "memory.json", "static.json",
             "result.json")
    found = [p for p in sorted(path.iterdir())
             if p.name in known or (p.name.startswith("gpu_model") and p.suffix == ".json")]
    if not found:
        raise ValueError(f"{path}: holds no result file ({', '.join(known)}, gpu_model*.json)")
    return found


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------


def table_path(table: str, results: Path | None = None) -> Path:
    return (results or RESULTS) / f"{table}.csv"


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def append(table: str, rows: Iterable[dict], results: Path | None = None) -> int:
    """Append ``rows`` (each a stamp plus the table's columns) to ``table``'s CSV; returns how
    many were written. A file's header is written once, with the file."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {', '.join(TABLES)}")
    columns = STAMP + TABLES[table]
    path = table_path(table, results)
    rows = list(rows)
    for r in rows:
        extra = set(r) - set(columns)
        if extra:
            raise ValueError(f"{table}: unknown columns {sorted(extra)}")
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != columns:
            raise ValueError(f"{path}: its header is not this table's columns; a schema change "
                             f"needs a new table, not a rewrite of the old one")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(columns)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in columns])
    return len(rows)


def read_all(path: Path) -> list[tuple[str, dict, list[dict]]]:
    """Every (table, machine record, rows) of one result file: :func:`read`'s, and the
    ``generation`` row of a replication that trained a prior."""
    out = [read(path)]
    if out[0][0] == "replication":
        doc = json.loads(path.read_text())
        if isinstance(doc.get("prior"), dict):
            out.append(("generation", _machine_of(doc), _generation(doc)))
    return out


def record(paths: Sequence[Path], *, note: str = "", commit: str | None = None,
           results: Path | None = None) -> dict[str, int]:
    """Read every result file in ``paths`` and append its rows; returns rows per table."""
    commit = commit or current_commit()
    counts: dict[str, int] = {}
    for p in paths:
        for table, machine, rows in (t for f in result_files(Path(p)) for t in read_all(f)):
            if table in ("static", "gpu_model"):  # predictions: made on this machine
                import torch

                from .machine import machine_info

                machine = machine_info(torch.device("cpu"))
            head = stamp(machine, commit, note)
            counts[table] = counts.get(table, 0) + append(
                table, [{**head, **r} for r in rows], results)
    return counts


def load(table: str, results: Path | None = None) -> list[dict]:
    path = table_path(table, results)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Show and plot
# ---------------------------------------------------------------------------------------------

# What to draw per table: (value column, the columns that name a series).
PLOTS = {
    "microbench": ("roofline_frac", ("op", "mode", "shape", "provider", "machine")),
    "e2e": ("median_ms", ("preset", "batch_size", "provider", "machine")),
    "ab": ("new_over_base", ("preset", "provider", "machine")),
    "memory": ("extra_mib", ("provider", "V", "machine")),
    "static": ("h100_ms", ("op", "phase", "kernel", "shape")),
    "gpu_model": ("ms_sampler_graphed", ("preset", "gpu", "overrides")),
    "replication": ("test_psnr", ("preset", "method", "minutes", "machine")),
    "generation": ("fd", ("preset", "method", "minutes", "prior_minutes", "machine")),
}


def show(table: str, last: int | None = None, where: Sequence[str] = (),
         results: Path | None = None) -> str:
    rows = load(table, results)
    for cond in where:
        key, _, value = cond.partition("=")
        rows = [r for r in rows if r.get(key) == value]
    if last:
        rows = rows[-last:]
    if not rows:
        return f"{table}: no rows"
    cols = [c for c in STAMP[:3] + TABLES[table] if any(r.get(c) for r in rows)]
    widths = [max(len(c), *(len(r.get(c) or "") for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join((r.get(c) or "").ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def plot(out: Path, tables: Sequence[str] | None = None, results: Path | None = None
         ) -> list[Path]:
    """One PNG per table: its value column per series, against the commits in the order of
    their rows' dates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables or TABLES:
        rows = sorted(load(table, results), key=lambda r: r.get("date") or "")
        value, series_keys = PLOTS[table]
        series: dict[tuple, list[tuple[int, float]]] = {}
        commits: list[str] = []
        for r in rows:
            if r.get("commit") not in commits:
                commits.append(r.get("commit"))
            try:
                y = float(r[value])
            except (KeyError, TypeError, ValueError):
                continue
            series.setdefault(tuple(r.get(k, "") for k in series_keys), []).append(
                (commits.index(r.get("commit")), y))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(10, 5))
        shown = sorted(series.items(), key=lambda kv: -len(kv[1]))[:12]
        for key, pts in shown:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=" ".join(str(k) for k in key))
        ax.set_xticks(range(len(commits)))
        ax.set_xticklabels(commits, rotation=60, fontsize=7)
        ax.set_xlabel("commit (by the date of its rows)")
        ax.set_ylabel(value)
        ax.set_title(f"bench/results/{table}.csv"
                     + (f" ({len(shown)} of {len(series)} series)" if len(series) > 12 else ""))
        ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        path = out / f"{table}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tables",
                                 description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="append the rows of result files to the tables")
    rec.add_argument("paths", nargs="+", type=Path, help="result files, or folders holding them")
    rec.add_argument("--note", default="", help="a few words kept with every row")
    rec.add_argument("--commit", default=None, help="the commit measured (default: HEAD)")
    sh = sub.add_parser("show", help="print a table's rows")
    sh.add_argument("table", choices=sorted(TABLES))
    sh.add_argument("--last", type=int, default=None)
    sh.add_argument("--where", nargs="*", default=[], metavar="KEY=VALUE")
    pl = sub.add_parser("plot", help="one PNG per table")
    pl.add_argument("--out", type=Path, default=None, help="default bench/results/plots/")
    pl.add_argument("--tables", nargs="*", choices=sorted(TABLES), default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "record":
            counts = record(args.paths, note=args.note, commit=args.commit)
            for table, n in counts.items():
                print(f"{n} rows -> {table_path(table).relative_to(ROOT)}")
        elif args.cmd == "show":
            print(show(args.table, args.last, args.where))
        else:
            for p in plot(args.out or RESULTS / "plots", args.tables):
                print(p)
    except (ValueError, FileNotFoundError) as err:
        print(f"bench.tables: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
