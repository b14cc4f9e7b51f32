"""Config fields for a shrunk block found by search (read-only; used by
:func:`~sparsify_fx.passes.shrink.hf_config.update_config`).

The named rules of :mod:`~sparsify_fx.passes.shrink.hf_config` write head counts for
attention and one width field for an MLP. A block of another design (a gated delta
net's value and key heads, sized by ``linear_num_value_heads`` and
``linear_num_key_heads``) has widths the rules do not name. Here the fields that size
the block are found the way :func:`~sparsify_fx.passes.shrink.hf_config.halved_fields`
finds MLP widths (a copy of the config with the field halved changes the block's
parameters along one dim each), and each is scaled by one of the block's kept
fractions; an assignment whose class, built on the meta device, has exactly the
block's shrunk parameter shapes is a candidate. Shapes cannot tell a head count from
a head width, so the caller keeps a candidate only when the class built from it with
the shrunk weights loaded computes what the shrunk model computes. Nothing is written
here.
"""
from __future__ import annotations

import copy
import itertools
import math
from fractions import Fraction
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from sparsify_fx.errors import ShrinkError

#: at most this many fields are scaled together
MAX_SCALED = 3
#: shape-consistent assignments tried (each checked by a reload) before giving up
MAX_CHOICES = 4


def changes_one_dim(dense: tuple, small: tuple | None) -> bool:
    """Whether a shape changed along exactly one dimension (None: the parameter is gone)."""
    return small is not None and len(small) == len(dense) and \
        sum(a != b for a, b in zip(dense, small)) == 1


def class_shapes(hf_model: nn.Module, config: Any) -> dict[str, tuple] | None:
    """Parameter shapes ``type(hf_model)(config)`` would have (built on the meta device),
    None when the class refuses the config."""
    try:
        with torch.device("meta"):
            trial = type(hf_model)(config)
    except Exception:  # noqa: BLE001  any refusal of the config means "cannot hold"
        return None
    return {k: tuple(v.shape) for k, v in trial.state_dict().items()}


def saved_form(config: Any, fields: dict[str, Any]) -> Any | None:
    """A copy of ``config`` with ``fields`` set, as a saved folder gives it back: the
    copy itself, or ``type(config).from_dict(copy.to_dict())`` where that differs (a
    width recomputed from a ratio field at init, Mamba's ``intermediate_size =
    int(expand * hidden_size)``: setting the width is lost, setting the ratio is what
    counts). None when the config refuses a value."""
    trial = copy.deepcopy(config)
    try:
        for attr, value in fields.items():
            setattr(trial, attr, value)
    except Exception:  # noqa: BLE001  a value the config refuses
        return None
    try:
        again = type(config).from_dict(trial.to_dict())
        if again.to_dict() != trial.to_dict() and _round_trips(config):
            return again
    except Exception:  # noqa: BLE001  no round trip to compare with: the copy as set
        pass
    return trial


def _round_trips(config: Any) -> bool:
    """Whether ``config`` itself comes back from ``from_dict(to_dict())`` unchanged (else
    a difference after setting a field says nothing about that field)."""
    return type(config).from_dict(config.to_dict()).to_dict() == config.to_dict()


