"""Checkpoint files: atomic writes and loads that name what went wrong.

``atomic_save`` writes through a temporary file in the same directory, so the
target is always either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from sparsify_fx.errors import TrainingError


def atomic_save(obj: Any, path: str) -> None:
    """Write ``obj`` to ``path`` through a temporary file: ``path`` is either the old
    checkpoint or the new one, never half of one. TrainingError on a failed write."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise TrainingError(f"cannot write checkpoint {path}: {exc.strerror or exc}; free disk "
                            "space or pass another checkpoint_path (the previous checkpoint, if "
                            "any, is intact)") from exc


def load_checkpoint(path: str) -> dict[str, Any]:
    """A Trainer checkpoint from ``path``; TrainingError when it is missing or corrupt."""
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except FileNotFoundError as exc:
        raise TrainingError(f"checkpoint {path} does not exist; check resume_from") from exc
    except Exception as exc:  # noqa: BLE001 - unpickling a damaged file raises anything
        raise TrainingError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); "
                            "delete it to start over, or resume from an intact one") from exc
    if not isinstance(state, dict) or not {"epoch", "model", "optimizer"} <= set(state):
        raise TrainingError(f"{path} is not a sparsify_fx Trainer checkpoint (written by "
                            "Trainer(checkpoint_path=...)); resume from one of those")
    return state


__all__ = ["atomic_save", "load_checkpoint"]
