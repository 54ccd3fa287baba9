"""``python -m dvae_kernels.info``: versions, devices, and which backend serves each op here.

The op table has one row per registered op and one column per (backend, device) pair a backend
can run on: the automatic choice on each device is marked ``auto``, a backend that runs only
when asked for by name ``explicit``, an op without that backend ``-``, and an unavailable
backend a bracketed number whose reason is printed under the table, as ``xformers.info`` does.
"""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, _csrc, _dispatch, _triton

# (backend, device type) pairs, in the automatic preference order of each device.
COLUMNS = (("cpu", "cpu"), ("torch", "cpu"), ("triton", "cpu"),
           ("triton", "cuda"), ("cuda", "cuda"), ("torch", "cuda"))

# Public functions that are compositions of a registered op rather than ops of their own.
THROUGH = {
    "linear_weighted_token_nll": "linear_token_logprobs",
    "causal_lm_token_logprobs": "linear_token_logprobs",
    "codebook_logits": "(plain PyTorch; feeds the linear ops)",
    "FusedCategoricalHead": "linear_token_logprobs, linear_sample_tokens",
    "LinearCrossEntropyLoss": "linear_token_logprobs",
}


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str | int | None]:
    """Where something ran: the CPU model and core count, the GPU's name, the versions of
    torch and triton. Training runs and benchmark results record it beside their figures."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 0, "gpu": gpu,
            "torch": torch.__version__,
            "triton": _triton.triton.__version__ if _triton.HAS_TRITON else None}


def op_table() -> tuple[list[str], list[str]]:
    """(table lines, footnote lines) of every registered op on this machine."""
    reasons: list[str] = []
    header = ["op"] + [f"{b}/{d}" for b, d in COLUMNS]
    rows = [header]
    for name in sorted(_dispatch.OPS):
        op = _dispatch.OPS[name]
        chosen = {d: op.first_available(torch.device(d)) for d in ("cpu", "cuda")}
        row = [name]
        for backend, device in COLUMNS:
            registered = op.backends.get(backend)
            if registered is None:
                row.append("-")
                continue
            reason = _dispatch.backend_unavailable(backend, torch.device(device))
            if reason is not None:
                if reason not in reasons:
                    reasons.append(reason)
                row.append(f"[{reasons.index(reason) + 1}]")
            elif chosen[device] == backend:
                row.append("auto")
            elif not registered.automatic or (backend == "triton" and device == "cpu"):
                row.append("explicit")
            else:
                row.append("yes")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    notes = [f"  [{i + 1}] {r}" for i, r in enumerate(reasons)]
    limits = []
    for name in sorted(_dispatch.OPS):
        parts = [f"{b.name}: {b.limits}" for b in _dispatch.OPS[name].backends.values()
                 if b.limits]
        if parts:
            limits.append(f"  {name:24s} {' | '.join(parts)}")
    return lines, notes + ["", "what an available backend still refuses:"] + limits


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
    build = _csrc.build_info()
    if build:
        lines.append(f"csrc build   {build}")
    lines.append("")
    lines.append("backend availability (per device type):")
    for name in _dispatch.BACKENDS:
        for dev in devices:
            reason = _dispatch.backend_unavailable(name, dev)
            state = "available" if reason is None else f"unavailable: {reason}"
            lines.append(f"  {name:7s} {dev.type:5s} {state}")
    table, notes = op_table()
    lines.append("")
    lines.append("op x backend/device (auto: the automatic choice; explicit: only when asked "
                 "for by name; -: no implementation; [n]: unavailable, reason below):")
    lines += ["  " + line for line in table]
    lines += notes
    lines.append("")
    lines.append("public functions built on the ops above:")
    lines += [f"  {name:26s} {via}" for name, via in THROUGH.items()]
    env = _dispatch.requested_backend(None)
    lines.append("")
    lines.append(f"{_dispatch.ENV_VAR}={env or 'auto'}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