class BlockSearch:
    """The config probes of one HF model (``hf_path``: its path in the shrunk source
    model; ``blocks``: the shrink's blocks by path), read lazily and cached: parameter
    shapes per set of changed fields, the halved-field probes (``probe``), each block's
    parameter names."""

    def __init__(self, hf_model: nn.Module, hf_path: str, blocks: dict[str, dict],
                 probe: Callable[[nn.Module], Iterable[tuple]]) -> None:
        self.hf_model, self.hf_path, self.blocks, self.probe = hf_model, hf_path, blocks, probe
        self.own = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
        self._built: dict[tuple, dict[str, tuple] | None] = {}
        self._probes: list | None = None

    def names(self, path: str) -> set[str]:
        """Parameter and buffer names (relative to the HF model) under a block's path."""
        if not self.hf_path:
            rel = path
        elif path == self.hf_path:
            rel = ""
        elif path.startswith(self.hf_path + "."):
            rel = path[len(self.hf_path) + 1:]
        else:
            return set()
        return {k for k in self.own if not rel or k.startswith(rel + ".")}

    def block_names(self, key: str, block: dict) -> set[str]:
        """A block's parameter and buffer names: those under its path, but for a group
        tied across layers (a per-head bias shared by every layer: its path is the layer
        list, its weights under ``layers.0``, ``layers.1``, ...) only those of the modules
        holding its weights, not the other blocks of every layer."""
        path = block.get("_path", key)
        names = self.names(path)
        layers = split_by_layer(path, list(block.get("_weights", ())))
        if len(layers) > 1:
            names &= set().union(*(self.names(w.rsplit(".", 2)[0]) for part in layers
                                   for w in part))
        return names

    def built(self, fields: dict[str, Any]) -> dict[str, tuple] | None:
        """Shapes of the class built on the meta device from the config with ``fields``
        set, as saved (:func:`saved_form`; cached); None when the config or the class
        refuses them."""
        key = tuple(sorted(fields.items()))
        if key not in self._built:
            trial = saved_form(self.hf_model.config, fields)
            self._built[key] = None if trial is None else class_shapes(self.hf_model, trial)
        return self._built[key]

    def describes(self, fields: dict[str, Any], names: set[str] | None = None) -> bool:
        """The class built with ``fields`` gives ``names`` the shapes the model has
        (``names`` None: every parameter the model has that the class builds)."""
        built = self.built(fields)
        if built is None:
            return False
        if names is None:
            return all(built.get(k, v) == v for k, v in self.own.items())
        return all(built.get(k) == self.own[k] for k in names)

    def sizing_fields(self, names: set[str]) -> dict[str, int | float]:
        """``{field: value}`` of the integer and float fields whose halving reshapes some
        of ``names``, only parameters of the shrunk blocks (not a residual width reshaping
        embeddings), each along one dim only (a unit width)."""
        allowed = {n for key, block in self.blocks.items()
                   for n in self.block_names(key, block)}
        out = {}
        for attr, value, dense, small in self.probes():
            changed = [k for k, v in dense.items() if small.get(k) != v]
            if changed and set(changed) & names and set(changed) <= allowed and all(
                    changes_one_dim(dense[k], small[k]) for k in changed if k in small):
                out[attr] = value
        return out

    def probes(self) -> list[tuple]:
        """The halved-field probes (cached)."""
        if self._probes is None:
            self._probes = list(self.probe(self.hf_model))
        return self._probes

    def companions(self, ratio: str, value: float, names: set[str]) -> dict[str, int]:
        """Integer fields whose halving alone reshapes nothing but which reshape ``names``
        with the float field ``ratio`` halved too: a round-up multiple (``width =
        round_up(hidden x ratio, multiple)``: at the dense width halving the multiple
        still rounds to it)."""
        base = self.built({ratio: value / 2})
        out = {}
        for attr, other, dense, small in self.probes():
            if isinstance(other, float) or small != dense or base is None:
                continue
            both = self.built({ratio: value / 2, attr: other // 2})
            if both is not None and any(both.get(k) != base.get(k) for k in names):
                out[attr] = other
        return out

    def candidates(self, block: dict, names: set[str], pinned: dict[str, Any]
                   ) -> Iterator[dict[str, int | float]]:
        """Assignments of the fields sizing a block (at most :data:`MAX_SCALED` scaled,
        each by the kept fraction of the block's largest or smallest producer: an integer
        to a whole number, a float exactly; fewer scaled fields first) under which the
        class built from the config (``pinned`` fields set too) gives ``names`` their
        shrunk shapes. A scaled float whose width rounds up past the kept one gets a
        round-up multiple (:meth:`companions`) scaled too (``round_up(f x, f m) = f
        round_up(x, m)``), or set to a divisor of the kept width."""
        fields = self.sizing_fields(names)
        fractions = {Fraction(block["_kept"], block["_total"]),
                     Fraction(block["_kv_kept"], block["_kv_total"])} - {1}
        options = {attr: sorted({value * float(f) if isinstance(value, float) else int(value * f)
                                 for f in fractions if isinstance(value, float) or
                                 (value * f).denominator == 1 and value * f > 0})
                   for attr, value in fields.items()}
        scalable = [a for a in fields if options[a]]
        kept = {block["_kept"], block["_kv_kept"]}
        for size in range(1, min(MAX_SCALED, len(scalable)) + 1):
            for chosen in itertools.combinations(scalable, size):
                for values in itertools.product(*(options[a] for a in chosen)):
                    found = dict(zip(chosen, values))
                    if self.describes({**pinned, **found}, names):
                        yield found
                        continue
                    for ratio in (a for a in chosen if isinstance(fields[a], float)):
                        for attr, m in self.companions(ratio, fields[ratio], names).items():
                            for value in _multiples(m, fractions, kept):
                                if self.describes({**pinned, **found, attr: value}, names):
                                    yield {**found, attr: value}

    def assign(self, named: Callable[[dict], dict[str, Any]], choice: int
               ) -> tuple[dict[str, Any] | None, bool]:
        """One value per config field for every block: the ``named`` rules' fields where
        they give the block its shapes (``named`` may raise ``ShrinkError``: no whole
        value), else the search's (the ``choice``-th candidate of the first block
        searched, the first of the others). Returns ``(fields, searched)``; ``fields`` is
        None when blocks disagree (ragged widths) or a block has no description."""
        fields: dict[str, Any] = {}
        searched = False
        for key, block in self.blocks.items():
            try:
                block_fields: dict[str, Any] | None = named(block)
            except ShrinkError:
                block_fields = None
            names = self.block_names(key, block)
            if block_fields is None or not self.describes({**fields, **block_fields}, names):
                skip = 0 if searched else choice
                block_fields = next(itertools.islice(self.candidates(block, names, fields),
                                                     skip, None), None)
                searched = True
                if block_fields is None:
                    return None, True
            for attr, value in block_fields.items():
                if fields.setdefault(attr, value) != value:
                    return None, searched  # ragged widths
        return fields, searched


def split_by_layer(top: str, weights: list[str]) -> list[list[str]]:
    """``weights`` split by layer when they lie in several entries of a layer list right
    under ``top`` (``top.0.*``, ``top.1.*``: heads tied across layers by a shared bias);
    else ``[weights]``."""
    below = {w[len(top) + 1:].split(".", 1)[0] for w in weights if top and w.startswith(top + ".")}
    if len(below) < 2 or not all(b.isdigit() for b in below):
        return [weights]
    return [[w for w in weights if w.startswith(f"{top}.{b}.")] for b in sorted(below, key=int)]


def _multiples(value: int, fractions: set[Fraction], kept: set[int]) -> list[int]:
    """Values for a round-up multiple ``value`` at the kept widths ``kept``: scaled by a
    kept fraction (whole numbers), the largest common divisor with a kept width, the
    kept width itself (any ratio below it rounds up to it)."""
    out = [int(value * f) for f in fractions if (value * f).denominator == 1 and value * f > 0]
    out += [math.gcd(value, w) for w in kept if w > 0] + [w for w in kept if w > 0]
    return list(dict.fromkeys(v for v in out if v != value))


__all__ = ["MAX_SCALED", "MAX_CHOICES", "BlockSearch", "class_shapes", "changes_one_dim",
           "saved_form", "split_by_layer"]
