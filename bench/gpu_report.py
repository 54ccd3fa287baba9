"""The one command to run on a GPU machine: ``python -m bench.gpu_report``.

It runs, each in its own process, with its log kept:

1. ``python -m dvae_kernels.info`` (versions, devices, backends);
2. the GPU test suite: ``pytest -m gpu`` on CUDA tensors with ``TRITON_INTERPRET=0`` (compiled
   Triton, not the interpreter), and the op tests on CUDA when ``tests/conftest.py`` offers the
   ``DVAE_TEST_DEVICE`` hook;
3. the kernel microbenchmarks (``python -m bench``), compared with this machine's stored
   baseline when there is one;
4. the end-to-end training-step benchmark (``python -m bench.e2e``), likewise.

Everything goes under ``bench/results/<gpu-name>/``: the logs, ``micro/`` and ``e2e/`` results,
``summary.json`` and ``summary.md``. The first run on a machine stores its results as that
machine's baselines (``baseline.json``, ``baseline_e2e.json``); later runs into the same folder
are checked against them (``--update-baseline`` replaces them). ``python -m bench.tables record``
on ``micro/`` and ``e2e/`` keeps the figures as rows of the results tables.

``--dry-run`` does the same on the CPU at tiny sizes in a temporary folder (about a minute),
so that CI keeps the report from rotting. It checks the pipeline, not the speed.

Exit status: 0 when every part passed, 1 when one failed, regressed or is missing (e.g. the
training module's benchmark API), 2 on bad usage (no GPU without ``--dry-run``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import output, specs
from .machine import machine_info

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("info", "tests", "micro", "e2e")
# pytest's exit status when it collected no test (e.g. no test is marked gpu yet).
PYTEST_NO_TESTS = 5
E2E_MISSING = 3  # bench.e2e's exit status when the training module is absent


@dataclass
class Part:
    name: str
    status: str  # passed | failed | regressed | missing | empty | skipped
    rc: int | None
    seconds: float
    command: str
    log: str
    note: str = ""


def _run(name: str, cmd: list[str], log: Path, env: dict, timeout: float) -> tuple[int, float]:
    """Run ``cmd`` from the repository root, output to ``log`` (and a line per part here)."""
    print(f"[gpu_report] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_report] timed out after {timeout:.0f} s\n")
            rc = 124
    return rc, time.time() - t0


def _tail(path: Path, n: int = 3) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[:400]


def _has_device_hook() -> bool:
    conftest = ROOT / "tests" / "conftest.py"
    return conftest.is_file() and "DVAE_TEST_DEVICE" in conftest.read_text()


def run_info(out: Path, env: dict, dry: bool) -> Part:
    cmd = [sys.executable, "-m", "dvae_kernels.info"]
    log = out / "info.log"
    rc, sec = _run("info", cmd, log, env, timeout=300)
    return Part("info", "passed" if rc == 0 else "failed", rc, sec, " ".join(cmd), str(log),
                "" if rc == 0 else _tail(log))


def run_tests(out: Path, env: dict, dry: bool) -> list[Part]:
    parts = []
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    # gpu-marked tests: on the CPU of a dry run they are collected and skipped.
    cmd = base + ["-m", "gpu"]
    log = out / "tests_gpu.log"
    rc, sec = _run("tests (-m gpu)", cmd, log, env, timeout=3600)
    if rc == 0:
        status, note = "passed", _tail(log, 1)
    elif rc == PYTEST_NO_TESTS:
        status, note = "empty", "no test is marked gpu"
    else:
        status, note = "failed", _tail(log)
    parts.append(Part("tests_gpu", status, rc, sec, " ".join(cmd), str(log), note))
    # The op tests on CUDA tensors, when the test suite can be pointed at a device.
    if _has_device_hook():
        cmd = base + (["--collect-only"] if dry else []) + ["-m", "not slow"]
        log = out / "tests_cuda.log"
        rc, sec = _run("tests (DVAE_TEST_DEVICE=cuda)", cmd, log,
                       dict(env, DVAE_TEST_DEVICE="cpu" if dry else "cuda"), timeout=3600)
        parts.append(Part("tests_cuda", "passed" if rc == 0 else "failed", rc, sec,
                          "DVAE_TEST_DEVICE=cuda " + " ".join(cmd), str(log),
                          _tail(log, 1 if rc == 0 else 3)))
    else:
        parts.append(Part("tests_cuda", "skipped", None, 0.0, "", "",
                          "tests/conftest.py has no DVAE_TEST_DEVICE hook: the op tests run on "
                          "CPU tensors only, so only gpu-marked tests ran on the GPU"))
    return parts


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


def run_micro(out: Path, env: dict, args) -> Part:
    # One folder per piece when the microbenchmarks are split by op (see --ops).
    dest = out / ("micro" if not args.ops else "micro_" + "_".join(args.ops))
    cmd = [sys.executable, "-m", "bench", "--out", str(dest)]
    if args.dry_run:
        # Every op at tiny sizes; torch.compile is left out here (its cold compiles take most
        # of a minute on two cores) and exercised by tests/test_bench.py's --quick run.
        cmd += ["--quick", "--sets", "tiny", "--no-compile", "--budget", "0.02"]
    else:
        cmd += ["--quick"] if args.quick else []
        cmd += ["--ops", *args.ops] if args.ops else []
        cmd += ["--budget", str(args.budget)] if args.budget else []
    baseline = out / "baseline.json"
    note = _baseline_step(baseline, args, cmd, args.ops or [s.name for s in specs.SPECS])
    log = out / f"{dest.name}.log"
    rc, sec = _run("micro", cmd, log, env, timeout=7200)
    if rc == 0 and not args.dry_run and "--compare" not in cmd:
        _merge_baseline(dest / "results.json", baseline, output.row_key)
    status = {0: "passed", 1: "regressed" if "--compare" in cmd else "failed"}.get(rc, "failed")
    if rc == 2 and "--compare" in cmd:
        status, note = "failed", "the comparison matched no row of the baseline"
    return Part(dest.name, status, rc, sec, " ".join(cmd), str(log),
                note if rc == 0 else _tail(log))


def run_e2e(out: Path, env: dict, args) -> Part:
    dest = out / "e2e"
    cmd = [sys.executable, "-m", "bench.e2e", "--out", str(dest)]
    if args.dry_run:
        cmd += ["--dry-run"]
    baseline = out / "baseline_e2e.json"
    note = _baseline_step(baseline, args, cmd)
    log = out / "e2e.log"
    rc, sec = _run("e2e", cmd, log, env, timeout=7200)
    if rc == 0 and not args.dry_run and "--compare" not in cmd:
        from .e2e import row_key as e2e_key

        _merge_baseline(dest / "e2e.json", baseline, e2e_key)
    if rc == E2E_MISSING:
        status, note = "missing", _tail(log, 1)
    elif rc == 0:
        status = "passed"
    else:
        status = "regressed" if rc == 1 and "--compare" in cmd and _no_errors(dest) else "failed"
        note = _tail(log)
    return Part("e2e", status, rc, sec, " ".join(cmd), str(log), note)


def _no_errors(dest: Path) -> bool:
    try:
        rows = json.loads((dest / "e2e.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return False
    return all(r.get("status") == "ok" for r in rows)


def write_summary(out: Path, machine: dict, parts: list[Part], dry: bool) -> tuple[Path, list]:
    """summary.json and summary.md. Parts from an earlier run into the same folder (a report
    done in pieces with --skip, e.g. under a per-command time limit) are kept unless rerun."""
    merged: dict[str, dict] = {}
    old = out / "summary.json"
    if old.is_file():
        try:
            earlier = json.loads(old.read_text())
            if earlier.get("dry_run") == dry:
                merged = {p["name"]: p for p in earlier.get("parts", [])}
        except (ValueError, KeyError):
            merged = {}
    for p in parts:
        merged[p.name] = dict(asdict(p), date=machine["date"])
    parts = [Part(**{k: v for k, v in p.items() if k != "date"}) for p in merged.values()]
    data = {"machine": machine, "dry_run": dry, "parts": list(merged.values())}
    (out / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# GPU report: {machine['name']}", "",
             f"{machine['date']}; torch {machine['torch']}, triton {machine['triton']}, "
             f"python {machine['python']}, dvae {machine['dvae']}"
             + (" (DRY RUN on the CPU: pipeline check, no meaningful figures)" if dry else ""),
             "", "| part | status | seconds | note |", "|---|---|---|---|"]
    for p in parts:
        lines.append(f"| {p.name} | {p.status} | {p.seconds:.0f} | {p.note.replace('|', '/')} |")
    logs = [("Microbenchmarks", log) for log in sorted(out.glob("micro*.log"))]
    logs.append(("End to end", out / "e2e.log"))
    for name, log in logs:
        if log.is_file():
            lines += ["", f"## {name} ({log.name})", "", "```",
                      log.read_text(errors="replace").strip()[-20000:], "```"]
    md = out / "summary.md"
    md.write_text("\n".join(lines) + "\n")
    return md, parts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__.split(
        "\n\n")[0])
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --dry-run to check the pipeline on the CPU",
              file=sys.stderr)
        return 2
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
    # Compiled Triton on the GPU: the interpreter must be off in every child process (the test
    # suite's conftest only sets it when unset).
    env["TRITON_INTERPRET"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    print(f"[gpu_report] {machine['name']} -> {out}" + (" (dry run)" if args.dry_run else ""),
          flush=True)
    parts: list[Part] = []
    if "info" not in args.skip:
        parts.append(run_info(out, env, args.dry_run))
    if "tests" not in args.skip:
        parts.extend(run_tests(out, env, args.dry_run))
    if "micro" not in args.skip:
        parts.append(run_micro(out, env, args))
    if "e2e" not in args.skip:
        parts.append(run_e2e(out, env, args))
    md, all_parts = write_summary(out, machine, parts, args.dry_run)
    print()
    ran = {p.name for p in parts}
    for p in all_parts:
        when = "" if p.name in ran else "  (from an earlier run)"
        print(f"[gpu_report] {p.name:<10} {p.status:<9} {p.seconds:6.0f} s  {p.note}{when}")
    print(f"[gpu_report] summary: {md}")
    ok = {"passed", "empty", "skipped"}
    return 0 if all(p.status in ok for p in parts) else 1  # this run's parts decide


if __name__ == "__main__":
    sys.exit(main())
