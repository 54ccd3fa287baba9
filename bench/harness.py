"""The kernel microbenchmarks: ``python -m bench [--quick] [--ops ...] [--out DIR]``.

One harness for every op, in five modules read in this order: :mod:`bench.machine` (the
machine and its versions), :mod:`bench.timing` (timers, statistics, the roofline measured in
the same run), :mod:`bench.specs` (one ``OpSpec`` per op), :mod:`bench.runner` (providers and
the timing of one case) and :mod:`bench.output` (files, tables, plots, the regression check).
This module is the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .machine import machine_info
from .output import (
    DEFAULT_TOLERANCE,
    compare,
    format_comparison,
    format_table,
    load_report,
    plot_throughput,
    write_results,
)
from .runner import Settings, providers_for, run_case
from .specs import SPEC_BY_NAME, SPECS, Case
from .timing import measure_roofline

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def default_sets(device: torch.device, quick: bool) -> list[str]:
    if quick:
        return ["quick"]
    return ["paper", "llm"] if device.type == "cuda" else ["cpu"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Kernel microbenchmarks of dvae_kernels against torch, torch.compile and "
                    "public kernels, on whatever device is there.")
    ap.add_argument("--quick", action="store_true",
                    help="small shapes and short budgets (the 'quick' set): minutes on a CPU")
    ap.add_argument("--ops", nargs="+", metavar="OP",
                    help="ops to run (default: every one dvae_kernels has): "
                         + ", ".join(SPEC_BY_NAME))
    ap.add_argument("--sets", nargs="+", metavar="SET",
                    help="shape sets: paper, llm, cpu, quick, tiny (default: paper llm on a GPU, "
                         "cpu on a CPU, quick with --quick)")
    ap.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], help="default: all")
    ap.add_argument("--providers", nargs="+", metavar="NAME",
                    help="only these providers (torch, triton, cuda, cpu, torch.compile, liger, "
                         "cce); default: all that run here")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="override every case's dtype (default: bf16 on GPU, float32 on CPU)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    ap.add_argument("--budget", type=float, help="timed seconds per case and mode (default: "
                                                 "0.3 with --quick, else 1.5)")
    ap.add_argument("--out", default="bench/results/latest",
                    help="folder for results.json, results.csv, throughput_vs_V.png")
    ap.add_argument("--compare", metavar="BASELINE",
                    help="a results.json (or a folder with baseline.json) to check against: exit "
                         "1 on a regression, 2 when nothing could be compared")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help=f"regression tolerance, a fraction of the baseline median "
                         f"(default {DEFAULT_TOLERANCE})")
    ap.add_argument("--check-values", action="store_true",
                    help="keep dvae_kernels' token-range checks on (they cost a host sync on "
                         "CUDA; off by default, as in a tuned training loop)")
    ap.add_argument("--threads", type=int,
                    help="torch intra-op threads (default: torch's own choice); on a shared "
                         "machine fewer threads than cores avoids waiting on a descheduled one")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    saved = os.environ.get("DVAE_KERNELS_CHECK_VALUES")
    if not args.check_values:
        os.environ["DVAE_KERNELS_CHECK_VALUES"] = "0"
    try:
        return _main(args, argv)
    finally:  # main() may run inside another program (the tests): leave its environment be
        if saved is None:
            os.environ.pop("DVAE_KERNELS_CHECK_VALUES", None)
        else:
            os.environ["DVAE_KERNELS_CHECK_VALUES"] = saved


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = args.ops or [s.name for s in SPECS]
    unknown = [n for n in names if n not in SPEC_BY_NAME]
    if unknown:
        print(f"error: --ops: unknown op(s) {unknown}; known: {', '.join(SPEC_BY_NAME)}",
              file=sys.stderr)
        return 2
    specs = [SPEC_BY_NAME[n] for n in names]
    missing = [s.name for s in specs if not s.available()]
    specs = [s for s in specs if s.available()]
    set_names = args.sets or default_sets(device, args.quick)
    settings = Settings(quick=args.quick,
                        budget_s=args.budget if args.budget is not None else
                        (0.3 if args.quick else 1.5),
                        min_reps=5, max_reps=100 if args.quick else 300)
    dtype = getattr(torch, args.dtype) if args.dtype else None

    for name in missing:
        print(f"note: dvae_kernels has no {name} yet; not benchmarked")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1: Triton kernels are interpreted here and are not timed")
    started = time.time()
    roofline = measure_roofline(device, args.quick, tiny=set(set_names) == {"tiny"})
    report = {"schema": 1, "machine": machine_info(device), "roofline": roofline,
              "config": {"argv": list(argv) if argv is not None else sys.argv[1:],
                         "sets": set_names, "budget_s": settings.budget_s,
                         "check_values": args.check_values,
                         "ops_missing": missing},
              "rows": []}
    print(f"benchmarking {', '.join(s.name for s in specs) or 'nothing'} on {device} "
          f"({report['machine']['name']}), sets {', '.join(set_names)}", flush=True)
    # Each shape and grad mode is one more compiled graph of the same function; the default
    # limit (8) would silently send the rest to eager.
    if not args.no_compile:
        import torch._dynamo as dynamo

        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, attr):
                setattr(dynamo.config, attr, max(64, getattr(dynamo.config, attr)))
    load = report["machine"].get("loadavg")
    if load and device.type == "cpu" and load[0] > (os.cpu_count() or 1) - 0.5:
        print(f"note: the machine is busy (load average {load[0]:.2f} on {os.cpu_count()} "
              f"cores): CPU figures are noisy; --threads 1 avoids waiting on descheduled "
              f"threads")
    for spec in specs:
        if not args.no_compile:
            dynamo.reset()  # the previous op's compiled graphs are no longer needed
        provs = providers_for(spec, device, compile_reference=not args.no_compile)
        if args.providers:
            provs = [p for p in provs if p.name in args.providers
                     or p.name.split("[")[0] in args.providers]
        for set_name in set_names:
            for case in spec.sets.get(set_name, []):
                if dtype is not None:
                    case = Case(case.label, case.dims, dtype)
                for mode in spec.modes:
                    if args.modes and mode not in args.modes:
                        continue
                    t0 = time.time()
                    rows = run_case(spec, case, set_name, mode, provs, device, settings,
                                    roofline)
                    report["rows"].extend(rows)
                    print(f"  {spec.name} [{mode}] {case.key()}: {time.time() - t0:.1f} s",
                          flush=True)
    report["config"]["wall_s"] = time.time() - started
    try:
        report["machine"]["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    out_dir = Path(args.out)
    paths = write_results(out_dir, report)
    print()
    print(format_table(report))
    if not args.no_plot:
        png = plot_throughput(report, out_dir / "throughput_vs_V.png")
        if png:
            paths["png"] = png
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} in "
          f"{report['config']['wall_s']:.0f} s")
    if args.compare:
        c = compare(load_report(args.compare), report, args.tolerance)
        print(format_comparison(c, args.tolerance, args.compare))
        return c.exit_code
    return 0
