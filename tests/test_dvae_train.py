"""Training: convergence on real data (scikit-learn digits), exact resume, the CLI."""

import json

from utils import assert_bitwise_equal

from dvae.cli import main
from dvae.config import load_config
from dvae.data import load_digits_split
from dvae.metrics import psnr
from dvae.trainer import Trainer


def _tiny(tmp_path, **kw):
    values = dict(out_dir=str(tmp_path), progress=False, tensorboard=False, batch_size=16,
                  num_samples=4, steps=6, log_every=1, eval_every=0, ckpt_every=0,
                  eval_samples=32, d_model=32, mlp_hidden=[64])
    values.update(kw)
    return load_config("digits", [f"{k}={v}" for k, v in values.items()])


def test_convergence_on_digits(tmp_path):
    """A few hundred steps must beat, clearly, the best image that ignores the latents (the
    training mean), so the codes carry information about each image."""
    cfg = load_config("digits", [f"out_dir={tmp_path}", "progress=false",
                                 "tensorboard=false", "steps=1000", "eval_every=0",
                                 "log_every=50", "ckpt_every=0", "batch_size=32"])
    trainer = Trainer(cfg)
    before = trainer.evaluate()
    res = trainer.run()
    train, test = load_digits_split(0)
    mean_image = train.images.mean(0, keepdim=True).expand_as(test.images)
    baseline = psnr(mean_image, test.images).mean().item()
    assert res["test_log_px"] > before["log_px"] + 20, (before, res)
    # 1000 steps: 14.2 and 13.6 dB for seeds 0 and 1 against 11.4 dB for the mean image, with
    # the authors' initialisation (its 1/sqrt(d) decoder embedding starts slower than N(0, 1):
    # 12.9 and 12.0 dB at 600 steps; at the demo's 1500 steps both inits reach 15.6-16.1 dB).
    assert res["test_psnr"] > baseline + 1.5, (baseline, res)
    assert res["skipped"] == 0


def _state(trainer):
    s = trainer.state()
    return s["model"], s["optimizer"], s["eta_optimizer"], s["generators"], s["rng_cpu"]


def test_exact_resume_is_bitwise(tmp_path):
    for mode in ("learned", "solved"):
        straight = Trainer(_tiny(tmp_path / f"a_{mode}", eta_mode=mode))
        straight.run()
        first = Trainer(_tiny(tmp_path / f"b_{mode}", eta_mode=mode))
        first.run(until=3)
        first.save()
        first.close()
        resumed = Trainer(_tiny(tmp_path / f"b_{mode}", eta_mode=mode), resume=True)
        assert resumed.step == 3 and resumed.batches_consumed == 3
        resumed.run()
        assert_bitwise_equal(_state(straight), _state(resumed))


def test_cli_train_eval_reconstruct(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", f"out_dir={out}", "steps=4", "batch_size=16", "num_samples=2",
                 "log_every=2", "eval_every=0", "eval_samples=16", "progress=false"]) == 0
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == [2, 4]
    test = [r for r in lines if r["split"] == "test"]
    assert len(test) == 1 and {"psnr", "ssim", "beta_elbo", "codebook_usage",
                               "perplexity"} <= test[0].keys()
    assert (out / "reconstructions.png").stat().st_size > 0
    assert any((out / "tb").iterdir())
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "eval_samples=8"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 4 and res["eval_images"] == 8
    png = tmp_path / "r.png"
    assert main(["reconstruct", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(png),
                 "--count", "4"]) == 0
    assert png.stat().st_size > 0
    assert main(["train", "no_such_key=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_config_files_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: mnist\nbatch_size: 7\nlr: 1e-3\n")
    cfg = load_config(str(f), ["num_samples=3", "mlp_hidden=[8, 9]", "kernel_backend=torch"])
    assert (cfg.dataset, cfg.batch_size, cfg.lr, cfg.num_samples) == ("mnist", 7, 1e-3, 3)
    assert cfg.mlp_hidden == [8, 9] and cfg.kernel_backend == "torch"
    assert load_config("imagenet256").ess_target == 0.25
    for bad, msg in (("eta_mode=maybe", "eta_mode"), ("batch_size=0", "batch_size"),
                     ("lr=fast", "lr expects"), ("steps=1.5", "steps expects")):
        try:
            load_config("digits", [bad])
        except ValueError as err:
            assert msg in str(err)
        else:
            raise AssertionError(bad)
