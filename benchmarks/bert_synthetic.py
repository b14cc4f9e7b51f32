"""CS to exactly 80 % on a 2-layer BERT trained from scratch on a synthetic task (issue 13).

Task: token sequences (length 24, vocabulary 16); label 1 when the sequence
contains the contiguous pattern ``4 9 4``, else 0 (balanced classes, so chance
is 50 %). Negatives never contain the pattern; every pattern token also
appears at random elsewhere, so no single token gives the label away.

A ``BertForSequenceClassification`` (2 layers, hidden 64, 4 heads, random
init, no download) is captured with torch.export (``symbolic_trace`` cannot
trace it) and trained:

* dense: ``--epochs`` epochs of AdamW on the eager model;
* CS: the same init transformed with ``method="cs", target_sparsity=0.8``,
  ``--epochs`` epochs with the CS penalty (the scheduler's last ``step()``
  makes the exact cut), then ``--finetune`` epochs with the mask fixed.

Sparsity is counted from the folded model's weights.

    .venv/bin/python benchmarks/bert_synthetic.py [--epochs 6] [--finetune 2] [--seed 0]

Writes ``benchmarks/results/bert_synthetic.json`` (and ``.md``).
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import sparsify_fx as sf
from bench_io import command_line, machine, write_results

PATTERN = (4, 9, 4)
VOCAB, LENGTH = 16, 24


def contains(seq: torch.Tensor) -> bool:
    n = len(PATTERN)
    return any(tuple(seq[i:i + n].tolist()) == PATTERN for i in range(len(seq) - n + 1))


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences (int64, ``(n, LENGTH)``) and labels (int64, ``(n,)``), half positive."""
    xs, ys = [], []
    while len(xs) < n:
        seq = torch.randint(1, VOCAB, (LENGTH,), generator=generator)
        label = len(xs) % 2
        if label:
            at = int(torch.randint(0, LENGTH - len(PATTERN) + 1, (1,), generator=generator))
            seq[at:at + len(PATTERN)] = torch.tensor(PATTERN)
        elif contains(seq):
            continue
        xs.append(seq)
        ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


class Logits(nn.Module):
    """The HF model returning its logits tensor (``(batch, 2)``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


def build(seed: int) -> nn.Module:
    import transformers
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=LENGTH, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Logits(transformers.BertForSequenceClassification(config))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(-1) == y).float().mean())


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
          seed: int, cs: sf.CSScheduler | None = None) -> None:
    """AdamW over shuffled batches of 64; the CS penalty and ``cs.step()`` when ``cs``."""
    groups = sf.param_groups(model, lr=lr, weight_decay=0.01) if cs is not None else \
        [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    opt = torch.optim.AdamW(groups, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if cs is not None:
                loss = loss + cs.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if cs is not None:
            cs.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--finetune", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/bert_synthetic")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train = make_data(args.train, g)
    x_test, y_test = make_data(1000, g)
    source = build(args.seed)
    example = (x_train[:8],)

    t0 = time.perf_counter()
    dense = copy.deepcopy(source)  # eager, no masks
    train(dense, x_train, y_train, args.epochs, 1e-3, args.seed)
    dense_acc = accuracy(dense, x_test, y_test)
    dense_s = time.perf_counter() - t0
    print(f"dense: {dense_acc:.2f} % test accuracy ({dense_s:.0f} s)", flush=True)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(source, method="cs", target_sparsity=args.target,
                          example_inputs=example)
    capture = type(gm).__name__
    cs = sf.CSScheduler(gm, epochs=args.epochs)
    train(gm, x_train, y_train, args.epochs, 1e-3, args.seed + 1, cs)
    cut_acc = accuracy(gm, x_test, y_test)
    train(gm, x_train, y_train, args.finetune, 3e-4, args.seed + 2)
    plain = sf.fold(gm)
    cs_acc = accuracy(plain, x_test, y_test)
    cs_s = time.perf_counter() - t0
    names = [e.name for e in sf.masks(gm)]
    params = dict(plain.named_parameters())
    zeros = sum(int((params["train_graph." + n] == 0).sum()) for n in names)
    total = sum(params["train_graph." + n].numel() for n in names)
    print(f"CS: {cs_acc:.2f} % after fine-tuning ({cut_acc:.2f} % at the cut), "
          f"sparsity {zeros / total:.4f} over {len(names)} masked weights ({cs_s:.0f} s)")
    result = {
        "command": command_line("bert_synthetic.py", argv), "machine": machine(args.threads),
        "task": f"contains {PATTERN} in length-{LENGTH} sequences over {VOCAB} tokens; "
                "balanced, chance 50 %",
        "train_size": args.train, "test_size": 1000, "captured_as": capture,
        "masked_weights": len(names), "epochs": args.epochs, "finetune_epochs": args.finetune,
        "dense_test_acc": dense_acc, "cs_test_acc_at_cut": cut_acc, "cs_test_acc": cs_acc,
        "target_sparsity": args.target, "sparsity_from_folded_weights": zeros / total,
        "zeros": zeros, "masked_params": total, "dense_seconds": dense_s, "cs_seconds": cs_s,
    }
    markdown = (f"# CS on a 2-layer BERT, synthetic pattern task\n\n`{result['command']}` "
                f"({result['machine']})\n\n| model | test acc % | sparsity |\n|---|---|---|\n"
                f"| dense | {dense_acc:.2f} | 0 |\n| CS at the cut | {cut_acc:.2f} | "
                f"{zeros / total:.4f} |\n| CS + {args.finetune} epochs fine-tuning | "
                f"{cs_acc:.2f} | {zeros / total:.4f} |\n\nChance: 50 %.\n")
    write_results(args.out, result, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
