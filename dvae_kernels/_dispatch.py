"""Backend selection shared by every op.

Each op declares, per backend, a function that inspects the inputs and returns ``None`` when
that backend can serve them, or a sentence saying why not. A backend may also be unavailable
as a whole (Triton not importable, the C++ extension not built); that reason comes from
:func:`backend_unavailable`. Selection rules (DESIGN.md §3):

* ``backend=None`` or ``"auto"`` (and ``DVAE_KERNELS_BACKEND`` unset or ``auto``): the first
  backend in the device's preference order that accepts the inputs. Interpreted Triton is
  never chosen automatically: it is a test vehicle, a thousand times slower than torch.
* An explicit name (argument, or the environment variable when the argument is absent) is used
  or refused; it never silently falls back. The refusal lists the reason of every backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch

from . import _csrc, _triton

BACKENDS = ("torch", "triton", "cuda", "cpu")

# Automatic preference per device type, fastest first. On CUDA the Triton kernels come first
# until the bench numbers recorded under bench/results/ say otherwise.
_PREFERENCE = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

# (op, backend) pairs never chosen automatically (an explicit backend= still runs them):
# the CUDA solve_eta / daps_weights run one block for the whole batch, which a reading of
# their compiled code (issue 9) put at about 10x the Triton kernels' time at the paper's N x K.
# They remain for explicit use and for comparison in bench; torch serves where Triton refuses.
NOT_AUTOMATIC = frozenset({("solve_eta", "cuda"), ("daps_weights", "cuda")})

ENV_VAR = "DVAE_KERNELS_BACKEND"

Supports = Callable[..., "str | None"]


class BackendError(RuntimeError):
    """No backend can serve a call, or the one explicitly asked for refuses it."""


def backend_unavailable(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` at all, or None if it can."""
    if name == "torch":
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if name == "triton":
        return _triton.unavailable(device)
    if name in ("cpu", "cuda"):
        if device.type != name:
            return f"the {name} backend runs on {name} tensors, got {device.type} tensors"
        return _csrc.unavailable(name)
    return f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'"


def requested_backend(backend: str | None) -> str | None:
    """The explicit choice (argument first, then the environment), or None for automatic."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
    if backend is None or backend == "auto":
        return None
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(BACKENDS)} or 'auto', got {backend!r}"
        )
    return backend


def select(op: str, table: Mapping[str, Supports], backend: str | None,
           device: torch.device, **inputs) -> str:
    """Return the backend that runs ``op`` on ``inputs``, or raise :class:`BackendError`."""
    wanted = requested_backend(backend)
    if wanted is not None:
        reason = _refusal(op, table, wanted, device, inputs)
        if reason is None:
            return wanted
        raise BackendError(f"{op}: backend {wanted!r} cannot serve this call: {reason}")
    reasons = []
    for name in _PREFERENCE.get(device.type, ("torch",)):
        if name == "triton" and device.type != "cuda":
            continue  # interpreted Triton is for tests only; never an automatic choice
        if (op, name) in NOT_AUTOMATIC:
            continue
        reason = _refusal(op, table, name, device, inputs)
        if reason is None:
            return name
        reasons.append(f"  {name}: {reason}")
    raise BackendError(f"{op}: no backend can serve this call:\n" + "\n".join(reasons))


def _refusal(op, table, name, device, inputs) -> str | None:
    reason = backend_unavailable(name, device)
    if reason is not None:
        return reason
    supports = table.get(name)
    if supports is None:
        return f"{op} has no {name} implementation"
    return supports(**inputs)
