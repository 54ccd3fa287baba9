"""The ``cpu`` and ``cuda`` backends: the C++/CUDA kernels of csrc/, added to each op's table.

Both backends call the same registered ops (``torch.ops.dvae_kernels_C.*``, schemas in
csrc/ops.cpp); PyTorch's dispatcher picks the CPU or CUDA kernel from the inputs' device. The
entries are registered whether or not the extension loaded: the dispatcher asks
:func:`dvae_kernels._csrc.unavailable` first, so a missing build is reported with its reason.
"""

from __future__ import annotations

import importlib

import torch

from . import _csrc
from .daps_weights import register_backend as _register_daps_weights
from .sample_tokens import register_backend as _register_sample_tokens
from .solve_eta import register_backend as _register_solve_eta
from .token_logprobs import register_backend as _register_token_logprobs
from .weighted_token_nll import register_backend as _register_weighted_token_nll

_NATIVE = ("cpu", "cuda")


def _refuse_float64(name: str, t: torch.Tensor) -> str | None:
    if t.dtype == torch.float64:
        return (f"float64 {name} are served by the torch backend only (the C++/CUDA kernels "
                "compute in float32)")
    return None


# ----------------------------------------------------------------------------- token_logprobs


def _token_logprobs_forward(logits, tokens, with_entropy: bool = True):
    logp, lse, ent = _csrc.ops().token_logprobs_fwd(logits, tokens)
    # The C++ kernels compute the entropy in the same pass; the op's contract is an empty
    # tensor when it was not asked for.
    return logp, lse, ent if with_entropy else ent.new_empty((0,))


def _token_logprobs_backward(grad_logp, grad_entropy, logits, tokens, lse, entropy):
    # Without an entropy gradient the kernel never reads the entropy, which is then empty
    # (not computed); lse stands in for it in the shape check.
    return _csrc.ops().token_logprobs_bwd(grad_logp, grad_entropy, logits, tokens, lse,
                                          entropy if grad_entropy is not None else lse)


def _token_logprobs_supports(logits, tokens) -> str | None:
    return _refuse_float64("logits", logits)


# ------------------------------------------------------------------------- weighted_token_nll


def _weighted_token_nll_forward(logits, tokens, weights, compute_grad: bool):
    return _csrc.ops().weighted_token_nll_fwd(logits, tokens, weights, compute_grad)


def _weighted_token_nll_supports(logits, tokens, weights) -> str | None:
    return _refuse_float64("logits", logits)


# ------------------------------------------------------------------------ daps_weights, eta


def _daps_weights_forward(rewards, logq, beta, eta):
    return _csrc.ops().daps_weights_fwd(rewards, logq, beta, eta)


def _solve_eta_forward(rewards, logq, beta, ess_target: float, eta_min: float, eta_max: float):
    return _csrc.ops().solve_eta(rewards, logq, beta, ess_target, eta_min, eta_max)


def _rewards_supports(rewards, logq) -> str | None:
    return _refuse_float64("rewards", rewards)


# ---------------------------------------------------------------- linear_token_logprobs (cpu)
# Chunked like the torch backend (peak extra memory O(chunk·V + N)), with the C++ row kernels
# doing the softmax statistics and the logit gradient of each chunk. CPU only: on CUDA the
# Triton kernel never writes the logits at all.


# The module, not the function of the same name that the package namespace binds.
_ltl = importlib.import_module("dvae_kernels.linear_token_logprobs")
_lst = importlib.import_module("dvae_kernels.linear_sample_tokens")


def _linear_row_stats(x, tok):
    return _csrc.ops().token_logprobs_fwd(x, tok)


def _linear_dlogits(x, tok, lse, entropy, grad_logp, grad_lse, grad_entropy):
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


def _linear_forward(hidden, weight, tokens, bias):
    return _ltl.chunked_forward(_linear_row_stats, hidden, weight, tokens, bias)


def _linear_backward(grad_logp, grad_lse, grad_entropy, hidden, weight, tokens, bias, lse,
                     entropy):
    return _ltl.chunked_backward(_linear_dlogits, grad_logp, grad_lse, grad_entropy, hidden,
                                 weight, tokens, bias, lse, entropy)


def _linear_supports(hidden, weight, tokens, bias) -> str | None:
    return _refuse_float64("hidden", hidden)


_ltl.register_backend("cpu", _linear_forward, _linear_backward, _linear_supports)


# ------------------------------------------------------ sample_tokens, linear_sample_tokens (cpu)
# The C++ kernel draws the stream's tokens in one pass per row (the torch backend's up to the
# log's last ulp). linear_sample_tokens: the torch backend's chunks of logits (one MKL matmul
# each, without the bias, which the kernel adds as it reads a row), each sampled at its rows of
# the stream. CPU only: on CUDA the Triton kernels serve.


def _sample_tokens_forward(logits, seeds, temperature: float):
    return _csrc.ops().sample_tokens_fwd(logits, None, seeds, temperature, 0)


def _sample_tokens_supports(logits) -> str | None:
    return _refuse_float64("logits", logits)


def _linear_sample_forward(hidden, weight, bias, seeds, temperature: float):
    def sample_rows(x, b, s, row0, t):
        return _csrc.ops().sample_tokens_fwd(x, b, s, t, row0)
    return _lst.chunked_forward(sample_rows, hidden, weight, bias, seeds, temperature,
                                bias_in_sampler=True)


def _linear_sample_supports(hidden, weight, bias) -> str | None:
    return _refuse_float64("hidden", hidden)


_register_sample_tokens("cpu", _sample_tokens_forward, _sample_tokens_supports)
_lst.register_backend("cpu", _linear_sample_forward, _linear_sample_supports)

for _name in _NATIVE:
    _register_token_logprobs(_name, _token_logprobs_forward, _token_logprobs_backward,
                             _token_logprobs_supports)
    _register_weighted_token_nll(_name, _weighted_token_nll_forward,
                                 _weighted_token_nll_supports)
    _register_daps_weights(_name, _daps_weights_forward, _rewards_supports)
    _register_solve_eta(_name, _solve_eta_forward, _rewards_supports)
