"""The C++ ``cpu`` backend against the eager ``torch`` backend and ``torch.compile`` of the
op's plain-PyTorch reference, on the CPU (the target, docs/conventions.md#the-targets: ≥ 2×
eager, ≥ torch.compile).

    python -m bench.cpu_native [--quick] [--ops token_logprobs weighted_token_nll]
                               [--dtypes float32 bfloat16] [--out DIR]

Shapes: N = 65536 rows × V = 1024 (the ImageNet-256 configuration's K·L tokens of
eight images) and N = 8192 × V = 32768 (an LLM-like vocabulary), float32 and bfloat16, forward
and forward+backward. ``--quick`` divides N by 16 (a smoke run of a few minutes).

Everything else is bench/harness.py: the same rotating inputs for every provider, each
provider checked against the torch backend before it is timed, providers interleaved round by
round (the machine is shared: noise spreads evenly over them), medians after warm-up, the
machine and its load average recorded. Results: ``DIR/results.{json,csv}`` and a ratio table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from bench import machine, output, runner, specs, timing
from dvae_kernels import _csrc

PROVIDERS = ("cpu", "torch", "torch.compile")
# (label, rows, V); weighted_token_nll gets the same rows as [B, L] sequences.
SHAPES = [("ImageNet-256-like N=65536, V=1024", 65536, 1024, 64, 1024),
          ("LLM-like N=8192, V=32768", 8192, 32768, 4, 2048)]


def cases(op: str, dtype: torch.dtype, quick: bool) -> list[specs.Case]:
    div = 16 if quick else 1
    out = []
    for label, rows, V, B, L in SHAPES:
        if op == "token_logprobs":
            dims = {"R": rows // div, "V": V}
        else:
            dims = {"B": B, "L": L // div, "V": V}
        out.append(specs.Case(label + (" (quick: N/16)" if quick else ""), dims, dtype))
    return out


def ratio_table(rows: list[dict]) -> str:
    """cpu's speed-up over each baseline, per op, mode, shape and dtype, with the target."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["op"], r["mode"], r["shape"], r["dtype"]), {})[r["provider"]] = r
    lines = [f"{'op':<20} {'mode':<8} {'shape':<22} {'dtype':<9} {'cpu ms':>9} {'torch ms':>9} "
             f"{'compile ms':>10} {'x torch':>8} {'x compile':>9}  target (>=2x torch, >=1x "
             f"compile)"]
    for (op, mode, shape, dtype), p in by_key.items():
        cpu, eager, comp = (p.get(n, {}).get("median_ms") for n in PROVIDERS)
        xt = eager / cpu if cpu and eager else None
        xc = comp / cpu if cpu and comp else None
        met = ("met" if xt and xc and xt >= 2 and xc >= 1 else
               "NOT met" if xt and xc else "-")
        fmt = output._fmt
        lines.append(f"{op:<20} {mode:<8} {shape[:22]:<22} {dtype:<9} {fmt(cpu, '9.1f'):>9} "
                     f"{fmt(eager, '9.1f'):>9} {fmt(comp, '10.1f'):>10} {fmt(xt, '8.2f'):>8} "
                     f"{fmt(xc, '9.2f'):>9}  {met}")
        for n in PROVIDERS:
            status = p.get(n, {}).get("status", "missing")
            if status != "ok":
                lines.append(f"    {n}: {status}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N / 16: a smoke run")
    ap.add_argument("--ops", nargs="+", default=["token_logprobs", "weighted_token_nll"],
                    choices=["token_logprobs", "weighted_token_nll"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="bench/results/cpu_native")
    args = ap.parse_args(argv)
    reason = _csrc.unavailable("cpu")
    if reason is not None:
        print(f"error: the cpu backend is unavailable: {reason}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    # Value checks read every token (a pass over the tokens per call): off for all providers.
    os.environ["DVAE_KERNELS_CHECK_VALUES"] = "0"
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, max(64, getattr(torch._dynamo.config, attr)))
    device = torch.device("cpu")
    # Eager torch takes seconds per call at these sizes: few rounds, one warm-up call (after
    # the checked first call, which also compiles).
    settings = runner.Settings(quick=args.quick, budget_s=2.0, min_reps=3, max_reps=20,
                                warmup=1)
    started = time.time()
    report = {"schema": 1, "machine": machine.machine_info(device),
              "roofline": timing.measure_roofline(device, quick=True),
              "config": {"argv": sys.argv[1:] if argv is None else list(argv),
                         "sets": ["cpu_native"], "budget_s": settings.budget_s,
                         "check_values": False, "ops_missing": []},
              "rows": []}
    load = report["machine"].get("loadavg")
    print(f"cpu_native on {report['machine']['name']}, {torch.get_num_threads()} torch threads, "
          f"load average {load[0] if load else '?'}"
          + (" (busy machine: figures are noisy)" if load and load[0] > 1.5 else ""), flush=True)
    for op in args.ops:
        spec = specs.SPEC_BY_NAME[op]
        torch._dynamo.reset()
        provs = [p for p in runner.providers_for(spec, device) if p.name in PROVIDERS]
        for dtype_name in args.dtypes:
            for case in cases(op, getattr(torch, dtype_name), args.quick):
                for mode in args.modes:
                    t0 = time.time()
                    rows = runner.run_case(spec, case, "cpu_native", mode, provs, device,
                                            settings, report["roofline"])
                    report["rows"].extend(rows)
                    print(f"  {op} [{mode}] {case.key()} {dtype_name}: {time.time() - t0:.0f} s",
                          flush=True)
    report["config"]["wall_s"] = time.time() - started
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    paths = output.write_results(Path(args.out), report)
    print()
    print(output.format_table(report))
    print()
    print(ratio_table(report["rows"]))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} in "
          f"{report['config']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
