"""CS on scikit-learn digits (issue 3, acceptance 1 and 2).

Part 1: over several seeds, a dense DigitsCNN and CS trained to *exactly* 90, 95
and 98 % sparsity (lambda controller + final top-k cut, then fine-tuning with
the mask fixed), test accuracy of each after fold.
Part 2: ticket search, 3 CS rounds with weight rewinding (no target: sparsity
comes from lambda and the round-to-round clamp), then the ticket (rewound
weights, fixed hard mask) retrained; test accuracy and sparsity per round.

    python benchmarks/cs_digits.py [--seeds 0 1 2] [--out benchmarks/results/cs_digits]

Writes ``<out>.json`` and ``<out>.md`` and prints the tables.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparsify_fx as sf
from bench_io import command_line, machine, write_results
from sparsify_fx.data import digits
from sparsify_fx.cli.demo import train_cs, train_dense
from sparsify_fx.models import DigitsCNN
from sparsify_fx.training.trainer import evaluate


def exact_targets(seeds: list[int], targets: list[float], epochs: int, finetune: int) -> list[dict]:
    rows = []
    masked = [e.name for e in sf.masks(sf.transform(DigitsCNN()))]
    for seed in seeds:
        data = digits(seed)
        t0 = time.perf_counter()
        dense = train_dense(data, seed, epochs)
        rows.append({"seed": seed, "method": "dense", "target": 0.0, "sparsity": 0.0,
                     "test_acc": evaluate(dense, data.loader("test")), "epochs": epochs,
                     "changed_bits": 0, "seconds": time.perf_counter() - t0})
        for target in targets:
            t0 = time.perf_counter()
            run = train_cs(data, seed, target, epochs, finetune)
            params = dict(run.model.named_parameters())  # the folded model's tensors
            zeros = sum(int((params[n] == 0).sum()) for n in masked)
            total = sum(params[n].numel() for n in masked)
            rows.append({"seed": seed, "method": "cs", "target": target,
                         "sparsity": run.sparsity, "zeros": zeros, "weights": total,
                         "test_acc": run.test_acc, "epochs": run.epochs,
                         "changed_bits": run.changed_bits,
                         "seconds": time.perf_counter() - t0})
            print(f"seed {seed} target {target:.2f}: acc {run.test_acc:.2f} "
                  f"sparsity {run.sparsity:.5f} changed bits {run.changed_bits}", flush=True)
    return rows


def ticket_search(seeds: list[int], epochs: int, lmbda: float, rewind: int) -> list[dict]:
    rows = []
    for seed in seeds:
        data = digits(seed)
        torch.manual_seed(seed)
        gm = sf.transform(DigitsCNN(), method="cs")
        trainer = sf.Trainer(gm, data.train, epochs=epochs, lr=0.05, mask_lr=0.01, seed=seed,
                             progress=False, lmbda=lmbda)
        for r in trainer.search_ticket(rounds=3, rewind_iteration=rewind,
                                       test_loader=data.loader("test")):
            rows.append({"seed": seed, **r})
            print(f"seed {seed} {r['stage']}: sparsity {r['sparsity']:.4f} "
                  f"acc {r['accuracy']:.2f} epochs {r['epochs']}", flush=True)
    return rows


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def to_markdown(result: dict) -> str:
    ex, tk = result["exact"], result["ticket"]
    dense = [r["test_acc"] for r in ex if r["method"] == "dense"]
    lines = [f"# CS on digits ({len(dense)} seeds)", "", f"Command: `{result['command']}`", "",
             "## Exact targets (CS, then fine-tune with the mask fixed; test accuracy after fold)",
             "", "| model | zeros / masked weights (folded tensors) | test acc % (mean ± std) | gap to dense (points) "
             "| bits changed by final cut |", "|---|---|---|---|---|",
             f"| dense | 0 | {_mean_std(dense)} | 0 | - |"]
    for target in result["targets"]:
        rs = [r for r in ex if r["method"] == "cs" and r["target"] == target]
        accs = [r["test_acc"] for r in rs]
        counted = statistics.mean(r["zeros"] / r["weights"] for r in rs)
        bits = ", ".join(str(r["changed_bits"]) for r in rs)
        lines.append(f"| CS {target:.0%} | {counted:.4f} | {_mean_std(accs)} | "
                     f"{statistics.mean(dense) - statistics.mean(accs):+.2f} | {bits} |")
    lines += ["", "Per seed (test acc %):", "",
              "| seed | dense | " + " | ".join(f"CS {t:.0%}" for t in result["targets"]) + " |",
              "|---|---|" + "---|" * len(result["targets"])]
    for seed in result["seeds"]:
        accs = [r["test_acc"] for r in ex if r["seed"] == seed]  # dense first, then targets
        lines.append(f"| {seed} | " + " | ".join(f"{a:.2f}" for a in accs) + " |")
    lines += ["", "## Ticket search (3 rounds, rewinding; mean over seeds)", "",
              "| stage | sparsity | test acc % | epochs so far |", "|---|---|---|---|"]
    for stage in dict.fromkeys(r["stage"] for r in tk):
        rs = [r for r in tk if r["stage"] == stage]
        lines.append(f"| {stage} | {statistics.mean(r['sparsity'] for r in rs):.4f} | "
                     f"{_mean_std([r['accuracy'] for r in rs])} | {rs[0]['epochs']} |")
    lines += ["", f"Machine: {result['machine']}; wall time {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--finetune", type=int, default=10)
    p.add_argument("--ticket-epochs", type=int, default=10, help="epochs per round")
    p.add_argument("--ticket-lmbda", type=float, default=1e-5)
    p.add_argument("--rewind", type=int, default=20, help="rewind to this optimizer step")
    p.add_argument("--out", default="benchmarks/results/cs_digits")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = {"command": command_line("cs_digits.py", argv),
              "targets": args.targets, "seeds": args.seeds, "epochs": args.epochs,
              "finetune": args.finetune, "ticket_epochs": args.ticket_epochs,
              "ticket_lmbda": args.ticket_lmbda, "rewind": args.rewind,
              "machine": machine(),
              "exact": exact_targets(args.seeds, args.targets, args.epochs, args.finetune),
              "ticket": ticket_search(args.seeds, args.ticket_epochs, args.ticket_lmbda,
                                      args.rewind)}
    result["seconds"] = time.perf_counter() - t0
    write_results(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
