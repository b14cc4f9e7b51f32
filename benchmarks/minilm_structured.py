"""MiniLM as the pretrained encoder (issue 32): heads + MLP units cut to a share of the blocks'
MACs, scored by sentence-embedding agreement with the dense model.

Model: all-MiniLM-L6-v2 (``sparsify_fx.hf.pretrained.pretrained_path("minilm")``, loaded as
``AutoModel``: BERT, 6 layers, hidden 384, 12 heads, 22.7 M parameters). Text: the pydocs
corpus, document ``i`` is validation iff ``i % 10 == 9``; every document is tokenized to its
first ``--max-length`` tokens (padded to that length, attention mask kept).

Score: the mean over the validation documents of the cosine similarity between a model's
sentence embedding (mean of the last hidden states over the document's real tokens, the
checkpoint's own pooling) and the dense model's.

Rows, per ``--block-keep`` (fraction of the 6 blocks' MACs; the embeddings and the unused
pooler stay dense) and seed:

* ``L1 one-shot``: every head and MLP unit is a slot of a torch.export capture, ranked by the
  mean |w| of the weights it gates (``channel_l1_scores(per_weight=True)``), cut exactly to
  the budget (``apply_budget``), shrunk (``sf.shrink``: the smaller model is checked against
  the masked one);
* ``L1 + distill (mask fixed)``: that shrunk model trained ``--steps`` x ``--batch``
  training documents on the distillation loss ``1 - cos(pooled, dense pooled)``;
* ``CS from the L1 cut (distill)``: CS channel masks started from the L1 cut
  (``init_cs_from_masks``, ``s_init`` 1, no rescale), the same steps and loss plus the CS
  penalty; the scheduler's exact cut at the end; shrunk.

Both training rows see the same training tokens (stated). Results are rewritten after every
row (``"complete": false`` until the end).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/minilm_structured.py
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

import sparsify_fx as sf
from bench_io import command_line, machine, mean_sd_by_method, write_results
from llm_pruning import CORPUS, weight_groups
from llm_text import load_split
from sparsify_fx.baselines.mask_init import init_cs_from_masks


class Docs:
    """Token ids and attention masks of the training and validation documents."""

    def __init__(self, tokenizer: Any, corpus: str, length: int) -> None:
        train, val = load_split(corpus)

        def enc(docs: list[str]) -> tuple[Tensor, Tensor]:
            out = tokenizer(docs, truncation=True, max_length=length, padding="max_length",
                            return_tensors="pt")
            return out["input_ids"], out["attention_mask"]

        self.train_ids, self.train_mask = enc(train)
        self.val_ids, self.val_mask = enc(val)

    def batches(self, batch: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Random training batches (seeded), forever."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(0, self.train_ids.shape[0], (batch,), generator=gen)
            yield self.train_ids[idx], self.train_mask[idx]


def hidden_of(out: Any) -> Tensor:
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, dict):
        return out["last_hidden_state"]
    return out[0]


def pooled(model: torch.nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """Mean of the last hidden states over the real tokens, ``(batch, hidden)``."""
    h = hidden_of(model(ids, mask))
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def embeddings(model: torch.nn.Module, docs: Docs, batch: int = 16) -> Tensor:
    model.eval()
    return torch.cat([pooled(model, docs.val_ids[i:i + batch], docs.val_mask[i:i + batch])
                      for i in range(0, docs.val_ids.shape[0], batch)])


def agreement(model: torch.nn.Module, docs: Docs, dense: Tensor) -> tuple[float, float]:
    """(mean, min) cosine similarity of ``model``'s validation embeddings to ``dense``."""
    cos = F.cosine_similarity(embeddings(model, docs), dense, dim=-1)
    return float(cos.mean()), float(cos.min())


def distill(student: torch.nn.Module, teacher: torch.nn.Module, docs: Docs,
            args: argparse.Namespace, seed: int, mask_lr: float | None = None,
            sched: Any = None, steps: int | None = None, offset: int = 0
            ) -> tuple[float, int]:
    """``--steps`` AdamW steps of ``1 - cos(student pooled, teacher pooled)`` (+ the CS
    penalty and schedule step with ``sched``), warmup then cosine lr; (seconds, real tokens)."""
    t0 = time.perf_counter()
    steps = args.steps if steps is None else steps
    groups = weight_groups(student, args.lr, mask_lr)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    base = [g.get("lr", args.lr) for g in opt.param_groups]
    warmup = max(1, steps // 10)
    data = docs.batches(args.batch, 3000 + seed)
    for _ in range(offset):  # continue the data order of an earlier phase
        next(data)
    teacher.eval()
    student.train()
    tokens = 0
    recent: list[float] = []
    for step in range(steps):
        frac = min(1.0, (step + 1) / warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, step / steps)))
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * frac
        ids, mask = next(data)
        tokens += int(mask.sum())
        with torch.no_grad():
            target = pooled(teacher, ids, mask)
        loss = (1 - F.cosine_similarity(pooled(student, ids, mask), target, dim=-1)).mean()
        total = loss
        if sched is not None and (p := sched.penalty()) is not None:
            total = loss + p
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        recent = (recent + [float(loss.detach())])[-20:]
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"  step {step + 1}/{steps} 1-cos {sum(recent) / len(recent):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    student.eval()
    return time.perf_counter() - t0, tokens


