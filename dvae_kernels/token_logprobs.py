"""token_logprobs: log softmax(logits)[token] at every position, and optionally the entropy.

    logp[...]    = log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
    entropy[...] = -(softmax(logits.float(), -1) * log_softmax(logits.float(), -1)).sum(-1)
                   (with 0 * log 0 = 0 for -inf logits)

Read top to bottom: torch backend (the oracle), Triton kernels and launchers, the registered
ops with their fake and autograd rules, the public function.

Kernel plan. One pass over each row with an online maximum ``m``, sum ``s = Σ 2^d2`` with
``d2 = (x - m)·log2 e`` (one MUFU.EX2 per logit, flush-to-zero) and, only when the entropy is
asked for (a constexpr), ``a = Σ 2^d2·d2``, so that ``logp = (x_t - m) - log s`` (never
``x - lse``: exact for logits of ±1e4), ``lse = m + log s`` and ``entropy = (log2 s - a/s)·ln 2``
(the shifted form avoids the cancellation of ``lse - Σ p·x`` when logits are large). The logit
of the sampled token is one extra gathered load per row. A program is one warp over a tile of
up to 2048 logits (several rows when V is small): every row reduction is a warp shuffle, with
no shared memory and no barrier. The backward recomputes ``p = exp(x - lse)`` from the saved
``lse`` (and ``entropy`` when its gradient is asked for), 4–8 bytes per row, rather than saving
probabilities (V·4 bytes per row).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _csrc, _dispatch, _validate
from ._triton import HAS_TRITON, ROW_WARPS, row_tile, tl, triton, vec16

if HAS_TRITON:
    from ._triton import LN2, LOG2E, exp2_fast, online_softmax_step

# ---------------------------------------------------------------------------------------------
# torch backend: the reference and the fallback. Math in float32 (float64 for float64 input).
# ---------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_forward(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = True):
    """logits [R, V], tokens [R] -> (logp [R], lse [R], entropy [R], or [0] when not
    with_entropy)."""
    x = logits.to(_acc_dtype(logits.dtype))
    V = x.shape[-1]
    shifted, log_s, lse = log_softmax_parts(x)
    log_p = shifted - log_s[:, None]  # (x - m) - log Σ exp(x - m): never x - lse
    if with_entropy:
        p = log_p.exp()
        entropy = -torch.where(p == 0, 0.0, p * log_p).sum(-1)
    else:
        entropy = x.new_empty((0,))
    valid = (tokens >= 0) & (tokens < V)
    idx = torch.where(valid, tokens, 0).long()
    picked = log_p.gather(-1, idx[:, None])[:, 0] if V > 0 else lse
    logp = torch.where(valid, picked, float("nan"))
    return logp, lse, entropy


def log_softmax_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, V] -> (x - m [R, V], log s [R], lse [R]) with m the row maximum (0 for an all -inf
    row), s = Σ exp(x - m) and lse = m + log s (NaN for +inf logits, as log_softmax).

    Log-probabilities are then ``(x - m) - log s``, exact in the subtraction, unlike
    ``x - lse`` whose float32 ``lse`` is rounded at the logits' magnitude (at logits of 1e4 that
    costs 5e-4, about 2000x PyTorch's own error). Equivalent PyTorch::

        log_p = torch.log_softmax(x, -1)   # = shifted - log_s[:, None]
    """
    if x.shape[-1] == 0:
        empty = x.new_full(x.shape[:-1], float("-inf"))
        return x, empty, empty
    m = x.amax(-1)
    m = torch.where(m == float("-inf"), 0.0, m)
    shifted = x - m[:, None]
    log_s = shifted.exp().sum(-1).log()
    lse = m + log_s
    return shifted, log_s, torch.where(lse == float("inf"), float("nan"), lse)


