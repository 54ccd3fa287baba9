"""dvae_kernels.policy against float64 transcriptions of the losses on materialised logits:
GRPO and PPO as TRL computes them, the DAPS update as docs/algorithm.md states it (steps 3-7),
forward and gradients, on every backend of the linear ops."""

from __future__ import annotations

import pytest
import torch
from utils import DEVICE, available_backends

from dvae_kernels import policy

BACKENDS = [b for b in available_backends() if b in ("torch", "triton", "cpu")]
B, T, D, V = 6, 7, 10, 19


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64) * 0.7
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[1, -2:] = 0  # right padding
    attention[4, 0] = 0    # left padding
    completion = torch.zeros(B, T, dtype=torch.long)
    completion[:, 3:] = 1  # prompt of three tokens
    old = torch.randn(B, T - 1, generator=g, dtype=torch.float64) * 0.1 - 2.5
    ref = torch.randn(B, T - 1, generator=g, dtype=torch.float64) * 0.1 - 2.5
    return [t.to(DEVICE) for t in (hidden, weight, ids, attention, completion, old, ref)]


def _logp64(hidden, weight, ids, temperature):
    logits = hidden[:, :-1] @ weight.T / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0], logits


def _trl(hidden, weight, ids, attention, completion, old, ref, adv, kl_coef, eps, eps_high,
         ent_coef, temperature, loss_type):
    """TRL's GRPO/PPO loss, written out on the materialised logits."""
    logp, logits = _logp64(hidden, weight, ids, temperature)
    mask = (attention[:, :-1] * attention[:, 1:] * completion[:, 1:]).bool()
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(logp - (old if old is not None else logp.detach()))
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps_high) * adv)
    if kl_coef:
        per_token = per_token + kl_coef * (torch.exp(ref - logp) - (ref - logp) - 1)
    if ent_coef:
        lp = torch.log_softmax(logits, -1)
        per_token = per_token - ent_coef * -(lp.exp() * lp).sum(-1)
    per_token = per_token * mask
    if loss_type == "grpo":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type in ("bnpo", "token_mean"):
        return per_token.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return per_token.sum() / per_token.numel()
    return per_token.sum()


