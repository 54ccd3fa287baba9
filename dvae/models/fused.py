"""Fused ops for the KV-cache sampling loop, where each kernel launch costs more than its work.

``add_layer_norm``: the residual add, the LayerNorm after it and the cast of its output to the
compute dtype, in one Triton kernel on CUDA (three kernels in eager PyTorch under autocast)::

    s = x + r                                         # the residual stream, x's dtype (fp32)
    y = F.layer_norm(s, (D,), weight, bias, eps).to(out_dtype)

``decode_attention``: one position of causal self-attention over a KV cache. The kernel writes
the new key and value into slot ``t`` and attends to slots ``0..t`` only, with ``t`` read from
device memory (so nothing about the position lives on the host: graph-safe), one launch::

    kv_cache[:, :, :, t] = kv_new.transpose(0, 1)     # kv_new [B, 2, h, dh]
    out = F.scaled_dot_product_attention(q[:, :, None], kv_cache[0, :, :, :t + 1],
                                         kv_cache[1, :, :, :t + 1])[:, :, 0]

``linear_add_layer_norm``: an output projection (or the MLP's second layer), the residual add
and the LayerNorm after it, one kernel::

    s = x + F.linear(a, weight, bias)
    y = F.layer_norm(s, (D,), ln.weight, ln.bias, ln.eps).to(out_dtype)

(the projection stays in float32 until the add: no rounding to bf16 in between).

``attention``: ``F.scaled_dot_product_attention(q, k, v, is_causal=causal)`` of the
transformers' small heads; on the CPU (float32, the C++ extension built) one C++ kernel forward
and one backward (csrc/cpu/attention.cpp), which at these sizes (head size 16, 8-64 positions)
cost a fraction of PyTorch's CPU flash-attention kernel; the same numbers up to float32
rounding.

Otherwise the CPU (and any device without Triton) runs exactly the PyTorch lines above.
Triton is used for CUDA tensors, or for CPU tensors through the interpreter when
:data:`FORCE_TRITON` is set (the tests).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dvae_kernels import _csrc

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
    def _add_layer_norm_kernel(x_ptr, idx_ptr, r_ptr, w_ptr, b_ptr, s_ptr, y_ptr, D,
                               stride_x, stride_r, stride_s, stride_y, eps,
                               HAS_INDEX: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        if HAS_INDEX:  # x is a table and this row's x is row idx[row] of it
            x_row = tl.load(idx_ptr + row).to(tl.int64)
        else:
            x_row = row.to(tl.int64)
        x = tl.load(x_ptr + x_row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
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


if HAS_TRITON:

    @triton.jit
    def _decode_attention_kernel(q_ptr, kn_ptr, c_ptr, t_ptr, o_ptr, H, DH,
                                 stride_qb, stride_qh, stride_nb, stride_n2, stride_nh,
                                 stride_c2, stride_cb, stride_ch, stride_cl,
                                 stride_ob, stride_oh, scale,
                                 BLOCK_S: tl.constexpr, BLOCK_DH: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // H
        hh = pid % H
        d = tl.arange(0, BLOCK_DH)
        dm = d < DH
        t = tl.load(t_ptr).to(tl.int32)
        q = tl.load(q_ptr + b * stride_qb + hh * stride_qh + d, mask=dm, other=0.0)
        q = q.to(tl.float32)
        kn = tl.load(kn_ptr + b * stride_nb + hh * stride_nh + d, mask=dm, other=0.0)
        vn = tl.load(kn_ptr + b * stride_nb + stride_n2 + hh * stride_nh + d, mask=dm,
                     other=0.0)
        k_base = c_ptr + b * stride_cb + hh * stride_ch
        v_base = k_base + stride_c2
        tl.store(k_base + t * stride_cl + d, kn.to(c_ptr.dtype.element_ty), mask=dm)
        tl.store(v_base + t * stride_cl + d, vn.to(c_ptr.dtype.element_ty), mask=dm)
        # slot t from registers (it is not read back), then slots 0..t-1 from the cache,
        # with an online softmax
        kn = kn.to(c_ptr.dtype.element_ty).to(tl.float32)
        m = tl.sum(q * kn, axis=0) * scale
        den = m * 0.0 + 1.0
        acc = vn.to(c_ptr.dtype.element_ty).to(tl.float32)
        for s0 in range(0, t, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            sm = s < t
            tile = sm[:, None] & dm[None, :]
            offs = s[:, None] * stride_cl + d[None, :]
            k = tl.load(k_base + offs, mask=tile, other=0.0).to(tl.float32)
            sc = tl.where(sm, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new)
            v = tl.load(v_base + offs, mask=tile, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            den = den * alpha + tl.sum(p, axis=0)
            m = m_new
        out = acc / den
        tl.store(o_ptr + b * stride_ob + hh * stride_oh + d, out.to(o_ptr.dtype.element_ty),
                 mask=dm)


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


@torch.library.custom_op("dvae::linear_add_layer_norm", mutates_args=())
def _linear_add_layer_norm_op(a: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor], x: torch.Tensor,
                              ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                              out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """a [R, K], weight [D, K] (a's dtype), bias [D] or None, x [R, D]; ln_* [D]."""
    R, K = a.shape
    D = weight.shape[0]
    s = torch.empty((R, D), dtype=x.dtype, device=x.device)
    y = torch.empty((R, D), dtype=out_dtype, device=x.device)
    if R == 0:
        return s, y
    dot_fp32 = INTERPRET or a.dtype == torch.float32
    block_m = 16
    _linear_add_layer_norm_kernel[(triton.cdiv(R, block_m),)](
        a, weight, bias if bias is not None else weight, x, ln_weight, ln_bias, s, y,
        R, K, D, a.stride(0), weight.stride(0), x.stride(0), s.stride(0), y.stride(0), eps,
        HAS_BIAS=bias is not None, DOT_FP32=dot_fp32,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_K=32, BLOCK_D=max(16, triton.next_power_of_2(D)),
        num_warps=4)
    return s, y


@_linear_add_layer_norm_op.register_fake
def _(a, weight, bias, x, ln_weight, ln_bias, eps, out_dtype):
    R, D = a.shape[0], weight.shape[0]
    return x.new_empty((R, D)), x.new_empty((R, D), dtype=out_dtype)


def linear_add_layer_norm(a: torch.Tensor, linear: nn.Linear, x: torch.Tensor,
                          ln: nn.LayerNorm, out_dtype: torch.dtype | None = None,
                          cast: tuple[torch.Tensor, torch.Tensor | None] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, y)`` with ``s = x + linear(a)`` and ``y = ln(s)`` in ``out_dtype``, one kernel on
    CUDA (see the module docstring).

    Args:
        a: ``[..., K]`` the projection's input.
        linear: ``nn.Linear(K, D)``.
        x: ``[..., D]`` the residual stream (float32).
        ln: a LayerNorm over D features.
        out_dtype: the dtype of ``y`` (None: LayerNorm's own).
        cast: ``(weight, bias)`` of ``linear`` already in ``a``'s dtype (cast once per
            sampling call, not at every position); None: cast here when needed.

    Returns:
        ``s`` and ``y``, ``x``'s shape.
    """
    D = x.shape[-1]
    if linear.out_features != D or a.shape[-1] != linear.in_features:
        raise ValueError(f"linear must map a's last dim ({a.shape[-1]}) to x's ({D}), got "
                         f"{linear}")
    if not _use_triton(x) or D > 256:
        return add_layer_norm(x, linear(a), ln, out_dtype)
    weight, bias = cast if cast is not None else (linear.weight, linear.bias)
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
    s, y = _linear_add_layer_norm_op(
        a2, weight, bias.detach() if bias is not None else None, x2, ln.weight.detach(),
        ln.bias.detach(), float(ln.eps), out_dtype or x.dtype)
    return s.view(x.shape), y.view(x.shape)


@torch.library.custom_op("dvae::decode_attention", mutates_args=("kv_cache",))
def _decode_attention_op(q: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
                         t: torch.Tensor) -> torch.Tensor:
    """q [B, h, dh]; kv_new [B, 2, h, dh]; kv_cache [2, B, h, L, dh] (dh contiguous);
    t: 0-d integer tensor on the device, the slot to write and the last slot to read."""
    B, H, DH = q.shape
    out = torch.empty((B, H, DH), dtype=q.dtype, device=q.device)
    if B * H == 0:
        return out
    _decode_attention_kernel[(B * H,)](
        q, kv_new, kv_cache, t, out, H, DH,
        q.stride(0), q.stride(1), kv_new.stride(0), kv_new.stride(1), kv_new.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        out.stride(0), out.stride(1), DH ** -0.5,
        BLOCK_S=64, BLOCK_DH=triton.next_power_of_2(DH), num_warps=4)
    return out


@_decode_attention_op.register_fake
def _(q, kv_new, kv_cache, t):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention(q: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor, t: int,
                     t_device: torch.Tensor | None = None) -> torch.Tensor:
    """One causal decode step over a KV cache (see the module docstring).

    Args:
        q: ``[B, h, dh]`` the position's queries.
        kv_new: ``[B, 2, h, dh]`` its key and value (a view of the qkv projection is fine).
        kv_cache: ``[2, B, h, L, dh]``, written in place at slot ``t``.
        t: the position (the PyTorch path slices with it).
        t_device: ``t`` as a 0-d integer tensor on ``q``'s device (the Triton kernel reads
            it there); None: made from ``t`` (one small copy).

    Returns:
        ``[B, h, dh]`` in ``q``'s dtype.
    """
    _, B, H, L, DH = kv_cache.shape
    if q.shape != (B, H, DH) or kv_new.shape != (B, 2, H, DH):
        raise ValueError(f"expected q [{B}, {H}, {DH}] and kv_new [{B}, 2, {H}, {DH}] for a "
                         f"cache of {tuple(kv_cache.shape)}, got q {tuple(q.shape)} and kv_new "
                         f"{tuple(kv_new.shape)}")
    if not 0 <= t < L:
        raise ValueError(f"t must be in [0, {L}), got {t}")
    if not _use_triton(q) or kv_cache.stride(-1) != 1:
        kv_cache[:, :, :, t] = kv_new.transpose(0, 1)
        k, v = kv_cache[0, :, :, :t + 1], kv_cache[1, :, :, :t + 1]
        if q.device.type == "cpu":
            if _use_cpu_attention(q, k, v):  # the C++ kernel: one pass per (row, head)
                return _cpu_attention_op(q[:, :, None], k, v, False, DH ** -0.5)[0][:, :, 0]
            # One query per (row, head) over at most L slots: two einsums beat the CPU's
            # flash-attention kernel, whose per-(row, head) setup dominates at these sizes
            # (B=2048, h=4, dh=16: 0.26 against 1.66 ms at t=0, equal at t=7).
            scores = torch.einsum("bhd,bhtd->bht", q, k) * (1.0 / math.sqrt(DH))
            return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), v)
        y = F.scaled_dot_product_attention(q[:, :, None], k, v)
        return y[:, :, 0]
    if t_device is None:
        t_device = torch.tensor(t, dtype=torch.int32, device=q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if kv_new.stride(-1) != 1:
        kv_new = kv_new.contiguous()
    return _decode_attention_op(q, kv_new, kv_cache, t_device)


@torch.library.custom_op("dvae::cpu_attention", mutates_args=())
def _cpu_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, h, T, dh], k/v [B, h, S, dh] float32 CPU (unit stride along dh) -> (out
    [B, h, T, dh] stored as [B, T, h, dh], lse [B, h, T])."""
    return torch.ops.dvae_kernels_C.attention_fwd(q, k, v, causal, scale)


