"""torch.func over the ops: ``grad``, ``jacrev`` and ``vmap`` (per-sample gradients) give what
plain autograd gives, sample by sample; the samplers refuse with one clear error."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jacrev, vmap

import dvae_kernels as dk


def _per_sample(loss, params, *batched):
    """vmap(grad(loss)) over the batch against a loop of torch.autograd.grad."""
    got = vmap(grad(loss), in_dims=(None,) + (0,) * len(batched))(params, *batched)
    want = torch.stack([_autograd(loss, params, *(b[i] for b in batched))
                        for i in range(batched[0].shape[0])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _autograd(loss, params, *args):
    p = params.detach().requires_grad_()
    return torch.autograd.grad(loss(p, *args), p)[0]


def test_token_logprobs_and_weighted_nll():
    logits = torch.randn(4, 6, 11)
    tokens = torch.randint(0, 11, (4, 6))
    tokens[1, :2] = -100
    w = torch.rand(4, 6)
    f = lambda x, t: (dk.token_logprobs(x, t) * torch.arange(1.0, 7.0)).sum()
    got = vmap(grad(f))(logits, tokens)
    want = torch.stack([_autograd(f, logits[i], tokens[i]) for i in range(4)])
    torch.testing.assert_close(got, want)
    assert bool((got[1, :2] == 0).all())  # ignored positions: no gradient
    g = grad(lambda x: dk.weighted_token_nll(x, tokens, w, reduction="mean"))(logits)
    torch.testing.assert_close(g, _autograd(
        lambda x: dk.weighted_token_nll(x, tokens, w, reduction="mean"), logits))
    ent_jac = jacrev(lambda x: dk.token_logprobs(x[0], tokens[0], return_entropy=True)[1])(
        logits)
    assert ent_jac.shape == (6, 4, 6, 11)


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "softcap": 3.0},
                                     {"label_smoothing": 0.1, "z_loss": 1e-2}])
def test_linear_per_sample_gradients(options):
    """Per-sample gradients of the head weight: what DP-SGD and influence functions need."""
    weight = torch.randn(13, 8)
    hidden = torch.randn(5, 3, 8)
    tokens = torch.randint(0, 13, (5, 3))
    tokens[2, 0] = -100

    def loss(w, h, t):
        return dk.linear_weighted_token_nll(h, w, t, 1.0, reduction="sum", **options)

    _per_sample(loss, weight, hidden, tokens)


def test_head_and_daps_ops():
    head = dk.FusedCategoricalHead(8, 13)
    h, t = torch.randn(4, 8), torch.randint(0, 13, (4,))
    params = dict(head.named_parameters())
    g = grad(lambda p: torch.func.functional_call(head, p, (h,), {"targets": t}).sum())(params)
    head.zero_grad()
    head(h, targets=t).sum().backward()
    torch.testing.assert_close(g["weight"], head.weight.grad)
    # daps_weights: the ESS is differentiable in eta; solve_eta under vmap solves each batch
    r, q = torch.randn(3, 4, 8) * 5, torch.randn(3, 4, 8)
    d_eta = grad(lambda e: dk.daps_weights(r[0], q[0], 0.1, e)[1].mean())(torch.tensor(2.0))
    eta = torch.tensor(2.0, requires_grad=True)
    dk.daps_weights(r[0], q[0], 0.1, eta)[1].mean().backward()
    torch.testing.assert_close(d_eta, eta.grad)
    etas = vmap(lambda rr, qq: dk.solve_eta(rr, qq, 0.1, 0.5))(r, q)
    want = torch.stack([dk.solve_eta(r[i], q[i], 0.1, 0.5, backend="torch") for i in range(3)])
    torch.testing.assert_close(etas, want)


def test_samplers_refuse_with_what_to_do():
    with pytest.raises(RuntimeError, match="sample outside the transform and pass the tokens"):
        vmap(lambda x: dk.sample_tokens(x))(torch.randn(2, 3, 5))
    w = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="linear_sample_tokens under a torch.func"):
        vmap(lambda h: dk.linear_sample_tokens(h, w))(torch.randn(2, 3, 4))
