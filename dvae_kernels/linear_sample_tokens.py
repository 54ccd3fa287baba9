"""linear_sample_tokens: sample_tokens of ``hidden @ weight.T + bias`` without the logits.

    logits[..., V] = hidden[..., D] @ weight[V, D].T + bias[V]        (never stored whole)
    tokens, logp   = sample_tokens(logits, generator=generator, temperature=temperature)

The autoregressive sampler's last step: from the final hidden state to a token and its
log-probability. Read top to bottom: torch backend (chunked over rows), Triton kernel and
launcher, the registered op, the public function.

The random stream is the one of :mod:`dvae_kernels.sample_tokens` (documented there), indexed
by the flattened row and the vocabulary column, so for the same generator state this op and
``sample_tokens(F.linear(hidden, weight, bias))`` draw the same tokens up to the rounding of the
logits (a matmul's summation order differs between libraries; a sample changes only where two
candidates' scores are within that rounding).

Kernel plan (Triton): a program owns BLOCK_N rows and walks its split of the vocabulary in
BLOCK_V tiles; each tile's logits come from ``tl.dot`` over BLOCK_D slices of the hidden size
(the tile routine of linear_token_logprobs), then feed the same one-pass Gumbel-max and
log-sum-exp state as sample_tokens. With few rows (the autoregressive sampler's 512) the
vocabulary is split across programs so that the launch fills the GPU, and a second small
kernel merges the splits' partial states (max, sum, best score, its column and logit, NaN
count) in column order: the same token and log-probability as one pass. Memory: O(N·splits)
partial states, nothing of size N·V.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _csrc, _dispatch, _validate
from ._triton import HAS_TRITON, tl, triton
from .linear_token_logprobs import (
    BLOCK_N,
    BLOCK_V,
    _acc_params,
    _block_d,
    _dot_config,
    _torch_logits,
    autocast_inputs,
    check_linear,
    chunk_rows,
    flatten_linear,
)
from .sample_tokens import check_sampling_args, draw_seeds, torch_sample_rows
from .token_logprobs import _acc_dtype

if HAS_TRITON:
    from ._triton import LOG2E, exp2_fast
    from .linear_token_logprobs import _logits_tile
    from .sample_tokens import row_keys_tl, sample_finish, sample_init, sample_step

# ---------------------------------------------------------------------------------------------
# torch backend: one [chunk, V] block of logits at a time.
# ---------------------------------------------------------------------------------------------


def chunked_forward(sample_rows, hidden, weight, bias, seeds, temperature: float, *,
                    bias_in_sampler: bool = False):
    """Chunks of logits (one matmul each, float32 accumulation) sampled by
    ``sample_rows(x [C, V], b, seeds, row0, temperature) -> (tokens, logp)`` at their rows of
    the stream; ``b`` is the bias when ``bias_in_sampler`` (the matmul then leaves it out),
    else None. Shared by the torch and the cpu backends."""
    N = hidden.shape[0]
    tokens = torch.empty(N, dtype=torch.int64, device=hidden.device)
    logp = torch.empty(N, dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w, b = _acc_params(weight, bias)
        if bias_in_sampler and b is not None:
            b = b.contiguous()
        step = chunk_rows(weight.shape[0])
        for r0 in range(0, N, step):
            x = _torch_logits(hidden[r0:r0 + step], w, None if bias_in_sampler else b)
            t, lp = sample_rows(x, b if bias_in_sampler else None, seeds, r0, temperature)
            tokens[r0:r0 + step] = t
            logp[r0:r0 + step] = lp
    return tokens, logp


def _torch_forward(hidden, weight, bias, seeds, temperature: float):
    return chunked_forward(lambda x, _b, s, r0, t: torch_sample_rows(x, s, r0, t), hidden,
                           weight, bias, seeds, temperature)


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _linear_sample_tokens_kernel(
        h_ptr, w_ptr, b_ptr, seed_ptr, tokens_ptr, logp_ptr, part_f_ptr, part_i_ptr,
        N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, inv_t, cols_per_split,
        HAS_BIAS: tl.constexpr, GREEDY: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    ):
        """Rows of one row block over one split of the vocabulary (all of it when not SPLIT:
        then the token and its log-probability are written, else the split's partial state
        (max, sum, best score, its z; column and NaN count) for _merge_kernel)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        keys = row_keys_tl(seed_ptr, rows)
        m, m_safe, s, best, bidx, bz, nans = sample_init(BLOCK_N)
        c_begin = tl.program_id(1) * cols_per_split
        c_end = tl.minimum(c_begin + cols_per_split, V)
        for v0 in range(c_begin, c_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < c_end
            x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
                             stride_hn, stride_hd, stride_wv, stride_wd,
                             HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, PRECISION)
            x = tl.where(col_ok[None, :], x, float("-inf"))
            m, m_safe, s, best, bidx, bz, nans = sample_step(
                x, v0, cols, keys, inv_t, m, m_safe, s, best, bidx, bz, nans,
                GREEDY, BLOCK_V)
        if SPLIT:
            base = tl.program_id(1).to(tl.int64) * N + rows
            n4 = N.to(tl.int64) * tl.num_programs(1)
            tl.store(part_f_ptr + base, m, mask=row_ok)
            tl.store(part_f_ptr + n4 + base, s, mask=row_ok)
            tl.store(part_f_ptr + 2 * n4 + base, best, mask=row_ok)
            tl.store(part_f_ptr + 3 * n4 + base, bz, mask=row_ok)
            tl.store(part_i_ptr + base, bidx, mask=row_ok)
            tl.store(part_i_ptr + n4 + base, nans, mask=row_ok)
        else:
            logp = sample_finish(m, m_safe, s, bz, nans, GREEDY)
            tl.store(tokens_ptr + rows, bidx.to(tl.int64), mask=row_ok)
            tl.store(logp_ptr + rows, logp, mask=row_ok)

    @triton.jit
    def _merge_kernel(part_f_ptr, part_i_ptr, tokens_ptr, logp_ptr, N, SPLITS,
                      GREEDY: tl.constexpr, BLOCK: tl.constexpr):
        """Merge the splits' partial states in split (column) order: the same token and
        log-probability as one pass over the whole vocabulary."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < N
        n4 = N.to(tl.int64) * SPLITS
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        for k in range(0, SPLITS):
            m = tl.maximum(m, tl.load(part_f_ptr + k * N + rows, mask=row_ok,
                                      other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.zeros([BLOCK], tl.float32)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        bz = tl.full([BLOCK], float("-inf"), tl.float32)
        bidx = tl.zeros([BLOCK], tl.int32)
        nans = tl.zeros([BLOCK], tl.int32)
        for k in range(0, SPLITS):
            off = k * N + rows
            m_k = tl.load(part_f_ptr + off, mask=row_ok, other=float("-inf"))
            s_k = tl.load(part_f_ptr + n4 + off, mask=row_ok, other=0.0)
            if GREEDY:  # s counts the maxima
                s += tl.where(m_k == m, s_k, 0.0)
            else:  # s_k = Σ exp(z - m_k) (0 when m_k = -inf)
                s += s_k * exp2_fast((m_k - m_safe) * LOG2E)
            best_k = tl.load(part_f_ptr + 2 * n4 + off, mask=row_ok, other=float("-inf"))
            better = best_k > best  # strict: an earlier split wins ties
            best = tl.where(better, best_k, best)
            bz = tl.where(better, tl.load(part_f_ptr + 3 * n4 + off, mask=row_ok), bz)
            bidx = tl.where(better, tl.load(part_i_ptr + off, mask=row_ok), bidx)
            nans += tl.load(part_i_ptr + n4 + off, mask=row_ok, other=0)
        logp = sample_finish(m, m_safe, s, bz, nans, GREEDY)
        tl.store(tokens_ptr + rows, bidx.to(tl.int64), mask=row_ok)
        tl.store(logp_ptr + rows, logp, mask=row_ok)


# Programs wanted for a launch (two per SM of a 132-SM H100): with few rows the vocabulary is
# split across programs and the partial states merged, so that 512 rows fill the GPU.
_PROGRAMS = 264
_MERGE_BLOCK = 32


def _vocab_splits(N: int, V: int) -> tuple[int, int]:
    """(splits, columns per split, a multiple of BLOCK_V)."""
    tiles = triton.cdiv(V, BLOCK_V)
    splits = max(1, min(tiles, triton.cdiv(_PROGRAMS, triton.cdiv(N, BLOCK_N))))
    per_split = triton.cdiv(tiles, splits) * BLOCK_V
    return triton.cdiv(V, per_split), per_split


def _triton_forward(hidden, weight, bias, seeds, temperature: float):
    N, D = hidden.shape
    V = weight.shape[0]
    tokens = torch.zeros(N, dtype=torch.int64, device=hidden.device)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return tokens, logp
    dot_fp32, precision = _dot_config(hidden.dtype)
    greedy = temperature == 0.0
    splits, per_split = _vocab_splits(N, V)
    part_f = torch.empty((4, splits, N) if splits > 1 else (1,), dtype=torch.float32,
                         device=hidden.device)
    part_i = torch.empty((2, splits, N) if splits > 1 else (1,), dtype=torch.int32,
                         device=hidden.device)
    _linear_sample_tokens_kernel[(triton.cdiv(N, BLOCK_N), splits)](
        hidden, weight, bias if bias is not None else weight, seeds, tokens, logp,
        part_f, part_i,
        N, V, D, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 if greedy else 1.0 / temperature, per_split,
        HAS_BIAS=bias is not None, GREEDY=greedy, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V,
        BLOCK_D=_block_d(D), DOT_FP32=dot_fp32, PRECISION=precision, SPLIT=splits > 1,
        num_warps=4,
    )
    if splits > 1:
        _merge_kernel[(triton.cdiv(N, _MERGE_BLOCK),)](
            part_f, part_i, tokens, logp, N, splits, GREEDY=greedy, BLOCK=_MERGE_BLOCK,
            num_warps=1)
    return tokens, logp


# The stream's row counter is 32-bit.
MAX_ROWS = 2 ** 31 - 1


def _supports_triton(hidden, weight, bias) -> str | None:
    if hidden.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    if hidden.numel() // max(hidden.shape[-1], 1) > MAX_ROWS:
        return f"more than {MAX_ROWS} rows"
    return None


def _native_forward(hidden, weight, bias, seeds, temperature: float):
    """The cpu backend: the torch backend's chunks of logits (one MKL matmul each, without the
    bias, which the C++ sampling kernel adds as it reads a row), each sampled at its rows of
    the stream. On CUDA the Triton kernels serve."""
    def sample_rows(x, b, s, row0, t):
        return _csrc.ops().sample_tokens_fwd(x, b, s, t, row0)
    return chunked_forward(sample_rows, hidden, weight, bias, seeds, temperature,
                           bias_in_sampler=True)


def _supports_native(hidden, weight, bias) -> str | None:
    return _csrc.refuse_float64("hidden", hidden)


OP = _dispatch.Op("linear_sample_tokens")
OP.register("torch", _torch_forward)
OP.register("triton", _triton_forward, supports=_supports_triton,
            limits=f"no float64, at most {MAX_ROWS} rows")
OP.register("cpu", _native_forward, supports=_supports_native, limits="no float64")


# ---------------------------------------------------------------------------------------------
# Registered op: hidden [N, D], weight [V, D], bias [V] or None (one dtype), seeds int64 [2].
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("dvae_kernels::linear_sample_tokens", mutates_args=())
def _op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        seeds: torch.Tensor, temperature: float, backend: str
        ) -> tuple[torch.Tensor, torch.Tensor]:
    return OP.forward(backend)(hidden, weight, bias, seeds, temperature)


@_op.register_fake
def _(hidden, weight, bias, seeds, temperature, backend):
    tokens = hidden.new_empty(hidden.shape[:1], dtype=torch.int64)
    return tokens, hidden.new_empty(hidden.shape[:1], dtype=_acc_dtype(hidden.dtype))


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def linear_sample_tokens(hidden: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *,
                         generator: torch.Generator | None = None, temperature: float = 1.0,
                         backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per position from ``softmax((hidden @ weight.T + bias) / temperature)``,
    with its log-probability, without materialising the ``[..., V]`` logits.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16 (float64: torch backend only).
        weight: ``[V, D]`` with V >= 1, the dtype of ``hidden`` (autocast casts both).
        bias: ``[V]`` or None.
        generator: the torch generator to draw the two seed words from (default: the device's
            default generator).
        temperature: a float >= 0; 0 takes the argmax (ties: the lowest index).
        backend: ``"torch"``, ``"triton"`` or ``None``/``"auto"``.

    Returns:
        ``(tokens[...] int64, logp[...] float32)``, as :func:`sample_tokens`: ``logp`` is the
        log-probability under the tempered distribution the token was drawn from (at
        temperature 1, DAPS's setting, ``log q``; at 0, ``-log(number of maxima)``).
        Not differentiable. The matmul accumulates in float32.

    Equivalent PyTorch (in distribution)::

        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        tokens, logp = sample_tokens(logits, generator=generator, temperature=temperature)
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_linear(hidden, weight, bias)
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have V >= 1 rows, got {_validate.describe(weight)}")
    t = check_sampling_args(hidden.device, generator, temperature)
    _validate.refuse_sampling_under_transform("linear_sample_tokens")
    name = OP.select(backend, hidden.device, hidden=hidden, weight=weight, bias=bias)
    lead = hidden.shape[:-1]
    x, w, b, _ = flatten_linear(hidden.detach(), weight.detach(),
                                bias.detach() if bias is not None else None)
    seeds = draw_seeds(hidden.device, generator)
    tokens, logp = _op(x, w, b, seeds, t, name)
    return tokens.view(lead), logp.view(lead)
