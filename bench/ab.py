"""Before and after in one run: ``python -m bench.ab --base DIR [--rounds R] -- E2E_ARGS``.

Runs ``python -m bench.e2e E2E_ARGS`` alternately in two source trees, the base (another
checkout, e.g. ``git worktree add /tmp/base <rev>`` with its extension built in place) and this
one, ``R`` rounds in the order base, new, new, base, base, ... (ABBA: a machine that drifts
slower or faster over the run biases neither side). Each run is its own process, so process-
wide settings (allocator, threads) are each tree's own. Prints, per preset, batch and provider,
the median over rounds of each side's step time and their ratio, and writes ``ab.json``.

On the shared 2-core development machines a speed figure means something only as a ratio
measured in one run; this is that run for a change to the training step:

    git worktree add /tmp/base HEAD
    (cd /tmp/base && DVAE_KERNELS_BUILD_CUDA=0 python setup.py build_ext --inplace)
    python -m bench.ab --base /tmp/base --rounds 4 -- --cases mnist:256 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def run_e2e(tree: Path, e2e_args: list[str], out: Path) -> dict:
    """One ``bench.e2e`` run with ``tree`` first on the import path; returns its report."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    cmd = [sys.executable, "-m", "bench.e2e", *e2e_args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.e2e in {tree} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads((out / "e2e.json").read_text())


def _key(row: dict) -> tuple:
    return (row["preset"], row["batch_size"], row["provider"])


def summarise(rounds: list[dict[str, dict]]) -> list[dict]:
    """``rounds``: ``[{"base": report, "new": report}, ...]`` -> one row per case and
    provider: the median step time of each side and their ratio (new / base)."""
    table: dict[tuple, dict[str, list]] = {}
    for rnd in rounds:
        for side in ("base", "new"):
            for row in rnd[side]["rows"]:
                if row.get("status") != "ok":
                    continue
                entry = table.setdefault(_key(row), {"base": [], "new": [],
                                                     "base_phases": [], "new_phases": []})
                entry[side].append(row["median_ms"])
                entry[f"{side}_phases"].append(row.get("phases_ms") or {})
    out = []
    for (preset, batch, provider), e in table.items():
        if not e["base"] or not e["new"]:
            continue
        base, new = statistics.median(e["base"]), statistics.median(e["new"])
        phases = {}
        for side in ("base", "new"):
            names = {n for p in e[f"{side}_phases"] for n in p}
            phases[side] = {n: statistics.median(p[n] for p in e[f"{side}_phases"] if n in p)
                            for n in sorted(names)}
        out.append({"preset": preset, "batch_size": batch, "provider": provider,
                    "base_ms": base, "new_ms": new, "new_over_base": new / base,
                    "base_rounds_ms": e["base"], "new_rounds_ms": e["new"],
                    "phases_ms": phases})
    return out


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'case':<14}{'provider':<10}{'base ms':>10}{'new ms':>10}{'new/base':>10}"
             "   rounds (base | new)"]
    for r in rows:
        case = f"{r['preset']}:{r['batch_size']}"
        rb = " ".join(f"{x:.0f}" for x in r["base_rounds_ms"])
        rn = " ".join(f"{x:.0f}" for x in r["new_rounds_ms"])
        lines.append(f"{case:<14}{r['provider']:<10}{r['base_ms']:>10.1f}{r['new_ms']:>10.1f}"
                     f"{r['new_over_base']:>10.3f}   {rb} | {rn}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.ab",
        description="bench.e2e alternately in a base tree and this one (ABBA rounds).")
    ap.add_argument("--base", required=True, help="the base source tree (extension built)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of base+new (default 4)")
    ap.add_argument("--out", help="folder for ab.json (default: print only)")
    ap.add_argument("e2e_args", nargs=argparse.REMAINDER,
                    help="after --: the arguments of python -m bench.e2e")
    args = ap.parse_args(argv)
    if args.e2e_args and args.e2e_args[0] == "--":
        args.e2e_args = args.e2e_args[1:]
    base = Path(args.base)
    if not (base / "bench" / "e2e.py").is_file():
        ap.error(f"--base must be a dvae source tree (with bench/e2e.py), got {args.base!r}")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if "--out" in args.e2e_args:
        ap.error("give --out to bench.ab, not to bench.e2e")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    trees = {"base": Path(args.base).resolve(), "new": HERE}
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench_ab_") as tmp:
        for i in range(args.rounds):
            order = ("base", "new") if i % 2 == 0 else ("new", "base")
            rnd = {}
            for side in order:
                rnd[side] = run_e2e(trees[side], args.e2e_args, Path(tmp) / f"{i}_{side}")
                print(f"round {i + 1}/{args.rounds} {side}: " + ", ".join(
                    f"{r['provider']} {r['median_ms']:.1f} ms" for r in rnd[side]["rows"]
                    if r.get("status") == "ok"), flush=True)
            rounds.append(rnd)
    rows = summarise(rounds)
    print()
    print(format_rows(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        machine = rounds[0]["new"].get("machine")
        from .tables import current_commit

        report = {"schema": 1, "machine": machine, "base": str(trees["base"]),
                  "base_commit": current_commit(trees["base"]),
                  "e2e_args": args.e2e_args, "rounds": args.rounds, "rows": rows}
        (out / "ab.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {out / 'ab.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
