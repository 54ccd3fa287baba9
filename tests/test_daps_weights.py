"""daps_weights and solve_eta against a float64 transcription of docs/algorithm.md, steps 3-6."""

import math

import pytest
import torch
from utils import DEVICE, available_backends

import dvae_kernels as dk

BACKENDS = available_backends()


def reference(rewards, logq, beta, eta):
    r, lq = rewards.double().cpu(), logq.double().cpu()
    if isinstance(eta, torch.Tensor) and eta.device.type != "cpu":
        eta = eta.cpu()
    advantages = r - torch.logsumexp(r, -1, keepdim=True)
    s = (advantages - beta * lq) / (eta + beta)
    w = torch.softmax(s, -1)
    return w, 1 / (w**2).sum(-1)


def batch(N, K, scale=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, lq = torch.randn(N, K, generator=g) * scale, torch.randn(N, K, generator=g) * 5 - 20
    return r.to(DEVICE), lq.to(DEVICE)


# K = 1 (ESS is 1), K = 8 (paper), odd K; N = 1, several tiles of rows.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,K", [(1, 1), (1, 8), (37, 8), (700, 3), (5, 33)])
@pytest.mark.parametrize("beta,eta", [(0.0, 100.0), (0.5, 3.0), (50.0, 1e-3)])
def test_weights_match_float64(backend, N, K, beta, eta):
    r, lq = batch(N, K)
    w, ess = dk.daps_weights(r, lq, beta, eta, backend=backend)
    rw, ress = reference(r, lq, beta, eta)
    assert w.dtype == ess.dtype == torch.float32
    w, ess = w.cpu(), ess.cpu()
    torch.testing.assert_close(w.double(), rw, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(ess.double(), ress, atol=1e-5, rtol=1e-4)
    # Properties: rows sum to 1, ESS in [1, K].
    torch.testing.assert_close(w.sum(-1), torch.ones(N), atol=1e-5, rtol=0)
    assert (ess >= 1 - 1e-5).all() and (ess <= K + 1e-4).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extremes(backend):
    r = torch.tensor([[1e4, -1e4, 0.0, 5.0], [3.0, 3.0, 3.0, 3.0], [float("nan"), 0, 0, 0],
                      [0.0, float("-inf"), 1.0, 2.0]], device=DEVICE)
    lq = torch.zeros(4, 4, device=DEVICE)
    w, ess = dk.daps_weights(r, lq, 0.0, 1.0, backend=backend)
    w, ess = w.cpu(), ess.cpu()
    assert w[0, 0] == 1 and ess[0] == 1
    torch.testing.assert_close(w[1], torch.full((4,), 0.25))
    assert ess[1] == pytest.approx(4.0)
    assert w[2].isnan().all() and ess[2].isnan()
    assert w[3, 1] == 0 and w[3].sum() == pytest.approx(1.0)
    z = torch.zeros(0, 8, device=DEVICE)
    empty = dk.daps_weights(z, z, 0.1, 1.0, backend=backend)
    assert empty[0].shape == (0, 8) and empty[1].shape == (0,)


def test_gradient_in_eta_matches_float64():
    r, lq = batch(6, 8)
    eta = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    r, lq = r.cpu(), lq.cpu()
    f = lambda eta: dk.daps_weights(r.double(), lq.double(), 0.3, eta, backend="torch")
    assert torch.autograd.gradcheck(f, (eta,))
    for backend in BACKENDS:
        e32 = torch.tensor(7.0, device=DEVICE, requires_grad=True)
        w, ess = dk.daps_weights(r.to(DEVICE), lq.to(DEVICE), 0.3, e32, backend=backend)
        w, ess = w.cpu(), ess.cpu()
        ((ess.mean() - 2.64) ** 2 + (w * torch.arange(8.0)).sum()).backward()
        e64 = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
        rw, ress = reference(r, lq, 0.3, e64)
        ((ress.mean() - 2.64) ** 2 + (rw * torch.arange(8.0)).sum()).backward()
        assert e32.grad.item() == pytest.approx(e64.grad.item(), rel=1e-3, abs=1e-6), backend


def test_learned_eta_reaches_target():
    # The paper's mode: log eta trained by Adam on (mean ESS - rho K)^2 hits the target.
    r, lq = batch(64, 8)
    r, lq = r.cpu(), lq.cpu()
    log_eta = torch.tensor(math.log(100.0), requires_grad=True)
    opt = torch.optim.Adam([log_eta], lr=0.05)
    for _ in range(400):
        _, ess = dk.daps_weights(r, lq, 0.0, log_eta.exp(), backend="torch")
        loss = (ess.mean() - 0.33 * 8) ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ess.mean().item() == pytest.approx(0.33 * 8, abs=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,K,rho,beta", [(64, 8, 0.33, 0.0), (3, 8, 0.25, 2.0),
                                          (600, 8, 0.5, 0.1), (9, 100, 0.2, 0.0)])
def test_solved_eta_hits_target(backend, N, K, rho, beta):
    # N = 600 runs Triton's streaming (non-resident) path.
    r, lq = batch(N, K)
    eta = dk.solve_eta(r, lq, beta, rho, backend=backend)
    assert eta.shape == () and eta.dtype == torch.float32
    _, ess = reference(r, lq, beta, eta.double())
    assert ess.mean().item() == pytest.approx(rho * K, rel=1e-3)
    # Smallest such eta: a little less misses the target.
    _, ess_lo = reference(r, lq, beta, eta.double() * 0.99)
    assert ess_lo.mean().item() < rho * K
    ref_eta = dk.solve_eta(r.double(), lq.double(), beta, rho, backend="torch")
    assert eta.item() == pytest.approx(ref_eta.item(), rel=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_solve_eta_edge_cases(backend):
    # Identical samples in every row: every eta meets the target -> eta_min.
    same = torch.ones(4, 8, device=DEVICE)
    assert dk.solve_eta(same, same, 0.0, 0.3, backend=backend).item() == pytest.approx(1e-6)
    # K = 1: ESS is 1 = K for every eta.
    one = torch.randn(5, 1, device=DEVICE)
    assert dk.solve_eta(one, one, 0.0, 1.0, backend=backend).item() == pytest.approx(1e-6)
    # Unreachable: target K while the rows differ -> eta_max.
    r, lq = batch(6, 8)
    assert dk.solve_eta(r, lq, 0.0, 1.0, eta_max=1e4, backend=backend).item() == \
        pytest.approx(1e4)
    # Empty batch -> eta_max; NaN in the batch -> NaN.
    z = torch.zeros(0, 8, device=DEVICE)
    assert dk.solve_eta(z, z, 0.0, 0.3, backend=backend).item() == pytest.approx(1e12)
    r[2, 3] = float("nan")
    assert dk.solve_eta(r, lq, 0.0, 0.3, backend=backend).isnan()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    from dvae_kernels.daps_weights import _op as weights_op
    from dvae_kernels.solve_eta import _op as solve_op

    r, lq = batch(5, 8)
    eta = torch.tensor(3.0, requires_grad=True)
    eta = eta.to(DEVICE).detach().requires_grad_()
    beta = torch.tensor(0.5, device=DEVICE)
    torch.library.opcheck(weights_op, (r, lq, beta, eta, backend))
    torch.library.opcheck(solve_op, (r, lq, beta, 0.3, 1e-6, 1e12, backend))
