"""token_logprobs: every CPU-runnable backend against a float64 transcription (docs/conventions.md#testing)."""

import pytest
import torch
from utils import DEVICE, DTYPES, assert_close_to_reference, available_backends

import dvae_kernels as dk

# Every backend that runs on the test device: on the CPU, torch, Triton (interpreter) and cpu
# (if built); on CUDA (DVAE_TEST_DEVICE=cuda), torch, triton and cuda.
BACKENDS = available_backends()
KERNELS = [b for b in BACKENDS if b != "torch"]


def reference(logits, tokens):
    """float64 transcription: log softmax, gather, entropy with 0·log 0 = 0."""
    lp = torch.log_softmax(logits.double(), -1)
    logp = lp.gather(-1, tokens.long()[..., None])[..., 0]
    p = lp.exp()
    entropy = -torch.where(p == 0, 0.0, p * lp).sum(-1)
    return logp, entropy


def check(logits, tokens, backend, dtype, grads=True):
    """Forward and backward of ``backend`` vs float64, tolerance relative to torch's error."""
    x = logits.to(device=DEVICE, dtype=dtype)
    tokens_d = tokens.to(DEVICE)
    outs = {}
    for name in {backend, "torch"}:
        xi = x.detach().clone().requires_grad_(grads)
        logp, ent = dk.token_logprobs(xi, tokens_d, return_entropy=True, backend=name)
        assert logp.dtype == ent.dtype == torch.float32
        assert logp.shape == ent.shape == tokens.shape
        if grads:
            g1 = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
            g2 = torch.randn(logp.shape, generator=torch.Generator().manual_seed(2))
            (logp.nan_to_num() * g1.to(DEVICE) + ent.nan_to_num() * g2.to(DEVICE)).sum().backward()
        outs[name] = (logp, ent, xi.grad)
    x64 = x.detach().double().cpu().requires_grad_(grads)
    ref_logp, ref_ent = reference(x64, tokens)
    assert_close_to_reference(outs[backend][0], ref_logp, outs["torch"][0], dtype, "logp")
    assert_close_to_reference(outs[backend][1], ref_ent, outs["torch"][1], dtype, "entropy")
    if grads:
        (ref_logp.nan_to_num() * g1.double() + ref_ent.nan_to_num() * g2.double()).sum().backward()
        assert outs[backend][2].dtype == dtype
        assert_close_to_reference(outs[backend][2], x64.grad, outs["torch"][2], dtype, "grad")


# The grid: V not a power of two (1, 3, 1000, 1023) and above one vocabulary tile (5000,
# 50257: the online max/sum across tiles); a batch of 1; several leading dims.
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (7, 1000), (2, 3, 1023), (3, 5000)])
def test_matches_float64(backend, dtype, shape):
    logits = torch.randn(shape) * 3
    tokens = torch.randint(0, shape[-1], shape[:-1])
    check(logits, tokens, backend, dtype)


