"""The C++ extension (csrc/): the ``cpu`` backend against float64 on the shape grid of
docs/conventions.md#testing, its input checks, how it is chosen, and the package without it.

The ``cuda`` backend runs the same tests on a GPU machine (marked ``gpu``; skipped here).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from utils import DTYPES, assert_close_to_reference

import dvae_kernels as dk
from dvae_kernels import _csrc, _dispatch

CPU_REASON = _csrc.unavailable("cpu")
needs_cpu = pytest.mark.skipif(CPU_REASON is not None,
                               reason=f"cpu backend unavailable: {CPU_REASON}")
NAN, INF = float("nan"), float("inf")

# Devices the native backends can be tested on here: the CPU when built, CUDA with a GPU.
NATIVE = [pytest.param("cpu", marks=needs_cpu),
          pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
              _csrc.unavailable("cuda") is not None,
              reason=f"cuda backend unavailable: {_csrc.unavailable('cuda')}")])]


def _tl_reference(x64, tokens):
    lp = torch.log_softmax(x64, -1)
    logp = lp.gather(-1, tokens.long()[..., None])[..., 0]
    p = lp.exp()
    return logp, -torch.where(p == 0, 0.0, p * lp).sum(-1)


def _grads(shape):
    g1 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    g2 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    return g1, g2


def check_token_logprobs(logits, tokens, backend, dtype, *, grads=True):
    """logp, entropy and the gradient through both, vs float64; tolerance from the torch
    backend's own error in ``dtype`` (tests/utils.py)."""
    dev = "cuda" if backend == "cuda" else "cpu"
    x = logits.to(dtype)
    g1, g2 = _grads(tokens.shape)
    outs = {}
    for name in (backend, "torch"):
        xi = x.detach().clone().to(dev).requires_grad_(grads)
        logp, ent = dk.token_logprobs(xi, tokens.to(dev), return_entropy=True, backend=name)
        assert logp.dtype == ent.dtype == torch.float32 and logp.shape == tokens.shape
        if grads:
            (logp.nan_to_num() * g1.to(dev) + ent.nan_to_num() * g2.to(dev)).sum().backward()
            assert xi.grad.dtype == dtype and xi.grad.shape == x.shape
        outs[name] = [t.cpu() if t is not None else None for t in (logp, ent, xi.grad)]
    x64 = x.detach().double()
    ref_logp, ref_ent = _tl_reference(x64, tokens)
    assert_close_to_reference(outs[backend][0], ref_logp, outs["torch"][0], dtype, "logp")
    assert_close_to_reference(outs[backend][1], ref_ent, outs["torch"][1], dtype, "entropy")
    if grads:
        # Written out rather than autograd: autograd through where(p == 0, 0, p·log p) gives
        # NaN for -inf logits. nan_to_num passes no gradient where its input is not finite.
        g_lp = g1.double() * ref_logp.isfinite()
        g_h = g2.double() * ref_ent.isfinite()
        lp = torch.log_softmax(x64, -1)
        p = lp.exp()
        onehot = torch.zeros_like(p).scatter_(-1, tokens.long()[..., None], 1.0)
        term = torch.where(p == 0, 0.0, p * (lp + ref_ent[..., None]))
        ref_grad = g_lp[..., None] * (onehot - p) - g_h[..., None] * term
        assert_close_to_reference(outs[backend][2], ref_grad, outs["torch"][2], dtype, "grad")


def check_weighted_nll(logits, tokens, weights, backend, dtype, *, grads=True):
    dev = "cuda" if backend == "cuda" else "cpu"
    x = logits.to(dtype)
    outs = {}
    for name in (backend, "torch"):
        xi = x.detach().clone().to(dev).requires_grad_(grads)
        with torch.set_grad_enabled(grads):
            loss = dk.weighted_token_nll(xi, tokens.to(dev), weights.to(dev), reduction="none",
                                         backend=name)
        assert loss.dtype == torch.float32 and loss.shape == tokens.shape
        if grads:
            loss.nan_to_num().sum().backward()
        outs[name] = (loss.detach().cpu(), xi.grad.cpu() if grads else None)
    x64 = x.detach().double().requires_grad_(grads)
    lp = torch.log_softmax(x64, -1).gather(-1, tokens.long()[..., None])[..., 0]
    ref = -weights.double() * lp
    assert_close_to_reference(outs[backend][0], ref, outs["torch"][0], dtype, "loss")
    if grads:
        ref.nan_to_num().sum().backward()
        assert outs[backend][1].dtype == dtype
        assert_close_to_reference(outs[backend][1], x64.grad, outs["torch"][1], dtype, "grad")


