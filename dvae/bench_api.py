"""The training module's entry points for benchmarks (bench/e2e.py, bench/replicate.py).

One full DAPS training step of a preset's model on a fixed synthetic batch::

    step, times = make_step("imagenet256", batch_size=64, device="cuda")
    for _ in range(20):
        metrics = step()          # sample, reward, teacher-forced, weights, losses, optimizer
    times["sample"]               # seconds of each call's sample phase (when timed)

and the training loop's own cost against that bare step (:func:`benchmark_loop`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .config import load_config
from .models import build_model
from .profiling import PHASES, Phases
from .train_step import TrainStep
from .trainer import Trainer, _Window


def make_step(preset: str, *, batch_size: int, K: int | None = None,
              device: str | torch.device = "cpu", kernel_backend: str | None = None,
              compile: bool = False, timed: bool = True, seed: int = 0, **overrides
              ) -> tuple[Callable[[], dict[str, torch.Tensor]], dict[str, list[float]]]:
    """Build ``preset``'s model at the given sizes and return ``(step, times)``.

    Args:
        preset: ``digits``, ``mnist``, ``cifar10`` or ``imagenet256`` (docs/algorithm.md).
        batch_size: N images per step.
        K: samples per image (default: the preset's, 8).
        device: where to run.
        kernel_backend: passed to every dvae_kernels call (``"torch"`` is the reference path;
            None lets dvae_kernels choose).
        compile: ``torch.compile`` the differentiable forward (decoder + teacher-forced pass).
        timed: time each phase (synchronising the device around each); when False the step
            never synchronises and ``times`` stays empty.
        seed: initialises the model, the batch and the sampling stream.
        **overrides: any other :class:`dvae.config.Config` field (``latent_len=256``, ...).

    Returns:
        ``step()``, running one training step and returning its metrics as 0-d tensors
        (``float()`` them to read; that synchronises), and ``times``, mapping each phase in
        :data:`dvae.profiling.PHASES` to a list of per-call seconds.
    """
    values = dict(overrides)
    if K is not None:
        values["num_samples"] = K
    values.update(batch_size=batch_size, kernel_backend=kernel_backend, compile=compile,
                  seed=seed, dataset="synthetic")
    cfg = load_config(preset, [f"{k}={_yaml(v)}" for k, v in values.items()])
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(cfg).to(dev)
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    shape = (batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    if cfg.likelihood == "bernoulli":
        x = (torch.rand(shape, generator=g, device=dev) > 0.5).float()
    else:
        x = torch.randn(shape, generator=g, device=dev)
    fwd = torch.compile(model) if compile else model
    phases = Phases(timed=timed, device=dev)
    train_step = TrainStep(fwd, cfg, generator=g, phases=phases)
    counter = [0]

    def step() -> dict[str, torch.Tensor]:
        metrics = train_step(x, counter[0])
        counter[0] += 1
        return metrics

    times = phases.times
    for name in PHASES:
        times.setdefault(name, [])
    return step, times


def benchmark_loop(trainer: Trainer, steps: int, warmup: int = 2) -> dict[str, float]:
    """The training loop's own cost against its bare step, measured alternately in one run:
    ``loop_ms`` is one loop iteration of ``trainer`` (batch, preprocessing, step, metric sums,
    progress bar), ``step_ms`` the step alone on a fixed batch. Both advance the model (timing
    only; use a throwaway Trainer)."""
    from tqdm.auto import tqdm

    def sync():
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)

    bar = tqdm(total=None, disable=not trainer.cfg.progress or trainer.rank != 0,
               desc="dvae train (benchmark)", dynamic_ncols=True)
    window = _Window(trainer.device)
    x = trainer.preprocess(next(trainer.batches)[0].to(trainer.device))
    loop, bare = [], []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        trainer._train_one(window, bar)
        sync()
        t1 = time.perf_counter()
        trainer.step_fn(x, trainer.step)
        sync()
        t2 = time.perf_counter()
        if i >= warmup:
            loop.append(t1 - t0)
            bare.append(t2 - t1)
    bar.close()
    loop_ms = 1e3 * statistics.median(loop)
    step_ms = 1e3 * statistics.median(bare)
    return {"loop_ms": loop_ms, "step_ms": step_ms, "loop_over_step": loop_ms / step_ms}


def _yaml(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
