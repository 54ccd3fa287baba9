"""linear_token_logprobs: token_logprobs of ``hidden @ weight.T + bias`` without the logits.

    logits[..., V] = hidden[..., D] @ weight[V, D].T + bias[V]        (never stored whole)
    logp[...]      = log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
    entropy[...]   = -(softmax(logits.float(), -1) * log_softmax(logits.float(), -1)).sum(-1)

Read top to bottom: torch backend (the oracle; chunked over rows), Triton kernels and
launchers, the registered ops with their fake and autograd rules, the public function.

Memory. The materialised path (linear, log_softmax, gather) keeps [N, V] logits, their
log-softmax and, in the backward, an [N, V] gradient: at N = 65536, V = 16384 that is 4 GiB
per tensor in float32. Here the forward keeps 8 bytes per row (log-sum-exp and entropy); the
torch backend holds one [chunk, V] block at a time, the Triton kernels only register tiles.

Kernel plan (Triton). Forward: a program owns BLOCK_N rows; for each vocabulary tile it forms
the [BLOCK_N, BLOCK_V] logits with ``tl.dot`` over BLOCK_D slices of the hidden size (fp32
accumulator), then updates an online maximum ``m``, ``s = Σ exp(x - m)`` and
``a = Σ exp(x - m)·(x - m)`` as in token_logprobs (``lse = m + log s``,
``entropy = log s - a/s``), and picks the sampled token's logit out of the tile.

Backward: recompute, not gradient-in-forward, and no atomics. Two kernels recompute the
logits tiles from the saved row statistics (lse, entropy) and form
``dlogits = g_logp·(onehot - p) - g_entropy·p·(log p + entropy)`` in registers. The dH kernel
owns BLOCK_N rows and a slice of the hidden size, loops over the vocabulary and accumulates
``dlogits @ weight_tile`` in registers, writing grad_hidden once in its dtype. The dW kernel
owns a vocabulary tile and a hidden slice and loops over one split of the rows, accumulating
``dlogitsᵀ @ hidden_rows`` (and the bias' column sums) into an fp32 partial per split; the
splits are then summed in a fixed order. So the gradients have the same bits on every run.
Why recompute: storing dlogits (or p) is the [N, V] tensor this op exists to avoid, and
computing the gradient inside the forward (as Liger-Kernel's fused cross-entropy does) needs
the upstream gradient before it exists. That is known only for a scalar loss whose gradient is
1; here logp and entropy feed arbitrary downstream code (DAPS weights, KL terms), and the two
outputs have independent gradients. Each backward kernel recomputes the logits once (per
hidden slice): 2·N·V·D FLOPs each on top of dH and dW, for O(N·D + splits·V·D) memory.
Why not one kernel adding both products with fp32 atomics: its atomic payload is
2·N·V·D/BLOCK·4 bytes (gigabytes at the DAPS shape), and the order of the atomic adds changes
the last bits from run to run.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _autotune, _csrc, _dispatch, _validate
from ._triton import HAS_TRITON, INTERPRET, next_power_of_2, target_capability, tl, triton

if HAS_TRITON:
    from ._triton import LN2, LOG2E, exp2_fast, online_softmax_step, transform_logits
from .token_logprobs import _acc_dtype

# ---------------------------------------------------------------------------------------------
# torch backend: chunked over rows; peak extra memory O(chunk·V + N) beyond a float32 copy of
# the weight (made only for half-precision inputs).
# ---------------------------------------------------------------------------------------------

# Logits per chunk. 2^22 float32 values are 16 MiB; a chunk needs about four such blocks
# (logits, shifted, probabilities, a product) and keeps the per-chunk Python overhead small.
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _torch_logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """[C, D] x [V, D] (+ [V]) -> [C, V] in the accumulation dtype of ``w``."""
    h = h.to(w.dtype)
    return torch.addmm(b, h, w.t()) if b is not None else h @ w.t()


def _acc_params(weight, bias):
    acc = _acc_dtype(weight.dtype)
    return weight.to(acc), (bias.to(acc) if bias is not None else None)


def _row_stats(x: torch.Tensor, tok: torch.Tensor):
    """logits [C, V] (overwritten) -> (logp, lse, entropy), each row like token_logprobs.

    In place and with few passes over the [C, V] block: on a CPU these element-wise passes,
    not the matmul, dominate at small D."""
    V = x.shape[-1]
    if V == 0:
        nan = x.new_full((x.shape[0],), float("nan"))
        return nan, x.new_full((x.shape[0],), float("-inf")), nan
    m = x.amax(-1)
    m = torch.where(m == float("-inf"), 0.0, m)
    shifted = x.sub_(m[:, None])  # x - m, then log p = (x - m) - log s: never x - lse
    log_s = torch.logsumexp(shifted, dim=-1)
    lse = m + log_s
    lse = torch.where(lse == float("inf"), float("nan"), lse)  # +inf logits: NaN, as log_softmax
    shifted = shifted.sub_(log_s[:, None])
    valid = (tok >= 0) & (tok < V)
    picked = shifted.gather(-1, torch.where(valid, tok, 0).long()[:, None])[:, 0]
    logp = torch.where(valid, picked, float("nan"))
    p = shifted.exp()
    # In a row with finite lse the only NaN of p·log p is 0·(-inf) at a -inf logit: 0 by
    # convention, so nansum. Rows with non-finite lse (NaN, +inf, all -inf) give NaN.
    entropy = torch.where(lse.isfinite(), -torch.nansum(p.mul_(shifted), -1), float("nan"))
    return logp, lse, entropy


def transform_logits_(x: torch.Tensor, inv_temp: float, softcap: float) -> torch.Tensor:
    """In place: ``x / temperature``, then ``softcap·tanh(x / softcap)`` when softcap > 0."""
    if inv_temp != 1.0:
        x.mul_(inv_temp)
    if softcap > 0.0:
        x.div_(softcap).tanh_().mul_(softcap)
    return x


def _torch_forward(hidden, weight, tokens, bias, inv_temp: float = 1.0, softcap: float = 0.0,
                   with_mean: bool = False):
    """hidden [N, D], weight [V, D], tokens [N], bias [V] or None -> (logp, lse, entropy,
    mean logit or an empty [0])."""
    return chunked_forward(_row_stats, hidden, weight, tokens, bias, inv_temp, softcap,
                           with_mean)


def chunked_forward(row_stats, hidden, weight, tokens, bias, inv_temp: float = 1.0,
                    softcap: float = 0.0, with_mean: bool = False):
    """The forward over row chunks of at most CHUNK_ELEMENTS logits, each chunk's statistics
    from ``row_stats(logits [C, V] float32, tokens [C]) -> (logp, lse, entropy)`` (the torch
    code here, or the C++ row kernel for the cpu backend), after the temperature and the
    softcap; with ``with_mean`` also each row's mean logit (label smoothing's term)."""
    N = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    logp = torch.empty(N, dtype=acc, device=hidden.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    mean = torch.empty(N if with_mean else 0, dtype=acc, device=hidden.device)
    # Autocast would run the matmul in half precision inside the op; the op decides dtypes.
    with torch.autocast(hidden.device.type, enabled=False):
        w, b = _acc_params(weight, bias)
        step = chunk_rows(weight.shape[0])
        for r0 in range(0, N, step):
            x = transform_logits_(_torch_logits(hidden[r0:r0 + step], w, b), inv_temp,
                                  softcap)
            if with_mean:
                mean[r0:r0 + step] = x.mean(-1)
            lp, l, e = row_stats(x, tokens[r0:r0 + step])
            logp[r0:r0 + step] = lp
            lse[r0:r0 + step] = l
            ent[r0:r0 + step] = e
    return logp, lse, ent, mean


def _dlogits(x, tok, lse, entropy, grad_logp, grad_lse, grad_entropy):
    """d(Σ g_logp·logp + g_lse·lse + g_entropy·entropy) / d logits for one chunk [C, V]
    (``x`` is overwritten). With p = softmax(x) and onehot at the token:

        dlogits = g_logp·onehot + p·(g_lse - g_logp - g_entropy·(entropy + log p))
    """
    C, V = x.shape
    zero = x.new_zeros(C)
    g_lp = grad_logp.to(x.dtype) if grad_logp is not None else zero
    coef = (grad_lse.to(x.dtype) if grad_lse is not None else zero) - g_lp
    # A -inf logit has log p = -inf and p = 0; clamping log p keeps 0·(-inf) out of the
    # entropy term. -1e4: exp of it is exactly 0 in float32 and float64 (so no p changes), and
    # g_entropy·1e4 stays finite for any finite float32 g_entropy (1e30 overflowed).
    log_p = x.sub_(lse[:, None]).clamp_(min=-1e4)
    if grad_entropy is not None:
        g_h = grad_entropy.to(x.dtype)
        coef = coef - g_h * entropy
        grad = torch.exp(log_p).mul_(log_p.mul_(-g_h[:, None]).add_(coef[:, None]))
    else:
        grad = log_p.exp_().mul_(coef[:, None])
    if grad_logp is not None:
        valid = (tok >= 0) & (tok < V)
        grad.scatter_add_(-1, torch.where(valid, tok, 0).long()[:, None],
                          torch.where(valid, g_lp, 0.0)[:, None])
    return grad


def _torch_backward(grad_logp, grad_lse, grad_entropy, grad_mean, hidden, weight, tokens,
                    bias, lse, entropy, inv_temp: float = 1.0, softcap: float = 0.0):
    return chunked_backward(_dlogits, grad_logp, grad_lse, grad_entropy, grad_mean, hidden,
                            weight, tokens, bias, lse, entropy, inv_temp, softcap)


def chunked_backward(dlogits, grad_logp, grad_lse, grad_entropy, grad_mean, hidden, weight,
                     tokens, bias, lse, entropy, inv_temp: float = 1.0, softcap: float = 0.0):
    """The backward over row chunks: each chunk's logits are recomputed (temperature and
    softcap included), turned into their gradient by ``dlogits`` (signature of
    :func:`_dlogits`), plus ``grad_mean / V`` for the mean logit, taken back through the
    softcap (``1 - tanh²``) and the temperature, and multiplied back into the gradients of
    hidden, weight and bias."""
    N, D = hidden.shape
    V = weight.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):
        w, b = _acc_params(weight, bias)
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        grad_w = torch.zeros((V, D), dtype=w.dtype, device=w.device)
        grad_b = torch.zeros((V,), dtype=w.dtype, device=w.device)
        step = chunk_rows(V)
        for r0 in range(0, N, step):
            sl = slice(r0, r0 + step)
            h = hidden[sl].to(w.dtype)
            x = transform_logits_(_torch_logits(h, w, b), inv_temp, softcap)
            # d softcap·tanh(z/softcap) / dz = 1 - (x/softcap)², before dlogits overwrites x
            cap_grad = (x / softcap).square_().neg_().add_(1.0) if softcap > 0.0 else None
            g = dlogits(x, tokens[sl], lse[sl], entropy[sl],
                        grad_logp[sl] if grad_logp is not None else None,
                        grad_lse[sl] if grad_lse is not None else None,
                        grad_entropy[sl] if grad_entropy is not None else None)
            if grad_mean is not None:
                g.add_(grad_mean[sl].to(g.dtype)[:, None] / V)
            if cap_grad is not None:
                g.mul_(cap_grad)
            if inv_temp != 1.0:
                g.mul_(inv_temp)
            grad_hidden[sl] = (g @ w).to(hidden.dtype)
            grad_w.addmm_(g.t(), h)
            if bias is not None:
                grad_b += g.sum(0)
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return grad_hidden, grad_w.to(weight.dtype), grad_b.to(bias_dtype)


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

# Tile sizes. tl.dot needs every tile dimension >= 16 on the GPU; 64 x 64 logits with 64-wide
# hidden slices keep the fp32 accumulator at 32 registers per thread at 4 warps.
BLOCK_N = 64
BLOCK_V = 64
MAX_BLOCK_D = 64

if HAS_TRITON:

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
                     stride_hn, stride_hd, stride_wv, stride_wd,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
                     PRECISION: tl.constexpr):
        """[BLOCK_N, BLOCK_V] float32 logits of ``rows`` x ``cols`` (0 where masked)."""
        h_off = rows.to(tl.int64)[:, None] * stride_hn
        w_off = cols.to(tl.int64)[None, :] * stride_wv
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            h = tl.load(h_ptr + h_off + dd[None, :] * stride_hd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_ptr + w_off + dd[:, None] * stride_wd,
                        mask=d_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_V]
            if DOT_FP32:  # the interpreter's tl.dot is wrong on bf16 operands
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += b[None, :]
        return acc

    @triton.jit
    def _linear_token_logprobs_fwd_kernel(
        h_ptr, w_ptr, b_ptr, tokens_ptr, logp_ptr, lse_ptr, ent_ptr,
        N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, mean_ptr, inv_temp, cap,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        EVEN_V: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
        WITH_MEAN: tl.constexpr,
    ):
        # Statistics in base 2 as in token_logprobs: d2 = (x - m)·log2 e, e = 2^d2 (one
        # MUFU.EX2), a = Σ e·d2; logp = (x_t - m) - log s, never x - lse.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tok = tl.load(tokens_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        tok_ok = (tok >= 0) & (tok < V)
        tok32 = tl.where(tok_ok, tok, -1).to(tl.int32)
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max (may stay -inf)
        m_safe = tl.zeros([BLOCK_N], tl.float32)  # finite version used as the shift
        s = tl.zeros([BLOCK_N], tl.float32)  # Σ 2^d2
        a = tl.zeros([BLOCK_N], tl.float32)  # Σ 2^d2 · d2
        picked = tl.zeros([BLOCK_N], tl.float32)  # the sampled token's logit
        total = tl.zeros([BLOCK_N], tl.float32)  # Σ logits (WITH_MEAN)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
                             stride_hn, stride_hd, stride_wv, stride_wd,
                             HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, PRECISION)
            x = transform_logits(x, inv_temp, cap, SCALE, SOFTCAP)
            if WITH_MEAN:
                total += tl.sum(tl.where(col_ok[None, :], x, 0.0), axis=1)
            if not EVEN_V:  # columns past V (a last partial tile) weigh nothing
                x = tl.where(col_ok[None, :], x, float("-inf"))
            picked += tl.sum(tl.where(cols[None, :] == tok32[:, None], x, 0.0), axis=1)
            m, m_safe, s, a = online_softmax_step(x, m, m_safe, s, a, True)
        log2_s = tl.math.log2(s)
        log_s = log2_s * LN2
        logp = tl.where(tok_ok, (picked - m_safe) - log_s, float("nan"))  # never x - lse
        tl.store(logp_ptr + rows, logp, mask=row_ok)
        tl.store(lse_ptr + rows, m_safe + log_s, mask=row_ok)
        tl.store(ent_ptr + rows, (log2_s - a / s) * LN2, mask=row_ok)
        if WITH_MEAN:
            tl.store(mean_ptr + rows, total / V, mask=row_ok)

    @triton.jit
    def _row_grads(glogp_ptr, glse_ptr, gent_ptr, tokens_ptr, lse_ptr, ent_ptr, rows, row_ok,
                   HAS_GLOGP: tl.constexpr, HAS_GLSE: tl.constexpr, HAS_GENT: tl.constexpr,
                   gmean_ptr, HAS_GMEAN: tl.constexpr):
        """Per-row inputs of the logit gradient (zeros for the absent terms)."""
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        zero = tl.zeros_like(lse)
        g_lp, g_l, g_h, ent, g_m = zero, zero, zero, zero, zero
        tok = tl.full(lse.shape, -1, tl.int32)
        if HAS_GLOGP:
            g_lp = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0)
            tok = tl.load(tokens_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
        if HAS_GLSE:
            g_l = tl.load(glse_ptr + rows, mask=row_ok, other=0.0)
        if HAS_GENT:
            g_h = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        if HAS_GMEAN:
            g_m = tl.load(gmean_ptr + rows, mask=row_ok, other=0.0)
        return lse, tok, g_lp, g_l, g_h, ent, g_m

    @triton.jit
    def _dlogits_tile(x, cols, row_ok, col_ok, lse, tok, g_lp, g_l, g_h, ent, g_m, V,
                      inv_temp, cap,
                      HAS_GLOGP: tl.constexpr, HAS_GLSE: tl.constexpr, HAS_GENT: tl.constexpr,
                      HAS_GMEAN: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
        """d(Σ g_lp·logp + g_l·lse + g_h·entropy + g_m·mean)/d logits for a
        [BLOCK_N, BLOCK_V] tile of the raw logits ``x`` (before the temperature and the
        softcap): with y the transformed logits and p = softmax(y),
        g_lp·onehot + p·(g_l - g_lp) - g_h·p·(log p + entropy) + g_m/V with respect to y,
        times 1 - (y/cap)² (SOFTCAP) and 1/temperature (SCALE)."""
        x = transform_logits(x, inv_temp, cap, SCALE, SOFTCAP)
        shifted = x - lse[:, None]
        p = exp2_fast(shifted * LOG2E)
        g = p * (g_l - g_lp)[:, None]
        if HAS_GLOGP:
            g += tl.where(cols[None, :] == tok[:, None], g_lp[:, None], 0.0)
        if HAS_GENT:
            # p = 0 at a -inf logit: the clamp keeps 0·(-inf) out.
            g -= g_h[:, None] * p * (tl.maximum(shifted, -3.0e38) + ent[:, None])
        if HAS_GMEAN:
            g += (g_m / V)[:, None]
        if SOFTCAP:
            y = x / cap
            g = g * (1.0 - y * y)
        if SCALE:
            g = g * inv_temp
        # Rows past N and columns past V need no mask here: they meet zero-filled hidden rows
        # or weight rows in the products, and are never stored (the bias sum masks rows).
        return g

    @triton.jit
    def _linear_dh_kernel(
        glogp_ptr, glse_ptr, gent_ptr, h_ptr, w_ptr, b_ptr, tokens_ptr, lse_ptr, ent_ptr,
        gh_ptr,
        N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, gmean_ptr, inv_temp, cap,
        HAS_BIAS: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GLSE: tl.constexpr,
        HAS_GENT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DH: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        HAS_GMEAN: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        """grad_hidden[rows, d-slice] = Σ over V tiles of dlogits_tile @ weight[tile, d-slice],
        accumulated in registers and written once, in hidden's dtype (no atomics)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        dcols = tl.program_id(1) * BLOCK_DH + tl.arange(0, BLOCK_DH)
        d_ok = dcols < D
        lse, tok, g_lp, g_l, g_h, ent, g_m = _row_grads(
            glogp_ptr, glse_ptr, gent_ptr, tokens_ptr, lse_ptr, ent_ptr, rows, row_ok,
            HAS_GLOGP, HAS_GLSE, HAS_GENT, gmean_ptr, HAS_GMEAN)
        acc = tl.zeros([BLOCK_N, BLOCK_DH], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
                             stride_hn, stride_hd, stride_wv, stride_wd,
                             HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, PRECISION)
            g = _dlogits_tile(x, cols, row_ok, col_ok, lse, tok, g_lp, g_l, g_h, ent, g_m, V,
                              inv_temp, cap, HAS_GLOGP, HAS_GLSE, HAS_GENT, HAS_GMEAN, SCALE,
                              SOFTCAP)
            w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wv
                        + dcols[None, :] * stride_wd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_V, BLOCK_DH]
            if DOT_FP32:  # the interpreter's tl.dot is wrong on bf16 operands
                acc = tl.dot(g, w.to(tl.float32), acc, input_precision=PRECISION)
            else:  # tensor-core operands in the input dtype, as the materialised backward has
                acc = tl.dot(g.to(w_ptr.dtype.element_ty), w, acc, input_precision=PRECISION)
        tl.store(gh_ptr + rows.to(tl.int64)[:, None] * D + dcols[None, :],
                 acc.to(gh_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _linear_dw_kernel(
        glogp_ptr, glse_ptr, gent_ptr, h_ptr, w_ptr, b_ptr, tokens_ptr, lse_ptr, ent_ptr,
        pw_ptr, pb_ptr,
        N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, rows_per_split,
        gmean_ptr, inv_temp, cap,
        HAS_BIAS: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GLSE: tl.constexpr,
        HAS_GENT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DW: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        HAS_GMEAN: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        """Partial grad_weight[split, V tile, d-slice] = Σ over the split's row blocks of
        dlogits_tileᵀ @ hidden[rows, d-slice] (fp32, written once; the splits are summed
        afterwards in a fixed order), and the bias' partial column sums."""
        cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        dcols = tl.program_id(1) * BLOCK_DW + tl.arange(0, BLOCK_DW)
        d_ok = dcols < D
        split = tl.program_id(2)
        r_begin = split * rows_per_split
        r_end = tl.minimum(r_begin + rows_per_split, N)
        acc = tl.zeros([BLOCK_V, BLOCK_DW], tl.float32)
        acc_b = tl.zeros([BLOCK_V], tl.float32)
        for r0 in range(r_begin, r_end, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            row_ok = rows < r_end
            lse, tok, g_lp, g_l, g_h, ent, g_m = _row_grads(
                glogp_ptr, glse_ptr, gent_ptr, tokens_ptr, lse_ptr, ent_ptr, rows, row_ok,
                HAS_GLOGP, HAS_GLSE, HAS_GENT, gmean_ptr, HAS_GMEAN)
            x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
                             stride_hn, stride_hd, stride_wv, stride_wd,
                             HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, PRECISION)
            g = _dlogits_tile(x, cols, row_ok, col_ok, lse, tok, g_lp, g_l, g_h, ent, g_m, V,
                              inv_temp, cap, HAS_GLOGP, HAS_GLSE, HAS_GENT, HAS_GMEAN, SCALE,
                              SOFTCAP)
            if HAS_BIAS:
                acc_b += tl.sum(tl.where(row_ok[:, None], g, 0.0), axis=0)
            h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hn
                        + dcols[None, :] * stride_hd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DW]
            if DOT_FP32:
                acc = tl.dot(tl.trans(g), h.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(tl.trans(g.to(h_ptr.dtype.element_ty)), h, acc,
                             input_precision=PRECISION)
        out = split.to(tl.int64) * V + cols.to(tl.int64)
        tl.store(pw_ptr + out[:, None] * D + dcols[None, :], acc,
                 mask=col_ok[:, None] & d_ok[None, :])
        if HAS_BIAS:
            tl.store(pb_ptr + out, acc_b, mask=col_ok & (tl.program_id(1) == 0))


def _block_d(D: int) -> int:
    return max(16, min(MAX_BLOCK_D, next_power_of_2(D)))


# Forward tiles. The vocabulary tile and the hidden slice are fixed (they set the order of the
# per-row sums); the rows per program, warps and pipeline stages are chosen at run time among
# FWD_CANDIDATES that fit the architecture's shared memory (dvae_kernels/_autotune.py). On
# tensor cores each output's hidden slice is summed in an order that depends on none of these,
# so the candidates should return the same bits (tests/test_autotune.py checks it on a GPU;
# the interpreter's numpy matmul agrees only to rounding across row counts). The first fitting
# candidate is the static report's (bench.static) and the interpreter's.
FWD_BLOCK_V = 128
FWD_BLOCK_D = 64
#: (BLOCK_N, num_warps, num_stages), in order of preference
FWD_CANDIDATES = ((128, 8, 3), (128, 8, 4), (64, 4, 3), (64, 4, 4), (128, 4, 3), (256, 8, 3),
                  (256, 8, 2), (64, 4, 2))
FWD_TUNER = _autotune.Tuner("linear_token_logprobs_fwd")


def _fwd_block_d(D: int) -> int:
    return max(16, min(FWD_BLOCK_D, next_power_of_2(D)))


def fwd_smem_bytes(config: tuple[int, int, int], D: int, itemsize: int) -> int:
    """Shared memory of a forward candidate: its pipeline stages of an h tile
    [BLOCK_N, BLOCK_D] and a W tile [BLOCK_D, BLOCK_V] (the float32 logits tile stays in
    registers)."""
    bn, _, stages = config
    return stages * (bn + FWD_BLOCK_V) * _fwd_block_d(D) * itemsize


def fwd_candidates(capability: int | None, D: int, dtype: torch.dtype
                   ) -> list[tuple[int, int, int]]:
    """The forward candidates that fit ``capability``'s shared memory, in preference order."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return _autotune.fitting(FWD_CANDIDATES, lambda c: fwd_smem_bytes(c, D, itemsize),
                             capability)


def _dot_config(dtype: torch.dtype) -> tuple[bool, str]:
    """(cast operands to fp32, tl.dot input_precision)."""
    if INTERPRET:
        return True, "ieee"
    # float32 follows torch's own matmul setting (TF32 only when the user allowed it).
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return False, "tf32" if tf32 else "ieee"


def _triton_forward(hidden, weight, tokens, bias, inv_temp: float = 1.0, softcap: float = 0.0,
                    with_mean: bool = False):
    N, D = hidden.shape
    V = weight.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    mean = torch.empty(N if with_mean else 0, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return logp, lse, ent, mean
    dot_fp32, precision = _dot_config(hidden.dtype)
    bd = _fwd_block_d(D)
    cap = target_capability(hidden.device)

    def launch(config: tuple[int, int, int]) -> None:
        bn, warps, stages = config
        _linear_token_logprobs_fwd_kernel[(triton.cdiv(N, bn),)](
            hidden, weight, bias if bias is not None else weight, tokens, logp, lse, ent,
            N, V, D, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            mean if with_mean else lse, float(inv_temp), float(softcap),
            HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_V=FWD_BLOCK_V, BLOCK_D=bd,
            DOT_FP32=dot_fp32, PRECISION=precision, EVEN_V=V % FWD_BLOCK_V == 0,
            SCALE=inv_temp != 1.0, SOFTCAP=softcap > 0.0, WITH_MEAN=with_mean,
            num_warps=warps, num_stages=stages,
        )

    key = (cap, hidden.dtype, bias is not None, D, inv_temp != 1.0, softcap > 0.0, with_mean,
           *_autotune.shape_class(N, V))
    launch(FWD_TUNER.pick(key, fwd_candidates(cap, D, hidden.dtype), launch, hidden.device))
    return logp, lse, ent, mean


# Backward tiles. dH: a program owns BLOCK_N rows and a BLOCK_DH slice of the hidden size and
# loops over V, its [64, 256] fp32 accumulator in registers (64 per thread at 8 warps). dW: a
# program owns a V tile and a BLOCK_DW slice and loops over its split of the rows; the number
# of splits is chosen so that the grid has at least _DW_PROGRAMS programs. Slices of 256 halve
# the logits recomputed at D = 512 against slices of 128; before sm_90 the dW kernel spills at
# 256 (no wgmma: its operands live in registers), so it takes 128 there.
BWD_CONFIG = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "BLOCK_DH": 256, "BLOCK_DW": 256,
              "num_warps": 8}
_BLOCK_DW_PRE_SM90 = 128
_DW_PROGRAMS = 264  # two per SM on a 132-SM H100


def _slice(D: int, block: int) -> int:
    return min(block, max(16, next_power_of_2(D)))


def _bwd_config(device: torch.device) -> dict:
    c = dict(BWD_CONFIG)
    cap = target_capability(device)
    if cap is not None and cap < 90:
        c["BLOCK_DW"] = min(c["BLOCK_DW"], _BLOCK_DW_PRE_SM90)
    return c


def _bwd_splits(N: int, V: int, D: int, c: dict | None = None) -> tuple[int, int]:
    """(number of row splits, rows per split, a multiple of BLOCK_N) for the dW kernel."""
    c = c or BWD_CONFIG
    tiles = triton.cdiv(V, c["BLOCK_V"]) * triton.cdiv(D, _slice(D, c["BLOCK_DW"]))
    blocks = triton.cdiv(N, c["BLOCK_N"])
    splits = max(1, min(blocks, triton.cdiv(_DW_PROGRAMS, tiles)))
    per_split = triton.cdiv(blocks, splits) * c["BLOCK_N"]
    return triton.cdiv(N, per_split), per_split


def _triton_backward(grad_logp, grad_lse, grad_entropy, grad_mean, hidden, weight, tokens, bias,
                     lse, entropy, inv_temp: float = 1.0, softcap: float = 0.0):
    """Two kernels, no atomics, the same bits on every run: grad_hidden (row blocks, loop over
    V, registers) and fp32 partial grad_weight / grad_bias per row split, summed in order."""
    N, D = hidden.shape
    V = weight.shape[0]
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    if N == 0 or V == 0 or all(g is None for g in (grad_logp, grad_lse, grad_entropy,
                                                   grad_mean)):
        return (torch.zeros_like(hidden), torch.zeros_like(weight),
                torch.zeros((V,), dtype=bias_dtype, device=hidden.device))
    dot_fp32, precision = _dot_config(hidden.dtype)
    dummy = lse  # never read when the matching HAS_ flag is off
    grads = (grad_logp.contiguous() if grad_logp is not None else dummy,
             grad_lse.contiguous() if grad_lse is not None else dummy,
             grad_entropy.contiguous() if grad_entropy is not None else dummy)
    args = (hidden, weight, bias if bias is not None else weight, tokens, lse, entropy)
    strides = (N, V, D, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    c = _bwd_config(hidden.device)
    flags = dict(HAS_BIAS=bias is not None, HAS_GLOGP=grad_logp is not None,
                 HAS_GLSE=grad_lse is not None, HAS_GENT=grad_entropy is not None,
                 BLOCK_N=c["BLOCK_N"], BLOCK_V=c["BLOCK_V"], BLOCK_D=_slice(D, c["BLOCK_D"]),
                 DOT_FP32=dot_fp32, PRECISION=precision, HAS_GMEAN=grad_mean is not None,
                 SCALE=inv_temp != 1.0, SOFTCAP=softcap > 0.0, num_warps=c["num_warps"])
    extra = (grad_mean.contiguous() if grad_mean is not None else dummy, float(inv_temp),
             float(softcap))
    gh = torch.empty((N, D), dtype=hidden.dtype, device=hidden.device)
    block_dh = _slice(D, c["BLOCK_DH"])
    _linear_dh_kernel[(triton.cdiv(N, c["BLOCK_N"]), triton.cdiv(D, block_dh))](
        *grads, *args, gh, *strides, *extra, BLOCK_DH=block_dh, **flags)
    splits, per_split = _bwd_splits(N, V, D, c)
    pw = torch.empty((splits, V, D), dtype=torch.float32, device=hidden.device)
    pb = torch.empty((splits, V) if bias is not None else (0,), dtype=torch.float32,
                     device=hidden.device)
    block_dw = _slice(D, c["BLOCK_DW"])
    _linear_dw_kernel[(triton.cdiv(V, c["BLOCK_V"]), triton.cdiv(D, block_dw), splits)](
        *grads, *args, pw, pb if bias is not None else pw, *strides, per_split, *extra,
        BLOCK_DW=block_dw, **flags)
    gw = (pw[0] if splits == 1 else pw.sum(0)).to(weight.dtype)
    gb = ((pb[0] if splits == 1 else pb.sum(0)).to(bias_dtype) if bias is not None
          else torch.zeros((V,), dtype=bias_dtype, device=hidden.device))
    return gh, gw, gb


def _supports_triton(hidden, weight, tokens, bias) -> str | None:
    if hidden.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    return None


# ---------------------------------------------------------------------------------------------
# cpu backend: chunked like the torch backend (peak extra memory O(chunk·V + N)), with the C++
# row kernels of csrc/ doing the softmax statistics and the logit gradient of each chunk. CPU
# only: on CUDA the Triton kernels never write the logits at all.
# ---------------------------------------------------------------------------------------------


def _native_row_stats(x, tok):
    return _csrc.ops().token_logprobs_fwd(x, tok)


def _native_dlogits(x, tok, lse, entropy, grad_logp, grad_lse, grad_entropy):
    # The row kernel knows d logp and d entropy; d lse/dx = p folds in as
    # (g_logp - g_lse)·(onehot - p) + g_lse·onehot.
    g_lp = grad_logp
    if grad_lse is not None:
        g_lp = -grad_lse if grad_logp is None else grad_logp - grad_lse
    g = _csrc.ops().token_logprobs_bwd(g_lp, grad_entropy, x, tok, lse, entropy)
    if grad_lse is not None:
        valid = (tok >= 0) & (tok < x.shape[-1])
        g.scatter_add_(-1, torch.where(valid, tok, 0).long()[:, None],
                       torch.where(valid, grad_lse, 0.0)[:, None])
    return g


def _native_forward(hidden, weight, tokens, bias, inv_temp: float = 1.0, softcap: float = 0.0,
                    with_mean: bool = False):
    return chunked_forward(_native_row_stats, hidden, weight, tokens, bias, inv_temp, softcap,
                           with_mean)


def _native_backward(grad_logp, grad_lse, grad_entropy, grad_mean, hidden, weight, tokens,
                     bias, lse, entropy, inv_temp: float = 1.0, softcap: float = 0.0):
    return chunked_backward(_native_dlogits, grad_logp, grad_lse, grad_entropy, grad_mean,
                            hidden, weight, tokens, bias, lse, entropy, inv_temp, softcap)


def _supports_native(hidden, weight, tokens, bias) -> str | None:
    return _csrc.refuse_float64("hidden", hidden)


OP = _dispatch.Op("linear_token_logprobs")
OP.register("torch", _torch_forward, _torch_backward)
OP.register("triton", _triton_forward, _triton_backward, supports=_supports_triton,
            limits="no float64")
OP.register("cpu", _native_forward, _native_backward, supports=_supports_native,
            limits="no float64")


# ---------------------------------------------------------------------------------------------
# Registered ops: hidden [N, D], weight [V, D], tokens [N] contiguous, bias [V] or None; one
# dtype for hidden, weight and bias.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("dvae_kernels::linear_token_logprobs", mutates_args=())
def _op(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
        bias: Optional[torch.Tensor], inv_temp: float, softcap: float, with_mean: bool,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, lse, entropy, mean logit or an empty [0]) of the logits
    ``transform(hidden @ weight.T + bias)``: divided by the temperature (``inv_temp`` is its
    inverse), then soft-capped when ``softcap`` > 0."""
    return OP.forward(backend)(hidden, weight, tokens, bias, inv_temp, softcap, with_mean)


@_op.register_fake
def _(hidden, weight, tokens, bias, inv_temp, softcap, with_mean, backend):
    out = hidden.new_empty(hidden.shape[:1], dtype=_acc_dtype(hidden.dtype))
    mean = out if with_mean else out.new_empty((0,))
    return out, torch.empty_like(out), torch.empty_like(out), torch.empty_like(mean)


@torch.library.custom_op("dvae_kernels::linear_token_logprobs_backward", mutates_args=())
def _backward_op(grad_logp: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                 grad_entropy: Optional[torch.Tensor], grad_mean: Optional[torch.Tensor],
                 hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                 bias: Optional[torch.Tensor], lse: torch.Tensor, entropy: torch.Tensor,
                 inv_temp: float, softcap: float, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return OP.backward(backend)(grad_logp, grad_lse, grad_entropy, grad_mean, hidden, weight,
                                tokens, bias, lse, entropy, inv_temp, softcap)


@_backward_op.register_fake
def _(grad_logp, grad_lse, grad_entropy, grad_mean, hidden, weight, tokens, bias, lse, entropy,
      inv_temp, softcap, backend):
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape[:1], dtype=bias_dtype))


def _setup_context(ctx, inputs, output):
    hidden, weight, tokens, bias, inv_temp, softcap, with_mean, backend = inputs
    _, lse, entropy, _ = output
    ctx.save_for_backward(hidden, weight, tokens, bias, lse, entropy)
    ctx.backend, ctx.inv_temp, ctx.softcap = backend, inv_temp, softcap
    ctx.has_bias = bias is not None
    ctx.with_mean = with_mean
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: skip its term


def _autograd_backward(ctx, grad_logp, grad_lse, grad_entropy, grad_mean):
    hidden, weight, tokens, bias, lse, entropy = ctx.saved_tensors
    if not ctx.with_mean:
        grad_mean = None  # the mean output is empty: nothing to differentiate
    gh, gw, gb = _backward_op(grad_logp, grad_lse, grad_entropy, grad_mean, hidden, weight,
                              tokens, bias, lse, entropy, ctx.inv_temp, ctx.softcap,
                              ctx.backend)
    return gh, gw, None, (gb if ctx.has_bias else None), None, None, None, None


_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def check_linear(hidden: torch.Tensor, weight: torch.Tensor, bias) -> None:
    """Shapes, dtypes and devices of ``hidden[..., D]``, ``weight[V, D]``, ``bias[V]``."""
    _validate.check_float("hidden", hidden)
    _validate.check_float("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must have a hidden dimension [..., D], got a 0-d tensor")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have a hidden size D >= 1, got {_validate.describe(hidden)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, got "
            f"{_validate.describe(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight must have the dtype of hidden ({hidden.dtype}), got "
            f"{_validate.describe(weight)} (outside autocast, cast one of them)")
    if bias is not None:
        _validate.check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got "
                             f"{_validate.describe(bias)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got "
                            f"{_validate.describe(bias)}")
    _validate.check_same_device(hidden=hidden, weight=weight, bias=bias)


def autocast_inputs(hidden, weight, bias):
    """Under autocast, cast like ``F.linear`` would (to the autocast dtype); else unchanged."""
    dev = hidden.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        tensors = [t for t in (hidden, weight, bias) if isinstance(t, torch.Tensor)]
        if all(t.is_floating_point() for t in tensors):
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
    return hidden, weight, bias


def flatten_linear(hidden, weight, bias, tokens=None):
    """hidden [..., D] -> [N, D] (strides kept where possible); tokens -> [N] contiguous."""
    x = hidden.reshape(-1, hidden.shape[-1])
    t = tokens.reshape(-1).contiguous() if tokens is not None else None
    b = bias.contiguous() if bias is not None else None
    return x, weight, b, t


class LinearStats(NamedTuple):
    """Per-position statistics of the (transformed) logits, ``[...]`` each, 0 at ignored
    positions; ``keep`` is the mask of the positions not ignored (None: all kept)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    mean: torch.Tensor | None
    keep: torch.Tensor | None


def reference_stats(hidden, weight, tokens, bias, inv_temp: float, softcap: float,
                    with_mean: bool):
    """The statistics with plain PyTorch ops on the materialised logits: what the ops compute
    under ``torch.func`` transforms, whose rules need differentiable, batchable code."""
    acc = _acc_dtype(hidden.dtype)
    x = torch.nn.functional.linear(hidden.to(acc), weight.to(acc),
                                   bias.to(acc) if bias is not None else None)
    if inv_temp != 1.0:
        x = x * inv_temp
    if softcap > 0.0:
        x = softcap * torch.tanh(x / softcap)
    lp = torch.log_softmax(x, -1)
    logp = lp.gather(-1, tokens[..., None].long())[..., 0]
    p = lp.exp()
    entropy = -torch.where(p == 0, 0.0, p * lp).sum(-1)
    return logp, torch.logsumexp(x, -1), entropy, (x.mean(-1) if with_mean else None)


def linear_stats(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                 bias: Optional[torch.Tensor], *, backend: str | None, op: str,
                 temperature: float = 1.0, softcap: float | None = None,
                 ignore_index: int | None = -100, with_mean: bool = False) -> LinearStats:
    """The fused statistics behind every linear op and the head; ``op`` names the public
    function in error messages."""
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    try:
        check_linear(hidden, weight, bias)
        _validate.check_logits_tokens(hidden, tokens, logits_name="hidden")
        _validate.check_ignore_index(ignore_index)
        temperature = _validate.float_option("temperature", temperature, strict=True)
        softcap = _validate.float_option("softcap", softcap, strict=True, allow_none=True)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{op}: {err}") from None
    V = weight.shape[0]
    _validate.check_token_range(tokens, V, ignore_index)
    safe, keep = _validate.keep_mask(tokens, ignore_index)
    inv_temp, cap = 1.0 / temperature, softcap or 0.0
    if _validate.under_transform():
        logp, lse, entropy, mean = reference_stats(hidden, weight, safe, bias, inv_temp, cap,
                                                   with_mean)
    else:
        name = OP.select(backend, hidden.device, caller=op, hidden=hidden, weight=weight,
                         tokens=tokens, bias=bias)
        lead = hidden.shape[:-1]
        x, w, b, t = flatten_linear(hidden, weight, bias, safe)
        logp, lse, entropy, mean = _op(x, w, t, b, inv_temp, cap, with_mean, name)
        logp, lse, entropy = logp.view(lead), lse.view(lead), entropy.view(lead)
        mean = mean.view(lead) if with_mean else None
    if keep is not None:
        logp, lse, entropy = (torch.where(keep, v, 0.0) for v in (logp, lse, entropy))
        mean = torch.where(keep, mean, 0.0) if mean is not None else None
    return LinearStats(logp, entropy, lse, mean, keep)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, *, return_entropy: bool = False,
                          return_lse: bool = False, temperature: float = 1.0,
                          softcap: float | None = None, ignore_index: int | None = -100,
                          backend: str | None = None):
    """Log-probability of ``tokens`` under ``softmax(logits)`` with ``logits = hidden @
    weight.T + bias``, per position, without materialising the ``[..., V]`` logits (forward
    or backward).

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16 (float64: torch backend only).
        weight: ``[V, D]``, the dtype of ``hidden`` (under autocast both are cast to the
            autocast dtype, as ``F.linear`` does).
        tokens: ``[...]`` (the leading shape of ``hidden``) int64 or int32, in ``[0, V)`` or
            equal to ``ignore_index``.
        bias: ``[V]`` or None.
        return_entropy: also return the entropy of each position's distribution.
        return_lse: also return each position's log-sum-exp of the logits (for a z-loss).
        temperature: the logits are divided by it inside the kernel (a sampling temperature
            τ, e.g. GRPO's: no ``weight / τ`` copy), a float > 0.
        softcap: if given, the logits become ``softcap·tanh(logits / softcap)`` (Gemma's
            final-logit soft-capping), after the temperature.
        ignore_index: positions whose token equals it (Hugging Face's -100) give 0 for every
            output and no gradient; None ignores nothing.
        backend: ``"torch"``, ``"triton"``, ``"cpu"`` or ``None``/``"auto"`` (see
            ``DVAE_KERNELS_BACKEND``).

    Returns:
        ``logp[...]`` float32, or a tuple ``(logp, entropy, lse)`` of the outputs asked for,
        in that order. Differentiable in ``hidden``, ``weight`` and ``bias`` through every
        output. The matmul accumulates in float32 whatever the input dtype.

    Equivalent PyTorch::

        logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
        if softcap: logits = softcap * torch.tanh(logits / softcap)
        lp = torch.log_softmax(logits, -1)
        logp = lp.gather(-1, tokens[..., None].long())[..., 0]
        entropy = -(lp.exp() * lp).nan_to_num().sum(-1)   # 0·log 0 = 0
        lse = logits.logsumexp(-1)
        # each of them 0 where tokens == ignore_index

    A position whose logits are all -inf or hold NaN or +inf gives NaN. Under ``torch.func``
    transforms (``grad``, ``vmap``: per-sample gradients) the same values come from the
    equivalent PyTorch above, logits materialised.
    """
    st = linear_stats(hidden, weight, tokens, bias, backend=backend, op="linear_token_logprobs",
                      temperature=temperature, softcap=softcap, ignore_index=ignore_index)
    out = (st.logp,) + ((st.entropy,) if return_entropy else ()) + (
        (st.lse,) if return_lse else ())
    return out[0] if len(out) == 1 else out
