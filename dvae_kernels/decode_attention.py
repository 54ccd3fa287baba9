"""decode_attention: one position of causal self-attention over a KV cache, one launch.

    kv_cache[:, :, :, t] = kv_new.transpose(0, 1)     # kv_new [B, 2, h, dh]
    out = F.scaled_dot_product_attention(q[:, :, None], kv_cache[0, :, :, :t + 1],
                                         kv_cache[1, :, :, :t + 1])[:, :, 0]

Read top to bottom: torch backend, cpu backend, Triton kernel and launcher, the registered op,
the public function.

Why: an autoregressive sampler runs this at every position; eager PyTorch spends a copy into
the cache plus SDPA's launches on a few hundred rows, and a masked attention over the whole
cache reads L slots where t + 1 are valid. The kernel writes the new key and value into slot
``t`` and attends to slots ``0..t`` only, with ``t`` read from device memory, so nothing about
the position lives on the host and the whole decode loop can be captured as one CUDA graph.
A program is one (row, head): the new key and value come from registers (slot t is written,
never read back), the others from the cache in BLOCK_S tiles with an online softmax. Bytes
per call: B·h·dh·((t + 1)·2·|cache| + 2·|q|) plus the 2·B·h·dh written.

The kernel mutates ``kv_cache`` (the op declares it). No backward: decoding runs under
``no_grad``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _dispatch, _validate
from ._triton import HAS_TRITON, next_power_of_2, tl, triton
from .attention import OP as ATTENTION
from .attention import supports_native as _attention_supports_native

# ---------------------------------------------------------------------------------------------
# torch and cpu backends: write the slot, then attend to the t + 1 written ones.
# ---------------------------------------------------------------------------------------------


def _write_slot(kv_new, kv_cache, t: int):
    kv_cache[:, :, :, t] = kv_new.transpose(0, 1)
    return kv_cache[0, :, :, :t + 1], kv_cache[1, :, :, :t + 1]


def _torch_forward(q, kv_new, kv_cache, t: int):
    k, v = _write_slot(kv_new, kv_cache, t)
    if q.device.type == "cpu":
        # One query per (row, head) over at most L slots: two einsums beat the CPU's
        # flash-attention kernel, whose per-(row, head) setup dominates at these sizes.
        scores = torch.einsum("bhd,bhtd->bht", q, k) * (1.0 / math.sqrt(q.shape[-1]))
        return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), v)
    return F.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]


def _native_forward(q, kv_new, kv_cache, t: int):
    """The C++ attention kernel (:mod:`dvae_kernels.attention`), one query per (row, head)."""
    k, v = _write_slot(kv_new, kv_cache, t)
    return ATTENTION.forward("cpu")(q[:, :, None], k, v, False)[:, :, 0]


def _supports_native(q, kv_new, kv_cache) -> str | None:
    return _attention_supports_native(q, kv_cache, kv_cache)


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

BLOCK_S = 64

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


def _triton_forward(q, kv_new, kv_cache, t_device):
    """q [B, h, dh]; kv_new [B, 2, h, dh]; kv_cache [2, B, h, L, dh] (dh contiguous);
    t_device: 0-d integer tensor on the device, the slot to write and the last slot to read."""
    B, H, DH = q.shape
    out = torch.empty((B, H, DH), dtype=q.dtype, device=q.device)
    if B * H == 0:
        return out
    _decode_attention_kernel[(B * H,)](
        q, kv_new, kv_cache, t_device, out, H, DH,
        q.stride(0), q.stride(1), kv_new.stride(0), kv_new.stride(1), kv_new.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        out.stride(0), out.stride(1), DH ** -0.5,
        BLOCK_S=BLOCK_S, BLOCK_DH=next_power_of_2(DH), num_warps=4)
    return out


def _supports_triton(q, kv_new, kv_cache) -> str | None:
    if kv_cache.stride(-1) != 1:
        return "kv_cache must have unit stride along dh"
    if q.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    return None


OP = _dispatch.Op("decode_attention")
OP.register("torch", _torch_forward)
OP.register("triton", _triton_forward, supports=_supports_triton,
            limits="no float64, kv_cache unit stride along dh")
OP.register("cpu", _native_forward, supports=_supports_native,
            limits="float32, unit stride along dh, not under autocast")

# ---------------------------------------------------------------------------------------------
# Registered op (the Triton kernel; the torch and cpu backends write the slot in eager code)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("dvae_kernels::decode_attention", mutates_args=("kv_cache",))
def _op(q: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor, t: torch.Tensor,
        backend: str) -> torch.Tensor:
    return OP.forward(backend)(q, kv_new, kv_cache, t)


@_op.register_fake
def _(q, kv_new, kv_cache, t, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def decode_attention(q: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor, t: int,
                     t_device: torch.Tensor | None = None, *, backend: str | None = None
                     ) -> torch.Tensor:
    """One causal decode step over a KV cache: write position ``t``'s key and value, attend
    to slots ``0..t``.

    Args:
        q: ``[B, h, dh]`` the position's queries.
        kv_new: ``[B, 2, h, dh]`` its key and value (a view of the qkv projection is fine).
        kv_cache: ``[2, B, h, L, dh]``, written in place at slot ``t``; slots past ``t`` are
            never read (they need no initialisation).
        t: the position (the torch and cpu backends slice with it).
        t_device: ``t`` as a 0-d integer tensor on ``q``'s device (the Triton kernel reads
            it there, so a captured CUDA graph replays every position); None: made from ``t``
            (one small copy).
        backend: ``"torch"``, ``"triton"``, ``"cpu"`` or ``None``/``"auto"``.

    Returns:
        ``[B, h, dh]`` in ``q``'s dtype. Not differentiable (decoding runs under no_grad).

    Equivalent PyTorch::

        kv_cache[:, :, :, t] = kv_new.transpose(0, 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], kv_cache[0, :, :, :t + 1], kv_cache[1, :, :, :t + 1])[:, :, 0]
    """
    for name, x in (("q", q), ("kv_new", kv_new), ("kv_cache", kv_cache)):
        _validate.check_float(name, x)
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, B, h, L, dh], got "
                         f"{_validate.describe(kv_cache)}")
    _, B, H, L, DH = kv_cache.shape
    if q.shape != (B, H, DH) or kv_new.shape != (B, 2, H, DH):
        raise ValueError(f"expected q [{B}, {H}, {DH}] and kv_new [{B}, 2, {H}, {DH}] for a "
                         f"cache of {tuple(kv_cache.shape)}, got q {tuple(q.shape)} and kv_new "
                         f"{tuple(kv_new.shape)}")
    if not 0 <= t < L:
        raise ValueError(f"t must be in [0, {L}), got {t}")
    _validate.check_same_device(q=q, kv_new=kv_new, kv_cache=kv_cache)
    name = OP.select(backend, q.device, q=q, kv_new=kv_new, kv_cache=kv_cache)
    if name != "triton":
        return OP.forward(name)(q, kv_new, kv_cache, t)
    if t_device is None:
        t_device = torch.tensor(t, dtype=torch.int32, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv_new = kv_new if kv_new.stride(-1) == 1 else kv_new.contiguous()
    return _op(q, kv_new, kv_cache, t_device, name)
