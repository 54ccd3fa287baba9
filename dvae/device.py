"""Where a run executes: the torch device a ``device=`` key names, and the refusal, before any
work, of a ``kernel_backend`` that cannot serve the run there. Shared by training, evaluation and
generation."""

from __future__ import annotations

import torch

from .config import Config


def check_kernel_backend(cfg: Config, device: torch.device) -> None:
    """Refuse, before any work, a ``kernel_backend`` that cannot serve every op the run calls
    with it on ``device`` (e.g. ``cuda`` on a CPU, or ``cuda`` on the logits path: the cuda
    backend has no sampler). The ops' backends come from dvae_kernels' registry."""
    from dvae_kernels import _dispatch

    backend = _dispatch.requested_backend(cfg.kernel_backend)
    if backend is None:
        return
    fused = cfg.fused_linear == "always" or (cfg.fused_linear == "auto"
                                             and device.type == "cuda")
    # dvae.daps: the weights, log q (and its entropy for the KL) and, when solved, eta
    ops = ["daps_weights", "linear_token_logprobs"]
    ops += ["solve_eta"] if cfg.eta_mode == "solved" else []
    ops += [] if fused else ["token_logprobs"]
    # the sampler (dvae.train_step.TrainStep.sampler): the torch baseline's off the fused path
    if fused or backend != "torch":
        ops += ["linear_sample_tokens" if fused or device.type == "cpu" else "sample_tokens"]
    unavailable = _dispatch.backend_unavailable(backend, device)
    if unavailable:
        raise ValueError(f"kernel_backend={backend} cannot run on device {device}: "
                         f"{unavailable}")
    lacking = _dispatch.lacking(backend, ops)
    if lacking:
        raise ValueError(f"kernel_backend={backend} has no implementation of "
                         f"{', '.join(lacking)}, which this run calls (fused_linear="
                         f"{cfg.fused_linear} on {device.type}); use kernel_backend=auto or "
                         "torch" + (", or fused_linear=never" if fused else ""))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev
