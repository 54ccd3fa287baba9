"""rFID: the real code path (pytorch-fid's FID Inception loaded from a local file, never a
download) with randomly initialised weights of the same architecture, and the Fréchet
distance against a float64 computation."""

import json

import numpy as np
import pytest
import torch

from dvae import fid
from dvae.cli import main


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A state dict of pytorch-fid's FID Inception architecture, randomly initialised: the
    blocks that differ from torchvision's Inception-v3, swapped in as pytorch-fid does."""
    from pytorch_fid import inception as pfi

    torch.manual_seed(0)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    for m in net.modules():  # He init keeps activations alive through the 90-odd layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fid") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_identical_sets_score_zero_and_shifted_sets_more(random_weights):
    net = fid.inception(random_weights)
    torch.manual_seed(1)
    a = torch.rand(4, 3, 16, 16)
    r = fid.RFID(net)
    real = r._features(a)
    assert real.shape == (4, fid.FEATURES)
    for features in (real, r._features(a.mean(1, keepdim=True))):  # grey: repeated to 3
        same, other = fid.FeatureStats(), fid.FeatureStats()
        same.add(features)
        other.add(features.clone())
        assert abs(fid.frechet_distance(same, other)) < 1e-3
    shifted = fid.FeatureStats()
    shifted.add(r._features(a * 0.5 + 0.5))
    stats = fid.FeatureStats()
    stats.add(real)
    assert fid.frechet_distance(stats, shifted) > 1e-2


def test_frechet_distance_matches_float64():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(200, 8)))
    y = torch.from_numpy(rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 0.3)
    a, b = fid.FeatureStats(8), fid.FeatureStats(8)
    for chunk in x.split(64):
        a.add(chunk.float())
    b.add(y.float())
    xd, yd = x.float().double(), y.float().double()
    mu1, mu2 = xd.mean(0), yd.mean(0)
    s1, s2 = torch.cov(xd.T), torch.cov(yd.T)

    def sqrtm(m):
        w, v = torch.linalg.eigh(m)
        return v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T

    r1 = sqrtm(s1)
    ref = ((mu1 - mu2) ** 2).sum() + torch.trace(s1 + s2 - 2 * sqrtm(r1 @ s2 @ r1))
    assert fid.frechet_distance(a, b) == pytest.approx(ref.item(), rel=1e-6)
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(ValueError, match=fid.WEIGHTS_FILE + ".*put the file at"):
        fid.inception()
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not the FID Inception weights"):
        fid.inception(bad)


def test_dvae_eval_fid(tmp_path, capsys, random_weights):
    out = tmp_path / "run"
    assert main(["train", f"out_dir={out}", "steps=2", "batch_size=16", "num_samples=2",
                 "eval_every=0", "eval_samples=8", "progress=false", "tensorboard=false",
                 "d_model=32", "mlp_hidden=[32]"]) == 0
    capsys.readouterr()
    ck = str(out / "checkpoint.pt")
    assert main(["eval", "--checkpoint", ck, "--fid", f"fid_weights={random_weights}",
                 "eval_samples=4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["eval_images"] == 4 and res["rfid"] > 0
    missing = tmp_path / "nope.pth"
    assert main(["eval", "--checkpoint", ck, "--fid", f"fid_weights={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dvae: error: rFID needs") and str(missing) in err[0]


def test_prior_generation_fid(tmp_path, capsys, random_weights):
    """A prior's generation FID, its references and precision/recall in Inception features
    (metrics=inception; the grey digits repeated to three channels); no label accuracy."""
    out = tmp_path / "run"
    assert main(["train", f"out_dir={out}", "steps=2", "batch_size=16", "num_samples=2",
                 "eval_every=0", "eval_samples=8", "progress=false", "tensorboard=false",
                 "d_model=32", "mlp_hidden=[32]"]) == 0
    assert main(["prior", "train", "--tokenizer", str(out / "checkpoint.pt"), "steps=2",
                 "batch_size=8", "d_model=32", "layers=1", "dt=0.5", "eval_samples=6",
                 "metrics=inception", f"fid_weights={random_weights}", "progress=false",
                 "tensorboard=false", "grid_per_label=1"]) == 0
    capsys.readouterr()
    test = [json.loads(line) for line in open(out / "prior" / "metrics.jsonl")][-1]
    assert test["fid"] > 0 and test["fid_recon"] > 0 and test["fid_data"] > 0
    assert 0 <= test["precision"] <= 1 and 0 <= test["recall"] <= 1
    assert test["label_accuracy"] is None and "fd" not in test
