"""linear_add_layer_norm: a projection, the residual add and the LayerNorm after it, one kernel.

    s = x + F.linear(a, weight, bias)                  # the projection stays float32 until the add
    y = F.layer_norm(s, (D,), ln_weight, ln_bias, eps).to(out_dtype)

Read top to bottom: torch backend, Triton kernel and launcher, the registered op, the public
function.

Why: a transformer block's output projections (attention out, MLP fc2) are each followed by
the residual add and the next LayerNorm; in a KV-cache decode loop those are three or four
launches on a few hundred rows. A program owns BLOCK_M rows and the whole model width D
(D <= 256, so the [BLOCK_M, D] float32 accumulator stays in registers): it forms ``a @ Wᵀ``
with ``tl.dot`` over BLOCK_K slices, adds the bias and ``x``, writes ``s``, normalises each row
and writes ``y``. Work per call: 2·R·K·D FLOPs; bytes R·(K·|a| + D·(|x| + |s| + |y|)) + D·K·|w|
(the weight is re-read by every row block; it is small and stays in L2).

No backward (see :mod:`dvae_kernels.add_layer_norm`): the torch backend, the unfused lines
(cuBLAS projection, then :func:`add_layer_norm`), serves differentiable calls and D > 256.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _dispatch, _validate
from ._triton import HAS_TRITON, INTERPRET, next_power_of_2, tl, triton
from .add_layer_norm import add_layer_norm, supports_inference_kernel

# ---------------------------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------------------------


def _torch_forward(a, weight, bias, x, ln_weight, ln_bias, eps: float, out_dtype):
    return add_layer_norm(x, F.linear(a, weight, bias), ln_weight, ln_bias, eps,
                          out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

# The model width one program holds in registers (rows × D float32 accumulator).
MAX_D = 256
BLOCK_M = 16
BLOCK_K = 32

if HAS_TRITON:

    @triton.jit
    def _linear_add_layer_norm_kernel(a_ptr, w_ptr, bias_ptr, x_ptr, lw_ptr, lb_ptr, s_ptr,
                                      y_ptr, R, K, D, stride_a, stride_w, stride_x, stride_s,
                                      stride_y, eps, HAS_BIAS: tl.constexpr,
                                      DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                                      BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = rows < R
        cols = tl.arange(0, BLOCK_D)
        cm = cols < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < K
            a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :],
                        mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None],
                        mask=km[:, None] & cm[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc += tl.dot(a, w, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        tile = rm[:, None] & cm[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=tile, other=0.0)
        s = x.to(tl.float32) + acc
        tl.store(s_ptr + rows[:, None] * stride_s + cols[None, :],
                 s.to(s_ptr.dtype.element_ty), mask=tile)
        mean = tl.sum(s, axis=1) / D
        diff = tl.where(cm[None, :], s - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        lw = tl.load(lw_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        lb = tl.load(lb_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        y = diff * rstd[:, None] * lw[None, :] + lb[None, :]
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=tile)


def _triton_forward(a, weight, bias, x, ln_weight, ln_bias, eps: float, out_dtype):
    """a [R, K], weight [D, K] (a's dtype), bias [D] or None, x [R, D]; ln_* [D]; unit
    column strides."""
    R, K = a.shape
    D = weight.shape[0]
    s = torch.empty((R, D), dtype=x.dtype, device=x.device)
    y = torch.empty((R, D), dtype=out_dtype, device=x.device)
    if R == 0:
        return s, y
    dot_fp32 = INTERPRET or a.dtype == torch.float32  # the interpreter's bf16 tl.dot is wrong
    _linear_add_layer_norm_kernel[(triton.cdiv(R, BLOCK_M),)](
        a, weight, bias if bias is not None else weight, x, ln_weight, ln_bias, s, y,
        R, K, D, a.stride(0), weight.stride(0), x.stride(0), s.stride(0), y.stride(0), eps,
        HAS_BIAS=bias is not None, DOT_FP32=dot_fp32,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_D=max(16, next_power_of_2(D)), num_warps=4)
    return s, y


def _supports_triton(a, weight, bias, x, ln_weight, ln_bias) -> str | None:
    if weight.shape[0] > MAX_D:
        return f"D = {weight.shape[0]} exceeds the kernel's {MAX_D} (one row block in registers)"
    if a.dtype == torch.float64 or x.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    return supports_inference_kernel(a, weight, bias, x, ln_weight, ln_bias)


OP = _dispatch.Op("linear_add_layer_norm")
OP.register("torch", _torch_forward)
OP.register("triton", _triton_forward, supports=_supports_triton,
            limits=f"no float64, D <= {MAX_D}, no backward (no-grad calls)")

# ---------------------------------------------------------------------------------------------
# Registered op (the Triton kernel; the torch backend runs outside it)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("dvae_kernels::linear_add_layer_norm", mutates_args=())
def _op(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor,
        ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, out_dtype: torch.dtype,
        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return OP.forward(backend)(a, weight, bias, x, ln_weight, ln_bias, eps, out_dtype)


@_op.register_fake
def _(a, weight, bias, x, ln_weight, ln_bias, eps, out_dtype, backend):
    R, D = a.shape[0], weight.shape[0]
    return x.new_empty((R, D)), x.new_empty((R, D), dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def linear_add_layer_norm(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                          eps: float = 1e-5, *, out_dtype: torch.dtype | None = None,
                          backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, y)`` with ``s = x + F.linear(a, weight, bias)`` and ``y = layer_norm(s)`` in
    ``out_dtype``, one kernel.

    Args:
        a: ``[..., K]`` the projection's input.
        weight: ``[D, K]`` and ``bias`` ``[D]`` or None: the projection (``nn.Linear(K, D)``).
            Pass them already in ``a``'s dtype to cast them once per decode loop rather than
            at every call (they are cast here otherwise).
        x: ``[..., D]`` the residual stream (float32).
        ln_weight, ln_bias: ``[D]``, the LayerNorm's affine parameters; ``eps`` its epsilon.
        out_dtype: the dtype of ``y`` (None: ``x``'s).
        backend: ``"torch"``, ``"triton"`` or ``None``/``"auto"``.

    Returns:
        ``s`` and ``y``, ``x``'s shape. Differentiable through the torch backend only.

    Equivalent PyTorch::

        s = x + torch.nn.functional.linear(a, weight, bias)
        y = torch.nn.functional.layer_norm(s, (D,), ln_weight, ln_bias, eps).to(out_dtype)
    """
    for name, t in (("a", a), ("weight", weight), ("x", x)):
        _validate.check_float(name, t)
    D = x.shape[-1]
    if weight.dim() != 2 or tuple(weight.shape) != (D, a.shape[-1]):
        raise ValueError(f"weight must be [D, K] = [{D}, {a.shape[-1]}] (mapping a's last dim "
                         f"to x's), got {_validate.describe(weight)}")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must be [D] = [{D}], got {_validate.describe(bias)}")
    if a.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"a and x must share their leading shape, got {tuple(a.shape)} and "
                         f"{tuple(x.shape)}")
    _validate.check_same_device(a=a, weight=weight, bias=bias, x=x, ln_weight=ln_weight,
                                ln_bias=ln_bias)
    name = OP.select(backend, x.device, a=a, weight=weight, bias=bias, x=x,
                     ln_weight=ln_weight, ln_bias=ln_bias)
    if name == "torch":
        return _torch_forward(a, weight, bias, x, ln_weight, ln_bias, float(eps), out_dtype)
    if weight.dtype != a.dtype:
        weight = weight.to(a.dtype)
    if bias is not None and bias.dtype != a.dtype:
        bias = bias.to(a.dtype)
    a2 = a.reshape(-1, a.shape[-1])
    x2 = x.reshape(-1, D)
    a2 = a2 if a2.stride(-1) == 1 else a2.contiguous()
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight.detach()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    s, y = _op(a2, weight, bias.detach() if bias is not None else None, x2, ln_weight.detach(),
               ln_bias.detach(), float(eps), out_dtype or x.dtype, name)
    return s.view(x.shape), y.view(x.shape)
