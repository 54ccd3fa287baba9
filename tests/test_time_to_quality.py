"""The cheaper DAPS step keeps the paper's estimator, η can start from the exact solve, the
``fast`` recipe bundles them, and runs write learning curves that ``dvae compare --curves``
reads (README, "Time to quality").

Unbiasedness is shown exactly, in float64: the expectation over the random choices (every
subset of K′ decoder samples; every draw of the encoder's sequences, weighted by its
probability) of the update equals the paper's update."""

import copy
import csv
import itertools
import json
import math

import pytest
import torch

from dvae import daps
from dvae.config import load_config
from dvae.models import build_model
from dvae.train_step import TrainStep


def _cfg(**over):
    keys = dict(latent_len=4, vocab_size=6, d_model=8, num_heads=2, mlp_hidden=[16],
                batch_size=3, num_samples=3, beta_start=0.3, beta_end=0.3, steps=10,
                kernel_backend="torch", fused_linear="never", clip=0.0, threads=1,
                fp32_outputs=False)
    keys.update(over)
    return load_config("digits", [f"{k}={json.dumps(v)}" for k, v in keys.items()])


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).double().train()


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("decoder", ["mlp", "resnet"])
def test_decoder_subset_is_exactly_unbiased_and_rewards_unchanged(decoder):
    """Averaged over the C(K, K′) subsets, the decoder's gradient on K′ samples is the
    gradient on all K; the rewards of all K are the single call's; batch-norm running
    averages move as after one call over all K."""
    K, kt = 4, 2
    over = dict(num_samples=K, decoder=decoder, resnet_hidden=4, resnet_blocks=1)
    cfg = _cfg(**over)
    model = _model(cfg)
    start = copy.deepcopy(model.state_dict())
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    tokens = torch.randint(0, 6, (3, K, 4), generator=torch.Generator().manual_seed(1))

    full = model(x, tokens)
    (-full["logpx"].mean()).backward()
    expected = _grads(model)
    after_full = copy.deepcopy(model.state_dict())

    total: dict[str, torch.Tensor] = {}
    subsets = list(itertools.combinations(range(K), kt))
    for chosen in subsets:
        model.load_state_dict(start)
        rest = [k for k in range(K) if k not in chosen]
        order = torch.tensor(list(chosen) + rest)
        out = model(x, tokens, order=order, decoder_samples=kt)
        torch.testing.assert_close(out["logpx"], full["logpx"], rtol=0, atol=1e-12)
        assert out["decoder_logpx"].shape == (3, kt)
        (-out["decoder_logpx"].mean()).backward()
        for n, g in _grads(model).items():
            total[n] = total.get(n, 0) + g / len(subsets)
        for name, value in model.state_dict().items():  # the running averages, exactly
            torch.testing.assert_close(value, after_full[name], rtol=0, atol=1e-14,
                                       msg=lambda m, name=name: f"{name}: {m}")
    decoder_grads = [n for n in expected if n.startswith("decoder.")]
    assert decoder_grads
    for n in decoder_grads:
        torch.testing.assert_close(total[n], expected[n], rtol=1e-10, atol=1e-12)


def test_draws_follow_the_weights():
    w = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    rows = daps.draw_from_weights(w, 20000, torch.Generator().manual_seed(0))
    freq = torch.stack([torch.bincount(r, minlength=4) for r in rows]).double() / 20000
    assert (freq[0, 3] == 0).item()
    assert torch.allclose(freq, w.double(), atol=0.015)


