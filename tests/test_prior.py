"""The generation prior (dvae.prior): the FSQ category mapping, the flow's path and Euler
sampler against float64 transcriptions of the authors' formulas, guidance, the fused loss
against the masked softmax, the metrics against float64 definitions, exact resume, DDP, and
`dvae prior train` / `dvae generate` / `dvae prior eval` / `dvae compare` end to end."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from utils import assert_bitwise_equal, free_port

import dvae_kernels
from dvae import checkpoint as ckpt
from dvae.cli import main
from dvae.config import load_config
from dvae.prior import flow, metrics
from dvae.prior.config import PriorConfig, prior_config
from dvae.prior.network import FlowTransformer
from dvae.prior.tokens import TokenSpace

TINY_TOKENIZER = ["progress=false", "tensorboard=false", "steps=4", "batch_size=16",
                  "num_samples=2", "log_every=2", "eval_every=0", "ckpt_every=0",
                  "eval_samples=32", "d_model=32", "mlp_hidden=[32]", "grid_images=2"]
TINY_PRIOR = ["progress=false", "tensorboard=false", "d_model=32", "layers=1", "batch_size=16",
              "dt=0.25", "log_every=2", "ckpt_every=0", "eval_samples=40", "metrics=none",
              "grid_per_label=1"]


def _tokenizer(folder, method="daps"):
    from dvae.trainer import Trainer

    cfg = load_config("digits", [f"method={method}", f"out_dir={folder}", *TINY_TOKENIZER])
    with Trainer(cfg) as trainer:
        trainer.run()
    return str(folder / "checkpoint.pt")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {m: _tokenizer(root / m, m) for m in ("daps", "fsq")}


# -- the FSQ categories ---------------------------------------------------------------------


def test_fsq_category_mapping_round_trips():
    from vector_quantize_pytorch import FSQ

    levels = [8, 6, 5]
    space = TokenSpace(3, 0, levels)
    assert (space.num_positions, space.num_categories) == (9, 8)
    codes = torch.arange(240).view(80, 3)
    cats = space.to_categories(codes)
    assert torch.equal(space.to_codes(cats), codes)
    assert bool((cats < space.counts).all()) and bool((cats >= 0).all())
    # the same per-dimension levels as vector-quantize-pytorch's index, token-major "(k d)"
    level_idx = FSQ(levels=levels).indices_to_level_indices(codes)  # [80, 3, 3]
    assert torch.equal(cats, level_idx.reshape(80, 9).long())
    mask = space.mask()
    assert mask.tolist()[:3] == [[True] * 8, [True] * 6 + [False] * 2, [True] * 5 + [False] * 3]
    plain = TokenSpace(4, 64)
    assert plain.mask() is None and torch.equal(plain.to_categories(codes[:, :2].repeat(1, 2)),
                                                codes[:, :2].repeat(1, 2))


def test_fsq_tokenizer_codes_round_trip_through_categories(tokenizers):
    from dvae.evaluate import open_checkpoint

    tok = open_checkpoint(tokenizers["fsq"])
    space = TokenSpace.for_config(tok.cfg)
    x = tok.preprocess(tok.test.batch(torch.arange(32)))
    codes = tok.model.encode_codes(x)
    back = space.to_codes(space.to_categories(codes))
    assert torch.equal(back, codes)
    torch.testing.assert_close(tok.model.decode_codes(back), tok.model.decode_codes(codes),
                               rtol=0, atol=0)


# -- the flow: path and sampler -------------------------------------------------------------


def test_interpolation_path_matches_float64_transcription():
    space = TokenSpace(5, 0, [4, 3])
    z1 = space.uniform(64, torch.Generator().manual_seed(1))
    z_t, t = flow.sample_path(z1, space, torch.Generator().manual_seed(7))
    # the authors' get_loss_args in float64, from the same three draws in the same order
    g = torch.Generator().manual_seed(7)
    u0 = torch.rand((64, space.num_positions), generator=g).double()
    z0 = torch.floor(u0 * space.counts.double()).long()
    t64 = torch.rand(64, generator=g).double()
    rand_t = torch.rand((64, space.num_positions), generator=g).double()
    ref = torch.where(rand_t < t64[:, None], z1, z0)
    assert torch.equal(t.double(), t64) and torch.equal(z_t, ref)
    assert bool((z_t < space.counts).all())  # the source is the masked uniform
    # in distribution: position kept with probability t
    big = space.uniform(4000, torch.Generator().manual_seed(3))
    zt, tt = flow.sample_path(big, space, torch.Generator().manual_seed(4))
    kept = (zt == big).double().mean(1)
    slope = ((kept - kept.mean()) * (tt - tt.mean())).sum() / ((tt - tt.mean()) ** 2).sum()
    assert abs(slope.item() - (1 - 1 / 3.5)) < 0.05  # P(equal) = t + (1 - t) / count


def _toy_logits(space: TokenSpace, seed: int = 0):
    """A fixed 'network': logits that depend on z_t, t and the label, masked like the
    prior's."""
    g = torch.Generator().manual_seed(seed)
    V, P = space.num_categories, space.num_positions
    table = torch.randn(V, P, V, generator=g) * 2
    slope = torch.randn(P, V, generator=g)
    by_label = torch.randn(11, P, V, generator=g)
    mask = space.mask()

    def logits_fn(z, t, labels):
        out = table[z.roll(1, dims=1), torch.arange(P)] + t[:, None, None] * slope
        out = out + by_label[labels]
        return out if mask is None else out.masked_fill(~mask, float("-inf"))
    return logits_fn


