"""FusedCategoricalHead under two-process DistributedDataParallel (gloo, CPU): every training
path through the module's forward gives, on both ranks, the gradient of single-process
training on the concatenated batch; the methods that would skip DDP's hooks refuse to."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from utils import free_port

D, V, N = 8, 13, 8  # global batch N, split between 2 ranks

# (name, forward keywords, reduction): every documented training path of the head.
PATHS = [
    ("logp", {}, None),
    ("logp+entropy", {"return_entropy": True}, None),
    ("nll sum", {"weights": "w", "reduction": "sum"}, "sum"),
    ("nll options", {"weights": "w", "reduction": "sum", "label_smoothing": 0.1,
                     "z_loss": 1e-2, "temperature": 0.8, "softcap": 4.0}, "sum"),
    ("nll mean", {"weights": "w", "reduction": "mean"}, "mean"),
]


def _data():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    weights = torch.rand(N, generator=g)
    ignored = targets.clone()
    ignored[[1, 6]] = -100  # one ignored target on each rank
    return hidden, targets, ignored, weights


def _head():
    from dvae_kernels import FusedCategoricalHead

    torch.manual_seed(1)
    return FusedCategoricalHead(D, V)


def _loss(module, hidden, targets, weights, kw):
    kw = {k: (weights if v == "w" else v) for k, v in kw.items()}
    out = module(hidden, targets=targets, **kw)
    if isinstance(out, tuple):
        return sum(o.sum() for o in out)
    return out.sum()


class _Outer(torch.nn.Module):
    """A model whose forward calls the head's method (inside DDP's forward: synchronised)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hidden, targets):
        return self.head.log_prob(hidden, targets).sum()


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", rank=rank, world_size=2)
    hidden, targets, ignored, weights = _data()
    rows = slice(rank * N // 2, (rank + 1) * N // 2)
    result = {}
    ddp = DDP(_head())
    for name, kw, reduction in PATHS:
        t = targets if reduction == "mean" else ignored  # mean: equal counts on both ranks
        ddp.zero_grad()
        _loss(ddp, hidden[rows], t[rows], weights[rows], kw).backward()
        result[name] = [p.grad.clone() for p in ddp.parameters()]
    errors = []
    for method, call in (("log_prob", lambda m: m.log_prob(hidden[rows], targets[rows])),
                         ("weighted_nll", lambda m: m.weighted_nll(hidden[rows],
                                                                    targets[rows], 1.0)),
                         ("entropy", lambda m: m.entropy(hidden[rows]))):
        try:
            call(ddp.module)
        except RuntimeError as err:
            errors.append((method, str(err)))
        with torch.no_grad():
            call(ddp.module)  # inference needs no synchronisation: allowed
    result["errors"] = errors
    outer = DDP(_Outer(_head()))
    outer(hidden[rows], ignored[rows]).backward()
    result["outer"] = [p.grad.clone() for p in outer.parameters()]
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_every_training_path_synchronises(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    hidden, targets, ignored, weights = _data()
    for name, kw, reduction in PATHS:
        head = _head()
        t = targets if reduction == "mean" else ignored
        loss = _loss(head, hidden, t, weights, kw)
        # DDP averages the ranks' gradients: of a sum over the batch that is the global sum
        # over 2; of equal-sized means, the global mean.
        (loss if reduction == "mean" else loss / 2).backward()
        for r in ranks:
            for got, p in zip(r[name], head.parameters()):
                torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6,
                                           msg=f"{name}: rank gradient differs")
    head = _head()
    (head.log_prob(hidden, ignored).sum() / 2).backward()
    for r in ranks:
        for got, p in zip(r["outer"], head.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)
    for r in ranks:
        assert [m for m, _ in r["errors"]] == ["log_prob", "weighted_nll", "entropy"]
        assert all("DDP would not synchronise the gradients" in e for _, e in r["errors"])
