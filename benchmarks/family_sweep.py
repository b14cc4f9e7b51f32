"""The structured path on every model family the installed transformers ships (issue 34).

For every ``*ForCausalLM`` class in ``dir(transformers)`` (and every
``*ForSequenceClassification`` class of a family without a causal LM: the encoders)
a tiny random config is built generically from the class's own ``config_class``
(hidden 64, 2 layers, 4 heads, 2 KV heads where the config has the field, head_dim
16, small MLP / experts, vocabulary >= every special-token id, no cache). Then the
steps of ``tests/test_structured_export.py``:

1. ``transform(method="cs", granularity="channel", target_macs=0.5,
   example_inputs=..., capture="export")`` (dynamic batch and length);
2. random CS scores, the exact cut ``apply_budget(target_macs=0.5, scores=...)``;
3. ``shrink`` into the source class;
4. parity with the hard-masked model at a new batch and length (after checking the
   output follows the input);
5. decoders: greedy ``generate()`` of the shrunk model equals that of
   ``fold_to_source`` (the hard-masked model as the source class);
6. a uniform cut (``uniform=True``), ``shrink``, ``save_pretrained``,
   ``from_pretrained``: equal outputs; or refused before anything is written.

Each family ends in ``pass``, ``fail:<step>`` (with the error), or ``skipped`` (the
config cannot be built generically, or the model does not run as built). One row per
family: result, params fraction (shrunk / dense), blocks' MACs fraction (``report``),
reason. Rows are appended to ``<out>.jsonl`` as they finish (a rerun skips families
already there unless ``--fresh``); the table goes to ``<out>.json`` / ``<out>.md``.

    python benchmarks/family_sweep.py [--only Llama Qwen2] [--timeout 300] [--fresh]
        [--report-only] [--out benchmarks/results/family_sweep]

``--only`` reruns those families and their rows replace the old ones; every run that
ran families appends its command and wall time to ``<out>.runs.jsonl``, listed in the
markdown.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

import torch

from family_configs import (FALLBACK_TARGETS, TARGET, build_family, families,  # noqa: F401
                            make_inputs, run_logits, tiny_config)
from family_table import markdown, outcome, summarize  # noqa: F401


class FamilyTimeout(BaseException):
    """A family ran past its time limit (no `except Exception` in the path swallows it)."""


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = float((a - b).abs().max())
    scale = max(1.0, float(b.abs().max()))
    if not diff <= tol * scale:
        raise AssertionError(f"{what}: max abs diff {diff:.2e}")


def _generate(model: Any, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False,
                              pad_token_id=0)


def _warn_text(caught: list) -> str:
    """The first coupling / whole-kept warning, shortened."""
    for w in caught:
        name = type(w.message).__name__
        if "Coupling" in name or "whole" in str(w.message):
            return f"{name}: {str(w.message)[:240]}"
    return ""


def run_family(family: str, class_name: str, kind: str, seed: int = 0) -> dict[str, Any]:
    """One family through every step (see module doc); a row of the table."""
    import transformers
    from torch.export import Dim

    import sparsify_fx as sf
    from sparsify_fx.budgets.exact_cut import apply_budget
    from sparsify_fx.errors import SparsifyError
    from sparsify_fx.passes.channels.couple import group_masks
    from sparsify_fx.passes.shrink.to_source import fold_to_source

    row: dict[str, Any] = {"family": family, "class": class_name, "kind": kind, "result": "skipped",
                           "params_fraction": None, "blocks_macs_fraction": None, "reason": "",
                           "checks": {}}
    step = "config"
    try:
        model_class = getattr(transformers, class_name)
        model, config, x, vocab = build_family(model_class, kind, seed, row)
        if model is None:
            return row
        spec = {0: Dim.AUTO, 1: Dim.AUTO}
        dynamic = {k: spec for k in x} if kind == "cls" else (spec,)
        mask = isinstance(x, dict) and "attention_mask" in x
        options = dict(method="cs", granularity="channel", target_macs=0.5, example_inputs=x,
                       capture="export")
        step = "transform"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                gm = sf.transform(model, dynamic_shapes=dynamic, **options)
                row["dynamic"] = True
            except Exception:  # noqa: BLE001  static capture instead
                gm = sf.transform(model, **options)
                row["dynamic"] = False
        row["warning"] = _warn_text(caught)
        groups = group_masks(gm)
        row["groups"] = len(groups)
        step = "cut"
        g = torch.Generator().manual_seed(seed + 1)
        scores = {k: torch.rand(m.score_shape, generator=g) for k, m in groups.items()}
        gm.eval()
        row["target"] = _cut(gm, scores, groups, row)
        rep = sf.report(gm, x)
        if rep.blocks is not None:
            row["blocks_macs_fraction"] = round(float(rep.blocks["fraction"]), 4)
        step = "shrink"
        gm, small, options = _shrink(model, gm, options, dynamic if row["dynamic"] else None,
                                     seed, row)
        if "shrink_excluded" in row:
            rep = sf.report(gm, x)
            if rep.blocks is not None:
                row["blocks_macs_fraction"] = round(float(rep.blocks["fraction"]), 4)
        dense_n = sum(p.numel() for p in model.parameters())
        row["params_fraction"] = round(sum(p.numel() for p in small.parameters()) / dense_n, 4)
        step = "parity"
        xb, other = (make_inputs(kind, vocab, 3, 11, seed=1, mask=mask),
                     make_inputs(kind, vocab, 3, 11, seed=2, mask=mask))
        with torch.no_grad():
            ref, ref_other = _hard_masked(gm, xb), _hard_masked(gm, other)
            if not float((ref - ref_other).abs().max()) > 1e-4:
                raise AssertionError("the hard-masked output does not follow the input")
            _close(run_logits(small, xb), ref, "shrunk vs hard-masked")
        row["checks"]["parity"] = True
        if kind == "lm":
            step = "generate"
            prompt = make_inputs("lm", vocab, 1, 6, seed=3)[0]
            try:
                _generate(model, prompt)
            except Exception as exc:  # noqa: BLE001  the class's generate() needs more inputs
                row["reason"] = (f"generate() of the dense model fails as built: "
                                 f"{type(exc).__name__}: {str(exc)[:160]}")
                row["result"] = "skipped"
                return row
            want = _generate(fold_to_source(gm).eval(), prompt)
            got = _generate(small, prompt)
            if not torch.equal(got, want):
                raise AssertionError(f"generate() differs: {got.tolist()} vs {want.tolist()}")
            row["checks"]["generate"] = True
        step = "uniform_save"
        row["checks"]["uniform_save"] = _uniform_save(model, gm, x, kind, vocab, options,
                                                      dynamic if row["dynamic"] else None, seed,
                                                      row["target"], mask)
        saved = row["checks"]["uniform_save"]
        row["result"] = "pass" if saved is True or str(saved).startswith("after exclude") \
            else "pass (save refused)"
        if row["target"] != TARGET:  # 0.5 was out of reach: the BudgetError is the reason
            row["result"] = f"{row['result']} at target {row['target']}"
        row["reason"] = row.get("budget_error") or row.get("warning", "")
        if "shrink_excluded" in row:
            row["reason"] = f"{row['shrink_reason']}; {row['reason']}".rstrip("; ")
    except FamilyTimeout:
        row["result"], row["reason"] = f"fail:{step}", "timed out"
    except Exception as exc:  # noqa: BLE001  every failure is a row of the table
        if step == "config":
            row["reason"] = str(exc)[:300]
            return row
        row["result"] = f"fail:{step}"
        row["named"] = isinstance(exc, SparsifyError)  # a named refusal, not a wrong output
        row["reason"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if "shrink_reason" in row:  # the failure came after keeping groups whole
            row["reason"] = f"{row['shrink_reason']}; then {row['reason']}"
        row["traceback"] = traceback.format_exc(limit=-4)[-1500:]
    return row


def _shrink(model: Any, gm: Any, options: dict, dynamic: Any, seed: int,
            row: dict) -> tuple[Any, Any, dict]:
    """``shrink(gm)``; when it names cut groups the source class cannot hold
    (``ShrinkError.exclude``), the documented fix: transform again with those producer
    weights excluded, the same kind of random scores, the exact cut, shrink (up to two
    rounds). Returns the model shrunk, its capture and the options used; the groups kept
    whole go to ``row["shrink_excluded"]``."""
    import sparsify_fx as sf
    from sparsify_fx.errors import ShrinkError
    from sparsify_fx.passes.channels.couple import group_masks
    for attempt in range(3):
        try:
            return gm, sf.shrink(gm).eval(), options
        except ShrinkError as exc:
            if not exc.exclude or attempt == 2:
                raise
            row.setdefault("shrink_excluded", []).extend(exc.exclude)
            row.setdefault("shrink_groups", []).append(list(exc.groups))  # keys of that capture
            why = str(exc).split("; its code")[0].rpartition(" (")[2].rstrip(")")
            row["shrink_reason"] = (
                f"kept whole for shrink (exclude): {len(row['shrink_excluded'])} producer weights "
                f"of {sum(map(len, row['shrink_groups']))} groups, e.g. "
                f"{row['shrink_excluded'][0]} (the class's code reads their width: {why[:100]})")
            options = dict(options, exclude=[*options.get("exclude", ()), *exc.exclude])
            extra = {} if dynamic is None else {"dynamic_shapes": dynamic}
            gm = sf.transform(model, **options, **extra).eval()
            g = torch.Generator().manual_seed(seed + 1)
            groups = group_masks(gm)
            scores = {k: torch.rand(m.score_shape, generator=g) for k, m in groups.items()}
            row["groups"] = len(groups)
            row.pop("budget_error", None)  # the cut again: its own
            row["target"] = _cut(gm, scores, groups, row)
    raise AssertionError("unreachable")


def _cut(gm: Any, scores: dict, groups: dict, row: dict) -> float:
    """The exact cut at :data:`TARGET`; when channels kept whole put it out of reach
    (``BudgetError``, kept in ``row["budget_error"]``), the first of :data:`FALLBACK_TARGETS`
    that can be met, so the rest of the path is still checked. Returns the target met."""
    from sparsify_fx.budgets.exact_cut import apply_budget
    from sparsify_fx.errors import BudgetError
    try:
        apply_budget(gm, target_macs=TARGET, scores=scores)
        return TARGET
    except BudgetError as exc:
        if not groups:
            raise
        row["budget_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        for target in FALLBACK_TARGETS:
            try:
                apply_budget(gm, target_macs=target, scores=scores)
                return target
            except BudgetError:
                continue
        raise

def _uniform_save(model: Any, gm: Any, x: Any, kind: str, vocab: int, options: dict,
                  dynamic: Any, seed: int, first: float = TARGET,
                  mask: bool = True) -> bool | str:
    """A uniform cut, shrink, save + reload equal (True); when the save is refused (the
    config cannot describe the widths), the documented fix: transform again with
    ``exclude=config_cannot_hold(gm)``, uniform cut, save + reload ("after exclude"); a
    refusal of that too is returned as text. A folder written but not reloading raises.
    The uniform cut is at ``first`` (the target the exact cut met), or the next fallback
    target that can be met (one width per layer kind can put it out of reach)."""
    import sparsify_fx as sf
    from sparsify_fx.budgets.exact_cut import apply_budget
    from sparsify_fx.errors import SparsifyError
    from sparsify_fx.passes.channels.couple import group_masks
    from sparsify_fx.passes.shrink.to_source import config_cannot_hold
    refused = ""
    for attempt in ("uniform", "after exclude"):
        if attempt == "uniform":
            uni = copy.deepcopy(gm)
        else:
            exclude = config_cannot_hold(gm)
            if not exclude:
                return refused
            extra = {} if dynamic is None else {"dynamic_shapes": dynamic}
            exclude = [*options.get("exclude", ()), *exclude]  # with what shrink kept whole
            uni = sf.transform(model, **{**options, "exclude": exclude}, **extra).eval()
            if not group_masks(uni):
                return f"[no group the config can hold] {refused}"[:300]
        g = torch.Generator().manual_seed(seed + 2)
        scores = {k: torch.rand(m.score_shape, generator=g) for k, m in group_masks(uni).items()}
        targets = [t for t in (TARGET, *FALLBACK_TARGETS) if t >= first]
        for target in targets:  # keeping groups whole may put the first out of reach
            try:
                apply_budget(uni, target_macs=target, scores=scores, uniform=True)
                break
            except SparsifyError as exc:
                if target != targets[-1]:
                    continue
                if attempt == "uniform" or not refused:
                    raise
                # the save was refused (named) and the documented fix cannot meet any
                # target: what is kept whole holds too much of the MACs
                return (f"[exclude=config_cannot_hold keeps too much whole: "
                        f"{type(exc).__name__}: {str(exc)[:120]}] {refused}")[:300]
        if attempt != "uniform":
            attempt = f"after exclude (target {target})"
        small = sf.shrink(uni).eval()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                _save(small, tmp)
            except SparsifyError as exc:
                if os.listdir(tmp):
                    raise AssertionError("save refused after writing files") from exc
                refused = f"refused: {exc}"[:300]
                continue
            loaded = type(small).from_pretrained(tmp, local_files_only=True).eval()
            x9 = make_inputs(kind, vocab, 2, 9, seed=4, mask=mask)
            with torch.no_grad():
                _close(run_logits(loaded, x9), run_logits(small, x9), "reloaded vs shrunk", 1e-5)
                _close(run_logits(small, x9), _hard_masked(uni, x9), "uniform shrunk vs hard-masked")
            return True if attempt == "uniform" else attempt
    return refused


def _hard_masked(gm: Any, x: Any) -> torch.Tensor:
    """The hard-masked capture's logits on ``x``; a static capture (other shapes refused by
    its guards) through ``fold_to_source`` (the hard-masked model as its source class)."""
    from sparsify_fx.mask_index import hard_masks
    from sparsify_fx.passes.shrink.to_source import fold_to_source
    try:
        with hard_masks(gm):
            return run_logits(gm, x)
    except Exception:  # noqa: BLE001  a static capture
        return run_logits(fold_to_source(gm).eval(), x)


def _save(model: Any, folder: str) -> None:
    """``safe_save`` when the package has it (refuses before writing), else save_pretrained."""
    try:
        from sparsify_fx import safe_save
    except ImportError:
        model.save_pretrained(folder)
        return
    safe_save(model, folder)


def _alarm(_signum: int, _frame: Any) -> None:
    raise FamilyTimeout()


def run_with_timeout(family: str, class_name: str, kind: str, timeout: int) -> dict[str, Any]:
    """:func:`run_family` under a SIGALRM time limit (main thread only)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    start = time.perf_counter()
    try:
        row = run_family(family, class_name, kind)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="family names (default: all)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per family")
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in <out>.jsonl")
    parser.add_argument("--shard", default="0/1",
                        help="I/N: run every N-th family from the I-th (parallel runs, one log)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write <out>.json / .md from <out>.jsonl")
    parser.add_argument("--out", default="benchmarks/results/family_sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads: random weights only
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    todo = [] if args.report_only else families(transformers)
    shard, shards = (int(v) for v in args.shard.split("/"))
    todo = todo[shard::shards]
    if args.only:  # rerun these, whatever the log holds (their new rows replace the old)
        todo = [t for t in todo if t[0] in set(args.only)]
    done: dict[tuple, dict] = {}
    if not args.fresh and os.path.exists(args.out + ".jsonl"):
        with open(args.out + ".jsonl") as f:
            for line in f:
                r = json.loads(line)
                done[(r["family"], r["kind"])] = r
    command = " ".join([".venv/bin/python benchmarks/family_sweep.py",
                        *(sys.argv[1:] if argv is None else argv)])
    started, start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    ran = 0
    with open(args.out + ".jsonl", "w" if args.fresh else "a") as log:
        for family, class_name, kind in todo:
            if (family, kind) in done and not args.only:
                continue
            row = run_with_timeout(family, class_name, kind, args.timeout)
            done[(family, kind)] = row
            ran += 1
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"{family:32s} {kind:3s} {row['result']:18s} {row.get('seconds')}s "
                  f"{str(row['reason'])[:100]}", flush=True)
    runs_path = args.out + ".runs.jsonl"
    if ran:
        with open(runs_path, "w" if args.fresh else "a") as f:
            f.write(json.dumps({"command": command, "families": ran, "started": started,
                                "wall_s": round(time.perf_counter() - start, 1)}) + "\n")
    runs = [json.loads(line) for line in open(runs_path)] if os.path.exists(runs_path) else []
    rows = [done.get((f, k)) or {"family": f, "class": c, "kind": k, "result": "not run",
                                  "params_fraction": None, "blocks_macs_fraction": None,
                                  "reason": "not reached in the time of these runs", "checks": {}}
            for f, c, k in families(transformers)]
    summary = summarize(rows)
    result = {"runs": runs, "transformers": transformers.__version__,
              "torch": torch.__version__, "summary": summary,
              "rows": [{k: v for k, v in r.items() if k != "traceback"} for r in rows]}
    md = markdown(rows, summary, runs)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
