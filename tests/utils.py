"""Tolerances and comparisons shared by the tests (docs/conventions.md#testing).

The rule: a backend's error against a float64 computation is at most twice the error of the
torch backend run on the same inputs in the same dtype, plus a floor per dtype (one table,
here). Floors are relative to the reference's magnitude (at least 1).
"""

from __future__ import annotations

import os
import socket

import torch

FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,  # about two bf16 ulps: the interpreter truncates fp32 -> bf16
}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The device the op tests run on: the CPU here (Triton through its interpreter), CUDA on a GPU
# machine with DVAE_TEST_DEVICE=cuda (Triton compiled; see bench/gpu_report.py).
DEVICE = torch.device(os.environ.get("DVAE_TEST_DEVICE", "cpu"))


def available_backends(device: torch.device = DEVICE) -> list[str]:
    """Every backend that runs on ``device`` in this process."""
    from dvae_kernels import BACKENDS
    from dvae_kernels._dispatch import backend_unavailable

    return [b for b in BACKENDS if backend_unavailable(b, device) is None]


def assert_close_to_reference(out, reference, torch_out, dtype, what: str = "output") -> None:
    """``out`` (a backend's result) vs ``reference`` (float64) vs ``torch_out`` (torch backend,
    same dtype): NaN where the reference is NaN, otherwise within the rule above."""
    out = out.detach().double().cpu()
    reference = reference.detach().double().cpu()
    torch_out = torch_out.detach().double().cpu()
    assert out.shape == reference.shape, f"{what}: shape {out.shape} vs {reference.shape}"
    ref_nan = reference.isnan()
    assert torch.equal(out.isnan(), ref_nan), (
        f"{what}: NaN at {out.isnan().nonzero()[:5].tolist()} vs reference "
        f"{ref_nan.nonzero()[:5].tolist()}")
    ok = ~ref_nan
    if not ok.any():
        return
    ref = reference[ok]
    inf = ref.isinf()
    assert torch.equal(out[ok][inf], ref[inf]), f"{what}: infinities differ"
    fin = ~inf
    if not fin.any():
        return
    ref = ref[fin]
    err = (out[ok][fin] - ref).abs().max().item()
    torch_err = (torch_out[ok][fin] - ref).abs().nan_to_num(float("inf")).max().item()
    scale = max(1.0, ref.abs().max().item())
    tol = 2 * torch_err + FLOOR[dtype] * scale
    assert err <= tol, (f"{what} ({dtype}): max error {err:.3g} > tolerance {tol:.3g} "
                        f"(torch backend error {torch_err:.3g})")


def assert_bitwise_equal(a, b, path: str = "state") -> None:
    """Nested dicts / lists / tensors (a checkpoint's state) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def free_port() -> int:
    """A free TCP port on localhost (a torch.distributed rendezvous for a spawned test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
