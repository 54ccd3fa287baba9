"""Datasets, preprocessing and a resumable batch stream.

Loaders return pixels in [0, 1] as float32 ``[C, H, W]``; :class:`Preprocess` maps them to what
the model sees (binarised for a Bernoulli likelihood, standardised per channel for a Gaussian).

* ``digits``: scikit-learn's bundled 1797 8x8 digits (the last 297 of a fixed shuffle are the
  test set).
* ``mnist``: an ``.npz`` with ``x_train``/``x_test`` or a folder of IDX files (``.gz`` or not).
* ``cifar10``: the python pickle folder (``data_batch_1..5``, ``test_batch``).
* ``imagenet256``: an ImageFolder tree (``root/train/<class>/*``, ``root/val/<class>/*``, or
  class folders directly under ``root``); the paper's transforms (random resized crop and
  horizontal flip for training; for evaluation the paper's protocol, the whole image resized
  to the target size, or ``eval_protocol=center_crop``: resize the short side, centre crop).
  Any file PIL can decode is used (CMYK and PNG-disguised JPEGs included); an unreadable file
  is skipped with a warning and counted in the batch's ``skipped`` entry.

:class:`BatchStream` yields index batches from a seeded permutation per epoch; its state (epoch,
position) is a checkpoint field, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import gzip
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Per-channel pixel statistics in [0, 1] units for standardisation (the reference's ImageNet
# constants, in 0..255 units there).
IMAGENET_MEAN = (123.095 / 255, 115.324 / 255, 102.224 / 255)
IMAGENET_STD = (68.819 / 255, 66.551 / 255, 69.687 / 255)


def check_images(images: torch.Tensor, source: str) -> torch.Tensor:
    """Refuse data a run would silently mistrain on: images must be ``[N, C, H, W]``, uint8
    (0..255) or floating point, finite and in [0, 1] (floats scaled 0..255 are refused, not
    guessed). ``source`` names the file or dataset in the error."""
    if images.dim() != 4:
        raise ValueError(f"{source}: images must be [N, C, H, W] (or [N, H, W] for one "
                         f"channel), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"{source}: images must be uint8 (0..255) or floats in [0, 1], got "
                         f"{images.dtype}")
    bad = (~torch.isfinite(images)).sum().item()
    if bad:
        raise ValueError(f"{source}: {bad} pixel values are NaN or infinite")
    lo, hi = images.min().item() if images.numel() else 0.0, \
        images.max().item() if images.numel() else 0.0
    if lo < 0 or hi > 1:
        hint = " (divide by 255, or store uint8)" if hi > 1 else ""
        raise ValueError(f"{source}: float pixels must lie in [0, 1], got values in "
                         f"[{lo:g}, {hi:g}]{hint}")
    return images


def check_labels(labels, n: int, source: str) -> torch.Tensor | None:
    """Class labels as ``[n]`` int64 >= 0, or None when there are none."""
    if labels is None:
        return None
    t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if t.dim() != 1 or t.shape[0] != n or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{source}: labels must be {n} integers (one per image), got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    t = t.long()
    if n and int(t.min()) < 0:
        raise ValueError(f"{source}: labels must be >= 0, got {int(t.min())}")
    return t


class TensorImages(Dataset):
    """In-memory images, uint8 (0..255) or float (already in [0, 1]), ``[N, C, H, W]``;
    checked by :func:`check_images` (``source`` names them in errors). ``labels``: ``[N]``
    class indices, or None."""

    def __init__(self, images: torch.Tensor, source: str = "images", labels=None):
        self.images = check_images(images, source)
        self.labels = check_labels(labels, self.images.shape[0], source)

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.images[indices]
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def __getitem__(self, index):
        label = -1 if self.labels is None else int(self.labels[index])
        return self.batch(torch.as_tensor([index]))[0], 0, label


def load_digits_split(seed: int = 0) -> tuple[TensorImages, TensorImages]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(digits.target).long()
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    images, labels = images[perm], labels[perm]
    return (TensorImages(images[:1500], "digits (train)", labels[:1500]),
            TensorImages(images[1500:], "digits (test)", labels[1500:]))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read it: {err}") from None
    magic = int.from_bytes(data[:4], "big")
    if len(data) < 4 or magic >> 8 != 0x08:  # 0x08: unsigned bytes
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"{path}: IDX file of {len(data)} bytes, its header says {expected} "
                         "(truncated or damaged)")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _as_nchw(array: np.ndarray, source: str) -> torch.Tensor:
    """``[N, H, W]`` (one channel) or ``[N, C, H, W]`` as a tensor, validated."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if t.dim() == 3:
        t = t[:, None]
    return check_images(t, source)


