"""Checks of a capture shrunk into its source class (read-only unless said):

* :func:`check_against_capture`: the shrunk model equals the hard-masked capture on the
  example inputs (``ShrinkError`` naming why not);
* :func:`retry_widths`: after a failed check, the owner attributes that may hold a
  group's width or unit count set to the kept value, the smallest subset that makes the
  check pass (mutates the shrunk model);
* :func:`reload_check`: whether the source class built from a config, with the shrunk
  weights loaded, computes what the capture does (what ``from_pretrained`` of a saved
  folder would give);
* :func:`failing_groups` / :func:`cannot_hold_error`: after a failed check, the cut channel
  groups that cause it (the modules on the failure's traceback, then one group at a
  time), named on the :class:`ShrinkError` with the fix (``exclude=exc.exclude``).
"""
from __future__ import annotations

import inspect
import itertools
from types import TracebackType
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from sparsify_fx.errors import ShrinkError
from sparsify_fx.mask_index import hard_masks, main_graph

from sparsify_fx.passes.channels.couple import GROUP_PREFIX
from sparsify_fx.passes.channels.graph_types import ChannelGraph

#: up to this many attribute names, every subset is tried (each a forward pass)
MAX_RETRY_NAMES = 8
#: with more names, the subsets of up to this many are tried
MAX_RETRY_SUBSET = 3
#: rounds of "keep the groups in the module that raised whole, shrink again"
MAX_TRACE_ROUNDS = 4
#: with up to this many cut groups, each is tried alone when the traceback names none
MAX_ALONE = 32


def set_widths(src: nn.Module, blocks: dict, which: int,
                names: set[str] | None = None) -> None:
    """Every block's other width attributes (those called one of ``names``; None: all) at
    their old (``which=0``) or new value (1)."""
    for block in blocks.values():
        for key, values in block.get("_extra", {}).items():
            path, _, attr = key.partition(":")
            if names is None or attr in names:
                setattr(src.get_submodule(path) if path else src, attr, values[which])


def retry_widths(exported: nn.Module, src: nn.Module, blocks: dict, inputs: Any,
                  error: ShrinkError) -> None:
    """After the shrunk model failed its check (``error``): set the owner attributes
    holding a group's whole width or unit count (``to_source._other_widths``) to the kept
    value and check again: every subset of the attribute names, the smallest first, so
    only what the code reads changes (a module may hold another number equal to the
    width by chance, e.g. a kernel size of 4 beside a rank of 4; over
    :data:`MAX_RETRY_NAMES` names: all, the subsets of up to :data:`MAX_RETRY_SUBSET`, then all
    but one); kept when the
    model then equals the hard-masked capture, else undone and ``error`` raised."""
    names = sorted({key.partition(":")[2] for b in blocks.values() for key in b.get("_extra", {})})
    if inputs is None or not names:
        raise error
    options: list[set[str] | None] = [None]
    if 1 < len(names) <= MAX_RETRY_NAMES:  # every subset, the smallest first
        options = [set(c) for size in range(1, len(names) + 1)
                   for c in itertools.combinations(names, size)]
    elif len(names) > 1:  # subsets of up to MAX_RETRY_SUBSET names, then all but one
        options += [set(c) for size in range(1, MAX_RETRY_SUBSET + 1)
                    for c in itertools.combinations(names, size)]
        options += [set(names) - {name} for name in names]
    for chosen in options:
        set_widths(src, blocks, 1, chosen)
        try:
            check_against_capture(exported, src, inputs)
            return
        except ShrinkError:
            set_widths(src, blocks, 0, chosen)
    raise error from None