@pytest.mark.parametrize("backend", KERNELS)
def test_large_vocabulary(backend):
    logits = torch.randn(2, 50257) * 4
    check(logits, torch.tensor([0, 50256]), backend, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extremes(backend):
    # Rows: ±1e4 logits (cancellation in the entropy), -inf on all but one entry (entropy 0,
    # logp 0), a -inf token (logp -inf), all -inf (NaN), a NaN (NaN), +inf (NaN).
    V = 37
    logits = torch.randn(8, V)
    logits[0] = torch.where(torch.rand(V) > 0.5, 1e4, -1e4)
    logits[1] = float("-inf")
    logits[1, 5] = 2.0
    logits[2, 3] = float("-inf")
    logits[3] = float("-inf")
    logits[4, 9] = float("nan")
    logits[5, 1] = float("inf")
    logits[6] = 1e4 + torch.randn(V)
    tokens = torch.randint(0, V, (8,))
    tokens[1], tokens[2] = 5, 3
    check(logits, tokens, backend, torch.float32, grads=False)
    logits, tokens = logits.to(DEVICE), tokens.to(DEVICE)
    logp, ent = dk.token_logprobs(logits, tokens, return_entropy=True, backend=backend)
    assert logp[1] == 0 and ent[1] == 0
    assert logp[2] == float("-inf")
    assert logp[3:6].isnan().all() and ent[3:6].isnan().all()
    # Gradients: finite wherever the row is finite.
    x = logits[[0, 1, 6]].clone().requires_grad_()
    lp, h = dk.token_logprobs(x, tokens[[0, 1, 6]], return_entropy=True, backend=backend)
    (lp + h).sum().backward()
    assert x.grad.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_noncontiguous_and_int32(backend):
    empty = torch.randn(0, 11, device=DEVICE, requires_grad=True)
    out = dk.token_logprobs(empty, torch.zeros(0, dtype=torch.long, device=DEVICE),
                            backend=backend)
    assert out.shape == (0,)
    out.sum().backward()
    assert empty.grad.shape == (0, 11)
    # A transposed view: the row stride is not V and the rows are not contiguous.
    base = torch.randn(50, 6, 3)
    logits = base.transpose(0, 1)[:, ::2, :].transpose(1, 2)  # [6, 3, 25], last stride != 1
    tokens = torch.randint(0, logits.shape[-1], logits.shape[:-1], dtype=torch.int32)
    check(logits, tokens, backend, torch.float32)
    sliced = torch.randn(4, 40)[:, :33]  # unit column stride, row stride 40
    check(sliced, torch.randint(0, 33, (4,)), backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_invariance_and_inputs_untouched(backend):
    logits = torch.randn(6, 100, device=DEVICE)
    tokens = torch.randint(0, 100, (6,), device=DEVICE)
    before = logits.clone()
    a = dk.token_logprobs(logits, tokens, backend=backend)
    b = dk.token_logprobs(logits + 123.0, tokens, backend=backend)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_gradient(backend):
    # Only the entropy is used: the logp term of the backward must be skipped, not zero-filled.
    x = torch.randn(4, 9, dtype=torch.float32, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 9, (4,), device=DEVICE)
    _, h = dk.token_logprobs(x, t, return_entropy=True, backend=backend)
    h.sum().backward()
    x64 = x.detach().double().cpu().requires_grad_()
    reference(x64, torch.zeros(4, dtype=torch.long))[1].sum().backward()
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (3,))
    f = lambda x: dk.token_logprobs(x, t, return_entropy=True, backend="torch")
    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    from dvae_kernels.token_logprobs import _op

    x = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 10, (4,), device=DEVICE)
    for with_entropy in (True, False):
        torch.library.opcheck(_op, (x, t, backend, with_entropy))


def test_torch_compile_fullgraph():
    def f(x, t):
        lp, h = dk.token_logprobs(x, t, return_entropy=True, backend="torch")
        return (lp + 0.1 * h).sum()

    x = torch.randn(4, 3, 17, requires_grad=True)
    t = torch.randint(0, 17, (4, 3))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(x, t)
    y.backward()
    x2 = x.detach().clone().requires_grad_()
    f(x2, t).backward()
    torch.testing.assert_close(y, f(x2, t).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_when_asked(backend):
    # Without return_entropy the op computes and returns no entropy (an empty tensor), and the
    # log-probabilities and their gradient are those of the run with entropy.
    from dvae_kernels.token_logprobs import _op

    x = torch.randn(5, 40, device=DEVICE)
    t = torch.randint(0, 40, (5,), device=DEVICE)
    lp0, lse0, ent0 = _op(x, t, backend, False)
    lp1, lse1, ent1 = _op(x, t, backend, True)
    assert ent0.shape == (0,) and ent1.shape == (5,)
    torch.testing.assert_close(lp0, lp1, rtol=0, atol=0)
    torch.testing.assert_close(lse0, lse1, rtol=0, atol=0)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    dk.token_logprobs(xa, t, backend=backend).sum().backward()
    dk.token_logprobs(xb, t, return_entropy=True, backend=backend)[0].sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)


def test_vec16_only_for_16_byte_rows():
    from dvae_kernels._triton import vec16

    assert vec16(torch.empty(4, 1000, dtype=torch.bfloat16)) == 8
    assert vec16(torch.empty(4, 1000)) == 4
    assert vec16(torch.empty(4, 1001, dtype=torch.bfloat16)) == 1
    assert vec16(torch.empty(4, 1024, dtype=torch.bfloat16)[:, 1:1001]) == 1  # offset start
    assert vec16(torch.empty(4, 1004, dtype=torch.bfloat16)[:, :1000]) == 1  # row stride 1004
    assert vec16(torch.empty(4, 1000), torch.empty(4, 999)) == 1
