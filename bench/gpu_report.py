"""The one command for a GPU machine: ``python -m bench.gpu_report --time-budget 540``.

A lent GPU is scarce (minutes of device time, at most 10 minutes per command), so the report
runs its parts in priority order within one wall-clock budget, each part under its own time
cap (:data:`CAPS`, cut to what the budget has left), and writes ``summary.json`` and
``summary.md`` after every part: a later part that runs out of time loses nothing an earlier
one learned. In order:

1. ``build``: the C++/CUDA extension (``pip install --no-deps --no-build-isolation -e .``,
   ``MAX_JOBS`` = the core count; it also installs the project, as the GPU image needs);
2. ``info``: ``python -m dvae_kernels.info`` (versions, devices, backends);
3. ``constants``: copy bandwidth, bf16/fp32 matmul rates per shape class, launch overheads
   (``bench.gpu_measure constants``): what the predictors assume, measured;
4. ``tests``: every op on every backend on CUDA tensors with compiled Triton (the op test files
   with ``DVAE_TEST_DEVICE=cuda``, ``-m "not slow"``, in parallel with ``-n``), the sampler's
   CUDA-graph capture and replay, the bitwise determinism of the linear backward and of every
   autotune candidate (the ``gpu``-marked tests);
5. ``kernels``: each op phase of the static report timed at the report's shapes against its
   prediction (``bench.gpu_measure kernels``);
6. ``steps``: the training step (imagenet256 at batch 64, K = 8, sampler eager and graphed;
   mnist and cifar10 at 256) per phase, with CUDA events, against the step cost model
   (``bench.e2e``, then ``bench.gpu_measure compare-steps``);
7. ``micro``: the microbenchmarks against the torch, Liger-style and ``torch.compile``
   references, with what time is left (``python -m bench``; compared with this machine's
   stored baseline when there is one).

Everything goes to ``--out`` (default ``bench/results/<gpu-name>/``): the two summaries,
``kernels.jsonl``, ``steps.json``, ``constants.json``, the parts' folders and ``logs.tar.gz``
(every log, so that the few files a lent machine sends back hold everything).

``python -m bench.gpu_report calibrate SUMMARY.json`` then writes the measured constants into
``bench/gpu_constants.json``, which ``bench.static`` and ``bench.gpu_model`` read for that GPU
(with the GPU's name, the commit and the date they came from): the next prediction starts
from measured constants.

``--dry-run`` runs the same script end to end on the CPU (tiny shapes, the Triton
interpreter, the build only rehearsed, the GPU image's missing packages made unimportable) in
about a minute, so that CI keeps it from rotting. It checks the pipeline, not the speed.

Exit status: 0 when every part that ran passed, 1 when one failed, timed out, regressed or is
missing, 2 on bad usage (no GPU without ``--dry-run``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import output, specs
from .machine import machine_info

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("build", "info", "constants", "tests", "kernels", "steps", "micro")
# Each part's time cap in seconds on a GPU (cut to what the budget has left), and on a dry run.
CAPS = {"build": 240, "info": 60, "constants": 60, "tests": 150, "kernels": 120,
        "steps": 180, "micro": 1800}
DRY_CAPS = {"build": 60, "info": 30, "constants": 30, "tests": 60, "kernels": 60,
            "steps": 60, "micro": 60}
DEFAULT_BUDGET = 540.0  # a 10-minute command with a minute to spare
DRY_BUDGET = 150.0
RESERVE = 8.0  # kept back for the summaries and the archive
# The op test files: each runs its op on every backend on DEVICE (tests/utils.py).
TEST_FILES = ("test_token_logprobs.py", "test_weighted_token_nll.py", "test_linear_ops.py",
              "test_linear_options.py", "test_sampling.py", "test_sampler_graph.py",
              "test_daps_weights.py", "test_decode_ops.py", "test_autotune.py",
              "test_native.py", "test_large_logits.py", "test_nn.py", "test_policy.py")
# Not in the GPU image: the dry run makes them unimportable to rehearse it.
IMAGE_LACKS = ("vector_quantize_pytorch", "pytorch_fid", "nvtx")
# A test hook: DVAE_GPU_REPORT_SLOW=<part> makes that part's command sleep past any cap.
SLOW_HOOK = "DVAE_GPU_REPORT_SLOW"
PYTEST_NO_TESTS = 5  # pytest's exit status when it collected no test
E2E_MISSING = 3  # bench.e2e's exit status when the training module is absent
TIMED_OUT = 124


@dataclass
class Part:
    name: str
    status: str  # passed | failed | timeout | regressed | missing | empty | skipped
    rc: int | None
    seconds: float
    command: str
    log: str
    note: str = ""
    cap: float | None = None


class Budget:
    """The report's wall clock: what is left of ``total`` seconds."""

    def __init__(self, total: float, clock: Callable[[], float] = time.monotonic):
        self.total, self.clock, self.t0 = total, clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()


