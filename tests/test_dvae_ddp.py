"""Two-process DistributedDataParallel training on gloo (CPU): ranks stay identical, train on
different data and samples, and rank 0 writes one checkpoint."""

import os
import socket

import torch
import torch.multiprocessing as mp

from dvae.checkpoint import load
from dvae.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from dvae.trainer import Trainer

    cfg = load_config("digits", [f"out_dir={out}", "progress=false", "tensorboard=false",
                                 "steps=3", "batch_size=8", "num_samples=2", "log_every=1",
                                 "eval_every=0", "ckpt_every=0", "eval_samples=8",
                                 "eta_mode=learned", "d_model=32", "mlp_hidden=[32]"])
    trainer = Trainer(cfg)
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    first_batch = trainer.stream._perm[rank * 8:(rank + 1) * 8].clone()
    trainer.run()
    torch.save({"init": init, "final": trainer.model.state_dict(), "batch": first_batch,
                "generator": trainer.generator.get_state()},
               os.path.join(out, f"rank{rank}.pt"))
    trainer.close()
    dist.destroy_process_group()


def test_two_process_ddp_on_gloo(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
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
