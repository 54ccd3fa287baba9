"""dvae_kernels.nn (FusedCategoricalHead, LinearCrossEntropyLoss), codebook_logits and
causal_lm_token_logprobs against float64 autograd of the materialised computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, assert_close_to_reference, available_backends

import dvae_kernels as dk
from dvae_kernels.nn import FusedCategoricalHead, LinearCrossEntropyLoss

# Backends of the linear ops that run here; Triton (interpreted) only at the tiniest shape.
BACKENDS = [b for b in available_backends() if b in ("torch", "triton", "cpu", "cuda")]


def _materialised(hidden, weight, bias, tokens):
    """logp and entropy through the logits, in the inputs' dtype (float64 for the reference)."""
    lp = torch.log_softmax(F.linear(hidden, weight, bias).float()
                           if hidden.dtype != torch.float64 else F.linear(hidden, weight, bias),
                           -1)
    logp = lp.gather(-1, tokens[..., None].long())[..., 0]
    entropy = -torch.where(lp.exp() == 0, 0.0, lp.exp() * lp).sum(-1)
    return logp, entropy


def _grads(fn, params, g_lp, g_h, leaves=None):
    leaves = leaves or [p.detach().requires_grad_() for p in params]
    logp, ent = fn(*leaves)
    grads = torch.autograd.grad((g_lp * logp).sum() + (g_h * ent).sum(), leaves)
    return [logp, ent, *grads]


# --- FusedCategoricalHead --------------------------------------------------------------------


def test_head_state_dict_round_trip_with_linear():
    linear = torch.nn.Linear(12, 37)
    head = FusedCategoricalHead(12, 37)
    head.load_state_dict(linear.state_dict())
    assert torch.equal(head.weight, linear.weight) and torch.equal(head.bias, linear.bias)
    back = torch.nn.Linear(12, 37)
    back.load_state_dict(head.state_dict())
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)
    assert set(head.state_dict()) == {"weight", "bias"}
    nobias = FusedCategoricalHead(12, 37, bias=False)
    nobias.load_state_dict(torch.nn.Linear(12, 37, bias=False).state_dict())
    with pytest.raises(RuntimeError):  # torch's own strict state-dict check
        nobias.load_state_dict(linear.state_dict())
    copy = FusedCategoricalHead.from_linear(linear).to_linear()
    assert torch.equal(copy.weight, linear.weight) and torch.equal(copy.bias, linear.bias)


def test_head_init_matches_linear():
    torch.manual_seed(3)
    linear = torch.nn.Linear(20, 50)
    torch.manual_seed(3)
    head = FusedCategoricalHead(20, 50)
    assert torch.equal(head.weight, linear.weight) and torch.equal(head.bias, linear.bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_head_log_prob_entropy_and_gradients_vs_float64(backend, bias):
    # V = 70 spans two 64-wide vocabulary tiles; D = 33 is not a multiple of the dot tile.
    lead, D, V = (3, 5), 33, 70
    head = FusedCategoricalHead(D, V, bias=bias, backend=backend).to(DEVICE)
    hidden = torch.randn(*lead, D, device=DEVICE)
    tokens = torch.randint(0, V, lead, device=DEVICE)
    g_lp = torch.randn(lead, dtype=torch.float64, device=DEVICE)
    g_h = torch.randn(lead, dtype=torch.float64, device=DEVICE)
    params = [hidden, head.weight] + ([head.bias] if bias else [])

    def fused(h, *_):
        return head.log_prob(h, tokens, return_entropy=True)

    def mat(h, w, *b):
        return _materialised(h, w, b[0] if b else None, tokens)

    # The head's own parameters are the leaves: gradients must reach them.
    leaves = [hidden.clone().requires_grad_()] + params[1:]
    out = _grads(fused, None, g_lp, g_h, leaves)
    ref = _grads(mat, [p.double() for p in params], g_lp, g_h)
    nat = _grads(mat, params, g_lp, g_h)
    names = ["logp", "entropy", "grad hidden", "grad weight", "grad bias"]
    for o, r, n, name in zip(out, ref, nat, names):
        assert_close_to_reference(o, r, n, torch.float32, name)


def test_head_entropy_and_weighted_nll():
    D, V = 16, 300
    head = FusedCategoricalHead(D, V)
    hidden = torch.randn(4, 6, D)
    tokens = torch.randint(0, V, (4, 6))
    weights = torch.rand(4, 1)
    lp64, ent64 = _materialised(hidden.double(), head.weight.double(), head.bias.double(),
                                tokens)
    lp32, ent32 = _materialised(hidden, head.weight, head.bias, tokens)
    assert_close_to_reference(head.entropy(hidden), ent64, ent32, torch.float32, "entropy")
    assert_close_to_reference(head(hidden, tokens), lp64, lp32, torch.float32, "forward")
    for reduction, red in (("sum", torch.sum), ("mean", torch.mean), ("none", lambda x: x)):
        got = head.weighted_nll(hidden, tokens, weights, reduction=reduction)
        assert_close_to_reference(got, red(-(weights.double() * lp64)),
                                  red(-(weights * lp32)), torch.float32, reduction)
    # The entropy's gradient reaches the parameters (and the placeholder token adds nothing).
    hidden.requires_grad_()
    g_ent = torch.autograd.grad(head.entropy(hidden).sum(), head.weight)[0]
    h64 = hidden.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    _, e64 = _materialised(h64, w64, head.bias.detach().double(), tokens)
    want = torch.autograd.grad(e64.sum(), w64)[0]
    assert torch.allclose(g_ent.double(), want, atol=1e-5, rtol=1e-4)


def test_head_sample_distribution_and_logp():
    D, V, R = 8, 5, 4000
    head = FusedCategoricalHead(D, V)
    hidden = torch.randn(1, D).expand(R, D)
    g = torch.Generator().manual_seed(0)
    tokens, logp = head.sample(hidden, generator=g)
    assert tokens.shape == (R,) and not logp.requires_grad
    p = torch.softmax(F.linear(hidden[0].double(), head.weight.double(), head.bias.double()), -1)
    freq = torch.bincount(tokens, minlength=V).double() / R
    # Binomial bound: 5 standard deviations per category.
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / R).sqrt() + 1e-3).all(), (freq, p)
    assert torch.allclose(logp.double(), p.log()[tokens], atol=1e-5)
    greedy, _ = head.sample(hidden[:3], temperature=0.0)
    assert (greedy == p.argmax()).all()


