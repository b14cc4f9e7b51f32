"""DATA of ``sparsify-fx prune``: local datasets only, nothing downloads.

``digits`` (scikit-learn's bundled 8x8 digits), ``mnist:DIR`` (the IDX files
``t10k-images-idx3-ubyte.gz`` / ``t10k-labels-idx1-ubyte.gz`` in DIR, split
8,000 / 1,000 / 1,000 by seed), ``imagefolder:DIR`` (torchvision
``ImageFolder``: ``DIR/train`` + ``DIR/val`` when both exist, else DIR split
by ``val_fraction``; train: RandomResizedCrop + flip, val: resize + centre
crop, ImageNet normalisation) and ``package.module:function`` (``function()``
returns ``(train_dataset, val_dataset)`` of ``(input, int label)`` pairs).
``hf:DIR`` models also read ``text:FILE`` (:mod:`.text_data`, via :mod:`.hf_task`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset, Subset

from sparsify_fx.errors import InputError

DATA_HELP = ("digits, mnist:DIR, imagefolder:DIR or package.module:function; hf:DIR models: "
             "text:FILE or imagefolder:DIR")
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Data:
    """What a run trains on (``train``) and measures accuracy on (``val``)."""

    train: Dataset
    val: Dataset
    description: str


def _folder(kind: str, path: str) -> str:
    if not path:
        raise InputError(f"--data {kind}: needs a folder, e.g. {kind}:/path/to/data")
    if not os.path.isdir(path):
        raise InputError(f"--data {kind}:{path}: folder not found; pass an existing folder")
    return path


def imagefolder_data(spec: str, seed: int, val_fraction: float, size: int,
                     mean: Sequence[float] = _MEAN, std: Sequence[float] = _STD) -> Data:
    """``imagefolder:DIR`` (``spec``) with crop ``size`` and normalisation ``mean``/``std``
    (ImageNet's by default; an ``hf:`` model's image processor gives its own)."""
    kind, _, rest = spec.partition(":")
    if kind != "imagefolder":
        raise InputError(f"--data {spec!r}: this model reads imagefolder:DIR")
    return _imagefolder(_folder("imagefolder", rest), seed, val_fraction, size, mean, std)


def _imagefolder(root: str, seed: int, val_fraction: float, size: int,
                 mean: Sequence[float] = _MEAN, std: Sequence[float] = _STD) -> Data:
    from torchvision import datasets, transforms as T

    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(mean, std)])
    val_tf = T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size),
                        T.ToTensor(), T.Normalize(mean, std)])
    split = all(os.path.isdir(os.path.join(root, p)) for p in ("train", "val"))
    try:
        if split:
            train = datasets.ImageFolder(os.path.join(root, "train"), train_tf)
            val = datasets.ImageFolder(os.path.join(root, "val"), val_tf)
            return Data(train, val, f"imagefolder {root}: train/ {len(train)}, val/ {len(val)}")
        full_train = datasets.ImageFolder(root, train_tf)
        full_val = datasets.ImageFolder(root, val_tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise InputError(f"--data imagefolder:{root}: {exc}; the folder needs one sub-folder "
                         "of images per class") from None
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(full_train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise InputError(f"--data imagefolder:{root} has {n} image(s): too few to split off a "
                         "validation set; add images or give DIR/train and DIR/val")
    return Data(Subset(full_train, order[n_val:]), Subset(full_val, order[:n_val]),
                f"imagefolder {root}: {n - n_val} train / {n_val} val (seed {seed})")


def _function(spec: str) -> Data:
    from sparsify_fx.cli.model_inputs import call_imported

    out = call_imported(spec, "function", "(train_dataset, val_dataset)", label="--data ")
    if not (isinstance(out, tuple) and len(out) == 2
            and all(hasattr(d, "__getitem__") and hasattr(d, "__len__") for d in out)):
        raise InputError(f"--data {spec}() must return (train_dataset, val_dataset), two "
                         f"map-style datasets; got {type(out).__name__}")
    if len(out[0]) == 0 or len(out[1]) == 0:
        raise InputError(f"--data {spec}() returned an empty dataset; both need samples")
    return Data(out[0], out[1], f"{spec}: {len(out[0])} train / {len(out[1])} val")


def load_data(spec: str | None, seed: int, val_fraction: float = 0.1,
              image_size: int = 224) -> Data:
    """Parse ``--data`` (see module doc) into train and validation datasets."""
    from sparsify_fx import data as bundled

    if not spec:
        raise InputError(f"--data is required: {DATA_HELP}")
    kind, _, rest = spec.partition(":")
    if spec == "digits":
        s = bundled.digits(seed)
        return Data(s.train, s.test, f"sklearn digits: {len(s.train)} train / "
                    f"{len(s.test)} held-out test (seed {seed})")
    if kind == "mnist":
        s = bundled.mnist(_folder("mnist", rest), seed)
        return Data(s.train, s.test, f"MNIST {rest}: {len(s.train)} train / {len(s.test)} "
                    f"held-out (seed {seed})")
    if kind == "imagefolder":
        return _imagefolder(_folder("imagefolder", rest), seed, val_fraction, image_size)
    if kind == "text":
        raise InputError(f"--data {spec}: text data needs an hf:DIR model with --task "
                         "(sequence-classification or causal-lm)")
    if ":" in spec and kind not in ("digits",):
        return _function(spec)
    raise InputError(f"--data {spec!r} is not a known DATA; use {DATA_HELP}")


def example_input(data: Data, batch: int = 1) -> torch.Tensor:
    """The first ``batch`` validation inputs stacked: the example for report, MACs, ONNX."""
    items = [data.val[i][0] for i in range(min(batch, len(data.val)))]  # type: ignore[index]
    if not all(isinstance(x, torch.Tensor) for x in items):
        raise InputError("dataset inputs must be tensors; add a ToTensor transform")
    return torch.stack(items)
