"""``dvae compare RUN_DIR...``: the paper's Table 1 for the runs given, as Markdown or CSV;
``dvae compare --curves RUN_DIR... --out curves.png``: their learning curves.

Each run directory's ``metrics.jsonl`` describes it: its first record holds the method, the
bits per image, the machine and the whole configuration; the last test record holds the
figures; the last training record the steps and the training wall-clock. β-ELBO is defined
only where q is a distribution: VQ-VAE and FSQ show "n/a". The published figures of
docs/algorithm.md (mean of seeds, at 250k-300k steps) stand beside the runs' for the paper's
datasets.

Generation columns come from the run's prior (``dvae prior train``), read from
``RUN_DIR/prior/metrics.jsonl`` (its default out_dir); a prior run's own folder may be given
instead of the tokenizer's, and then names its tokenizer. They are shown when any row has
them: the prior's training minutes, its test loss, the Fréchet distance of its samples in the
metric classifier's features (``gen FD``; or FID), with the test images' distance to the
tokenizer's reconstructions (``recon FD``) beside it, precision, recall and label accuracy.

Curves come from the periodic evaluations a run writes (``eval_every_seconds`` or
``eval_every``; records ``eval: curve``), each on the same first ``curve_samples`` test
images, with the training wall-clock at that point (evaluation time not counted).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .config import METHODS

LABELS = {"fsq": "FSQ", "vq": "VQ-VAE", "grmck": "GR-MCK", "grmck_na": "GR-MCK-NA",
          "gumbel": "Gumbel (AR)", "gumbel_na": "Gumbel-NA", "daps": "DAPS",
          "daps_na": "DAPS-NA"}
# Table 1's order
ORDER = ("fsq", "vq", "grmck", "grmck_na", "gumbel", "gumbel_na", "daps", "daps_na")
# docs/algorithm.md: published test PSNR (dB) per dataset
PAPER_PSNR = {
    "mnist": {"fsq": 18.42, "vq": 18.45, "grmck": 16.78, "gumbel": 16.30, "gumbel_na": 18.21,
              "daps": 18.23, "daps_na": 18.36},
    "cifar10": {"fsq": 24.19, "vq": 24.19, "grmck": 22.69, "gumbel": 23.74,
                "gumbel_na": 24.27, "daps": 25.21, "daps_na": 25.02},
    "imagenet256": {"fsq": 24.24, "vq": 23.83, "grmck": 23.01, "gumbel_na": 24.49,
                    "daps": 24.66, "daps_na": 24.40},
}
COLUMNS = ("method", "dataset", "bits", "psnr", "ssim", "rfid", "beta_elbo",
           "codebook_usage", "perplexity", "steps", "train_minutes", "paper_psnr",
           "prior_minutes", "prior_loss", "gen_fd", "recon_fd", "gen_fid", "precision",
           "recall", "label_accuracy", "run")
GENERATION = ("prior_minutes", "prior_loss", "gen_fd", "recon_fd", "gen_fid", "precision",
              "recall", "label_accuracy")


def _lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(record, dict):
            out.append(record)
    return out


def _records(path: Path) -> tuple[dict | None, dict | None, dict | None]:
    """(the config record, the last training record, the last test record that is not a
    curve point, else the last curve point) of a metrics.jsonl."""
    head = train = test = curve = None
    for record in _lines(path):
        split = record.get("split")
        if split == "config" and head is None:
            head = record
        elif split == "train":
            train = record
        elif split == "test" and record.get("eval") == "curve":
            curve = record
        elif split == "test":
            test = record
    return head, train, test if test is not None else curve


def _generation(prior_dir: Path) -> dict:
    """The generation columns from a prior run's folder (empty when it has no evaluation)."""
    path = prior_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    _, train, test = _records(path)
    if test is None:
        return {}
    fd = test.get("fd")
    return {"prior_minutes": (train or {}).get("train_seconds", 0.0) / 60,
            "prior_loss": test.get("loss"), "gen_fd": fd,
            "recon_fd": test.get("fd_recon") if fd is not None else test.get("fid_recon"),
            "gen_fid": test.get("fid"), "precision": test.get("precision"),
            "recall": test.get("recall"), "label_accuracy": test.get("label_accuracy")}


