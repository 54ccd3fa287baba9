"""The machine a benchmark result was measured on: names, versions, date, load, caches."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

import dvae_kernels
from dvae_kernels.info import machine

# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: names, versions, date, and how busy the machine was."""
    base = machine()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    name = gpu or base["cpu"]
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "name": name,
        "slug": slug(name),
        "device": device.type,
        "gpu": gpu,
        "cpu": base["cpu"],
        "cpu_count": base["cores"],
        "torch_threads": torch.get_num_threads(),
        "loadavg": load,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": base["triton"],
        "python": platform.python_version(),
        "dvae": dvae_kernels.__version__,
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def slug(name: str) -> str:
    """A folder name for a machine: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def cache_bytes(device: torch.device) -> int:
    """The last-level cache that rotating inputs must overflow (L2 on a GPU, L3 on a CPU)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 << 20))
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        return 32 << 20
