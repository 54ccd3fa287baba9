"""The DAPS objective (dvae.daps) against a direct float64 transcription of docs/algorithm.md, and
the optimiser pieces (adaptive clipping, the non-finite skip)."""

import math

import pytest
import torch

import dvae_kernels
from dvae import daps, optim


def _fixed(N=3, K=5, L=4, V=7, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, K, L, d, generator=g)
    weight = torch.randn(V, d, generator=g)
    bias = torch.randn(V, generator=g)
    tokens = torch.randint(0, V, (N, K, L), generator=g)
    tokens[0, 0] = 0  # token 0 is an ordinary token
    logpx = -50 + 5 * torch.randn(N, K, generator=g)
    return hidden, weight, bias, tokens, logpx


def _reference(hidden, weight, bias, tokens, logpx, log_eta, beta, rho, eta=None):
    """§1 steps 2-8 written out in float64, autograd through torch's own ops."""
    logits = hidden @ weight.T + bias
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    logq = lp.sum(-1)
    r = logpx.detach()
    A = r - torch.logsumexp(r, -1, keepdim=True)
    if eta is None:
        eta = log_eta.exp()
    s = (A - beta * logq.detach()) / (eta + beta)
    w = torch.softmax(s, -1)
    ess = 1 / (w ** 2).sum(-1)
    N, K = r.shape
    l_enc = -(w.detach() * logq).sum() / N
    l_dec = -logpx.sum() / (N * K)
    l_eta = (ess.mean() - rho * K) ** 2
    return l_enc, l_dec, l_eta, w, ess


def _fused_available():
    return getattr(dvae_kernels, "linear_weighted_token_nll", None) is not None


@pytest.mark.parametrize("use_logits", [True, False])
def test_losses_match_float64_transcription(use_logits):
    if not use_logits and not _fused_available():
        pytest.skip("dvae_kernels has no fused linear ops yet")
    hidden, weight, bias, tokens, logpx = _fixed()
    beta, rho = 0.3, 0.33
    head = torch.nn.Linear(hidden.shape[-1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    h = hidden.clone().requires_grad_()
    lpx = logpx.clone().requires_grad_()
    log_eta = torch.tensor(math.log(20.0), requires_grad=True)
    terms = daps.daps_losses(lpx, h, head, tokens, log_eta, beta, ess_target=rho,
                             eta_mode="learned", use_logits=use_logits, backend="torch")
    (terms.encoder_loss + terms.decoder_loss + terms.eta_loss).backward()

    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = bias.double().requires_grad_()
    lpx64 = logpx.double().requires_grad_()
    le64 = torch.tensor(math.log(20.0), dtype=torch.float64, requires_grad=True)
    l_enc, l_dec, l_eta, w, ess = _reference(h64, w64, b64, tokens, lpx64, le64, beta, rho)
    (l_enc + l_dec + l_eta).backward()

    def close(a, b, what, tol=2e-5):
        a, b = a.detach().double(), b.detach().double()
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= tol * scale, f"{what}: {a} vs {b}"

    close(terms.encoder_loss, l_enc, "encoder loss")
    close(terms.decoder_loss, l_dec, "decoder loss")
    close(terms.eta_loss, l_eta, "eta loss", tol=1e-4)
    close(terms.weights, w, "weights")
    close(terms.ess, ess, "ess")
    close(h.grad, h64.grad, "d/d hidden")
    close(head.weight.grad, w64.grad, "d/d head weight")
    close(head.bias.grad, b64.grad, "d/d head bias")
    close(lpx.grad, lpx64.grad, "d/d logpx")
    close(log_eta.grad, le64.grad, "d/d log eta", tol=1e-4)
    assert torch.allclose(terms.weights.sum(-1), torch.ones(3))
    assert bool(((terms.ess >= 1 - 1e-5) & (terms.ess <= 5 + 1e-5)).all())


def test_solved_eta_hits_target_and_matches_transcription():
    hidden, weight, bias, tokens, logpx = _fixed(N=4, K=8, seed=1)
    logpx = logpx * 4  # spread the rewards so that the target needs a finite eta
    head = torch.nn.Linear(hidden.shape[-1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    rho, beta = 0.33, 0.1
    terms = daps.daps_losses(logpx, hidden, head, tokens, torch.tensor(0.0), beta,
                             ess_target=rho, eta_mode="solved", use_logits=True,
                             backend="torch")
    assert abs(terms.ess.mean().item() - rho * 8) < 1e-2
    assert terms.eta_loss.item() == 0.0
    _, _, _, w, ess = _reference(hidden.double(), weight.double(), bias.double(), tokens,
                                 logpx.double(), None, beta, rho,
                                 eta=terms.eta.double())
    assert torch.allclose(terms.weights.double(), w, atol=1e-5)


def test_beta_schedule_is_exponential():
    assert daps.beta_at(0, 100, 6.0, 0.01) == pytest.approx(6.0)
    assert daps.beta_at(100, 100, 6.0, 0.01) == pytest.approx(0.01)
    assert daps.beta_at(500, 100, 6.0, 0.01) == pytest.approx(0.01)
    assert daps.beta_at(50, 100, 6.0, 0.01) == pytest.approx(math.sqrt(6.0 * 0.01))


def test_beta_elbo_uses_uniform_prior_kl():
    logpx = torch.tensor([[-10.0, -12.0]])
    entropy = torch.full((1, 2, 3), math.log(4.0)) - 0.5  # KL = 3 * 0.5 per sample
    out = daps.beta_elbo(logpx, entropy, vocab_size=4, beta=2.0)
    assert out.item() == pytest.approx(-11.0 - 2.0 * 1.5)


def test_adaptive_clip_per_unit():
    lin = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 1e-5]]))  # norms 5, ~0
    lin.weight.grad = torch.tensor([[0.0, 30.0, 40.0], [0.0, 2e-4, 0.0]])
    dims = optim.unit_reduce_dims(lin)
    optim.adaptive_clip_(dims, clip=0.5, eps=1e-3)
    g = lin.weight.grad
    # row 0: |g| = 50 > 0.5 * 5 -> rescaled to norm 2.5; row 1: max(|w|, eps) * 0.5 = 5e-4
    assert g[0].norm().item() == pytest.approx(2.5)
    assert torch.allclose(g[0] / g[0].norm(), torch.tensor([0.0, 0.6, 0.8]))
    assert torch.equal(g[1], torch.tensor([0.0, 2e-4, 0.0]))


