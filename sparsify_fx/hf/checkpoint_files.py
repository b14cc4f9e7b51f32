"""What a user points at as a Hugging Face checkpoint: a folder or a GGUF file.

:func:`resolve_checkpoint` turns ``path`` into ``(folder, gguf_file)``:

* a ``save_pretrained`` folder (``config.json`` inside): ``(folder, None)``;
* a ``.gguf`` file: ``(its folder, its name)``;
* a folder holding exactly one ``.gguf`` file and no ``config.json``: that file.

:func:`load_pretrained` loads it with ``AutoModelFor<task>`` (``local_files_only``;
a GGUF file through ``gguf_file=``, de-quantized to float32, which needs the ``gguf``
package) and its tokenizer, in eval mode. The result is an ordinary transformers model:
pruned, it is written back with ``save_pretrained`` as a normal folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify_fx.errors import InputError

#: --task -> the transformers Auto class that loads the checkpoint
AUTO_CLASSES = {"sequence-classification": "AutoModelForSequenceClassification",
                "causal-lm": "AutoModelForCausalLM",
                "image-classification": "AutoModelForImageClassification",
                "feature-extraction": "AutoModel"}


def resolve_checkpoint(path: os.PathLike | str) -> tuple[Path, str | None]:
    """``(folder, gguf file name or None)`` of ``path`` (see the module docs); InputError
    naming what is missing or ambiguous."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise InputError(f"{p}: a checkpoint file must be a .gguf file; otherwise pass the "
                             "save_pretrained folder (config.json, weights, tokenizer)")
        return p.parent, p.name
    if not p.is_dir():
        raise InputError(f"{p}: no such folder or .gguf file; pass a save_pretrained folder "
                         "or a .gguf file")
    if (p / "config.json").is_file():
        return p, None
    ggufs = sorted(q.name for q in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return p, ggufs[0]
    if ggufs:
        raise InputError(f"{p} holds several GGUF files ({', '.join(ggufs)}); pass one of "
                         "them as the path")
    raise InputError(f"{p}: no config.json and no .gguf file in it; write the folder with "
                     "model.save_pretrained(DIR) or pass a .gguf file")


def from_pretrained_options(gguf_file: str | None) -> dict[str, Any]:
    """Keyword options of ``from_pretrained`` for the checkpoint (always local files)."""
    options: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        options.update(gguf_file=gguf_file, dtype=torch.float32)
    return options


def _gguf_ready(gguf_file: str | None) -> None:
    if gguf_file is None:
        return
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise InputError(f"{gguf_file}: loading a GGUF file needs the gguf package; pip "
                         "install 'sparsify-fx[pretrained]' (or gguf accelerate)") from None


def load_pretrained(path: os.PathLike | str, task: str = "causal-lm") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of the checkpoint at ``path`` for ``task`` (a key of
    :data:`AUTO_CLASSES`), model in eval mode, float32 for GGUF. Nothing downloads."""
    if task not in AUTO_CLASSES:
        raise InputError(f"task {task!r}: use one of {', '.join(AUTO_CLASSES)}")
    import transformers
    folder, gguf_file = resolve_checkpoint(path)
    _gguf_ready(gguf_file)
    options = from_pretrained_options(gguf_file)
    auto = getattr(transformers, AUTO_CLASSES[task])
    model = auto.from_pretrained(os.fspath(folder), **options).eval()
    tok_options = {k: v for k, v in options.items() if k != "dtype"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(folder), **tok_options)
    return model, tokenizer


__all__ = ["AUTO_CLASSES", "from_pretrained_options", "load_pretrained", "resolve_checkpoint"]
