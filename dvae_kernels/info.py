"""``python -m dvae_kernels.info``: versions, devices, and what each backend can do here."""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__, _csrc, _dispatch, _triton


def report() -> str:
    lines = [
        f"dvae_kernels {__version__}",
        f"python       {sys.version.split()[0]} ({platform.machine()}, {platform.system()})",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton       {_triton.triton.__version__ if _triton.HAS_TRITON else 'not installed'}"
        + ("  [TRITON_INTERPRET=1: kernels run on CPU tensors]" if _triton.INTERPRET else ""),
    ]
    devices = [torch.device("cpu"), torch.device("cuda")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}       {p.name}, sm_{p.major}{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("cuda         no CUDA device")
    build = _csrc.build_info() if hasattr(_csrc, "build_info") else None
    if build:
        lines.append(f"csrc build   {build}")
    lines.append("")
    lines.append("backend availability (per device type):")
    for name in _dispatch.BACKENDS:
        for dev in devices:
            reason = _dispatch.backend_unavailable(name, dev)
            state = "available" if reason is None else f"unavailable: {reason}"
            lines.append(f"  {name:7s} {dev.type:5s} {state}")
    env = _dispatch.requested_backend(None)
    lines.append("")
    lines.append(f"{_dispatch.ENV_VAR}={env or 'auto'}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
