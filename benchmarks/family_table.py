"""The family sweep's table (``benchmarks/family_sweep.py``): each row's outcome, the
counts per kind, the markdown."""
from __future__ import annotations

from typing import Any

from family_configs import FALLBACK_TARGETS, TARGET


def outcome(row: dict[str, Any]) -> str:
    """One of: ``pass`` (target 0.5: parity, generate() equal, a uniform save that reloads,
    possibly after ``exclude=config_cannot_hold``), ``pass_higher_target`` (the same at a
    fallback target: 0.5 refused with a BudgetError), ``save_refused`` (shrinks with parity,
    the save refused before writing: ShrinkError), ``named_failure`` (a SparsifyError),
    ``timeout``, ``unnamed_failure`` (anything else: a wrong output or a crash), ``skipped``,
    ``not_run`` (not reached in the time the runs had)."""
    result = row["result"]
    if result in ("skipped", "not run"):
        return result.replace(" ", "_")
    if result.startswith("pass"):
        if "refused" in result:
            return "save_refused"
        return "pass_higher_target" if "at target" in result else "pass"
    if row.get("reason") == "timed out" or "FamilyTimeout" in str(row.get("reason")):
        return "timeout"  # (also when a capture error wrapped the time limit)
    return "named_failure" if row.get("named") else "unnamed_failure"


OUTCOMES = ("pass", "pass_higher_target", "save_refused", "named_failure", "timeout",
            "unnamed_failure", "skipped", "not_run")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per kind: classes, built (covered), each :func:`outcome`, and how many of the
    covered ones kept some channels whole with a warning."""
    out: dict[str, Any] = {}
    for kind in ("lm", "cls"):
        sel = [r for r in rows if r["kind"] == kind]
        built = [r for r in sel if r["result"] not in ("skipped", "not run")]
        counts = {o: sum(outcome(r) == o for r in sel) for o in OUTCOMES}
        out[kind] = {"families": len(sel), "built": len(built), **counts,
                     "whole_kept_warning": sum(bool(r.get("warning")) for r in built),
                     "pass_fraction": round(counts["pass"] / len(built), 3) if built else None}
    return out


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], runs: list[dict]) -> str:
    lines = ["# Structured path on every transformers family (issue 34)", "",
             "Made by (each run reruns only its families; later rows replace earlier ones):", ""]
    lines += [f"- `{r['command']}`: {r['families']} families, wall {r['wall_s']:.0f} s "
              f"({r['started']})" for r in runs]
    lines += ["", f"Sum of these runs' wall times: {sum(r['wall_s'] for r in runs):.0f} s (runs "
              "with `--shard I/N` ran side by side, so they overlap in time; 2 CPU cores shared "
              "with other jobs, torch 1 thread per process).", "",
              "Tiny random configs (hidden 64, 2 layers, 4 heads, 2 KV heads), random CS scores, "
              f"exact cut at `target_macs={TARGET}` (when channels kept whole put it out of "
              f"reach: the BudgetError is the reason and the first reachable of "
              f"{FALLBACK_TARGETS} is cut, so the rest is still checked), shrink, parity at batch "
              "3 x length 11, greedy `generate()`, uniform cut + `save_pretrained` + "
              "`from_pretrained` (or, when the config cannot hold a group, the same after "
              "`exclude=config_cannot_hold(gm)`).", ""]
    for kind, label in (("lm", "causal LM"), ("cls", "encoder (sequence classification)")):
        s = summary[kind]
        lines.append(f"- {label}: {s['families']} classes, {s['built']} covered (built and run): "
                     f"{s['pass']} pass ({s['pass_fraction']}), {s['pass_higher_target']} pass "
                     f"only at a higher target, {s['save_refused']} save refused (named), "
                     f"{s['named_failure']} named failure, {s['timeout']} timed out, "
                     f"{s['unnamed_failure']} unnamed failure; {s['whole_kept_warning']} kept "
                     f"some channels whole with a warning; {s['skipped']} skipped; "
                     f"{s['not_run']} not run (time)")
    lines += ["", "| family | kind | result | target | params | blocks' MACs | s | reason |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reason = str(r.get("reason", "")).replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {r['family']} | {r['kind']} | {r['result']} | {r.get('target', '')} | "
                     f"{'' if r['params_fraction'] is None else r['params_fraction']} | "
                     f"{'' if r['blocks_macs_fraction'] is None else r['blocks_macs_fraction']} | "
                     f"{r.get('seconds', '')} | {reason} |")
    return "\n".join(lines) + "\n"
