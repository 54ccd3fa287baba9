"""The options fused-cross-entropy users rely on, on every backend of the linear ops: the
sampling ``temperature``, the logit ``softcap``, ``ignore_index``, ``label_smoothing``,
``z_loss`` with ``return_lse``, and the reductions ``none | sum | mean | sequence_mean``. Each
is checked forward and backward against a float64 transcription, within twice the error of
PyTorch's own float32 computation (the materialised logits) plus the floor of tests/utils."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, assert_close_to_reference, available_backends

import dvae_kernels as dk

BACKENDS = [b for b in available_backends() if b in ("torch", "triton", "cpu")]

# (temperature, softcap): each transform alone and both (softcap after the temperature). The
# softcap of 2 bends logits of magnitude ~3 hard, so the 1 - tanh² factor of the backward is
# exercised away from 1.
TRANSFORMS = [(1.0, None), (0.7, None), (1.0, 2.0), (0.5, 3.0)]


def _inputs(lead=(3, 5), D=12, V=37, seed=0, ignored=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, D, generator=g) * 0.8
    weight = torch.randn(V, D, generator=g)
    bias = torch.randn(V, generator=g)
    tokens = torch.randint(0, V, lead, generator=g)
    if ignored:  # a prompt-like run of -100 and one in the middle, as HF labels carry
        tokens[0, :2] = -100
        tokens[-1, 3] = -100
    return [t.to(DEVICE) for t in (hidden, weight, bias, tokens)]


def _logits(h, w, b, temperature, softcap):
    x = F.linear(h, w, b) / temperature
    return softcap * torch.tanh(x / softcap) if softcap else x


def _reference(h, w, b, tokens, temperature, softcap, smoothing=0.0, z_loss=0.0):
    """Per-token (logp, entropy, lse, loss) of the materialised computation in h's dtype; 0
    where the token is -100."""
    keep = tokens != -100
    safe = torch.where(keep, tokens, 0)
    x = _logits(h, w, b, temperature, softcap)
    lp = torch.log_softmax(x, -1)
    logp = lp.gather(-1, safe[..., None])[..., 0]
    entropy = -(lp.exp() * lp).sum(-1)
    lse = x.logsumexp(-1)
    loss = -(1 - smoothing) * logp - smoothing * lp.mean(-1) + z_loss * lse ** 2
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    return [torch.where(keep, v, zero) for v in (logp, entropy, lse, loss)]


def _grads(outputs, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    total = sum((torch.randn(o.shape, generator=g).to(o.device, o.dtype) * o).sum()
                for o in outputs)
    return list(torch.autograd.grad(total, leaves))


def _three(h, w, b, dtype):
    """float64 leaves, the same inputs in float32 (PyTorch's float32 path) and in ``dtype``."""
    return ([t.double().requires_grad_() for t in (h, w, b)],
            [t.float().requires_grad_() for t in (h, w, b)],
            [t.to(dtype).requires_grad_() for t in (h, w, b)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,softcap", TRANSFORMS)
def test_log_probs_entropy_and_lse_with_transforms(backend, temperature, softcap):
    h, w, b, tokens = _inputs()
    ref_leaves, pt_leaves, leaves = _three(h, w, b, torch.float32)
    ref = _reference(*ref_leaves, tokens, temperature, softcap)[:3]
    pt = _reference(*pt_leaves, tokens, temperature, softcap)[:3]
    out = dk.linear_token_logprobs(leaves[0], leaves[1], tokens, leaves[2], return_entropy=True,
                                   return_lse=True, temperature=temperature, softcap=softcap,
                                   backend=backend)
    assert len(out) == 3 and all(o.dtype == torch.float32 for o in out)
    names = ("logp", "entropy", "lse")
    for name, o, r, p in zip(names, out, ref, pt):
        assert_close_to_reference(o, r, p, torch.float32, f"{backend} {name}")
    for name, o, r, p in zip(("grad hidden", "grad weight", "grad bias"), _grads(out, leaves),
                             _grads(ref, ref_leaves), _grads(pt, pt_leaves)):
        assert_close_to_reference(o, r, p, torch.float32, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing,z_loss,temperature,softcap", [
    (0.1, 0.0, 1.0, None), (0.0, 1e-2, 1.0, None), (0.2, 1e-3, 0.8, 4.0)])
def test_weighted_nll_with_label_smoothing_and_z_loss(backend, smoothing, z_loss, temperature,
                                                      softcap):
    h, w, b, tokens = _inputs(seed=2)
    weights = torch.rand(tokens.shape[0], 1, generator=torch.Generator().manual_seed(3))
    weights = weights.to(DEVICE)
    ref_leaves, pt_leaves, leaves = _three(h, w, b, torch.float32)

    def reference(leaves_):
        per_token = _reference(*leaves_, tokens, temperature, softcap, smoothing, z_loss)
        return (weights.to(leaves_[0].dtype) * (per_token[3] - z_loss * per_token[2] ** 2)
                + z_loss * per_token[2] ** 2)

    ref, pt = reference(ref_leaves), reference(pt_leaves)
    loss, lse = dk.linear_weighted_token_nll(
        leaves[0], leaves[1], tokens, weights, leaves[2], reduction="none",
        temperature=temperature, softcap=softcap, label_smoothing=smoothing, z_loss=z_loss,
        return_lse=True, backend=backend)
    assert_close_to_reference(loss, ref, pt, torch.float32, f"{backend} loss")
    assert bool((lse[tokens == -100] == 0).all()) and bool((lse[tokens != -100] != 0).all())
    for name, o, r, p in zip(("grad hidden", "grad weight", "grad bias"),
                             _grads([loss], leaves), _grads([ref], ref_leaves),
                             _grads([pt], pt_leaves)):
        assert_close_to_reference(o, r, p, torch.float32, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_is_torchs_with_every_option(backend):
    """Unit weights, reduction "mean": ``F.cross_entropy(..., ignore_index=-100,
    label_smoothing=ε)`` of the transformed logits, gradients included."""
    h, w, b, tokens = _inputs(seed=4)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    pt = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = dk.linear_weighted_token_nll(leaves[0], leaves[1], tokens, 1.0, leaves[2],
                                        reduction="mean", temperature=0.9, softcap=5.0,
                                        label_smoothing=0.1, backend=backend)
    x = _logits(*pt, 0.9, 5.0)
    want = F.cross_entropy(x.flatten(0, -2), tokens.flatten(), ignore_index=-100,
                           label_smoothing=0.1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    loss.backward()
    want.backward()
    for a, c in zip(leaves, pt):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sequence_mean"])
def test_reductions(reduction):
    h, w, b, tokens = _inputs(lead=(4, 6), seed=5)
    tokens[2] = -100  # a sequence with nothing kept counts 0 in sequence_mean (TRL's clamp)
    weights = torch.rand(4, 6, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    per_token = dk.linear_weighted_token_nll(h, w, tokens, weights, b, reduction="none")
    out = dk.linear_weighted_token_nll(h, w, tokens, weights, b, reduction=reduction)
    keep = tokens != -100
    want = {"none": per_token, "sum": per_token.sum(),
            "mean": per_token.sum() / keep.sum(),
            "sequence_mean": (per_token.sum(-1) / keep.sum(-1).clamp(min=1)).mean()}[reduction]
    torch.testing.assert_close(out, want)
    assert bool((per_token[~keep] == 0).all())


def test_ignored_positions_have_no_gradient_and_ignore_index_none_checks_the_range():
    h, w, b, tokens = _inputs(seed=7)
    hidden = h.clone().requires_grad_()
    logp, ent = dk.linear_token_logprobs(hidden, w, tokens, b, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    ignored = tokens == -100
    assert bool((logp[ignored] == 0).all()) and bool((ent[ignored] == 0).all())
    assert bool((hidden.grad[ignored] == 0).all()) and bool((hidden.grad[~ignored] != 0).any())
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, V\) = \[0, 37\)"):
        dk.linear_token_logprobs(h, w, tokens, b, ignore_index=None)
    with pytest.raises(ValueError, match="or equal ignore_index=-1"):
        dk.linear_token_logprobs(h, w, tokens, b, ignore_index=-1)
    other = torch.where(ignored, -1, tokens)
    torch.testing.assert_close(dk.linear_token_logprobs(h, w, other, b, ignore_index=-1),
                               logp.detach())


@pytest.mark.parametrize("call,exc,match", [
    (lambda h, w, t: dk.linear_token_logprobs(h, w, t, temperature=0.0), ValueError,
     "linear_token_logprobs: temperature must be finite and > 0"),
    (lambda h, w, t: dk.linear_token_logprobs(h, w, t, softcap=-1.0), ValueError,
     "softcap must be finite and > 0"),
    (lambda h, w, t: dk.linear_token_logprobs(h, w, t, temperature=torch.tensor(1.0)),
     TypeError, "temperature must be a float"),
    (lambda h, w, t: dk.linear_weighted_token_nll(h, w, t, 1.0, label_smoothing=1.5),
     ValueError, "label_smoothing must be finite and >= 0.0 and <= 1.0"),
    (lambda h, w, t: dk.linear_weighted_token_nll(h, w, t, 1.0, z_loss=-1.0), ValueError,
     "z_loss must be finite and >= 0"),
    (lambda h, w, t: dk.linear_weighted_token_nll(h, w, t, 1.0, reduction="avg"), ValueError,
     "reduction must be one of"),
    (lambda h, w, t: dk.linear_token_logprobs(h, w, t, ignore_index=1.5), TypeError,
     "ignore_index must be an int or None"),
])
def test_bad_options_name_themselves(call, exc, match):
    h, w, _, t = _inputs(seed=8)
    with pytest.raises(exc, match=match):
        call(h, w, t)


LOGIT_BACKENDS = [b for b in available_backends() if b in ("torch", "triton", "cpu", "cuda")]


@pytest.mark.parametrize("backend", LOGIT_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sequence_mean"])
def test_logits_ops_ignore_index_and_reductions(backend, reduction):
    """token_logprobs and weighted_token_nll take Hugging Face's -100 labels on every backend:
    0 and no gradient there, and the reductions of the linear ops."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 5, 23, generator=g).to(DEVICE)
    tokens = torch.randint(0, 23, (3, 5), generator=g).to(DEVICE)
    tokens[0, :3] = -100
    tokens[2] = -100
    weights = torch.rand(3, 1, generator=g).to(DEVICE)
    x = logits.clone().requires_grad_()
    loss = dk.weighted_token_nll(x, tokens, weights, reduction=reduction, backend=backend)
    keep = tokens != -100
    x64 = logits.double().requires_grad_()
    lp = torch.log_softmax(x64, -1).gather(-1, torch.where(keep, tokens, 0)[..., None])[..., 0]
    per_token = torch.where(keep, -(weights.double() * lp), 0.0)
    want = {"none": per_token, "sum": per_token.sum(), "mean": per_token.sum() / keep.sum(),
            "sequence_mean": (per_token.sum(-1) / keep.sum(-1).clamp(min=1)).mean()}[reduction]
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    assert bool((x.grad[~keep] == 0).all())
    logp, ent = dk.token_logprobs(logits, tokens, return_entropy=True, backend=backend)
    assert bool((logp[~keep] == 0).all()) and bool((ent[~keep] == 0).all())
    torch.testing.assert_close(logp[keep].double(), lp[keep].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_lm_completion_mask_temperature_and_labels(backend):
    g = torch.Generator().manual_seed(10)
    B, T, D, V = 3, 8, 12, 29
    hidden = (torch.randn(B, T, D, generator=g) * 0.5).to(DEVICE)
    weight = torch.randn(V, D, generator=g).to(DEVICE)
    ids = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    attention = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    attention[2, -3:] = 0
    completion = torch.zeros(B, T, dtype=torch.long, device=DEVICE)
    completion[:, 4:] = 1
    logp, ent = dk.causal_lm_token_logprobs(hidden, weight, ids, attention, return_entropy=True,
                                            completion_mask=completion, temperature=0.6,
                                            softcap=6.0, backend=backend)
    x = 6.0 * torch.tanh((hidden.double()[:, :-1] @ weight.double().T / 0.6) / 6.0)
    lp = torch.log_softmax(x, -1)
    keep = (attention[:, :-1] * attention[:, 1:] * completion[:, 1:]).bool()
    want = torch.where(keep, lp.gather(-1, ids[:, 1:, None])[..., 0], 0.0)
    want_ent = torch.where(keep, -(lp.exp() * lp).sum(-1), 0.0)
    torch.testing.assert_close(logp.double(), want, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=2e-5)
    # Hugging Face labels: -100 wherever the loss should not look, same numbers
    labels = torch.where(completion.bool() & attention.bool(), ids, -100)
    labels[:, 0] = ids[:, 0]  # the first position is never predicted
    via_labels = dk.causal_lm_token_logprobs(hidden, weight, labels, attention, temperature=0.6,
                                             softcap=6.0, backend=backend)
    torch.testing.assert_close(via_labels, logp)


def test_linear_cross_entropy_loss_module_options():
    h, w, b, tokens = _inputs(seed=11)
    loss = dk.LinearCrossEntropyLoss(label_smoothing=0.1, softcap=5.0, z_loss=1e-2)(h, w, tokens,
                                                                                    b)
    x = _logits(h, w, b, 1.0, 5.0)
    keep = tokens != -100
    want = F.cross_entropy(x.flatten(0, -2), tokens.flatten(), label_smoothing=0.1) + 1e-2 * (
        x.logsumexp(-1)[keep] ** 2).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
