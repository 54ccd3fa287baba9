"""``dvae`` command line: train, eval, reconstruct, compare; the generation prior.

    dvae train [--config PRESET|FILE.yaml] [--resume | --overwrite] [key=value ...]
    dvae eval --checkpoint PATH [key=value ...]
    dvae reconstruct --checkpoint PATH [--out FILE.png] [--count N] [key=value ...]
    dvae compare RUN_DIR... [--format markdown|csv] [--csv FILE]
    dvae compare --curves RUN_DIR... --out curves.png [--csv FILE]
    dvae prior train --tokenizer RUN/checkpoint.pt [--resume | --overwrite] [key=value ...]
    dvae prior eval --checkpoint PRIOR/checkpoint.pt [--npz FILE] [key=value ...]
    dvae generate --prior PRIOR/checkpoint.pt [--labels all|0,1,...] [--num N]
        [--guidance W] [--seed S] [--out FILE.png] [--save-npz FILE] [key=value ...]

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
    c.add_argument("--curves", action="store_true",
                   help="learning curves instead of the table: test PSNR (and beta-ELBO) "
                   "against training minutes and steps, a PNG at --out")
    c.add_argument("--out", default=None, metavar="PNG", help="the curves' PNG (--curves)")
    _prior_parsers(sub)
    return p, sub.choices


def _prior_parsers(sub) -> None:
    from .prior.config import keys_help as prior_keys

    pr = sub.add_parser("prior", help="the generation prior over a tokenizer's codes",
                        allow_abbrev=False)
    psub = pr.add_subparsers(dest="prior_command", metavar="{train,eval}", required=True,
                             parser_class=_Parser)
    t = psub.add_parser("train", help="train the label-conditioned flow prior of a tokenizer",
                        allow_abbrev=False, epilog=prior_keys(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--tokenizer", required=True, metavar="RUN/checkpoint.pt",
                   help="the checkpoint of a dvae train run (any method)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the prior run in out_dir from its checkpoint")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete the prior run's outputs in out_dir and start anew")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="prior config keys")
    e = psub.add_parser("eval", help="a prior's test loss and generation metrics, as JSON",
                        allow_abbrev=False)
    e.add_argument("--checkpoint", required=True, metavar="PRIOR/checkpoint.pt")
    e.add_argument("--npz", default=None, metavar="FILE",
                   help="score the images saved by dvae generate --save-npz instead of "
                   "sampling new ones")
    e.add_argument("overrides", nargs="*", metavar="key=value",
                   help="evaluation keys (eval_samples, guidance, metrics, data_path, device, "
                   "...)")
    g = sub.add_parser("generate", help="label-conditioned samples of a prior, as a PNG grid",
                       allow_abbrev=False)
    g.add_argument("--prior", required=True, metavar="PRIOR/checkpoint.pt")
    g.add_argument("--labels", default="all",
                   help="'all' or comma-separated class labels, one grid row each")
    g.add_argument("--num", type=int, default=8, help="samples per label (>= 1)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance weight (default: the prior's, 0: the "
                   "authors' sampler)")
    g.add_argument("--seed", type=int, default=0, help="the sampling seed")
    g.add_argument("--out", default="samples.png", help="the PNG grid")
    g.add_argument("--save-npz", default=None, metavar="FILE",
                   help="also save images (uint8 [N, C, H, W]), labels and codes")
    g.add_argument("overrides", nargs="*", metavar="key=value",
                   help="prior keys (dt, device, kernel_backend, tokenizer, data_path, ...)")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    top, commands = _parsers()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in commands:
        return top.parse_args(argv)  # help, or one error line naming the valid commands
    if argv[0] == "prior":
        prior = commands["prior"]
        sub = next(a for a in prior._actions if isinstance(a, argparse._SubParsersAction))
        if len(argv) < 2 or argv[1] not in sub.choices:
            return top.parse_args(argv)
        args = sub.choices[argv[1]].parse_intermixed_args(argv[2:])
        args.command, args.prior_command = "prior", argv[1]
        return args
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def _from_checkpoint(path: str, overrides: list[str]):
    from .evaluate import open_checkpoint

    o = open_checkpoint(path, overrides)
    return o.cfg, o.model, o.test, o.preprocess, o.device, o.state


def _resume_from(path: str) -> dict | None:
    """The checkpoint ``--resume`` continues, or None (with a note) when there is none yet."""
    from . import checkpoint as ckpt

    try:
        return ckpt.load(path)
    except ckpt.CheckpointError:
        import os

        if os.path.exists(path):
            raise
        print(f"dvae: no checkpoint at {path}; starting a new run", file=sys.stderr)
        return None


def _nothing_to_train(out_dir: str, state: dict, steps: int) -> bool:
    if int(state["step"]) != steps:
        return False
    print(f"dvae: {out_dir}/checkpoint.pt is already at step {steps} = steps; nothing to "
          "train (raise steps to continue)", file=sys.stderr)
    return True


def _train(args) -> int:
    from .config import load_config, resume_config
    from .trainer import train

    cfg = load_config(args.config, args.overrides)
    state = _resume_from(f"{cfg.out_dir}/checkpoint.pt") if args.resume else None
    if state is not None:
        cfg = resume_config(state["config"], args.config, args.overrides)
        if _nothing_to_train(cfg.out_dir, state, cfg.steps):
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
    from .data import first_images

    x01 = first_images(test, args.count)[0].to(device)
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
    if args.curves:
        return _curves(args)
    if args.out:
        raise ValueError("--out is the PNG of --curves; the table goes to stdout (--csv FILE "
                         "also writes it)")
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


def _curves(args) -> int:
    from .compare import _unique_labels, curves_csv, curves_table, plot_curves, read_curve

    if not args.out:
        raise ValueError("--curves needs --out FILE.png (where the curves go)")
    curves = [read_curve(run) for run in args.runs]
    _unique_labels(curves)
    plot_curves(curves, args.out)
    print(curves_table(curves), end="")
    if args.csv:
        try:
            with open(args.csv, "w") as f:
                f.write(curves_csv(curves))
        except OSError as err:
            raise ValueError(f"--csv {args.csv}: cannot write it: {err.strerror}") from None
    print(f"wrote {args.out}" + (f" and {args.csv}" if args.csv else ""))
    return 0


def _prior_train(args) -> int:
    from . import checkpoint as ckpt
    from .prior.config import prior_config, resume_prior_config
    from .prior.train import train_prior

    tokenizer_preset = ckpt.load(args.tokenizer)["config"].get("preset", "digits")
    cfg = prior_config(args.tokenizer, tokenizer_preset, args.overrides)
    state = _resume_from(f"{cfg.out_dir}/checkpoint.pt") if args.resume else None
    if state is not None:
        cfg = resume_prior_config(state["config"], args.tokenizer,
                                  [*args.overrides, f"out_dir={cfg.out_dir}"])
        if _nothing_to_train(cfg.out_dir, state, cfg.steps):
            return 0
    res = train_prior(cfg, resume=args.resume, overwrite=args.overwrite)
    keys = ("test_loss", "test_fd", "test_fid", "test_label_accuracy", "test_precision",
            "test_recall", "ms_per_step")
    print(json.dumps({k: round(res[k], 4) for k in keys if isinstance(res.get(k), float)}))
    print(f"outputs in {cfg.out_dir}/: metrics.jsonl, samples.png, checkpoint.pt, tb/")
    return 0


def _prior_eval(args) -> int:
    from .prior.generate import evaluate_prior, open_prior
    from .prior.metrics import feature_net, metric_kind

    prior = open_prior(args.checkpoint, args.overrides)
    generated = _read_samples(args.npz, prior) if args.npz else None
    tok = prior.tokenizer
    kind = metric_kind(prior.cfg.metrics, tok.cfg.channels)
    net = (feature_net(kind, tok.train, tok.test, prior.device,
                       classifier_path=prior.cfg.classifier_path,
                       fid_weights=prior.cfg.fid_weights,
                       log=lambda m: print(f"dvae: {m}", file=sys.stderr))
           if kind else None)
    res = evaluate_prior(prior, net, num=prior.cfg.eval_samples, seed=prior.cfg.seed + 12345,
                         generated=generated)
    res["step"] = int(prior.state["step"])
    print(json.dumps(res))
    return 0


def _read_samples(path: str, prior) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as d:
            images, labels = d["images"], d["labels"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--npz {path}: not the .npz of dvae generate --save-npz (images, "
                         f"labels): {err}") from None
    cfg = prior.tokenizer.cfg
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != want or images.dtype != np.uint8:
        raise ValueError(f"--npz {path}: images must be uint8 [N, {want[0]}, {want[1]}, "
                         f"{want[2]}] (this prior's tokenizer), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"--npz {path}: labels must be [{images.shape[0]}], got "
                         f"{tuple(labels.shape)}")
    return torch.from_numpy(images).float() / 255.0, torch.from_numpy(labels).long()


def _generate(args) -> int:
    from .prior.generate import open_prior, parse_labels, save_sample_grid

    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    prior = open_prior(args.prior, args.overrides)
    labels = parse_labels(args.labels, prior.num_classes)
    y = torch.tensor(labels).repeat_interleave(args.num)
    g = torch.Generator(prior.device).manual_seed(args.seed)
    images, codes = prior.sample(y, guidance=args.guidance, generator=g)
    try:
        save_sample_grid(images, len(labels), args.out)
    except (OSError, ValueError) as err:
        raise ValueError(f"--out {args.out}: cannot write the PNG: {err}") from None
    if args.save_npz:
        import numpy as np

        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        guidance = prior.cfg.guidance if args.guidance is None else args.guidance
        try:
            np.savez(args.save_npz, images=pixels, labels=y.numpy(), codes=codes.numpy(),
                     guidance=guidance, seed=args.seed)
        except OSError as err:
            raise ValueError(f"--save-npz {args.save_npz}: cannot write it: "
                             f"{err.strerror or err}") from None
    print(f"wrote {args.out} ({len(labels)} labels x {args.num} samples)"
          + (f" and {args.save_npz}" if args.save_npz else ""))
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
        if args.command == "prior":
            return _prior_train(args) if args.prior_command == "train" else _prior_eval(args)
        if args.command == "generate":
            return _generate(args)
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
