"""``text:FILE`` DATA of ``hf:`` runs: local text, tokenised with the model folder's tokenizer.

sequence-classification: FILE is a ``.csv`` or JSON Lines file (``.jsonl``) with
``text`` and ``label`` columns (labels: integers, or names in the model's
``label2id``), or a folder holding ``train.csv`` + ``validation.csv`` (or
``.jsonl``), used as given; a single file is split by ``val_fraction`` with
the seed. Items are ``(packed, label)``: ``packed`` a ``(k, L)`` long tensor
whose rows are the model inputs in the order given (``input_ids``,
``attention_mask``, ...), truncated to ``max_length``; :class:`PadBatch` pads
a batch to its longest text (or to a fixed length).

causal-lm: FILE is a text file, a folder with ``train.txt`` + ``validation.txt``,
or a folder holding exactly one ``.txt`` file. A single text made of documents
separated by form-feed lines (``\\f``) holds out document ``i`` when
``i % k == k - 1``, ``k = round(1 / val_fraction)`` (0.1: every 10th, the
split of ``../shared/data/text``); a text without separators holds out its
last ``val_fraction`` of lines. Documents are tokenised, joined with the
tokenizer's EOS token, and cut into blocks: item ``i`` reads tokens
``[i*b, (i+1)*b)`` and predicts ``[i*b+1, (i+1)*b+1)`` (``b = block_size``).
"""
from __future__ import annotations

import csv
import json
import os
import re
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from sparsify_fx.errors import InputError

_SEPARATOR = re.compile(r"\n[ \t]*\f[ \t]*\n")
_TABLE_EXTS = (".csv", ".jsonl")


class PackedTexts(Dataset):
    """Tokenised texts: item ``i`` is ``(packed (k, L_i) long tensor, label)``."""

    def __init__(self, packed: list[Tensor], labels: list[int]) -> None:
        self.packed, self.labels = packed, labels

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.packed[i], self.labels[i]

    def longest(self) -> int:
        return max(p.shape[1] for p in self.packed)


class PadBatch:
    """Collate ``(packed, label)`` items into ``(B, k, L)`` and ``(B,)``: row ``j`` padded
    with ``pad_values[j]`` to the batch's longest item, or to ``length`` when given."""

    def __init__(self, pad_values: Sequence[int], length: int | None = None) -> None:
        self.pad_values, self.length = list(pad_values), length

    def __call__(self, items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
        width = self.length or max(p.shape[1] for p, _ in items)
        pad = torch.tensor(self.pad_values, dtype=torch.long).view(-1, 1)
        out = pad.expand(len(self.pad_values), width).repeat(len(items), 1, 1)
        for b, (p, _) in enumerate(items):
            out[b, :, :p.shape[1]] = p[:, :width]
        return out, torch.tensor([y for _, y in items], dtype=torch.long)


class TokenBlocks(Dataset):
    """Blocks of a token stream: item ``i`` is ``(ids[i*b:(i+1)*b], ids[i*b+1:(i+1)*b+1])``."""

    def __init__(self, ids: Tensor, block_size: int) -> None:
        self.ids, self.block_size = ids, block_size

    def __len__(self) -> int:
        return max(0, (len(self.ids) - 1) // self.block_size)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.block_size
        return (self.ids[start:start + self.block_size],
                self.ids[start + 1:start + self.block_size + 1])


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction}")


def _pair(path: str, exts: Sequence[str], kind: str) -> tuple[str, str | None]:
    """``(train file, validation file or None)`` for ``text:path``."""
    if os.path.isfile(path):
        if not path.endswith(tuple(exts)):
            raise InputError(f"--data text:{path}: {kind} reads {' or '.join(exts)} files; "
                             f"rename it or convert it")
        return path, None
    if not os.path.isdir(path):
        raise InputError(f"--data text:{path}: file or folder not found; pass an existing "
                         f"{'/'.join(exts)} file or a folder with train + validation files")
    for ext in exts:
        train, val = (os.path.join(path, f"{n}{ext}") for n in ("train", "validation"))
        if os.path.isfile(train) and os.path.isfile(val):
            return train, val
    singles = sorted(n for n in os.listdir(path) if n.endswith(tuple(exts)))
    if len(singles) == 1:
        return os.path.join(path, singles[0]), None
    raise InputError(f"--data text:{path}: the folder needs train{exts[0]} and "
                     f"validation{exts[0]} (or exactly one {'/'.join(exts)} file); found "
                     f"{', '.join(singles) or 'none'}")


def _rows(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if path.endswith(".csv"):
                rows = list(csv.DictReader(fh))
            else:
                rows = [json.loads(line) for line in fh if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise InputError(f"--data text:{path}: cannot read it ({type(exc).__name__}: "
                         f"{exc}); write UTF-8 CSV with a header, or one JSON object per "
                         "line") from None
    if not rows or not all(isinstance(r, dict) and "text" in r and "label" in r for r in rows):
        raise InputError(f"--data text:{path}: every row needs `text` and `label` columns "
                         f"({len(rows)} row(s) read)")
    return rows


def _label_ids(values: list[Any], label2id: dict[str, int], num_labels: int,
               where: str) -> list[int]:
    """Integers (or their strings) as they are, else names looked up in ``label2id``."""
    ids: list[int] = []
    for v in values:
        if isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()):
            ids.append(int(v))
        elif str(v) in label2id:
            ids.append(int(label2id[str(v)]))
        else:
            raise InputError(f"--data text:{where}: label {v!r} is neither an integer nor a "
                             f"name in the model's label2id ({', '.join(label2id)}); use "
                             f"0..{num_labels - 1} or set label2id in config.json")
    bad = sorted({i for i in ids if not 0 <= i < num_labels})
    if bad:
        raise InputError(f"--data text:{where}: label(s) {bad[:5]} outside 0..{num_labels - 1} "
                         f"(the model has num_labels={num_labels}); fix the labels or the "
                         "model's config")
    return ids


def _pack(tokenizer: Any, texts: list[str], names: Sequence[str], max_length: int) -> list[Tensor]:
    enc = tokenizer([str(t) for t in texts], truncation=True, max_length=max_length)
    missing = [n for n in names if n not in enc]
    if missing:
        raise InputError(f"the tokenizer returns no {', '.join(missing)}, which the model "
                         "takes; save the tokenizer that belongs to the model")
    return [torch.tensor([enc[n][i] for n in names], dtype=torch.long)
            for i in range(len(texts))]


def classification_data(path: str, tokenizer: Any, names: Sequence[str], max_length: int,
                        seed: int, val_fraction: float, label2id: dict[str, int],
                        num_labels: int) -> tuple[PackedTexts, PackedTexts, str]:
    """Train and validation :class:`PackedTexts` of ``text:path`` (module doc)."""
    train_file, val_file = _pair(path, _TABLE_EXTS, "sequence-classification")
    rows = _rows(train_file)
    if val_file is None:
        _check_fraction(val_fraction)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, int(round(len(rows) * val_fraction)))
        if n_val >= len(rows):
            raise InputError(f"--data text:{path} has {len(rows)} row(s): too few to hold out "
                             "a validation set; add rows or give train + validation files")
        splits = [[rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]]
        how = f"{len(rows) - n_val} train / {n_val} val (seed {seed})"
    else:
        splits = [rows, _rows(val_file)]
        how = f"{len(splits[0])} train / {len(splits[1])} validation rows"
    out = []
    for part, where in zip(splits, (train_file, val_file or train_file)):
        labels = _label_ids([r["label"] for r in part], label2id, num_labels, where)
        out.append(PackedTexts(_pack(tokenizer, [r["text"] for r in part], names, max_length),
                               labels))
    return out[0], out[1], f"text {path}: {how}, max_length {max_length}"


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--data text:{path}: cannot read it as UTF-8 text "
                         f"({type(exc).__name__}); pass a plain text file") from None


