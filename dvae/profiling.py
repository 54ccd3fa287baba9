"""Named phases of a training step: an NVTX range each (for Nsight Systems), and optional
wall-clock timers.

NVTX comes from the ``nvtx`` package when installed, else ``torch.cuda.nvtx`` when CUDA is
available; both are no-ops without a profiler attached. Timers synchronise the device around
each phase (a measured phase must have finished); without timers nothing synchronises.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PHASES = ("sample", "reward", "teacher_forced", "weights", "losses", "optimizer")

try:  # the nvtx package works (as a no-op) with or without a GPU
    import nvtx as _nvtx

    def _push(name: str) -> None:
        _nvtx.push_range(name, domain="dvae")

    def _pop() -> None:
        _nvtx.pop_range(domain="dvae")
except Exception:  # pragma: no cover - depends on the environment
    _nvtx = None

    def _push(name: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.nvtx.range_push(name)

    def _pop() -> None:
        if torch.cuda.is_available():
            torch.cuda.nvtx.range_pop()


class Phases:
    """``with phases("sample"): ...`` opens an NVTX range and, when ``timed``, records the
    phase's seconds in ``times[name]`` (a list per phase, one entry per call)."""

    def __init__(self, timed: bool = False, device: torch.device | str = "cpu"):
        self.timed = timed
        self.device = torch.device(device)
        self.times: dict[str, list[float]] = {name: [] for name in PHASES}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.timed:
            self._sync()
            start = time.perf_counter()
        _push(name)
        try:
            yield
        finally:
            _pop()
            if self.timed:
                self._sync()
                self.times.setdefault(name, []).append(time.perf_counter() - start)
