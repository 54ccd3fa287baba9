"""Reconstruction and codebook metrics (docs/algorithm.md, step 10), on pixels in [0, 1]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for ``x, y [N, C, H, W]`` in [0, 1]: ``10·log10(1 / MSE)``."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-r.square() / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5
         ) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian window 11, σ 1.5, K1 0.01, K2 0.03, data
    range 1), averaged over channels and valid window positions. Images smaller than the
    window use the largest odd window that fits (σ scaled with it)."""
    x, y = x.float(), y.float()
    N, C, H, W = x.shape
    size = min(window, H - (1 - H % 2), W - (1 - W % 2))
    sig = sigma * size / window
    w = _gaussian_window(size, sig, x.device).expand(C, 1, size, size)
    c1, c2 = 0.01 ** 2, 0.03 ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=C)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def codebook_stats(tokens: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Fraction of the V codes used, and the perplexity ``exp(H)`` of the code histogram."""
    counts = torch.bincount(tokens.reshape(-1).long(), minlength=vocab_size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"codebook_usage": (counts > 0).double().mean().item(),
            "perplexity": math.exp(entropy)}
