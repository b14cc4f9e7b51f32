"""Text renderings of a :class:`~sparsify_fx.export.report.Report`: table, markdown,
JSON (schema ``sparsify_fx.report/v1``, see docs/report.md) and CSV, plus the
before/after comparison. Pure functions of the report; nothing is mutated.
"""
from __future__ import annotations

import csv
import io
import json
from collections import OrderedDict
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from sparsify_fx.export.report_heads import heads_line

if TYPE_CHECKING:
    from sparsify_fx.export.report import Comparison, LayerRow, Report

SCHEMA = "sparsify_fx.report/v1"
UNITS = {"macs": "multiply-accumulates (one multiply + one add)",
         "flops": "2 x macs", "sparsity": "fraction of zero weights in [0, 1]"}
FLOPS_NOTE = ("FLOPs = 2 x MACs. torchvision's `_ops` metadata is GMACs although it is "
              "labelled GFLOPS.")
CSV_FIELDS = ["name", "kind", "weight_shape", "params", "nonzeros", "sparsity",
              "out_channels", "out_channels_kept", "in_channels", "in_channels_kept",
              "dense_macs", "macs", "output_shape", "masked", "calls"]


def row_dict(row: LayerRow) -> dict[str, Any]:
    """One layer row as a JSON-ready dict (tuples as lists)."""
    d = asdict(row)
    d["weight_shape"] = list(row.weight_shape)
    d["output_shape"] = list(row.output_shape) if row.output_shape else None
    return d


def _dims(shape: Any) -> str:
    return "x".join(str(s) for s in shape) if shape else "-"


def _g(x: float) -> str:
    return f"{x / 1e9:.3f} G"


def _m(x: float) -> str:
    return f"{x / 1e6:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _other_groups(report: "Report") -> "OrderedDict[str, list[int]]":
    groups: OrderedDict[str, list[int]] = OrderedDict()
    for o in report.other:
        g = groups.setdefault(o.op, [0, 0])
        g[0] += 1
        g[1] += o.macs
    return groups


def _other_line(report: "Report") -> str:
    if not report.other:
        return "other ops: none with MACs (pooling, norms, activations, bias adds are not counted)"
    parts = ", ".join(f"{op} x{n}" for op, (n, _) in _other_groups(report).items())
    return (f"other ops: {len(report.other)} ({parts}) = {_m(report.other_macs)} MMACs, "
            "counted dense in both totals")


def summary_lines(report: "Report") -> list[str]:
    t = report.totals()
    masked = "" if t["masked_sparsity"] is None else f", masked weights {_pct(t['masked_sparsity'])}"
    return [
        f"params {t['params']:,} (nonzero {t['nonzeros']:,}); sparsity: prunable weights "
        f"{_pct(t['weight_sparsity'])}{masked}, all params {_pct(t['param_sparsity'])}",
        f"MACs: dense {_g(t['dense_macs'])} -> effective {_g(t['macs'])} "
        f"(ratio {t['macs_ratio']:.3f}); FLOPs = 2 x MACs: {_g(t['dense_flops'])} -> "
        f"{_g(t['flops'])}",
        *_latency_lines(report),
        *heads_line(report.heads),
        *_blocks_lines(report),
    ]


def _blocks_lines(report: "Report") -> list[str]:
    """Coupled channel models: the prunable blocks' MACs as shrink leaves them."""
    b = report.blocks
    if not b:
        return []
    return [f"pruned blocks ({len(b['layers'])} layers and attention products): MACs as shrunk "
            f"{_g(b['macs'])} of {_g(b['dense_macs'])} (fraction {b['fraction']:.3f}); "
            f"whole model as shrunk: fraction {b['model_fraction']:.3f}"]


def _latency_lines(report: "Report") -> list[str]:
    """Latency summary (only for ``report(..., latency=cost)``)."""
    lat = report.latency
    if not lat:
        return []
    measured = (f"; measured {lat['measured_ms']:.2f} ms" if "measured_ms" in lat else "")
    return [f"onnxruntime latency: estimated {lat['estimated_ms']:.2f} ms of dense "
            f"{lat['dense_estimated_ms']:.2f} ms (fraction {lat['fraction']:.3f}){measured}"]


def _header(report: "Report") -> str:
    shapes = ", ".join(_dims(s) for s in report.input_shapes)
    return f"sparsify_fx report: {report.model_name}, input {shapes}, counted by {report.counting}"


def to_table(report: "Report", width: int = 44) -> str:
    """Compact fixed-width table (what ``print(report)`` shows)."""
    head = (f"{'layer':{width}s} {'kind':18s} {'weight':>14s} {'params':>10s} {'sparsity':>8s} "
            f"{'out kept':>10s} {'dense MMACs':>12s} {'eff. MMACs':>11s}")
    lines = [_header(report), head, "-" * len(head)]
    for r in report.rows:
        lines.append(
            f"{_short(r.name, width):{width}s} {r.kind:18s} {_dims(r.weight_shape):>14s} "
            f"{r.params:>10,} {_pct(r.sparsity):>8s} "
            f"{f'{r.out_channels_kept}/{r.out_channels}':>10s} {_m(r.dense_macs):>12s} "
            f"{_m(r.macs):>11s}")
    lines += ["-" * len(head), _other_line(report), *summary_lines(report), *report.notes]
    return "\n".join(lines)


