"""Run-time choice of a Triton launch configuration, among candidates that fit the device.

A kernel declares candidate configurations (tile rows, warps, pipeline stages) that do the same
per-row arithmetic, so the choice changes the speed, not the values (for the fused linear
forward, the same bits on a GPU: a gpu-marked test checks it). :func:`fitting` prunes them by
the shared memory of the target architecture (``SMEM_BYTES``: the opt-in maximum per block of
sm_80/86/89/90); :class:`Tuner` times the ones left on the first launch of each shape class on
a CUDA device (CUDA events, a warm-up and three timed runs each) and keeps the fastest for the
process.

No timing happens, and the first fitting candidate (the static report's choice) is used, when:
the launch is interpreted (``TRITON_INTERPRET=1``), recorded by the static report
(:func:`dvae_kernels._specialize.capture`, which also compiles that candidate), inside a CUDA
graph capture (a capture cannot time; the choice made before it, if any, is kept), or with
``DVAE_KERNELS_AUTOTUNE=0`` (which also pins the launch for bitwise comparisons across
processes). ``Tuner.choices`` lists what was chosen, per shape class.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _triton

ENV_VAR = "DVAE_KERNELS_AUTOTUNE"

#: Shared memory a block may use (opt-in maximum), bytes, by compute capability.
SMEM_BYTES = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
              90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


def smem_limit(capability: int | None) -> int:
    """The shared memory of ``capability`` (the nearest listed one at or below it; sm_80's
    for unknown older parts)."""
    if capability is None:
        return SMEM_BYTES[90]
    known = [c for c in SMEM_BYTES if c <= capability]
    return SMEM_BYTES[max(known)] if known else SMEM_BYTES[80]


def fitting(candidates: Sequence[Any], smem_bytes: Callable[[Any], int],
            capability: int | None) -> list[Any]:
    """The candidates whose shared memory (``smem_bytes(c)``) fits ``capability``, in order;
    never empty (the smallest candidate if none fits)."""
    limit = smem_limit(capability)
    fit = [c for c in candidates if smem_bytes(c) <= limit]
    return fit or [min(candidates, key=smem_bytes)]


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1") != "0"


def _can_time(device: torch.device) -> bool:
    if device.type != "cuda" or _triton.INTERPRET or _triton.CAPABILITY_OVERRIDE is not None:
        return False
    return not torch.cuda.is_current_stream_capturing()


def cuda_time_ms(run: Callable[[], None], reps: int = 3) -> float:
    """Median milliseconds of ``run()`` on the current stream, after one warm-up call."""
    run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class Tuner:
    """Chooses and remembers a configuration per shape class for one kernel.

    Args:
        name: for :attr:`choices`.
        timer: ``f(run) -> ms`` (default :func:`cuda_time_ms`; tests pass a fake).
    """

    def __init__(self, name: str, timer: Callable[[Callable[[], None]], float] | None = None):
        self.name = name
        self.timer = timer or cuda_time_ms
        self.choices: dict[tuple, Any] = {}
        self.timings: dict[tuple, dict[Any, float]] = {}

    def pick(self, key: tuple, candidates: Sequence[Any], run: Callable[[Any], None],
             device: torch.device, *, can_time: bool | None = None) -> Any:
        """The configuration for ``key``: the remembered one, else (when timing is possible
        and enabled) the fastest of ``candidates`` under ``run(config)``, else the first."""
        if key in self.choices:
            return self.choices[key]
        timing = _can_time(device) if can_time is None else can_time
        if len(candidates) == 1 or not timing or not enabled():
            return candidates[0]
        times = {c: self.timer(lambda c=c: run(c)) for c in candidates}
        best = min(candidates, key=lambda c: times[c])  # ties: the earlier candidate
        self.choices[key] = best
        self.timings[key] = times
        return best


def shape_class(*sizes: int) -> tuple[int, ...]:
    """Sizes rounded up to powers of two: launches within a class share a choice."""
    return tuple(1 << max(int(s) - 1, 0).bit_length() for s in sizes)