def test_unit_dims_follow_layer_kinds():
    m = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 3), "conv": torch.nn.Conv2d(2, 4, 3),
                             "up": torch.nn.ConvTranspose2d(4, 2, 4)})
    dims = optim.unit_reduce_dims(m)
    assert dims[m["emb"].weight] == (0,)
    assert dims[m["conv"].weight] == (1, 2, 3)
    assert dims[m["up"].weight] == (0, 2, 3)  # [in, out, kh, kw]: units are outputs
    assert dims[m["conv"].bias] is None


def test_nonfinite_step_is_skipped_without_touching_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = optim.make_adamw([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.ones(3)
    optim.step_unless_nonfinite(opt, optim.nonfinite_flag([p]))
    after_one = p.detach().clone()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    flag = optim.nonfinite_flag([p])
    assert flag.item() == 1.0
    optim.step_unless_nonfinite(opt, flag)
    assert torch.equal(p.detach(), after_one)
    for k, v in opt.state[p].items():
        assert torch.equal(v, state[k]), k
    assert optim.nonfinite_flag([], torch.tensor(float("inf"))).item() == 1.0


@pytest.mark.parametrize("clip,eps", [(1.0, 1e-3), (0.05, 1e-3), (1e-4, 1e-3)])
def test_grouped_adaptive_clip_matches_per_parameter(clip, eps):
    """AdaptiveClip (one index_add over all parameters) = the per-parameter reference, on
    every layer kind, with clipped and unclipped units, a missing gradient, and units whose
    gradient norm is under the 1e-6 floor; float64 reference for the tolerance."""
    from tests.utils import FLOOR

    torch.manual_seed(0)
    m = torch.nn.ModuleDict({"lin": torch.nn.Linear(7, 5), "emb": torch.nn.Embedding(6, 4),
                             "conv": torch.nn.Conv2d(2, 3, 3),
                             "up": torch.nn.ConvTranspose2d(3, 2, 2),
                             "ln": torch.nn.LayerNorm(4), "unused": torch.nn.Linear(2, 2)})
    for name, p in m.named_parameters():
        if not name.startswith("unused"):
            p.grad = torch.randn_like(p) * torch.logspace(-8, 1, p.numel()).view(p.shape)
    with torch.no_grad():
        m["lin"].weight[0].zero_()  # a unit at the eps floor
    dims = optim.unit_reduce_dims(m)
    grads = {p: p.grad.clone() for p in dims if p.grad is not None}
    # float64 reference
    ref = {}
    for p, g in grads.items():
        p64 = torch.nn.Parameter(p.detach().double())
        p64.grad = g.double()
        optim.adaptive_clip_reference_({p64: dims[p]}, clip, eps)
        ref[p] = p64.grad
    # float32 per-parameter reference (the old code path)
    old = {}
    for p, g in grads.items():
        p32 = torch.nn.Parameter(p.detach().clone())
        p32.grad = g.clone()
        optim.adaptive_clip_reference_({p32: dims[p]}, clip, eps)
        old[p] = p32.grad
    clipper = optim.AdaptiveClip(dims, clip, eps, grouped=True)
    clipper()
    assert m["unused"].weight.grad is None
    changed = 0
    for p, g in grads.items():
        changed += int(not torch.equal(old[p], g))
        err = (p.grad.double() - ref[p]).abs().max().item()
        old_err = (old[p].double() - ref[p]).abs().max().item()
        scale = max(1.0, ref[p].abs().max().item())
        assert err <= 2 * old_err + FLOOR[torch.float32] * scale, (err, old_err)
    assert changed > 0  # some units were clipped


def test_grouped_adaptive_clip_kernel_count():
    """A fixed number of ops however many parameters (the reference: about 12 each)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._overloadpacket.__name__
            if name not in ("view", "split", "detach", "_unsafe_view", "slice", "empty",
                            "split_with_sizes", "_reshape_alias"):
                self.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n_layers in (2, 20):
        m = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(n_layers)])
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        clipper = optim.AdaptiveClip(optim.unit_reduce_dims(m), 1.0, grouped=True)
        clipper()  # builds the index maps
        with Count() as c:
            clipper()
        counts.append(c.n)
    assert counts[0] == counts[1] <= 10, counts