@torch.no_grad()
def shrink_checked(gm: torch.nn.Module, x: tuple[Tensor, Tensor], tol: float = 1e-4
                   ) -> tuple[torch.nn.Module, float]:
    """``sf.shrink(gm)`` (eval), its last hidden states checked against the hard-masked
    ``gm``'s on ``x``: ``(shrunk, max abs diff)``; AssertionError past ``tol``."""
    small = sf.shrink(gm).eval()
    gm.eval()
    with sf.hard_masks(gm):
        diff = float((hidden_of(gm(*x)) - hidden_of(small(*x))).abs().max())
    if diff > tol:
        raise AssertionError(f"shrunk output differs from the masked output by {diff:.2e}")
    return small, diff


def capture(model: torch.nn.Module, example: tuple[Tensor, Tensor], method: str,
            **options: Any) -> torch.nn.Module:
    """torch.export capture of the encoder with heads / MLP units as slots (pooler kept)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sf.transform(model, method=method, granularity="channel",
                            example_inputs=example, exclude=["pooler*"],
                            dynamic_shapes=({0: torch.export.Dim.AUTO},
                                            {0: torch.export.Dim.AUTO}), **options)


def rows_for(model: torch.nn.Module, docs: Docs, dense: Tensor, keep: float, seed: int,
             args: argparse.Namespace, record: Any) -> None:
    from sparsify_fx.budgets.cost_model import channel_macs
    from sparsify_fx.budgets.exact_cut import apply_budget, weight_costs
    from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks
    x = (docs.val_ids[:2], docs.val_mask[:2])
    t0 = time.perf_counter()
    oneshot = capture(model, x, "magnitude").eval()
    blocks = sf.report(oneshot, x).blocks
    whole = channel_macs(oneshot, weight_costs(oneshot, x)).dense
    target = (keep * blocks["dense_macs"] + whole - blocks["dense_macs"]) / whole
    apply_budget(oneshot, target_macs=target, scores=channel_l1_scores(oneshot, per_weight=True))
    l1_keep = {k: m.hard_mask().clone() for k, m in group_masks(oneshot).items()}
    small, err = shrink_checked(oneshot, x)
    base = {"target": f"{keep:g} of blocks' MACs", "seed": seed,
            "blocks_fraction": sf.report(oneshot, x).blocks.get("fraction"),
            "model_fraction": sf.report(oneshot, x).blocks["model_fraction"],
            "shrink_max_abs_diff": err}
    record({**base, "method": "L1 one-shot", "seconds": time.perf_counter() - t0,
            "tokens": 0}, small)
    seconds, tokens = distill(small, model, docs, args, seed)
    record({**base, "method": "L1 + distill (mask fixed)", "seconds": seconds,
            "tokens": tokens}, small)
    del small
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    cs = capture(model, x, "cs", target_macs=target, s_init=1.0, rescale=False)
    init_cs_from_masks(cs, oneshot)
    cs_steps = args.steps - args.cs_finetune_steps
    sched = sf.CSScheduler(cs, epochs=1, per_step=True, steps_per_epoch=cs_steps)
    seconds, tokens = distill(cs, model, docs, args, seed, args.mask_lr, sched, cs_steps)
    if sched.cut is None:
        raise RuntimeError("the CS schedule did not make its exact cut")
    changed = sum(int((m.hard_mask() != l1_keep[k]).sum()) for k, m in group_masks(cs).items())
    small, err = shrink_checked(cs.eval(), x)
    name = "CS from the L1 cut (distill)"
    if args.cs_finetune_steps:  # the cut model trained on the rest of the same budget
        more_s, more_t = distill(small, model, docs, args, seed, steps=args.cs_finetune_steps,
                                 offset=cs_steps)
        seconds, tokens = seconds + more_s, tokens + more_t
        name = f"CS from the L1 cut ({cs_steps} steps) + distill ({args.cs_finetune_steps})"
    record({**base, "method": name, "seconds": seconds,
            "tokens": tokens, "changed_slots": changed,
            "slots": sum(v.numel() for v in l1_keep.values()),
            "blocks_fraction": sf.report(cs, x).blocks.get("fraction"),
            "model_fraction": sf.report(cs, x).blocks["model_fraction"],
            "shrink_max_abs_diff": err}, small)


#: the row columns a summary averages over seeds
SUMMARY_COLUMNS = ("cosine", "min_cosine", "seconds", "tokens", "changed_slots", "slots",
                   "blocks_fraction", "model_fraction", "load_average")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return mean_sd_by_method(rows, SUMMARY_COLUMNS)


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = ["# all-MiniLM-L6-v2 (pretrained): heads + MLP units cut, embeddings vs dense", "",
             f"`{result['command']}` — {result['machine']}", "",
             f"Model: {result['model']} ({result['params']:,} parameters). Score: mean cosine "
             "similarity of mean-pooled sentence embeddings to the dense model's on the "
             f"{result['val_docs']} pydocs validation documents ({result['val_tokens']:,} "
             f"real tokens; each document's first {a['max_length']} tokens). Training rows: "
             f"{a['steps']} steps x {a['batch']} training documents "
             f"(of {result['train_docs']}), loss 1 - cos(pooled, dense pooled), AdamW lr "
             f"{a['lr']} (CS scores {a['mask_lr']}), about "
             f"{result.get('train_tokens_per_row', 0):,.0f} real tokens per row. Seeds "
             f"{a['seeds']}.", "",
             "| method | target | cosine to dense | min cosine | blocks' MACs kept "
             "| training tokens | slots changed | seconds | load avg |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        sd = f" ± {s['cosine_sd']:.4f}" if s["n"] > 1 else ""
        changed = (f"{s['changed_slots']:,.0f} of {s['slots']:,.0f}" if "changed_slots" in s
                   else "")
        frac = f"{s['blocks_fraction']:.3f}" if "blocks_fraction" in s else ""
        lines.append(f"| {s['method']} | {s['target']} | {s['cosine']:.4f}{sd} | "
                     f"{s['min_cosine']:.4f} | {frac} | {s['tokens']:,.0f} | {changed} | "
                     f"{s['seconds']:.0f} | {s.get('load_average', 0):.1f} |")
    state = "complete" if result.get("complete") else "partial (rows so far)"
    lines += ["", "Blocks' MACs kept: `report(...).blocks['fraction']` of the cut model (the "
              "embeddings and the pooler are outside the blocks). Cosine: mean (and min) over "
              "the validation documents; ± population sd over seeds. Slots changed: heads / units whose keep bit differs from the L1 cut's.", "",
              f"Wall time {result['seconds']:.0f} s, {state}; load average now "
              f"{result['load_average']:.1f} (2 cores shared with other jobs)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=CORPUS)
    p.add_argument("--out", default="benchmarks/results/minilm_structured")
    p.add_argument("--block-keep", type=float, nargs="+", default=[0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--mask-lr", type=float, default=0.2)
    p.add_argument("--cs-finetune-steps", type=int, default=0,
                   help="of --steps: the last ones train the CS-cut model with its mask fixed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from sparsify_fx.hf.checkpoint_files import load_pretrained
    from sparsify_fx.hf.pretrained import CHECKPOINTS, pretrained_path
    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(pretrained_path("minilm"), "feature-extraction")
    docs = Docs(tokenizer, args.corpus, args.max_length)
    dense = embeddings(model, docs)
    rows: list[dict[str, Any]] = []
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    def write(complete: bool = False) -> None:
        train_tokens = [r["tokens"] for r in rows if r["tokens"]]
        result = {"command": command_line("minilm_structured.py", argv),
                  "machine": machine(args.threads), "args": vars(args),
                  "model": CHECKPOINTS["minilm"].description,
                  "params": sum(q.numel() for q in model.parameters()),
                  "train_docs": int(docs.train_ids.shape[0]),
                  "val_docs": int(docs.val_ids.shape[0]),
                  "val_tokens": int(docs.val_mask.sum()),
                  "train_tokens_per_row": statistics.mean(train_tokens) if train_tokens else 0,
                  "rows": rows, "summary": summarize(rows),
                  "seconds": time.perf_counter() - t0, "load_average": os.getloadavg()[0],
                  "complete": complete}
        write_results(args.out, result, markdown(result))

    def record(row: dict[str, Any], gm: torch.nn.Module) -> None:
        t1 = time.perf_counter()
        row["cosine"], row["min_cosine"] = agreement(gm, docs, dense)
        row.update(eval_seconds=time.perf_counter() - t1, load_average=os.getloadavg()[0])
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
              flush=True)
        write()

    print(f"dense: {docs.val_ids.shape[0]} validation documents, "
          f"{int(docs.val_mask.sum())} tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
    for seed in args.seeds:
        for keep in args.block_keep:
            rows_for(model, docs, dense, keep, seed, args, record)
    write(complete=True)


if __name__ == "__main__":
    main()
