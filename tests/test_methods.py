"""The Table 1 methods (docs/algorithm.md): each estimator and loss against a float64
transcription of the authors' formulas on tiny shapes, the objectives' compositions, and a
short training run per method on digits through ``dvae train`` (metrics, grid, improvement),
summarised by ``dvae compare``."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dvae.config import METHODS, load_config
from dvae.models import build_model
from dvae.models.baselines import gumbel_rao, gumbel_straight_through, kl_to_uniform

pytest.importorskip("vector_quantize_pytorch")


def _draws(shape, k, seed):
    """The uniforms and exponentials the estimators draw, in their order, as float64."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g)
    E = torch.empty((k, *shape)).exponential_(generator=g) if k else None
    return u.double(), (E.double() if E is not None else None)


def test_gumbel_straight_through_matches_transcription():
    logits = torch.randn(3, 4, 7) * 3
    tau = 0.7
    w = torch.randn(3, 4, 7, dtype=torch.float64)  # a downstream linear function
    x = logits.clone().requires_grad_()
    onehot, index = gumbel_straight_through(x, tau, torch.Generator().manual_seed(5))
    (onehot.double() * w).sum().backward()

    u, _ = _draws(logits.shape, 0, 5)
    x64 = logits.double().requires_grad_()
    logq = torch.log_softmax(x64, -1)
    noisy = logq - torch.log(-torch.log(u))
    soft = torch.softmax(noisy / tau, -1)
    hard = F.one_hot(noisy.argmax(-1), 7).double()
    st = hard - soft.detach() + soft
    (st * w).sum().backward()
    assert torch.equal(index, noisy.argmax(-1))
    assert torch.allclose(onehot.double(), hard, atol=1e-6)  # the forward value is one-hot
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)


def test_gumbel_rao_matches_the_reference_formula():
    logits = torch.randn(2, 3, 5) * 2
    tau, k = 0.8, 6
    w = torch.randn(2, 3, 5, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    onehot, index = gumbel_rao(x, tau, k, torch.Generator().manual_seed(9))
    (onehot.double() * w).sum().backward()

    # the reference's conditional_gumbel and gumbel_rao, written out (float64)
    u, E = _draws(logits.shape, k, 9)
    x64 = logits.double().requires_grad_()
    logq = torch.log_softmax(x64, -1)
    D = F.one_hot((logq - torch.log(-torch.log(u))).argmax(-1), 5).double()
    Ei = (D * E).sum(-1, keepdim=True)
    Z = logq.exp().sum(-1, keepdim=True)
    eps = torch.finfo(torch.float32).eps
    adjusted = D * (-torch.log(Ei + eps) + torch.log(Z + eps))
    adjusted = adjusted + (1 - D) * -torch.log(E / logq.exp() + Ei / Z + eps)
    avg = torch.softmax(adjusted / tau, -1).mean(0)
    st = D - avg.detach() + avg
    (st * w).sum().backward()
    assert torch.equal(F.one_hot(index, 5).double(), D)
    assert torch.allclose(onehot.double(), D, atol=1e-6)
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)
    # conditioned on the draw: every perturbation's argmax is the drawn token
    assert torch.equal(adjusted.argmax(-1), D.argmax(-1).expand(k, -1, -1))


def test_kl_to_uniform_matches_transcription():
    logits = torch.randn(4, 3, 9) * 4
    p = torch.softmax(logits.double(), -1)
    ref = (p * (p.log() - math.log(1 / 9))).sum((-2, -1))
    assert torch.allclose(kl_to_uniform(logits).double(), ref, atol=1e-5)
    assert torch.all(kl_to_uniform(torch.zeros(2, 3, 9)) == 0)  # uniform q: KL 0


def _tiny(method, **over):
    keys = dict(method=method, latent_len=4, vocab_size=6, d_model=8, num_heads=2,
                mlp_hidden=[16], na_layers=1, na_mlp_ratio=2, batch_size=3, grmck_k=4,
                fsq_levels=[3, 3], fsq_adapter_width=5, beta_start=0.3, beta_end=0.3,
                temp_start=0.6, temp_end=0.6, steps=10)
    keys.update(over)
    cfg = load_config("digits", [f"{k}={json.dumps(v)}" for k, v in keys.items()])
    torch.manual_seed(0)
    return cfg, build_model(cfg).double()


