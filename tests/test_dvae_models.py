"""The encoder (KV-cache sampler vs teacher-forced pass, causality, token 0), patches,
decoders and likelihoods."""

import math

import pytest
import torch

import dvae_kernels
from dvae.models import (
    ARTransformerEncoder,
    Bernoulli,
    Gaussian,
    MLPDecoder,
    Patcher,
    ResNetDecoder,
)


def _encoder(L=6, V=11, layers=2, P=None):
    torch.manual_seed(0)
    return ARTransformerEncoder((1, 8, 8), L, V, d_model=32, num_heads=4, enc_layers=layers,
                                dec_layers=layers, num_patches=P or 4).eval()


def test_sampler_logp_equals_teacher_forced_logp():
    enc = _encoder()
    x = torch.randn(3, 1, 8, 8)
    mem = enc.encode(x)
    tokens, logp = enc.sample(mem, 4, generator=torch.Generator().manual_seed(3))
    assert tokens.shape == (3, 4, 6) and tokens.dtype == torch.int64
    assert bool(((tokens >= 0) & (tokens < 11)).all())
    hidden = enc.teacher_forced(mem, tokens)
    tf_logp = dvae_kernels.token_logprobs(enc.head(hidden), tokens, backend="torch")
    torch.testing.assert_close(logp, tf_logp, atol=2e-5, rtol=1e-5)


def test_sampler_with_kernel_sampler_matches_teacher_forced():
    fused = getattr(dvae_kernels, "linear_sample_tokens", None)
    if fused is None:
        pytest.skip("dvae_kernels has no linear_sample_tokens yet")
    enc = _encoder()
    mem = enc.encode(torch.randn(2, 1, 8, 8))

    def sampler(h, g):
        return fused(h, enc.head.weight, enc.head.bias, generator=g, backend="torch")

    tokens, logp = enc.sample(mem, 3, generator=torch.Generator().manual_seed(1),
                              sampler=sampler)
    tf = dvae_kernels.token_logprobs(enc.head(enc.teacher_forced(mem, tokens)), tokens)
    torch.testing.assert_close(logp, tf, atol=2e-5, rtol=1e-5)


def test_teacher_forced_pass_is_causal_and_token_zero_is_a_token():
    enc = _encoder()
    mem = enc.encode(torch.randn(1, 1, 8, 8))
    a = torch.tensor([[[3, 0, 5, 1, 2, 7]]])
    b = a.clone()
    b[0, 0, 1] = 4  # change position 1 only
    la, lb = enc.head(enc.teacher_forced(mem, a)), enc.head(enc.teacher_forced(mem, b))
    # positions 0 and 1 cannot see z_1; position 2 onwards must (token 0 is not padding)
    torch.testing.assert_close(la[..., :2, :], lb[..., :2, :])
    assert (la[..., 2:, :] - lb[..., 2:, :]).abs().max() > 1e-3
    # the start token has its own embedding row, distinct from token 0
    assert enc.tok_embed.num_embeddings == 12


def test_sample_frequencies_match_probabilities():
    enc = _encoder(L=1, V=3, layers=1)
    mem = enc.encode(torch.randn(1, 1, 8, 8))
    n = 6000
    tokens, logp = enc.sample(mem, n, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(enc.head(enc.teacher_forced(mem, tokens[:, :1]))[0, 0, 0], -1)
    freq = torch.bincount(tokens.flatten(), minlength=3).double() / n
    bound = 5 * torch.sqrt(probs.double() * (1 - probs.double()) / n) + 1e-3
    assert bool(((freq - probs.double()).abs() <= bound).all()), (freq, probs)


def test_sample_shapes_and_caches_static():
    enc = _encoder(L=5, V=9)
    mem = enc.encode(torch.randn(2, 1, 8, 8))
    g = torch.Generator().manual_seed(0)
    t1, _ = enc.sample(mem, 3, generator=g)
    g.manual_seed(0)
    t2, _ = enc.sample(mem, 3, generator=g)
    assert torch.equal(t1, t2)  # the generator alone decides the draw


def test_patcher_mnist_layout_and_order():
    p = Patcher(28, 28, 1, 8)
    assert p.grid == (2, 4) and p.patch_size == (14, 8) and p.canvas == (28, 32)
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).view(2, 1, 28, 28)
    patches = p.patchify(x)
    assert patches.shape == (2, 8, 14 * 8)
    # patch 0 holds rows 0..13, canvas columns 0..7 = image columns -2..5 (2 columns of pad)
    first = patches[0, 0].view(14, 8)
    assert torch.equal(first[:, :2], torch.zeros(14, 2))
    assert torch.equal(first[:, 2:], x[0, 0, :14, :6])
    q = Patcher(32, 32, 3, 64)
    assert q.grid == (8, 8) and q.patch_size == (4, 4) and q.patch_dim == 48
    with pytest.raises(ValueError, match="x must be"):
        q.patchify(torch.zeros(1, 1, 32, 32))


def test_decoders_shapes():
    mlp = MLPDecoder((1, 28, 28), 8, 256, 64, [64, 256], 1)
    assert mlp(torch.randint(0, 256, (5, 8))).shape == (5, 1, 28, 28)
    res = ResNetDecoder((3, 32, 32), 64, 512, 128, 64, 2, 2)
    assert res(torch.randint(0, 512, (2, 64))).shape == (2, 6, 32, 32)
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in res.modules()) == 2
    big = ResNetDecoder((3, 64, 64), 64, 16, 8, 8, 1, 2)  # 8x8 grid -> 64: 3 upsamplings
    assert big(torch.randint(0, 16, (1, 64))).shape == (1, 6, 64, 64)
    with pytest.raises(ValueError, match="square token grid"):
        ResNetDecoder((3, 32, 32), 8, 16, 8, 8, 1, 2)


def test_likelihoods_match_torch_distributions():
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 5, 5)
    x = (torch.rand(4, 1, 5, 5) > 0.5).float()
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(Bernoulli().log_prob(logits, x), ref)
    g = Gaussian(0.01, 1.0)
    params = torch.randn(4, 2, 5, 5) * 3
    xg = torch.randn(4, 1, 5, 5)
    mean, logvar = params[:, :1], params[:, 1:].clamp(math.log(0.01), 0.0)
    ref = torch.distributions.Normal(mean, (0.5 * logvar).exp()).log_prob(xg).sum((1, 2, 3))
    torch.testing.assert_close(g.log_prob(params, xg), ref, atol=1e-4, rtol=1e-5)
    # [N, K, ...] parameters broadcast against [N, 1, ...] pixels
    out = g.log_prob(params.view(2, 2, 2, 5, 5), xg[:2, None])
    assert out.shape == (2, 2)