def _compare(backend, fn, ref_fn, hidden, weight, tol=2e-5):
    h32, w32 = (hidden.float().requires_grad_(), weight.float().requires_grad_())
    out = fn(h32, w32)
    loss = out.loss if hasattr(out, "loss") else out
    loss.backward()
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = ref_fn(h64, w64)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(h32.grad.double(), h64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w32.grad.double(), w64.grad, rtol=tol, atol=tol)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "sum"])
def test_grpo_matches_trl(backend, loss_type):
    hidden, weight, ids, att, comp, old, ref = _batch()
    adv = torch.randn(B, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(attention_mask=att, completion_mask=comp, old_logp=old.float(),
              ref_logp=ref.float(), kl_coef=0.04, epsilon=0.2, epsilon_high=0.28,
              temperature=0.9, loss_type=loss_type, backend=backend)
    out = _compare(backend,
                   lambda h, w: policy.grpo_loss(h, w, ids, adv.float(), **kw),
                   lambda h, w: _trl(h, w, ids, att, comp, old, ref, adv, 0.04, 0.2, 0.28, 0.0,
                                     0.9, loss_type), hidden, weight)
    mask = (att[:, :-1] * att[:, 1:] * comp[:, 1:]).bool()
    assert torch.equal(out.mask, mask) and bool((out.logp[~mask] == 0).all())
    assert bool(out.clipped.any()) and not bool(out.clipped[~mask].any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_with_per_token_advantages_and_entropy_bonus(backend):
    hidden, weight, ids, att, comp, old, ref = _batch(seed=1)
    adv = torch.randn(B, T - 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = _compare(backend,
                   lambda h, w: policy.ppo_loss(h, w, ids, adv.float(), attention_mask=att,
                                                completion_mask=comp, old_logp=old.float(),
                                                entropy_coef=0.01, backend=backend),
                   lambda h, w: _trl(h, w, ids, att, comp, old, ref, adv, 0.0, 0.2, 0.2, 0.01,
                                     1.0, "token_mean"), hidden, weight)
    assert bool((out.entropy[out.mask] > 0).all())


def test_on_policy_ratio_is_one_and_the_gradient_is_reinforce():
    """Without old_logp the ratio is 1 (never clipped) and the gradient is -A·∇logp."""
    hidden, weight, ids, att, comp, _, _ = _batch(seed=2)
    adv = torch.randn(B, dtype=torch.float64)
    out = _compare("torch",
                   lambda h, w: policy.grpo_loss(h, w, ids, adv.float(), attention_mask=att,
                                                 completion_mask=comp, loss_type="sum"),
                   lambda h, w: _reinforce(_logp64(h, w, ids, 1.0)[0], adv,
                                           att[:, :-1] * att[:, 1:] * comp[:, 1:]),
                   hidden, weight)
    assert not bool(out.clipped.any())


def _reinforce(logp, adv, mask):
    """-Σ A·r with r = exp(logp - sg(logp)) = 1: the value -Σ A, the gradient -Σ A·∇logp."""
    return -(adv[:, None] * torch.exp(logp - logp.detach()) * mask).sum()


def _daps64(hidden, weight, ids, att, comp, rewards, beta, eta):
    logp, _ = _logp64(hidden, weight, ids, 1.0)
    mask = att[:, :-1] * att[:, 1:] * comp[:, 1:]
    logq = (logp * mask).sum(-1).view(rewards.shape)
    adv = rewards - rewards.logsumexp(-1, keepdim=True)
    w = torch.softmax((adv - beta * logq.detach()) / (eta + beta), -1)
    ess = 1 / (w ** 2).sum(-1)
    return -(w.detach() * logq).sum() / rewards.shape[0], w, ess


@pytest.mark.parametrize("backend", BACKENDS)
def test_daps_policy_loss_solved_eta(backend):
    hidden, weight, ids, att, comp, _, _ = _batch(seed=5)
    rewards = torch.randn(2, 3, generator=torch.Generator().manual_seed(6),
                          dtype=torch.float64) * 4
    out = policy.daps_policy_loss(hidden.float(), weight.float(), ids, rewards.float(),
                                  attention_mask=att, completion_mask=comp, beta=0.1,
                                  ess_target=0.5, backend=backend)
    eta = out.eta.double()
    assert abs(out.ess.mean().item() - 0.5 * 3) < 1e-3  # the trust region holds
    _compare(backend,
             lambda h, w: policy.daps_policy_loss(h, w, ids, rewards.float(), attention_mask=att,
                                                  completion_mask=comp, beta=0.1,
                                                  eta=float(eta), backend=backend),
             lambda h, w: _daps64(h, w, ids, att, comp, rewards, 0.1, eta)[0], hidden, weight)
    _, w64, ess64 = _daps64(hidden, weight, ids, att, comp, rewards, 0.1, eta)
    torch.testing.assert_close(out.weights.double(), w64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.ess.double(), ess64, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.eta_loss, torch.zeros(()))


def test_daps_policy_loss_learned_eta_gets_its_gradient():
    hidden, weight, ids, att, comp, _, _ = _batch(seed=7)
    rewards = torch.randn(2, 3, dtype=torch.float64) * 4
    log_eta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    out = policy.daps_policy_loss(hidden.float(), weight.float(), ids, rewards.float(),
                                  attention_mask=att, completion_mask=comp,
                                  eta=log_eta.exp().float(), ess_target=0.33)
    out.eta_loss.backward()
    le = log_eta.detach().clone().requires_grad_()
    _, _, ess = _daps64(hidden, weight, ids, att, comp, rewards, 0.0, le.exp())
    ((ess.mean() - 0.33 * 3) ** 2).backward()
    torch.testing.assert_close(log_eta.grad, le.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("call,exc,match", [
    (lambda b: policy.grpo_loss(*b[:2], b[2], torch.zeros(B, T - 1)), ValueError,
     r"grpo_loss: advantages must be \[B\]"),
    (lambda b: policy.ppo_loss(*b[:2], b[2], torch.zeros(B + 1)), ValueError,
     r"advantages must be \[B\] = \[6\]"),
    (lambda b: policy.ppo_loss(*b[:2], b[2], torch.zeros(B), old_logp=torch.zeros(B, T)),
     ValueError, r"old_logp must be \[B, T-1\]"),
    (lambda b: policy.grpo_loss(*b[:2], b[2], torch.zeros(B), kl_coef=0.1), ValueError,
     "kl_coef > 0 needs ref_logp"),
    (lambda b: policy.grpo_loss(*b[:2], b[2], torch.zeros(B), loss_type="mean"), ValueError,
     "loss_type must be one of"),
    (lambda b: policy.daps_policy_loss(*b[:2], b[2], torch.zeros(4, 2)), ValueError,
     r"input_ids must be \[P·K, T\] = \[8, T\]"),
])
def test_errors_name_the_argument(call, exc, match):
    hidden, weight, ids, *_ = _batch()
    with pytest.raises(exc, match=match):
        call((hidden.float(), weight.float(), ids))
