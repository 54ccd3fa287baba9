"""Optimisers of DESIGN.md §1 step 9: AdamW, adaptive unit-wise gradient clipping (AGC), and
skipping a step whose loss or gradients are not finite, all without a host synchronisation.

AGC (Brock et al. 2021, as in optax.adaptive_grad_clip): for each output unit u of a weight,
    max_u = max(‖W_u‖, eps) · clip;   g_u ← g_u · max_u / max(‖g_u‖, 1e-6)  if ‖g_u‖ > max_u
where a "unit" is a row of a Linear/Conv weight (an output), a column of a ConvTranspose weight,
an embedding dimension (the reference's [V, d] tables reduce over V), and the whole tensor for
vectors and scalars.

The skip uses the fused AdamW's ``found_inf`` input: the kernel leaves parameters, moments and
step counts untouched when it is nonzero, so no ``.item()`` is needed.
"""

from __future__ import annotations

import torch
from torch import nn


def unit_reduce_dims(model: nn.Module) -> dict[nn.Parameter, tuple[int, ...] | None]:
    """For each parameter, the dims to sum over for its unit norms (None: the whole tensor)."""
    dims: dict[nn.Parameter, tuple[int, ...] | None] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.dim() <= 1:
                dims[p] = None
            elif isinstance(module, nn.Embedding):
                dims[p] = (0,)
            elif isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d,
                                     nn.ConvTranspose3d)) and name == "weight":
                dims[p] = (0,) + tuple(range(2, p.dim()))
            else:
                dims[p] = tuple(range(1, p.dim()))
    return dims


def _norm(t: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    t = t.float()
    if dims is None:
        return t.square().sum().sqrt()
    return t.square().sum(dim=dims, keepdim=True).sqrt()


@torch.no_grad()
def adaptive_clip_(params_dims: dict[nn.Parameter, tuple[int, ...] | None], clip: float,
                   eps: float = 1e-3) -> None:
    """Clip each parameter's gradient in place, unit by unit (see the module docstring)."""
    for p, dims in params_dims.items():
        g = p.grad
        if g is None:
            continue
        max_norm = _norm(p, dims).clamp_min(eps) * clip
        g_norm = _norm(g, dims)
        scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6),
                            torch.ones_like(g_norm))
        g.mul_(scale.to(g.dtype))


@torch.no_grad()
def nonfinite_flag(params, loss: torch.Tensor | None = None) -> torch.Tensor:
    """1.0 (float32, on the gradients' device) when any gradient or the loss is NaN/inf."""
    grads = [p.grad for p in params if p.grad is not None]
    flag = torch.zeros((), dtype=torch.float32,
                       device=grads[0].device if grads else "cpu")
    if grads:
        norms = torch._foreach_norm(grads)
        flag = (~torch.isfinite(torch.stack(norms).float().sum())).float()
    if loss is not None:
        flag = torch.maximum(flag, (~torch.isfinite(loss.detach().float())).float())
    return flag


def make_adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (needed for the sync-free ``found_inf`` skip)."""
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay, fused=True)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` that the fused kernel turns into a no-op when ``found_inf`` is 1."""
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        optimizer.found_inf = None
