"""End-to-end benchmark of the DAPS training step: ``python -m bench.e2e``.

One training step (docs/algorithm.md: sample, reward, teacher-forced pass, weights, losses,
optimiser) at the paper's configurations, with the fused ops (``kernel_backend=None``: the
fastest backend that serves each call) against the ``torch`` backend, and optionally under
``torch.compile``. Reports images per second and the seconds of each phase.

The step comes from the training module's benchmark API::

    dvae.bench_api.make_step(preset, *, batch_size, K=None, device="cpu",
                             kernel_backend=None, compile=False, **overrides) -> (step, phases)

``step()`` runs one training step; ``phases`` maps each phase name to a list of seconds, one
entry per step. A provider may carry config overrides (``--providers fused
"fused[recipe=fast]"``): a variant of the step timed beside the others in the same run.
Providers are interleaved step by step (round-robin, order rotating), so a busy shared machine
slows them alike. The step time is the wall clock of ``step()`` with the
device synchronised before and after; phase times come from the API's own timers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import machine, output, timing

PHASES = ("sample", "reward", "teacher_forced", "weights", "losses", "optimizer")


@dataclass(frozen=True)
class Provider:
    """How the step is built: which kernel backend, and whether the model is compiled."""

    name: str
    kernel_backend: str | None
    compile: bool
    fused_linear: str = "auto"  # dvae's Config.fused_linear
    overrides: tuple = ()  # (key, value) config overrides of this variant


def provider(text: str) -> Provider:
    """A provider by name, or a variant of one with config overrides in brackets:
    ``fused[decoder_samples=2,encoder_samples=2]``, ``fused[recipe=fast]``. The variants of
    one run are timed interleaved with the others: before/after in one run."""
    name, sep, rest = text.partition("[")
    if name not in PROVIDERS or (sep and not rest.endswith("]")):
        raise argparse.ArgumentTypeError(
            f"a provider is one of {', '.join(PROVIDERS)}, optionally with overrides "
            f"(fused[decoder_samples=2]), got {text!r}")
    base = PROVIDERS[name]
    if not sep:
        return base
    pairs = tuple(_parse_override(item) for item in rest[:-1].split(",") if item)
    return Provider(text, base.kernel_backend, base.compile, base.fused_linear, pairs)


# The torch baselines are the plain PyTorch model: materialised logits, torch backend.
PROVIDERS = {
    # the baseline of the targets (docs/conventions.md#the-targets): no compile
    "torch": Provider("torch", "torch", False, "never"),
    "fused": Provider("fused", None, False),
    "fused+compile": Provider("fused+compile", None, True),
    "torch+compile": Provider("torch+compile", "torch", True, "never"),
}

# (preset, batch size): the paper's batch on a GPU; CPU sizes a 2-core machine runs in
# seconds per step.
GPU_CASES = [("mnist", 256), ("cifar10", 256), ("imagenet256", 64)]
CPU_CASES = [("digits", 64), ("mnist", 32)]
DRY_RUN_CASES = [("digits", 4)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(make_step, preset: str, batch_size: int, K: int | None, providers: list[Provider],
             device: torch.device, steps: int, warmup: int, overrides: dict, *,
             timed: bool = True, log=print) -> list[dict]:
    """Time ``steps`` training steps per provider (after ``warmup``), interleaved. With
    ``timed`` the step times each phase, synchronising the device around each one."""
    built = []
    rows = {}
    for p in providers:
        row = {"preset": preset, "batch_size": batch_size, "K": K, "provider": p.name,
               "kernel_backend": p.kernel_backend or "auto", "compile": p.compile,
               "device": device.type, "status": "ok"}
        rows[p.name] = row
        try:
            t0 = time.perf_counter()
            step, phases = make_step(preset, batch_size=batch_size, K=K, device=str(device),
                                     kernel_backend=p.kernel_backend, compile=p.compile,
                                     timed=timed,
                                     **{"fused_linear": p.fused_linear, **overrides,
                                        **dict(p.overrides)})
            for _ in range(warmup):
                step()
            _sync(device)
            row["setup_s"] = time.perf_counter() - t0
        except Exception as exc:  # one provider failing is a result, not the end of the run
            row["status"] = f"error: {type(exc).__name__}: {str(exc).strip()[:200]}"
            log(f"  {preset} {p.name}: {row['status']}")
            continue
        built.append((p, step, phases, {k: len(v) for k, v in phases.items()}))
    samples = {p.name: [] for p, _, _, _ in built}
    for r in range(steps):
        order = built[r % len(built):] + built[:r % len(built)] if built else []
        for p, step, _, _ in order:
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            samples[p.name].append(time.perf_counter() - t0)
    for p, _, phases, start in built:
        row = rows[p.name]
        row.update(timing.summarize(samples[p.name]))
        row["images_per_s"] = batch_size / (row["median_ms"] / 1e3)
        row["phases_ms"] = {
            name: statistics.median(times[start.get(name, 0):]) * 1e3
            for name, times in phases.items() if len(times) > start.get(name, 0)}
    ref = rows.get("torch", {}).get("median_ms")
    for row in rows.values():
        if ref and row.get("median_ms"):
            row["x_vs_torch"] = ref / row["median_ms"]
    return list(rows.values())


def loop_overhead(preset: str, batch_size: int, K: int | None, device: torch.device,
                  steps: int, warmup: int, overrides: dict) -> dict:
    """The trainer's own loop (``dvae.bench_api.benchmark_loop``: next batch, preprocessing,
    the step, metric sums, the progress bar) against its bare step on a fixed batch, timed
    alternately in one run, on the preset's synthetic stand-in data."""
    from dvae.bench_api import benchmark_loop
    from dvae.config import load_config
    from dvae.trainer import Trainer

    row = {"preset": preset, "batch_size": batch_size, "K": K, "device": device.type,
           "status": "ok"}
    with tempfile.TemporaryDirectory() as tmp:
        values = {**overrides, "dataset": "synthetic", "batch_size": batch_size,
                  "out_dir": tmp, "device": str(device), "eval_every": 0, "ckpt_every": 0}
        if K is not None:
            values["num_samples"] = K
        try:
            cfg = load_config(preset, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                       for k, v in values.items()])
            with Trainer(cfg) as trainer:
                row.update(benchmark_loop(trainer, steps, warmup))
        except Exception as exc:  # a result, not the end of the run
            row["status"] = f"error: {type(exc).__name__}: {str(exc).strip()[:200]}"
    return row