@_cpu_attention_op.register_fake
def _(q, k, v, causal, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), q.new_empty((B, H, T))


def _cpu_attention_setup(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(q, k, v, *output)


@torch.library.custom_op("dvae::cpu_attention_backward", mutates_args=())
def _cpu_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                               causal: bool, scale: float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), each stored as [B, T, h, dh] (the layout of the forward's output)."""
    return torch.ops.dvae_kernels_C.attention_bwd(grad_out, q, k, v, out, lse, causal, scale)


@_cpu_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale):
    def like(t):
        B, H, T, D = t.shape
        return t.new_empty((B, T, H, D)).transpose(1, 2)
    return like(q), like(k), like(v)


def _cpu_attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = _cpu_attention_backward_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_cpu_attention_op.register_autograd(_cpu_attention_backward, setup_context=_cpu_attention_setup)


def _use_cpu_attention(*ts: torch.Tensor) -> bool:
    if FORCE_TRITON or torch.is_autocast_enabled("cpu"):
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1
               for t in ts):
        return False
    return _csrc.unavailable("cpu") is None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=causal)`` (default scale
    ``dh**-0.5``; causal: query t sees keys 0..t), through the C++ kernel on the CPU (module
    docstring), else SDPA.

    Args:
        q: ``[B, h, T, dh]``.
        k, v: ``[B, h, S, dh]``, S >= 1.

    Returns:
        ``[B, h, T, dh]``, differentiable in ``q``, ``k`` and ``v``.
    """
    if (q.dim() == 4 and k.dim() == 4 and k.shape == v.shape and k.shape[2] >= 1
            and q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3]
            and _use_cpu_attention(q, k, v)):
        return _cpu_attention_op(q, k, v, causal, q.shape[-1] ** -0.5)[0]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@torch.library.custom_op("dvae::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float, out_dtype: torch.dtype,
                       index: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, D] (or a table [T, D] read at rows ``index`` [R]); r [R, D] or [D] (broadcast
    over rows); weight, bias [D]."""
    R, D = (index.shape[0], x.shape[1]) if index is not None else x.shape
    s = torch.empty((R, D), dtype=torch.promote_types(x.dtype, r.dtype), device=x.device)
    y = torch.empty((R, D), dtype=out_dtype, device=x.device)
    if R == 0:
        return s, y
    stride_r = 0 if r.dim() == 1 else r.stride(0)
    _add_layer_norm_kernel[(R,)](
        x, index if index is not None else x, r, weight, bias, s, y, D, x.stride(0), stride_r,
        s.stride(0), y.stride(0), eps, HAS_INDEX=index is not None,
        BLOCK_D=triton.next_power_of_2(D), num_warps=1 if D <= 256 else 4)
    return s, y


