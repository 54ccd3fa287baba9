"""Loaders: ImageFolder (odd files decode, a corrupt one is skipped and counted), MNIST from
.npz and IDX, CIFAR-10 pickles; the resumable batch stream."""

import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dvae.data import (
    Batches,
    BatchStream,
    ImageFolderImages,
    imagenet_split,
    load_cifar10,
    load_mnist,
)


def _make_folder(root):
    rng = np.random.default_rng(0)
    (root / "train" / "n01").mkdir(parents=True)
    (root / "train" / "n02").mkdir(parents=True)

    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    rgb(40, 30).save(root / "train" / "n01" / "a.JPEG")
    rgb(20, 50).save(root / "train" / "n01" / "b.jpg")
    rgb(33, 33).convert("CMYK").save(root / "train" / "n02" / "cmyk.JPEG")
    rgb(25, 25).save(root / "train" / "n02" / "png_inside.JPEG", format="PNG")
    (root / "train" / "n02" / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def test_imagefolder_decodes_odd_files_and_skips_corrupt(tmp_path):
    _make_folder(tmp_path)
    ds = imagenet_split(tmp_path, 16, train=True)
    assert len(ds) == 5
    stream = BatchStream(len(ds), 5, seed=0)
    with pytest.warns(UserWarning, match="skipping unreadable image .*corrupt.JPEG"):
        x, skipped = next(Batches(ds, stream))
    assert x.shape == (5, 3, 16, 16)
    assert skipped == 1
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    # evaluation transform: resize + centre crop, deterministic
    val = ImageFolderImages(tmp_path / "train", 16, train=False)
    a, s, label = val[(0, 0)]
    b, _, _ = val[(0, 99)]
    assert s == 0 and torch.equal(a, b)
    # labels: the class folder of the file actually read (n01 = 0, n02 = 1)
    assert val.classes == ["n01", "n02"] and label == 0 and val.num_classes == 2
    stream = BatchStream(len(ds), 5, seed=0)
    with pytest.warns(UserWarning, match="corrupt.JPEG"):
        x, skipped, labels = next(Batches(ds, stream, labels=True))
    idx = stream._permutation(0)[:5]
    read = [(int(i) + (ds.files[int(i)].endswith("corrupt.JPEG"))) % len(ds) for i in idx]
    assert labels.tolist() == [int(ds.labels[i]) for i in read]
    flat = ImageFolderImages(tmp_path / "train" / "n01", 16, train=False)
    assert flat.labels is None and flat[(0, 0)][2] == -1
    with pytest.raises(ValueError, match="no class labels"):
        Batches(flat, BatchStream(len(flat), 1, seed=0), labels=True)


def test_imagefolder_training_crops_follow_the_seed(tmp_path):
    _make_folder(tmp_path)
    ds = ImageFolderImages(tmp_path, 16, train=True)
    state = torch.get_rng_state()
    a, _, _ = ds[(0, 7)]
    b, _, _ = ds[(0, 7)]
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched


def test_mnist_npz_and_idx(tmp_path):
    train = np.random.default_rng(0).integers(0, 255, (6, 28, 28), dtype=np.uint8)
    test = train[:2]
    np.savez(tmp_path / "m.npz", x_train=train, x_test=test)
    tr, te = load_mnist(tmp_path / "m.npz")
    assert len(tr) == 6 and len(te) == 2
    assert torch.equal(tr.batch(torch.tensor([1]))[0, 0], torch.from_numpy(train[1]) / 255.0)

    def idx(arr):
        head = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        return head + arr.tobytes()

    d = tmp_path / "idx"
    d.mkdir()
    with gzip.open(d / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx(train))
    (d / "t10k-images-idx3-ubyte").write_bytes(idx(test))
    tr2, te2 = load_mnist(d)
    assert torch.equal(tr2.images, tr.images) and torch.equal(te2.images, te.images)
    assert tr.labels is None and tr2.labels is None  # no labels given, none invented
    # labels: y_train/y_test in the .npz, the labels-idx1 files in the folder
    y = np.arange(6, dtype=np.uint8) % 3
    np.savez(tmp_path / "ml.npz", x_train=train, x_test=test, y_train=y, y_test=y[:2])
    tr3, te3 = load_mnist(tmp_path / "ml.npz")
    assert tr3.labels.tolist() == y.tolist() and te3.labels.tolist() == [0, 1]
    assert tr3.num_classes == 3
    for name, arr in (("train", y), ("t10k", y[:2])):
        head = bytes([0, 0, 8, 1]) + int(arr.shape[0]).to_bytes(4, "big")
        (d / f"{name}-labels-idx1-ubyte").write_bytes(head + arr.tobytes())
    tr4, te4 = load_mnist(d)
    assert torch.equal(tr4.labels, tr3.labels) and torch.equal(te4.labels, te3.labels)
    np.savez(tmp_path / "bad.npz", x_train=train, x_test=test, y_train=y[:5], y_test=y[:2])
    with pytest.raises(ValueError, match="labels must be 6 integers"):
        load_mnist(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="npz file or an IDX folder"):
        load_mnist(tmp_path / "missing.npz")


def test_cifar_pickles(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (3, 3072), dtype=np.uint8),
                         b"labels": [7, 1, 9]}, f)
    tr, te = load_cifar10(tmp_path)
    assert tr.images.shape == (15, 3, 32, 32) and te.images.shape == (3, 3, 32, 32)
    assert tr.labels.tolist() == [7, 1, 9] * 5 and te.labels.tolist() == [7, 1, 9]


def test_batch_stream_seek_repeats_batches():
    a = BatchStream(23, 4, seed=3)
    seq = [a.next()[0] for _ in range(12)]  # 5 batches per epoch: crosses two epochs
    b = BatchStream(23, 4, seed=3)
    b.seek(7)
    assert all(torch.equal(b.next()[0], s) for s in seq[7:])
    # two ranks split each global batch without overlap
    r0, r1 = BatchStream(23, 4, 3, 0, 2), BatchStream(23, 4, 3, 1, 2)
    i0, i1 = r0.next()[0], r1.next()[0]
    assert not set(i0.tolist()) & set(i1.tolist())
    with pytest.raises(ValueError, match="exceeds the dataset size"):
        BatchStream(3, 4, 0)
