"""The decoding ops (add_layer_norm, embed_add_layer_norm, linear_add_layer_norm,
decode_attention): the Triton kernels (through the interpreter here; compiled for sm_80/sm_90
with every other kernel by dvae_kernels._compile_check) against float64 references and the
unfused lines of their torch backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dvae_kernels as dk
from dvae_kernels import _triton
from tests.utils import FLOOR

needs_interpreter = pytest.mark.skipif(not _triton.HAS_TRITON or not _triton.INTERPRET,
                                       reason="needs the Triton interpreter (TRITON_INTERPRET=1)")


def _norm(ln):
    return ln.weight, ln.bias, ln.eps


def _ln(D, seed=0):
    torch.manual_seed(seed)
    ln = torch.nn.LayerNorm(D)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    return ln


def _reference(x, r, ln):
    s = x.double() + r.double()
    y = F.layer_norm(s, (x.shape[-1],), ln.weight.double(), ln.bias.double(), ln.eps)
    return s, y


@needs_interpreter
@pytest.mark.parametrize("D,broadcast", [(32, False), (24, True), (48, False)])
@pytest.mark.parametrize("r_dtype,out_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
def test_triton_matches_float64(D, broadcast, r_dtype, out_dtype):
    ln = _ln(D)
    x = torch.randn(5, 1, D) * 3 + 1
    r = (torch.randn(D) if broadcast else torch.randn(5, 1, D)).to(r_dtype)
    ref_s, ref_y = _reference(x, r, ln)
    torch_s, torch_y = dk.add_layer_norm(x, r, *_norm(ln), out_dtype=out_dtype)  # torch (CPU)
    with torch.no_grad():
        s, y = dk.add_layer_norm(x, r, *_norm(ln), out_dtype=out_dtype, backend="triton")
    assert s.dtype == torch.float32 and y.dtype == out_dtype and y.shape == x.shape
    assert torch.equal(s, torch_s)  # one fp32 add, exact either way
    err = (y.double() - ref_y).abs().max().item()
    torch_err = (torch_y.double() - ref_y).abs().max().item()
    # the interpreter truncates fp32 -> bf16 (one ulp more than rounding)
    floor = FLOOR[out_dtype] * max(1.0, ref_y.abs().max().item())
    assert err <= 2 * torch_err + floor, (err, torch_err)


def test_torch_path_is_the_unfused_lines():
    ln = _ln(16, seed=1)
    x, r = torch.randn(3, 1, 16), torch.randn(3, 1, 16)
    s, y = dk.add_layer_norm(x, r, *_norm(ln))
    assert torch.equal(s, x + r) and torch.equal(y, ln(x + r))
    _, yb = dk.add_layer_norm(x, r, *_norm(ln), out_dtype=torch.bfloat16)
    assert torch.equal(yb, ln(x + r).to(torch.bfloat16))
    # differentiable through the torch backend, which the automatic choice takes for it
    x.requires_grad_(True)
    dk.add_layer_norm(x, r, *_norm(ln))[1].sum().backward()
    assert x.grad is not None


@needs_interpreter
def test_embed_add_layer_norm_reads_the_table_rows():
    ln = _ln(16, seed=4)
    table = torch.randn(9, 16)
    index = torch.tensor([3, 0, 8, 3])
    pos = torch.randn(16)
    want_s, want_y = dk.add_layer_norm(F.embedding(index, table), pos, *_norm(ln),
                                       out_dtype=torch.bfloat16)
    ref_s, ref_y = _reference(F.embedding(index, table), pos, ln)
    with torch.no_grad():
        s, y = dk.embed_add_layer_norm(index, table, pos, *_norm(ln),
                                       out_dtype=torch.bfloat16, backend="triton")
    assert torch.equal(s, want_s)
    err = (y.double() - ref_y).abs().max().item()
    torch_err = (want_y.double() - ref_y).abs().max().item()
    assert err <= 2 * torch_err + FLOOR[torch.bfloat16] * max(1.0, ref_y.abs().max().item())
    with pytest.raises(ValueError, match="index must be"):
        dk.embed_add_layer_norm(index[None], table, pos, *_norm(ln))


def test_bad_arguments():
    ln = _ln(8)
    with pytest.raises(ValueError, match=r"r must have x's shape \(2, 8\) or \(8,\), got \(3,\)"):
        dk.add_layer_norm(torch.zeros(2, 8), torch.zeros(3), *_norm(ln))
    with pytest.raises(ValueError, match=r"weight must be \[D\] = \[4\]"):
        dk.add_layer_norm(torch.zeros(2, 4), torch.zeros(4), *_norm(ln))
    with pytest.raises(ValueError, match="eps must be a float > 0"):
        dk.add_layer_norm(torch.zeros(2, 8), torch.zeros(8), ln.weight, ln.bias, 0.0)
    x = torch.zeros(2, 8, requires_grad=True)
    with pytest.raises(dk.BackendError, match="no backward"):
        dk.add_layer_norm(x, torch.zeros(8), *_norm(ln), backend="triton")



def _decode_inputs(B, H, L, DH, dtype, seed=0):
    torch.manual_seed(seed)
    cache = torch.full((2, B, H, L, DH), float("nan"), dtype=dtype)  # unwritten slots: NaN
    q = torch.randn(B, H, DH).to(dtype)
    kv = torch.randn(B, 2, H, DH).to(dtype)
    return q, kv, cache


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,DH", [(7, 8), (70, 4)])
def test_decode_attention_matches_masked_full_cache_attention(dtype, L, DH):
    """The kernel, positions 0..L-1 in turn with the position read from a device tensor,
    against the original attention (SDPA over all L slots with a boolean row mask, zeroed
    cache) and a float64 reference; the unwritten slots hold NaN and are never read."""
    B, H = 2, 2
    q_all = torch.randn(L, B, H, DH).to(dtype)
    kv_all = torch.randn(L, B, 2, H, DH).to(dtype)
    cache = torch.full((2, B, H, L, DH), float("nan"), dtype=dtype)
    old_cache = torch.zeros(2, B, H, L, DH, dtype=dtype)
    torch_cache = torch.full((2, B, H, L, DH), float("nan"), dtype=dtype)
    positions = torch.arange(L, dtype=torch.int32)
    masks = torch.ones(L, L, dtype=torch.bool).tril()
    for t in (range(L) if L < 10 else list(range(3)) + [L - 1]):
        if L >= 10 and t == L - 1:  # fill the skipped slots first
            for s in range(3, L - 1):
                dk.decode_attention(q_all[s], kv_all[s], torch_cache, s, backend="torch")
                cache[:, :, :, s] = torch_cache[:, :, :, s]
                old_cache[:, :, :, s] = torch_cache[:, :, :, s]
        out = dk.decode_attention(q_all[t], kv_all[t], cache, t, positions[t],
                                  backend="triton")
        ref_torch = dk.decode_attention(q_all[t], kv_all[t], torch_cache, t, backend="torch")
        old_cache[:, :, :, t] = kv_all[t].transpose(0, 1)
        old = F.scaled_dot_product_attention(q_all[t][:, :, None], old_cache[0], old_cache[1],
                                             attn_mask=masks[t:t + 1])[:, :, 0]
        c64 = old_cache.double()
        ref = F.scaled_dot_product_attention(q_all[t].double()[:, :, None],
                                             c64[0, :, :, :t + 1], c64[1, :, :, :t + 1])[:, :, 0]
        assert torch.equal(cache[:, :, :, :t + 1], old_cache[:, :, :, :t + 1])  # the write
        assert out.dtype == dtype and out.shape == (B, H, DH)
        for name, got in (("triton", out), ("torch", ref_torch)):
            err = (got.double() - ref).abs().max().item()
            old_err = (old.double() - ref).abs().max().item()
            assert err <= 2 * old_err + FLOOR[dtype] * max(1.0, ref.abs().max().item()), (
                name, t, err, old_err)


def test_decode_attention_bad_arguments():
    q, kv, cache = _decode_inputs(2, 2, 5, 4, torch.float32)
    with pytest.raises(ValueError, match="t must be in"):
        dk.decode_attention(q, kv, cache, 5)
    with pytest.raises(ValueError, match="expected q"):
        dk.decode_attention(q[:1], kv, cache, 0)



@needs_interpreter
@pytest.mark.parametrize("K,D,bias", [(32, 32, False), (40, 24, True)])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])
def test_linear_add_layer_norm_matches_float64(K, D, bias, dtype, out_dtype):
    ln = _ln(D, seed=2)
    torch.manual_seed(3)
    lin = torch.nn.Linear(K, D, bias=bias)
    a = torch.randn(19, 1, K).to(dtype)  # 19 rows: two row blocks, the second partial
    x = torch.randn(19, 1, D) * 2
    cast = (lin.weight.detach().to(dtype),
            lin.bias.detach().to(dtype) if bias else None)
    o64 = F.linear(a.double(), cast[0].double(), cast[1].double() if bias else None)
    ref_s, ref_y = _reference(x, o64, ln)
    # the torch path: the unfused lines (the projection rounded to dtype before the add)
    o = F.linear(a, *cast)
    torch_s, torch_y = dk.add_layer_norm(x, o, *_norm(ln), out_dtype=out_dtype)
    with torch.no_grad():
        s, y = dk.linear_add_layer_norm(a, *cast, x, *_norm(ln), out_dtype=out_dtype,
                                        backend="triton")
    assert s.dtype == torch.float32 and y.dtype == out_dtype and y.shape == x.shape
    for name, got, want, ref in (("s", s, torch_s, ref_s), ("y", y, torch_y, ref_y)):
        err = (got.double() - ref).abs().max().item()
        torch_err = (want.double() - ref).abs().max().item()
        floor = FLOOR[dtype] * max(1.0, ref.abs().max().item())
        assert err <= 2 * torch_err + floor, (name, err, torch_err)


def test_linear_add_layer_norm_torch_path_and_bad_arguments():
    ln = _ln(8)
    lin = torch.nn.Linear(6, 8)
    a, x = torch.randn(3, 1, 6), torch.randn(3, 1, 8)
    s, y = dk.linear_add_layer_norm(a, lin.weight, lin.bias, x, *_norm(ln))
    assert torch.equal(s, x + lin(a)) and torch.equal(y, ln(x + lin(a)))
    with pytest.raises(ValueError, match=r"weight must be \[D, K\] = \[4, 6\]"):
        dk.linear_add_layer_norm(a, lin.weight, lin.bias, torch.zeros(3, 1, 4), *_norm(_ln(4)))
    with pytest.raises(dk.BackendError, match="D = 300 exceeds"):
        dk.linear_add_layer_norm(torch.zeros(2, 6), torch.zeros(300, 6), None,
                                 torch.zeros(2, 300), *_norm(_ln(300)), backend="triton")



@needs_interpreter
def test_opcheck_the_triton_ops():
    """Schema, fake tensors and AOT tracing of the registered Triton ops (decode_attention
    declares its in-place write of the cache)."""
    import importlib

    def op(name):
        return importlib.import_module(f"dvae_kernels.{name}")._op

    ln = _ln(16, seed=5)
    w, b = ln.weight.detach(), ln.bias.detach()
    x, r = torch.randn(3, 16), torch.randn(16)
    torch.library.opcheck(op("add_layer_norm"),
                          (x, r, w, b, 1e-5, torch.bfloat16, None, "triton"))
    torch.library.opcheck(op("add_layer_norm"),
                          (torch.randn(7, 16), r, w, b, 1e-5, torch.float32,
                           torch.tensor([6, 0, 2]), "triton"))
    a, lw = torch.randn(3, 8), torch.randn(16, 8)
    torch.library.opcheck(op("linear_add_layer_norm"),
                          (a, lw, None, x, w, b, 1e-5, torch.float32, "triton"))
    q, kv, cache = _decode_inputs(2, 2, 5, 4, torch.float32)
    cache.zero_()
    torch.library.opcheck(op("decode_attention"),
                          (q, kv, cache, torch.tensor(2, dtype=torch.int32), "triton"))


def test_automatic_choice_on_the_cpu():
    """The torch backend (the PyTorch lines) for the LayerNorm ops on CPU tensors; the C++
    attention for a float32 decode step when the extension is built."""
    from dvae_kernels import _csrc, _dispatch

    cpu = torch.device("cpu")
    assert _dispatch.OPS["add_layer_norm"].first_available(cpu) == "torch"
    assert _dispatch.OPS["linear_add_layer_norm"].first_available(cpu) == "torch"
    want = "cpu" if _csrc.unavailable("cpu") is None else "torch"
    assert _dispatch.OPS["decode_attention"].first_available(cpu) == want
    with _dispatch.as_if_cuda():
        assert _dispatch.OPS["decode_attention"].first_available(cpu) == "triton"
        assert _dispatch.OPS["attention"].first_available(cpu) == "torch"