def row_key(row: dict) -> tuple:
    return (row["preset"], str(row["batch_size"]), str(row["K"]), row["provider"],
            row["device"])


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m['name']} ({m['device']}, load average "
             f"{output._fmt(m['loadavg'][0] if m.get('loadavg') else None, '.2f')} at start); "
             f"torch {m['torch']}; "
             f"{m['date']}",
             f"{'preset':<12} {'batch':>5} {'K':>3} {'provider':<14} {'step ms':>9} "
             f"{'p20-p80 ms':>19} {'img/s':>8} {'x torch':>7}  phases (median ms)"]
    for r in report["rows"]:
        head = f"{r['preset']:<12} {r['batch_size']:>5} {str(r['K'] or '-'):>3} {r['provider']:<14}"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}")
            continue
        ph = " ".join(f"{k}={v:.3g}" for k, v in r["phases_ms"].items())
        x = r.get("x_vs_torch")
        lines.append(f"{head} {r['median_ms']:>9.4g} {r['p20_ms']:>9.4g}-{r['p80_ms']:<9.4g} "
                     f"{r['images_per_s']:>8.1f} {'-' if x is None else f'{x:.2f}':>7}  {ph}")
    return "\n".join(lines)


def write_results(out_dir: Path, report: dict) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "e2e.json"
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    cs = out_dir / "e2e.csv"
    fields = ["preset", "batch_size", "K", "provider", "kernel_backend", "compile", "device",
              "status", "median_ms", "p20_ms", "p80_ms", "samples", "images_per_s",
              "x_vs_torch", "setup_s"] + [f"{p}_ms" for p in PHASES]
    with cs.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields + [f"machine_{k}" for k in
                                                   output.MACHINE_FIELDS])
        w.writeheader()
        for r in report["rows"]:
            rec = {k: r.get(k) for k in fields}
            rec.update({f"{p}_ms": r.get("phases_ms", {}).get(p) for p in PHASES})
            rec.update({f"machine_{k}": report["machine"].get(k)
                        for k in output.MACHINE_FIELDS})
            w.writerow(rec)
    return [js, cs]


