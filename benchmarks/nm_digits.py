"""N:M (2:4) sparsity on scikit-learn digits (issue 12, the N:M proof).

Per seed: a dense DigitsCNN (20 epochs); CS with ``granularity="2:4"`` (20
epochs, the final cut keeps exactly 2 of every 4 input weights, then 10 epochs
of fine-tuning with the mask fixed); magnitude 2:4 on the trained dense model
plus the same 10 fine-tuning epochs. Test accuracy after fold, and the check
that every full group of 4 consecutive input weights holds >= 2 zeros.

    .venv/bin/python benchmarks/nm_digits.py [--seeds 0 1 2] [--out benchmarks/results/nm_digits]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparsify_fx as sf
from bench_io import command_line, machine, write_results
from sparsify_fx.data import digits
from sparsify_fx.cli.demo import train_dense
from sparsify_fx.models import DigitsCNN
from sparsify_fx.training.trainer import evaluate

PATTERN = "2:4"


def pattern_holds(folded: torch.nn.Module, names: list[str], m: int = 4, n: int = 2) -> bool:
    for name in names:
        w = folded.get_parameter(name).detach().movedim(1, -1)
        full = (w.shape[-1] // m) * m
        if full and not bool(((w[..., :full].reshape(-1, m) == 0).sum(-1) >= n).all()):
            return False
    return True


def finetune(gm: torch.nn.Module, data, seed: int, epochs: int) -> None:
    sf.Trainer(gm, data.train, epochs=epochs, lr=0.01, seed=seed + 1, progress=False).fit()


def run_seed(seed: int, epochs: int, tune: int) -> list[dict]:
    data = digits(seed)
    rows = []
    t0 = time.perf_counter()
    dense = train_dense(data, seed, epochs)
    rows.append({"seed": seed, "method": "dense", "test_acc": evaluate(dense, data.loader("test")),
                 "sparsity": 0.0, "pattern_ok": True, "seconds": time.perf_counter() - t0})
    for method in ("cs", "magnitude"):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        if method == "cs":
            gm = sf.transform(DigitsCNN(), method="cs", granularity=PATTERN)
            sf.Trainer(gm, data.train, epochs=epochs, lr=0.05, mask_lr=0.01, seed=seed,
                       progress=False).fit()
        else:
            gm = sf.transform(dense, method="magnitude", granularity=PATTERN)
        finetune(gm, data, seed, tune)
        folded = sf.fold(gm)
        names = [e.name for e in sf.masks(gm)]
        rows.append({"seed": seed, "method": method, "test_acc": evaluate(folded, data.loader("test")),
                     "sparsity": float(sf.sparsity(gm)), "pattern_ok": pattern_holds(folded, names),
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--finetune", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/nm_digits")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [r for seed in args.seeds for r in run_seed(seed, args.epochs, args.finetune)]

    def stats(method: str) -> tuple[float, float]:
        accs = [r["test_acc"] for r in rows if r["method"] == method]
        return statistics.mean(accs), statistics.pstdev(accs)

    dense_mean = stats("dense")[0]
    lines = [f"# {PATTERN} sparsity on digits (DigitsCNN, {len(args.seeds)} seeds)", "",
             f"`{command_line('nm_digits.py', argv)}` — {machine(1)}", "",
             "| method | test acc % (mean ± sd) | gap to dense | sparsity | pattern holds |",
             "|---|---|---|---|---|"]
    for method in ("dense", "cs", "magnitude"):
        mean, sd = stats(method)
        sel = [r for r in rows if r["method"] == method]
        lines.append(f"| {method} | {mean:.2f} ± {sd:.2f} | {dense_mean - mean:+.2f} | "
                     f"{sel[0]['sparsity']:.4f} | {all(r['pattern_ok'] for r in sel)} |")
    lines += ["", "Per seed:", "", "| seed | method | test acc % |", "|---|---|---|"]
    lines += [f"| {r['seed']} | {r['method']} | {r['test_acc']:.2f} |" for r in rows]
    write_results(args.out, {"command": command_line("nm_digits.py", argv), "rows": rows},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
