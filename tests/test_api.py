"""Input validation, backend dispatch, info, torch.compile and the GPU compile check."""

import os
import subprocess
import sys

import pytest
import torch

import dvae_kernels as dk
from dvae_kernels import _dispatch

X = torch.randn(3, 5)
T = torch.tensor([0, 4, 2])


# Each bad input of docs/conventions.md raises a clear error naming the argument.
@pytest.mark.parametrize("call,exc,match", [
    (lambda: dk.token_logprobs(X, torch.tensor([0, 5, 1])), ValueError, r"tokens must lie in \[0, V\) = \[0, 5\)"),
    (lambda: dk.token_logprobs(X, torch.tensor([-1, 0, 1])), ValueError, "tokens must lie"),
    (lambda: dk.token_logprobs(X, T[:2]), ValueError, "tokens must have the shape"),
    (lambda: dk.token_logprobs(X, T.float()), TypeError, "tokens must be int64 or int32"),
    (lambda: dk.token_logprobs(X.int(), T), TypeError, "logits must be float32"),
    (lambda: dk.token_logprobs([1.0], T), TypeError, "logits must be a torch.Tensor"),
    (lambda: dk.token_logprobs(torch.tensor(1.0), torch.tensor(0)), ValueError, "vocabulary"),
    (lambda: dk.token_logprobs(X, T, backend="gpu"), ValueError, "backend must be one of"),
    (lambda: dk.token_logprobs(X.to("meta"), T), ValueError, "one device"),
    (lambda: dk.weighted_token_nll(X, T, torch.rand(4)), ValueError, "weights must broadcast"),
    (lambda: dk.weighted_token_nll(X, T, torch.ones(3, dtype=torch.long)), TypeError,
     "weights must be floating point"),
    (lambda: dk.weighted_token_nll(X, T, 1.0, reduction="avg"), ValueError, "reduction"),
    (lambda: dk.daps_weights(X, X, float("nan"), 1.0), ValueError, "beta must be finite"),
    (lambda: dk.daps_weights(X, X, 0.1, float("inf")), ValueError, "eta must be finite"),
    (lambda: dk.daps_weights(X, X, 0.1, 0.0), ValueError, "eta must be > 0"),
    (lambda: dk.daps_weights(X, X, -1.0, 1.0), ValueError, "beta must be >= 0"),
    (lambda: dk.daps_weights(X, X, 0.1, torch.tensor(float("nan"))), ValueError, "eta must be finite"),
    (lambda: dk.daps_weights(X, X, 0.1, torch.ones(2)), ValueError, "eta must be a float or a 0-d"),
    (lambda: dk.daps_weights(X, X[:2], 0.1, 1.0), ValueError, "logq must have the shape"),
    (lambda: dk.daps_weights(X[0], X[0], 0.1, 1.0), ValueError, r"rewards must be \[N, K\]"),
    (lambda: dk.daps_weights(X, X, "0.1", 1.0), TypeError, "beta must be a float"),
    (lambda: dk.solve_eta(X, X, 0.1, 0.0), ValueError, r"ess_target must be a fraction of K in \(0, 1\]"),
    (lambda: dk.solve_eta(X, X, 0.1, 1.5), ValueError, "ess_target"),
    (lambda: dk.solve_eta(X, X, 0.1, 0.3, eta_min=0.0), ValueError, "eta_min must be a finite"),
    (lambda: dk.solve_eta(X, X, 0.1, 0.3, eta_min=10.0, eta_max=1.0), ValueError, "eta_min must be <"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_leaves_inputs_untouched():
    x = torch.randn(3, 5, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(ValueError):
        dk.weighted_token_nll(x, torch.tensor([0, 9, 1]), 1.0)
    assert torch.equal(x.detach(), before) and x.grad is None


def test_explicit_backend_never_falls_back(monkeypatch):
    # A backend that cannot serve raises with its reason; only "auto" falls back.
    with pytest.raises(dk.BackendError, match="cuda.*cuda tensors"):
        dk.token_logprobs(X, T, backend="cuda")
    with pytest.raises(dk.BackendError, match="float64 logits are served by the torch"):
        dk.token_logprobs(X.double(), T, backend="triton")
    monkeypatch.setenv("DVAE_KERNELS_BACKEND", "cuda")
    with pytest.raises(dk.BackendError):
        dk.token_logprobs(X, T)
    # The argument wins over the environment.
    assert dk.token_logprobs(X, T, backend="torch").shape == (3,)
    monkeypatch.setenv("DVAE_KERNELS_BACKEND", "auto")
    assert dk.token_logprobs(X, T).shape == (3,)


def _scratch_op(monkeypatch, name: str) -> _dispatch.Op:
    """An op registered for one test only (the registry is restored afterwards)."""
    monkeypatch.setattr(_dispatch, "OPS", dict(_dispatch.OPS))
    return _dispatch.Op(name)


def test_automatic_choice_lists_every_reason(monkeypatch):
    op = _scratch_op(monkeypatch, "op")
    op.register("torch", lambda: None, supports=lambda **kw: "refused for the test")
    with pytest.raises(dk.BackendError) as info:
        op.select(None, torch.device("cpu"))
    assert "op: no backend can serve" in str(info.value)
    assert "torch: refused for the test" in str(info.value)
    with pytest.raises(dk.BackendError, match="caller: backend 'torch' cannot serve"):
        op.select("torch", torch.device("cpu"), caller="caller")
    # Interpreted Triton is never an automatic choice on CPU tensors.
    other = _scratch_op(monkeypatch, "other")
    other.register("triton", lambda: None)
    other.register("torch", lambda: None)
    assert other.select(None, torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="registered twice"):
        _dispatch.Op("other")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        other.register("gpu", lambda: None)


def test_every_op_registers_its_backends_in_its_own_file():
    # One registry: each op file's OP is the registry's entry, with a torch reference.
    import importlib

    for name, op in _dispatch.OPS.items():
        assert importlib.import_module(f"dvae_kernels.{name}").OP is op
        assert "torch" in op.backends and op.backends["torch"].automatic
    assert _dispatch.lacking("cuda", ["token_logprobs", "sample_tokens"]) == ["sample_tokens"]


def test_info_tells_the_truth():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "dvae_kernels.info"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert f"torch        {torch.__version__}" in out
    assert "torch   cpu   available" in out
    assert "triton  cpu   unavailable: Triton runs on CUDA tensors" in out
    if not torch.cuda.is_available():
        assert "triton  cuda  unavailable: no CUDA device" in out
    # the op x backend/device table: every registered op, with the reason for each refusal
    table = out.split("op x backend/device", 1)[1]
    for name in _dispatch.OPS:
        assert f"\n  {name} " in table
    row = next(line for line in table.splitlines() if line.startswith("  sample_tokens "))
    assert row.split()[3] == "[1]" and row.split()[5] == "-"  # triton/cpu off; no cuda backend
    assert "[1] Triton runs on CUDA tensors" in table
    assert "token_logprobs           triton: no float64, V <= 262144" in table


def test_torch_compile_inductor_all_ops():
    # One inductor run (about 20 s cold on 2 cores) through every op, forward and backward.
    def step(logits, tokens, rewards, logq, log_eta):
        logp, ent = dk.token_logprobs(logits, tokens, return_entropy=True, backend="torch")
        eta = dk.solve_eta(rewards, logq, 0.1, 0.33, backend="torch")
        w, ess = dk.daps_weights(rewards, logq, 0.1, log_eta.exp(), backend="torch")
        w2, _ = dk.daps_weights(rewards, logq, 0.1, eta, backend="torch")
        nll = dk.weighted_token_nll(logits, tokens, w2.unsqueeze(-1), backend="torch")
        return nll + 0.01 * ent.sum() + logp.mean() + (ess.mean() - 2.6) ** 2 + w.sum()

    logits = torch.randn(4, 8, 6, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (4, 8, 6))
    rewards, logq = torch.randn(4, 8) * 10, torch.randn(4, 8)
    log_eta = torch.tensor(2.0, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(logits, tokens, rewards, logq, log_eta)
    out.backward()
    g, ge = logits.grad.clone(), log_eta.grad.clone()
    logits.grad = log_eta.grad = None
    ref = step(logits, tokens, rewards, logq, log_eta)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, logits.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ge, log_eta.grad, rtol=1e-4, atol=1e-5)


def test_triton_kernels_compile_for_sm80_and_sm90():
    # The interpreter accepts programs the GPU compiler rejects: compile them for real.
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "dvae_kernels._compile_check"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "0 failed" in proc.stdout


def test_no_value_checks_skips_the_range_check_and_kernels_give_nan():
    # Inside no_value_checks nothing reads the tokens back (no host sync on CUDA); a token out
    # of range then gives NaN instead of an error, never an out-of-bounds read.
    with dk.no_value_checks():
        out = dk.token_logprobs(X, torch.tensor([0, 7, 1]), backend="torch")
    assert out[1].isnan() and out[[0, 2]].isfinite().all()
    with pytest.raises(ValueError, match="tokens must lie"):
        dk.token_logprobs(X, torch.tensor([0, 7, 1]))


def test_linear_ops_give_nan_for_inf_logits_like_token_logprobs():
    h, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(5)
    b[2] = float("inf")
    t = torch.tensor([0, 1, 2])
    ref = dk.token_logprobs(torch.nn.functional.linear(h, w, b), t, backend="torch")
    out = dk.linear_token_logprobs(h, w, t, b, backend="torch")
    assert ref.isnan().all() and out.isnan().all()


def test_cuda_eta_ops_are_never_chosen_automatically(monkeypatch):
    monkeypatch.setitem(_dispatch._PREFERENCE, "cuda", ("cuda", "torch"))
    monkeypatch.setattr(_dispatch, "backend_unavailable", lambda name, device: None)
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    r = torch.randn(2, 3)
    ops = _dispatch.OPS
    assert ops["solve_eta"].select(None, cuda, rewards=r, logq=r) == "torch"
    assert ops["daps_weights"].select(None, cuda, rewards=r, logq=r) == "torch"
    assert ops["token_logprobs"].select(None, cuda, logits=r, tokens=r) == "cuda"
    assert ops["solve_eta"].select("cuda", cuda, rewards=r, logq=r) == "cuda"  # explicit runs