def test_head_bad_inputs():
    head = FusedCategoricalHead(8, 10)
    with pytest.raises(ValueError, match=r"hidden must be \[..., D\] with D = in_features = 8"):
        head.log_prob(torch.randn(3, 7), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        head.entropy([1.0] * 8)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, V\) = \[0, 10\)"):
        head.log_prob(torch.randn(3, 8), torch.tensor([0, 10, 2]))
    with pytest.raises(TypeError, match="tokens must be int64 or int32"):
        head.log_prob(torch.randn(3, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        head.weighted_nll(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), 1.0, "avg")
    with pytest.raises(ValueError, match="out_features must be >= 1, got 0"):
        FusedCategoricalHead(8, 0)
    with pytest.raises(TypeError, match="in_features must be an int"):
        FusedCategoricalHead(8.0, 3)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        FusedCategoricalHead.from_linear(torch.nn.Conv1d(2, 2, 1))


# --- LinearCrossEntropyLoss ------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_torch(reduction):
    D, V = 12, 40
    hidden = torch.randn(3, 7, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, (3, 7))
    target[0, :3] = -100
    got = LinearCrossEntropyLoss(reduction=reduction, backend="torch")(hidden, weight, target)
    want = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), target.flatten(),
                           reduction=reduction).reshape(got.shape)
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-12)
    g1 = torch.autograd.grad(got.sum(), [hidden, weight])
    g2 = torch.autograd.grad(want.sum(), [hidden, weight])
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
    assert g1[0][0, :3].abs().max() == 0  # ignored positions get no gradient


def test_linear_cross_entropy_bad_arguments():
    with pytest.raises(ValueError, match="reduction must be one of"):
        LinearCrossEntropyLoss(reduction="batchmean")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        LinearCrossEntropyLoss(ignore_index=None)


# --- codebook_logits -------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_codebook_logits_match_materialised_distances_float64(tau):
    # Encoder outputs far from the codebook (|h| ~ 30, codes ~ 1): the ‖h‖² term the direct
    # distances carry is large; the fused form drops it exactly.
    V, D = 257, 16
    codebook = torch.randn(V, D, dtype=torch.float64)
    h = 30 + torch.randn(6, D, dtype=torch.float64)
    tokens = torch.randint(0, V, (6,))
    weight, bias = dk.codebook_logits(codebook, tau)
    assert weight.shape == (V, D) and bias.shape == (V,) and weight.dtype == torch.float64
    d2 = ((h[:, None, :] - codebook[None]) ** 2).sum(-1)  # [N, V] distances, materialised
    lp = torch.log_softmax(-d2 / tau, -1)
    want = lp.gather(-1, tokens[:, None])[:, 0]
    want_ent = -(lp.exp() * lp).sum(-1)
    got, ent = dk.linear_token_logprobs(h, weight, tokens, bias, return_entropy=True,
                                        backend="torch")
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-9)
    assert torch.allclose(ent, want_ent, atol=1e-9, rtol=1e-9)
    assert torch.allclose(F.linear(h, weight, bias) - (-d2 / tau),
                          (h * h).sum(-1, keepdim=True).expand(-1, V) / tau, rtol=1e-12)