@pytest.mark.parametrize("levels", [None, [4, 3]])
def test_euler_sampler_matches_float64_transcription(levels):
    space = TokenSpace(6, 7, levels)
    logits_fn = _toy_logits(space)
    labels = torch.arange(48) % 10
    path: list = []
    out = flow.euler_sample(logits_fn, labels, space, dt=0.125,
                            generator=torch.Generator().manual_seed(11), trajectory=path)
    # the authors' generate_from_labels in float64: u = (p - onehot)/(1 - t),
    # z ~ Categorical(log(onehot + dt*u)), with the same generator and draws
    g = torch.Generator().manual_seed(11)
    z = space.uniform(48, g)
    dt, t = 0.125, 0.0
    for i in range(8):
        assert torch.equal(z, path[i])
        p = torch.softmax(logits_fn(z, torch.full((48,), t), labels).double(), -1)
        onehot = torch.nn.functional.one_hot(z, space.num_categories).double()
        u = (p - onehot) / (1.0 - t)
        z, _ = dvae_kernels.sample_tokens(torch.log(onehot + dt * u), generator=g,
                                          backend="torch")
        t += dt
    assert torch.equal(out, z) and torch.equal(path[-1], out)
    if levels:
        assert bool((out < space.counts).all())
    # the transition itself, to float64 rounding (last step: exactly p)
    zt = path[3]
    tt = torch.full((48,), 3 * dt)
    logits = logits_fn(zt, tt, labels)
    p = torch.softmax(logits.double(), -1)
    onehot = torch.nn.functional.one_hot(zt, space.num_categories).double()
    ref = torch.log(onehot + dt * (p - onehot) / (1 - 3 * dt))
    torch.testing.assert_close(flow.transition_logits(logits, zt, 3, 8).double(), ref,
                               rtol=1e-5, atol=1e-5)
    last = flow.transition_logits(logits, zt, 7, 8)
    torch.testing.assert_close(last.exp().double(), p, rtol=1e-5, atol=1e-6)


