"""Replication fidelity (docs/algorithm.md): the authors' initialisation, per-sample
BatchNorm statistics, float32 rewards and log q under bf16 autocast, the paper's ImageNet
evaluation protocol."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dvae.config import load_config
from dvae.models import build_model
from dvae.models.decoders import ResNetDecoder, SampleBatchNorm2d
from dvae.models.encoder import CrossAttention, SelfAttention


def _stats_ok(w: torch.Tensor, std: float, *, bound: float | None = None) -> None:
    """Sample standard deviation within 5% of ``std`` (the tensors have >= 4096 entries),
    mean near 0, and, for truncated normals, nothing beyond ``bound``."""
    w = w.detach().double().flatten()
    assert w.numel() >= 4096
    assert abs(w.std().item() / std - 1) < 0.05, (w.std().item(), std)
    assert abs(w.mean().item()) < 4 * std / math.sqrt(w.numel())
    if bound is not None:
        assert w.abs().max().item() <= bound * (1 + 1e-6)


@pytest.mark.parametrize("preset", ["mnist", "imagenet256"])
def test_initialisation_is_the_authors(preset):
    cfg = load_config(preset, ["dataset=synthetic", "latent_len=64", "image_size=64"]
                      if preset == "imagenet256" else ["dataset=synthetic"])
    torch.manual_seed(0)
    model = build_model(cfg)
    d = cfg.d_model
    enc = model.encoder
    # q, k, v: Xavier-uniform per (d, d) projection: std sqrt(2 / (d + d)), bound sqrt(6 / 2d)
    for m in enc.modules():
        if isinstance(m, SelfAttention):
            for block in m.qkv.weight.chunk(3):
                _stats_ok(block, math.sqrt(1 / d), bound=math.sqrt(3 / d))
        if isinstance(m, CrossAttention):
            for block in m.kv.weight.chunk(2):
                _stats_ok(block, math.sqrt(1 / d), bound=math.sqrt(3 / d))
    # patch projection: lecun normal (truncated at 2 sigma of its scale), zero bias
    fan = enc.patch_proj.weight.shape[1]
    _stats_ok(enc.patch_proj.weight, 1 / math.sqrt(fan), bound=2 / math.sqrt(fan) / 0.8796)
    assert not enc.patch_proj.bias.any()
    # encoder token embedding N(0, 1) (the reference's), decoder's truncated normal 1/sqrt(d)
    _stats_ok(enc.tok_embed.weight, 1.0)
    _stats_ok(model.decoder.embed.weight, 1 / math.sqrt(d),
              bound=2 / math.sqrt(d) / 0.8796)
    # decoder Dense / Conv / ConvTranspose: lecun normal over flax's fan_in, zero bias
    for m in model.decoder.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            if isinstance(m, nn.Linear):
                fan = m.in_features
            else:
                fan = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            if m.weight.numel() >= 4096:
                _stats_ok(m.weight, 1 / math.sqrt(fan), bound=2 / math.sqrt(fan) / 0.8796)
            assert not m.bias.any()
    if preset == "imagenet256":
        bns = [m for m in model.decoder.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(m.momentum == 0.01 for m in bns)  # flax momentum 0.99


def test_batchnorm_statistics_are_per_sample_index():
    torch.manual_seed(0)
    N, K, C = 5, 3, 4
    bn = SampleBatchNorm2d(C).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(N, K, C, 6, 6) * torch.arange(1, K + 1).view(1, K, 1, 1, 1) + 3
    bn.groups = K
    y = bn(x.view(N * K, C, 6, 6)).view(N, K, C, 6, 6)
    xd = x.double()
    for k in range(K):
        mean = xd[:, k].mean((0, 2, 3), keepdim=True)
        var = xd[:, k].var((0, 2, 3), unbiased=False, keepdim=True)
        ref = (xd[:, k] - mean) / torch.sqrt(var + bn.eps)
        ref = ref * bn.weight.double().view(1, C, 1, 1) + bn.bias.double().view(1, C, 1, 1)
        torch.testing.assert_close(y[:, k].double(), ref, atol=1e-5, rtol=1e-5)
    n = N * 36
    per_k_var = torch.stack([xd[:, k].var((0, 2, 3), unbiased=False) for k in range(K)])
    expect_mean = 0.01 * xd.mean((0, 3, 4)).mean(0)
    expect_var = 0.99 + 0.01 * (per_k_var * n / (n - 1)).mean(0)
    torch.testing.assert_close(bn.running_mean.double(), expect_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), expect_var, atol=1e-6, rtol=1e-5)
    # one sample per image (evaluation batches): plain BatchNorm
    bn.groups = 1
    plain = nn.BatchNorm2d(C, momentum=0.01).train()
    plain.load_state_dict(bn.state_dict())
    z = torch.randn(7, C, 6, 6)
    torch.testing.assert_close(bn(z), plain(z))


def test_resnet_decoder_passes_K_to_its_batchnorms():
    torch.manual_seed(0)
    dec = ResNetDecoder((3, 32, 32), 64, 16, 32, 16, 1, 2).train()
    tokens = torch.randint(0, 16, (2, 4, 64))
    joint = dec(tokens.view(8, 64), groups=4).view(2, 4, 6, 32, 32)
    # each sample index normalised on its own: decoding k alone (N images) gives the same
    for k in range(4):
        alone = dec(tokens[:, k], groups=1)
        torch.testing.assert_close(joint[:, k], alone, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_step_matches_fp32_weights():
    """The DAPS weights of one step under CPU bf16 autocast lie within 0.05 (absolute, on
    weights in [0, 1]) of the float32 step's, on the same samples: the likelihood parameters,
    the rewards and log q are computed and summed in float32 either way; only the transformer
    and decoder bodies run in bf16."""
    import dvae_kernels
    from dvae.train_step import TrainStep

    cfg = load_config("cifar10", ["dataset=synthetic", "batch_size=4", "num_samples=8",
                                  "latent_len=16", "d_model=32", "resnet_hidden=16",
                                  "eta_mode=solved", "enc_layers=1", "dec_layers=1"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randn(4, 3, 32, 32)
    tokens, _ = model.sample(x, 8, generator=torch.Generator().manual_seed(1))
    out = {}
    for amp in (False, True):
        step = TrainStep(model, cfg)
        step.use_amp = amp
        with step.autocast():
            res = model(x, tokens)
        with step.fp32():
            head = model.encoder.head
            logq = dvae_kernels.linear_token_logprobs(res["hidden"].float(), head.weight,
                                                      tokens, head.bias).sum(-1)
        rewards = res["logpx"].detach()
        assert rewards.dtype == torch.float32 and logq.dtype == torch.float32
        weights, _ = dvae_kernels.daps_weights(rewards, logq.detach(), 0.5, 1.0)
        out[amp] = rewards, logq.detach(), weights
    (r32, _, w32), (r16, _, w16) = out[False], out[True]
    assert ((r16 - r32).abs() / r32.abs()).max() < 0.01
    assert (w16 - w32).abs().max() < 0.05, (w16 - w32).abs().max()


@pytest.mark.parametrize("protocol", ["paper", "center_crop"])
def test_imagenet_evaluation_protocol(tmp_path, protocol):
    from PIL import Image

    from dvae.data import ImageFolderImages

    root = tmp_path / "val" / "a"
    root.mkdir(parents=True)
    # a 64x32 image: left half black, right half white; paper: the whole image squeezed to
    # 16x16 keeps both halves; center_crop keeps the middle 32x32 (a quarter black, ...)
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, 32:] = 255
    Image.fromarray(a).save(root / "x.png")
    ds = ImageFolderImages(tmp_path / "val", 16, train=False, eval_protocol=protocol)
    img = ds.try_load(0)
    assert img.shape == (3, 16, 16)
    if protocol == "paper":
        assert img[:, :, :7].max() < 0.05 and img[:, :, 9:].min() > 0.95
    else:
        assert img[:, :, :4].max() < 0.05 and img[:, :, 12:].min() > 0.95
        assert img[:, :, 9:].min() > 0.95  # the right half of the crop is white
    with pytest.raises(ValueError, match="eval_protocol"):
        ImageFolderImages(tmp_path / "val", 16, train=False, eval_protocol="squash")


def test_imagenet_preset_evaluates_like_the_paper():
    cfg = load_config("imagenet256")
    assert cfg.eval_protocol == "paper" and cfg.eval_samples == 0  # all 50,000 images


@pytest.mark.parametrize("fp32_outputs", [True, False])
def test_fp32_outputs_switch(fp32_outputs):
    """Under autocast the likelihood parameters (and the encoder head) are float32 with
    fp32_outputs=true (the default), bf16 like the layers before them with false."""
    cfg = load_config("cifar10", ["dataset=synthetic", "latent_len=16", "d_model=32",
                                  "resnet_hidden=16", f"fp32_outputs={fp32_outputs}"])
    model = build_model(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.latent_len))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params = model.decode(tokens)
        hidden = torch.randn(4, 32)
        tok, lp = model.encoder._default_sampler(1.0)(hidden, None)
    assert params.dtype == (torch.float32 if fp32_outputs else torch.bfloat16)
    assert lp.dtype == torch.float32 and tok.shape == (4,)