def load_mnist(path: str | os.PathLike) -> tuple[TensorImages, TensorImages]:
    """MNIST from ``path``: an ``.npz`` (keys ``x_train``, ``x_test``; labels ``y_train``,
    ``y_test`` when present) or an IDX folder (the ``*-labels-idx1-ubyte`` files when
    present)."""
    p = Path(path)
    if p.is_file():
        try:
            d = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"data_path {str(p)!r} is not a NumPy .npz archive with x_train "
                             f"and x_test ({type(err).__name__}: {err})".split("\n")[0]
                             ) from None
        if not isinstance(d, np.lib.npyio.NpzFile):
            raise ValueError(f"data_path {str(p)!r} is a single .npy array; expected an .npz "
                             "archive with x_train and x_test")
        with d:
            missing = {"x_train", "x_test"} - set(d.files)
            if missing:
                raise ValueError(f"{p}: expected keys x_train and x_test, missing "
                                 f"{sorted(missing)} (has {d.files})")
            try:
                train, test = d["x_train"], d["x_test"]
                labels = ((d["y_train"], d["y_test"]) if {"y_train", "y_test"} <= set(d.files)
                          else (None, None))
            except (ValueError, OSError, EOFError) as err:
                raise ValueError(f"{p}: cannot read its arrays: {err}") from None
    elif p.is_dir():
        def find(stem: str, required: bool = True) -> Path | None:
            dotted = stem.replace("-idx", ".idx")
            for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
                if (p / name).is_file():
                    return p / name
            if not required:
                return None
            raise ValueError(f"{p}: no {stem}[.gz] IDX file")
        train = _read_idx(find("train-images-idx3-ubyte"))
        test = _read_idx(find("t10k-images-idx3-ubyte"))
        found = [find(f"{s}-labels-idx1-ubyte", required=False) for s in ("train", "t10k")]
        labels = (tuple(_read_idx(f) for f in found) if all(found)  # type: ignore[arg-type]
                  else (None, None))
    else:
        raise ValueError(f"data_path for mnist must be an .npz file or an IDX folder, got "
                         f"{str(path)!r} (not found)")
    return (TensorImages(_as_nchw(train, f"{p} (train)"), f"{p} (train)", labels[0]),
            TensorImages(_as_nchw(test, f"{p} (test)"), f"{p} (test)", labels[1]))


def load_cifar10(path: str | os.PathLike) -> tuple[TensorImages, TensorImages]:
    """CIFAR-10 from the python pickle folder (``cifar-10-batches-py``)."""
    p = Path(path)

    def read(name: str) -> tuple[np.ndarray, np.ndarray | None]:
        f = p / name
        if not f.is_file():
            raise ValueError(f"data_path for cifar10 must be the cifar-10-batches-py folder; "
                             f"{f} is missing")
        try:
            with open(f, "rb") as fh:
                batch = _RestrictedUnpickler(fh, encoding="bytes").load()
            labels = batch.get(b"labels")
            return (np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32),
                    None if labels is None else np.asarray(labels, dtype=np.int64))
        except Exception as err:  # any damage in a pickle: one clear line, never code
            raise ValueError(f"{f}: not a CIFAR-10 python batch ({type(err).__name__}: "
                             f"{err})".split("\n")[0]) from None

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    train = np.concatenate([x for x, _ in parts])
    test, test_labels = read("test_batch")
    ys = [y for _, y in parts]
    train_labels = None if any(y is None for y in ys) else np.concatenate(ys)
    if train_labels is None:
        test_labels = None
    return (TensorImages(torch.from_numpy(train), f"{p} (train)", train_labels),
            TensorImages(torch.from_numpy(test), f"{p} (test)", test_labels))


