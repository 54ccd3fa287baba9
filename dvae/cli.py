"""``dvae`` command line: train, eval, reconstruct, compare.

    dvae train [--config PRESET|FILE.yaml] [--resume | --overwrite] [key=value ...]
    dvae eval --checkpoint PATH [key=value ...]
    dvae reconstruct --checkpoint PATH [--out FILE.png] [--count N] [key=value ...]
    dvae compare RUN_DIR... [--format markdown|csv] [--csv FILE]

``method=`` chooses the objective (daps, daps_na, vq, fsq, gumbel, gumbel_na, grmck,
grmck_na: the paper's Table 1) on any preset.

Presets: digits (default; scikit-learn's 8x8 digits, minutes on a CPU), mnist, cifar10,
imagenet256 (the paper's configurations; give data_path=...). Multi-GPU or multi-process:
``torchrun --nproc_per_node=N -m dvae.cli train ...``.

Every mistake a user can make ends as one ``dvae: error: ...`` line on stderr and exit code 2;
SIGINT/SIGTERM during training save a checkpoint and exit with 130/143 and one line.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``dvae: error:`` line (exit code 2)."""

    def error(self, message: str):
        where = "" if self.prog == "dvae" else f"{self.prog}: "
        self.exit(2, f"dvae: error: {where}{message}\n")


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (for ``dvae --help``) and one parser per command. Each command's
    parser takes its options and its ``key=value`` overrides in any order."""
    from .config import keys_help

    p = _Parser(prog="dvae", description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train an autoencoder (method=daps by default)",
                       allow_abbrev=False,
                       epilog=keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", default=None,
                   help="a preset (digits, mnist, cifar10, imagenet256) or a YAML file")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in out_dir from its checkpoint (a new run if "
                      "there is none); only run-control keys may change")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete the checkpoint, metrics and TensorBoard files in out_dir "
                      "and start a new run there")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    e = sub.add_parser("eval", help="test-set metrics of a checkpoint, as JSON",
                       allow_abbrev=False)
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--fid", action="store_true",
                   help="also compute rFID (FID Inception weights from the torch hub cache or "
                   "fid_weights=PATH; never downloaded)")
    e.add_argument("overrides", nargs="*", metavar="key=value",
                   help="evaluation keys (data_path, eval_samples, eval_protocol, "
                   "fid_weights, device, ...)")
    r = sub.add_parser("reconstruct", help="a PNG of test images and their reconstructions",
                       allow_abbrev=False)
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--out", default="reconstructions.png")
    r.add_argument("--count", type=int, default=16, help="test images to show (>= 1)")
    r.add_argument("overrides", nargs="*", metavar="key=value",
                   help="evaluation keys (data_path, device, ...)")
    c = sub.add_parser("compare", help="Table 1 (Markdown or CSV) for the given run folders",
                       allow_abbrev=False)
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="out_dir of dvae train runs")
    c.add_argument("--format", default="markdown", choices=("markdown", "csv"),
                   help="what to print (default: markdown)")
    c.add_argument("--csv", default=None, metavar="FILE", help="also write the CSV here")
    return p, sub.choices


def _parse(argv: list[str] | None) -> argparse.Namespace:
    top, commands = _parsers()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in commands:
        return top.parse_args(argv)  # help, or one error line naming the valid commands
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def _from_checkpoint(path: str, overrides: list[str]):
    from .checkpoint import load
    from .config import EVAL_KEYS, Config, changed_keys, parse_overrides
    from .data import Preprocess, load_datasets
    from .models import build_model
    from .trainer import check_kernel_backend, pick_device

    state = load(path)
    values = dict(state["config"])
    asked = parse_overrides(overrides)
    refused = changed_keys(values, asked, EVAL_KEYS)
    if refused:
        raise ValueError(f"{', '.join(refused)} cannot be changed on a checkpoint (its weights "
                         f"were trained with the saved value); keys that may: "
                         f"{', '.join(sorted(EVAL_KEYS))}")
    values.update(asked)
    cfg = Config(**values)
    device = pick_device(cfg.device)
    check_kernel_backend(cfg, device)
    _, test = load_datasets(cfg)
    model = build_model(cfg).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path!r}: its weights do not fit the model its config "
                         f"describes: {str(err).splitlines()[0]}") from None
    # pixel statistics come from the checkpoint's buffers, not recomputed
    shift = model.pixel_shift.flatten().tolist()
    scale = model.pixel_scale.flatten().tolist()
    pre = Preprocess(cfg.likelihood, shift, scale)
    return cfg, model, test, pre, device, state


def _train(args) -> int:
    from . import checkpoint as ckpt
    from .config import load_config, resume_config
    from .trainer import train

    cfg = load_config(args.config, args.overrides)
    path = f"{cfg.out_dir}/checkpoint.pt"
    if args.resume:
        try:
            state = ckpt.load(path)
        except ckpt.CheckpointError:
            import os

            if os.path.exists(path):
                raise
            print(f"dvae: no checkpoint at {path}; starting a new run", file=sys.stderr)
        else:
            cfg = resume_config(state["config"], args.config, args.overrides)
            if int(state["step"]) == cfg.steps:
                print(f"dvae: {path} is already at step {cfg.steps} = steps; nothing to train "
                      "(raise steps to continue)", file=sys.stderr)
                return 0
    res = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if res:
        keys = [k for k in ("test_psnr", "test_ssim", "test_beta_elbo",
                            "test_codebook_usage", "test_perplexity", "ms_per_step")
                if isinstance(res.get(k), (int, float))]
        print(json.dumps({k: round(res[k], 4) for k in keys}))
        print(f"outputs in {cfg.out_dir}/: metrics.jsonl, reconstructions.png, "
              "checkpoint.pt, tb/")
    return 0


def _eval_or_reconstruct(args) -> int:
    from .evaluate import evaluate, save_grid

    if args.command == "reconstruct" and args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    cfg, model, test, pre, device, state = _from_checkpoint(args.checkpoint, args.overrides)
    if args.command == "eval":
        fid_net = None
        if args.fid or cfg.fid:
            from .fid import inception

            fid_net = inception(cfg.fid_weights, device)
        res = evaluate(model, test, pre, cfg, device, max_images=cfg.eval_samples or None,
                       fid_net=fid_net)
        res["step"] = int(state["step"])
        print(json.dumps(res))
        return 0
    from .data import TensorImages

    n = min(args.count, len(test))
    if isinstance(test, TensorImages):
        x01 = test.batch(torch.arange(n))
    else:
        images = []
        for i in range(len(test)):
            if len(images) == n:
                break
            image = test.try_load(i)
            if image is not None:
                images.append(image)
        if not images:
            raise ValueError("no test image could be read")
        x01 = torch.stack(images)
    x01 = x01.to(device)
    model.eval()
    with torch.no_grad():
        codes = model.encode_codes(pre(x01), generator=torch.Generator(device).manual_seed(0))
        recon = model.reconstruct(codes)
    try:
        save_grid(pre.target_pixels(x01).cpu(), recon.cpu(), args.out)
    except (OSError, ValueError) as err:
        raise ValueError(f"--out {args.out}: cannot write the PNG: {err}") from None
    print(f"wrote {args.out} ({x01.shape[0]} originals above their reconstructions)")
    return 0


def _compare(args) -> int:
    from .compare import read_run, table

    rows = [read_run(run) for run in args.runs]
    print(table(rows, args.format), end="")
    if args.csv:
        try:
            with open(args.csv, "w") as f:
                f.write(table(rows, "csv"))
        except OSError as err:
            raise ValueError(f"--csv {args.csv}: cannot write it: {err.strerror}") from None
    return 0


def _one_line(err: BaseException) -> str:
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except ModuleNotFoundError as err:  # `pip install dvae` has the kernels only
        if err.name is None or err.name.split(".")[0] in ("dvae", "dvae_kernels"):
            raise
        print(f"dvae: error: the dvae command needs the training extra ({err.name} is "
              "missing): pip install 'dvae[train]'", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    from dvae_kernels import BackendError

    from .trainer import Interrupted

    try:
        if args.command == "train":
            return _train(args)
        if args.command == "compare":
            return _compare(args)
        return _eval_or_reconstruct(args)
    except Interrupted as stop:
        print(f"dvae: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        # before training started, or a second Ctrl-C during it
        print("dvae: interrupted; stopped without saving (the last checkpoint, if any, stands)",
              file=sys.stderr)
        return 130
    except (ValueError, BackendError) as err:
        print(f"dvae: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions, a vanished file
        where = f"{err.filename}: " if err.filename else ""
        print(f"dvae: error: {where}{err.strerror or _one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
