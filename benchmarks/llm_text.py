"""The causal-LM task of ``llm_pruning.py``: pydocs corpus, local BPE tokenizer, small Llama.

* Corpus: ``../shared/data/text/pydocs.txt`` (a parameter); documents are separated by a
  line holding a single form feed; document ``i`` is validation iff ``i % 10 == 9``
  (the corpus README's fixed split).
* Tokenizer: byte-level BPE trained with ``tokenizers`` on the training documents only
  (vocabulary ``vocab`` entries, ``<|endoftext|>`` between documents).
* Model: ``transformers.LlamaForCausalLM`` from a config (GQA, tied embeddings, no cache),
  trained from scratch with AdamW on random windows of the training tokens, cached as
  ``model.pt`` + ``tokenizer.json`` + ``meta.json`` under a cache folder.

Everything here runs on CPU and downloads nothing.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EOT = "<|endoftext|>"


@dataclass(frozen=True)
class LMConfig:
    """Model, tokenizer and dense-training settings (the cache key)."""

    vocab: int = 1024
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 688
    seq: int = 128
    batch: int = 16
    steps: int = 1200
    lr: float = 3e-3
    seed: int = 0

    def key(self) -> dict[str, Any]:
        return asdict(self)


def load_split(path: str) -> tuple[list[str], list[str]]:
    """(training documents, validation documents) of the corpus at ``path``."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    docs, cur = [], []
    for line in lines:
        if line == "\f":
            docs.append("\n".join(cur).strip("\n"))
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur).strip("\n"))
    train = [d for i, d in enumerate(docs) if i % 10 != 9]
    val = [d for i, d in enumerate(docs) if i % 10 == 9]
    return train, val


def train_tokenizer(train_docs: list[str], vocab: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``train_docs`` (``vocab`` entries)."""
    from tokenizers import ByteLevelBPETokenizer
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(train_docs, vocab_size=vocab, min_frequency=2,
                            special_tokens=[EOT], show_progress=False)
    return tok


def encode(tok: Any, docs: list[str]) -> Tensor:
    """All documents as one int64 token stream, ``<|endoftext|>`` after each document."""
    eot = tok.token_to_id(EOT)
    out: list[int] = []
    for enc in tok.encode_batch(docs):
        out.extend(enc.ids)
        out.append(eot)
    return torch.tensor(out, dtype=torch.long)


def chunks(ids: Tensor, seq: int) -> Tensor:
    """Non-overlapping ``(N, seq)`` windows of a token stream (the tail is dropped)."""
    n = ids.numel() // seq
    return ids[: n * seq].reshape(n, seq)


def build_model(cfg: LMConfig, vocab: int) -> nn.Module:
    """A random-init Llama-style causal LM (RMSNorm, SwiGLU, rotary, GQA, tied embeddings)."""
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.seq,
        tie_word_embeddings=True, use_cache=False, attn_implementation="sdpa",
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def logits_of(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Mean next-token cross entropy (nats) of ``model`` on ``ids`` ``(B, T)``."""
    logits = logits_of(model(ids))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, val: Tensor, batch: int = 32) -> float:
    """Token perplexity ``exp(mean NLL)`` over the windows ``val`` ``(N, T)``, eval mode
    (restored after); every window predicts its tokens 1..T-1."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, val.shape[0], batch):
        x = val[i:i + batch]
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(lm_loss(model, x)) * n
        count += n
    model.train(was)
    return math.exp(total / count)


def windows(ids: Tensor, seq: int, batch: int, seed: int) -> Iterator[Tensor]:
    """Endless ``(batch, seq)`` batches of random windows of ``ids`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, ids.numel() - seq, (batch,), generator=g)
        yield torch.stack([ids[s:s + seq] for s in start.tolist()])


def train_lm(model: nn.Module, data: Iterator[Tensor], steps: int, lr: float, *,
             groups: list[dict[str, Any]] | None = None, warmup: int = 50,
             penalty: Callable[[], Tensor | None] | None = None,
             after_step: Callable[[int], None] | None = None,
             log_every: int = 0) -> float:
    """``steps`` AdamW steps of LM loss (+ ``penalty()``), cosine lr after ``warmup``; mutates
    ``model``. ``groups``: optimizer parameter groups (default: every parameter, weight decay
    0.1 on matrices). Returns the mean loss of the last 20 steps."""
    if groups is None:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    base = [g.get("lr", lr) for g in opt.param_groups]
    model.train()
    recent: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        frac = min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, step / max(1, steps))))
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * frac
        loss = lm_loss(model, next(data))
        total = loss if penalty is None or (p := penalty()) is None else loss + p
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        if after_step is not None:
            after_step(step)
        recent = (recent + [float(loss.detach())])[-20:]
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps} loss {sum(recent) / len(recent):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return sum(recent) / max(1, len(recent))


@dataclass
class Task:
    """The trained dense model with its token streams (train ids, validation windows)."""

    model: nn.Module
    cfg: LMConfig
    train_ids: Tensor
    val: Tensor
    meta: dict[str, Any]


def load_or_train(corpus: str, cache: str, cfg: LMConfig, log_every: int = 100) -> Task:
    """The dense model of ``cfg`` from ``cache`` (trained there first if missing or built
    with other settings). Writes ``cache/{model.pt, tokenizer.json, meta.json}``."""
    from tokenizers import Tokenizer
    train_docs, val_docs = load_split(corpus)
    meta_path = os.path.join(cache, "meta.json")
    meta: dict[str, Any] = {}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    fresh = meta.get("config") == cfg.key()
    if fresh:
        tok = Tokenizer.from_file(os.path.join(cache, "tokenizer.json"))
    else:
        t0 = time.perf_counter()
        tok = train_tokenizer(train_docs, cfg.vocab)
        meta = {"config": cfg.key(), "tokenizer_seconds": time.perf_counter() - t0}
    train_ids, val_ids = encode(tok, train_docs), encode(tok, val_docs)
    vocab = tok.get_vocab_size()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocab)
    if fresh:
        model.load_state_dict(torch.load(os.path.join(cache, "model.pt"), weights_only=True))
    else:
        print(f"training the dense model: {cfg}", flush=True)
        t0 = time.perf_counter()
        loss = train_lm(model, windows(train_ids, cfg.seq, cfg.batch, cfg.seed), cfg.steps,
                        cfg.lr, warmup=100, log_every=log_every)
        meta.update(train_seconds=time.perf_counter() - t0, final_train_loss=loss,
                    params=sum(p.numel() for p in model.parameters()), vocab=vocab,
                    train_tokens=int(train_ids.numel()), val_tokens=int(val_ids.numel()))
        os.makedirs(cache, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(cache, "model.pt"))
        tok.save(os.path.join(cache, "tokenizer.json"))
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=2)
    model.eval()
    return Task(model, cfg, train_ids, chunks(val_ids, cfg.seq), meta)
