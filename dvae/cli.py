"""``dvae`` command line: train, eval, reconstruct.

    dvae train [--config PRESET|FILE.yaml] [--resume] [key=value ...]
    dvae eval --checkpoint PATH [key=value ...]
    dvae reconstruct --checkpoint PATH [--out FILE.png] [--count N] [key=value ...]

Presets: digits (default; scikit-learn's 8x8 digits, minutes on a CPU), mnist, cifar10,
imagenet256 (the paper's configurations; give data_path=...). Multi-GPU or multi-process:
``torchrun --nproc_per_node=N -m dvae.cli train ...``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dvae", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a DAPS autoencoder")
    t.add_argument("--config", default=None,
                   help="a preset (digits, mnist, cifar10, imagenet256) or a YAML file")
    t.add_argument("--resume", action="store_true",
                   help="continue from out_dir/checkpoint.pt if it exists")
    t.add_argument("overrides", nargs="*", help="config key=value pairs")
    e = sub.add_parser("eval", help="test-set metrics of a checkpoint, as JSON")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("overrides", nargs="*", help="config key=value pairs (e.g. data_path=...)")
    r = sub.add_parser("reconstruct", help="a PNG of test images and their reconstructions")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--out", default="reconstructions.png")
    r.add_argument("--count", type=int, default=16)
    r.add_argument("overrides", nargs="*", help="config key=value pairs")
    return p


def _from_checkpoint(path: str, overrides: list[str]):
    from .checkpoint import load
    from .config import Config, _parse_value
    from .data import Preprocess, load_datasets, pixel_stats
    from .models import build_model
    from .trainer import pick_device

    state = load(path)
    values = dict(state["config"])
    defaults = Config(**values)
    for item in overrides:
        key, _, raw = item.partition("=")
        if not _ or key not in values:
            raise ValueError(f"override must be key=value with a known key, got {item!r}")
        values[key] = _parse_value(raw, getattr(defaults, key), key)
    cfg = Config(**values)
    device = pick_device(cfg.device)
    _, test = load_datasets(cfg)
    model = build_model(cfg).to(device)
    model.load_state_dict(state["model"])
    shift = model.pixel_shift.flatten().tolist()
    scale = model.pixel_scale.flatten().tolist()
    pre = Preprocess(cfg.likelihood, shift, scale)
    _ = pixel_stats  # stats come from the checkpoint's buffers, not recomputed
    return cfg, model, test, pre, device, state


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from .config import load_config
            from .trainer import train

            cfg = load_config(args.config, args.overrides)
            res = train(cfg, resume=args.resume)
            if res:
                keys = [k for k in ("test_psnr", "test_ssim", "test_beta_elbo",
                                    "test_codebook_usage", "test_perplexity", "ms_per_step")
                        if k in res]
                print(json.dumps({k: round(res[k], 4) for k in keys}))
                print(f"outputs in {cfg.out_dir}/: metrics.jsonl, reconstructions.png, "
                      "checkpoint.pt, tb/")
            return 0
        from .trainer import evaluate, save_grid

        cfg, model, test, pre, device, state = _from_checkpoint(args.checkpoint, args.overrides)
        if args.command == "eval":
            res = evaluate(model, test, pre, cfg, device, max_images=cfg.eval_samples or None)
            res["step"] = int(state["step"])
            print(json.dumps(res))
            return 0
        n = min(args.count, len(test))
        from .data import TensorImages

        idx = torch.arange(n)
        x01 = (test.batch(idx) if isinstance(test, TensorImages)
               else torch.stack([test[(i, 0)][0] for i in range(n)])).to(device)
        model.eval()
        with torch.no_grad():
            tokens, _ = model.sample(pre(x01), 1, generator=torch.Generator(device).manual_seed(0))
            recon = model.reconstruct(tokens[:, 0])
        save_grid(pre.target_pixels(x01).cpu(), recon.cpu(), args.out)
        print(f"wrote {args.out} ({n} originals above their reconstructions)")
        return 0
    except ValueError as err:
        print(f"dvae: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
