"""Peak extra memory of forward + backward: fused linear_token_logprobs vs the materialised path.

    python -m bench.memory            # N = 65536, D in {128, 768},
                                      # V in {1024, 16384, 50257, 65536, 131072}
    python -m bench.memory --all      # also the cases skipped for CPU run time
    python -m bench.memory --n 8192 --d 128 --v 50257      # GPT-2's vocabulary on a CPU
    python -m bench.memory --n 8192 --d 64 --v 1024 4096   # anything smaller

Providers, each differentiated by ``(g · logp).sum().backward()`` in hidden and weight:

* ``materialised``: ``log_softmax(F.linear(hidden, weight)).gather(-1, tokens)`` - keeps
  [N, V] logits, their log-softmax and an [N, V] gradient.
* ``fused``: ``dvae_kernels.linear_token_logprobs`` - the ``torch`` backend on a CPU (the
  Triton interpreter is far too slow at these sizes), the automatic choice (Triton) on a GPU.

"Extra" is the peak during forward + backward minus the memory held once the inputs exist
(hidden, weight, tokens, the upstream gradient), so it includes the gradients produced
(N·D + V·D values) and every temporary. On a CPU each case runs in a fresh process and reads
the kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs after the
inputs are made); on a GPU it is ``torch.cuda.max_memory_allocated`` after a reset.

A case is skipped, and the table says why, when its predicted footprint exceeds 3/4 of the
memory available now, or (on a CPU, without ``--all``) when it would take more than
``--max-tflop`` of matmul work. On the project's 2-core CPU machine (busy) the default run
takes about 4 minutes and measures D = 128 at V = 1024 and 16384 and D = 768 at V = 1024;
``--max-tflop 8`` adds D = 768, V = 16384 (about 20 minutes in all, recorded under
bench/results/memory.csv). V = 65536 does not fit materialised in 24 GiB (48 GiB needed), nor
do GPT-2's V = 50257 (37 GiB) and a 131072-token vocabulary (96 GiB) at N = 65536: on such a
machine they are measured at ``--n 8192``. The target: fused at most 1/8 of materialised at
every V >= 16384 measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

FLOAT_BYTES = 4


# --------------------------------------------------------------------------------------------
# One case (run in a child process on a CPU)
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_inputs(N: int, D: int, V: int, dev: torch.device):
    gen = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(N, D, device=dev, generator=gen).requires_grad_()
    weight = (torch.randn(V, D, device=dev, generator=gen) / math.sqrt(D)).requires_grad_()
    tokens = torch.randint(0, V, (N,), device=dev, generator=gen)
    g = torch.randn(N, device=dev, generator=gen)
    return hidden, weight, tokens, g


def _forward_backward(provider, hidden, weight, tokens, g, linear_token_logprobs):
    if provider == "fused":
        logp = linear_token_logprobs(hidden, weight, tokens,
                                     backend="torch" if hidden.device.type == "cpu" else None)
    else:
        logits = torch.nn.functional.linear(hidden, weight)
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
        del logits  # only autograd's references remain, as in a training step
    loss = (g * logp).sum()
    loss.backward()
    return loss


def run_case(provider: str, N: int, D: int, V: int, device: str) -> dict:
    from dvae_kernels import linear_token_logprobs

    dev = torch.device(device)
    # Warm up on a tiny input first: the first call of a path loads code and lazily imported
    # modules (the custom-op machinery takes ~150 MB of RSS) that are not the op's memory.
    _forward_backward(provider, *_make_inputs(8, D, min(V, 64), dev), linear_token_logprobs)
    hidden, weight, tokens, g = _make_inputs(N, D, V, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        method = "torch.cuda.max_memory_allocated"
    else:
        method = "VmHWM after clear_refs" if _reset_hwm() else "ru_maxrss (not reset)"
        base = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    loss = _forward_backward(provider, hidden, weight, tokens, g, linear_token_logprobs)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = _status_kib("VmHWM") * 1024
    seconds = time.perf_counter() - t0
    return {"provider": provider, "N": N, "D": D, "V": V, "device": dev.type,
            "extra_bytes": max(0, peak - base), "seconds": seconds, "loss": loss.item(),
            "method": method}


# --------------------------------------------------------------------------------------------
# Planning, running, reporting
# --------------------------------------------------------------------------------------------


def predicted_bytes(provider: str, N: int, D: int, V: int) -> int:
    grads = N * D + V * D
    if provider == "materialised":
        # logits, log-softmax (saved), gather's [N, V] gradient, log-softmax's input gradient.
        return (3 * N * V + grads) * FLOAT_BYTES
    from dvae_kernels.linear_token_logprobs import CHUNK_ELEMENTS
    return (6 * CHUNK_ELEMENTS + 2 * grads + 4 * N) * FLOAT_BYTES


def matmul_flop(provider: str, N: int, D: int, V: int) -> float:
    # materialised: logits, grad hidden, grad weight; fused adds the recomputed logits.
    return (4 if provider == "fused" else 3) * 2.0 * N * D * V


def available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def skip_reason(provider, N, D, V, device, max_tflop, run_all) -> str | None:
    need = predicted_bytes(provider, N, D, V)
    avail = available_bytes(device)
    if need > 0.75 * avail:
        return (f"needs about {need / 2**30:.1f} GiB, more than 3/4 of the "
                f"{avail / 2**30:.1f} GiB available")
    flop = matmul_flop(provider, N, D, V)
    if device == "cpu" and not run_all and flop > max_tflop * 1e12:
        return (f"{flop / 1e12:.0f} TFLOP of CPU matmul exceeds --max-tflop {max_tflop:g} "
                "(run with --all)")
    return None


def run_in_child(provider, N, D, V, device) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", "--child", provider, str(N), str(D), str(V),
           device]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        return {"provider": provider, "N": N, "D": D, "V": V, "device": device,
                "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict], N: int) -> str:
    def mib(r):
        if r is None:
            return "-"
        if "skipped" in r or "error" in r:
            return "skipped" if "skipped" in r else "error"
        return f"{r['extra_bytes'] / 2**20:,.0f}"

    def secs(r):
        return f"{r['seconds']:.1f}" if r and "seconds" in r else "-"

    head = (f"peak extra memory of forward+backward, N = {N} (MiB; includes the N·D + V·D "
            "gradients)")
    lines = [head,
             f"{'D':>5} {'V':>6} {'materialised':>13} {'fused':>9} {'fused/mat':>10} "
             f"{'t_mat s':>8} {'t_fused s':>9}  loss agrees"]
    notes = []
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key[(r["D"], r["V"], r["provider"])] = r
    for D, V in sorted({(r["D"], r["V"]) for r in rows}):
        m = by_key.get((D, V, "materialised"))
        f = by_key.get((D, V, "fused"))
        ratio = agree = "-"
        if m and f and "extra_bytes" in m and "extra_bytes" in f:
            ratio = f"{f['extra_bytes'] / max(m['extra_bytes'], 1):.4f}"
            agree = str(abs(m["loss"] - f["loss"]) <= 1e-4 * max(1.0, abs(m["loss"])))
        lines.append(f"{D:>5} {V:>6} {mib(m):>13} {mib(f):>9} {ratio:>10} {secs(m):>8} "
                     f"{secs(f):>9}  {agree}")
        for r in (m, f):
            if r and ("skipped" in r or "error" in r):
                notes.append(f"  D={D} V={V} {r['provider']}: "
                             f"{r.get('skipped') or r.get('error')}")
    if notes:
        lines.append("not measured:")
        lines.extend(notes)
    methods = {r["method"] for r in rows if "method" in r}
    if methods:
        lines.append("measured by " + ", ".join(sorted(methods)))
    return "\n".join(lines)


TARGET_V = (16384, 50257, 131072)


def target_check(rows: list[dict], targets: Sequence[int] = TARGET_V) -> list[str]:
    """DESIGN target: fused <= 1/8 of materialised at V = 16384 (and the LLM vocabularies
    50257, 131072). One line per (D, V) measured."""
    return [line for V in targets for line in _target_lines(rows, V)]


def _target_lines(rows: list[dict], V_target: int) -> list[str]:
    out = []
    for D in sorted({r["D"] for r in rows if r["V"] == V_target}):
        m = next((r for r in rows if (r["D"], r["V"], r["provider"]) ==
                  (D, V_target, "materialised") and "extra_bytes" in r), None)
        f = next((r for r in rows if (r["D"], r["V"], r["provider"]) ==
                  (D, V_target, "fused") and "extra_bytes" in r), None)
        if m and f:
            ok = f["extra_bytes"] * 8 <= m["extra_bytes"]
            out.append(f"target fused <= 1/8 of materialised at D={D}, V={V_target}: "
                       f"{'met' if ok else 'NOT met'} "
                       f"({f['extra_bytes'] / m['extra_bytes']:.4f})")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, nargs="+", default=[128, 768])
    ap.add_argument("--v", type=int, nargs="+", default=[1024, 16384, 50257, 65536, 131072])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cpu", "cuda"])
    ap.add_argument("--max-tflop", type=float, default=2.5,
                    help="on a CPU, skip cases with more matmul work than this (TFLOP)")
    ap.add_argument("--all", action="store_true", help="ignore --max-tflop")
    ap.add_argument("--out", default=None,
                    help="folder for memory.json (default bench/results/memory/<machine>)")
    ap.add_argument("--child", nargs=5, metavar=("PROVIDER", "N", "D", "V", "DEVICE"),
                    help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        provider, N, D, V, device = args.child
        print(json.dumps(run_case(provider, int(N), int(D), int(V), device)))
        return 0
    from .machine import machine_info

    rows = []
    for D in args.d:
        for V in args.v:
            for provider in ("materialised", "fused"):
                reason = skip_reason(provider, args.n, D, V, args.device, args.max_tflop,
                                     args.all)
                if reason:
                    row = {"provider": provider, "N": args.n, "D": D, "V": V,
                           "device": args.device, "skipped": reason}
                elif args.device == "cpu":
                    row = run_in_child(provider, args.n, D, V, args.device)
                else:
                    row = run_case(provider, args.n, D, V, args.device)
                    torch.cuda.empty_cache()
                rows.append(row)
                print(f"  {provider:12s} D={D:<4} V={V:<6} "
                      + (f"{row['extra_bytes'] / 2**20:,.0f} MiB in {row['seconds']:.1f} s"
                         if "extra_bytes" in row else row.get("skipped") or row.get("error")),
                      flush=True)
    table = format_table(rows, args.n)
    checks = target_check(rows)
    print()
    print(table)
    for line in checks:
        print(line)
    machine = machine_info(torch.device(args.device))
    out = Path(args.out or Path("bench/results/memory") / machine["slug"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memory.json"
    path.write_text(json.dumps({"machine": machine, "command": " ".join(["python -m bench.memory",
                                                           *(argv or sys.argv[1:])]),
                                "rows": rows, "targets": checks, "table": table}, indent=2))
    print(f"wrote {path}")
    return 0 if all("NOT met" not in c for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
