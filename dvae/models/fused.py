"""Fused ops for the KV-cache sampling loop, where each kernel launch costs more than its work.

``add_layer_norm``: the residual add, the LayerNorm after it and the cast of its output to the
compute dtype, in one Triton kernel on CUDA (three kernels in eager PyTorch under autocast)::

    s = x + r                                         # the residual stream, x's dtype (fp32)
    y = F.layer_norm(s, (D,), weight, bias, eps).to(out_dtype)

The CPU (and any device without Triton) runs exactly those PyTorch lines, so the CPU path's
numbers do not change. Triton is used for CUDA tensors, or for CPU tensors through the
interpreter when :data:`FORCE_TRITON` is set (the tests).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - Linux always has triton with torch
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# True: the Triton kernel on any device (CPU tensors need TRITON_INTERPRET=1); the cost model
# sets it to trace the CUDA path on fake CPU tensors.
FORCE_TRITON = False


@contextlib.contextmanager
def force_triton(on: bool = True) -> Iterator[None]:
    global FORCE_TRITON
    old, FORCE_TRITON = FORCE_TRITON, on
    try:
        yield
    finally:
        FORCE_TRITON = old


if HAS_TRITON:

    @triton.jit
    def _add_layer_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, s_ptr, y_ptr, D,
                               stride_x, stride_r, stride_s, stride_y, eps,
                               BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        s = x + r
        tl.store(s_ptr + row * stride_s + cols, s.to(s_ptr.dtype.element_ty), mask=ok)
        mean = tl.sum(s, axis=0) / D
        diff = tl.where(ok, s - mean, 0.0)
        var = tl.sum(diff * diff, axis=0) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        y = diff * rstd * w + b
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("dvae::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float, out_dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, D]; r [R, D] or [D] (broadcast over rows); weight, bias [D]."""
    R, D = x.shape
    s = torch.empty((R, D), dtype=torch.promote_types(x.dtype, r.dtype), device=x.device)
    y = torch.empty((R, D), dtype=out_dtype, device=x.device)
    if R == 0:
        return s, y
    stride_r = 0 if r.dim() == 1 else r.stride(0)
    _add_layer_norm_kernel[(R,)](
        x, r, weight, bias, s, y, D, x.stride(0), stride_r, s.stride(0), y.stride(0), eps,
        BLOCK_D=triton.next_power_of_2(D), num_warps=1 if D <= 256 else 4)
    return s, y


@_add_layer_norm_op.register_fake
def _(x, r, weight, bias, eps, out_dtype):
    R, D = x.shape
    return (x.new_empty((R, D), dtype=torch.promote_types(x.dtype, r.dtype)),
            x.new_empty((R, D), dtype=out_dtype))


def _use_triton(x: torch.Tensor) -> bool:
    if not HAS_TRITON:
        return False
    if FORCE_TRITON:
        return True
    return x.device.type == "cuda" and not INTERPRET


def compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``x``'s device, else None."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def add_layer_norm(x: torch.Tensor, r: torch.Tensor, ln: nn.LayerNorm,
                   out_dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, y)`` with ``s = x + r`` and ``y = ln(s)`` in ``out_dtype`` (None: LayerNorm's own
    dtype, float32 under autocast), in one kernel on CUDA.

    Args:
        x: ``[..., D]`` the residual stream.
        r: ``[..., D]`` (the shape of ``x``) or ``[D]`` (added to every row).
        ln: a LayerNorm over the last dim (weight and bias, D features).
        out_dtype: the dtype of ``y`` (the compute dtype of the next matmul).

    Returns:
        ``s`` (``x``'s shape, the promoted dtype of ``x`` and ``r``) and ``y`` (``x``'s shape).

    Equivalent PyTorch::

        s = x + r
        y = torch.nn.functional.layer_norm(s, (D,), ln.weight, ln.bias, ln.eps).to(out_dtype)
    """
    D = x.shape[-1]
    if (not isinstance(ln, nn.LayerNorm) or ln.weight is None or ln.bias is None
            or tuple(ln.normalized_shape) != (D,)):
        raise ValueError(f"ln must be a LayerNorm over the last dim ({D}) with weight and bias, "
                         f"got {ln}")
    if r.shape != x.shape and tuple(r.shape) != (D,):
        raise ValueError(f"r must have x's shape {tuple(x.shape)} or ({D},), got "
                         f"{tuple(r.shape)}")
    if not _use_triton(x):
        s = x + r
        y = F.layer_norm(s, (D,), ln.weight, ln.bias, ln.eps)
        return s, (y if out_dtype is None else y.to(out_dtype))
    dtype = out_dtype or torch.promote_types(x.dtype, r.dtype)
    if dtype == torch.float64:
        dtype = torch.float32  # the kernel normalises in float32
    x2 = x.reshape(-1, D)
    r2 = r if r.dim() == 1 else r.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    s, y = _add_layer_norm_op(x2, r2, ln.weight.detach(), ln.bias.detach(), float(ln.eps),
                              dtype)
    return s.view(x.shape), y.view(x.shape)
