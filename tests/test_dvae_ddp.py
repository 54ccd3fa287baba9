"""Two-process DistributedDataParallel training on gloo (CPU): ranks stay identical, train on
different data and samples, and rank 0 writes one checkpoint."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from utils import free_port

from dvae.checkpoint import load
from dvae.config import load_config


def _worker(rank: int, world: int, port: int, out: str, extra=()) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from dvae.trainer import Trainer

    cfg = load_config("digits", [f"out_dir={out}", "progress=false", "tensorboard=false",
                                 "steps=3", "batch_size=8", "num_samples=2", "log_every=1",
                                 "eval_every=0", "ckpt_every=0", "eval_samples=8",
                                 "eta_mode=learned", "d_model=32", "mlp_hidden=[32]",
                                 *extra])
    trainer = Trainer(cfg)
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    first_batch = trainer.stream._perm[rank * 4:(rank + 1) * 4].clone()  # global batch 8
    trainer.run()
    torch.save({"init": init, "final": trainer.model.state_dict(), "batch": first_batch,
                "generator": trainer.generator.get_state()},
               os.path.join(out, f"rank{rank}.pt"))
    trainer.close()
    dist.destroy_process_group()


@pytest.mark.parametrize("extra", [(), ("recipe=fast", "decoder_samples=1")],
                         ids=["paper", "fast"])
def test_two_process_ddp_on_gloo(tmp_path, extra):
    """Also the fast recipe's step (two model calls, draws from the weights): every
    parameter stays in sync."""
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), extra), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert not set(r0["batch"].tolist()) & set(r1["batch"].tolist())  # different data
    assert not torch.equal(r0["generator"], r1["generator"])  # different sample streams
    changed = False
    for k, v in r0["final"].items():
        assert torch.equal(v, r1["final"][k]), f"ranks disagree on {k}"
        changed |= not torch.equal(v, r0["init"][k])
    assert changed
    state = load(tmp_path / "checkpoint.pt")
    assert state["step"] == 3 and len(state["generators"]) == 2


def _tokens_and_images(cfg, N):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randint(0, cfg.vocab_size, (N, cfg.num_samples, cfg.latent_len), generator=g)
    return x, tokens


def _one_step(cfg, x, tokens, distributed):
    """One DAPS step on (x, tokens) (the sampler replaced by the given tokens); returns the
    parameters after it and the step's metrics."""
    from torch import nn

    from dvae.models import build_model
    from dvae.train_step import TrainStep

    torch.manual_seed(0)
    model = build_model(cfg)
    model.sample = lambda x_, K, **kw: (tokens, None)
    fwd = nn.parallel.DistributedDataParallel(model) if distributed else model
    step = TrainStep(fwd, cfg, distributed=distributed)
    metrics = step(x, 0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics


def _step_worker(rank, world, port, out, overrides):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config("digits", overrides)
    x, tokens = _tokens_and_images(cfg, 8)
    rows = slice(rank * 4, (rank + 1) * 4)
    state, metrics = _one_step(cfg, x[rows], tokens[rows], True)
    torch.save({"state": state, "metrics": metrics}, os.path.join(out, f"step{rank}.pt"))
    dist.destroy_process_group()


def test_two_rank_step_equals_one_rank_step_on_the_global_batch(tmp_path):
    """batch_size is global and the DAPS weights, ESS and eta use the global batch: two ranks
    with 4 images each take the step one process takes with all 8 (same samples)."""
    for mode in ("learned", "solved"):
        overrides = ["dataset=digits", "batch_size=8", "num_samples=4", "d_model=32",
                     "mlp_hidden=[32]", f"eta_mode={mode}", "eta_init=1.0"]
        mp.spawn(_step_worker, args=(2, free_port(), str(tmp_path), overrides), nprocs=2,
                 join=True)
        cfg = load_config("digits", overrides)
        x, tokens = _tokens_and_images(cfg, 8)
        single, metrics = _one_step(cfg, x, tokens, False)
        for rank in range(2):
            got = torch.load(tmp_path / f"step{rank}.pt", weights_only=True)
            for k, v in single.items():
                torch.testing.assert_close(got["state"][k], v, atol=1e-6, rtol=1e-5,
                                           msg=lambda m, k=k, mode=mode: f"{mode} {k}: {m}")
            for k in ("eta", "ess_frac"):
                torch.testing.assert_close(got["metrics"][k], metrics[k], atol=1e-6,
                                           rtol=1e-5)
