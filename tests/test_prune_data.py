"""DATA kinds of ``sparsify-fx prune``: what each yields, and each misuse named."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from sparsify_fx.errors import InputError
from sparsify_fx.prune.datasets import example_input, load_data

MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def two_sets() -> tuple[TensorDataset, TensorDataset]:
    x = torch.arange(40, dtype=torch.float32).reshape(10, 1, 2, 2)
    y = torch.arange(10) % 2
    return TensorDataset(x[:8], y[:8]), TensorDataset(x[8:], y[8:])


def not_a_pair() -> list[int]:
    return [1, 2]


def test_digits_and_function() -> None:
    d = load_data("digits", seed=0)
    assert (len(d.train), len(d.val)) == (1257, 360)
    assert example_input(d).shape == (1, 1, 8, 8)
    assert not torch.equal(load_data("digits", seed=1).train.tensors[0], d.train.tensors[0])
    f = load_data("tests.test_prune_data:two_sets", seed=0)
    assert (len(f.train), len(f.val)) == (8, 2)
    assert torch.equal(example_input(f, 2), torch.arange(32, 40.0).reshape(2, 1, 2, 2))


@pytest.mark.skipif(not MNIST.is_dir(), reason="MNIST IDX files only on development machines")
def test_mnist_dir() -> None:
    d = load_data(f"mnist:{MNIST}", seed=0)
    assert (len(d.train), len(d.val)) == (8000, 1000)
    x, y = d.train[0]
    assert x.shape == (1, 28, 28) and 0 <= int(y) <= 9


def _write_images(root: pathlib.Path, per_class: int) -> None:
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")


def test_imagefolder_split_and_transforms(tmp_path: pathlib.Path) -> None:
    _write_images(tmp_path / "flat", 5)
    d = load_data(f"imagefolder:{tmp_path / 'flat'}", seed=0, val_fraction=0.2, image_size=16)
    assert (len(d.train), len(d.val)) == (8, 2)
    x, y = d.val[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)
    assert torch.equal(d.val[0][0], d.val[0][0])  # val transform is deterministic
    _write_images(tmp_path / "split" / "train", 3)
    _write_images(tmp_path / "split" / "val", 2)
    s = load_data(f"imagefolder:{tmp_path / 'split'}", seed=0, image_size=16)
    assert (len(s.train), len(s.val)) == (6, 4)


@pytest.mark.parametrize("spec, words", [
    (None, "--data is required"),
    ("cifar10", "not a known DATA"),
    ("mnist:", "needs a folder"),
    ("imagefolder:/no/such/dir", "folder not found"),
    ("tests.test_prune_data:not_a_pair", "must return (train_dataset, val_dataset)"),
    ("tests.test_prune_data:nothing", "has no 'nothing'"),
])
def test_bad_data_is_named(spec: str | None, words: str) -> None:
    with pytest.raises(InputError, match=None) as info:
        load_data(spec, seed=0)
    assert words in str(info.value)


def test_empty_imagefolder_is_named(tmp_path: pathlib.Path) -> None:
    os.makedirs(tmp_path / "empty")
    with pytest.raises(InputError, match="one sub-folder of images per class"):
        load_data(f"imagefolder:{tmp_path / 'empty'}", seed=0)
