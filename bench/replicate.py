"""A wall-clock-budgeted training run of one Table 1 method (docs/algorithm.md), then its test
figures, written with the machine they ran on.

    python -m bench.replicate --method M --preset P --minutes T [--out DIR]
        [--fit-schedule] [key=value ...] [--set key=value ...]
        [--prior-minutes T2 [--prior-set key=value ...]]

Options and ``key=value`` overrides may come in any order (``--set key=value`` is the same
override in option form). The run trains until its training wall-clock reaches T minutes (or
the preset's steps end), then evaluates on the test set (``eval_samples`` of the preset) and
saves its checkpoint. Every twentieth of the budget it evaluates the first ``curve_samples``
test images (the points of ``dvae compare --curves``; ``eval_every_seconds=`` changes it).
Its ``metrics.jsonl`` is what ``dvae compare`` reads; ``result.json`` in the out folder holds
the same figures with the machine.

Schedules: by default the preset's ``steps`` define β's (and τ's, and a cosine learning
rate's) annealing, as in the paper (250k steps on MNIST): a 10-minute run sees the first part
of the paper's schedule. ``--fit-schedule`` times 20 steps first (``Trainer.benchmark``) and
sets ``steps`` to what 90% of the budget holds, so the whole schedule runs within the budget.

With ``--prior-minutes`` the generation prior (:mod:`dvae.prior`) then trains on the tokenizer
for T2 minutes of its own training wall-clock (out folder ``DIR/prior``), and its test loss
and generation metrics join ``result.json`` under ``prior`` (``bench.tables record`` makes them
a row of the ``generation`` table). ``--prior-set key=value`` sets a prior config key.

Examples::

    python -m bench.replicate --method vq --preset digits --minutes 10
    python -m bench.replicate --preset mnist --method fsq --minutes 10 data_path=mnist.npz
    python -m bench.replicate --method vq --preset digits --minutes 2 --prior-minutes 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from dvae.config import METHODS, PRESETS

    p = argparse.ArgumentParser(prog="python -m bench.replicate",
                                description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--preset", default="digits", choices=tuple(PRESETS))
    p.add_argument("--minutes", type=float, required=True, help="training wall-clock budget")
    p.add_argument("--out", default=None, help="out_dir (default runs/replicate/PRESET/METHOD)")
    p.add_argument("--fit-schedule", action="store_true",
                   help="set steps so that the schedules end with the budget")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="a config override (also accepted bare, anywhere)")
    p.add_argument("--prior-minutes", type=float, default=None,
                   help="then train the generation prior for this wall-clock budget")
    p.add_argument("--prior-set", action="append", default=[], metavar="key=value",
                   help="a prior config key (dvae prior train --help)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def _pilot_seconds_per_step(cfg, steps: int = 20) -> float:
    """Seconds per training-loop iteration of ``cfg``, the median of ``steps`` timed by the
    trainer's own benchmark mode in a throwaway run."""
    import dataclasses

    from dvae.bench_api import benchmark_loop
    from dvae.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        pilot = dataclasses.replace(cfg, out_dir=tmp, progress=False, tensorboard=False)
        trainer = Trainer(pilot)
        try:
            return benchmark_loop(trainer, steps, warmup=3)["loop_ms"] / 1000
        finally:
            trainer.close()


def _prior(args, out: str, cfg) -> dict:
    """Train the prior of the tokenizer just saved for ``--prior-minutes``; its figures."""
    from dvae.prior.config import prior_config
    from dvae.prior.train import PriorTrainer

    sets = ["progress=false", f"out_dir={out}/prior", *args.prior_set]
    if cfg.threads is not None and not any(s.startswith("threads=") for s in args.prior_set):
        sets.append(f"threads={cfg.threads}")
    try:
        pcfg = prior_config(f"{out}/checkpoint.pt", args.preset, sets)
    except ValueError as err:
        raise SystemExit(f"replicate: error: --prior-set: {err}") from None
    trainer = PriorTrainer(pcfg, overwrite=True)
    try:
        trainer.run(time_budget=args.prior_minutes * 60)
        res = dict(trainer.last_eval) or trainer.evaluate()
    finally:
        trainer.close()
    return {"budget_minutes": args.prior_minutes, "steps": trainer.step,
            "train_seconds": round(trainer.train_seconds, 1),
            "ms_per_step": round(1000 * trainer.train_seconds / max(trainer.step, 1), 1),
            "overrides": args.prior_set, **{f"test_{k}": v for k, v in res.items()}}


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_intermixed_args(argv)
    overrides = [*args.overrides, *args.set]
    if args.minutes <= 0:
        raise SystemExit(f"replicate: error: --minutes must be > 0, got {args.minutes}")
    if args.prior_minutes is not None and args.prior_minutes <= 0:
        raise SystemExit(f"replicate: error: --prior-minutes must be > 0, got "
                         f"{args.prior_minutes}")

    import torch

    from dvae.config import load_config
    from dvae.trainer import Trainer
    from dvae_kernels.info import machine

    out = args.out or f"runs/replicate/{args.preset}/{args.method}"
    # curve points (dvae compare --curves) every twentieth of the budget, on the first
    # curve_samples test images; the final evaluation on eval_samples
    base = ["progress=false", "eval_every=0", f"eval_every_seconds={args.minutes * 3:g}",
            "ckpt_every=0", *overrides]
    try:
        cfg = load_config(args.preset, [f"method={args.method}", f"out_dir={out}", *base])
    except ValueError as err:
        raise SystemExit(f"replicate: error: {err}") from None
    budget = args.minutes * 60
    pilot = None
    if args.fit_schedule:
        pilot = _pilot_seconds_per_step(cfg)
        steps = max(1, int(0.9 * budget / pilot))  # logs and evaluation take the rest
        cfg = load_config(args.preset, [f"method={args.method}", f"out_dir={out}", *base,
                                        f"steps={steps}"])
    Path(out).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, overwrite=True)
    try:
        last = trainer.run(time_budget=budget)
        res = dict(trainer.last_eval) or trainer.evaluate()
    finally:
        trainer.close()
    result = {
        "method": cfg.method,
        "preset": args.preset,
        "bits_per_image": cfg.bits_per_image,
        "budget_minutes": args.minutes,
        "steps": trainer.step,
        "schedule_steps": cfg.steps,
        "pilot_seconds_per_step": pilot,
        "train_seconds": round(trainer.train_seconds, 1),
        "ms_per_step": round(1000 * trainer.train_seconds / max(trainer.step, 1), 1),
        **{f"test_{k}": v for k, v in res.items()},
        "train_log_px": last.get("log_px"),
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "overrides": overrides,
    }
    if args.prior_minutes:
        result["prior"] = _prior(args, out, cfg)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
