"""The C++ CPU attention (csrc/cpu/attention.cpp, ``dvae_kernels.attention``): forward and
backward against a float64 reference, within PyTorch's own SDPA error in float32; the model's
layers through it; its checks; and SDPA wherever it does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dvae_kernels as dk
from dvae_kernels import _csrc, _dispatch

pytestmark = pytest.mark.skipif(_csrc.unavailable("cpu") is not None,
                                reason=f"cpu backend unavailable: {_csrc.unavailable('cpu')}")


def _inputs(B, H, T, S, D, *, layout="bhtd", seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "bthd":  # the models' head split: a transposed view of [B, T, H*D]
        q = torch.randn(B, T, H * D, generator=g).view(B, T, H, D).transpose(1, 2)
        k = torch.randn(B, S, H * D, generator=g).view(B, S, H, D).transpose(1, 2)
        v = torch.randn(B, S, H * D, generator=g).view(B, S, H, D).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (T, S, S))
    return q, k, v


@pytest.mark.parametrize("B,H,T,S,D,causal", [
    (3, 2, 5, 5, 16, True),      # the latent transformers' causal self-attention
    (3, 2, 7, 4, 16, False),     # cross-attention: more queries than keys
    (2, 3, 6, 6, 13, True),      # a head size that is not a multiple of the vector width
    (2, 1, 4, 9, 8, True),       # causal with S > T (top-left: query t sees keys 0..t)
    (2, 2, 3, 1, 16, False),     # one key
    (1, 2, 20, 20, 32, True),    # more than one vector of keys
    (2, 2, 0, 3, 16, False),     # no queries
    (4, 2, 1, 6, 16, False),     # one query: the decode step's path (no transpose)
    (3, 2, 1, 11, 13, True),     # one causal query sees key 0 only
])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_forward_and_backward_against_float64(B, H, T, S, D, causal, layout):
    q, k, v = (t.requires_grad_() for t in _inputs(B, H, T, S, D, layout=layout))
    g = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(9))
    out = dk.attention(q, k, v, causal)
    out.backward(g)
    ours = [out.detach(), q.grad, k.grad, v.grad]
    # float64 reference and PyTorch's own float32 SDPA (the accuracy bar)
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out = F.scaled_dot_product_attention(*r, is_causal=causal)
    ref_out.backward(g.double())
    refs = [ref_out.detach()] + [t.grad for t in r]
    s = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    sd_out = F.scaled_dot_product_attention(*s, is_causal=causal)
    sd_out.backward(g)
    sdpa = [sd_out.detach()] + [t.grad for t in s]
    for name, a, ref, bar in zip(("out", "dq", "dk", "dv"), ours, refs, sdpa):
        assert a.shape == ref.shape and a.dtype == torch.float32, name
        err = (a.double() - ref).abs().max().item() if a.numel() else 0.0
        bar_err = (bar.double() - ref).abs().max().item() if a.numel() else 0.0
        assert err <= max(4 * bar_err, 1e-6), f"{name}: error {err:.3g}, SDPA's {bar_err:.3g}"


def test_layout_merges_heads_without_a_copy():
    q, k, v = _inputs(2, 4, 8, 8, 16, layout="bthd")
    out = dk.attention(q, k, v, True)
    # stored as [B, T, H, D]: transposing back gives a contiguous [B, T, H*D]
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=1e-6, rtol=1e-5)


def test_falls_back_to_sdpa_off_the_kernel(monkeypatch):
    """float64, autocast and the traced CUDA path (as_if_cuda) go to SDPA; so does a missing
    extension."""
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _inputs(2, 2, 4, 4, 8)
    dk.attention(q, k, v)
    assert not calls
    dk.attention(q.double(), k.double(), v.double())
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dk.attention(q, k, v)
    assert len(calls) == 2
    with _dispatch.as_if_cuda():
        dk.attention(q, k, v)
    assert len(calls) == 3
    monkeypatch.setattr(_csrc, "unavailable", lambda name: "not built")
    dk.attention(q, k, v)
    assert len(calls) == 4


def test_checks_name_the_problem():
    q, k, v = _inputs(2, 2, 4, 4, 8)
    op = torch.ops.dvae_kernels.attention_fwd
    with pytest.raises(RuntimeError, match="k and v must have one shape"):
        op(q, k, v[:, :, :3], False, 1.0)
    with pytest.raises(RuntimeError, match="must agree in B, H and D"):
        op(q[:1], k, v, False, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k, v, False, 1.0)
    with pytest.raises(RuntimeError, match="unit stride"):
        op(q.transpose(2, 3), k, v, False, 1.0)
    with pytest.raises(RuntimeError, match="at least one position"):
        op(q, k[:, :, :0], v[:, :, :0], False, 1.0)


def test_opcheck():
    q, k, v = (t.requires_grad_() for t in _inputs(2, 2, 5, 5, 8))
    import importlib

    op = importlib.import_module("dvae_kernels.attention")._op
    torch.library.opcheck(op, (q, k, v, True, 8 ** -0.5))


def test_model_layers_agree_with_sdpa(monkeypatch):
    """An encoder's teacher-forced pass and its gradients are SDPA's up to float32 rounding."""
    from dvae.models import ARTransformerEncoder

    torch.manual_seed(0)
    enc = ARTransformerEncoder((1, 8, 8), 6, 11, d_model=32, num_heads=4, enc_layers=1,
                               dec_layers=2, num_patches=4)
    x = torch.randn(3, 1, 8, 8)
    tokens = torch.randint(0, 11, (3, 2, 6))

    def run():
        enc.zero_grad()
        h = enc.teacher_forced(enc.encode(x), tokens)
        h.square().sum().backward()
        return h.detach(), [p.grad.clone() for p in enc.parameters() if p.grad is not None]

    h, grads = run()
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")  # every op through SDPA and torch
    h_ref, grads_ref = run()
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