def _parse_case(text: str) -> tuple[str, int]:
    preset, _, batch = text.partition(":")
    if not preset or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(
            f"a case is PRESET:BATCH (e.g. imagenet256:64), got {text!r}")
    return preset, int(batch)


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"an override is KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description="Throughput of the DAPS training step: fused ops vs the torch backend.")
    ap.add_argument("--cases", nargs="+", type=_parse_case, metavar="PRESET:BATCH",
                    help="default: mnist:256 cifar10:256 imagenet256:64 on a GPU, "
                         "digits:64 mnist:32 on a CPU")
    ap.add_argument("--K", type=int, help="samples per image (default: the preset's, 8)")
    ap.add_argument("--providers", nargs="+", type=provider, metavar="PROVIDER",
                    help=f"{', '.join(PROVIDERS)}, or one with config overrides in brackets "
                         "(fused[recipe=fast]); default: torch fused fused+compile on a GPU, "
                         "torch fused on a CPU")
    ap.add_argument("--steps", type=int, help="timed steps per provider (default 10 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--set", dest="overrides", nargs="+", type=_parse_override, default=[],
                    metavar="KEY=VALUE", help="config overrides passed to make_step")
    ap.add_argument("--no-phase-timers", action="store_true",
                    help="no per-phase times: the step then never synchronises the device "
                         "inside, so its time is the one to quote against the targets")
    ap.add_argument("--loop", action="store_true",
                    help="also time the trainer's own loop against its bare step (data, "
                         "metrics, progress bar: the loop's overhead, as a ratio)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    ap.add_argument("--out", help="folder for e2e.json and e2e.csv (default bench/results/"
                                  "latest, a temporary folder with --dry-run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes on the CPU (seconds): checks the pipeline, not the speed")
    ap.add_argument("--compare", metavar="BASELINE",
                    help="an e2e.json to compare step times with (exit 1 on a regression, 2 "
                         "when nothing was compared)")
    ap.add_argument("--tolerance", type=float, default=output.DEFAULT_TOLERANCE)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The step's token-range checks would synchronise the device; a tuned loop turns them off.
    saved = os.environ.get("DVAE_KERNELS_CHECK_VALUES")
    os.environ.setdefault("DVAE_KERNELS_CHECK_VALUES", "0")
    try:
        return _main(args, argv)
    finally:  # leave the environment of a calling program as it was
        if saved is None:
            os.environ.pop("DVAE_KERNELS_CHECK_VALUES", None)


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if args.dry_run:
        device = torch.device("cpu")
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from dvae.bench_api import make_step
    if args.dry_run:
        cases = args.cases or DRY_RUN_CASES
        providers = args.providers or [PROVIDERS[n] for n in ("torch", "fused")]
        steps, warmup, K = args.steps or 1, min(args.warmup, 1), args.K or 2
    else:
        gpu = device.type == "cuda"
        cases = args.cases or (GPU_CASES if gpu else CPU_CASES)
        default = ["torch", "fused", "fused+compile"] if gpu else ["torch", "fused"]
        providers = args.providers or [PROVIDERS[n] for n in default]
        steps, warmup, K = args.steps or (10 if gpu else 3), args.warmup, args.K
    if steps < 1 or warmup < 0:
        print(f"error: --steps must be >= 1 and --warmup >= 0, got {steps}, {warmup}",
              file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="bench_e2e_")) if args.dry_run
        else Path("bench/results/latest"))
    report = {"schema": 1, "machine": machine.machine_info(device),
              "config": {"argv": list(argv) if argv is not None else sys.argv[1:],
                         "steps": steps, "warmup": warmup, "dry_run": args.dry_run,
                         "phase_timers": not args.no_phase_timers,
                         "overrides": dict(args.overrides)},
              "rows": []}
    for preset, batch in cases:
        print(f"{preset} batch {batch}: {', '.join(p.name for p in providers)}", flush=True)
        report["rows"].extend(run_case(make_step, preset, batch, K, providers, device, steps,
                                       warmup, dict(args.overrides),
                                       timed=not args.no_phase_timers))
        if args.loop:
            report.setdefault("loop", []).append(
                loop_overhead(preset, batch, K, device, steps, warmup, dict(args.overrides)))
    paths = write_results(out_dir, report)
    print()
    print(format_table(report))
    for r in report.get("loop", []):
        if r["status"] != "ok":
            print(f"trainer loop {r['preset']}:{r['batch_size']}: {r['status']}")
            continue
        print(f"trainer loop {r['preset']}:{r['batch_size']}: {r['loop_ms']:.4g} ms per "
              f"iteration against {r['step_ms']:.4g} ms for the bare step "
              f"(loop/step {r['loop_over_step']:.3f})")
    print(f"\nwrote {', '.join(map(str, paths))}")
    failed = [r for r in report["rows"] + report.get("loop", []) if r["status"] != "ok"]
    code = 1 if failed else 0
    if args.compare:
        c = output.compare(output.load_report(args.compare, ("baseline_e2e.json", "e2e.json")),
                            report, args.tolerance,
                            key=row_key)
        print(output.format_comparison(c, args.tolerance, args.compare))
        code = max(code, c.exit_code)
    return code


if __name__ == "__main__":
    sys.exit(main())
