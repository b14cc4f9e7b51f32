"""PNG rendering of a report: per-layer sparsity bars next to each layer's share of
parameters. Uses matplotlib's Agg backend (no display); writes only ``path``.

Size: ``figure_size(n_layers)`` inches at ``dpi`` (10 x (1.6 + 0.17 n) in, the height
clamped to [4, 14] in), so a 50-layer model is 1000 x 1010 px at dpi=100.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparsify_fx.export.report import Report

WIDTH_IN = 10.0
KIND_COLORS = {"conv": "#4c72b0", "depthwise_conv": "#55a868", "grouped_conv": "#8172b2",
               "conv_transpose": "#937860", "linear": "#dd8452",
               "attention_in_proj": "#c44e52", "attention_out_proj": "#da8bc3"}


def figure_size(n_layers: int) -> tuple[float, float]:
    """(width, height) in inches for ``n_layers`` rows."""
    return WIDTH_IN, min(14.0, max(4.0, 1.6 + 0.17 * n_layers))


def _label(name: str, width: int = 34) -> str:
    name = name[:-len(".weight")] if name.endswith(".weight") else name
    return name if len(name) <= width else "..." + name[-(width - 3):]


def plot(report: "Report", path: str, dpi: int = 100) -> str:
    """Write the PNG to ``path`` and return ``path``."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = report.rows
    n = max(len(rows), 1)
    fig = Figure(figsize=figure_size(n), dpi=dpi)
    axes = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1.2]})
    ys = list(range(len(rows)))
    colors = [KIND_COLORS.get(r.kind, "#7f7f7f") for r in rows]
    total = sum(r.params for r in rows) or 1
    font = max(4.0, min(8.0, 560.0 / n))
    axes[0].barh(ys, [100 * r.sparsity for r in rows], color=colors, height=0.8)
    axes[0].set_xlim(0, 100)
    axes[0].set_xlabel("sparsity of the layer's weight (%)")
    axes[0].axvline(100 * report.weight_sparsity, color="k", ls="--", lw=0.8,
                    label=f"all prunable weights: {100 * report.weight_sparsity:.1f}%")
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([_label(r.name) for r in rows], fontsize=font)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)  # first layer on top, no empty margins
    axes[1].barh(ys, [100 * r.params / total for r in rows], color=colors, height=0.8)
    axes[1].set_xlabel("share of prunable params (%)")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    kinds = list(dict.fromkeys(r.kind for r in rows))
    handles = [Patch(color=KIND_COLORS.get(k, "#7f7f7f"), label=k) for k in kinds]
    handles.append(axes[0].get_legend_handles_labels()[0][0])
    axes[0].legend(handles=handles, fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0),
                   ncol=min(len(handles), 4), frameon=False, borderaxespad=0.2)
    fig.suptitle(
        f"{report.model_name}: {len(rows)} layers, weight sparsity "
        f"{100 * report.weight_sparsity:.1f}%, MACs {report.total_macs / 1e9:.3f} G of "
        f"{report.total_dense_macs / 1e9:.3f} G dense ({report.macs_ratio:.2f}x)", fontsize=10)
    fig.subplots_adjust(left=0.27, right=0.98, top=1 - 0.85 / figure_size(n)[1],
                        bottom=0.65 / figure_size(n)[1], wspace=0.05)
    fig.savefig(path, dpi=dpi, format="png")
    return path
