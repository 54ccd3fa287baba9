"""The KV-cache sampler, however it is restructured for speed (decode attention, hoisted
casts, one cache write, a captured graph), draws the same tokens with the same log-probs as
the original loop for the same seed. ``_original_sample`` below is that loop, written out from
the encoder's weights as it was before the restructuring (full static cache, boolean causal
row mask, SDPA over all L slots)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import dvae_kernels
from dvae.models import ARTransformerEncoder


def _encoder(L=7, V=13, layers=2, heads=4, d=32):
    torch.manual_seed(0)
    return ARTransformerEncoder((1, 8, 8), L, V, d_model=d, num_heads=heads, enc_layers=1,
                                dec_layers=layers, num_patches=4).eval()


def _heads(x, h):
    B, T, D = x.shape
    return x.view(B, T, h, D // h).transpose(1, 2)


def _merge(x):
    B, h, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, h * dh)


@torch.no_grad()
def _original_sample(enc, memory, K, generator, sampler):
    """The plain sampling loop the KV-cache sampler replaces (a full static cache, a boolean
    row mask, SDPA over all L slots), from the weights (float32, CPU): the oracle."""
    N = memory.shape[0]
    L, V, h = enc.latent_len, enc.vocab_size, enc.num_heads
    B, dh = N * K, enc.d_model // h
    mem_kv = []
    for blk in enc.dec_blocks:
        k, v = blk.cross_attn.kv(memory).chunk(2, dim=-1)
        mem_kv.append((_heads(k, h), _heads(v, h)))
    caches = [(memory.new_zeros(B, h, L, dh), memory.new_zeros(B, h, L, dh))
              for _ in enc.dec_blocks]
    masks = torch.ones(L, L, dtype=torch.bool).tril()
    tokens = torch.empty(B, L, dtype=torch.long)
    logp = torch.empty(B, L)
    prev = torch.full((B,), V, dtype=torch.long)
    for t in range(L):
        x = (enc.tok_embed(prev) + enc.tok_pos[t])[:, None, :]
        for blk, (mk, mv), (kc, vc) in zip(enc.dec_blocks, mem_kv, caches):
            a = blk.self_attn
            q, k, v = a.qkv(blk.ln1(x)).chunk(3, dim=-1)
            kc[:, :, t:t + 1] = _heads(k, h)
            vc[:, :, t:t + 1] = _heads(v, h)
            y = F.scaled_dot_product_attention(_heads(q, h), kc, vc, attn_mask=masks[t:t + 1])
            x = x + a.out(_merge(y))
            c = blk.cross_attn
            y = F.scaled_dot_product_attention(
                _heads(c.q(blk.ln2(x).view(N, K, -1)), h), mk, mv)
            x = x + c.out(_merge(y)).view(B, 1, -1)
            x = x + blk.mlp(blk.ln3(x))
        tok, lp = sampler(enc.dec_ln(x[:, 0]), generator)
        tokens[:, t] = tok
        logp[:, t] = lp
        prev = tok
    return tokens.view(N, K, L), logp.view(N, K, L)


def _default_sampler(enc):
    def sample(hidden, generator):
        logq = torch.log_softmax(enc.head(hidden).float(), dim=-1)
        u = torch.rand(logq.shape, generator=generator)
        tok = torch.argmax(logq - torch.log(-torch.log(u.clamp_min(1e-20))), dim=-1)
        return tok, logq.gather(-1, tok[:, None])[:, 0]
    return sample


def _fused_sampler(enc):
    def sample(hidden, generator):
        return dvae_kernels.linear_sample_tokens(hidden, enc.head.weight, enc.head.bias,
                                                 generator=generator, backend="torch")
    return sample


@pytest.mark.parametrize("which", ["default", "fused"])
@pytest.mark.parametrize("layers,L", [(1, 5), (2, 7)])
def test_sampler_draws_what_the_original_loop_draws(which, layers, L):
    enc = _encoder(L=L, layers=layers)
    mem = enc.encode(torch.randn(3, 1, 8, 8))
    K = 4
    ref_sampler = _default_sampler(enc) if which == "default" else _fused_sampler(enc)
    ref_tokens, ref_logp = _original_sample(enc, mem, K, torch.Generator().manual_seed(5),
                                            ref_sampler)
    sampler = None if which == "default" else _fused_sampler(enc)
    tokens, logp = enc.sample(mem, K, generator=torch.Generator().manual_seed(5),
                              sampler=sampler)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logp, ref_logp, atol=2e-6, rtol=2e-6)
    # and both equal the teacher-forced pass
    tf = dvae_kernels.token_logprobs(enc.head(enc.teacher_forced(mem, tokens)), tokens,
                                     backend="torch")
    torch.testing.assert_close(logp, tf, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("which", ["default", "fused"])
def test_sampler_with_the_cuda_kernels_draws_what_the_original_loop_draws(which):
    """The CUDA path's sampler (decode attention, add + LayerNorm and projection + add +
    LayerNorm as Triton kernels, here through the interpreter, float32) draws the original
    loop's tokens; log-probs agree to float32 rounding."""
    from dvae_kernels import _dispatch

    enc = _encoder(L=6, layers=2)
    mem = enc.encode(torch.randn(2, 1, 8, 8))
    ref_sampler = _default_sampler(enc) if which == "default" else _fused_sampler(enc)
    ref_tokens, ref_logp = _original_sample(enc, mem, 3, torch.Generator().manual_seed(7),
                                            ref_sampler)
    with _dispatch.as_if_cuda():  # the CUDA path's choices: the Triton kernels, interpreted
        tokens, logp = enc.sample(mem, 3, generator=torch.Generator().manual_seed(7),
                                  sampler=None if which == "default" else _fused_sampler(enc))
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logp, ref_logp, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
def test_cuda_path_sampler_under_bf16_autocast_matches_teacher_forced():
    """The CUDA path's sampler in bf16 (the fused kernels through the interpreter, weights cast
    once per call, fc1 + ReLU through _addmm_activation): valid tokens whose log-probs equal
    the teacher-forced pass's to bf16 rounding."""
    from dvae_kernels import _dispatch

    enc = _encoder(L=4, layers=2)
    mem = enc.encode(torch.randn(2, 1, 8, 8))
    with _dispatch.as_if_cuda(), torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, logp = enc.sample(mem, 3, generator=torch.Generator().manual_seed(2),
                                  sampler=_fused_sampler(enc))
    assert tokens.shape == (2, 3, 4) and bool(((tokens >= 0) & (tokens < 13)).all())
    tf = dvae_kernels.token_logprobs(enc.head(enc.teacher_forced(mem, tokens)), tokens,
                                     backend="torch")
    torch.testing.assert_close(logp, tf, atol=0.15, rtol=0.05)