@_add_layer_norm_op.register_fake
def _(x, r, weight, bias, eps, out_dtype, index=None):
    R, D = (index.shape[0], x.shape[1]) if index is not None else x.shape
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


def embed_add_layer_norm(index: torch.Tensor, table: torch.Tensor, r: torch.Tensor,
                         ln: nn.LayerNorm, out_dtype: torch.dtype | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_layer_norm` of ``table[index]`` (an embedding lookup) and ``r``, the lookup
    inside the same kernel on CUDA.

    Args:
        index: ``[R]`` integer rows of ``table``.
        table: ``[T, D]``.
        r: ``[D]`` (added to every row) or ``[R, D]``.

    Returns:
        ``s`` and ``y``, ``[R, D]``.

    Equivalent PyTorch::

        s, y = add_layer_norm(torch.nn.functional.embedding(index, table), r, ln, out_dtype)
    """
    if index.dim() != 1 or table.dim() != 2:
        raise ValueError(f"index must be [R] and table [T, D], got {tuple(index.shape)} and "
                         f"{tuple(table.shape)}")
    if not _use_triton(table) or table.stride(-1) != 1:
        return add_layer_norm(F.embedding(index, table), r, ln, out_dtype)
    D = table.shape[1]
    if tuple(r.shape) not in ((D,), (index.shape[0], D)):
        raise ValueError(f"r must be [{D}] or [{index.shape[0]}, {D}], got {tuple(r.shape)}")
    dtype = out_dtype or torch.promote_types(table.dtype, r.dtype)
    r = r if r.stride(-1) == 1 else r.contiguous()
    return _add_layer_norm_op(table.detach(), r, ln.weight.detach(), ln.bias.detach(),
                              float(ln.eps), dtype, index)
