"""Log-probabilities at logits of ±1e4 on every backend (docs/conventions.md#testing).

V = 1000 equal logits: every log-probability is exactly -log V. A kernel that computes
``x - lse`` in float32 is off by up to half an ulp of ``lse`` (about 5e-4 at 1e4, 2000x
PyTorch's own error); ``(x - max) - log Σ exp(x - max)`` is as accurate as
``torch.log_softmax``. The bound: twice PyTorch's native error plus one float32 ulp of log V.
"""

import math

import pytest
import torch
from utils import DEVICE, available_backends

import dvae_kernels as dk

BACKENDS = available_backends()
LINEAR_BACKENDS = [b for b in BACKENDS if b in ("torch", "triton", "cpu")]
SAMPLER_BACKENDS = [b for b in BACKENDS if b in ("torch", "triton")]
V = 1000
EXPECTED = -math.log(V)
ULP = 2.0 ** (math.floor(math.log2(math.log(V))) - 23)  # float32 ulp of log V: 4.8e-7


def _bound(x: torch.Tensor) -> float:
    """2 × the error of torch.log_softmax on x (same dtype, float32 arithmetic) + 1 ulp."""
    native = torch.log_softmax(x.float(), -1)
    return 2 * (native.double() - EXPECTED).abs().max().item() + ULP


def _logits(value: float, rows: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((rows, V), value, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("value", [1e4, -1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_equal_large_logits(backend, dtype, value):
    x = _logits(value, 3, dtype)
    tokens = torch.tensor([0, 499, 999], device=DEVICE)
    logp = dk.token_logprobs(x, tokens, backend=backend)
    err = (logp.double().cpu() - EXPECTED).abs().max().item()
    assert err <= _bound(x), f"{backend}: logp error {err:.3g} at logits {value}"


@pytest.mark.parametrize("value", [1e4, -1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_token_nll_equal_large_logits(backend, dtype, value):
    x = _logits(value, 3, dtype).requires_grad_()
    tokens = torch.tensor([0, 499, 999], device=DEVICE)
    w = torch.ones(3, device=DEVICE)
    loss = dk.weighted_token_nll(x, tokens, w, reduction="none", backend=backend)
    err = (loss.double().cpu() + EXPECTED).abs().max().item()
    assert err <= _bound(x), f"{backend}: loss error {err:.3g} at logits {value}"
    loss.sum().backward()  # the gradient path (CPU: in the backward) gives the same loss rows
    assert x.grad.isfinite().all()


@pytest.mark.parametrize("value", [1e4, -1e4])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_token_logprobs_equal_large_logits(backend, value):
    # hidden · weight = value exactly in float32: 16 products of (value / 16) · 1.
    D = 16
    hidden = torch.full((3, D), value / D, device=DEVICE)
    weight = torch.ones(V, D, device=DEVICE)
    tokens = torch.tensor([0, 499, 999], device=DEVICE)
    logp = dk.linear_token_logprobs(hidden, weight, tokens, backend=backend)
    err = (logp.double().cpu() - EXPECTED).abs().max().item()
    assert err <= _bound(_logits(value, 1, torch.float32)), f"{backend}: {err:.3g}"


@pytest.mark.parametrize("value", [1e4, -1e4])
@pytest.mark.parametrize("backend", SAMPLER_BACKENDS)
def test_sample_tokens_equal_large_logits(backend, value):
    x = _logits(value, 4, torch.float32)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    _, logp = dk.sample_tokens(x, generator=gen, backend=backend)
    err = (logp.double().cpu() - EXPECTED).abs().max().item()
    assert err <= _bound(x), f"{backend}: sampled logp error {err:.3g} at logits {value}"