@dataclass
class Context:
    out: Path
    env: dict
    dry: bool
    args: argparse.Namespace
    device: torch.device


def _run(name: str, cmd: list[str], log: Path, env: dict, timeout: float,
         mode: str = "w") -> tuple[int, float]:
    """Run ``cmd`` from the repository root, its output to ``log``; rc 124 when it ran past
    ``timeout`` (it is killed, its log kept)."""
    if os.environ.get(SLOW_HOOK) == name.split()[0]:
        cmd = [sys.executable, "-c", "import time; time.sleep(3600)"]
    print(f"[gpu_report] {name} (cap {timeout:.0f} s): {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with log.open(mode) as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=max(timeout, 1.0)).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_report] stopped at its cap of {timeout:.0f} s\n")
            rc = TIMED_OUT
    return rc, time.time() - t0


def _tail(path: Path, n: int = 3) -> str:
    if not path.is_file():
        return ""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[:400]


def _status(rc: int) -> str:
    return {0: "passed", TIMED_OUT: "timeout"}.get(rc, "failed")


def _simple(ctx: Context, name: str, cmd: list[str], cap: float, env: dict | None = None
            ) -> Part:
    log = ctx.out / f"{name}.log"
    rc, sec = _run(name, cmd, log, env or ctx.env, cap)
    return Part(name, _status(rc), rc, sec, " ".join(cmd), str(log),
                _tail(log, 1 if rc == 0 else 3), cap)


# -- the parts ----------------------------------------------------------------------------------


def run_build(ctx: Context, cap: float) -> list[Part]:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
           "--no-index", "-e", str(ROOT)]
    if ctx.dry:
        cmd.insert(4, "--dry-run")  # resolves and prepares the project, builds nothing
    env = dict(ctx.env, MAX_JOBS=str(os.cpu_count() or 4))
    return [_simple(ctx, "build", cmd, cap, env)]


def run_info(ctx: Context, cap: float) -> list[Part]:
    return [_simple(ctx, "info", [sys.executable, "-m", "dvae_kernels.info"], cap)]


def run_constants(ctx: Context, cap: float) -> list[Part]:
    cmd = [sys.executable, "-m", "bench.gpu_measure", "constants", "--out",
           str(ctx.out / "constants.json")] + (["--dry-run"] if ctx.dry else [])
    part = _simple(ctx, "constants", cmd, cap)
    c = _read_json(ctx.out / "constants.json") if part.status == "passed" else None
    if c:
        part.note = (f"copy {c['copy_tbps']:.3g} TB/s, bf16 {c['bf16_tflops']:.3g} TFLOP/s, "
                     f"launch {c['launch_us_eager']:.3g} us eager, "
                     f"{c['launch_us_graphed']:.3g} us graphed")
    return [part]