@pytest.mark.parametrize("method", ["gumbel", "gumbel_na", "grmck", "grmck_na"])
def test_relaxed_objective_is_the_negative_beta_elbo(method):
    """The step's loss and its gradient equal −mean(log p(x|z) − β·KL) composed by hand in
    float64 from the same draws."""
    from dvae.train_step import TrainStep

    cfg, model = _tiny(method, clip=0.0)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    step = TrainStep(model, cfg, generator=torch.Generator().manual_seed(3))
    metrics = step.objective(x, 0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    out = model(x, tau=0.6, generator=torch.Generator().manual_seed(3))
    logits = out["logits"].double()
    p = torch.softmax(logits, -1)
    kl = (p * (torch.log_softmax(logits, -1) + math.log(6))).sum((-2, -1))
    loss = -(out["logpx"] - 0.3 * kl).mean()
    loss.backward()
    assert metrics["loss"].item() == pytest.approx(loss.item(), rel=1e-9)
    assert torch.allclose(metrics["kl"].double(), kl.mean())
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, atol=1e-9), n
    # every parameter of encoder and decoder learns (the estimator carries the gradient
    # through the discrete sample)
    assert model.encoder.head.weight.grad.abs().sum() > 0


def test_ar_relaxed_sample_is_teacher_forced_and_differentiable_along_the_chain():
    cfg, model = _tiny("gumbel")
    enc = model.encoder
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    memory = enc.encode(x)
    used = []
    gen = torch.Generator().manual_seed(1)

    def relax(lg):
        onehot, index = gumbel_straight_through(lg, 0.5, gen)
        used.append(onehot)
        return onehot, index

    logits, onehot, tokens = enc.relaxed_sample(memory, relax)
    hidden = enc.teacher_forced(memory, tokens[:, None])
    assert torch.allclose(logits, enc.head(hidden)[:, 0], atol=1e-10)
    assert torch.equal(onehot.argmax(-1), tokens)
    # the last position's logits depend on the first position's relaxed sample
    g, = torch.autograd.grad(logits[:, -1].sum(), used[0])
    assert g.abs().sum() > 0


def test_vq_losses_and_straight_through_match_transcription():
    cfg, model = _tiny("vq", commitment=0.25)
    z_e = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    z_st, codes, cb_loss, commit = model.quantise(z_e)
    book = model.codebook.detach()
    d = (z_e.detach()[..., None, :] - book).square().sum(-1)
    assert torch.equal(codes, d.argmin(-1))
    z_q = book[codes]
    assert torch.allclose(z_st.double(), z_q, atol=1e-6)  # the decoder reads z_q ...
    assert cb_loss.item() == pytest.approx((z_q - z_e.detach()).square().mean().item(), 1e-5)
    assert commit.item() == pytest.approx((z_q - z_e.detach()).square().mean().item(), 1e-5)
    w = torch.randn_like(z_e)
    (z_st.double() * w).sum().backward(retain_graph=True)
    assert torch.allclose(z_e.grad, w)  # ... with the gradient passed straight to z_e
    z_e.grad = None
    (cb_loss + 0.25 * commit).backward()
    # codebook term moves the codebook only; commitment moves the encoder by 0.25·2(z_e−z_q)/n
    assert torch.allclose(z_e.grad, 0.25 * 2 * (z_e - z_q).detach() / z_e.numel(), atol=1e-6)
    n_book = model.quantiser._codebook.embed.grad[0]
    ref = torch.zeros_like(book).index_add_(0, codes.flatten(),
                                            (2 * (z_q - z_e.detach()) / z_e.numel())
                                            .reshape(-1, 8))
    assert torch.allclose(n_book.double(), ref, atol=1e-6)


def test_vq_objective_scales_as_the_reference():
    from dvae.train_step import TrainStep

    cfg, model = _tiny("vq", commitment=0.25)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    step = TrainStep(model, cfg)
    m = step.objective(x, 0)
    out = model(x)
    ref = -(out["logpx"] / 64).mean() + out["codebook_loss"] + 0.25 * out["commitment_loss"]
    assert m["loss"].item() == pytest.approx(ref.item(), rel=1e-6)


