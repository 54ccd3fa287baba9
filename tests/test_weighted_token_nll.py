"""weighted_token_nll against a float64 transcription; gradient-in-backward semantics."""

import pytest
import torch
from utils import DEVICE, DTYPES, assert_close_to_reference, available_backends

import dvae_kernels as dk

BACKENDS = available_backends()
KERNELS = [b for b in BACKENDS if b != "torch"]


def reference(logits, tokens, weights, reduction):
    lp = torch.log_softmax(logits.double(), -1).gather(-1, tokens.long()[..., None])[..., 0]
    loss = -(weights.double() * lp)
    return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]


def run(backend, logits, tokens, weights, reduction, dtype):
    x = logits.to(device=DEVICE, dtype=dtype).detach().clone().requires_grad_()
    loss = dk.weighted_token_nll(x, tokens.to(DEVICE), weights.to(DEVICE), reduction=reduction,
                                 backend=backend)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3))
    (loss * g.to(DEVICE)).sum().backward()
    return loss, x.grad, g


# Weights shaped like DAPS's [N, K, 1] over tokens [N, K, L], per token, and a scalar;
# V odd and above one 4096-wide tile (the two-pass gradient path).
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("shape,wshape", [((3, 2, 4, 37), (3, 2, 1)), ((5, 1000), (5,)),
                                          ((2, 5000), ()), ((1, 1), (1,))])
def test_matches_float64(backend, dtype, reduction, shape, wshape):
    logits = torch.randn(shape) * 2
    tokens = torch.randint(0, shape[-1], shape[:-1])
    weights = torch.rand(wshape)
    loss, grad, g = run(backend, logits, tokens, weights, reduction, dtype)
    t_loss, t_grad, _ = run("torch", logits, tokens, weights, reduction, dtype)
    x64 = logits.to(dtype).detach().double().requires_grad_()
    ref = reference(x64, tokens, weights, reduction)
    (ref * g.double()).sum().backward()
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close_to_reference(loss, ref, t_loss, dtype, "loss")
    assert_close_to_reference(grad, x64.grad, t_grad, dtype, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_writes_no_buffer_and_retain_graph(backend):
    logits = torch.randn(4, 9, device=DEVICE)
    tokens = torch.randint(0, 9, (4,), device=DEVICE)
    with torch.no_grad():
        a = dk.weighted_token_nll(logits.requires_grad_(), tokens, 0.5, backend=backend)
    assert not a.requires_grad
    x = logits.detach().clone().requires_grad_()
    before = x.detach().clone()
    loss = dk.weighted_token_nll(x, tokens, torch.rand(4, device=DEVICE), backend=backend)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # the saved gradient buffer must not have been scaled in place
    torch.testing.assert_close(x.grad, 2 * first)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_are_targets(backend):
    w = torch.rand(3, device=DEVICE, requires_grad=True)
    x = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    dk.weighted_token_nll(x, torch.tensor([0, 1, 4], device=DEVICE), w,
                          backend=backend).backward()
    assert w.grad is None and x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_extremes(backend):
    x = torch.randn(0, 5, device=DEVICE, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert dk.weighted_token_nll(x, t, 1.0, backend=backend).item() == 0
    assert dk.weighted_token_nll(x, t, 1.0, reduction="mean", backend=backend).isnan()
    logits = torch.randn(4, 7)
    logits[0] = float("-inf")
    logits[0, 2] = 0.0
    logits[1, 3] = float("nan")
    logits[2] = 1e4 * torch.sign(torch.randn(7))
    tokens = torch.tensor([2, 0, 1, 6])
    out = dk.weighted_token_nll(logits.to(DEVICE), tokens.to(DEVICE),
                                torch.ones(4, device=DEVICE), reduction="none",
                                backend=backend).cpu()
    ref = reference(logits, tokens, torch.ones(4), "none")
    assert out[0] == 0 and out[1].isnan()
    torch.testing.assert_close(out[2:].double(), ref[2:], atol=1e-3, rtol=1e-6)


def test_gradcheck_float64_and_module():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 6, (2, 3))
    w = torch.rand(2, 1, dtype=torch.float64)
    f = lambda x: dk.weighted_token_nll(x, t, w, reduction="none", backend="torch")
    assert torch.autograd.gradcheck(f, (x,))
    mod = dk.WeightedTokenNLL(reduction="mean", backend="torch")
    torch.testing.assert_close(mod(x, t, w), reference(x, t, w.expand(2, 3), "mean"))
    with pytest.raises(ValueError, match="reduction"):
        dk.WeightedTokenNLL(reduction="avg")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    from dvae_kernels.weighted_token_nll import _op

    x = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 10, (4,), device=DEVICE)
    w = torch.rand(4, device=DEVICE)
    torch.library.opcheck(_op, (x, t, w, True, backend))
    torch.library.opcheck(_op, (x.detach(), t, w, False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_mean_over_many_tokens_keeps_the_scale_in_fp32(backend):
    # reduction="mean" over 40,000 tokens: the upstream gradient 2.5e-5 is an fp16 subnormal.
    # The gradient is computed in the backward with w·g in float32 and cast once, so it matches
    # float64 to fp16 rounding (a gradient scaled by an fp16 g loses most of its bits here).
    R, V = 40000, 4
    logits = torch.randn(R, V)
    tokens = torch.randint(0, V, (R,))
    weights = torch.rand(R)
    x = logits.to(DEVICE, torch.float16).requires_grad_()
    dk.weighted_token_nll(x, tokens.to(DEVICE), weights.to(DEVICE), reduction="mean",
                          backend=backend).backward()
    x64 = logits.to(torch.float16).double().requires_grad_()
    reference(x64, tokens, weights, "mean").backward()
    ref = x64.grad
    err = (x.grad.double().cpu() - ref).abs()
    # One fp16 rounding of each element (half an ulp, subnormal spacing 6e-8 at the bottom),
    # plus float32 arithmetic.
    bound = torch.maximum(ref.abs() * 2.0 ** -11, torch.full_like(ref, 2.0 ** -25)) * 1.01
    assert (err <= bound + 1e-9 * ref.abs()).all(), f"max error {err.max():.3g}"
    assert (x.grad != 0).sum() >= R  # the token entries at least: no underflow to zero