def run_tests(ctx: Context, cap: float) -> list[Part]:
    files = [str(ROOT / "tests" / f) for f in TEST_FILES if (ROOT / "tests" / f).is_file()]
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    if ctx.dry:
        # every file collected as the GPU run would (imports, marks, parametrisation), and one
        # of them run for real: the pipeline, not the kernels
        cmd = base + ["--collect-only", *files]
        env = dict(ctx.env, DVAE_TEST_DEVICE="cpu")
    else:
        workers = max(1, min(8, (os.cpu_count() or 2) - 1))
        cmd = base + ["-n", str(workers), "-m", "not slow", *files]
        env = dict(ctx.env, DVAE_TEST_DEVICE="cuda")
    log = ctx.out / "tests.log"
    rc, sec = _run("tests", cmd, log, env, cap)
    note = _tail(log, 1 if rc == 0 else 3)
    status = _status(rc)
    if rc == PYTEST_NO_TESTS:
        status, note = "empty", "no test collected"
    return [Part("tests", status, rc, sec, " ".join(cmd), str(log), note, cap)]


def run_kernels(ctx: Context, cap: float) -> list[Part]:
    cmd = [sys.executable, "-m", "bench.gpu_measure", "kernels", "--out",
           str(ctx.out / "kernels.jsonl")] + (["--dry-run", "--seconds", "0.01"]
                                              if ctx.dry else ["--seconds", "0.3"])
    part = _simple(ctx, "kernels", cmd, cap)
    rows = read_jsonl(ctx.out / "kernels.jsonl")
    if rows:
        part.note = f"{len(rows)} op phases timed" + (
            " before the cap" if part.status == "timeout" else "")
    return [part]


def run_steps(ctx: Context, cap: float) -> list[Part]:
    """The training steps, one e2e run per case, against the step cost model."""
    if ctx.dry:
        cases = [("digits:4", "dry", ["--dry-run"])]
    else:
        common = ["--providers", "fused", "--K", "8", "--steps", "5", "--warmup", "2"]
        cases = [("imagenet256:64", "imagenet256_eager", common + ["--set", "sampler_graph=off"]),
                 ("imagenet256:64", "imagenet256_graphed",
                  common + ["--set", "sampler_graph=on"]),
                 ("mnist:256 cifar10:256", "small", common)]
    t_end = time.time() + cap
    log = ctx.out / "steps.log"
    log.write_text("")
    files, rcs, t0 = [], [], time.time()
    for case, name, extra in cases:
        left = t_end - time.time()
        if left < 5:
            rcs.append(TIMED_OUT)
            break
        dest = ctx.out / "steps" / name
        cmd = [sys.executable, "-m", "bench.e2e", "--cases", *case.split(), "--out",
               str(dest), *extra]
        rc, _ = _run("steps", cmd, log, ctx.env, left, mode="a")
        rcs.append(rc)
        if (dest / "e2e.json").is_file():
            files.append(dest / "e2e.json")
    sec = time.time() - t0
    if files:
        from .gpu_measure import compare_steps, gpu_key

        name = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu"
        (ctx.out / "steps.json").write_text(json.dumps(compare_steps(files, gpu_key(name)),
                                                       indent=1) + "\n")
    if any(rc == E2E_MISSING for rc in rcs):
        status = "missing"
    elif any(rc == TIMED_OUT for rc in rcs):
        status = "timeout"
    else:
        status = "passed" if all(rc == 0 for rc in rcs) else "failed"
    note = f"{len(files)} of {len(cases)} e2e runs" + ("" if status == "passed"
                                                        else ": " + _tail(log))
    return [Part("steps", status, rcs[-1] if rcs else None, sec,
                 "python -m bench.e2e (see steps.log)", str(log), note, cap)]


def _baseline_step(baseline: Path, args, cmd: list[str], ops: Sequence[str] | None = None
                   ) -> str:
    """Compare with the stored baseline when it holds rows of what this run measures (of
    ``ops``, when given), or note that this run's rows will be stored in it."""
    covered = baseline.is_file()
    if covered and ops:
        covered = any(r.get("op") in ops for r in json.loads(baseline.read_text())["rows"])
    if covered and not args.update_baseline:
        cmd += ["--compare", str(baseline), "--tolerance", str(args.tolerance)]
        return f"compared with {baseline.name}"
    return "" if args.dry_run else f"stored as {baseline.name}"


