"""Triton import and availability, in one place.

``TRITON_INTERPRET=1`` must be set before the kernels are defined (``@triton.jit`` reads it),
so it is read once, here, at import. With it, Triton kernels run on CPU tensors through the
interpreter (slow; that is how the tests exercise them on machines without a GPU).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _IMPORT_ERROR = ""
except ImportError as exc:  # pragma: no cover - Linux always has triton with torch
    triton = None
    tl = None
    HAS_TRITON = False
    _IMPORT_ERROR = str(exc)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable(device: torch.device) -> str | None:
    if not HAS_TRITON:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if device.type == "cuda":
        if INTERPRET:
            return "TRITON_INTERPRET=1 is set, so Triton runs on CPU tensors only"
        return None
    if device.type == "cpu":
        if INTERPRET:
            return None
        return ("Triton runs on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                "importing dvae_kernels (the interpreter, for tests)")
    return f"Triton does not run on {device.type} tensors"


# Set by dvae_kernels._specialize.capture while it records launches for a given architecture.
CAPABILITY_OVERRIDE: int | None = None


def target_capability(device: torch.device) -> int | None:
    """Compute capability (90 for sm_90) the kernels are compiled for on ``device``; None for
    the interpreter."""
    if CAPABILITY_OVERRIDE is not None:
        return CAPABILITY_OVERRIDE
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return None


def vec16(x: torch.Tensor, *others: torch.Tensor) -> int:
    """Elements per 16 bytes when every row of the 2-D ``x`` (and of ``others``) starts on a
    16-byte boundary and the row length is a multiple of 16 bytes, else 1. Kernels then tell
    the compiler (``tl.multiple_of``) so that rows of V = 1000 bf16 logits load 16 bytes at a
    time, which Triton's own specialisation (multiples of 16 elements) cannot see."""
    vec = 16 // x.element_size()
    for t in (x, *others):
        if (t.data_ptr() % 16 or t.shape[-1] % vec or (t.shape[0] > 1 and t.stride(0) % vec)
                or t.stride(-1) != 1):
            return 1
    return vec


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# The per-row kernels (token_logprobs, weighted_token_nll, sample_tokens) run one warp per
# program over a tile of up to ROW_TILE values, 64 per thread, so that every row reduction
# stays inside the warp (shuffles, no shared memory, no barrier). Several short rows share a
# tile; a row longer than the tile is walked in tiles with the online update below.
ROW_TILE = 2048
ROW_WARPS = 1


def row_tile(V: int) -> tuple[int, int]:
    """(rows, columns) of one program's tile for rows of ``V`` values."""
    block_v = min(next_power_of_2(V), ROW_TILE)
    return max(1, ROW_TILE // block_v), block_v


# Fast fp32 exponent and logarithm, base 2, for the kernels. On a GPU, ex2.approx.ftz and
# lg2.approx.ftz: one MUFU instruction each (tl.math.exp2 compiles to the non-ftz ex2, which
# wraps every MUFU in FSETP + two predicated FMULs for subnormal results; tl.log compiles to
# libdevice's logf). Flushing subnormals turns exp2 results below 2^-126 (1e-38) into 0. The
# interpreter cannot run inline PTX: there they are tl.math.exp2 / tl.math.log2.
if HAS_TRITON:
    LOG2E = tl.constexpr(1.4426950408889634)
    LN2 = tl.constexpr(0.6931471805599453)
    _FAST_MATH = tl.constexpr(not INTERPRET)

    @triton.jit
    def exp2_fast(x):
        """2**x (fp32), one MUFU.EX2 on a GPU."""
        if _FAST_MATH:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.math.exp2(x)

    @triton.jit
    def log2_fast(x):
        """log2(x) (fp32), one MUFU.LG2 on a GPU."""
        if _FAST_MATH:
            return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.math.log2(x)

    @triton.jit
    def tanh_f32(u):
        """tanh(u) in float32 to a few ulps without libdevice (which the interpreter lacks):
        below |u| = 0.3 an odd Taylor polynomial to u^11 (truncation under 1e-9 relative),
        above it (1 - e)/(1 + e) with e = 2^(-2|u|·log2 e) (the subtraction loses at most a
        factor 1.2). tanh(±inf) = ±1."""
        a = tl.abs(u)
        a2 = a * a
        poly = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (
            0.13333333333333333 + a2 * (-0.05396825396825397 + a2 * (
                0.021869488536155203 + a2 * -0.008863235529902197)))))
        e = tl.math.exp2(a * (-2.0 * LOG2E))
        t = tl.where(a < 0.3, poly, (1.0 - e) / (1.0 + e))
        return tl.where(u < 0.0, -t, t)

    @triton.jit
    def transform_logits(x, inv_temp, cap, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
        """``x / temperature`` (SCALE) then ``cap·tanh(x / cap)`` (SOFTCAP), float32."""
        if SCALE:
            x = x * inv_temp
        if SOFTCAP:
            x = cap * tanh_f32(x / cap)
        return x

    @triton.jit
    def online_softmax_step(x, m, m_safe, s, a, WITH_ENTROPY: tl.constexpr):
        """Fold a [rows, cols] tile ``x`` (float32, -inf where masked) into each row's running
        statistics, in base 2: the maximum ``m`` (-inf until a finite value is seen) and its
        finite version ``m_safe`` (the shift), ``s = Σ 2^d2`` and, WITH_ENTROPY,
        ``a = Σ 2^d2·d2`` with ``d2 = (x - m_safe)·log2 e``. Then ``lse = m_safe + log s``,
        a log-probability is ``(x - m_safe) - log s`` (never ``x - lse``: exact for logits
        of ±1e4) and the entropy ``(log2 s - a/s)·ln 2`` (no cancellation for large logits).
        One MUFU.EX2 per value. Returns the new ``(m, m_safe, s, a)``."""
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = exp2_fast((m - m_new_safe) * LOG2E)  # 0 while nothing finite was seen
        d2 = (x - m_new_safe[:, None]) * LOG2E
        e = exp2_fast(d2)
        if WITH_ENTROPY:
            # -inf logits: e = 0 and d2 = -inf; the clamp keeps 0·(-inf) out of the sum.
            a = alpha * (a + s * ((m_safe - m_new_safe) * LOG2E)) \
                + tl.sum(e * tl.maximum(d2, -3.0e38), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        return m_new, m_new_safe, s, a