def test_guidance_zero_is_the_unguided_sampler_and_w_follows_the_formula():
    space = TokenSpace(4, 6)
    logits_fn = _toy_logits(space, seed=2)
    labels = torch.arange(20) % 10
    kw = dict(dt=0.25, backend="torch")
    plain = flow.euler_sample(logits_fn, labels, space,
                              generator=torch.Generator().manual_seed(0), **kw)
    zero = flow.euler_sample(logits_fn, labels, space, guidance=0.0, null_label=10,
                             generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(plain, zero)
    z = space.uniform(20, torch.Generator().manual_seed(1))
    t = torch.full((20,), 0.5)
    for w in (0.0, 1.5, -0.5):
        got = flow.guided_logits(logits_fn, z, t, labels, w, 10)
        cond = logits_fn(z, t, labels).double()
        uncond = logits_fn(z, t, torch.full_like(labels, 10)).double()
        torch.testing.assert_close(got.double(), cond + w * (cond - uncond), rtol=1e-6,
                                   atol=1e-5)
    guided = flow.euler_sample(logits_fn, labels, space, guidance=3.0, null_label=10,
                               generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.equal(guided, plain)
    # masked entries stay -inf under guidance (no NaN from -inf - -inf)
    fsq = TokenSpace(2, 0, [4, 3])
    masked = flow.guided_logits(_toy_logits(fsq), fsq.uniform(5), torch.zeros(5),
                                torch.zeros(5, dtype=torch.long), 2.0, 10)
    assert not masked.isnan().any() and bool(torch.isinf(masked[:, 1, 3:]).all())


def test_euler_steps_and_bad_arguments():
    assert flow.euler_steps(0.025) == 40 and flow.euler_steps(1.0) == 1
    for dt in (0.3, 0.0, -0.1, 2.0):
        with pytest.raises(ValueError, match="dt"):
            flow.euler_steps(dt)
    with pytest.raises(ValueError, match="null_label"):
        flow.euler_sample(_toy_logits(TokenSpace(2, 4)), torch.zeros(2, dtype=torch.long),
                          TokenSpace(2, 4), guidance=1.0)
    with pytest.raises(ValueError, match="dt must divide 1"):
        PriorConfig(dt=0.3)


# -- the network's loss: the fused op against the masked softmax ----------------------------


@pytest.mark.parametrize("levels", [None, [5, 3]])
def test_prior_loss_is_the_masked_softmax_in_float64(levels):
    space = TokenSpace(3, 9, levels)
    net = FlowTransformer(space, 10, d_model=32, num_heads=4, layers=1)
    with torch.no_grad():  # past adaLN-Zero's zero init, so the blocks do something
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z1 = space.uniform(6, torch.Generator().manual_seed(0))
    z_t, t = flow.sample_path(z1, space, torch.Generator().manual_seed(1))
    y = torch.arange(6) % 11
    got = net(z_t, t, y, z1)
    h = net.hidden(z_t, t, y).double()
    logits = h @ net.head.weight.double().T + net.head.bias.double()
    if levels:
        logits = logits.masked_fill(~space.mask(), float("-inf"))
    ref = torch.log_softmax(logits, -1).gather(-1, z1[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(net.logits(z_t, t, y).double(), logits, rtol=1e-5, atol=1e-4)
    got.sum().backward()  # differentiable through the fused op
    assert net.head.weight.grad is not None and net.embed.weight.grad is not None
    if levels:  # rows beyond a dimension's levels get no gradient from its positions
        assert float(net.head.weight.grad[5:].abs().sum()) == 0.0


# -- the metrics ----------------------------------------------------------------------------


def test_frechet_distance_matches_a_float64_eigen_computation():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(300, 12)))
    b = torch.from_numpy(rng.normal(size=(250, 12)) @ rng.normal(size=(12, 12)) * 0.4 + 0.2)
    a[:, :3] = 0.0  # ReLU features that never fire: singular covariances
    b[:, :2] = 0.0
    got = metrics.frechet(a.float(), b.float())
    a64, b64 = a.float().double(), b.float().double()
    s1, s2 = torch.cov(a64.T), torch.cov(b64.T)
    # tr((S1 S2)^1/2) from the eigenvalues of the (non-symmetric) product itself
    eig = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0)
    ref = ((a64.mean(0) - b64.mean(0)) ** 2).sum() + torch.trace(s1 + s2) - 2 * eig.sqrt().sum()
    assert got == pytest.approx(ref.item(), rel=1e-6, abs=1e-8)
    assert metrics.frechet(a.float(), a.float()) == pytest.approx(0.0, abs=1e-8)


def test_precision_recall_match_the_definition():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 3, generator=g)
    fake = torch.randn(50, 3, generator=g) * 1.5 + 0.5
    p, r = metrics.precision_recall(real, fake, k=3, chunk=16)

    def brute(points, centres, k):
        d_cc = torch.cdist(centres.double(), centres.double())
        radius = d_cc.sort(1).values[:, k]
        d = torch.cdist(points.double(), centres.double())
        return float((d <= radius[None]).any(1).double().mean())

    assert p == brute(fake, real, 3) and r == brute(real, fake, 3)
    assert metrics.precision_recall(real, real)[0] == 1.0
    with pytest.raises(ValueError, match="more than k=3"):
        metrics.precision_recall(real[:3], fake)


