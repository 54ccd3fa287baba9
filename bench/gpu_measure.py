"""What a GPU run measures against what was predicted without one (for ``bench.gpu_report``).

    python -m bench.gpu_measure constants --out FILE [--dry-run]
    python -m bench.gpu_measure kernels --out FILE [--dry-run] [--seconds S]
    python -m bench.gpu_measure compare-steps E2E_JSON... --out FILE

* ``constants``: the machine's copy bandwidth, bf16 and fp32 matmul rates and launch overheads
  (eager and from a CUDA graph; :func:`bench.gpu_model.measure_calibration`), the constants
  both predictors use.
* ``kernels``: every op phase of the static report (``bench.static``'s representative shapes)
  run for real (:func:`dvae_kernels._specialize.materialise`: the same launchers, real tensors)
  and timed with CUDA events, beside the static report's prediction for this GPU (the summed
  kernels of that op phase in ``bench/results/static.csv``) and the achieved fraction of the
  roofline (the report's ideal time over the measured). One JSON line per phase, written as it
  is measured, so a run stopped at its time cap keeps what it measured.
* ``compare-steps``: ``bench.e2e``'s measured training steps (total and per phase) beside the
  step cost model's predictions for this GPU in ``bench/results/gpu_model.csv``.

``--dry-run``: on the CPU at tiny shapes (Triton through its interpreter): a pipeline check
with no prediction to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import tables

PHASES = ("sample", "reward", "teacher_forced", "weights", "losses", "optimizer")


def gpu_key(name: str) -> str | None:
    """``h100`` or ``h200`` from a device name, None for another GPU (or the CPU)."""
    low = name.lower()
    return "h200" if "h200" in low else "h100" if "h100" in low else None


def _latest(rows: list[dict], key) -> list[dict]:
    """The rows of the latest date for each key (the newest measurement of each case)."""
    best: dict = {}
    for r in rows:
        k = key(r)
        if k not in best or (r.get("date") or "") > (best[k].get("date") or ""):
            best[k] = r
    return list(best.values())


def static_predictions(gpu: str | None, results: Path | None = None) -> dict[tuple, dict]:
    """(op, phase, shape string) -> predicted and ideal ms on ``gpu`` (summed over the
    phase's kernels, sm_90, the latest rows), from the static report's table."""
    if gpu is None:
        return {}
    rows = [r for r in tables.load("static", results) if r.get("arch") == "sm_90"]
    out: dict[tuple, dict] = {}
    for r in _latest(rows, lambda r: (r["op"], r["phase"], r["kernel"], r["shape"])):
        try:
            ms = float(r[f"{gpu}_ms"])
            frac = float(r[f"{gpu}_frac"]) if r.get(f"{gpu}_frac") else None
        except (KeyError, TypeError, ValueError):
            continue
        g = out.setdefault((r["op"], r["phase"], r["shape"]),
                           {"predicted_ms": 0.0, "ideal_ms": 0.0, "kernels": 0,
                            "commit": r.get("commit")})
        g["predicted_ms"] += ms
        g["ideal_ms"] += ms * frac if frac is not None else 0.0
        g["kernels"] += 1
    return out


def shape_string(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def workloads(dry: bool):
    """The op phases to time: the static report's shapes, or tiny ones for a dry run."""
    from dvae_kernels import _specialize as S

    if not dry:
        from .static import representative_workloads

        return representative_workloads
    return lambda: (S.token_workloads(32, 96) + S.linear_workloads(32, 32, 96)
                    + S.sampler_workloads(16, 96, 32)
                    + S.decoding_workloads(4, 32, 2, 16, 64))


def time_call(fn, device: torch.device, max_seconds: float = 0.5, max_reps: int = 50
              ) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call (which compiles): CUDA events
    around each call on a GPU, the wall clock on the CPU; at most ``max_reps`` calls or about
    ``max_seconds``."""
    fn()
    times = []
    t_end = time.perf_counter() + max_seconds
    cuda = device.type == "cuda"
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() < t_end):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    return times[len(times) // 2]


def measure_kernels(out: Path, device: torch.device, dry: bool, seconds: float = 0.5) -> int:
    """Time every op phase (see the module docstring), one JSON line each in ``out``."""
    from dvae_kernels import _specialize as S

    gpu = gpu_key(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    predicted = static_predictions(gpu)
    make = workloads(dry)
    with S.materialise(device):
        wls = make()
    n = 0
    with out.open("w") as f:
        for wl in wls:
            label = f"{wl.op}.{wl.phase} {shape_string(wl.shape)}"
            row = {"op": wl.op, "phase": wl.phase, "shape": shape_string(wl.shape)}
            try:
                row["measured_ms"] = time_call(wl.run, device, seconds)
            except Exception as err:  # one failing case must not lose the others
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            p = predicted.get((wl.op, wl.phase, row["shape"]))
            if p is not None:
                row.update(predicted_ms=p["predicted_ms"], kernels=p["kernels"],
                           static_commit=p["commit"])
                if row.get("measured_ms"):
                    row["measured_over_predicted"] = row["measured_ms"] / p["predicted_ms"]
                    row["achieved_roofline"] = (p["ideal_ms"] / row["measured_ms"]
                                                if p["ideal_ms"] else None)
            f.write(json.dumps(row) + "\n")
            f.flush()
            n += 1
            print(f"[kernels] {label}: " + (f"{row['measured_ms']:.4f} ms" if "measured_ms"
                                             in row else row["error"])
                  + (f" (predicted {row['predicted_ms']:.4f})" if "predicted_ms" in row
                     else ""), flush=True)
    return n


def step_predictions(gpu: str | None, results: Path | None = None) -> dict[str, dict]:
    """preset -> the step cost model's latest prediction on ``gpu`` (no overrides)."""
    if gpu is None:
        return {}
    names = {"h100": "H100", "h200": "H200"}
    rows = [r for r in tables.load("gpu_model", results)
            if names[gpu] in (r.get("gpu") or "") and not r.get("overrides")]
    return {r["preset"]: r for r in _latest(rows, lambda r: r["preset"])}


def compare_steps(e2e_files: list[Path], gpu: str | None, results: Path | None = None
                  ) -> list[dict]:
    """Measured steps (each e2e.json's rows of the fused provider) beside the predictions:
    the total against the eager or the sampler-graphed prediction (by the run's
    ``sampler_graph`` override), and each phase against the model's (graphed) phase."""
    predicted = step_predictions(gpu, results)
    out = []
    for path in e2e_files:
        doc = json.loads(Path(path).read_text())
        overrides = (doc.get("config") or {}).get("overrides") or {}
        graphed = str(overrides.get("sampler_graph")) in ("on", "True")
        for r in doc.get("rows", []):
            if r.get("provider") != "fused":
                continue
            pred = predicted.get(r["preset"], {})
            total_key = "ms_sampler_graphed" if graphed else "ms_eager"
            row = {"preset": r["preset"], "batch_size": r["batch_size"],
                   "sampler": "graphed" if graphed else "eager", "status": r.get("status"),
                   "measured_ms": r.get("median_ms"), "predicted_ms": _f(pred.get(total_key))}
            phases = r.get("phases_ms") or {}
            row["phases"] = {p: {"measured_ms": phases.get(p),
                                 "predicted_ms": _f(pred.get(f"{p}_ms"))} for p in PHASES}
            if row["measured_ms"] and row["predicted_ms"]:
                row["measured_over_predicted"] = row["measured_ms"] / row["predicted_ms"]
            out.append(row)
    return out


def _f(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def measure_constants(device: torch.device, dry: bool) -> dict:
    """The predictors' constants measured here (:func:`bench.gpu_model.measure_calibration`);
    a dry run measures the same quantities on the CPU at small sizes (no meaning)."""
    if not dry:
        from .gpu_model import measure_calibration

        return measure_calibration()

    def timed(fn, reps):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    src = torch.empty(1 << 22, dtype=torch.int16)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 5)
    a = torch.randn(256, 256)
    mm_s = timed(lambda: a @ a, 5)
    tiny = torch.zeros(1)
    eager_s = timed(lambda: tiny.add_(1), 200)
    return {"name": "cpu (dry run)", "source": "bench.gpu_measure constants --dry-run",
            "copy_tbps": 2 * src.numel() * 2 / copy_s / 1e12,
            "bf16_tflops": 2 * 256 ** 3 / mm_s / 1e12, "fp32_tflops": 2 * 256 ** 3 / mm_s / 1e12,
            "launch_us_eager": eager_s * 1e6, "launch_us_graphed": eager_s * 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_measure",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("constants")
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--dry-run", action="store_true")
    k = sub.add_parser("kernels")
    k.add_argument("--out", required=True, type=Path)
    k.add_argument("--dry-run", action="store_true")
    k.add_argument("--seconds", type=float, default=0.5, help="timing per op phase")
    s = sub.add_parser("compare-steps")
    s.add_argument("e2e", nargs="+", type=Path)
    s.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    dry = getattr(args, "dry_run", False)
    if not dry and args.cmd != "compare-steps" and not torch.cuda.is_available():
        print("error: no CUDA device here (use --dry-run)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    if args.cmd == "constants":
        doc = measure_constants(device, dry)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc))
    elif args.cmd == "kernels":
        n = measure_kernels(args.out, device, dry, args.seconds)
        print(f"[kernels] {n} op phases -> {args.out}")
    else:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        rows = compare_steps(args.e2e, gpu_key(name))
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"[steps] {len(rows)} steps -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