def _torch_backward(grad_logp, grad_entropy, logits, tokens, lse, entropy):
    x = logits.to(_acc_dtype(logits.dtype))
    shifted = x - lse[:, None]
    p = shifted.exp()
    grad = torch.zeros_like(x)
    if grad_logp is not None:
        onehot = torch.zeros_like(x)
        valid = (tokens >= 0) & (tokens < x.shape[-1])
        onehot.scatter_(-1, torch.where(valid, tokens, 0).long()[:, None],
                        valid[:, None].to(x.dtype))
        grad = grad + grad_logp[:, None] * (onehot - p)
    if grad_entropy is not None:
        term = torch.where(p == 0, 0.0, p * (shifted + entropy[:, None]))
        grad = grad - grad_entropy[:, None] * term
    return grad.to(logits.dtype)


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _token_logprobs_fwd_kernel(
        logits_ptr, tokens_ptr, logp_ptr, lse_ptr, ent_ptr,
        n_rows, V, stride_row,
        WITH_ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
        VEC: tl.constexpr,
    ):
        # e = 2^((x - m)·log2 e): FADD, FMUL, one MUFU.EX2 (ftz). x - m is exact for the
        # maximum itself and rounded at the scale of the difference, never of the logits; the
        # log-probability is (x - m) - log s, never x - lse. Entropy in base 2 as well:
        # a = Σ e·d2 with d2 = (x - m)·log2 e, H = (log2 s - a/s)·ln 2.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        if VEC > 1:  # rows start on 16 bytes and V is a multiple of 16 bytes: vector loads
            # (a product by a constexpr is what the compiler's divisibility analysis sees)
            V = (V // VEC) * VEC
            stride_row = (stride_row // VEC) * VEC
        row_off = rows.to(tl.int64) * stride_row
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)  # running max (may stay -inf)
        m_safe = tl.zeros([BLOCK_R], tl.float32)  # finite version used as the shift
        s = tl.zeros([BLOCK_R], tl.float32)  # Σ 2^d2
        a = tl.zeros([BLOCK_R], tl.float32)  # Σ 2^d2 · d2 (entropy only)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols[None, :] < V)
            x = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=mask,
                        other=float("-inf")).to(tl.float32)
            m, m_safe, s, a = online_softmax_step(x, m, m_safe, s, a, WITH_ENTROPY)
        log2_s = tl.math.log2(s)
        tok = tl.load(tokens_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        tok_ok = (tok >= 0) & (tok < V)
        x_tok = tl.load(logits_ptr + row_off + tok, mask=row_ok & tok_ok,
                        other=float("nan")).to(tl.float32)
        log_s = log2_s * LN2
        tl.store(logp_ptr + rows, (x_tok - m_safe) - log_s, mask=row_ok)
        tl.store(lse_ptr + rows, m_safe + log_s, mask=row_ok)
        if WITH_ENTROPY:
            tl.store(ent_ptr + rows, (log2_s - a / s) * LN2, mask=row_ok)

    @triton.jit
    def _token_logprobs_bwd_kernel(
        glogp_ptr, gent_ptr, logits_ptr, tokens_ptr, lse_ptr, ent_ptr, grad_ptr,
        n_rows, V, stride_row, stride_grad,
        HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        if VEC > 1:  # 16-byte rows in and out: vector loads and stores (see the forward)
            V = (V // VEC) * VEC
            stride_row = (stride_row // VEC) * VEC
            stride_grad = (stride_grad // VEC) * VEC
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        tok = tl.load(tokens_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
        if HAS_GLOGP:
            g_lp = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0)
        if HAS_GENT:
            g_h = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
            ent2 = tl.load(ent_ptr + rows, mask=row_ok, other=0.0) * LOG2E
        in_off = rows.to(tl.int64) * stride_row
        out_off = rows.to(tl.int64) * stride_grad
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols[None, :] < V)
            x = tl.load(logits_ptr + in_off[:, None] + cols[None, :], mask=mask,
                        other=float("-inf")).to(tl.float32)
            d2 = (x - lse[:, None]) * LOG2E  # log2 p
            p = exp2_fast(d2)
            g = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
            if HAS_GLOGP:
                g = tl.where(cols[None, :] == tok[:, None], g_lp[:, None], 0.0) \
                    - g_lp[:, None] * p
            if HAS_GENT:
                # d entropy / dx = -p·(log p + H); at a -inf logit p = 0 (the clamp: no NaN).
                g -= (g_h * LN2)[:, None] * p * (tl.maximum(d2, -3.0e38) + ent2[:, None])
            tl.store(grad_ptr + out_off[:, None] + cols[None, :],
                     g.to(grad_ptr.dtype.element_ty), mask=mask)


def _triton_forward(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = True):
    R, V = logits.shape
    logp = torch.empty(R, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty(R if with_entropy else 0, dtype=torch.float32, device=logits.device)
    if R == 0:
        return logp, lse, ent
    block_r, block_v = row_tile(V)
    _token_logprobs_fwd_kernel[(triton.cdiv(R, block_r),)](
        logits, tokens, logp, lse, ent if with_entropy else lse, R, V, logits.stride(0),
        WITH_ENTROPY=with_entropy, BLOCK_R=block_r, BLOCK_V=block_v, VEC=vec16(logits),
        num_warps=ROW_WARPS,
    )
    return logp, lse, ent


def _triton_backward(grad_logp, grad_entropy, logits, tokens, lse, entropy):
    R, V = logits.shape
    grad = torch.empty((R, V), dtype=logits.dtype, device=logits.device)
    if R == 0 or V == 0:
        return grad
    block_r, block_v = row_tile(V)
    dummy = lse  # never read when the matching HAS_ flag is off
    _token_logprobs_bwd_kernel[(triton.cdiv(R, block_r),)](
        grad_logp.contiguous() if grad_logp is not None else dummy,
        grad_entropy.contiguous() if grad_entropy is not None else dummy,
        logits, tokens, lse, entropy if grad_entropy is not None else dummy, grad, R, V,
        logits.stride(0), grad.stride(0),
        HAS_GLOGP=grad_logp is not None, HAS_GENT=grad_entropy is not None,
        BLOCK_R=block_r, BLOCK_V=block_v, VEC=vec16(logits, grad), num_warps=ROW_WARPS,
    )
    return grad


# Rows of more than this many logits go through the vocabulary in tiles anyway; the bound only
# keeps int32 column arithmetic and test shapes honest.
MAX_V = 262144


def _supports_triton(logits: torch.Tensor, tokens: torch.Tensor) -> str | None:
    if logits.dtype == torch.float64:
        return "float64 logits are served by the torch backend only"
    if logits.shape[-1] > MAX_V:
        return f"V = {logits.shape[-1]} exceeds the Triton kernel's limit of {MAX_V}"
    return None


# ---------------------------------------------------------------------------------------------
# cpu and cuda backends: the C++/CUDA kernels of csrc/ (one pass computes the entropy too)
# ---------------------------------------------------------------------------------------------


def _native_forward(logits, tokens, with_entropy: bool = True):
    logp, lse, ent = _csrc.ops().token_logprobs_fwd(logits, tokens)
    # The op's contract is an empty entropy when it was not asked for.
    return logp, lse, ent if with_entropy else ent.new_empty((0,))


def _native_backward(grad_logp, grad_entropy, logits, tokens, lse, entropy):
    # Without an entropy gradient the kernel never reads the entropy, which is then empty
    # (not computed); lse stands in for it in the shape check.
    return _csrc.ops().token_logprobs_bwd(grad_logp, grad_entropy, logits, tokens, lse,
                                          entropy if grad_entropy is not None else lse)


def _supports_native(logits, tokens) -> str | None:
    return _csrc.refuse_float64("logits", logits)


OP = _dispatch.Op("token_logprobs")
OP.register("torch", _torch_forward, _torch_backward)
OP.register("triton", _triton_forward, _triton_backward, supports=_supports_triton,
            limits=f"no float64, V <= {MAX_V}")
for _name in ("cpu", "cuda"):
    OP.register(_name, _native_forward, _native_backward, supports=_supports_native,
                limits="no float64")


# ---------------------------------------------------------------------------------------------
# Registered ops: logits [R, V] with unit column stride, tokens [R] contiguous.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("dvae_kernels::token_logprobs", mutates_args=())
def _op(logits: torch.Tensor, tokens: torch.Tensor, backend: str, with_entropy: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [R], lse [R], entropy [R] when with_entropy else an empty [0]: no work for it)."""
    return OP.forward(backend)(logits, tokens, with_entropy)


@_op.register_fake
def _(logits, tokens, backend, with_entropy):
    out = logits.new_empty(logits.shape[:1], dtype=_acc_dtype(logits.dtype))
    ent = out if with_entropy else out.new_empty((0,))
    return out, torch.empty_like(out), torch.empty_like(ent)


@torch.library.custom_op("dvae_kernels::token_logprobs_backward", mutates_args=())
def _backward_op(grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                 logits: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor,
                 entropy: torch.Tensor, backend: str) -> torch.Tensor:
    return OP.backward(backend)(grad_logp, grad_entropy, logits, tokens, lse, entropy)


@_backward_op.register_fake
def _(grad_logp, grad_entropy, logits, tokens, lse, entropy, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, tokens, backend, with_entropy = inputs
    _, lse, entropy = output
    ctx.save_for_backward(logits, tokens, lse, entropy)
    ctx.backend = backend
    ctx.with_entropy = with_entropy
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: skip its term


def _autograd_backward(ctx, grad_logp, grad_lse, grad_entropy):
    logits, tokens, lse, entropy = ctx.saved_tensors
    if not ctx.with_entropy:
        grad_entropy = None  # the entropy output is empty: it has no elements to differentiate
    if grad_logp is None and grad_entropy is None and grad_lse is None:
        return None, None, None, None
    grad = _backward_op(grad_logp, grad_entropy, logits, tokens, lse, entropy, ctx.backend)
    if grad_lse is not None:
        # lse is internal to the public function; d lse/dx = softmax(x). Kept exact (not a
        # kernel path) so that the registered op's autograd is complete.
        p = (logits.to(lse.dtype) - lse[:, None]).exp()
        grad = (grad + grad_lse[:, None] * p).to(logits.dtype)
    return grad, None, None, None


_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, return_entropy: bool = False,
                   ignore_index: int | None = -100, backend: str | None = None):
    """Log-probability of ``tokens`` under ``softmax(logits)``, per position.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16 (float64: torch backend only).
        tokens: ``[...]`` int64 or int32, values in ``[0, V)`` or equal to ``ignore_index``.
        return_entropy: also return the entropy of each position's distribution.
        ignore_index: positions whose token equals it (Hugging Face's -100) give 0 (log-prob
            and entropy) and no gradient; None ignores nothing.
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``None``/``"auto"``
            (see ``DVAE_KERNELS_BACKEND``).

    Returns:
        ``logp[...]`` float32 (and ``entropy[...]`` float32 when ``return_entropy``).
        Differentiable in ``logits`` through both outputs.

    Equivalent PyTorch::

        lp = torch.log_softmax(logits.float(), -1)
        logp = lp.gather(-1, tokens[..., None].long())[..., 0]
        entropy = -(lp.exp() * lp).nan_to_num().sum(-1)   # 0·log 0 = 0
        # each 0 where tokens == ignore_index

    A row whose logits are all -inf, or that holds NaN or +inf, gives NaN. Under
    ``torch.func`` transforms the values come from the equivalent PyTorch above.
    """
    _validate.check_logits_tokens(logits, tokens)
    _validate.check_ignore_index(ignore_index)
    V = logits.shape[-1]
    _validate.check_token_range(tokens, V, ignore_index)
    safe, keep = _validate.keep_mask(tokens, ignore_index)
    if _validate.under_transform():
        x = logits.to(_acc_dtype(logits.dtype))
        lp = torch.log_softmax(x, -1)
        logp = lp.gather(-1, safe[..., None].long())[..., 0]
        entropy = -torch.where(lp.exp() == 0, 0.0, lp.exp() * lp).sum(-1)
    else:
        name = OP.select(backend, logits.device, logits=logits, tokens=tokens)
        lead = logits.shape[:-1]
        x = logits.reshape(-1, V)
        if x.stride(-1) != 1:
            x = x.contiguous()
        logp, _, entropy = _op(x, safe.reshape(-1).contiguous(), name, return_entropy)
        logp, entropy = logp.view(lead), (entropy.view(lead) if return_entropy else None)
    if keep is not None:
        logp = torch.where(keep, logp, 0.0)
        entropy = torch.where(keep, entropy, 0.0) if return_entropy else None
    return (logp, entropy) if return_entropy else logp