def _merge_baseline(results: Path, baseline: Path, key) -> None:
    """Store ``results``' rows in ``baseline`` (replacing rows with the same key), so that a
    report done in pieces builds one baseline."""
    new = json.loads(results.read_text())
    if baseline.is_file():
        old = json.loads(baseline.read_text())
        keep = {key(r) for r in new["rows"]}
        new["rows"] = [r for r in old["rows"] if key(r) not in keep] + new["rows"]
    baseline.write_text(json.dumps(new, indent=1, default=str) + "\n")


def run_micro(ctx: Context, cap: float) -> list[Part]:
    args = ctx.args
    dest = ctx.out / ("micro" if not args.ops else "micro_" + "_".join(args.ops))
    cmd = [sys.executable, "-m", "bench", "--out", str(dest)]
    if ctx.dry:
        # Every op at tiny sizes; torch.compile is left out here (its cold compiles take most
        # of a minute on two cores) and exercised by tests/test_bench.py's --quick run.
        cmd += ["--quick", "--sets", "tiny", "--no-compile", "--budget", "0.02"]
    else:
        cmd += ["--quick"] if args.quick else []
        cmd += ["--ops", *args.ops] if args.ops else []
        cmd += ["--budget", str(args.budget)] if args.budget else []
    baseline = ctx.out / "baseline.json"
    note = _baseline_step(baseline, args, cmd, args.ops or [s.name for s in specs.SPECS])
    log = ctx.out / f"{dest.name}.log"
    rc, sec = _run("micro", cmd, log, ctx.env, cap)
    if rc == 0 and not ctx.dry and "--compare" not in cmd:
        _merge_baseline(dest / "results.json", baseline, output.row_key)
    status = {0: "passed", 1: "regressed" if "--compare" in cmd else "failed",
              TIMED_OUT: "timeout"}.get(rc, "failed")
    if rc == 2 and "--compare" in cmd:
        status, note = "failed", "the comparison matched no row of the baseline"
    return [Part("micro", status, rc, sec, " ".join(cmd), str(log),
                 note if rc == 0 else _tail(log), cap)]


RUNNERS: dict[str, Callable[[Context, float], list[Part]]] = {
    "build": run_build, "info": run_info, "constants": run_constants, "tests": run_tests,
    "kernels": run_kernels, "steps": run_steps, "micro": run_micro}


# -- the summary --------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by the cap
    return rows


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ms(v) -> str:
    return "" if v is None else f"{v:.4g}"


