"""Aggregate benchmarks/compare.py rows into JSON, a markdown table, ticket costs and a plot.

Pure post-processing of the run rows (dicts with dataset, model, method,
target, seed, test_acc, sparsity, epochs, wall_s, macs_fraction, ...).
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

MATCH_POINTS = 0.5  # "matching": test accuracy within 0.5 points of the dense run (same seed)
ORDER = ("cs", "imp", "gmp", "gmp_cs_alloc", "l0", "ste", "magnitude", "random")
LABELS = {"cs": "CS", "imp": "IMP (rewind)", "gmp": "GMP", "gmp_cs_alloc": "GMP + CS layer alloc.",
          "l0": "L0 (hard concrete)", "ste": "STE (sign)", "magnitude": "one-shot magnitude",
          "random": "random (ERK)"}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (dataset, model, method, target) with mean/std over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["model"], r["method"], round(r["target"], 4))].append(r)
    out = []
    for (ds, model, method, target), rs in sorted(groups.items()):
        off = max(abs(round(r["sparsity"] * r["total_weights"])
                      - (r["total_weights"] - round((1 - r["target"]) * r["total_weights"])))
                  for r in rs) if all("total_weights" in r for r in rs) else None
        out.append({"dataset": ds, "model": model, "method": method, "target": target,
                    "seeds": sorted(r["seed"] for r in rs), "max_weights_off_target": off,
                    **{k: _stats([float(r[k]) for r in rs])
                       for k in ("test_acc", "sparsity", "epochs", "wall_s", "macs_fraction")},
                    "total_weights": rs[0].get("total_weights")})
    return out


def ticket_costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sparsest matching subnetwork per (dataset, model, method, seed) and the epochs it cost.

    ``epochs_run``: the run that produced it (IMP: all levels up to it);
    ``epochs_sweep``: CS/others run once per target, so finding the sparsest
    matching target by trying targets in increasing order costs the sum over
    the targets tried (IMP: same as ``epochs_run``).
    """
    dense = {(r["dataset"], r["model"], r["seed"]): r["test_acc"] for r in rows if r["method"] == "dense"}
    by: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["method"] != "dense" and r["target"] > 0:
            by[(r["dataset"], r["model"], r["method"], r["seed"])].append(r)
    out = []
    for (ds, model, method, seed), rs in sorted(by.items()):
        ref = dense.get((ds, model, seed))
        if ref is None:
            continue
        rs = sorted(rs, key=lambda r: r["target"])
        matching = [r for r in rs if r["test_acc"] >= ref - MATCH_POINTS]
        best = max(matching, key=lambda r: r["sparsity"]) if matching else None
        sweep = sum(r["epochs"] for r in rs if best and r["target"] <= best["target"]) \
            if method != "imp" else (best["epochs"] if best else None)
        out.append({"dataset": ds, "model": model, "method": method, "seed": seed,
                    "dense_acc": ref, "sparsity": best["sparsity"] if best else None,
                    "test_acc": best["test_acc"] if best else None,
                    "epochs_run": best["epochs"] if best else None,
                    "epochs_sweep": sweep if best else None})
    return out


