"""OUTDIR of ``sparsify-fx prune``: what it holds, the recipe guard, atomic writes.

Layout: ``recipe.toml`` (the run's identity, written first), ``checkpoints/``
(``train.pt``, ``cut.pt``, ``finetune.pt``, ``final.pt``: resume points), then
the outputs ``model.pt``, ``report.md``, ``report.json``, ``sparsity.png``,
``model.onnx``, ``hf/`` (``hf:DIR`` runs: the ``save_pretrained`` folder),
``decoder.onnx`` (``--task causal-lm``: the decoder with past key/values) and,
last, ``summary.json`` (its presence means complete).
Outputs are staged in ``.staging/`` and moved in with ``os.replace``, so no
output is ever half-written. Only these names are ever removed.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from sparsify_fx.errors import InputError
from sparsify_fx.prune.recipe import identity, normalise, read_toml, to_toml

OUTPUTS = ("model.pt", "report.md", "report.json", "sparsity.png", "model.onnx", "summary.json")
#: written only when the recipe asks for it (``quantize``)
INT8_FILE = "model_int8.onnx"
#: written by hf:DIR runs: the pruned model as its Hugging Face class (save_pretrained)
HF_FOLDER = "hf"
#: written by hf:DIR --task causal-lm runs: the ONNX decoder with past key/values
DECODER_FILE = "decoder.onnx"
RECIPE, CHECKPOINTS, STAGING = "recipe.toml", "checkpoints", ".staging"


class OutDir:
    """One run's folder; ``prepare`` enforces the recipe guard before anything is written."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def checkpoint(self, name: str) -> Path:
        return self.path / CHECKPOINTS / name

    @property
    def complete(self) -> bool:
        return self.file("summary.json").is_file()

    def _ours(self) -> set[str]:
        return {RECIPE, CHECKPOINTS, STAGING, INT8_FILE, HF_FOLDER, DECODER_FILE, *OUTPUTS}

    def prepare(self, recipe: dict[str, Any], overwrite: bool, writer: bool) -> bool:
        """Check OUTDIR against ``recipe``; returns True when resuming an existing run.

        Refuses (InputError) an OUTDIR holding another recipe unless ``overwrite``
        (which starts afresh, removing only this layout's names), and a non-empty folder that is
        not a prune OUTDIR. ``writer=False`` (torchrun ranks > 0) only checks.
        """
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"-o {self.path} is a file; pass a folder for the outputs")
        existing = set(os.listdir(self.path)) if self.path.is_dir() else set()
        resuming = False
        if existing and RECIPE not in existing:
            raise InputError(f"-o {self.path} is a non-empty folder that `sparsify-fx prune` did "
                             "not create; pass a new or empty folder")
        if RECIPE in existing:
            old = normalise(read_toml(str(self.file(RECIPE))), f"{self.file(RECIPE)}")
            diff = sorted(k for k, v in identity(recipe).items() if identity(old).get(k) != v)
            if diff and not overwrite:
                shown = ", ".join(f"{k}: {identity(old).get(k)!r} -> {recipe.get(k)!r}"
                                  for k in diff)
                raise InputError(f"-o {self.path} holds a run with another recipe ({shown}); "
                                 "pass --overwrite to replace it, or pick another folder")
            resuming = not diff and not overwrite
        if not writer:
            return resuming
        if existing and not resuming:
            for name in existing & self._ours():
                target = self.file(name)
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / CHECKPOINTS).mkdir(exist_ok=True)
        self._clean_temporaries()
        if not resuming:
            write_atomic(self.file(RECIPE), lambda p: p.write_text(to_toml(recipe)))
        return resuming

    def _clean_temporaries(self) -> None:
        """Drop what a killed run may have left: the staging folder, *.tmp files."""
        shutil.rmtree(self.path / STAGING, ignore_errors=True)
        for folder in (self.path, self.path / CHECKPOINTS):
            for p in folder.glob("*.tmp*"):
                p.unlink(missing_ok=True)

    def staging(self) -> Path:
        stage = self.path / STAGING
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        return stage

    def publish(self, stage: Path, names: list[str]) -> None:
        """Move staged outputs in (``summary.json`` last), then drop the staging folder."""
        for name in sorted(names, key=lambda n: n == "summary.json"):
            if (stage / name).is_dir() and self.file(name).is_dir():
                shutil.rmtree(self.file(name))  # a folder left by a run killed while publishing
            os.replace(stage / name, self.file(name))
        shutil.rmtree(stage, ignore_errors=True)


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then rename onto ``path``: readers see the old file or the new one."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj: Any, path: Path) -> None:
    write_atomic(path, lambda p: torch.save(obj, p))