def _fixed_samples(model, x, K, seed, monkeypatch):
    """Fix the step's samples: K sequences per image and their teacher-forced log q in float64
    (what the sampler returns, tests/test_dvae_models.py), so that every call sees them."""
    tokens = torch.randint(0, 6, (x.shape[0], K, 4), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hidden = model.encoder.teacher_forced(model.encoder.encode(x), tokens)
        logq_tok = torch.log_softmax(model.encoder.head(hidden), -1).gather(
            -1, tokens[..., None])[..., 0]
    monkeypatch.setattr(TrainStep, "sample", lambda self, x: (tokens, logq_tok))
    return tokens, logq_tok


def _objective_grads(cfg, model, x, rows=None, monkeypatch=None):
    """One DAPS objective (backward included) on the fixed samples; ``rows`` replaces the
    draws from the weights."""
    if rows is not None:
        monkeypatch.setattr(daps, "draw_from_weights", lambda w, num, g: rows)
    step = TrainStep(model, cfg, generator=torch.Generator().manual_seed(0))
    metrics = step.objective(x, 3)
    return metrics, _grads(model)


def test_encoder_resampling_is_exactly_unbiased(monkeypatch):
    """Over every draw of one sequence per image (K^N of them, each weighted by its
    probability under the DAPS weights), the resampled step's expected gradient is the
    paper's: encoder, decoder and log η."""
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    paper_cfg = _cfg(batch_size=2, eta_init=20.0, eta_mode="learned")
    model = _model(paper_cfg)
    start = copy.deepcopy(model.state_dict())
    tokens, logq_tok = _fixed_samples(model, x, 3, 4, monkeypatch)
    paper, expected = _objective_grads(paper_cfg, model, x)

    cfg = _cfg(batch_size=2, eta_init=20.0, eta_mode="learned", encoder_samples=1)
    model.load_state_dict(start)
    rewards = model.score(x, tokens)
    _, w, _ = daps.trust_region(rewards, logq_tok.sum(-1), model.log_eta.detach(), 0.3,
                                ess_target=cfg.ess_target, eta_mode="learned",
                                backend="torch")
    total: dict[str, torch.Tensor] = {}
    for draw in itertools.product(range(3), repeat=2):
        model.load_state_dict(start)
        metrics, grads = _objective_grads(cfg, model, x, torch.tensor(draw)[:, None],
                                          monkeypatch)
        prob = w[0, draw[0]] * w[1, draw[1]]
        for n, g in grads.items():
            total[n] = total.get(n, 0) + prob * g
    assert metrics["log_px"].item() == pytest.approx(paper["log_px"].item(), rel=1e-12)
    assert metrics["ess_frac"].item() == pytest.approx(paper["ess_frac"].item(), rel=1e-12)
    assert set(total) == set(expected)
    for n in expected:
        torch.testing.assert_close(total[n], expected[n], rtol=1e-9, atol=1e-12,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_resampled_loss_formula(monkeypatch):
    """K″ = 2 drawn sequences, K′ = 2: L_enc = −(1/(N·K″)) Σ log q of the drawn sequences
    from the model's own teacher-forced pass, L_dec the mean over the K′ decoder samples,
    composed by hand in float64."""
    cfg = _cfg(encoder_samples=2, decoder_samples=2)
    model = _model(cfg)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    tokens, _ = _fixed_samples(model, x, 3, 5, monkeypatch)
    rows = torch.tensor([[0, 0], [2, 1], [1, 2]])
    metrics, _ = _objective_grads(cfg, model, x, rows, monkeypatch)
    drawn = tokens.gather(1, rows[..., None].expand(-1, -1, 4))
    hidden = model.encoder.teacher_forced(model.encoder.encode(x), drawn)
    lp = torch.log_softmax(model.encoder.head(hidden), -1).gather(-1, drawn[..., None])
    assert metrics["encoder_loss"].item() == pytest.approx(-lp.sum().item() / 6, rel=1e-12)
    # the decoder's loss: the mean over some 2 of the 3 samples of each image
    logpx = model.score(x, tokens)
    pairs = [-logpx[:, list(c)].mean().item() for c in itertools.combinations(range(3), 2)]
    assert min(abs(metrics["decoder_loss"].item() - p) for p in pairs) < 1e-10


def test_each_phase_is_entered_once_per_step():
    from dvae.profiling import Phases

    cfg = _cfg(encoder_samples=2, decoder_samples=2)
    model = build_model(cfg).train()
    phases = Phases(timed=True)
    step = TrainStep(model, cfg, generator=torch.Generator().manual_seed(0), phases=phases)
    x = torch.randn(3, 1, 8, 8)
    for i in range(2):
        step(x, i)
    assert {k: len(v) for k, v in phases.times.items()} == {
        k: 2 for k in ("sample", "reward", "teacher_forced", "weights", "losses", "optimizer")}


@pytest.mark.parametrize("sampled", [False, True])
def test_eta_init_solve_starts_at_the_target_ess(sampled):
    """η₀ = 100 leaves the weights nearly uniform (ESS near K); ``eta_init=solve`` makes the
    first step's mean ESS the target ρK, then η is learned (not solved again)."""
    extra = dict(encoder_samples=2) if sampled else {}
    x = torch.randn(3, 1, 8, 8)
    out = {}
    for init in (100.0, "solve"):
        cfg = _cfg(eta_init=init, eta_mode="learned", num_samples=8, ess_target=0.33,
                   eta_lr=1e-3, **extra)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        step = TrainStep(model, cfg, generator=torch.Generator().manual_seed(0))
        first = step(x, 0)
        eta_after_first = model.log_eta.detach().clone()
        second = step(x, 1)
        out[init] = (first, second, eta_after_first, model.log_eta.detach().clone())
    assert out[100.0][0]["ess_frac"].item() > 0.9
    assert out["solve"][0]["ess_frac"].item() == pytest.approx(0.33, abs=1e-3)
    # the second step learns η from there: one AdamW step of eta_lr, no new solve
    first_eta, second_eta = out["solve"][2], out["solve"][3]
    assert 0 < abs(second_eta - first_eta).item() < 2e-3


def test_recipes_and_their_errors():
    fast = load_config("mnist", ["recipe=fast"])
    assert (fast.recipe, fast.decoder_samples, fast.encoder_samples, fast.eta_init,
            fast.lr) == ("fast", 2, 2, "solve", 2e-3)
    paper = load_config("mnist", [])
    assert (paper.recipe, paper.decoder_samples, paper.encoder_samples, paper.eta_init) == (
        "paper", None, None, 100.0)
    # a key the user gives wins over the recipe's
    assert load_config("mnist", ["recipe=fast", "decoder_samples=4"]).decoder_samples == 4
    assert load_config("mnist", ["method=daps_na", "recipe=fast"]).encoder_samples == 2
    for bad, message in (
            (["recipe=quick"], "recipe must be one of paper, fast, got 'quick'"),
            (["method=fsq", "recipe=fast"], "recipe=fast is a DAPS recipe"),
            (["decoder_samples=9"], r"decoder_samples \(K'\) must be null or in \[1, "),
            (["encoder_samples=0"], r"encoder_samples \(K''\) must be null or in \[1, "),
            (["method=vq", "encoder_samples=2"], "encoder_samples applies to daps"),
            (["eta_init=warm"], "eta_init must be a number > 0 or 'solve', got 'warm'"),
            (["eval_every_seconds=-1"], "eval_every_seconds must be >= 0")):
        with pytest.raises(ValueError, match=message):
            load_config("mnist", bad)
    assert load_config("mnist", ["eta_init=30"]).eta_init == 30.0


def test_curves_from_periodic_evaluations(tmp_path, capsys):
    """A run with eval_every_seconds writes curve points on the same first curve_samples
    test images (with the training wall-clock), then its final evaluation;
    ``dvae compare --curves`` plots them and writes the CSV; the table reads the final."""
    from dvae.cli import main
    from dvae.trainer import train

    runs = []
    for name, over in (("fast", ["recipe=fast", "eta_mode=learned"]), ("paper", [])):
        out = tmp_path / name
        cfg = load_config("digits", [f"out_dir={out}", "steps=40", "batch_size=16",
                                     "eval_every_seconds=0.05", "curve_samples=40",
                                     "eval_samples=0", "progress=false", "tensorboard=false",
                                     "log_every=10", *over])
        train(cfg)
        runs.append(out)
    records = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in records if r.get("split") == "test"]
    curve = [r for r in tests if r["eval"] == "curve"]
    assert len(curve) >= 2 and all(r["eval_images"] == 40 for r in curve)
    assert [r["train_seconds"] for r in curve] == sorted(r["train_seconds"] for r in curve)
    assert curve[-1]["step"] == 40  # a last point at the end of the run
    assert tests[-1]["eval"] == "final" and tests[-1]["eval_images"] > 40

    png, table = tmp_path / "curves.png", tmp_path / "curves.csv"
    assert main(["compare", "--curves", *map(str, runs), "--out", str(png),
                 "--csv", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "| DAPS (fast) |" in printed and "| DAPS |" in printed
    assert png.stat().st_size > 1000
    rows = list(csv.DictReader(table.open()))
    assert {r["label"] for r in rows} == {"DAPS (fast)", "DAPS"}
    assert all(r["eval_images"] == "40" for r in rows)
    # the table shows the final evaluation, not a curve point
    assert main(["compare", str(runs[0]), "--format", "csv"]) == 0
    row = list(csv.DictReader(capsys.readouterr().out.splitlines()))[0]
    assert float(row["psnr"]) == pytest.approx(tests[-1]["psnr"], abs=1e-9)

    # a run without curve points, and --curves without --out: one-line errors
    plain = tmp_path / "plain"
    train(load_config("digits", [f"out_dir={plain}", "steps=5", "batch_size=16",
                                 "progress=false", "tensorboard=false"]))
    assert main(["compare", "--curves", str(plain), "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert "no curve points: train with eval_every_seconds=S" in err
    assert main(["compare", "--curves", str(runs[0])]) == 2
    assert "--curves needs --out FILE.png" in capsys.readouterr().err


def test_step_model_prices_the_fast_recipe():
    """The GPU step model traces the fast recipe: the teacher-forced pass and the backward on
    fewer rows, so fewer FLOPs there than the paper recipe's at the same shapes (whether
    that is less time depends on the shapes: at digits' the step is launch-bound)."""
    gpu_model = pytest.importorskip("bench.gpu_model")
    docs = {}
    for recipe in ("paper", "fast"):
        recorder, cfg = gpu_model.trace_step("digits", [f"recipe={recipe}",
                                                        "eta_mode=learned"])
        docs[recipe] = gpu_model.summarise(recorder, cfg, gpu_model.GPUS["h100"])
    paper, fast = docs["paper"], docs["fast"]
    def gflop(doc, *names):
        return sum(doc["phases"][n]["gflop"] for n in names)

    assert gflop(fast, "losses") < 0.5 * gflop(paper, "losses")
    assert gflop(fast, "teacher_forced", "losses") < gflop(paper, "teacher_forced", "losses")
    assert gflop(fast, "sample") == pytest.approx(gflop(paper, "sample"))
    assert math.isfinite(fast["total_ms_eager"]) and fast["total_ms_eager"] > 0


def test_e2e_times_variants_side_by_side(tmp_path):
    """``bench.e2e --providers fused "fused[recipe=fast]"``: the paper step and the fast one
    timed in one run, phase by phase."""
    e2e = pytest.importorskip("bench.e2e")
    assert e2e.main(["--dry-run", "--providers", "fused", "fused[recipe=fast,eta_mode=learned]",
                     "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert [r["provider"] for r in rows] == ["fused", "fused[recipe=fast,eta_mode=learned]"]
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows)
    assert set(rows[1]["phases_ms"]) == set(rows[0]["phases_ms"])
    with pytest.raises(SystemExit):
        e2e.parse_args(["--providers", "fast"])