def test_fsq_codes_match_the_reference_bound():
    """The library's FSQ lands on the reference's grid point wherever the two bounds (tan,
    1 − ε vs atanh, 1 + ε) do not straddle a rounding boundary."""
    cfg, model = _tiny("fsq", fsq_levels=[8, 6, 5], d_model=8)
    fsq = model.quantiser
    z = torch.randn(4000, 3, dtype=torch.float64) * 2
    levels = torch.tensor([8.0, 6.0, 5.0], dtype=torch.float64)
    eps = 1e-3
    half_l = (levels - 1) * (1 - eps) / 2
    offset = torch.where(levels % 2 == 1, 0.0, 0.5)
    bounded = torch.tanh(z + torch.tan(offset / half_l)) * half_l - offset
    ref = torch.round(bounded) / torch.div(levels, 2, rounding_mode="floor")
    mine = fsq.quantize(z.float()).double()
    clear = ((bounded - bounded.floor() - 0.5).abs() > 1e-2).all(-1)
    assert clear.float().mean() > 0.9
    assert torch.allclose(mine[clear], ref[clear], atol=1e-6)


def test_daps_na_samples_the_factorised_q():
    """DAPS-NA's K samples per position follow q(z_l|x) (a binomial bound), and its
    teacher-forced hidden states are the same for every sample."""
    cfg, model = _tiny("daps_na")
    model = model.float()
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        memory = model.encoder.encode(x)
        probs = torch.softmax(model.encoder.logits(memory), -1)[0]  # [L, V]
        tokens, logp = model.sample(x, 4000, generator=torch.Generator().manual_seed(0))
    freq = F.one_hot(tokens[0], 6).float().mean(0)  # [L, V]
    bound = 5 * (probs * (1 - probs) / 4000).sqrt() + 1e-3
    assert ((freq - probs).abs() <= bound).all()
    assert torch.allclose(logp[0], probs.log().gather(-1, tokens[0].T).T, atol=1e-5)
    hidden = model.encoder.teacher_forced(memory, tokens[:, :3])
    assert torch.equal(hidden[:, 0], hidden[:, 2])


@pytest.mark.parametrize("method", METHODS)
def test_each_method_builds_for_every_preset(method):
    """The paper's sizes (docs/algorithm.md) for every preset."""
    expect = {"mnist": (8, 256), "cifar10": (64, 512), "imagenet256": (1024, 1024)}
    for preset in ("digits", "mnist", "cifar10", "imagenet256"):
        cfg = load_config(preset, [f"method={method}"])
        model = build_model(cfg)
        assert model.codebook_size == cfg.codebook_size
        if preset in expect:
            L, V = expect[preset]
            assert cfg.latent_len == L
            bits = L * math.log2(V)
            if method == "fsq":
                levels = {"mnist": [8, 6, 5], "cifar10": [8, 8, 8],
                          "imagenet256": [8, 5, 5, 5]}[preset]
                assert cfg.fsq_levels == levels
                bits = L * math.log2(math.prod(levels))
            assert cfg.bits_per_image == pytest.approx(bits)
        if cfg.factorised:
            layers = {"cifar10": 4, "imagenet256": 6}.get(preset, 2)
            assert len(model.encoder.blocks) == layers
            ratio = {"cifar10": 6, "imagenet256": 4}.get(
                preset, 7 if method in ("vq", "fsq") else 6)
            assert model.encoder.blocks[0].mlp.fc1.out_features == ratio * cfg.d_model


# -- training through the CLI, and dvae compare ------------------------------------------------

STEPS = 120


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dvae.cli import main

    root = tmp_path_factory.mktemp("methods")
    for method in METHODS:
        rc = main(["train", f"method={method}", f"steps={STEPS}", "log_every=20",
                   "eval_every=0", "eval_samples=200", "progress=false", "tensorboard=false",
                   f"out_dir={root / method}"])
        assert rc == 0
    return root