def _fmt(s: dict[str, float] | None, digits: int = 2) -> str:
    if s is None:
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def markdown(agg: list[dict[str, Any]], tickets: list[dict[str, Any]], command: str,
             settings: dict[str, Any]) -> str:
    lines = ["# Pruning methods compared in one framework", "",
             *(["Commands (disjoint models/seeds appending to one `.jsonl`, run as parallel "
                "processes with 1 thread each; then `--report-only` rebuilt these tables):", "",
                *[f"    {c.strip()}" for c in command.split(" ; ")]]
               if " ; " in command else [f"Command: `{command}`"]), "",
             f"Budget per run: {settings.get('train_epochs')} train epochs (lr 0.05) + "
             f"{settings.get('finetune_epochs')} fine-tune epochs (lr 0.01, mask fixed), "
             f"batch {settings.get('batch_size')}; "
             "IMP: that per level, epochs cumulative over levels. Test accuracy (%) of the folded "
             "model, mean ± std over seeds; sparsity is exact (zeros counted in the folded tensors).", ""]
    panels = sorted({(a["dataset"], a["model"]) for a in agg})
    for ds, model in panels:
        mine = [a for a in agg if (a["dataset"], a["model"]) == (ds, model)]
        targets = sorted({a["target"] for a in mine if a["method"] != "dense" and a["target"] > 0})
        dense = next((a for a in mine if a["method"] == "dense"), None)
        lines += [f"## {model} on {ds}", "",
                  f"Dense: {_fmt(dense['test_acc']) if dense else '–'} % "
                  f"({int(dense['epochs']['mean']) if dense else '–'} epochs)", "",
                  "| method | " + " | ".join(f"{t:.0%}" for t in targets) + " | epochs at max sparsity |",
                  "|---|" + "---|" * (len(targets) + 1)]
        for m in ORDER:
            cells = {a["target"]: a for a in mine if a["method"] == m}
            if not cells:
                continue
            last = cells.get(max(cells))
            lines.append(f"| {LABELS[m]} | " + " | ".join(_fmt(cells[t]["test_acc"]) if t in cells
                                                           else "–" for t in targets)
                         + f" | {int(last['epochs']['mean']) if last else '–'} |")
        exact = [a for a in mine if a["method"] != "dense" and a["target"] > 0]
        worst = max((a["max_weights_off_target"] or 0 for a in exact), default=0)
        total = next((a for a in exact), None)
        lines += ["", f"Exactness: over all {len(exact)} method x target cells and every seed, the "
                  f"zeros counted in the folded tensors differ from round(target x masked weights) "
                  f"by at most {worst} weight(s)"
                  + (f" (masked weights: {int(total['total_weights'])})." if total and "total_weights" in total else "."), ""]
    if tickets:
        lines += ["## Ticket search cost (sparsest subnetwork within "
                  f"{MATCH_POINTS} points of dense, same seed)", "",
                  "| dataset | model | method | seeds matched | sparsity | test acc | epochs (that run) | epochs (sweep over targets) |",
                  "|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for t in tickets:
            groups[(t["dataset"], t["model"], t["method"])].append(t)
        for (ds, model, m), ts in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], ORDER.index(kv[0][2]) if kv[0][2] in ORDER else 99)):
            ok = [t for t in ts if t["sparsity"] is not None]
            if not ok:
                lines.append(f"| {ds} | {model} | {LABELS.get(m, m)} | 0/{len(ts)} | – | – | – | – |")
                continue
            mean = lambda k: statistics.fmean(t[k] for t in ok)  # noqa: E731
            lines.append(f"| {ds} | {model} | {LABELS.get(m, m)} | {len(ok)}/{len(ts)} | "
                         f"{mean('sparsity'):.1%} | {mean('test_acc'):.2f} | {mean('epochs_run'):.0f} | "
                         f"{mean('epochs_sweep'):.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(agg: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator
    panels = sorted({(a["dataset"], a["model"]) for a in agg})
    n_series = len({a["method"] for a in agg})
    ncol = 5 if len(panels) >= 2 else 2
    rows = -(-n_series // ncol)
    height = 5.0 + 0.4 * rows
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * max(len(panels), 1), height),
                             squeeze=False)
    colors = dict(zip(ORDER, plt.get_cmap("tab10").colors))
    for ax, (ds, model) in zip(axes[0], panels):
        mine = [a for a in agg if (a["dataset"], a["model"]) == (ds, model)]
        dense = next((a for a in mine if a["method"] == "dense"), None)
        for m in ORDER:
            pts = sorted((a for a in mine if a["method"] == m and a["target"] > 0),
                         key=lambda a: a["target"])
            if not pts:
                continue
            x = [100 * (1 - a["sparsity"]["mean"]) for a in pts]
            y = [a["test_acc"]["mean"] for a in pts]
            sd = [a["test_acc"]["std"] for a in pts]
            style = "--" if m in ("gmp_cs_alloc", "random") else "-"
            ax.plot(x, y, style, marker="o", lw=2.8, ms=5, color=colors[m], label=LABELS[m])
            ax.fill_between(x, [a - s for a, s in zip(y, sd)], [a + s for a, s in zip(y, sd)],
                            color=colors[m], alpha=0.15)
        if dense:
            ax.axhline(dense["test_acc"]["mean"], color="black", lw=2, ls=":", label="dense")
        ax.set_xscale("log")
        ax.invert_xaxis()
        ticks = [50, 20, 10, 5, 2]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t}%" for t in ticks])
        ax.tick_params(labelsize=12)
        ax.set_xlabel("remaining weights (log scale)", fontsize=13)
        ax.set_ylabel("test accuracy (%)", fontsize=13)
        lo = min((a["test_acc"]["mean"] - a["test_acc"]["std"] for a in mine), default=0.0)
        ax.set_ylim(max(0.0, lo - 1.0), 100.3)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{model} on {ds}", fontsize=14)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(ncol, len(labels)), fontsize=12,
               frameon=False)
    fig.tight_layout(rect=(0, (0.4 * rows + 0.1) / height, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[dict[str, Any]], stem: str, command: str,
                  settings: dict[str, Any]) -> str:
    """Write ``stem``.json / .md / .png; returns the markdown."""
    agg = aggregate(rows)
    tickets = ticket_costs(rows)
    md = markdown(agg, tickets, command, settings)
    with open(stem + ".json", "w") as fh:
        json.dump({"command": command, "settings": {k: v for k, v in settings.items()
                                                    if isinstance(v, (int, float, str, list, bool, type(None)))},
                   "aggregate": agg, "ticket_search": tickets, "runs": rows}, fh, indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write(md + "\n")
    plot(agg, stem + ".png")
    return md