def read_run(run_dir: str | Path) -> dict:
    """One row of the table from ``run_dir/metrics.jsonl``."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (not a dvae run directory?)")
    head, train, test = _records(path)
    prior_dir = run_dir / "prior"
    if head is not None and head.get("kind") == "prior":  # a prior's folder: its tokenizer's
        prior_dir = run_dir
        tokenizer = Path(head["config"]["tokenizer"])
        # the path as given when the prior was trained, else the default layout (prior/
        # beside the tokenizer's checkpoint)
        found = [d for d in (tokenizer.parent, run_dir.parent)
                 if (d / "metrics.jsonl").is_file()]
        if not found:
            raise ValueError(f"{run_dir}: the prior's tokenizer run ({tokenizer.parent}) has "
                             "no metrics.jsonl")
        run_dir = found[0]
        head, train, test = _records(run_dir / "metrics.jsonl")
    if head is None:
        raise ValueError(f"{path}: no run description (written by dvae 0.2 and later)")
    if test is None:
        raise ValueError(f"{path}: no evaluation yet (the run evaluates at eval_every and "
                         "at its end)")
    cfg = head["config"]
    method = head.get("method", cfg.get("method", "daps"))
    return {
        "method": method,
        "dataset": cfg.get("dataset"),
        "bits": head.get("bits_per_image"),
        "psnr": test.get("psnr"),
        "ssim": test.get("ssim"),
        "rfid": test.get("rfid"),
        "beta_elbo": test.get("beta_elbo"),
        "codebook_usage": test.get("codebook_usage"),
        "perplexity": test.get("perplexity"),
        "steps": test.get("step"),
        "train_minutes": (train or {}).get("train_seconds", 0.0) / 60,
        "paper_psnr": PAPER_PSNR.get(cfg.get("dataset"), {}).get(method),
        **{k: None for k in GENERATION}, **_generation(prior_dir),
        "run": str(run_dir),
        "machine": head.get("machine", {}),
    }


def _sort_key(row: dict) -> tuple:
    m = row["method"]
    return (str(row["dataset"]), ORDER.index(m) if m in ORDER else len(METHODS), row["run"])


def _fmt(key: str, value) -> str:
    if value is None:
        return "n/a" if key == "beta_elbo" else ""
    if key == "method":
        return LABELS.get(value, value)
    if isinstance(value, float):
        digits = {"psnr": 2, "ssim": 3, "rfid": 2, "beta_elbo": 2, "codebook_usage": 3,
                  "perplexity": 1, "train_minutes": 1, "paper_psnr": 2, "bits": 1,
                  "prior_minutes": 1, "prior_loss": 2, "gen_fd": 2, "recon_fd": 2,
                  "gen_fid": 2, "precision": 3, "recall": 3, "label_accuracy": 3}
        return f"{value:.{digits.get(key, 3)}f}"
    return str(value)


def table(rows: list[dict], fmt: str = "markdown") -> str:
    """The rows as a Markdown table (Table 1's order) or CSV (raw numbers)."""
    rows = sorted(rows, key=_sort_key)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in COLUMNS})
        return buf.getvalue()
    if fmt != "markdown":
        raise ValueError(f"--format must be markdown or csv, got {fmt!r}")
    heads = {"method": "method", "dataset": "data", "bits": "bits", "psnr": "PSNR dB",
             "ssim": "SSIM", "rfid": "rFID", "beta_elbo": "β-ELBO", "codebook_usage":
             "codebook use", "perplexity": "perplexity", "steps": "steps",
             "train_minutes": "train min", "paper_psnr": "paper PSNR",
             "prior_minutes": "prior min", "prior_loss": "prior loss", "gen_fd": "gen FD",
             "recon_fd": "recon FD", "gen_fid": "gen FID", "precision": "precision",
             "recall": "recall", "label_accuracy": "label acc", "run": "run"}
    optional = ("rfid",) + GENERATION
    cols = [c for c in COLUMNS
            if c not in optional or any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(heads[c] for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(c, row[c]) for c in cols) + " |")
    machines = {json.dumps(r["machine"], sort_keys=True) for r in rows if r["machine"]}
    notes = ["", "β-ELBO: nats per image at β_end; n/a for VQ-VAE and FSQ (no distribution "
             "q, no KL). paper PSNR: docs/algorithm.md (mean of seeds, 250k-300k steps)."]
    if any(r.get("prior_loss") is not None for r in rows):
        notes.append("Generation (docs/generation.md): the prior's test loss (nats per image); "
                     "gen FD / gen FID: its samples against the test images; recon FD: the "
                     "tokenizer's reconstructions against them (what a perfect prior reaches).")
    for m in sorted(machines):
        d = json.loads(m)
        gpu = f", {d['gpu']}" if d.get("gpu") else ""
        notes.append(f"machine: {d.get('cpu')} ({d.get('cores')} cores{gpu}), torch "
                     f"{d.get('torch')}")
    return "\n".join(lines + notes) + "\n"


# -- curves: quality against training wall-clock and steps ---------------------------------------

CURVE_COLUMNS = ("label", "method", "step", "train_minutes", "psnr", "beta_elbo", "eval_images",
                 "run")