def _documents(text: str) -> list[str]:
    return [d.strip() for d in _SEPARATOR.split(text) if d.strip()]


def _tokens(tokenizer: Any, docs: list[str]) -> Tensor:
    ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for d in ids:
        stream.extend(d)
        if eos is not None:
            stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


def lm_data(path: str, tokenizer: Any, block_size: int,
            val_fraction: float) -> tuple[TokenBlocks, TokenBlocks, str]:
    """Train and validation :class:`TokenBlocks` of ``text:path`` (module doc)."""
    train_file, val_file = _pair(path, (".txt",), "causal-lm")
    if val_file is not None:
        train_docs, val_docs = _documents(_read_text(train_file)), _documents(_read_text(val_file))
        how = "train.txt / validation.txt"
    else:
        _check_fraction(val_fraction)
        text = _read_text(train_file)
        docs = _documents(text)
        if len(docs) >= 2:
            k = max(2, round(1.0 / val_fraction))
            train_docs = [d for i, d in enumerate(docs) if i % k != k - 1]
            val_docs = [d for i, d in enumerate(docs) if i % k == k - 1]
            how = f"{len(train_docs)} train / {len(val_docs)} val documents (every {k}th)"
        else:
            lines = text.splitlines()
            n_val = max(1, int(round(len(lines) * val_fraction)))
            train_docs = ["\n".join(lines[:-n_val]).strip()]
            val_docs = ["\n".join(lines[-n_val:]).strip()]
            how = f"last {n_val} of {len(lines)} lines held out"
    sets = [TokenBlocks(_tokens(tokenizer, [d for d in docs if d]), block_size)
            for docs in (train_docs, val_docs)]
    for name, s in zip(("training", "validation"), sets):
        if len(s) == 0:
            raise InputError(f"--data text:{path}: the {name} text has {len(s.ids)} token(s), "
                             f"fewer than one block of {block_size} + 1; add text or lower "
                             "--block-size")
    return sets[0], sets[1], (f"text {path}: {how}; blocks of {block_size} tokens: "
                              f"{len(sets[0])} train / {len(sets[1])} val")