def test_metric_classifier_is_cached_and_refuses_other_data(tmp_path, monkeypatch):
    from dvae.data import TensorImages

    monkeypatch.setitem(metrics.RECIPE, "steps", 30)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(80) % 4
    images = torch.rand(80, 1, 8, 8, generator=g) * 0.25 + (labels / 4)[:, None, None, None]
    train, test = TensorImages(images[:60], "t", labels[:60]), TensorImages(images[60:], "v",
                                                                            labels[60:])
    monkeypatch.setenv("DVAE_CACHE", str(tmp_path))
    logs = []
    model, acc = metrics.metric_classifier(train, test, log=logs.append)
    assert len(logs) == 1 and len(list(tmp_path.glob("classifier-*.pt"))) == 1
    again, acc2 = metrics.metric_classifier(train, test, log=logs.append)
    assert len(logs) == 1 and acc2 == acc  # read back, not retrained
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    other = TensorImages(images[:60].flip(0), "t", labels[:60])
    path = next(tmp_path.glob("classifier-*.pt"))
    with pytest.raises(ValueError, match="fingerprint differs"):
        metrics.metric_classifier(other, test, path)
    with pytest.raises(ValueError, match="need class labels"):
        metrics.metric_classifier(TensorImages(images[:60]), test)


# -- training: resume, DDP, the command line ------------------------------------------------


def _prior_cfg(tokenizer, out, *extra):
    return prior_config(tokenizer, "digits", [f"out_dir={out}", *TINY_PRIOR, *extra])


def test_prior_resume_is_bitwise_exact(tokenizers, tmp_path):
    from dvae.prior.train import PriorTrainer

    straight = PriorTrainer(_prior_cfg(tokenizers["daps"], tmp_path / "a", "steps=6"))
    straight.run()
    straight.close()
    first = PriorTrainer(_prior_cfg(tokenizers["daps"], tmp_path / "b", "steps=6"))
    first.run(until=3)
    first.close()
    resumed = PriorTrainer(_prior_cfg(tokenizers["daps"], tmp_path / "b", "steps=6"),
                           resume=True)
    assert resumed.step == 3
    resumed.run()
    resumed.close()
    a, b = ckpt.load(tmp_path / "a/checkpoint.pt"), ckpt.load(tmp_path / "b/checkpoint.pt")
    for key in ("model", "optimizer", "generators", "rng_cpu", "batches_consumed",
                "skipped_steps", "tokenizer_digest"):
        assert_bitwise_equal(a[key], b[key], key)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b/metrics.jsonl")
             if json.loads(line)["split"] == "train"]
    assert steps == [2, 3, 4, 6]  # the interrupted run's window at 3, none repeated
    # a result-changing key is refused on resume, by name
    with pytest.raises(ValueError, match="lr"):
        PriorTrainer(_prior_cfg(tokenizers["daps"], tmp_path / "b", "steps=8", "lr=1e-3"),
                     resume=True)


