"""Replication run: the paper's MNIST configuration (DESIGN.md §1 table) for a wall-clock
budget, then test-set PSNR, SSIM and β-ELBO on all 10,000 test images.

    python bench/replicate_mnist.py /path/to/mnist.npz --minutes 10 [--out runs/mnist_rep]
        [key=value ...]

The configuration is the ``mnist`` preset unchanged (L=8, V=256, d=64, 1/1 layers, 4 heads,
MLP decoder, Bernoulli likelihood on binarised pixels, batch 256, K=8, ρ=0.33, learned η from
100, β 0.5 -> 0.01 over 250k steps, AdamW 3e-4, adaptive clipping 1.0); the run simply stops
early, so β follows the paper's schedule for the steps it reaches. Paper (250k steps): DAPS
18.23 dB. Prints one JSON line with the figures and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="MNIST .npz (x_train, x_test) or IDX folder")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget")
    p.add_argument("--out", default="runs/mnist_replication")
    p.add_argument("--chunk", type=int, default=50, help="steps between budget checks")
    p.add_argument("overrides", nargs="*", help="config key=value pairs")
    args = p.parse_args(argv)

    from dvae.config import load_config
    from dvae.trainer import Trainer

    cfg = load_config("mnist", [f"data_path={args.data}", f"out_dir={args.out}",
                                "progress=false", "eval_every=0", "ckpt_every=0",
                                "log_every=50", *args.overrides])
    trainer = Trainer(cfg)
    budget = args.minutes * 60
    start = time.perf_counter()
    cpu_start = time.process_time()
    while trainer.step < cfg.steps and time.perf_counter() - start < budget:
        last = trainer.run(until=trainer.step + args.chunk)
    train_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start  # all threads: on a shared machine, the work done
    trainer.save()
    ev = time.perf_counter()
    res = trainer.evaluate()
    eval_s = time.perf_counter() - ev
    trainer.close()
    out = {
        "steps": trainer.step,
        "train_seconds": round(train_s, 1),
        "ms_per_step": round(1000 * train_s / max(trainer.step, 1), 1),
        "cpu_seconds": round(cpu_s, 1),
        "cpu_ms_per_step": round(1000 * cpu_s / max(trainer.step, 1), 1),
        "test_psnr_db": round(res["psnr"], 3),
        "test_ssim": round(res["ssim"], 4),
        "test_beta_elbo_nats": round(res["beta_elbo"], 3),
        "test_log_px_nats": round(res["log_px"], 3),
        "test_kl_nats": round(res["kl"], 3),
        "codebook_usage": round(res["codebook_usage"], 4),
        "perplexity": round(res["perplexity"], 2),
        "train_ess_frac": round(last.get("ess_frac", float("nan")), 3),
        "train_eta": round(last.get("eta", float("nan")), 3),
        "beta_now": round(last.get("beta", float("nan")), 4),
        "eval_images": res["eval_images"],
        "eval_seconds": round(eval_s, 1),
        "paper_psnr_db_250k_steps": 18.23,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"threads {torch.get_num_threads()}",
    }
    print(json.dumps(out))
    with open(os.path.join(args.out, "replication.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