@pytest.mark.parametrize("method", METHODS)
def test_dvae_train_each_method_on_digits_improves(trained, method):
    out = trained / method
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    head, train = records[0], [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    assert head["split"] == "config" and head["method"] == method
    assert (out / "reconstructions.png").stat().st_size > 0
    assert test and test[-1]["step"] == STEPS and math.isfinite(test[-1]["psnr"])
    # the reconstruction log-likelihood improves over the run (train windows of 20 steps)
    first, last = train[0]["log_px"], train[-1]["log_px"]
    assert last > first + 3.0, (first, last)
    assert (test[-1]["beta_elbo"] is None) == (method in ("vq", "fsq"))


def test_dvae_compare_prints_table_one(trained, capsys, tmp_path):
    from dvae.cli import main

    capsys.readouterr()
    csv_path = tmp_path / "table.csv"
    assert main(["compare", *[str(trained / m) for m in METHODS], "--csv",
                 str(csv_path)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and "digits" in line]
    assert len(rows) == len(METHODS)
    assert [r.split("|")[1].strip() for r in rows] == [
        "FSQ", "VQ-VAE", "GR-MCK", "GR-MCK-NA", "Gumbel (AR)", "Gumbel-NA", "DAPS", "DAPS-NA"]
    assert all("n/a" in r for r in rows[:2])  # no β-ELBO for FSQ, VQ-VAE
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("method,dataset,bits,psnr") and len(lines) == 1 + len(METHODS)


def test_dvae_compare_errors_are_one_line(tmp_path, capsys):
    from dvae.cli import main

    assert main(["compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no metrics.jsonl" in err[0]


def test_bench_replicate_takes_overrides_anywhere(tmp_path, capsys):
    """Options and key=value overrides in any order (plain argparse drops overrides given
    after options), a wall-clock budget, and result.json with the machine."""
    from bench.replicate import main

    out = tmp_path / "rep"
    res = main(["eval_samples=50", "--method", "fsq", "--minutes", "0.02", "log_every=5",
                "--out", str(out), "--set", "lr=0.002", "tensorboard=false"])
    saved = json.loads((out / "result.json").read_text())
    assert saved["method"] == "fsq" and saved["test_eval_images"] == 50
    assert saved["overrides"] == ["eval_samples=50", "log_every=5", "tensorboard=false",
                                  "lr=0.002"]
    assert saved["machine"]["cores"] >= 1 and res["steps"] >= 1
    assert 0 < saved["train_seconds"] < 60
    head = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert head["config"]["lr"] == 0.002 and head["config"]["eval_samples"] == 50


@pytest.mark.parametrize("method", ["vq", "fsq", "gumbel", "grmck_na", "daps_na"])
def test_baseline_resume_is_bitwise_and_eval_works(tmp_path, method, capsys):
    """A baseline run stopped and resumed ends where an unstopped one does (models with the
    library's quantiser buffers, optimiser, random stream), and `dvae eval` / `reconstruct`
    read its checkpoint."""
    from utils import assert_bitwise_equal

    from dvae.cli import main
    from dvae.trainer import Trainer

    def cfg(name):
        return load_config("digits", [f"method={method}", f"out_dir={tmp_path / name}",
                                      "progress=false", "tensorboard=false", "batch_size=16",
                                      "steps=6", "log_every=1", "eval_every=0",
                                      "ckpt_every=0", "eval_samples=32", "d_model=32",
                                      "mlp_hidden=[64]", "grmck_k=3"])

    def state(t):
        s = t.state()
        return s["model"], s["optimizer"], s["generators"], s["rng_cpu"]

    straight = Trainer(cfg("a"))
    straight.run()
    first = Trainer(cfg("b"))
    first.run(until=3)
    first.save()
    first.close()
    resumed = Trainer(cfg("b"), resume=True)
    resumed.run()
    assert_bitwise_equal(state(straight), state(resumed))
    straight.close()
    resumed.close()
    capsys.readouterr()
    ckpt = str(tmp_path / "b" / "checkpoint.pt")
    assert main(["eval", "--checkpoint", ckpt, "eval_samples=20"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["eval_images"] == 20 and math.isfinite(res["psnr"])
    assert main(["reconstruct", "--checkpoint", ckpt, "--out",
                 str(tmp_path / "r.png"), "--count", "4"]) == 0
    assert (tmp_path / "r.png").stat().st_size > 0
