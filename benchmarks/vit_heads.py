"""CS heads + MLP units to a MACs budget vs L1 head/unit importance, small ViT from scratch (issue 14).

Model: torchvision ``VisionTransformer(image_size=16, patch_size=4, num_layers=4,
num_heads=4, hidden_dim=64, mlp_dim=128)``; data: scikit-learn digits (default,
8x8 upsampled to 16x16, grey repeated to 3 channels) or MNIST (``--data-dir``,
28x28 resized to 16x16). Every method gets ``epochs + finetune`` epochs (Adam):

* dense: ``epochs`` at ``--lr``, then ``finetune`` at ``--lr / 5``;
* cs: ``transform(vit, method="cs", granularity="channel", target_macs=T,
  rescale=False)``: every attention head and MLP unit is a slot; ``epochs`` with
  the CS schedule and MACs controller, exact cut by ``finalize``, ``finetune``
  epochs with the masks fixed;
* l1: the dense model after ``epochs``; slots ranked by mean |w| of the weights
  they gate (``channel_l1_scores(per_weight=True)``, one global ranking of heads
  and units), ``apply_budget(target_macs=T)`` (the same MACs accounting as CS),
  ``finetune`` epochs;
* l1_sum: as l1 with the plain L1 sum per slot (heads gate 3 x 16 rows, so they
  rank above units).

Every pruned model is shrunk; its output must match the hard-masked model
(<= 1e-4) and its MACs are measured by ``report`` (shrunk vs dense).

    python benchmarks/vit_heads.py [--seeds 0 1 2] [--epochs 30] [--finetune 10]
        [--target-macs 0.5] [--data-dir DIR] [--out benchmarks/results/vit_heads]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torchvision.models.vision_transformer import VisionTransformer

import sparsify_fx as sf
from bench_io import command_line, machine, shrink_checked, write_results
from sparsify_fx.budgets.exact_cut import apply_budget, macs_fraction, weight_costs
from sparsify_fx.data import Splits, digits, mnist
from sparsify_fx.passes.channels.couple import channel_l1_scores
from sparsify_fx.passes.shrink.shrink_graph import plan_shrink
from sparsify_fx.training.trainer import evaluate


def make_vit() -> nn.Module:
    return VisionTransformer(image_size=16, patch_size=4, num_layers=4, num_heads=4,
                             hidden_dim=64, mlp_dim=128, num_classes=10)


def to_rgb16(data: Splits) -> Splits:
    """Resize every split to 3 x 16 x 16 (bilinear, grey repeated)."""
    def conv(ds: TensorDataset) -> TensorDataset:
        x, y = ds.tensors
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        return TensorDataset(x.repeat(1, 3, 1, 1).contiguous(), y)
    return Splits(conv(data.train), conv(data.val), conv(data.test))


def trainer(model: nn.Module, data: Splits, epochs: int, lr: float, seed: int,
            x: Tensor, **kw: Any) -> sf.Trainer:
    return sf.Trainer(model, data.train, epochs=epochs, lr=lr, optimizer="adam",
                      weight_decay=0.0, batch_size=64, seed=seed, progress=False, **kw)


def l1_pruned(dense: nn.Module, target: float, x: Tensor, per_weight: bool) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(dense, method="fixed", granularity="channel")
    apply_budget(gm, target_macs=target, costs=weight_costs(gm, x),
                 scores=channel_l1_scores(gm, per_weight=per_weight))
    return gm


@torch.no_grad()
def measure(gm: nn.Module, dense: nn.Module, data: Splits, x1: Tensor) -> dict[str, Any]:
    plan = plan_shrink(gm)
    small, diff = shrink_checked(gm, data.test.tensors[0])
    before, after = sf.report(dense, x1), sf.report(small, x1)
    units = [v for k, v in plan.layers.items() if k.endswith("mlp.0.weight")]
    return {"test_acc": evaluate(small, data.loader("test")), "max_abs_diff": diff,
            "macs_fraction": after.total_macs / before.total_dense_macs,
            "macs_fraction_masks": macs_fraction(gm, weight_costs(gm, x1)),
            "heads_kept": [list(v) for v in plan.heads.values()],
            "units_kept": [list(v) for v in units], "params": after.total_params}


def run_seed(data: Splits, seed: int, args: argparse.Namespace) -> list[dict]:
    x = data.train.tensors[0][:2]
    x1 = x[:1]
    rows = []
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    dense = make_vit()
    trainer(dense, data, args.epochs, args.lr, seed, x).fit()
    cont = copy.deepcopy(dense)
    trainer(cont, data, args.finetune, args.lr / 5, seed + 1, x).fit()
    rows.append({"method": "dense", "test_acc": evaluate(cont, data.loader("test")),
                 "macs_fraction": 1.0, "seconds": time.perf_counter() - t0})
    t_dense = rows[0]["seconds"]

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(make_vit(), method="cs", granularity="channel",
                          target_macs=args.target_macs, rescale=False, s_init=0.0)  # as measured
    tr = trainer(gm, data, args.epochs, args.lr, seed, x, mask_lr=args.mask_lr,
                 example_inputs=x)
    tr.fit(finalize=False)
    sched = tr.scheduler
    learned = macs_fraction(gm, sched.costs)
    sched.finalize()
    trainer(gm, data, args.finetune, args.lr / 5, seed + 1, x).fit(finalize=False)
    rows.append({"method": "cs", **measure(gm, dense, data, x1), "macs_before_cut": learned,
                 "seconds": time.perf_counter() - t0})
    for name, per_weight in (("l1", True), ("l1_sum", False)):
        t0 = time.perf_counter()
        gm = l1_pruned(dense, args.target_macs, x, per_weight)
        before_ft = evaluate(gm, data.loader("test"))
        trainer(gm, data, args.finetune, args.lr / 5, seed + 1, x).fit(finalize=False)
        rows.append({"method": name, **measure(gm, dense, data, x1),
                     "acc_before_finetune": before_ft,
                     "seconds": time.perf_counter() - t0 + t_dense})
    for r in rows:
        r["seed"] = seed
        print(f"seed {seed} {r['method']:>7}: test acc {r['test_acc']:6.2f}  MACs fraction "
              f"{r['macs_fraction']:.4f}  heads {r.get('heads_kept', '')}", flush=True)
    return rows


def _mean_std(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# Small ViT, heads + MLP units to {result['target_macs']} of the MACs on "
             f"{result['dataset']} ({len(result['seeds'])} seeds)", "",
             f"Command: `{result['command']}`  ", f"{result['machine']}", "",
             f"Epochs per method: {result['epochs']} + {result['finetune']} fine-tuning.", "",
             "| method | test acc % (mean ± std) | per seed | MACs fraction (report) | "
             "heads kept (seed 0, per layer) |", "|---|---|---|---|---|"]
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        accs = [r["test_acc"] for r in rs]
        fr = [r["macs_fraction"] for r in rs]
        heads = rs[0].get("heads_kept")
        lines.append(f"| {m} | {_mean_std(accs)} | {', '.join(f'{a:.2f}' for a in accs)} | "
                     f"{min(fr):.3f} to {max(fr):.3f} | "
                     f"{' '.join(f'{a}/{b}' for a, b in heads) if heads else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--finetune", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--mask-lr", type=float, default=1e-2)
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--data-dir", default=None, help="MNIST folder (default: sklearn digits)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/vit_heads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        data = to_rgb16(mnist(args.data_dir, seed) if args.data_dir else digits(seed))
        rows += run_seed(data, seed, args)
    result = {"command": command_line("vit_heads.py", argv), "machine": machine(args.threads),
              "dataset": "MNIST" if args.data_dir else "sklearn digits (16x16)",
              "seeds": args.seeds, "epochs": args.epochs, "finetune": args.finetune,
              "target_macs": args.target_macs, "lr": args.lr, "mask_lr": args.mask_lr,
              "rows": rows}
    write_results(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
