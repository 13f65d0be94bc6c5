"""Data for the comparison protocol: held in memory as tensors, shuffled and augmented by a seeded generator.

- ``digits`` (default): scikit-learn's ``load_digits`` -- 1,797 real 8x8 handwritten digits shipped inside
  scikit-learn, so a fresh machine needs no download. Upsampled bilinearly to ``image_size`` (16 by default),
  one channel, a fixed stratified 80/20 train/validation split (seed 0, independent of the run seeds).
  Augmentation: zero-pad by image_size/8 and crop back at a random offset (no flip: digits are not mirror
  symmetric).
- ``cifar10`` / ``cifar100``: the standard python-pickle directories (``cifar-10-batches-py`` with
  ``data_batch_1..5`` and ``test_batch``; ``cifar-100-python`` with ``train`` and ``test``), read from
  ``--data-dir`` (the folder itself or its parent). Augmentation of the paper's CIFAR runs (its refs. [15, 16]):
  zero-pad by 4, random 32x32 crop, random horizontal flip; per-channel mean/std normalisation.

The same generator seed gives the same batches and the same augmentation to the baseline and its twin.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "cifar10", "cifar100")

_CIFAR = {  # dataset -> (folder name, train files, test file, label key, classes)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", ("train",), "test", b"fine_labels", 100),
}


@dataclasses.dataclass
class Dataset:
    """Normalised float32 NCHW tensors and the augmentation to apply to training batches."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    crop_pad: int
    flip: bool

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    def subset(self, train: Optional[int] = None, test: Optional[int] = None) -> "Dataset":
        """The first ``train``/``test`` samples (for quick checks); None keeps all."""
        return dataclasses.replace(self, x_train=self.x_train[:train], y_train=self.y_train[:train],
                                   x_test=self.x_test[:test], y_test=self.y_test[:test])

    def to(self, device) -> "Dataset":
        move = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        return dataclasses.replace(self, **move)


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel standardisation with the training set's statistics."""
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True)
    return (torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
            torch.from_numpy(((x_test - mean) / std).astype(np.float32)))


def load_digits(image_size: int = 16) -> Dataset:
    """scikit-learn's embedded digits, upsampled to ``image_size`` x ``image_size`` (see module docstring)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (the digits are 8x8), but got image_size={image_size!r}")
    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = images.numpy()
    x_tr, x_te, y_tr, y_te = train_test_split(x, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target)
    x_train, x_test = _normalise(x_tr, x_te)
    return Dataset("digits", x_train, torch.from_numpy(y_tr).long(), x_test, torch.from_numpy(y_te).long(),
                   num_classes=10, crop_pad=max(1, image_size // 8), flip=False)


def _read_batch(path: str, label_key: bytes) -> Tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise ValueError(f"data_dir: expected the CIFAR file {path!r}, which does not exist")
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as error:  # unpickling errors come in many types; all mean the same thing here
        raise ValueError(f"data_dir: {path!r} is not a CIFAR python-pickle batch with keys b'data' and "
                         f"{label_key!r} ({type(error).__name__}: {error})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"data_dir: {path!r} holds data of shape {data.shape} and {len(labels)} labels; "
                         f"expected (N, 3072) uint8 rows and N labels")
    return data.reshape(-1, 3, 32, 32), labels


def find_cifar_dir(data_dir, dataset: str) -> str:
    """The CIFAR folder: ``data_dir`` itself or its standard-named child; ValueError naming what is missing."""
    folder = _CIFAR[dataset][0]
    if data_dir is None:
        raise ValueError(f"dataset={dataset!r} needs --data-dir: a folder holding {folder}/ in the python-pickle "
                         f"format (https://www.cs.toronto.edu/~kriz/cifar.html)")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir={data_dir!r} is not a directory (dataset={dataset!r} expects {folder}/)")
    child = os.path.join(data_dir, folder)
    root = child if os.path.isdir(child) else data_dir
    names = (*_CIFAR[dataset][1], _CIFAR[dataset][2])
    missing = [name for name in names if not os.path.isfile(os.path.join(root, name))]
    if missing:
        raise ValueError(f"data_dir={data_dir!r} holds neither {folder}/ nor the {dataset} python-pickle files "
                         f"directly: {missing} missing from {root!r}")
    return root


def load_cifar(data_dir, dataset: str = "cifar10") -> Dataset:
    """CIFAR-10/100 from a local python-pickle directory (see module docstring); ValueError if missing/malformed."""
    if dataset not in _CIFAR:
        raise ValueError(f"dataset must be one of {tuple(_CIFAR)}, but got dataset={dataset!r}")
    _, train_files, test_file, label_key, classes = _CIFAR[dataset]
    root = find_cifar_dir(data_dir, dataset)
    parts = [_read_batch(os.path.join(root, name), label_key) for name in train_files]
    x_tr = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_batch(os.path.join(root, test_file), label_key)
    for name, labels in (("train", y_tr), ("test", y_te)):
        if labels.min() < 0 or labels.max() >= classes:
            raise ValueError(f"data_dir: {dataset} {name} labels must lie in [0, {classes}), "
                             f"but got [{labels.min()}, {labels.max()}] in {root!r}")
    x_train, x_test = _normalise(x_tr, x_te.astype(np.float32) / 255.0)
    return Dataset(dataset, x_train, torch.from_numpy(y_tr), x_test, torch.from_numpy(y_te),
                   num_classes=classes, crop_pad=4, flip=True)


def load_dataset(name: str = "digits", data_dir=None, image_size: int = 16) -> Dataset:
    """Dispatch on ``--dataset``."""
    if name == "digits":
        return load_digits(image_size)
    if name in _CIFAR:
        return load_cifar(data_dir, name)
    raise ValueError(f"dataset must be one of {DATASETS}, but got dataset={name!r}")


def augment(x: torch.Tensor, crop_pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by ``crop_pad`` (and a random horizontal flip), per sample.

    Offsets and flips are drawn from ``generator`` on the CPU, so they do not depend on the device.
    """
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * crop_pad + 1, (2, n), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else None
    padded = F.pad(x, (crop_pad, crop_pad, crop_pad, crop_pad))
    rows = (offsets[0][:, None] + torch.arange(h)).to(x.device)
    cols = (offsets[1][:, None] + torch.arange(w)).to(x.device)
    if flips is not None:
        cols = torch.where(flips.to(x.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    crops = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, C)
    # Copy into fresh NCHW strides: with C == 1 the permuted view counts as contiguous but keeps stride 1 on
    # C, and torch 2.13's CPU conv backward then corrupted memory in our runs (width-8 ResNet-20, digits).
    return torch.empty_like(x).copy_(crops.permute(0, 3, 1, 2))


def train_batches(data: Dataset, batch_size: int, generator: torch.Generator
                  ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented training batches; the order depends only on ``generator``."""
    order = torch.randperm(len(data.y_train), generator=generator).to(data.x_train.device)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield augment(data.x_train[index], data.crop_pad, data.flip, generator), data.y_train[index]