def outputs_of(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in outputs_of(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in outputs_of(o)]
    return []


def by_name(model: nn.Module, small: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The capture's positional example inputs as keywords of the source class (named as
    the capture's inputs): a keyword input the capture took positionally may sit at
    another position of the source ``forward`` (``attention_mask`` after
    ``past_key_values``)."""
    gm = main_graph(model)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"] if gm is not None else []
    try:
        accepted = inspect.signature(small.forward).parameters
    except (TypeError, ValueError):
        return args, kwargs
    if not args or len(names) != len(args) or not all(n in accepted for n in names):
        return args, kwargs
    return (), {**dict(zip(names, args)), **kwargs}


def check_against_capture(model: nn.Module, small: nn.Module, inputs: Any) -> None:
    if inputs is None:
        return
    args, kwargs = (inputs.args, inputs.kwargs) if hasattr(inputs, "kwargs") else (tuple(inputs), {})
    was = model.training
    model.eval()
    small.eval()
    small_args, small_kwargs = by_name(model, small, args, kwargs)
    try:
        with torch.no_grad(), hard_masks(model):
            ref = outputs_of(model(*args, **kwargs))
            got = outputs_of(small(*small_args, **small_kwargs))
    except (RuntimeError, IndexError, ValueError) as exc:  # a width read from an attribute
        err = ShrinkError(f"the shrunk {type(small).__name__} does not run on the example inputs "
                          f"({exc}); its code reads a width this shrink does not update")
        err.raised_in = modules_on_traceback(small, exc.__traceback__)  # type: ignore[attr-defined]
        raise err from exc
    finally:
        model.train(was)
    for a, b in zip(ref, got):
        scale = float(a.abs().max()) if a.numel() else 0.0
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1.0)):
            err = ShrinkError(f"the shrunk {type(small).__name__} differs from the hard-masked "
                              "capture; its code reads a width this shrink does not update")
            err.raised_in = ()  # type: ignore[attr-defined]  # from the check, no module
            raise err


def reload_check(model: nn.Module, src: nn.Module, inputs: Any) -> Callable[[Any], bool] | None:
    """``check(config)``: the class of ``src`` built from ``config`` with ``src``'s
    weights and buffers loaded computes what the hard-masked capture ``model`` does on
    the example inputs (what ``from_pretrained`` of a saved folder would give); None
    when there are no inputs or the config sits below the model's top."""
    if inputs is None or not hasattr(getattr(src, "config", None), "to_dict"):
        return None

    def check(config: Any) -> bool:
        try:
            with torch.device("meta"):
                fresh = type(src)(config)
            params = dict(src.named_parameters())
            loaded = fresh.load_state_dict(
                {k: v for k, v in src.state_dict().items() if k in params}, strict=False,
                assign=True)
            if loaded.unexpected_keys:
                return False
            buffers, own = dict(src.named_buffers()), None
            for name, buf in list(fresh.named_buffers()):
                if buf.is_meta:  # buffers are the shrunk model's own (rotary inv_freq)
                    mine = buffers.get(name)
                    owner, _, attr = name.rpartition(".")
                    module = fresh.get_submodule(owner) if owner else fresh
                    if (mine is None or mine.shape != buf.shape) and \
                            attr in module._non_persistent_buffers_set:
                        # no checkpoint holds it: from_pretrained builds it as the class does
                        own = own or dict(type(src)(config).named_buffers())
                        mine = own.get(name)
                    if mine is None or mine.shape != buf.shape:
                        return False
                    module._buffers[attr] = mine.clone()
            if any(t.is_meta for t in [*fresh.parameters(), *fresh.buffers()]):
                return False
            check_against_capture(model, fresh, inputs)
        except Exception:  # noqa: BLE001  a config that does not rebuild this model
            return False
        return True

    return check


def modules_on_traceback(small: nn.Module, tb: TracebackType | None) -> tuple[str, ...]:
    """Paths of ``small``'s modules whose code is on the traceback ``tb`` (a frame whose
    ``self`` is one of them), the outermost first."""
    paths = {id(m): p for p, m in small.named_modules()}
    out: list[str] = []
    while tb is not None:
        path = paths.get(id(tb.tb_frame.f_locals.get("self")))
        if path is not None and (not out or out[-1] != path):
            out.append(path)
        tb = tb.tb_next
    return tuple(out)


def _weights(cg: ChannelGraph, index: int) -> list[str]:
    """Producer weights of group ``index`` (what ``transform``'s ``exclude`` keeps whole)."""
    group = next(g for g in cg.groups if g.index == index)
    return [cg.producers[p].weight for p in group.producers
            if cg.producers[p].kind in ("linear", "conv", "experts")]


def _in_modules(cg: ChannelGraph, source: nn.Module, raised_in: tuple[str, ...],
                cut: list[int]) -> dict[int, frozenset[str]]:
    """The groups with a producer weight inside the innermost module on the traceback
    that holds a cut group's, or inside any module of that module's type (every layer
    runs the same code), each with its role: its weights' names inside that module.
    Empty when only the model's root holds one."""
    for path in reversed(raised_in):
        if not path or not any(w.startswith(path + ".") for g in cut for w in _weights(cg, g)):
            continue
        kind = type(source.get_submodule(path))
        same = [p + "." for p, m in source.named_modules() if p and type(m) is kind]
        out: dict[int, frozenset[str]] = {}
        for group in cg.groups:
            for p in same:
                role = frozenset(w[len(p):] for w in _weights(cg, group.index) if w.startswith(p))
                if role:
                    out[group.index] = role
                    break
        return out
    return {}


def failing_groups(build: Callable[[np.ndarray], nn.Module], source: nn.Module,
                   cg: ChannelGraph, keep_id: np.ndarray, error: ShrinkError) -> list[int]:
    """The groups whose cut makes the shrink fail its check (``error``), by index: those
    in the module that raised and in the modules of its type, cut or not (each layer
    runs the same code), kept whole and shrunk again (``build(keep_id)``), for up to
    :data:`MAX_TRACE_ROUNDS` rounds; then the roles (a group's weight names in its module)
    whose cut groups the model holds are dropped again. Without a module: each cut group
    alone (up to :data:`MAX_ALONE`). Returned only when ``build`` with them whole passes;
    else empty."""
    member = {g.index: np.isin(cg.component, g.components) for g in cg.groups}
    cut = [g.index for g in cg.groups if not keep_id[member[g.index]].all()]

    def fails(whole: set[int]) -> BaseException | None:
        keep = keep_id.copy()
        for g in whole:
            keep[member[g]] = True
        try:
            build(keep)
        except Exception as exc:  # noqa: BLE001  any failure of the shrunk model
            return exc
        return None

    roles: dict[int, frozenset[str]] = {}
    err: BaseException | None = error
    for _ in range(MAX_TRACE_ROUNDS):
        new = {g: r for g, r in _in_modules(cg, source, getattr(err, "raised_in", ()),
                                            cut).items() if g not in roles}
        if not new:
            break
        roles.update(new)
        err = fails(set(roles))
        if err is None:
            return _fewest_roles(roles, set(cut), fails)
    if not cut or len(cut) > MAX_ALONE:
        return []
    alone = [g for g in cut if fails(set(cut) - {g}) is not None]
    return alone if alone and fails(set(alone)) is None else []


def _fewest_roles(roles: dict[int, frozenset[str]], cut: set[int],
                  fails: Callable[[set[int]], BaseException | None]) -> list[int]:
    """``roles``' groups without each role whose groups may be cut (the model runs with
    them cut, at least one of them cut now); a role none of whose groups is cut stays."""
    whole = set(roles)
    for role in dict.fromkeys(roles.values()):
        mine = {g for g, r in roles.items() if r == role}
        if len(mine) < len(whole) and mine & cut and fails(whole - mine) is None:
            whole -= mine
    return sorted(whole)


def cannot_hold_error(error: ShrinkError, cg: ChannelGraph, found: list[int]) -> ShrinkError:
    """``error`` with the groups ``found`` named (``groups``, ``exclude``) and the fix."""
    if not found:
        return ShrinkError(f"{error}. No set of cut channel groups found that the class can "
                           "hold; keep the groups its code reshapes by a fixed width whole "
                           "(transform(model, ..., exclude=[their producer weights]))")
    keys = tuple(f"{GROUP_PREFIX}{g}" for g in found)
    weights = tuple(w for g in found for w in _weights(cg, g))
    named = ", ".join(f"{k} ({_weights(cg, g)[0]}{', ...' if len(_weights(cg, g)) > 1 else ''})"
                      for k, g in zip(keys, found))
    where = getattr(error, "raised_in", ())[-1:]
    named += f" (raised in {where[0]})" if where and where[0] else ""
    out = ShrinkError(
        f"{error}. The cut channel groups it cannot hold: {named}. Keep them whole and cut "
        f"again: transform(model, ..., exclude=exc.exclude) (their {len(weights)} producer "
        "weights), apply_budget at the same target, shrink; the groups kept whole then take "
        "their share of the budget (docs/transformers.md)")
    out.groups, out.exclude = keys, weights
    return out


__all__ = ["check_against_capture", "retry_widths", "reload_check", "set_widths", "outputs_of",
           "by_name", "modules_on_traceback", "failing_groups", "cannot_hold_error",
           "MAX_RETRY_NAMES", "MAX_RETRY_SUBSET", "MAX_TRACE_ROUNDS", "MAX_ALONE"]
