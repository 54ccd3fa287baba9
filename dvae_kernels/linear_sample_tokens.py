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

Kernel plan (Triton): a program owns BLOCK_N rows and walks the vocabulary in BLOCK_V tiles;
each tile's logits come from ``tl.dot`` over BLOCK_D slices of the hidden size (the tile
routine of linear_token_logprobs), then feed the same one-pass Gumbel-max and log-sum-exp
state as sample_tokens. Memory: O(N) outputs, nothing of size N·V.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, _validate
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
    from .linear_token_logprobs import _logits_tile
    from .sample_tokens import row_keys_tl, sample_finish, sample_init, sample_step

# ---------------------------------------------------------------------------------------------
# torch backend: one [chunk, V] block of logits at a time.
# ---------------------------------------------------------------------------------------------


def _torch_forward(hidden, weight, bias, seeds, temperature: float):
    N = hidden.shape[0]
    tokens = torch.empty(N, dtype=torch.int64, device=hidden.device)
    logp = torch.empty(N, dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w, b = _acc_params(weight, bias)
        step = chunk_rows(weight.shape[0])
        for r0 in range(0, N, step):
            x = _torch_logits(hidden[r0:r0 + step], w, b)
            t, lp = torch_sample_rows(x, seeds, r0, temperature)
            tokens[r0:r0 + step] = t
            logp[r0:r0 + step] = lp
    return tokens, logp


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _linear_sample_tokens_kernel(
        h_ptr, w_ptr, b_ptr, seed_ptr, tokens_ptr, logp_ptr,
        N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, inv_t,
        HAS_BIAS: tl.constexpr, GREEDY: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        keys = row_keys_tl(seed_ptr, rows)
        m, m_safe, s, best, bidx, bz, nans = sample_init(BLOCK_N)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
                             stride_hn, stride_hd, stride_wv, stride_wd,
                             HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, PRECISION)
            x = tl.where(col_ok[None, :], x, float("-inf"))
            m, m_safe, s, best, bidx, bz, nans = sample_step(
                x, v0, cols, keys, inv_t, m, m_safe, s, best, bidx, bz, nans,
                GREEDY, BLOCK_V)
        logp = sample_finish(m, m_safe, s, bz, nans, GREEDY)
        tl.store(tokens_ptr + rows, bidx.to(tl.int64), mask=row_ok)
        tl.store(logp_ptr + rows, logp, mask=row_ok)


def _triton_forward(hidden, weight, bias, seeds, temperature: float):
    N, D = hidden.shape
    V = weight.shape[0]
    tokens = torch.zeros(N, dtype=torch.int64, device=hidden.device)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return tokens, logp
    dot_fp32, precision = _dot_config(hidden.dtype)
    greedy = temperature == 0.0
    _linear_sample_tokens_kernel[(triton.cdiv(N, BLOCK_N),)](
        hidden, weight, bias if bias is not None else weight, seeds, tokens, logp,
        N, V, D, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 if greedy else 1.0 / temperature,
        HAS_BIAS=bias is not None, GREEDY=greedy, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V,
        BLOCK_D=_block_d(D), DOT_FP32=dot_fp32, PRECISION=precision, num_warps=4,
    )
    return tokens, logp


# The stream's row counter is 32-bit.
MAX_ROWS = 2 ** 31 - 1


def _supports_triton(hidden, weight, bias) -> str | None:
    if hidden.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    if hidden.numel() // max(hidden.shape[-1], 1) > MAX_ROWS:
        return f"more than {MAX_ROWS} rows"
    return None


def _supports_torch(hidden, weight, bias) -> str | None:
    return None


_FORWARD = {"torch": _torch_forward, "triton": _triton_forward}
SUPPORTS = {"torch": _supports_torch, "triton": _supports_triton}


def register_backend(name: str, forward, supports) -> None:
    """Add a backend implementation (used by the C++/CUDA extension loader)."""
    _FORWARD[name] = forward
    SUPPORTS[name] = supports


# ---------------------------------------------------------------------------------------------
# Registered op: hidden [N, D], weight [V, D], bias [V] or None (one dtype), seeds int64 [2].
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("dvae_kernels::linear_sample_tokens", mutates_args=())
def _op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        seeds: torch.Tensor, temperature: float, backend: str
        ) -> tuple[torch.Tensor, torch.Tensor]:
    return _FORWARD[backend](hidden, weight, bias, seeds, temperature)


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
    name = _dispatch.select("linear_sample_tokens", SUPPORTS, backend, hidden.device,
                            hidden=hidden, weight=weight, bias=bias)
    lead = hidden.shape[:-1]
    x, w, b, _ = flatten_linear(hidden.detach(), weight.detach(),
                                bias.detach() if bias is not None else None)
    seeds = draw_seeds(hidden.device, generator)
    tokens, logp = _op(x, w, b, seeds, t, name)
    return tokens.view(lead), logp.view(lead)