def write_summary(out: Path, machine: dict, parts: list[Part], dry: bool,
                  budget: Budget | None = None) -> Path:
    """summary.json and summary.md from the parts run so far and what they wrote."""
    kernels = read_jsonl(out / "kernels.jsonl")
    steps = _read_json(out / "steps.json") or []
    constants = _read_json(out / "constants.json")
    data = {"machine": machine, "dry_run": dry, "commit": _commit(),
            "budget_s": budget.total if budget else None,
            "elapsed_s": round(budget.elapsed(), 1) if budget else None,
            "parts": [asdict(p) for p in parts], "constants": constants,
            "kernels": kernels, "steps": steps}
    (out / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# GPU report: {machine['name']}", "",
             f"{machine['date']}; commit {data['commit']}; torch {machine['torch']}, triton "
             f"{machine['triton']}, python {machine['python']}, dvae {machine['dvae']}"
             + (" (DRY RUN on the CPU: pipeline check, no meaningful figures)" if dry else ""),
             "", f"Budget {data['budget_s']} s, used {data['elapsed_s']} s.", "",
             "| part | status | seconds | cap | note |", "|---|---|---|---|---|"]
    for p in parts:
        cap = "" if p.cap is None else f"{p.cap:.0f}"
        lines.append(f"| {p.name} | {p.status} | {p.seconds:.0f} | {cap} | "
                     f"{p.note.replace('|', '/')} |")
    if constants:
        lines += ["", "## Constants (measured)", "", "| constant | value |", "|---|---|"]
        lines += [f"| {k} | {v if not isinstance(v, float) else f'{v:.4g}'} |"
                  for k, v in constants.items()]
    if kernels:
        lines += ["", "## Kernels: static report prediction against measurement", "",
                  "| op phase | shape | predicted ms | measured ms | measured / predicted | "
                  "achieved roofline |", "|---|---|---|---|---|---|"]
        for r in kernels:
            lines.append(f"| {r['op']}.{r['phase']} | {r['shape']} | "
                         f"{_ms(r.get('predicted_ms'))} | "
                         f"{_ms(r.get('measured_ms')) or r.get('error', '')} | "
                         f"{_ms(r.get('measured_over_predicted'))} | "
                         f"{_ms(r.get('achieved_roofline'))} |")
    if steps:
        lines += ["", "## Training steps: step cost model against measurement", "",
                  "| preset | batch | sampler | phase | predicted ms | measured ms |",
                  "|---|---|---|---|---|---|"]
        for r in steps:
            lines.append(f"| {r['preset']} | {r['batch_size']} | {r['sampler']} | total | "
                         f"{_ms(r.get('predicted_ms'))} | {_ms(r.get('measured_ms'))} |")
            for ph, v in (r.get("phases") or {}).items():
                lines.append(f"| | | | {ph} | {_ms(v.get('predicted_ms'))} | "
                             f"{_ms(v.get('measured_ms'))} |")
    md = out / "summary.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def _commit() -> str:
    try:
        from .tables import current_commit

        return current_commit()
    except Exception:  # no git on a lent machine's copy of the tree
        return "unknown"


def archive_logs(out: Path) -> Path:
    """Every log and raw result into one archive (a lent machine sends back few files)."""
    path = out / "logs.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(out.rglob("*")):
            if f.is_file() and f.suffix in (".log", ".jsonl", ".json", ".csv") \
                    and f.name != "summary.json":
                tar.add(f, arcname=str(f.relative_to(out)))
    return path


def _image_env(env: dict, out: Path) -> dict:
    """``env`` in which :data:`IMAGE_LACKS` cannot be imported (a sitecustomize in front of
    the path), as on the GPU image."""
    shim = out / "image_shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        f"for _name in {IMAGE_LACKS!r}:\n"
        "    sys.modules[_name] = None  # import raises ModuleNotFoundError, as on the image\n")
    return dict(env, PYTHONPATH=os.pathsep.join([str(shim), env.get("PYTHONPATH", "")]))


# -- calibration --------------------------------------------------------------------------------


def calibrate(summary_path: Path, constants_path: Path | None = None) -> Path:
    """Write the constants a GPU run measured into ``bench/gpu_constants.json`` under the GPU's
    key (h100, h200), with its name, commit and date; the predictors read them from there."""
    from .gpu_measure import gpu_key
    from .gpu_model import CONSTANTS_FILE

    summary = json.loads(Path(summary_path).read_text())
    if summary.get("dry_run"):
        raise ValueError(f"{summary_path}: a dry run's figures calibrate nothing")
    machine = summary.get("machine") or {}
    key = gpu_key(machine.get("gpu") or machine.get("name") or "")
    if key is None:
        raise ValueError(f"{summary_path}: the predictors model the H100 and H200; this run "
                         f"was on {machine.get('name')!r}")
    measured = summary.get("constants")
    if not measured:
        raise ValueError(f"{summary_path}: its constants part did not run (no constants)")
    path = constants_path or CONSTANTS_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    entry = {k: measured[k] for k in ("copy_tbps", "bf16_tflops", "fp32_tflops",
                                      "launch_us_eager", "launch_us_graphed",
                                      "matmul_efficiency") if k in measured}
    entry.update(gpu=machine.get("gpu") or machine.get("name"), commit=summary.get("commit"),
                 date=machine.get("date"), summary=str(summary_path))
    data[key] = entry
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


