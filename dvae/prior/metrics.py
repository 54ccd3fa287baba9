"""Generation metrics, the same for every tokenizer.

* One-channel datasets (digits, MNIST): a small convolutional classifier trained on the
  training set with a fixed recipe (:data:`RECIPE`; about a minute on two CPU cores for MNIST,
  seconds for digits; nothing downloaded) and cached by a fingerprint of the data and the
  recipe. In its 128-d penultimate features: the Fréchet distance between generated and test
  images (``fd``), precision and recall (Kynkäänniemi et al. 2019, k = 3 nearest neighbours);
  and ``label_accuracy``, how often its prediction is the label the image was generated for.
* Three-channel datasets (CIFAR-10, ImageNet): FID, the Fréchet distance in the FID Inception
  network's pool features (:mod:`dvae.fid`: ``fid_weights=``, never downloaded), with precision
  and recall in the same features.

Every figure comes with its references measured the same way: ``fd_data``, training images
against test images (what sampling noise alone gives), and ``fd_recon``, the tokenizer's own
reconstructions of the test images (the best a prior over its tokens could reach).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from ..fid import FeatureStats, frechet_distance

# The classifier's fixed training recipe; part of the cache fingerprint.
RECIPE = {"version": 1, "steps": 1000, "batch_size": 128, "lr": 1e-3, "seed": 0,
          "width": 16, "features": 128}
NEIGHBOURS = 3  # k of the k-NN manifolds of precision and recall


class FeatureClassifier(nn.Module):
    """conv3x3(16)-pool-conv3x3(32)-pool-conv3x3(64)-maxpool(2x2)-Dense(128) features, then a
    linear classifier; any image size >= 4, pixels in [0, 1]."""

    def __init__(self, channels: int, num_classes: int, width: int = 16, features: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveMaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * width, features), nn.ReLU())
        self.classify = nn.Linear(features, num_classes)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        return self.body((x01.float() - 0.5) / 0.5)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x01))


def _fingerprint(train, test) -> str:
    h = hashlib.sha256(repr(sorted(RECIPE.items())).encode())
    for ds in (train, test):
        h.update(str(tuple(ds.images.shape)).encode())
        h.update(ds.images.contiguous().numpy().tobytes())
        h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()


def cache_dir() -> Path:
    """``$DVAE_CACHE``, else ``$XDG_CACHE_HOME/dvae``, else ``~/.cache/dvae``."""
    if os.environ.get("DVAE_CACHE"):
        return Path(os.environ["DVAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dvae"


@torch.no_grad()
def _accuracy(model: FeatureClassifier, ds, device) -> float:
    model.eval()
    right = 0
    for start in range(0, len(ds), 512):
        idx = torch.arange(start, min(start + 512, len(ds)))
        pred = model(ds.batch(idx).to(device)).argmax(-1).cpu()
        right += int((pred == ds.labels[idx]).sum())
    return right / max(len(ds), 1)


def train_classifier(train, test, device: torch.device | str = "cpu"
                     ) -> tuple[FeatureClassifier, float]:
    """The metric classifier trained with :data:`RECIPE` on ``train`` (a
    :class:`dvae.data.TensorImages` with labels); returns it and its ``test`` accuracy."""
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    g = torch.Generator().manual_seed(RECIPE["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"])
        model = FeatureClassifier(train.images.shape[1], num_classes, RECIPE["width"],
                                  RECIPE["features"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    model.train()
    n, bs = len(train), min(RECIPE["batch_size"], len(train))
    perm, at = torch.randperm(n, generator=g), 0
    for _ in range(RECIPE["steps"]):
        if at + bs > n:
            perm, at = torch.randperm(n, generator=g), 0
        idx = perm[at:at + bs]
        at += bs
        loss = F.cross_entropy(model(train.batch(idx).to(device)), train.labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), _accuracy(model, test, device)


def metric_classifier(train, test, path: str | os.PathLike | None = None,
                      device: torch.device | str = "cpu", log=print
                      ) -> tuple[FeatureClassifier, float]:
    """The metric classifier for this data: read from ``path`` (default: the cache, named by
    the fingerprint of the data and the recipe), or trained and written there atomically.
    Returns it and its test accuracy."""
    if getattr(train, "labels", None) is None or getattr(test, "labels", None) is None:
        raise ValueError("the classifier metrics need class labels in the training and test "
                         "data")
    fp = _fingerprint(train, test)
    file = Path(path) if path else cache_dir() / f"classifier-{fp[:20]}.pt"
    if file.is_file():
        state = ckpt.load(file)
        if state["config"].get("fingerprint") != fp:
            raise ValueError(f"classifier_path {str(file)!r} was trained on other data or "
                             "with another recipe (its fingerprint differs); delete it or "
                             "give another path")
        num_classes = state["model"]["classify.weight"].shape[0]
        model = FeatureClassifier(train.images.shape[1], num_classes, RECIPE["width"],
                                  RECIPE["features"])
        model.load_state_dict(state["model"])
        return model.to(device).eval(), float(state["test_accuracy"])
    log(f"training the metric classifier ({RECIPE['steps']} steps, once; cached at {file})")
    model, acc = train_classifier(train, test, device)
    state = {"config": {"fingerprint": fp, "recipe": RECIPE}, "step": RECIPE["steps"],
             "model": {k: v.cpu() for k, v in model.state_dict().items()},
             "test_accuracy": acc}
    try:
        ckpt.save_atomic(state, file)
    except ckpt.CheckpointError as err:  # a read-only cache costs a retrain, not the run
        log(f"warning: the classifier was not cached: {err}")
    return model, acc


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = NEIGHBOURS,
                     chunk: int = 2048) -> tuple[float, float]:
    """Kynkäänniemi et al.'s improved precision and recall of ``fake [M, F]`` against
    ``real [N, F]`` features: the fraction of fake inside the real k-NN manifold (the union
    of balls reaching each real point's k-th nearest real neighbour), and of real inside the
    fake one."""
    if real.shape[0] <= k or fake.shape[0] <= k:
        raise ValueError(f"precision and recall need more than k={k} images of each kind, got "
                         f"{real.shape[0]} real and {fake.shape[0]} generated")
    real, fake = real.double(), fake.double()

    def radii(x: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, x.shape[0], chunk):
            d = torch.cdist(x[s:s + chunk], x)
            out.append(d.kthvalue(k + 1, dim=1).values)  # the 0 to itself comes first
        return torch.cat(out)

    def covered(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        inside = 0
        for s in range(0, points.shape[0], chunk):
            d = torch.cdist(points[s:s + chunk], centres)
            inside += int((d <= r[None]).any(1).sum())
        return inside / points.shape[0]

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to features ``a`` and ``b``."""
    sa, sb = FeatureStats(a.shape[1]), FeatureStats(b.shape[1])
    sa.add(a)
    sb.add(b)
    return frechet_distance(sa, sb)


class FeatureNet:
    """Features (and, for the classifier, label predictions) of images in [0, 1]."""

    def __init__(self, kind: str, net: nn.Module, device, classifier_accuracy=None):
        self.kind, self.net, self.device = kind, net, device
        self.classifier_accuracy = classifier_accuracy

    @torch.no_grad()
    def __call__(self, x01: torch.Tensor, batch: int = 256
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats, preds = [], []
        for s in range(0, x01.shape[0], batch):
            x = x01[s:s + batch].to(self.device).float().clamp(0, 1)
            if self.kind == "classifier":
                f = self.net.features(x)
                preds.append(self.net.classify(f).argmax(-1).cpu())
            else:
                if x.shape[1] == 1:
                    x = x.expand(-1, 3, -1, -1)
                with torch.autocast(self.device.type, enabled=False):
                    f = self.net(x)[0].flatten(1)
            feats.append(f.cpu())
        return torch.cat(feats), (torch.cat(preds) if preds else None)


def feature_net(kind: str, train, test, device, *, classifier_path=None, fid_weights=None,
                log=print) -> FeatureNet:
    """The feature network of ``kind`` ("classifier" or "inception")."""
    if kind == "classifier":
        model, acc = metric_classifier(train, test, classifier_path, device, log)
        return FeatureNet(kind, model, device, acc)
    if kind == "inception":
        from ..fid import inception

        return FeatureNet(kind, inception(fid_weights, device), device)
    raise ValueError(f"metrics must be classifier or inception, got {kind!r}")


def metric_kind(setting: str, channels: int) -> str | None:
    """``metrics=auto``: the classifier for one channel, Inception for three."""
    if setting == "none":
        return None
    if setting == "auto":
        return "classifier" if channels == 1 else "inception"
    return setting


def generation_metrics(net: FeatureNet, generated: torch.Tensor, labels: torch.Tensor,
                       test: torch.Tensor, train: torch.Tensor,
                       recon: torch.Tensor | None = None) -> dict[str, float | None]:
    """The figures for ``generated`` images (``[M, C, H, W]`` in [0, 1], made for ``labels``)
    against ``test`` images, with ``train`` images and the tokenizer's reconstructions
    ``recon`` of the test images as references (see the module docstring)."""
    f_gen, pred = net(generated)
    f_test, _ = net(test)
    f_train, _ = net(train)
    precision, recall = precision_recall(f_test, f_gen)
    name = "fd" if net.kind == "classifier" else "fid"
    out: dict[str, float | None] = {
        name: frechet(f_test, f_gen),
        "precision": precision,
        "recall": recall,
        "label_accuracy": (float((pred == labels.cpu()).double().mean())
                           if pred is not None else None),
        f"{name}_data": frechet(f_test, f_train),
        f"{name}_recon": frechet(f_test, net(recon)[0]) if recon is not None else None,
        "generated": int(generated.shape[0]),
    }
    if net.classifier_accuracy is not None:
        out["classifier_test_accuracy"] = net.classifier_accuracy
    return out
