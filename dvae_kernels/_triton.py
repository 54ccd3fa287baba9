"""Triton import and availability, in one place.

``TRITON_INTERPRET=1`` must be set before the kernels are defined (``@triton.jit`` reads it),
so it is read once, here, at import. With it, Triton kernels run on CPU tensors through the
interpreter (slow; that is how the tests exercise them on machines without a GPU).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _IMPORT_ERROR = ""
except ImportError as exc:  # pragma: no cover - Linux always has triton with torch
    triton = None
    tl = None
    HAS_TRITON = False
    _IMPORT_ERROR = str(exc)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable(device: torch.device) -> str | None:
    if not HAS_TRITON:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if device.type == "cuda":
        if INTERPRET:
            return "TRITON_INTERPRET=1 is set, so Triton runs on CPU tensors only"
        return None
    if device.type == "cpu":
        if INTERPRET:
            return None
        return ("Triton runs on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                "importing dvae_kernels (the interpreter, for tests)")
    return f"Triton does not run on {device.type} tensors"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
