"""Run-time configuration choice (dvae_kernels/_autotune.py) and the fused linear forward's
candidates: pruned by each architecture's shared memory, timed once per shape class, the same
bits under every candidate, and no timing where none is possible."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from dvae_kernels import _autotune

# the module (the package namespace binds the op's name to the public function)
ltl_mod = importlib.import_module("dvae_kernels.linear_token_logprobs")
ltl = ltl_mod.linear_token_logprobs
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="needs the Triton interpreter (TRITON_INTERPRET=1)")


@pytest.mark.parametrize("cap", [80, 86, 89, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 128, 512])
def test_candidates_fit_each_architecture(cap, dtype, D):
    cands = ltl_mod.fwd_candidates(cap, D, dtype)
    item = torch.empty((), dtype=dtype).element_size()
    limit = _autotune.smem_limit(cap)
    assert cands and all(ltl_mod.fwd_smem_bytes(c, D, item) <= limit for c in cands)
    # in preference order: a subsequence of the declared list, nothing that fits left out
    assert cands == [c for c in ltl_mod.FWD_CANDIDATES
                     if ltl_mod.fwd_smem_bytes(c, D, item) <= limit]


def test_pruning_differs_by_architecture():
    big = (256, 8, 3)  # 3 stages of (256 + 128) x 64 bf16 tiles: 144 KiB
    assert big in ltl_mod.fwd_candidates(90, 128, torch.bfloat16)
    assert big in ltl_mod.fwd_candidates(80, 128, torch.bfloat16)
    assert big not in ltl_mod.fwd_candidates(86, 128, torch.bfloat16)
    assert big not in ltl_mod.fwd_candidates(89, 128, torch.bfloat16)
    # the static report's configuration (the first candidate) where it fits
    assert ltl_mod.fwd_candidates(90, 128, torch.bfloat16)[0] == ltl_mod.FWD_CANDIDATES[0]
    # float32 tiles are twice the bytes: sm_80 drops the default, which needs 192 KiB
    assert ltl_mod.FWD_CANDIDATES[0] not in ltl_mod.fwd_candidates(80, 128, torch.float32)
    assert _autotune.smem_limit(75) == _autotune.SMEM_BYTES[80]
    assert _autotune.smem_limit(91) == _autotune.SMEM_BYTES[90]


def test_fitting_never_empty():
    assert _autotune.fitting([3, 1, 2], lambda c: c * 10**9, 90) == [1]


def test_tuner_times_once_and_keeps_the_fastest(monkeypatch):
    calls = []

    def timer(run):
        run()
        return {"a": 3.0, "b": 1.0, "c": 2.0}[calls[-1]]

    tuner = _autotune.Tuner("t", timer=timer)
    cands = ["a", "b", "c"]
    dev = torch.device("cpu")
    assert tuner.pick(("k",), cands, calls.append, dev, can_time=True) == "b"
    assert calls == ["a", "b", "c"] and tuner.timings[("k",)]["b"] == 1.0
    assert tuner.pick(("k",), cands, calls.append, dev, can_time=True) == "b"
    assert len(calls) == 3  # remembered, not timed again
    # no timing possible (interpreter, static capture, graph capture): the first candidate
    assert tuner.pick(("other",), cands, calls.append, dev, can_time=False) == "a"
    assert ("other",) not in tuner.choices
    # on the CPU nothing is ever timed
    assert tuner.pick(("cpu",), cands, calls.append, dev) == "a"
    monkeypatch.setenv(_autotune.ENV_VAR, "0")
    assert tuner.pick(("off",), cands, calls.append, dev, can_time=True) == "a"
    assert len(calls) == 3


def test_shape_class():
    assert _autotune.shape_class(1, 2, 3, 1000, 1024, 0) == (1, 2, 4, 1024, 1024, 1)


def _forced(monkeypatch, cand, *args, backend):
    monkeypatch.setattr(ltl_mod, "fwd_candidates", lambda *a: [cand])
    monkeypatch.setattr(ltl_mod, "FWD_TUNER", _autotune.Tuner("fresh"))
    return ltl(*args, return_entropy=True, backend=backend)


def _problem(device="cpu"):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 24, generator=g)
    w = torch.randn(1000, 24, generator=g)
    b = torch.randn(1000, generator=g)
    t = torch.randint(0, 1000, (300,), generator=g)
    return [x.to(device) for x in (h, w, t, b)]


@needs_interpreter
def test_every_candidate_computes_the_same_values(monkeypatch):
    """Under the interpreter (numpy's matmul, whose summation order follows the tile's shape)
    the candidates agree to float32 rounding, and bitwise where they share the rows per
    program. On a GPU they agree bitwise (the next test)."""
    args = _problem()
    outs = {c: _forced(monkeypatch, c, *args, backend="triton") for c in ltl_mod.FWD_CANDIDATES}
    first = ltl_mod.FWD_CANDIDATES[0]
    for c, o in outs.items():
        for x, y in zip(o, outs[first]):
            if c[0] == first[0]:
                assert torch.equal(x, y), c
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_fitting_candidate_gives_the_same_bits_on_the_gpu(monkeypatch, dtype):
    """Tensor cores sum each output's hidden slice in an order that depends neither on the
    rows per program nor on warps or stages: whichever candidate the tuner keeps, the bits
    are the same (so a run is reproducible whatever the timing chose)."""
    h, w, t, b = _problem("cuda")
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)
    cap = 10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1]
    cands = ltl_mod.fwd_candidates(cap, h.shape[1], dtype)
    outs = [_forced(monkeypatch, c, h, w, t, b, backend="triton") for c in cands]
    for c, o in zip(cands, outs):
        assert all(torch.equal(x, y) for x, y in zip(o, outs[0])), c


@needs_interpreter
def test_launcher_tunes_through_the_tuner(monkeypatch):
    """With timing possible (as on a GPU), the launcher runs every fitting candidate once and
    launches the fastest; the result is the untuned one's."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(40, 16, generator=g), torch.randn(80, 16, generator=g)
    t = torch.randint(0, 80, (40,), generator=g)
    ref = ltl(h, w, t, backend="triton")
    seen = []
    order = {c: i for i, c in enumerate(ltl_mod.FWD_CANDIDATES)}
    fake_ms = {c: 1.0 + (order[c] - 2) ** 2 for c in ltl_mod.FWD_CANDIDATES}  # fastest: [2]

    def timer(run):
        run()
        return fake_ms[seen[-1]]

    tuner = _autotune.Tuner("fwd", timer=timer)
    real_pick = tuner.pick

    def pick(key, cands, run, device, can_time=None):
        def spy(c):
            seen.append(c)
            run(c)
        return real_pick(key, cands, spy, device, can_time=True)

    monkeypatch.setattr(tuner, "pick", pick)
    monkeypatch.setattr(ltl_mod, "FWD_TUNER", tuner)
    out = ltl(h, w, t, backend="triton")
    assert torch.equal(out, ref)
    (choice,) = tuner.choices.values()
    assert choice == ltl_mod.FWD_CANDIDATES[2]
    assert set(seen) == set(ltl_mod.fwd_candidates(None, 16, torch.float32))