# -- the command --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--time-budget", type=float, default=None,
                    help=f"the whole report's wall clock in seconds (default {DEFAULT_BUDGET:.0f}"
                    f"; dry run {DRY_BUDGET:.0f})")
    ap.add_argument("--dry-run", action="store_true",
                    help="on the CPU at tiny sizes, into a temporary folder (a pipeline check)")
    ap.add_argument("--out", help="default: bench/results/<gpu-name>/ (a temp dir on a dry run)")
    ap.add_argument("--skip", nargs="+", choices=PARTS, default=[], help="parts to leave out")
    ap.add_argument("--quick", action="store_true", help="microbenchmarks' --quick shapes")
    ap.add_argument("--ops", nargs="+", metavar="OP", help="microbenchmarks of these ops only")
    ap.add_argument("--budget", type=float, help="microbenchmarks' --budget (seconds per case)")
    ap.add_argument("--tolerance", type=float, default=output.DEFAULT_TOLERANCE,
                    help="regression tolerance against the stored baselines")
    ap.add_argument("--update-baseline", action="store_true",
                    help="store this run's results as the machine's baselines")
    return ap.parse_args(argv)


def _calibrate_main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_report calibrate",
                                 description="write a GPU run's measured constants into "
                                 "bench/gpu_constants.json")
    ap.add_argument("summary", type=Path, help="the summary.json of a GPU run")
    ap.add_argument("--out", type=Path, default=None, help="default bench/gpu_constants.json")
    args = ap.parse_args(argv)
    try:
        path = calibrate(args.summary, args.out)
    except (OSError, ValueError) as err:
        print(f"calibrate: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["calibrate"]:
        return _calibrate_main(argv[1:])
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --dry-run to check the pipeline on the CPU",
              file=sys.stderr)
        return 2
    budget = Budget(args.time_budget or (DRY_BUDGET if args.dry_run else DEFAULT_BUDGET))
    device = torch.device("cpu" if args.dry_run else "cuda")
    machine = machine_info(device)
    if args.out:
        out = Path(args.out)
    elif args.dry_run:
        out = Path(tempfile.mkdtemp(prefix="gpu_report_dry_"))
    else:
        out = ROOT / "bench" / "results" / machine["slug"]
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"  # no GPU: Triton through its interpreter
        env = _image_env(env, out)
    else:
        # compiled Triton on the GPU: the interpreter must be off in every child process
        env["TRITON_INTERPRET"] = "0"
    ctx = Context(out, env, args.dry_run, args, device)
    caps = DRY_CAPS if args.dry_run else CAPS
    print(f"[gpu_report] {machine['name']} -> {out}" + (" (dry run)" if args.dry_run else "")
          + f", budget {budget.total:.0f} s", flush=True)
    parts: list[Part] = []
    for name in PARTS:
        if name in args.skip:
            continue
        left = budget.left() - RESERVE
        if left < 5:
            parts.append(Part(name, "skipped", None, 0.0, "", "",
                              f"the budget of {budget.total:.0f} s was spent"))
        else:
            parts.extend(RUNNERS[name](ctx, min(caps[name], left)))
        md = write_summary(out, machine, parts, args.dry_run, budget)
    archive = archive_logs(out)
    md = write_summary(out, machine, parts, args.dry_run, budget)
    print()
    for p in parts:
        print(f"[gpu_report] {p.name:<10} {p.status:<9} {p.seconds:6.0f} s  {p.note}")
    print(f"[gpu_report] summary: {md}; logs: {archive}")
    ok = {"passed", "empty", "skipped"}
    return 0 if all(p.status in ok for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
