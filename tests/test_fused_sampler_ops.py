"""dvae.models.fused (add_layer_norm, decode_attention): the Triton kernels (through the
interpreter here, compiled for sm_80/sm_90 in a subprocess) against float64 references and the
code they replace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dvae.models import fused
from tests.utils import FLOOR

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.skipif(not fused.HAS_TRITON or not fused.INTERPRET,
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("D,broadcast", [(32, False), (24, True), (48, False)])
@pytest.mark.parametrize("r_dtype,out_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
def test_triton_matches_float64(D, broadcast, r_dtype, out_dtype):
    ln = _ln(D)
    x = torch.randn(5, 1, D) * 3 + 1
    r = (torch.randn(D) if broadcast else torch.randn(5, 1, D)).to(r_dtype)
    ref_s, ref_y = _reference(x, r, ln)
    torch_s, torch_y = fused.add_layer_norm(x, r, ln, out_dtype)  # torch path (CPU)
    with fused.force_triton():
        s, y = fused.add_layer_norm(x, r, ln, out_dtype)
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
    s, y = fused.add_layer_norm(x, r, ln)
    assert torch.equal(s, x + r) and torch.equal(y, ln(x + r))
    _, yb = fused.add_layer_norm(x, r, ln, torch.bfloat16)
    assert torch.equal(yb, ln(x + r).to(torch.bfloat16))


@pytest.mark.skipif(not fused.HAS_TRITON or not fused.INTERPRET,
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
def test_embed_add_layer_norm_reads_the_table_rows():
    ln = _ln(16, seed=4)
    table = torch.randn(9, 16)
    index = torch.tensor([3, 0, 8, 3])
    pos = torch.randn(16)
    want_s, want_y = fused.add_layer_norm(F.embedding(index, table), pos, ln, torch.bfloat16)
    ref_s, ref_y = _reference(F.embedding(index, table), pos, ln)
    with fused.force_triton():
        s, y = fused.embed_add_layer_norm(index, table, pos, ln, torch.bfloat16)
    assert torch.equal(s, want_s)
    err = (y.double() - ref_y).abs().max().item()
    torch_err = (want_y.double() - ref_y).abs().max().item()
    assert err <= 2 * torch_err + FLOOR[torch.bfloat16] * max(1.0, ref_y.abs().max().item())
    with pytest.raises(ValueError, match="index must be"):
        fused.embed_add_layer_norm(index[None], table, pos, ln)


def test_bad_arguments():
    ln = _ln(8)
    with pytest.raises(ValueError, match=r"r must have x's shape \(2, 8\) or \(8,\), got \(3,\)"):
        fused.add_layer_norm(torch.zeros(2, 8), torch.zeros(3), ln)
    with pytest.raises(ValueError, match="ln must be a LayerNorm over the last dim"):
        fused.add_layer_norm(torch.zeros(2, 4), torch.zeros(4), ln)


def test_kernel_compiles_for_the_gpu():
    """The real compiler (not the interpreter) for sm_80 and sm_90."""
    code = (
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource, compile\n"
        "from dvae.models.fused import _add_layer_norm_kernel as k\n"
        "for arch in (80, 90):\n"
        "    for xd, yd in (('fp32', 'bf16'), ('fp32', 'fp32')):\n"
        "        for idx in (True, False):\n"
        "            sig = {'x_ptr': '*' + xd, 'idx_ptr': '*i64', 'r_ptr': '*bf16',\n"
        "                   'w_ptr': '*fp32', 'b_ptr': '*fp32', 's_ptr': '*fp32',\n"
        "                   'y_ptr': '*' + yd, 'D': 'i32', 'stride_x': 'i32',\n"
        "                   'stride_r': 'i32', 'stride_s': 'i32', 'stride_y': 'i32',\n"
        "                   'eps': 'fp32', 'HAS_INDEX': 'constexpr', 'BLOCK_D': 'constexpr'}\n"
        "            c = {'HAS_INDEX': idx, 'BLOCK_D': 128}\n"
        "            compile(ASTSource(fn=k, signature=sig, constexprs=c),\n"
        "                    target=GPUTarget('cuda', arch, 32))\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def _decode_inputs(B, H, L, DH, dtype, seed=0):
    torch.manual_seed(seed)
    cache = torch.full((2, B, H, L, DH), float("nan"), dtype=dtype)  # unwritten slots: NaN
    q = torch.randn(B, H, DH).to(dtype)
    kv = torch.randn(B, 2, H, DH).to(dtype)
    return q, kv, cache


@pytest.mark.skipif(not fused.HAS_TRITON or not fused.INTERPRET,
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
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
                fused.decode_attention(q_all[s], kv_all[s], torch_cache, s)
                cache[:, :, :, s] = torch_cache[:, :, :, s]
                old_cache[:, :, :, s] = torch_cache[:, :, :, s]
        with fused.force_triton():
            out = fused.decode_attention(q_all[t], kv_all[t], cache, t, positions[t])
        ref_torch = fused.decode_attention(q_all[t], kv_all[t], torch_cache, t)
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
        fused.decode_attention(q, kv, cache, 5)
    with pytest.raises(ValueError, match="expected q"):
        fused.decode_attention(q[:1], kv, cache, 0)


def test_decode_kernel_compiles_for_the_gpu():
    code = (
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource, compile\n"
        "from dvae.models.fused import _decode_attention_kernel as k\n"
        "names = ['H', 'DH', 'stride_qb', 'stride_qh', 'stride_nb', 'stride_n2', 'stride_nh',\n"
        "         'stride_c2', 'stride_cb', 'stride_ch', 'stride_cl', 'stride_ob', 'stride_oh']\n"
        "for arch in (80, 90):\n"
        "    for dt in ('bf16', 'fp32'):\n"
        "        sig = {'q_ptr': '*' + dt, 'kn_ptr': '*' + dt, 'c_ptr': '*' + dt,\n"
        "               't_ptr': '*i32', 'o_ptr': '*' + dt, **dict.fromkeys(names, 'i32'),\n"
        "               'scale': 'fp32', 'BLOCK_S': 'constexpr', 'BLOCK_DH': 'constexpr'}\n"
        "        compile(ASTSource(fn=k, signature=sig,\n"
        "                          constexprs={'BLOCK_S': 64, 'BLOCK_DH': 32}),\n"
        "                target=GPUTarget('cuda', arch, 32))\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not fused.HAS_TRITON or not fused.INTERPRET,
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
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
    torch_s, torch_y = fused.add_layer_norm(x, o, ln, out_dtype)
    with fused.force_triton():
        s, y = fused.linear_add_layer_norm(a, lin, x, ln, out_dtype, cast)
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
    s, y = fused.linear_add_layer_norm(a, lin, x, ln)
    assert torch.equal(s, x + lin(a)) and torch.equal(y, ln(x + lin(a)))
    with pytest.raises(ValueError, match=r"linear must map a's last dim \(6\) to x's \(4\)"):
        fused.linear_add_layer_norm(a, lin, torch.zeros(3, 1, 4), _ln(4))


def test_linear_add_layer_norm_kernel_compiles_for_the_gpu():
    code = (
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource, compile\n"
        "from dvae.models.fused import _linear_add_layer_norm_kernel as k\n"
        "ints = ['R', 'K', 'D', 'stride_a', 'stride_w', 'stride_x', 'stride_s', 'stride_y']\n"
        "cx = ['HAS_BIAS', 'DOT_FP32', 'PRECISION', 'BLOCK_M', 'BLOCK_K', 'BLOCK_D']\n"
        "for arch in (80, 90):\n"
        "    for dt, prec, f32 in (('bf16', 'tf32', False), ('fp32', 'ieee', True)):\n"
        "        sig = {'a_ptr': '*' + dt, 'w_ptr': '*' + dt, 'bias_ptr': '*' + dt,\n"
        "               'x_ptr': '*fp32', 'lw_ptr': '*fp32', 'lb_ptr': '*fp32',\n"
        "               's_ptr': '*fp32', 'y_ptr': '*' + dt, **dict.fromkeys(ints, 'i32'),\n"
        "               'eps': 'fp32', **dict.fromkeys(cx, 'constexpr')}\n"
        "        c = {'HAS_BIAS': True, 'DOT_FP32': f32, 'PRECISION': prec, 'BLOCK_M': 16,\n"
        "             'BLOCK_K': 32, 'BLOCK_D': 128}\n"
        "        compile(ASTSource(fn=k, signature=sig, constexprs=c),\n"
        "                target=GPUTarget('cuda', arch, 32))\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
