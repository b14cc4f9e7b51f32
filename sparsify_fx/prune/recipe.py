"""The recipe of ``sparsify-fx prune``: every key, its type, default and help, in one table.

A recipe is a TOML file whose keys are the long option names (``-`` or ``_``
both accepted: ``target-sparsity`` = ``target_sparsity``). Precedence:
defaults < recipe file < command-line flags. :func:`load_recipe` raises
:class:`~sparsify_fx.errors.ConfigError` for an unknown key or a wrong type,
listing the valid keys. :func:`to_toml` writes the effective recipe back.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Mapping

from sparsify_fx.errors import ConfigError, InputError


@dataclass(frozen=True)
class Key:
    """One recipe key: ``kind`` is str, int, float, bool or list (of str)."""

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    identity: bool = True  # part of what a run IS (a different value refuses an existing OUTDIR)


METHODS = ("cs", "magnitude", "gmp", "imp", "l0", "ste", "random", "wanda", "sparsegpt")
#: methods that cut by calibration (one-shot, no mask training): the training phase calibrates
CALIBRATED = ("wanda", "sparsegpt")

KEYS: tuple[Key, ...] = (
    Key("model", str, None, "MODEL: torchvision:<name>, package.module:factory or hf:DIR"),
    Key("weights", str, None, "state_dict file loaded into MODEL (torch.load weights_only=True)"),
    Key("data", str, None, "DATA: digits, mnist:DIR, imagefolder:DIR, package.module:function "
        "or (hf: models) text:FILE"),
    Key("task", str, None, "hf:DIR models: sequence-classification, causal-lm or "
        "image-classification (the AutoModelFor<Task> class loaded)"),
    Key("method", str, "cs", "pruning method", METHODS),
    Key("granularity", str, "element", "element: fold; channel: shrink to a smaller model; "
        "N:M (2:4, 4:8): keep n of every m input weights (the target is 1 - n/m)",
        ("element", "channel", "2:4", "4:8")),
    Key("calibration_samples", int, 128, "wanda / sparsegpt: training samples (blocks or "
        "images) the one-shot cut calibrates on"),
    Key("target_sparsity", float, None, "fraction of masked weights set to zero, in [0, 1)"),
    Key("target_macs", float, None, "fraction of the masked layers' dense MACs to keep, in (0, 1]"),
    Key("target_latency", float, None, "fraction of the dense onnxruntime latency to keep, in "
        "(0, 1] (cs with granularity channel)"),
    Key("quantize", str, None, "also write model_int8.onnx, verified: int8 (static QDQ, "
        "activations calibrated on 8 training batches) or dynamic (weights only)",
        ("int8", "dynamic")),
    Key("cs_start", str, None, "cs with granularity channel: scores start all kept "
        "(uniform) or from the one-shot L1 channel cut at the target (l1; best for a "
        "pretrained model, see docs/cs.md); default: l1 for hf: models with a sparsity or "
        "MACs target, else uniform", ("uniform", "l1")),
    Key("epochs", int, 10, "training epochs (masks learned or scheduled)"),
    Key("finetune_epochs", int, 5, "epochs with the mask fixed after the exact cut"),
    Key("lr", float, 0.05, "learning rate of the weights (SGD, momentum 0.9)"),
    Key("finetune_lr", float, 0.01, "learning rate of the fine-tuning epochs"),
    Key("mask_lr", float, 0.01, "learning rate of mask scores (Adam; cs, l0, ste)"),
    Key("batch_size", int, 64, "training batch size (per process under torchrun)"),
    Key("weight_decay", float, 1e-4, "weight decay of the weights (not of mask scores)"),
    Key("include", list, [], "globs over weight names or module paths to prune (default all)"),
    Key("exclude", list, [], "globs over weight names or module paths to leave dense"),
    Key("keep_first", bool, False, "leave the first prunable weight dense"),
    Key("keep_last", bool, False, "leave the last prunable weight dense"),
    Key("seed", int, 0, "seed of the model init, data split and data order"),
    Key("device", str, "cpu", "torch device: cpu, cuda or cuda:N"),
    Key("val_fraction", float, 0.1, "imagefolder:DIR without train/ and val/: held-out share"),
    Key("image_size", int, 224, "imagefolder:DIR: crop size of the standard transforms"),
    Key("max_length", int, None, "sequence-classification: tokens kept per text (default 128, "
        "at most the model's positions); batches are padded to their longest text"),
    Key("block_size", int, None, "causal-lm: tokens per training block (default 128, at most "
        "the model's positions)"),
    Key("threads", int, None, "torch CPU threads (default: torch's choice)", identity=False),
)
BY_NAME = {k.name: k for k in KEYS}


def _valid_keys() -> str:
    return ", ".join(k.name for k in KEYS)


def check_value(name: str, value: Any, where: str) -> Any:
    """``value`` converted to key ``name``'s type; ConfigError naming ``where`` otherwise."""
    key = BY_NAME[name]
    if value is None:
        return None
    ok: bool
    if key.kind is bool:
        ok = isinstance(value, bool)
    elif key.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif key.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = math.isfinite(value)
    elif key.kind is list:
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        kind = "list of strings" if key.kind is list else key.kind.__name__
        raise ConfigError(f"{where}: {name} must be a {kind}, got {type(value).__name__} "
                          f"{value!r}")
    if key.choices and value not in key.choices:
        raise ConfigError(f"{where}: {name} = {value!r} is not one of {', '.join(key.choices)}")
    return value


def normalise(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Keys with ``-`` -> ``_``, each checked; unknown keys raise, listing the valid ones."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        key = str(name).replace("-", "_")
        if key not in BY_NAME:
            close = difflib.get_close_matches(key, list(BY_NAME), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {name!r}{hint}; valid keys: {_valid_keys()}")
        if isinstance(value, dict):
            raise ConfigError(f"{where}: [{name}] tables are not recipe keys; write flat "
                              f"`key = value` lines with keys from: {_valid_keys()}")
        out[key] = check_value(key, value, where)
    return out


def read_toml(path: str) -> dict[str, Any]:
    """Parse ``path`` with tomllib (tomli on Python 3.10)."""
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError("reading a TOML recipe on Python 3.10 needs tomli; "
                              "pip install tomli, or use Python >= 3.11") from None
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise InputError(f"recipe {path!r} not found; pass the path of a .toml file") from None
    except OSError as exc:
        raise InputError(f"cannot read recipe {path!r} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path!r} is not valid TOML ({exc}); fix that line") from None


def load_recipe(path: str | None, flags: Mapping[str, Any]) -> dict[str, Any]:
    """Effective recipe: defaults < file at ``path`` < ``flags`` (None means not given)."""
    recipe = {k.name: (list(k.default) if isinstance(k.default, list) else k.default)
              for k in KEYS}
    if path is not None:
        recipe.update(normalise(read_toml(path), f"recipe {path}"))
    given = {k: v for k, v in flags.items() if v is not None}
    recipe.update(normalise(given, "command line"))
    return recipe


def identity(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The keys that define a run (an existing OUTDIR must match them to be resumed)."""
    return {k.name: recipe.get(k.name) for k in KEYS if k.identity}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def to_toml(recipe: Mapping[str, Any]) -> str:
    """The recipe as TOML (unset keys commented out), readable back by :func:`load_recipe`."""
    lines = ["# sparsify-fx prune recipe (keys = long option names)"]
    for key in KEYS:
        value = recipe.get(key.name)
        if value is None:
            lines.append(f"# {key.name} =   # {key.help}")
        else:
            lines.append(f"{key.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