def to_markdown(report: "Report") -> str:
    t = report.totals()
    out = [f"## {report.model_name}", "",
           f"Input {', '.join(_dims(s) for s in report.input_shapes)}; counted by "
           f"{report.counting}. {FLOPS_NOTE}", "",
           "| total | value |", "|---|---|",
           f"| parameters | {t['params']:,} |", f"| nonzero parameters | {t['nonzeros']:,} |",
           f"| sparsity, prunable weights | {_pct(t['weight_sparsity'])} |",
           f"| sparsity, masked weights | {_pct(t['masked_sparsity'])} |",
           f"| sparsity, all parameters | {_pct(t['param_sparsity'])} |",
           f"| dense MACs | {_g(t['dense_macs'])} |", f"| effective MACs | {_g(t['macs'])} |",
           f"| effective / dense | {t['macs_ratio']:.3f} |",
           f"| dense FLOPs (2 x MACs) | {_g(t['dense_flops'])} |", "",
           "| layer | kind | weight | params | nonzeros | sparsity | out ch. kept | in ch. kept "
           "| dense MMACs | eff. MMACs | output |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report.rows:
        out.append(f"| `{r.name}` | {r.kind} | {_dims(r.weight_shape)} | {r.params:,} | "
                   f"{r.nonzeros:,} | {_pct(r.sparsity)} | {r.out_channels_kept}/{r.out_channels} | "
                   f"{r.in_channels_kept}/{r.in_channels} | {_m(r.dense_macs)} | {_m(r.macs)} | "
                   f"{_dims(r.output_shape)} |")
    out += ["", _other_line(report)]
    if report.latency:
        out += ["", *_latency_lines(report), "", "| layer | est. ms | measured ms |",
                "|---|---:|---:|"]
        out += [f"| `{r.name}` | {_ms(r.latency_ms)} | {_ms(r.latency_measured_ms)} |"
                for r in report.rows]
    if report.other:
        out += ["", "| other op | count | MMACs |", "|---|---:|---:|"]
        out += [f"| {op} | {n} | {_m(m)} |" for op, (n, m) in _other_groups(report).items()]
    out += [f"\n> {n}" for n in report.notes]
    return "\n".join(out) + "\n"


def report_dict(report: "Report") -> dict[str, Any]:
    return {
        "schema": SCHEMA, "model": report.model_name,
        "input_shapes": [list(s) for s in report.input_shapes],
        "counting": report.counting, "units": UNITS, "totals": report.totals(),
        "layers": [row_dict(r) for r in report.rows],
        "other": [{"name": o.name, "op": o.op, "macs": o.macs,
                   "output_shape": list(o.output_shape) if o.output_shape else None}
                  for o in report.other],
        "notes": list(report.notes),
        "heads": {k: list(v) for k, v in report.heads.items()},
    }


def to_json(report: "Report", indent: int | None = 2) -> str:
    return json.dumps(report_dict(report), indent=indent)


def _csv_row(r: "LayerRow") -> dict[str, Any]:
    return {f: (_dims(getattr(r, f)) if f.endswith("shape") else getattr(r, f))
            for f in CSV_FIELDS}


def to_csv(report: "Report") -> str:
    """One line per layer, then one per other op (kind ``other:<op>``, no weight)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in report.rows:
        writer.writerow(_csv_row(r))
    for o in report.other:
        writer.writerow({"name": o.name, "kind": f"other:{o.op}", "params": 0, "nonzeros": 0,
                         "dense_macs": o.macs, "macs": o.macs,
                         "output_shape": _dims(o.output_shape)})
    return buf.getvalue()


# -- before / after ------------------------------------------------------------------
def _pairs(c: "Comparison") -> list[tuple[str, "LayerRow | None", "LayerRow | None"]]:
    before = {r.name: r for r in c.before.rows}
    after = {r.name: r for r in c.after.rows}
    names = list(before) + [n for n in after if n not in before]
    return [(n, before.get(n), after.get(n)) for n in names]


def compare_dict(c: "Comparison") -> dict[str, Any]:
    return {"schema": SCHEMA + "/compare", "before": c.before.model_name,
            "after": c.after.model_name,
            "totals": {"before": c.before.totals(), "after": c.after.totals()},
            "layers": [{"name": n, "before": row_dict(b) if b else None,
                        "after": row_dict(a) if a else None} for n, b, a in _pairs(c)]}


def _channels(r: "LayerRow | None", side: str) -> str:
    """``kept/total`` channels on ``side`` ("out" or "in") of a row, "-" when absent."""
    if r is None:
        return "-"
    return f"{getattr(r, side + '_channels_kept')}/{getattr(r, side + '_channels')}"


def _cmp_cells(b: "LayerRow | None", a: "LayerRow | None") -> list[str]:
    """params, sparsity, effective MMACs, output and input channels kept: before, after."""
    def get(r: "LayerRow | None", f: str, fmt: Any) -> str:
        return fmt(getattr(r, f)) if r is not None else "-"
    return [get(b, "params", lambda x: f"{x:,}"), get(a, "params", lambda x: f"{x:,}"),
            get(b, "sparsity", _pct), get(a, "sparsity", _pct),
            get(b, "macs", _m), get(a, "macs", _m),
            _channels(b, "out"), _channels(a, "out"), _channels(b, "in"), _channels(a, "in")]


def _macs_change(c: "Comparison") -> str:
    before, after = c.before.total_macs, c.after.total_macs
    ratio = f"{after / before:.4f}" if before else "-"
    return (f"effective MACs {before:,.0f} -> {after:,.0f} per input batch "
            f"(after / before {ratio})")


def compare_markdown(c: "Comparison") -> str:
    tb, ta = c.before.totals(), c.after.totals()
    out = [f"## {c.before.model_name} (before) vs {c.after.model_name} (after)", "", FLOPS_NOTE,
           "", "| total | before | after |", "|---|---:|---:|",
           f"| parameters | {tb['params']:,} | {ta['params']:,} |",
           f"| nonzero parameters | {tb['nonzeros']:,} | {ta['nonzeros']:,} |",
           f"| sparsity, prunable weights | {_pct(tb['weight_sparsity'])} | "
           f"{_pct(ta['weight_sparsity'])} |",
           f"| dense MACs | {_g(tb['dense_macs'])} | {_g(ta['dense_macs'])} |",
           f"| effective MACs | {_g(tb['macs'])} | {_g(ta['macs'])} |",
           f"| effective MACs (exact) | {tb['macs']:,.0f} | {ta['macs']:,.0f} |",
           f"| effective MACs after / before | | "
           f"{ta['macs'] / tb['macs'] if tb['macs'] else float('nan'):.4f} |", "",
           "| layer | params before | params after | sparsity before | sparsity after | "
           "eff. MMACs before | eff. MMACs after | out ch. kept before | out ch. kept after | "
           "in ch. kept before | in ch. kept after |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, b, a in _pairs(c):
        out.append(f"| `{n}` | " + " | ".join(_cmp_cells(b, a)) + " |")
    if c.before.heads or c.after.heads:
        out += ["", "| attention layer | heads before | heads after |", "|---|---:|---:|"]
        for k in dict.fromkeys([*c.before.heads, *c.after.heads]):
            b, a = c.before.heads.get(k), c.after.heads.get(k)
            out.append(f"| `{k}` | {b[0] if b else '-'} | {a[0] if a else '-'} |")
    return "\n".join(out) + "\n"


def compare_table(c: "Comparison", width: int = 44) -> str:
    head = (f"{'layer':{width}s} {'params':>10s} {'->':>10s} {'sparsity':>8s} {'->':>8s} "
            f"{'eff. MMACs':>11s} {'->':>10s} {'out ch.':>9s} {'->':>9s} {'in ch.':>9s} "
            f"{'->':>9s}")
    lines = [f"before: {c.before.model_name}   after: {c.after.model_name}", head, "-" * len(head)]
    for n, b, a in _pairs(c):
        cells = _cmp_cells(b, a)
        lines.append(f"{_short(n, width):{width}s} {cells[0]:>10s} {cells[1]:>10s} "
                     f"{cells[2]:>8s} {cells[3]:>8s} {cells[4]:>11s} {cells[5]:>10s} "
                     f"{cells[6]:>9s} {cells[7]:>9s} {cells[8]:>9s} {cells[9]:>9s}")
    lines.append("-" * len(head))
    lines.append(_macs_change(c))
    lines += ["before: " + s for s in summary_lines(c.before)]
    lines += ["after:  " + s for s in summary_lines(c.after)]
    return "\n".join(lines)


def compare_csv(c: "Comparison") -> str:
    buf = io.StringIO()
    per_side = ("params", "nonzeros", "sparsity", "dense_macs", "macs", "out_channels",
                "out_channels_kept", "in_channels", "in_channels_kept")
    fields = ["name"] + [f"{f}_{w}" for w in ("before", "after") for f in per_side]
    writer = csv.DictWriter(buf, fields, lineterminator="\n")
    writer.writeheader()
    for n, b, a in _pairs(c):
        row: dict[str, Any] = {"name": n}
        for w, r in (("before", b), ("after", a)):
            for f in per_side:
                row[f"{f}_{w}"] = getattr(r, f) if r is not None else ""
        writer.writerow(row)
    return buf.getvalue()
