"""The op registry and backend selection, shared by every op.

Each op file creates one :class:`Op` and registers its backends on it, in one place and one
shape::

    OP = _dispatch.Op("token_logprobs")
    OP.register("torch", _torch_forward, _torch_backward)
    OP.register("triton", _triton_forward, _triton_backward, supports=_supports_triton,
                limits="float32/bf16/fp16 logits, V <= 262144")

A backend's ``supports(**inputs)`` returns None when it can serve those inputs, or a sentence
saying why not; ``limits`` says the same in one line for ``python -m dvae_kernels.info``. A
backend may also be unavailable as a whole (Triton not importable, the C++ extension not
built, no CUDA device); that reason comes from :func:`backend_unavailable`. Selection rules:

* ``backend=None`` or ``"auto"`` (and ``DVAE_KERNELS_BACKEND`` unset or ``auto``): the first
  backend in the device's preference order that accepts the inputs. Interpreted Triton is
  never chosen automatically: it is a test vehicle, a thousand times slower than torch. A
  backend registered with ``automatic=False`` runs only when asked for by name.
* An explicit name (argument, or the environment variable when the argument is absent) is used
  or refused; it never silently falls back. The refusal lists the reason of every backend.

:data:`OPS` maps every op name to its :class:`Op`; ``python -m dvae_kernels.info`` prints it
as an op × backend × device table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator

import torch

from . import _csrc, _triton

BACKENDS = ("torch", "triton", "cuda", "cpu")

# Automatic preference per device type, fastest first.
_PREFERENCE = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

ENV_VAR = "DVAE_KERNELS_BACKEND"

Supports = Callable[..., "str | None"]


class BackendError(RuntimeError):
    """No backend can serve a call, or the one explicitly asked for refuses it."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op: ``forward`` (and ``backward`` where the op has one) as
    the op's registered custom op calls them, and what it accepts."""

    name: str
    forward: Callable
    backward: Callable | None = None
    supports: Supports | None = None  # None: every input the op's checks let through
    limits: str = ""
    automatic: bool = True


class Op:
    """An op's backends, and the choice among them for a call."""

    def __init__(self, name: str) -> None:
        if name in OPS:
            raise ValueError(f"op {name!r} is registered twice")
        self.name = name
        self.backends: dict[str, Backend] = {}
        OPS[name] = self

    def register(self, name: str, forward: Callable, backward: Callable | None = None, *,
                 supports: Supports | None = None, limits: str = "",
                 automatic: bool = True) -> None:
        """Declare backend ``name`` of this op (see the module docstring)."""
        if name not in BACKENDS:
            raise ValueError(f"{self.name}: unknown backend {name!r}; expected one of "
                             f"{', '.join(BACKENDS)}")
        self.backends[name] = Backend(name, forward, backward, supports, limits, automatic)

    def forward(self, backend: str) -> Callable:
        return self.backends[backend].forward

    def backward(self, backend: str) -> Callable:
        fn = self.backends[backend].backward
        if fn is None:
            raise RuntimeError(f"{self.name}: backend {backend!r} has no backward")
        return fn

    def refusal(self, name: str, device: torch.device, inputs: dict | None = None
                ) -> str | None:
        """Why backend ``name`` cannot serve ``inputs`` on ``device`` (None: it can). Without
        ``inputs`` only the device and the registration are asked."""
        reason = backend_unavailable(name, device)
        if reason is not None:
            return reason
        backend = self.backends.get(name)
        if backend is None:
            return f"{self.name} has no {name} implementation"
        if inputs is None or backend.supports is None:
            return None
        return backend.supports(**inputs)

    def select(self, backend: str | None, device: torch.device, *, caller: str | None = None,
               **inputs) -> str:
        """The backend that runs this op on ``inputs``, or raise :class:`BackendError`
        (``caller`` names the public function in the message, where it is not the op)."""
        label = caller or self.name
        wanted = requested_backend(backend)
        if wanted is not None:
            reason = self.refusal(wanted, device, inputs)
            if reason is None:
                return wanted
            raise BackendError(f"{label}: backend {wanted!r} cannot serve this call: "
                               f"{reason}")
        reasons = []
        for name in self.automatic_order(device):
            reason = self.refusal(name, device, inputs)
            if reason is None:
                return name
            reasons.append(f"  {name}: {reason}")
        raise BackendError(f"{label}: no backend can serve this call:\n"
                           + "\n".join(reasons))

    def automatic_order(self, device: torch.device) -> tuple[str, ...]:
        """The backends the automatic choice tries on ``device``, in order."""
        kind = _device_type(device)
        order = []
        for name in _PREFERENCE.get(kind, ("torch",)):
            if name == "triton" and kind != "cuda":
                continue  # interpreted Triton is for tests only; never an automatic choice
            backend = self.backends.get(name)
            if backend is not None and not backend.automatic:
                continue
            order.append(name)
        return tuple(order)

    def first_available(self, device: torch.device) -> str | None:
        """The backend the automatic choice takes on ``device`` for inputs every backend
        accepts (None when none is available there)."""
        for name in self.automatic_order(device):
            if self.refusal(name, device) is None:
                return name
        return None


#: Every registered op, by name (filled as the op files are imported).
OPS: dict[str, Op] = {}

# Set by :func:`as_if_cuda`: the device type whose choices the selection makes.
_AS_DEVICE: str | None = None


def _device_type(device: torch.device) -> str:
    return _AS_DEVICE or device.type


@contextlib.contextmanager
def as_if_cuda() -> Iterator[None]:
    """Within the block, backends are chosen as for CUDA tensors whatever the inputs' device,
    and Triton counts as available: the step cost model traces the CUDA path on fake CPU
    tensors (the custom ops run their fake implementations, so no kernel runs)."""
    global _AS_DEVICE
    old, _AS_DEVICE = _AS_DEVICE, "cuda"
    try:
        yield
    finally:
        _AS_DEVICE = old


def backend_unavailable(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` at all, or None if it can."""
    if _AS_DEVICE == "cuda" and name in ("torch", "triton"):
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if name == "torch":
        return None
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


def lacking(backend: str, ops: list[str] | tuple[str, ...]) -> list[str]:
    """The ops of ``ops`` that have no implementation on ``backend``."""
    return [op for op in ops if backend not in OPS[op].backends]
