"""The torchvision model zoo the transform is held to (weights=None, small inputs).

Each entry: name -> (builder, input shape, slow). ``slow`` entries run only in
``make test-all``. Detection models take a list of images and are built apart.
"""
from __future__ import annotations

from typing import Callable

import torch
import torchvision.models as tvm
from torch import nn

ZooEntry = tuple[Callable[[], nn.Module], tuple[int, ...], bool]

ZOO: dict[str, ZooEntry] = {
    "resnet18": (lambda: tvm.resnet18(), (2, 3, 64, 64), False),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(), (2, 3, 64, 64), False),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(), (2, 3, 64, 64), False),
    "squeezenet1_0": (lambda: tvm.squeezenet1_0(), (2, 3, 64, 64), False),
    "shufflenet_v2_x1_0": (lambda: tvm.shufflenet_v2_x1_0(), (2, 3, 64, 64), False),
    "regnet_y_400mf": (lambda: tvm.regnet_y_400mf(), (2, 3, 64, 64), False),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(), (2, 3, 64, 64), False),
    "resnet50": (lambda: tvm.resnet50(), (2, 3, 64, 64), True),
    "vgg11": (lambda: tvm.vgg11(), (1, 3, 32, 32), True),
    "densenet121": (lambda: tvm.densenet121(), (2, 3, 64, 64), True),
    "googlenet": (lambda: tvm.googlenet(aux_logits=False, init_weights=True), (2, 3, 64, 64), True),
    "inception_v3": (lambda: tvm.inception_v3(aux_logits=False, init_weights=True), (2, 3, 96, 96), True),
    "convnext_tiny": (lambda: tvm.convnext_tiny(), (1, 3, 64, 64), True),
    "vit_b_16": (lambda: tvm.vit_b_16(image_size=64), (1, 3, 64, 64), True),
    "swin_t": (lambda: tvm.swin_t(), (1, 3, 64, 64), True),
    "maxvit_t": (lambda: tvm.maxvit_t(), (1, 3, 224, 224), True),
    "deeplabv3_mobilenet_v3_large": (
        lambda: tvm.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                              aux_loss=False),
        (2, 3, 64, 64), True),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Model in eval mode and a fixed random input for it."""
    builder, shape, _ = ZOO[name]
    torch.manual_seed(seed)
    model = builder().eval()
    with torch.no_grad():  # zero-initialised heads (vit_b_16) would hide every upstream gradient
        for m in model.modules():
            if isinstance(m, nn.Linear) and not bool(m.weight.any()):
                m.weight.normal_(0.0, 0.02)
    return model, torch.randn(*shape)


def first_tensor(out: object) -> torch.Tensor:
    """The main output tensor of a zoo model (segmentation returns a dict)."""
    if isinstance(out, dict):
        return out["out"]
    assert isinstance(out, torch.Tensor)
    return out


def detection_model() -> nn.Module:
    """fasterrcnn_mobilenet_v3_large_320_fpn, weights=None, eval mode (does not trace whole)."""
    torch.manual_seed(0)
    return tvm.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None).eval()


def zoo_params(include_slow: bool = True) -> list:
    """pytest params over the zoo with the slow mark applied where due."""
    import pytest
    return [pytest.param(n, marks=[pytest.mark.slow] if slow else [], id=n)
            for n, (_, _, slow) in ZOO.items() if include_slow or not slow]