class _RestrictedUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are dicts of bytes, lists and numpy arrays: allow exactly the
    classes those need, so a doctored file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                                                             "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class ImageFolderImages(Dataset):
    """Images under ``root`` (any depth), decoded with PIL and converted to RGB.

    ``dataset[(index, seed)]`` returns ``(image [3, S, S] in [0, 1], skipped, label)``:
    ``seed`` drives the random crop and flip (training) so that a resumed run repeats them;
    ``skipped`` counts the unreadable files passed over to reach a readable one (the next ones
    in order); ``label`` is its class (the folder under ``root`` holding it), -1 without.
    """

    def __init__(self, root: str | os.PathLike, size: int, train: bool,
                 eval_protocol: str = "paper"):
        if eval_protocol not in ("paper", "center_crop"):
            raise ValueError(f"eval_protocol must be 'paper' or 'center_crop', got "
                             f"{eval_protocol!r}")
        self.eval_protocol = eval_protocol
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"ImageFolder root {str(root)!r} is not a directory")
        self.files = sorted(
            str(f) for f in self.root.rglob("*")
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        # class labels: the folder directly under root that holds each file (ImageNet's
        # synset folders), numbered in sorted order; none when a file lies in root itself
        tops = [Path(f).relative_to(self.root).parts for f in self.files]
        self.classes = sorted({parts[0] for parts in tops if len(parts) > 1})
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = (torch.tensor([index[parts[0]] for parts in tops])
                       if all(len(parts) > 1 for parts in tops) else None)
        if self.labels is None:
            self.classes = []
        self.size = size
        self.train = train
        self._probe()

    def _probe(self, tries: int = 32) -> None:
        """Fail at once, not at the first batch, when the files cannot be decoded at all."""
        from PIL import Image

        errors = []
        for path in self.files[:tries]:
            try:
                with Image.open(path) as im:
                    _to_rgb8(im, path)
                return
            except Exception as err:  # PIL raises many kinds for corrupt data
                errors.append(f"{path}: {type(err).__name__}: {err}")
        raise ValueError(f"no readable image under {self.root}: the first {len(errors)} "
                         f"files failed to decode (first: {errors[0]})".split("\n")[0])

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.labels is not None else None

    def _load(self, path: str, seed: int) -> torch.Tensor:
        from PIL import Image
        from torchvision import transforms as T
        from torchvision.transforms import functional as TF

        with Image.open(path) as im:
            im = _to_rgb8(im, path)
        if self.train:
            # torchvision draws crop and flip from the global RNG; fork it so the main
            # process's stream is untouched, and seed it per sample for exact resume.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                top, left, h, w = T.RandomResizedCrop.get_params(
                    im, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
                flip = bool(torch.rand(()) < 0.5)
            im = TF.resized_crop(im, top, left, h, w, [self.size, self.size], antialias=True)
            if flip:
                im = TF.hflip(im)
        elif self.eval_protocol == "paper":
            # the authors' evaluation: the whole image resized to size x size (aspect ratio
            # not kept), nothing cropped away
            im = TF.resize(im, [self.size, self.size], antialias=True)
        else:
            im = TF.center_crop(TF.resize(im, self.size, antialias=True), self.size)
        return TF.pil_to_tensor(im).float() / 255.0

    def try_load(self, index: int, seed: int = 0) -> torch.Tensor | None:
        """Image ``index``, or None (with a warning) when its file cannot be decoded."""
        path = self.files[index]
        try:
            return self._load(path, seed)
        except Exception as err:  # PIL raises many kinds for corrupt data
            warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}",
                          stacklevel=2)
            return None

    def __getitem__(self, item) -> tuple[torch.Tensor, int, int]:
        """Training access: ``(image, skipped, label)``; an unreadable file is replaced by the
        next readable one (the batch keeps its size), counted in ``skipped``; ``label`` is
        the class of the file read (-1 without labels)."""
        index, seed = item if isinstance(item, tuple) else (item, 0)
        for attempt in range(len(self.files)):
            at = (index + attempt) % len(self.files)
            image = self.try_load(at, seed)
            if image is not None:
                return image, attempt, (-1 if self.labels is None else int(self.labels[at]))
        raise ValueError(f"no readable image under {self.root}: all {len(self.files)} files "
                         "failed to decode")


