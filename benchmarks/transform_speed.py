"""Transform speed and masked-training overhead (issue 2, acceptance 4).

Prints and writes JSON: trace+insert time for resnet50, and the forward+backward
step-time ratio masked/dense for resnet18 (CPU, batch 8, 224x224) next to the
same ratio for torch.nn.utils.prune, all measured in one run (median of
repeats x steps). Targets: transform <= 0.5 s; masked/dense <= 1.10 and below
torch.nn.utils.prune's ratio.

    python benchmarks/transform_speed.py [--out benchmarks/results/transform_speed.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
import torchvision.models as tvm
from torch import nn
from torch.nn.utils import prune

import sparsify_fx as sf


def time_transform(repeats: int = 5) -> float:
    model = tvm.resnet50().eval()
    sf.transform(model)  # warm-up (imports, first trace)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sf.transform(model)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_time(model: nn.Module, x: torch.Tensor, steps: int) -> float:
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return (time.perf_counter() - start) / steps


def step_ratios(batch: int, steps: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    dense = tvm.resnet18()
    masked = sf.transform(dense)  # learned CS masks: w * scale * sigmoid(beta * s)
    frozen = sf.transform(dense, method="fixed")  # binary masks, like torch prune
    pruned = copy.deepcopy(dense)
    for m in pruned.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            prune.random_unstructured(m, "weight", amount=0.5)
    x = torch.randn(batch, 3, 224, 224)
    models = {"dense": dense, "sparsify_fx_cs": masked, "sparsify_fx_fixed": frozen,
              "torch_prune": pruned}
    for m in models.values():  # warm-up
        step_time(m, x, 1)
    samples: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):  # interleave so drift hits every variant alike
        for k, m in models.items():
            samples[k].append(step_time(m, x, steps))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {f"{k}_s": v for k, v in med.items()} | {
        f"{k}_ratio": med[k] / med["dense"] for k in models if k != "dense"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/transform_speed.json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "resnet50_transform_s": time_transform()}
    result.update(step_ratios(args.batch, args.steps, args.repeats))
    result["targets"] = {"resnet50_transform_s": 0.5, "sparsify_fx_cs_ratio": 1.10}
    result["meets_transform_target"] = result["resnet50_transform_s"] <= 0.5
    result["meets_ratio_target"] = (result["sparsify_fx_cs_ratio"] <= 1.10
                                    and result["sparsify_fx_cs_ratio"] < result["torch_prune_ratio"])
    for k, v in result.items():
        print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
