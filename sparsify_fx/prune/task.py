"""What a ``sparsify-fx prune`` run scores and how it batches: :class:`Task`.

The default task is today's classification: DATA yields ``(input tensor, int
label)``, batches are stacked, the metric is top-1 accuracy (percent) in
PyTorch and in onnxruntime, the loss cross-entropy. ``hf:`` runs
(:mod:`.hf_task`) build tasks that pad token batches (``collate``), score
perplexity (causal LM: logits ``(B, V, T)`` against next tokens ``(B, T)``),
and capture with torch.export on an example batch with dynamic dims.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sparsify_fx.errors import ConfigError
from sparsify_fx.mask_index import hard_masks

METRICS = ("accuracy", "perplexity")
#: onnxruntime's perplexity may differ from PyTorch's by this fraction of it
PERPLEXITY_RTOL = 1e-3
Collate = Callable[[list[Any]], Any]


def top1(predict: Callable[[np.ndarray], np.ndarray], loader: DataLoader,
         scale: float = 1.0) -> float:
    """Top-1 accuracy of ``predict(x: ndarray) -> logits`` over ``loader``: a fraction, or
    ``scale * correct / total`` (100.0: percent, rounded exactly as ``Trainer``'s evaluate
    rounds it, so equal counts give equal numbers)."""
    correct = total = 0
    for x, y in loader:
        correct += int((np.argmax(predict(x.numpy()), 1) == y.numpy()).sum())
        total += int(y.numel())
    return scale * correct / max(total, 1)


def next_token_nll(predict: Callable[[Tensor], Tensor], loader: DataLoader) -> tuple[float, int]:
    """Summed cross-entropy of ``predict(x) -> logits (B, V, T)`` against ``y (B, T)``,
    and the number of tokens scored."""
    nll, tokens = 0.0, 0
    for x, y in loader:
        logits = predict(x)
        nll += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        tokens += int(y.numel())
    return nll, tokens


@dataclass
class Task:
    """How a run batches its data, scores its model and captures it.

    ``collate``: training batches (None: stacking); ``eval_collate``: every
    evaluation batch (PyTorch and onnxruntime alike, so both see the same
    inputs). ``example``: the example batch ``transform`` captures with (None:
    the first validation input); ``capture`` and ``dynamic_shapes`` go to
    ``transform``.
    """

    metric: str = "accuracy"
    collate: Collate | None = None
    eval_collate: Collate | None = None
    eval_batch_size: int = 256
    example: Tensor | None = None
    capture: str = "auto"
    dynamic_shapes: Any = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"Task.metric must be one of {', '.join(METRICS)}, "
                              f"got {self.metric!r}")

    def loader(self, dataset: Dataset, batch_size: int | None = None) -> DataLoader:
        """Evaluation batches of ``dataset`` in order."""
        return DataLoader(dataset, batch_size=batch_size or self.eval_batch_size,
                          collate_fn=self.eval_collate)

    def training_loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """Training batches in order (calibration of the int8 export)."""
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.collate)

    def evaluate(self, model: nn.Module, dataset: Dataset, device: str = "cpu") -> float:
        """The metric of ``model`` (binary masks, eval mode; train mode restored)."""
        from sparsify_fx.training.trainer import evaluate
        if self.metric == "accuracy":
            return evaluate(model, self.loader(dataset), device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), hard_masks(model):
                nll, tokens = next_token_nll(lambda x: model(x.to(device)).cpu(),
                                             self.loader(dataset))
        finally:
            model.train(was_training)
        return math.exp(nll / max(tokens, 1))

    def evaluate_onnx(self, predict: Callable[[np.ndarray], np.ndarray],
                      dataset: Dataset) -> float:
        """The metric of an onnxruntime ``predict(x: ndarray) -> first output``."""
        loader = self.loader(dataset)
        if self.metric == "accuracy":
            return top1(predict, loader, scale=100.0)
        nll, tokens = next_token_nll(lambda x: torch.from_numpy(predict(x.numpy())), loader)
        return math.exp(nll / max(tokens, 1))

    def int8_score(self, predict: Callable[[np.ndarray], np.ndarray],
                   dataset: Dataset) -> float:
        """A higher-is-better score for the int8 check: accuracy (fraction), 1 / perplexity."""
        if self.metric == "accuracy":
            return top1(predict, self.loader(dataset))
        return 1.0 / self.evaluate_onnx(predict, dataset)

    def tolerance(self, dataset: Dataset) -> float:
        """How far onnxruntime's metric may be from PyTorch's: one validation sample's
        share of the accuracy (points), or :data:`PERPLEXITY_RTOL` of the perplexity."""
        if self.metric == "accuracy":
            return 100.0 / max(len(dataset), 1)  # type: ignore[arg-type]
        return PERPLEXITY_RTOL

    def close(self, after: float, onnx: float, dataset: Dataset) -> bool:
        """onnxruntime's metric equals PyTorch's within :meth:`tolerance`."""
        tol = self.tolerance(dataset)
        if self.metric == "accuracy":
            return abs(after - onnx) <= tol + 1e-9
        return abs(after - onnx) <= tol * abs(after)