def _to_rgb8(im, path):
    """A PIL image as 8-bit RGB. 16- and 32-bit integer greyscale (``I;16*``, ``I``) is
    scaled from its full range (PIL's own ``convert`` clips it to 255: a 16-bit PNG would
    come out almost white); float images (``F``) must lie in [0, 1]."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        full = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) <= 65535 else 2.0 ** 32 - 1
        a = np.clip(a / full, 0.0, 1.0)
        return Image.fromarray(np.round(a * 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all() or a.min(initial=0) < 0 or a.max(initial=0) > 1:
            raise ValueError(f"{path}: float image values must be finite and in [0, 1]")
        return Image.fromarray(np.round(a * 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")  # CMYK, palette, greyscale and PNG-in-.JPEG alike


def imagenet_split(root: str | os.PathLike, size: int, train: bool,
                   eval_protocol: str = "paper") -> ImageFolderImages:
    """``root/train`` or ``root/val`` when present, else ``root`` itself."""
    sub = Path(root) / ("train" if train else "val")
    return ImageFolderImages(sub if sub.is_dir() else root, size, train, eval_protocol)


class Preprocess:
    """Pixels in [0, 1] -> model space, and the inverse the model stores for display."""

    def __init__(self, likelihood: str, shift, scale):
        self.likelihood = likelihood
        self.shift = torch.as_tensor(shift, dtype=torch.float32).view(-1, 1, 1)
        self.scale = torch.as_tensor(scale, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        if self.likelihood == "bernoulli":
            return (x01 > 0.5).float()
        return (x01 - self.shift.to(x01.device)) / self.scale.to(x01.device)

    def target_pixels(self, x01: torch.Tensor) -> torch.Tensor:
        """What a reconstruction is compared with, in [0, 1] (binarised for Bernoulli)."""
        return (x01 > 0.5).float() if self.likelihood == "bernoulli" else x01


def pixel_stats(train: Dataset, channels: int, likelihood: str, dataset: str):
    """Per-channel (shift, scale) for standardisation (identity for Bernoulli)."""
    if likelihood == "bernoulli":
        return [0.0] * channels, [1.0] * channels
    if dataset == "imagenet256":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if isinstance(train, TensorImages):
        x = train.batch(torch.arange(min(len(train), 50_000)))
        return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-3).tolist()
    return [0.5] * channels, [0.5] * channels


class BatchStream:
    """Index batches: a fresh seeded permutation each epoch, the last partial batch dropped.

    With ``world`` ranks the global batch is ``batch_size * world`` and rank r takes its r-th
    slice. ``state()``/``load_state()`` carry (epoch, position) through checkpoints.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size * world > n:
            raise ValueError(f"batch_size * world ({batch_size} * {world}) exceeds the "
                             f"dataset size {n}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)

    def seek(self, batches_consumed: int) -> None:
        """Continue after ``batches_consumed`` batches from the start of training."""
        self.load_state({"epoch": batches_consumed // self.batches_per_epoch,
                         "position": batches_consumed % self.batches_per_epoch})

    def next(self) -> tuple[torch.Tensor, int]:
        """(indices [batch_size], a per-batch seed for augmentations)."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._perm = self._permutation(self.epoch)
        g = self.batch_size * self.world
        start = self.position * g + self.rank * self.batch_size
        idx = self._perm[start:start + self.batch_size]
        seed = (self.seed * 1_000_003 + self.epoch) * 1_000_033 + self.position
        self.position += 1
        return idx, seed


class Batches:
    """Iterator of ``(x01 [B, C, H, W], skipped)`` over a dataset, driven by a BatchStream;
    with ``labels=True``, of ``(x01, skipped, labels [B])`` (the dataset must have labels)."""

    def __init__(self, dataset: Dataset, stream: BatchStream, num_workers: int = 0, *,
                 labels: bool = False):
        self.dataset, self.stream = dataset, stream
        self.num_workers = num_workers
        self.with_labels = labels
        if labels and getattr(dataset, "labels", None) is None:
            raise ValueError("the dataset has no class labels")
        self._loader_iter = None

    def _start_loader(self):
        stream = self.stream

        class _Sampler:
            def __iter__(self_inner):
                while True:
                    idx, seed = stream.next()
                    yield [(int(i), seed * 65_537 + j) for j, i in enumerate(idx)]

        loader = DataLoader(self.dataset, batch_sampler=_Sampler(),
                            num_workers=self.num_workers, collate_fn=_collate,
                            persistent_workers=self.num_workers > 0)
        return iter(loader)

    def __next__(self) -> tuple:
        if isinstance(self.dataset, TensorImages):
            idx, _ = self.stream.next()
            out = (self.dataset.batch(idx), 0, self.dataset.labels[idx]
                   if self.with_labels else None)
        elif self.num_workers == 0:
            idx, seed = self.stream.next()
            out = _collate([self.dataset[(int(i), seed * 65_537 + j)]
                            for j, i in enumerate(idx)])
        else:
            # With workers the sampler runs ahead of consumption; the trainer checkpoints the
            # consumed count, and on resume the stream restarts from it.
            if self._loader_iter is None:
                self._loader_iter = self._start_loader()
            out = next(self._loader_iter)
        return out if self.with_labels else out[:2]


def first_images(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``n`` readable images of a dataset (pixels in [0, 1]) and their labels (None
    without); an unreadable file is passed over, not replaced. Raises when none is read."""
    if isinstance(dataset, TensorImages):
        idx = torch.arange(min(n, len(dataset)))
        return dataset.batch(idx), None if dataset.labels is None else dataset.labels[idx]
    images, labels = [], []
    for i in range(len(dataset)):
        if len(images) == n:
            break
        image = dataset.try_load(i)
        if image is not None:
            images.append(image)
            labels.append(-1 if dataset.labels is None else int(dataset.labels[i]))
    if not images:
        raise ValueError("no test image could be read")
    return torch.stack(images), None if dataset.labels is None else torch.tensor(labels)


def _collate(items):
    """``(images, skipped, labels)`` from ``(image, skipped[, label])`` items."""
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[2] if len(item) > 2 else -1 for item in items])
    return images, sum(int(item[1]) for item in items), labels


