"""Timing (CUDA events on a GPU, ``perf_counter`` on a CPU), the statistics every benchmark
keeps (median, p20, p80), and the roofline measured in the same run (device-copy bandwidth,
matmul rate)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------
# Timing and statistics
# ---------------------------------------------------------------------------------------------


class Timer:
    """Times one call: CUDA events on a GPU (no host sync between calls), ``perf_counter`` on
    a CPU (CPU ops are synchronous). ``start``/``stop`` bracket the call; ``seconds`` resolves
    the samples of a round once the round is over."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, started):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return (started, ev)
        return time.perf_counter() - started

    def seconds(self, samples: list) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in samples]
        return list(samples)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p20 and p80 in milliseconds."""
    xs = sorted(seconds)
    if len(xs) == 1:
        q = [xs[0]] * 9
    else:
        q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"median_ms": statistics.median(xs) * 1e3, "p20_ms": q[1] * 1e3,
            "p80_ms": q[7] * 1e3, "samples": len(xs)}


def time_fn(fn: Callable[[], Any], timer: Timer, reps: int, warmup: int) -> list[float]:
    """Plain repeated timing of one function (used for the roofline probes)."""
    for _ in range(warmup):
        fn()
    timer.sync()
    samples = []
    for _ in range(reps):
        t = timer.start()
        fn()
        samples.append(timer.stop(t))
    return timer.seconds(samples)


def measure_roofline(device: torch.device, quick: bool, tiny: bool = False) -> dict[str, Any]:
    """Device-copy bandwidth (GB/s, read + write counted) and matmul rate (TFLOP/s): bf16 on a
    GPU (the dtype the ops run in there), float32 on a CPU. Each result is later given as a
    fraction of one of these, so the ratio, not the absolute figure, is what carries over.
    ``tiny`` (pipeline checks only) uses probes small enough to sit in cache."""
    timer = Timer(device)
    if device.type == "cuda":
        copy_elems, mm_n, mm_dtype = 256 << 20, 8192, torch.bfloat16  # 512 MiB bf16 per buffer
    else:
        # 128 / 256 MiB float32 per buffer: well past any CPU's last-level cache.
        copy_elems = (32 << 20) if quick else (64 << 20)
        mm_n, mm_dtype = (512 if quick else 1024), torch.float32
    if tiny:
        copy_elems, mm_n = 1 << 20, 128
    copy_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    src = torch.randn(copy_elems, device=device, dtype=torch.float32).to(copy_dtype)
    dst = torch.empty_like(src)
    t_copy = statistics.median(time_fn(lambda: dst.copy_(src), timer, reps=10 if quick else 30,
                                       warmup=3))
    copy_bytes = 2 * src.numel() * src.element_size()
    a = torch.randn(mm_n, mm_n, device=device, dtype=torch.float32).to(mm_dtype)
    b = torch.randn(mm_n, mm_n, device=device, dtype=torch.float32).to(mm_dtype)
    t_mm = statistics.median(time_fn(lambda: a @ b, timer, reps=5 if quick else 20, warmup=2))
    return {
        "copy_GBps": copy_bytes / t_copy / 1e9,
        "copy_bytes": copy_bytes,
        "copy_dtype": str(copy_dtype).replace("torch.", ""),
        "matmul_TFLOPs": 2 * mm_n**3 / t_mm / 1e12,
        "matmul_n": mm_n,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
    }