def test_codebook_logits_float32_and_gradients():
    V, D = 100, 8
    cb64 = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    h64 = torch.randn(5, D, dtype=torch.float64)
    tokens = torch.randint(0, V, (5,))
    tau64 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    d2 = ((h64[:, None] - cb64[None]) ** 2).sum(-1)
    want = torch.log_softmax(-d2 / tau64, -1).gather(-1, tokens[:, None])[:, 0]
    want_g = torch.autograd.grad(want.sum(), [cb64, tau64])

    cb = cb64.detach().float().requires_grad_()
    tau = torch.tensor(0.5, requires_grad=True)
    w, b = dk.codebook_logits(cb, tau)
    got = dk.linear_token_logprobs(h64.float(), w, tokens, b)
    g = torch.autograd.grad(got.sum(), [cb, tau])
    nat = torch.log_softmax(-torch.cdist(h64.float(), cb.detach()) ** 2 / 0.5, -1)
    nat = nat.gather(-1, tokens[:, None])[:, 0]
    assert_close_to_reference(got, want, nat, torch.float32, "codebook logp")
    assert torch.allclose(g[0].double(), want_g[0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(g[1].double(), want_g[1], atol=1e-4, rtol=1e-4)


def test_codebook_logits_better_conditioned_than_distances_in_float32():
    # Encoder outputs far from the codebook (‖h‖ ≈ 570, ‖c‖ ≈ 5.7): the docstring's claim.
    V, D = 512, 32
    codebook = torch.randn(V, D, dtype=torch.float64)
    h = 100 + torch.randn(64, D, dtype=torch.float64)
    tokens = torch.randint(0, V, (64,))
    d2 = ((h[:, None] - codebook[None]) ** 2).sum(-1)
    want = torch.log_softmax(-d2, -1).gather(-1, tokens[:, None])[:, 0]
    cdist = torch.log_softmax(-torch.cdist(h.float(), codebook.float()) ** 2, -1)
    err_cdist = (cdist.gather(-1, tokens[:, None])[:, 0].double() - want).abs().max()
    weight, bias = dk.codebook_logits(codebook.float(), 1.0)
    fused = dk.linear_token_logprobs(h.float(), weight, tokens, bias)
    err_fused = (fused.double() - want).abs().max()
    assert err_fused * 10 < err_cdist, (err_fused, err_cdist)


def test_codebook_logits_bad_inputs():
    with pytest.raises(ValueError, match=r"codebook must be \[V, D\]"):
        dk.codebook_logits(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="tau must be > 0.0, got 0.0"):
        dk.codebook_logits(torch.randn(4, 3), 0.0)
    with pytest.raises(TypeError, match="codebook must be float32"):
        dk.codebook_logits(torch.ones(4, 3, dtype=torch.long))


# --- causal_lm_token_logprobs ----------------------------------------------------------------


def _causal_reference(hidden, weight, ids, mask):
    lp = torch.log_softmax(hidden.double() @ weight.double().T, -1)[:, :-1]
    logp = lp.gather(-1, ids[:, 1:, None])[..., 0]
    ent = -(lp.exp() * lp).sum(-1)
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    return logp * keep, ent * keep


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_lm_token_logprobs_vs_float64(backend):
    B, T, D, V = 3, 6, 16, 67
    hidden = torch.randn(B, T, D, device=DEVICE, requires_grad=True)
    weight = (torch.randn(V, D, device=DEVICE) / 4).requires_grad_()
    ids = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    mask[1, 4:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    ids[1, 4:] = -1  # padding ids are never read (here even out of range)
    logp, ent = dk.causal_lm_token_logprobs(hidden, weight, ids, mask, return_entropy=True,
                                            backend=backend)
    ref_ids = torch.where(mask.bool(), ids, 0)
    want, want_ent = _causal_reference(hidden.detach(), weight.detach(), ref_ids, mask)
    assert logp.shape == (B, T - 1) and logp.dtype == torch.float32
    assert torch.allclose(logp.double(), want, atol=2e-5)
    assert torch.allclose(ent.double(), want_ent, atol=2e-5)
    assert (logp[1, 3:] == 0).all() and (logp[2, :2] == 0).all()
    gh, gw = torch.autograd.grad(logp.sum() + 0.1 * ent.sum(), [hidden, weight])
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    r, re = _causal_reference(h64, w64, ref_ids, mask)
    rh, rw = torch.autograd.grad(r.sum() + 0.1 * re.sum(), [h64, w64])
    assert torch.allclose(gh.double(), rh, atol=1e-5) and torch.allclose(gw.double(), rw,
                                                                          atol=1e-5)
    assert (gh[1, 4:] == 0).all()  # hidden states at padding get no gradient


def test_causal_lm_left_and_right_padding_agree():
    D, V = 8, 30
    weight = torch.randn(V, D)
    seq_h, seq_ids = torch.randn(4, D), torch.randint(0, V, (4,))
    pad_h, pad_ids = torch.randn(2, D), torch.tensor([7, 7])
    right = dk.causal_lm_token_logprobs(torch.cat([seq_h, pad_h])[None], weight,
                                        torch.cat([seq_ids, pad_ids])[None],
                                        torch.tensor([[1, 1, 1, 1, 0, 0]]))
    left = dk.causal_lm_token_logprobs(torch.cat([pad_h, seq_h])[None], weight,
                                       torch.cat([pad_ids, seq_ids])[None],
                                       torch.tensor([[0, 0, 1, 1, 1, 1]]))
    plain = dk.causal_lm_token_logprobs(seq_h[None], weight, seq_ids[None])
    # equal up to float rounding: BLAS may block a 6-row and a 4-row matmul differently (on
    # the AMD EPYC CI machine of 2026-12-02 the last bit differed)
    assert torch.allclose(right[0, :3], plain[0], rtol=1e-6, atol=1e-6)
    assert torch.allclose(left[0, 2:], plain[0], rtol=1e-6, atol=1e-6)
    assert torch.allclose(right.sum(), plain.sum()) and torch.allclose(left.sum(), plain.sum())


def test_causal_lm_single_token_gives_empty():
    out = dk.causal_lm_token_logprobs(torch.randn(2, 1, 4), torch.randn(5, 4),
                                      torch.zeros(2, 1, dtype=torch.long))
    assert out.shape == (2, 0)


def test_causal_lm_bad_inputs():
    h, w = torch.randn(2, 5, 4), torch.randn(9, 4)
    ids = torch.randint(0, 9, (2, 5))
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, D\]"):
        dk.causal_lm_token_logprobs(h[0], w, ids)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\] = \[2, 5\]"):
        dk.causal_lm_token_logprobs(h, w, ids[:, :4])
    with pytest.raises(TypeError, match="input_ids must be int64 or int32"):
        dk.causal_lm_token_logprobs(h, w, ids.float())
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        dk.causal_lm_token_logprobs(h, w, ids, torch.ones(2, 4))
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        dk.causal_lm_token_logprobs(h, w, ids, torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        dk.causal_lm_token_logprobs(h, w, ids, torch.full((2, 5), 2))
    with pytest.raises(ValueError, match=r"lm_head_weight must be \[V, D\] with D = "):
        dk.causal_lm_token_logprobs(h, torch.randn(9, 3), ids)
    with pytest.raises(TypeError, match="lm_head_weight must be float32"):
        dk.causal_lm_token_logprobs(h, torch.ones(9, 4, dtype=torch.long), ids)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, V\) = \[0, 9\)"):
        dk.causal_lm_token_logprobs(h, w, torch.full((2, 5), 9))
    bad = ids.clone()
    bad[0, 3] = -5  # out of range at a real position: refused even with a mask
    with pytest.raises(ValueError, match=r"first: -5"):
        dk.causal_lm_token_logprobs(h, w, bad, torch.ones(2, 5, dtype=torch.bool))


def test_drop_in_paths_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the head's methods and the causal-LM path (the ops
    are custom ops; the value checks are skipped while compiling), forward and backward."""
    head = FusedCategoricalHead(16, 50, backend="torch")
    hidden = torch.randn(3, 4, 16, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 4))
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[0, 3:] = 0

    def f(h):
        lp, ent = head.log_prob(h, tokens, return_entropy=True)
        causal = dk.causal_lm_token_logprobs(h, head.weight, tokens, mask)
        return lp.sum() + ent.sum() + head.entropy(h).sum() + causal.sum()

    want = f(hidden)
    (g_want,) = torch.autograd.grad(want, hidden)
    got = torch.compile(f, fullgraph=True)(hidden)
    (g_got,) = torch.autograd.grad(got, hidden)
    assert torch.allclose(got, want, atol=1e-4) and torch.allclose(g_got, g_want, atol=1e-5)
