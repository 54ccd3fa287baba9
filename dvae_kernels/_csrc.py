"""Loading of the optional C++/CUDA extension built from csrc/ by setup.py.

The package works without it (triton and torch backends). Two libraries may have been built
(see setup.py): ``dvae_kernels._C`` (the op schemas and the CPU kernels) and
``dvae_kernels._C_cuda`` (the CUDA kernels). Both are loaded once, at import; a library that
was built but cannot be loaded (a torch upgrade since the build, say) gives one warning with
what it was built for, and the backends it would serve report why they are off.

``DVAE_KERNELS_LOAD_NATIVE=0`` skips loading altogether (to check the fallback path).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings

import torch

ENV_VAR = "DVAE_KERNELS_LOAD_NATIVE"
_HERE = os.path.dirname(os.path.abspath(__file__))
_BUILD_INFO_PATH = os.path.join(_HERE, "_build_info.json")
_REBUILD = "rebuild with `pip install --no-build-isolation -e .` (see csrc/README.md)"

# The namespace of the ops defined in csrc/ops.cpp: torch.ops.dvae_kernels.<op>.
NAMESPACE = "dvae_kernels"


def _read_build_info() -> dict | None:
    try:
        with open(_BUILD_INFO_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _describe(info: dict | None) -> str:
    if info is None:
        return "no build record (dvae_kernels/_build_info.json) was found"
    archs = f", archs {info['archs']}" if info.get("archs") else ""
    cuda = f", CUDA {info['cuda']}" if info.get("cuda") else ""
    return (f"built for torch {info.get('torch')}{cuda}{archs} (parts: "
            f"{', '.join(info.get('parts') or []) or 'none'}); running torch {torch.__version__}")


def _has_library(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _import(module: str) -> str | None:
    """Import a built library; None on success, else the error as text."""
    try:
        importlib.import_module(module)
        return None
    except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError
        return f"{type(exc).__name__}: {exc}"


def _load() -> tuple[dict | None, dict[str, str], dict[str, str]]:
    """Returns (build record, reason per backend that is off, load errors per library)."""
    info = _read_build_info()
    reasons: dict[str, str] = {}
    errors: dict[str, str] = {}
    if os.environ.get(ENV_VAR, "1") == "0":
        msg = f"loading the C++/CUDA extension is switched off ({ENV_VAR}=0)"
        return info, {"cpu": msg, "cuda": msg}, errors
    parts = set(info.get("parts") or []) if info is not None else None
    skipped = (info or {}).get("skipped", {})
    if info is not None and not parts and not _has_library("dvae_kernels._C"):
        why = skipped.get("all", "no part was built")
        msg = f"the C++/CUDA extension was not built ({why})"
        return info, {"cpu": msg, "cuda": msg}, errors
    if info is not None and not parts:
        why = skipped.get("all", "no part was built")
        msg = (f"the last install built no C++/CUDA part ({why}); the libraries left in "
               f"{_HERE} from an earlier build are not loaded")
        return info, {"cpu": msg, "cuda": msg}, errors
    if not _has_library("dvae_kernels._C"):
        msg = ("the C++ extension (csrc/) is not part of this install (installed without a "
               f"build, or the build was removed); {_REBUILD}")
        return info, {"cpu": msg, "cuda": msg}, errors

    err = _import("dvae_kernels._C")
    if err is not None:
        errors["dvae_kernels._C"] = err
        msg = f"the C++ extension failed to load ({err}); it was {_describe(info)}; {_REBUILD}"
        return info, {"cpu": msg, "cuda": msg}, errors
    if parts is not None and "cpu" not in parts:
        reasons["cpu"] = (f"the C++ extension was built without its CPU kernels "
                          f"({skipped.get('cpu', 'DVAE_KERNELS_BUILD_CPU=0')})")
    elif not _has_kernel("token_logprobs_fwd", "CPU"):
        reasons["cpu"] = f"the C++ extension holds no CPU kernels; it was {_describe(info)}"

    if parts is not None and "cuda" not in parts:
        reasons["cuda"] = (f"the CUDA part of the extension was not built "
                           f"({skipped.get('cuda', 'DVAE_KERNELS_BUILD_CUDA=0')})")
    elif not _has_library("dvae_kernels._C_cuda"):
        reasons["cuda"] = f"the CUDA library (dvae_kernels._C_cuda) is missing; {_REBUILD}"
    else:
        err = _import("dvae_kernels._C_cuda")
        if err is not None:
            errors["dvae_kernels._C_cuda"] = err
            reasons["cuda"] = (f"the CUDA library failed to load ({err}); it was "
                               f"{_describe(info)}; {_REBUILD}")
    return info, reasons, errors


def _has_kernel(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key))
    except (AttributeError, RuntimeError):  # private API: trust the build record instead
        return True


_INFO, _REASONS, _ERRORS = _load()
if _ERRORS:
    warnings.warn(
        "dvae_kernels: the C++/CUDA extension could not be loaded ("
        + "; ".join(f"{lib}: {err}" for lib, err in _ERRORS.items())
        + f"). It was {_describe(_INFO)}. The package keeps working through its torch and "
        f"triton backends; {_REBUILD}.",
        RuntimeWarning, stacklevel=2)

_CUDA_DEVICE_REASON: list[str | None] = []  # computed on first use, then cached


def _cuda_device_reason() -> str | None:
    if not _CUDA_DEVICE_REASON:
        _CUDA_DEVICE_REASON.append(_check_cuda_device())
    return _CUDA_DEVICE_REASON[0]


def _check_cuda_device() -> str | None:
    if not torch.cuda.is_available():
        return "the CUDA kernels are built, but no CUDA device is available"
    archs = (_INFO or {}).get("archs")
    if not archs:
        return None
    major, minor = torch.cuda.get_device_capability()
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip()
        if not arch or not arch[0].isdigit():
            continue
        ptx = arch.endswith("+PTX")
        try:
            a_major, a_minor = (int(x) for x in arch.replace("+PTX", "").split(".")[:2])
        except ValueError:
            continue
        if (a_major, a_minor) <= (major, minor) and (ptx or a_major == major):
            return None
    return (f"the CUDA kernels were built for archs {archs}, which cannot run on this "
            f"device (compute capability {major}.{minor}); rebuild with "
            f"TORCH_CUDA_ARCH_LIST={major}.{minor}")


def unavailable(name: str) -> str | None:
    """None when native backend ``name`` (``"cpu"`` or ``"cuda"``) can run, else why not."""
    if name not in ("cpu", "cuda"):
        return f"unknown native backend {name!r}"
    reason = _REASONS.get(name)
    if reason is not None:
        return reason
    if name == "cuda":
        return _cuda_device_reason()
    return None


def build_info() -> dict | None:
    """The record setup.py wrote when building the extension (None when there is none)."""
    return None if _INFO is None else dict(_INFO)


def load_errors() -> dict[str, str]:
    """Library name -> the error that stopped it from loading (empty when all loaded)."""
    return dict(_ERRORS)


def ops():
    """``torch.ops.dvae_kernels`` (valid once the extension is loaded)."""
    return getattr(torch.ops, NAMESPACE)


def refuse_float64(name: str, t: torch.Tensor) -> str | None:
    """The cpu and cuda backends' refusal of float64 inputs (their kernels compute in
    float32), or None."""
    if t.dtype == torch.float64:
        return (f"float64 {name} are served by the torch backend only (the C++/CUDA kernels "
                "compute in float32)")
    return None