def test_a_non_finite_step_is_skipped(tokenizers, tmp_path):
    from dvae.prior.train import PriorTrainer

    trainer = PriorTrainer(_prior_cfg(tokenizers["daps"], tmp_path / "nan", "steps=2"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    model = trainer.model
    trainer.fwd = lambda *args: model(*args) * float("nan")
    trainer.run(until=1)
    assert int(trainer.skipped) == 1 and trainer.step == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    trainer.fwd = model
    trainer.run()
    assert int(trainer.skipped) == 1 and trainer.step == 2
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    trainer.close()


def _ddp_worker(rank: int, world: int, port: int, tokenizer: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from dvae.prior.train import PriorTrainer

    trainer = PriorTrainer(_prior_cfg(tokenizer, out, "steps=3", "log_every=1"))
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    torch.save({"init": init, "final": trainer.model.state_dict(),
                "generator": trainer.generator.get_state()}, os.path.join(out, f"r{rank}.pt"))
    trainer.close()
    dist.destroy_process_group()


def test_prior_two_process_ddp_on_gloo(tokenizers, tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), tokenizers["daps"], str(tmp_path)), nprocs=2,
             join=True)
    r0 = torch.load(tmp_path / "r0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "r1.pt", weights_only=False)
    assert not torch.equal(r0["generator"], r1["generator"])
    changed = False
    for k, v in r0["final"].items():
        assert torch.equal(v, r1["final"][k]), f"ranks disagree on {k}"
        changed |= not torch.equal(v, r0["init"][k])
    assert changed
    state = ckpt.load(tmp_path / "checkpoint.pt")
    assert state["step"] == 3 and len(state["generators"]) == 2 and state["kind"] == "prior"


def _cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_prior_train_generate_eval_compare_end_to_end(tokenizers, tmp_path, capsys,
                                                      monkeypatch):
    monkeypatch.setenv("DVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(metrics.RECIPE, "steps", 50)
    tok = tokenizers["fsq"]
    out = tmp_path / "prior"
    code, stdout, _ = _cli(capsys, "prior", "train", "--tokenizer", tok, f"out_dir={out}",
                           *TINY_PRIOR[:-2], "steps=4", "metrics=classifier", "grid_per_label=2")
    assert code == 0, stdout
    res = json.loads(stdout.splitlines()[-2])
    assert math.isfinite(res["test_loss"]) and 0 <= res["test_label_accuracy"] <= 1
    assert {"test_fd", "test_precision", "test_recall"} <= res.keys()
    assert (out / "samples.png").is_file() and (out / "checkpoint.pt").is_file()
    test = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert test["split"] == "test" and test["fd_recon"] >= 0 and test["generated"] == 40

    # --resume continues the run (more steps); a result-changing key is refused by name
    code, _, err = _cli(capsys, "prior", "train", "--tokenizer", tok, "--resume",
                        f"out_dir={out}", "steps=5")
    assert code == 0 and ckpt.load(out / "checkpoint.pt")["step"] == 5, err
    test = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert test["step"] == 5 and test["fd"] >= 0
    code, _, err = _cli(capsys, "prior", "train", "--tokenizer", tok, "--resume",
                        f"out_dir={out}", "steps=6", "layers=3")
    assert code == 2 and "layers=3" in err
    prior = str(out / "checkpoint.pt")
    args = ["generate", "--prior", prior, "--labels", "0,3", "--num", "3", "--seed", "5"]
    code, stdout, _ = _cli(capsys, *args, "--out", str(tmp_path / "g.png"), "--save-npz",
                           str(tmp_path / "a.npz"))
    assert code == 0 and "2 labels x 3 samples" in stdout
    _cli(capsys, *args, "--out", str(tmp_path / "g2.png"), "--save-npz", str(tmp_path / "b.npz"))
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].shape == (6, 1, 8, 8) and a["images"].dtype == np.uint8
    assert a["labels"].tolist() == [0, 0, 0, 3, 3, 3]
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["codes"], b["codes"])
    code, stdout, _ = _cli(capsys, *args[:-1], "6", "--out", str(tmp_path / "g3.png"),
                           "--save-npz", str(tmp_path / "c.npz"))
    assert not np.array_equal(np.load(tmp_path / "c.npz")["codes"], a["codes"])

    code, stdout, _ = _cli(capsys, "prior", "eval", "--checkpoint", prior, "--npz",
                           str(tmp_path / "a.npz"))
    res = json.loads(stdout)
    assert code == 0 and res["generated"] == 6 and res["step"] == 5 and res["fd"] >= 0

    # dvae compare: the tokenizer's row gains the generation columns (prior beside it or not)
    code, stdout, _ = _cli(capsys, "compare", str(out), "--format", "csv")
    row = stdout.splitlines()[1].split(",")
    header = stdout.splitlines()[0].split(",")
    assert code == 0 and row[header.index("method")] == "fsq"
    assert float(row[header.index("gen_fd")]) == pytest.approx(test["fd"])
    assert float(row[header.index("prior_loss")]) == pytest.approx(test["loss"])


def test_cli_errors_are_one_line(tokenizers, tmp_path, capsys):
    out = tmp_path / "p"
    code, _, _ = _cli(capsys, "prior", "train", "--tokenizer", tokenizers["daps"],
                      f"out_dir={out}", *TINY_PRIOR, "steps=2")
    assert code == 0
    prior = str(out / "checkpoint.pt")
    cases = [
        (["generate", "--prior", prior, "--labels", "0,12"], "--labels must be in [0, 10)"),
        (["generate", "--prior", prior, "--labels", "a"], "comma-separated integers"),
        (["generate", "--prior", prior, "--num", "0"], "--num must be >= 1"),
        (["generate", "--prior", tokenizers["daps"]], "not a prior checkpoint"),
        (["generate", "--prior", prior, "d_model=64"], "d_model cannot be changed"),
        (["prior", "train", "--tokenizer", prior], "is a prior checkpoint"),
        (["prior", "train", "--tokenizer", tokenizers["daps"], f"out_dir={out}"],
         "holds a checkpoint of another run"),
        (["prior", "train", "--tokenizer", tokenizers["daps"], "tokenizer=x"], "--tokenizer"),
        (["prior", "train", "--tokenizer", tokenizers["daps"], "dt=0.3"], "dt must divide"),
        (["prior", "train", "--tokenizer", tokenizers["daps"], "metrics=fid"],
         "metrics must be"),
        (["prior", "eval", "--checkpoint", prior, "--npz", str(tmp_path / "none.npz")],
         "--npz"),
        (["prior"], "required: {train,eval}"),
    ]
    for argv, message in cases:
        code, _, err = _cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("dvae: error:") and err.count("\n") == 1, err
        assert message in err, (message, err)


def test_changed_tokenizer_is_refused(tmp_path, capsys):
    tok = _tokenizer(tmp_path / "tok")
    out = tmp_path / "tok" / "prior"
    assert _cli(capsys, "prior", "train", "--tokenizer", tok, *TINY_PRIOR, "steps=2")[0] == 0
    # the default out_dir is prior/ beside the tokenizer; a moved working directory still
    # finds the tokenizer there
    state = ckpt.load(out / "checkpoint.pt")
    assert state["config"]["out_dir"] == str(out)
    state["config"]["tokenizer"] = "elsewhere/checkpoint.pt"
    ckpt.save_atomic(state, out / "checkpoint.pt")
    code, stdout, err = _cli(capsys, "generate", "--prior", str(out / "checkpoint.pt"),
                             "--num", "1", "--out", str(tmp_path / "x.png"))
    assert code == 0, err
    # the tokenizer trains on: its prior no longer fits it
    from dvae.trainer import Trainer

    cfg = load_config("digits", [f"out_dir={tmp_path / 'tok'}", *TINY_TOKENIZER, "steps=6"])
    with Trainer(cfg, resume=True) as trainer:
        trainer.run()
    code, _, err = _cli(capsys, "generate", "--prior", str(out / "checkpoint.pt"), "--num", "1",
                        "--out", str(tmp_path / "y.png"))
    assert code == 2 and "is not the checkpoint this prior was trained on" in err