def load_datasets(cfg) -> tuple[Dataset, Dataset]:
    """(train, test) datasets of pixels in [0, 1] for ``cfg.dataset``."""
    if cfg.dataset == "digits":
        return load_digits_split(0)
    if cfg.dataset in ("mnist", "cifar10", "imagenet256") and not cfg.data_path:
        raise ValueError(f"dataset {cfg.dataset!r} needs data_path=... (a local copy; "
                         "nothing is downloaded)")
    if cfg.dataset == "mnist":
        return load_mnist(cfg.data_path)
    if cfg.dataset == "cifar10":
        return load_cifar10(cfg.data_path)
    if cfg.dataset == "imagenet256":
        return (imagenet_split(cfg.data_path, cfg.image_size, True),
                imagenet_split(cfg.data_path, cfg.image_size, False, cfg.eval_protocol))
    if cfg.dataset == "synthetic":
        g = torch.Generator().manual_seed(cfg.seed)
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        train, test = torch.rand((1024, *shape), generator=g), torch.rand((256, *shape),
                                                                          generator=g)
        # random labels of 10 classes, so that a prior can be trained on it too
        labels = torch.randint(0, 10, (1280,), generator=g)
        return (TensorImages(train, "synthetic (train)", labels[:1024]),
                TensorImages(test, "synthetic (test)", labels[1024:]))
    raise ValueError(f"unknown dataset {cfg.dataset!r}")
