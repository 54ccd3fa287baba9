"""Loading of the optional C++/CUDA extension built from csrc/ by setup.py.

The package works without it (triton and torch backends). When a build exists but cannot be
loaded, a warning says what it was built for, and the backends report why they are off.
"""

from __future__ import annotations

_REASON = {
    "cpu": "the C++ extension (csrc/) is not part of this build",
    "cuda": "the CUDA extension (csrc/) is not part of this build",
}


def unavailable(name: str) -> str | None:
    return _REASON.get(name, f"unknown native backend {name!r}")
