"""linear_token_logprobs and linear_weighted_token_nll against float64 autograd of the
materialised computation (linear, log_softmax, gather), on every backend available here."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, DTYPES, FLOOR, assert_close_to_reference, available_backends

from dvae_kernels import BackendError
from dvae_kernels.linear_token_logprobs import linear_token_logprobs
from dvae_kernels.linear_weighted_token_nll import (
    LinearWeightedTokenNLL,
    linear_weighted_token_nll,
)

# The backends of these ops that run on the test device (DVAE_TEST_DEVICE: the CPU here, with
# Triton through its interpreter; CUDA on a GPU machine).
BACKENDS = [b for b in available_backends() if b in ("torch", "triton", "cpu")]

# Shapes that bite: V = 1 (the log-softmax is identically 0), V = 3 and 1000 (not powers of
# two, 1000 spans several vocabulary tiles), a batch of 1, an empty batch, D not a multiple of
# the 16-wide dot tile, a 2-D leading shape. Small: Triton runs through the interpreter.
SHAPES = [((5,), 8, 1), ((2, 3), 16, 3), ((1,), 7, 1000), ((0,), 8, 10), ((4, 9), 33, 70)]


def _inputs(lead, D, V, dtype, bias=True, scale=1.0):
    hidden = (torch.randn(*lead, D) * scale / D ** 0.5).to(DEVICE, dtype)
    weight = torch.randn(V, D).to(DEVICE, dtype)
    b = torch.randn(V).to(DEVICE, dtype) if bias else None
    tokens = torch.randint(0, V, lead).to(DEVICE)
    return hidden, weight, b, tokens


def _reference(hidden, weight, bias, tokens):
    """float64 logp and entropy of the materialised computation, differentiable."""
    logits = F.linear(hidden.double(), weight.double(), bias.double() if bias is not None
                      else None)
    lp = torch.log_softmax(logits, -1)
    logp = lp.gather(-1, tokens[..., None].long())[..., 0]
    entropy = -torch.where(lp.exp() == 0, 0.0, lp.exp() * lp).sum(-1)
    return logp, entropy


def _run(fn, hidden, weight, bias, tokens, g_lp, g_h):
    """Outputs and the gradients of Σ g_lp·logp + g_h·entropy in hidden, weight, bias."""
    leaves = [t.detach().requires_grad_() for t in (hidden, weight)]
    b = bias.detach().requires_grad_() if bias is not None else None
    logp, entropy = fn(leaves[0], leaves[1], b, tokens)
    inputs = leaves + ([b] if b is not None else [])
    grads = torch.autograd.grad((g_lp * logp).sum() + (g_h * entropy).sum(), inputs,
                                allow_unused=True)
    return [logp, entropy, *grads]


def _check(backend, hidden, weight, bias, tokens, dtype):
    g_lp = torch.randn(tokens.shape, dtype=torch.float64).to(DEVICE)
    g_h = torch.randn(tokens.shape, dtype=torch.float64).to(DEVICE)
    op = lambda backend: (lambda h, w, b, t: linear_token_logprobs(
        h, w, t, b, return_entropy=True, backend=backend))
    ref = _run(_reference_fn, hidden, weight, bias, tokens, g_lp, g_h)
    out = _run(op(backend), hidden, weight, bias, tokens, g_lp.float(), g_h.float())
    # The torch backend is held to the floor alone (it is the yardstick of the others).
    base = ref if backend == "torch" else _run(op("torch"), hidden, weight, bias, tokens,
                                                g_lp.float(), g_h.float())
    names = ["logp", "entropy", "grad hidden", "grad weight", "grad bias"]
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    for name, o, r, t in zip(names, out, ref, base):
        if name.startswith("grad"):
            assert o.dtype == dtype, f"{name} dtype {o.dtype}"
        assert_close_to_reference(o, r, t, dtype, f"{backend} {name}")


def _reference_fn(h, w, b, t):
    return _reference(h, w, b, t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead,D,V", SHAPES)
def test_matches_float64_reference(backend, dtype, bias, lead, D, V):
    hidden, weight, b, tokens = _inputs(lead, D, V, dtype, bias)
    _check(backend, hidden, weight, b, tokens, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_int32_tokens(backend):
    # hidden: a strided slice; weight: the transpose of a [D, V] tensor (a tied embedding
    # stored the other way round); tokens: int32 and strided.
    base = torch.randn(6, 40, 2, device=DEVICE)
    hidden = base[:, :20, 1]
    weight = torch.randn(20, 37, device=DEVICE).t()
    tokens = torch.randint(0, 37, (6, 2), dtype=torch.int32, device=DEVICE)[:, 1]
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    assert not tokens.is_contiguous()
    _check(backend, hidden, weight, torch.randn(37, device=DEVICE), tokens, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_forward(backend):
    # Logits of about ±1e4 (no overflow in the online log-sum-exp), and -inf on all but one
    # entry of a row through the bias (logp of the survivor is 0, of the others -inf).
    hidden, weight, _, tokens = _inputs((6,), 16, 50, torch.float32, scale=1e4 / 4)
    ref = [r.float() for r in _reference(hidden, weight, None, tokens)]
    out = linear_token_logprobs(hidden, weight, tokens, return_entropy=True, backend=backend)
    base = linear_token_logprobs(hidden, weight, tokens, return_entropy=True, backend="torch")
    for o, r, t in zip(out, ref, base):
        assert_close_to_reference(o, r, t, torch.float32, "extreme logits")
    bias = torch.full((50,), float("-inf"), device=DEVICE)
    bias[7] = 0.0
    tokens = torch.tensor([7, 3, 7, 0, 49, 7], device=DEVICE)
    logp, ent = linear_token_logprobs(hidden, weight, tokens, bias, return_entropy=True,
                                      backend=backend)
    expected = torch.where(tokens == 7, 0.0, float("-inf"))
    assert torch.equal(logp.cpu(), expected.cpu())
    assert torch.equal(ent.cpu(), torch.zeros(6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_gives_nan(backend):
    hidden, weight, b, tokens = _inputs((3,), 8, 20, torch.float32)
    hidden[1, 2] = float("nan")
    logp = linear_token_logprobs(hidden, weight, tokens, b, backend=backend)
    assert logp.isnan().tolist() == [False, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_output_gradients(backend):
    # Only logp (entropy unused) and only entropy: each backward term alone.
    hidden, weight, b, tokens = _inputs((5,), 16, 30, torch.float32)
    for which in (0, 1):
        grads = []
        for be in ("torch", backend):
            h = hidden.clone().requires_grad_()
            out = linear_token_logprobs(h, weight, tokens, b, return_entropy=True, backend=be)
            (g,) = torch.autograd.grad(out[which].sum(), h)
            grads.append(g)
        ref_h = hidden.double().requires_grad_()
        (r,) = torch.autograd.grad(_reference(ref_h, weight, b, tokens)[which].sum(), ref_h)
        assert_close_to_reference(grads[1], r, grads[0], torch.float32, f"output {which}")


def test_autocast_runs_in_half_precision_and_reaches_fp32_params():
    hidden = torch.randn(4, 16)
    weight = torch.randn(40, 16, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    tokens = torch.randint(0, 40, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = linear_token_logprobs(hidden, weight, tokens, bias, backend="torch")
    logp.sum().backward()
    assert logp.dtype == torch.float32
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    ref = _reference(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), tokens)[0]
    assert (logp.double() - ref).abs().max() < 1e-5


def test_torch_backend_chunks(monkeypatch):
    # Force many chunks (3 rows each) and compare with one chunk: same values, same grads.
    import importlib

    # (the package namespace binds the name to the function; the module holds the constant)
    mod = importlib.import_module("dvae_kernels.linear_token_logprobs")

    hidden, weight, b, tokens = _inputs((10,), 8, 16, torch.float32)
    whole = _run(lambda h, w, b_, t: linear_token_logprobs(h, w, t, b_, return_entropy=True,
                                                           backend="torch"),
                 hidden, weight, b, tokens, torch.ones(10), torch.ones(10))
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 3 * 16)
    assert mod.chunk_rows(16) == 3
    chunked = _run(lambda h, w, b_, t: linear_token_logprobs(h, w, t, b_, return_entropy=True,
                                                             backend="torch"),
                   hidden, weight, b, tokens, torch.ones(10), torch.ones(10))
    for a, c in zip(whole, chunked):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_gradcheck_float64():
    hidden = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([0, 4, 2])
    fn = lambda h, w, b: linear_token_logprobs(h, w, tokens, b, return_entropy=True,
                                               backend="torch")
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    nll = lambda h, w, b: linear_weighted_token_nll(h, w, tokens, torch.tensor([0.5, 2., 1.],
                                                    dtype=torch.float64), b, backend="torch")
    assert torch.autograd.gradcheck(nll, (hidden, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hidden, weight, b, tokens = _inputs((5,), 16, 20, torch.float32)
    # (1/temperature, softcap, mean logit): plain, and every transform with the mean output
    for inv_temp, cap, mean in ((1.0, 0.0, False), (0.5, 5.0, True)):
        for bias in (b, None):
            args = (hidden.requires_grad_(), weight.requires_grad_(), tokens,
                    bias.requires_grad_() if bias is not None else None, inv_temp, cap, mean,
                    backend)
            torch.library.opcheck(torch.ops.dvae_kernels.linear_token_logprobs.default, args)
        h, w, b_ = hidden.detach(), weight.detach(), b.detach()
        _, lse, ent, _ = torch.ops.dvae_kernels.linear_token_logprobs(h, w, tokens, b_, inv_temp,
                                                                      cap, mean, backend)
        g = torch.randn(5, device=DEVICE)
        bwd_args = (g, g, None, g if mean else None, h, w, tokens, b_, lse, ent, inv_temp, cap,
                    backend)
        torch.library.opcheck(torch.ops.dvae_kernels.linear_token_logprobs_backward.default,
                              bwd_args)


def test_torch_compile_fullgraph():
    hidden, weight, b, tokens = _inputs((2, 5), 8, 12, torch.float32)
    weights = torch.rand(2, 1)

    def loss_fn(h, w, b_):
        nll = linear_weighted_token_nll(h, w, tokens, weights, b_, reduction="mean",
                                        backend="torch")
        _, ent = linear_token_logprobs(h, w, tokens, b_, return_entropy=True, backend="torch")
        return nll + 0.1 * ent.sum()

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves)
    eager_leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    eager = loss_fn(*eager_leaves)
    eager_grads = torch.autograd.grad(eager, eager_leaves)
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------- weighted NLL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_weighted_nll_matches_reference(backend, reduction):
    # DAPS shapes in miniature: weights [N, K, 1] broadcast over tokens [N, K, L].
    hidden, weight, b, tokens = _inputs((2, 3, 4), 16, 25, torch.float32)
    weights = torch.rand(2, 3, 1, device=DEVICE, requires_grad=True)
    h = hidden.clone().requires_grad_()
    loss = linear_weighted_token_nll(h, weight, tokens, weights, b, reduction=reduction,
                                     backend=backend)
    h64 = hidden.double().requires_grad_()
    ref = -(weights.detach().double() * _reference(h64, weight, b, tokens)[0])
    ref = {"sum": ref.sum(), "mean": ref.mean(), "none": ref}[reduction]
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert_close_to_reference(loss, ref, ref, torch.float32, "loss")
    (g,) = torch.autograd.grad(loss.sum(), h, retain_graph=True)
    (r,) = torch.autograd.grad(ref.sum(), h64)
    assert_close_to_reference(g, r, r, torch.float32, "grad hidden")
    loss.sum().backward()
    assert weights.grad is None  # the weights are targets: detached


def test_weighted_nll_module_float_weights_and_empty():
    hidden, weight, _, tokens = _inputs((3,), 8, 10, torch.float32)
    module = LinearWeightedTokenNLL(reduction="sum", backend="torch")
    assert "reduction='sum'" in repr(module)
    torch.testing.assert_close(module(hidden, weight, tokens, 2.0),
                               -2 * linear_token_logprobs(hidden, weight, tokens).sum())
    empty = linear_weighted_token_nll(hidden[:0], weight, tokens[:0], 1.0, backend="torch")
    assert empty.item() == 0.0


# --------------------------------------------------------------------------- bad input


def test_bad_input_messages():
    hidden, weight, b, tokens = _inputs((4,), 8, 10, torch.float32)
    with pytest.raises(ValueError, match="weight must be \\[V, D\\] with D"):
        linear_token_logprobs(hidden, weight[:, :7], tokens)
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        linear_token_logprobs(hidden, weight.double(), tokens)
    with pytest.raises(ValueError, match="bias must be \\[V\\]"):
        linear_token_logprobs(hidden, weight, tokens, b[:3])
    with pytest.raises(ValueError, match="tokens must lie in"):
        linear_token_logprobs(hidden, weight, tokens + 10)
    with pytest.raises(ValueError, match="tokens must have the shape"):
        linear_token_logprobs(hidden, weight, tokens[:2])
    with pytest.raises(TypeError, match="tokens must be int64 or int32"):
        linear_token_logprobs(hidden, weight, tokens.float())
    with pytest.raises(TypeError, match="hidden must be float32"):
        linear_token_logprobs(hidden.int(), weight, tokens)
    with pytest.raises(ValueError, match="weights must broadcast"):
        linear_weighted_token_nll(hidden, weight, tokens, torch.ones(3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_weighted_token_nll(hidden, weight, tokens, 1.0, reduction="max")
    if "triton" in BACKENDS:
        with pytest.raises(BackendError, match="float64"):
            linear_token_logprobs(hidden.double(), weight.double(), tokens, backend="triton")


def test_floor_table_covers_dtypes():
    assert set(DTYPES) <= set(FLOOR)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_is_atomic_free_deterministic_and_exact(dtype):
    # Several row blocks, row splits of the grad_weight kernel, V tiles, a hidden size that is
    # not a multiple of the 16-wide dot tile and spans two 128-wide slices: against float64,
    # and two runs give the same bits (no atomics: the partial sums are added in one order).
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    ltl = importlib.import_module("dvae_kernels.linear_token_logprobs")
    N, D, V = 200, 136, 150
    assert ltl._bwd_splits(N, V, D)[0] > 1
    hidden, weight, b, tokens = _inputs((N,), D, V, dtype, bias=True)
    _check("triton", hidden, weight, b, tokens, dtype)
    g_lp = torch.randn(N, device=DEVICE)
    g_h = torch.randn(N, device=DEVICE)
    op = lambda h, w, bb, t: linear_token_logprobs(h, w, t, bb, return_entropy=True,
                                                   backend="triton")
    first = _run(op, hidden, weight, b, tokens, g_lp, g_h)
    second = _run(op, hidden, weight, b, tokens, g_lp, g_h)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