# ------------------------------------------------------------------------------ the shape grid

# V not a power of two (1, 3, 1000, 1023), batch 1, rows longer than one 4096-value chunk of the
# C++ kernels (5000: the online rescaling across chunks; 50257: GPT-2's vocabulary, few rows),
# several leading dimensions.
SHAPES = [(1, 1), (1, 3), (6, 1000), (2, 3, 1023), (3, 5000), (2, 50257)]


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_token_logprobs_grid(backend, dtype, shape):
    logits = torch.randn(shape) * 3
    tokens = torch.randint(0, shape[-1], shape[:-1])
    check_token_logprobs(logits, tokens, backend, dtype)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_weighted_token_nll_grid(backend, dtype, shape):
    logits = torch.randn(shape) * 3
    tokens = torch.randint(0, shape[-1], shape[:-1])
    weights = torch.randn(shape[:-1])
    weights.view(-1)[0] = 0.0  # a zero weight: zero loss and zero gradient row
    check_weighted_nll(logits, tokens, weights, backend, dtype)
    check_weighted_nll(logits, tokens, weights, backend, dtype, grads=False)


def _extreme_rows(V):
    """Rows that bite (all representable in float16 too) (V > 8192, so that they span three C++ chunks):
    0 ±1e4 (cancellation in the entropy); 1 -inf on all but one entry; 2 all -inf (NaN);
    3 one NaN (NaN row); 4 one +inf (NaN row); 5 the maximum in the last chunk, far above the
    first chunk's (the running sums are rescaled); 6 a first chunk of -inf then values near
    -1e4 (no overflow when the first finite maximum appears); 7 a -inf at the token."""
    x = torch.randn(8, V)
    x[0] = torch.where(torch.rand(V) > 0.5, 1e4, -1e4)
    x[1] = -INF
    x[1, V - 3] = 2.0
    x[2] = -INF
    x[3, V // 2] = NAN
    x[4, 7] = INF
    x[5, :4096] = -60.0
    x[5, V - 2] = 40.0
    x[6, :4096] = -INF
    x[6, 4096:] = -1e4 + torch.randn(V - 4096)
    x[7, 11] = -INF
    t = torch.randint(0, V, (8,))
    t[1], t[7] = V - 3, 11
    return x, t


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_extremes(backend, dtype):
    x, t = _extreme_rows(9001)
    check_token_logprobs(x, t, backend, dtype, grads=False)
    dev = "cuda" if backend == "cuda" else "cpu"
    logp, ent = dk.token_logprobs(x.to(dtype).to(dev), t.to(dev), return_entropy=True,
                                  backend=backend)
    logp, ent = logp.cpu(), ent.cpu()
    assert logp[1] == 0 and ent[1] == 0
    assert logp[7] == -INF
    assert logp[2:5].isnan().all() and ent[2:5].isnan().all()
    assert logp[[0, 1, 5, 6, 7]].isfinite().sum() == 4 and ent[[0, 1, 5, 6]].isfinite().all()
    # Gradients: finite wherever the row is finite, NaN on the NaN rows.
    rows = [0, 1, 5, 6, 7]
    xi = x[rows].to(dtype).to(dev).requires_grad_()
    lp, h = dk.token_logprobs(xi, t[rows].to(dev), return_entropy=True, backend=backend)
    (lp.nan_to_num(0.0, 0.0, 0.0) + h).sum().backward()
    assert xi.grad.isfinite().all()
    check_token_logprobs(x[rows], t[rows], backend, dtype)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_token_nll_extremes(backend, dtype):
    x, t = _extreme_rows(9001)
    w = torch.rand(8) + 0.5
    keep = [0, 1, 2, 3, 4, 5, 6]  # row 7's -inf token gives an infinite loss: checked below
    check_weighted_nll(x[keep], t[keep], w[keep], backend, dtype)
    dev = "cuda" if backend == "cuda" else "cpu"
    loss = dk.weighted_token_nll(x.to(dtype).to(dev), t.to(dev), w.to(dev), reduction="none",
                                 backend=backend).cpu()
    assert loss[2:5].isnan().all() and loss[7] == INF and loss[1] == 0


@pytest.mark.parametrize("backend", NATIVE)
def test_empty_noncontiguous_int32_and_partial_gradients(backend):
    dev = "cuda" if backend == "cuda" else "cpu"
    empty = torch.randn(0, 11, device=dev, requires_grad=True)
    out = dk.token_logprobs(empty, torch.zeros(0, dtype=torch.long, device=dev), backend=backend)
    assert out.shape == (0,)
    out.sum().backward()
    assert empty.grad.shape == (0, 11)
    loss = dk.weighted_token_nll(empty, torch.zeros(0, dtype=torch.long, device=dev), 1.0,
                                 backend=backend)
    assert loss.item() == 0.0
    # Row stride != V with unit column stride (served in place), and a transposed view
    # (copied by the wrapper); int32 tokens.
    sliced = torch.randn(5, 1040)[:, :1023]
    tokens = torch.randint(0, 1023, (5,), dtype=torch.int32)
    for dtype in DTYPES:
        check_token_logprobs(sliced, tokens, backend, dtype)
        check_weighted_nll(sliced, tokens, torch.rand(5), backend, dtype)
    transposed = torch.randn(40, 4, 3).transpose(0, 2)  # [3, 4, 40], column stride 12
    t3 = torch.randint(0, 40, (3, 4), dtype=torch.int32)
    check_token_logprobs(transposed, t3, backend, torch.float32)
    # Only one output differentiated: the other term is skipped, not multiplied by zero
    # (which would turn a NaN row's zero gradient into NaN).
    x = torch.randn(4, 300, device=dev)
    x[2, 0] = NAN
    tok = torch.randint(0, 300, (4,), device=dev)
    for use in ("logp", "entropy", "sum"):
        grads = {}
        for name in (backend, "torch"):
            xi = x.clone().requires_grad_()
            lp, h = dk.token_logprobs(xi, tok, return_entropy=True, backend=name)
            # .sum() hands the backward an expanded (stride 0) gradient.
            (lp.sum() if use == "logp" else h.sum() if use == "entropy" else (lp + h).sum()
             ).backward()
            grads[name] = xi.grad
        torch.testing.assert_close(grads[backend], grads["torch"], atol=2e-6, rtol=1e-5,
                                   equal_nan=True)


# ------------------------------------------------------------------ daps_weights and solve_eta


def _daps_inputs(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(N, K, generator=g) * 30 - 500
    logq = -torch.rand(N, K, generator=g) * 80
    return rewards, logq


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("N,K", [(0, 8), (1, 1), (1, 8), (64, 8), (5, 3), (3, 1000)])
@pytest.mark.parametrize("beta,eta", [(0.5, 100.0), (0.0, 1e-3), (6.0, 1e6)])
def test_daps_weights_grid(backend, N, K, beta, eta):
    dev = "cuda" if backend == "cuda" else "cpu"
    rewards, logq = _daps_inputs(N, K)
    if N >= 3:  # a row with a -inf reward (weight 0), an all -inf row and a NaN row: NaN
        rewards[0, 0] = -INF
        rewards[1] = -INF
        logq[2, -1] = NAN
    w, ess = dk.daps_weights(rewards.to(dev), logq.to(dev), beta, eta, backend=backend)
    tw, tess = dk.daps_weights(rewards, logq, beta, eta, backend="torch")
    rw, ress = dk.daps_weights(rewards.double(), logq.double(), beta, eta, backend="torch")
    assert w.dtype == ess.dtype == torch.float32 and w.shape == (N, K) and ess.shape == (N,)
    assert_close_to_reference(w.cpu(), rw, tw, torch.float32, "weights")
    assert_close_to_reference(ess.cpu(), ress, tess, torch.float32, "ess")
    fin = ess.isfinite()
    if N > 0 and K > 0 and fin.any():  # properties: rows sum to 1, ESS in [1, K]
        torch.testing.assert_close(w[fin].sum(-1), torch.ones_like(ess[fin]), atol=1e-5, rtol=0)
        assert (ess[fin] >= 1 - 1e-4).all() and (ess[fin] <= K + 1e-3).all()


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("N,K", [(64, 8), (7, 3), (256, 16), (3, 1000), (5000, 16)])
@pytest.mark.parametrize("ess_target", [0.25, 0.33, 0.9])
def test_solve_eta_matches_torch_and_hits_target(backend, N, K, ess_target):
    dev = "cuda" if backend == "cuda" else "cpu"
    rewards, logq = _daps_inputs(N, K, seed=N)
    beta = 0.5
    eta = dk.solve_eta(rewards.to(dev), logq.to(dev), beta, ess_target, backend=backend)
    eta_torch = dk.solve_eta(rewards, logq, beta, ess_target, backend="torch")
    assert eta.shape == () and eta.dtype == torch.float32 and eta.device.type == dev
    # The same bisection in float32: equal up to the rounding of the mean ESS near the target.
    torch.testing.assert_close(eta.cpu(), eta_torch, rtol=1e-4, atol=0)
    _, ess = dk.daps_weights(rewards.double(), logq.double(), beta, eta.cpu().double(),
                             backend="torch")
    target = ess_target * K
    assert ess.mean().item() >= target * (1 - 1e-4) or eta.item() >= 1e12 * (1 - 1e-6)
    if 1e-6 * 1.01 < eta.item() < 1e12:  # an interior solution: just below it, the target fails
        _, ess_lower = dk.daps_weights(rewards.double(), logq.double(), beta,
                                       eta.cpu().double() * (1 - 1e-3), backend="torch")
        assert ess_lower.mean().item() <= target * (1 + 1e-4)


@pytest.mark.parametrize("backend", NATIVE)
def test_solve_eta_edge_cases(backend):
    dev = "cuda" if backend == "cuda" else "cpu"
    r, lq = _daps_inputs(4, 8)
    solve = lambda r, lq, **kw: dk.solve_eta(r.to(dev), lq.to(dev), 0.5, 0.33, backend=backend,
                                             **kw).item()
    assert solve(r[:0], lq[:0]) == pytest.approx(1e12, rel=1e-6)  # empty batch: eta_max
    bad = r.clone()
    bad[1, 2] = NAN
    assert torch.isnan(torch.tensor(solve(bad, lq)))  # NaN input: NaN
    # K = 1: every eta gives ESS = 1 = K, the target is met everywhere: eta_min.
    assert solve(r[:, :1], lq[:, :1], eta_min=1e-3) == pytest.approx(1e-3, rel=1e-5)
    # An unreachable target (mean ESS at eta_max is below it) gives eta_max: 0.33·K with
    # eta_max so small that the weights stay sharp.
    assert solve(r * 1e3, lq, eta_max=1e-3, eta_min=1e-6) == pytest.approx(1e-3, rel=1e-6)


# ------------------------------------------------------------------------ checks and dispatch


@needs_cpu
def test_cpp_checks_name_the_problem():
    ops = _csrc.ops()
    x = torch.randn(3, 5)
    t = torch.zeros(3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="float64"):
        ops.token_logprobs_fwd(x.double(), t)
    with pytest.raises(RuntimeError, match=r"tokens must have R = 3"):
        ops.token_logprobs_fwd(x, t[:2])
    with pytest.raises(RuntimeError, match="int64 or int32"):
        ops.token_logprobs_fwd(x, t.float())
    with pytest.raises(RuntimeError, match="unit stride along V"):
        ops.token_logprobs_fwd(torch.randn(5, 3).t(), t)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        ops.token_logprobs_bwd(torch.ones(3), None, x, t, torch.zeros(2), torch.zeros(3))
    with pytest.raises(RuntimeError, match="weights must be float32"):
        ops.weighted_token_nll_fwd(x, t, torch.ones(3, dtype=torch.float64), True)
    with pytest.raises(RuntimeError, match="logq must have the shape of rewards"):
        ops.daps_weights_fwd(x, x[:2], torch.tensor(0.5), torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="ess_target must be a fraction"):
        ops.solve_eta_fwd(x, x, torch.tensor(0.5), 1.5, 1e-6, 1e12)


@needs_cpu
def test_automatic_choice_and_float64_refusal():
    op = _dispatch.OPS["token_logprobs"]
    x = torch.randn(2, 7)
    t = torch.zeros(2, dtype=torch.long)
    assert op.select(None, x.device, logits=x, tokens=t) == "cpu"
    # float64 is refused by cpu with its reason; the automatic choice falls back to torch.
    assert op.select(None, x.device, logits=x.double(), tokens=t) == "torch"
    with pytest.raises(dk.BackendError, match="float64 logits are served by the torch"):
        dk.token_logprobs(x.double(), t, backend="cpu")
    with pytest.raises(dk.BackendError, match="float64 rewards"):
        dk.daps_weights(x.double(), x.double(), 0.5, 1.0, backend="cpu")


@needs_cpu
def test_build_record_beside_the_library():
    info = _csrc.build_info()
    assert info is not None and "cpu" in info["parts"]
    assert info["torch"] == torch.__version__
    assert not _csrc.load_errors()


def test_load_failure_is_explained(monkeypatch):
    """A built library that will not load (a torch upgrade since the build) turns the native
    backends off with the build record in the reason; the package keeps working."""
    record = {"torch": "0.0.0-built-elsewhere", "cuda": "12.1", "archs": "8.0",
              "parts": ["cpu", "cuda"], "skipped": {}}
    monkeypatch.setattr(_csrc, "_read_build_info", lambda: record)
    monkeypatch.setattr(_csrc, "_has_library", lambda module: True)
    monkeypatch.setattr(_csrc, "_import", lambda module: "OSError: undefined symbol: _ZN3c10")
    monkeypatch.delenv(_csrc.ENV_VAR, raising=False)
    info, reasons, errors = _csrc._load()
    assert errors == {"dvae_kernels._C": "OSError: undefined symbol: _ZN3c10"}
    for name in ("cpu", "cuda"):
        assert "undefined symbol" in reasons[name]
        assert "0.0.0-built-elsewhere" in reasons[name] and "archs 8.0" in reasons[name]
    # A record that lists no parts (a pure-Python reinstall) keeps old libraries unloaded.
    monkeypatch.setattr(_csrc, "_read_build_info",
                        lambda: {"parts": [], "skipped": {"all": "DVAE_KERNELS_BUILD_CPU=0 "
                                                                 "and DVAE_KERNELS_BUILD_CUDA=0"}})
    _, reasons, errors = _csrc._load()
    assert not errors and "DVAE_KERNELS_BUILD_CPU=0" in reasons["cpu"]


def test_package_works_without_the_extension():
    """With loading switched off (as without a build), everything runs through torch and an
    explicit native backend is refused with the reason."""
    code = (
        "import torch, dvae_kernels as dk\n"
        "from dvae_kernels import _csrc\n"
        "assert 'DVAE_KERNELS_LOAD_NATIVE=0' in _csrc.unavailable('cpu'), _csrc.unavailable('cpu')\n"
        "x = torch.randn(4, 9, requires_grad=True); t = torch.randint(0, 9, (4,))\n"
        "dk.token_logprobs(x, t).sum().backward(); assert x.grad.isfinite().all()\n"
        "assert dk.weighted_token_nll(x, t, 1.0).isfinite()\n"
        "r = torch.randn(3, 8); w, ess = dk.daps_weights(r, -r.abs(), 0.5, 1.0)\n"
        "assert dk.solve_eta(r, -r.abs(), 0.5, 0.33).isfinite()\n"
        "try:\n"
        "    dk.token_logprobs(x, t, backend='cpu')\n"
        "except dk.BackendError as e:\n"
        "    assert 'DVAE_KERNELS_LOAD_NATIVE=0' in str(e)\n"
        "else:\n"
        "    raise AssertionError('backend=cpu must be refused')\n"
        "import sys; assert 'dvae_kernels._C' not in sys.modules\n"
        "print('ok')\n"
    )
    env = {**os.environ, _csrc.ENV_VAR: "0"}
    env.pop("DVAE_KERNELS_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_build_record_is_valid_json_when_present():
    path = os.path.join(os.path.dirname(dk.__file__), "_build_info.json")
    if not os.path.exists(path):
        pytest.skip("no build record: installed without running setup.py's build")
    with open(path) as f:
        info = json.load(f)
    assert set(info) >= {"torch", "parts", "skipped"}
    if info["parts"]:  # what the record claims was built did load (or says why not)
        for part in info["parts"]:
            reason = _csrc.unavailable(part)
            assert reason is None or part == "cuda" and "no CUDA device" in reason, reason
