"""Before/after timing of the KV-cache sampler on the CPU, in one process, interleaved:
``before`` is the original loop (full static cache, boolean row mask, SDPA over all L slots,
written out in tests/test_sampler_equivalence.py), ``after`` is ``ARTransformerEncoder.sample``
as it is now. Best of ``--reps`` calls each (a shared machine: the minimum is the least noisy).

    python -m bench.sampler_ab [--threads 1] [--reps 7]
"""

from __future__ import annotations

import argparse
import time

import torch

from dvae.config import load_config
from dvae.models import build_model
from tests.test_sampler_equivalence import _default_sampler, _original_sample


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sampler_ab")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for preset, N in (("mnist", 256), ("cifar10", 32)):
        cfg = load_config(preset, ["dataset=synthetic"])
        torch.manual_seed(0)
        enc = build_model(cfg).eval().encoder
        x = torch.rand(N, cfg.channels, cfg.image_size, cfg.image_size)
        with torch.no_grad():
            mem = enc.encode(x)
        best = {"before": float("inf"), "after": float("inf")}
        for _ in range(args.reps):
            for k in best:
                g = torch.Generator().manual_seed(1)
                t = time.perf_counter()
                if k == "before":
                    _original_sample(enc, mem, 8, g, _default_sampler(enc))
                else:
                    enc.sample(mem, 8, generator=g)
                best[k] = min(best[k], time.perf_counter() - t)
        print(f"{preset} N={N} K=8 L={cfg.latent_len}: "
              + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items()))


if __name__ == "__main__":
    main()