def read_curve(run_dir: str | Path) -> dict:
    """A run's learning curve: its periodic evaluations (``eval: curve`` records: the same
    first ``curve_samples`` test images at every point) with the training wall-clock and step
    of each. ``label`` names the method (and its recipe when not the paper's)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (not a dvae run directory?)")
    records = _lines(path)
    head = next((r for r in records if r.get("split") == "config"), None)
    if head is None or head.get("kind") == "prior":
        raise ValueError(f"{path}: not a tokenizer run (dvae train) with a run description")
    points = [r for r in records if r.get("split") == "test" and r.get("eval") == "curve"
              and r.get("train_seconds") is not None]
    if not points:
        raise ValueError(f"{path}: no curve points: train with eval_every_seconds=S (or "
                         "eval_every=N) to evaluate periodically")
    # a resumed run may repeat steps: keep the latest record of each
    by_step = {r["step"]: r for r in points}
    cfg = head["config"]
    method = head.get("method", cfg.get("method", "daps"))
    recipe = cfg.get("recipe", "paper")
    label = LABELS.get(method, method) + ("" if recipe == "paper" else f" ({recipe})")
    return {"label": label, "method": method, "run": str(run_dir),
            "points": [{"step": r["step"], "train_minutes": r["train_seconds"] / 60,
                        "psnr": r.get("psnr"), "beta_elbo": r.get("beta_elbo"),
                        "eval_images": r.get("eval_images")}
                       for _, r in sorted(by_step.items())]}


def _unique_labels(curves: list[dict]) -> None:
    """Runs with the same label get their folder's name beside it."""
    seen: dict[str, int] = {}
    for c in curves:
        seen[c["label"]] = seen.get(c["label"], 0) + 1
    for c in curves:
        if seen[c["label"]] > 1:
            c["label"] = f"{c['label']} [{Path(c['run']).name}]"


def _at(points: list[dict], minutes: float) -> float | None:
    """The PSNR of the last point at or before ``minutes`` of training."""
    before = [p["psnr"] for p in points if p["train_minutes"] <= minutes + 1e-9]
    return before[-1] if before else None


def _minutes(m: float) -> str:
    return f"{m:.1f} min" if m >= 1 else f"{60 * m:.0f} s"


def curves_table(curves: list[dict]) -> str:
    """Markdown: each run's PSNR at four times (quarters of the shortest run), its last
    point and the best."""
    shortest = min(c["points"][-1]["train_minutes"] for c in curves)
    marks = [shortest * q / 4 for q in (1, 2, 3, 4)]
    heads = ["run", *[f"PSNR at {_minutes(m)}" for m in marks], "last point", "best", "steps"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for c in curves:
        pts = c["points"]
        cells = [c["label"]]
        cells += ["" if _at(pts, m) is None else f"{_at(pts, m):.2f}" for m in marks]
        last = pts[-1]
        cells += [f"{last['psnr']:.2f} dB at {_minutes(last['train_minutes'])}",
                  f"{max(p['psnr'] for p in pts):.2f}", str(last["step"])]
        lines.append("| " + " | ".join(cells) + " |")
    sizes = sorted({p["eval_images"] for c in curves for p in c["points"]} - {None})
    note = (f"\nTest PSNR (dB) on the first {', '.join(map(str, sizes))} test images at each "
            "point, against training wall-clock (evaluation not counted).")
    if len(sizes) > 1:
        note += " The runs evaluated different subsets (curve_samples): compare with care."
    return "\n".join(lines) + "\n" + note + "\n"


def curves_csv(curves: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for c in curves:
        for p in c["points"]:
            writer.writerow({"label": c["label"], "method": c["method"], "run": c["run"],
                             **{k: "" if p[k] is None else p[k] for k in p}})
    return buf.getvalue()


def plot_curves(curves: list[dict], out: str | Path) -> None:
    """PNG: test PSNR (top) and, where any run has one, β-ELBO (bottom), against training
    minutes (left) and steps (right), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("psnr", "test PSNR (dB)")]
    if any(p["beta_elbo"] is not None for c in curves for p in c["points"]):
        metrics.append(("beta_elbo", "test β-ELBO (nats per image)"))
    fig, axes = plt.subplots(len(metrics), 2, figsize=(12, 4.2 * len(metrics)), squeeze=False)
    for row, (key, name) in enumerate(metrics):
        for col, (xkey, xname) in enumerate((("train_minutes", "training minutes"),
                                              ("step", "steps"))):
            ax = axes[row][col]
            for i, c in enumerate(curves):  # one colour per run in every panel
                pts = [p for p in c["points"] if p[key] is not None]
                if pts:
                    ax.plot([p[xkey] for p in pts], [p[key] for p in pts], marker=".",
                            label=c["label"], color=f"C{i % 10}")
            ax.set_xlabel(xname)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if key == "beta_elbo":
                ax.set_title("β-ELBO (n/a for VQ-VAE and FSQ)", fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write the PNG: {err}") from None
    finally:
        plt.close(fig)
