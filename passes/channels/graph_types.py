"""What the channel analysis produces: layouts, producers, norm sites, groups.

Plain data (numpy arrays of channel ids); :func:`sparsify_fx.passes.channels.analysis.analyze_channels`
builds a :class:`ChannelGraph`, the coupling and shrink passes read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Layout:
    """Channel ids along a tensor's channel dimension.

    ``ids``/``zero``: int64 / bool arrays of length C. ``zero[i]``: if channel
    ``ids[i]`` is pruned, this tensor is exactly 0 there. ``cdim``: channel dim
    counted from the end (negative). ``rank``: tensor rank if known. ``mult``:
    features per channel after a flatten (None: resolved by the consuming Linear).
    """

    ids: np.ndarray
    zero: np.ndarray
    cdim: int
    rank: int | None
    mult: int | None = 1

    def with_(self, **changes: Any) -> "Layout":
        values = dict(ids=self.ids, zero=self.zero, cdim=self.cdim, rank=self.rank, mult=self.mult)
        values.update(changes)
        return Layout(**values)


@dataclass
class Producer:
    """A Conv/Linear call. ``in_ids``: ids of its input features (None: opaque input),
    already repeated by the flatten multiplicity for a Linear.

    Attention calls add producers of kind ``"attention_qkv"`` / ``"attention_out"``
    (the in- and out-projections) and ``"attention_matmul"`` (q k^T and attn v, no
    weight: ``weight`` is a label). ``shape``: weight shape as ``(out, in, *kernel)``.
    ``macs_unit``: MACs per sample of one (output, input) channel pair when the
    analysis knows it from propagated shapes (attention); None: from the weight costs.
    """

    node: str
    weight: str  # qualified parameter name (get_attr target)
    bias: str | None
    mask_node: str | None
    kind: str  # "conv" | "linear" | "attention_qkv" | "attention_out" | "attention_matmul"
    groups: int
    out_ids: np.ndarray
    in_ids: np.ndarray | None
    shape: tuple[int, ...] = ()
    macs_unit: float | None = None
    #: how the weight parameter stores ``shape[:2]``: ``"oi"`` (Linear, Conv) or ``"io"``
    #: (``(in, out)``, HF ``Conv1D`` through ``addmm``; ATen graphs only)
    weight_layout: str = "oi"
    #: per ``in_ids`` entry: the input reaches this product not exactly zero when its
    #: channel is pruned, so the weight's input columns are gated too (``kind``
    #: "columns" masks; ATen graphs only); None: every input is zero when pruned
    gated_in: np.ndarray | None = None


@dataclass
class AttentionSite:
    """A self-attention call whose heads are channel groups.

    ``style``: ``"mha"`` (an ``nn.MultiheadAttention`` leaf at ``module``) or
    ``"window"`` (torchvision's ``shifted_window_attention`` function, relative
    position bias table ``bias_table`` with one column per head). ``qkv`` / ``out``:
    keys of its projection producers in :attr:`ChannelGraph.producers`. The qkv
    producer's ids are ``[q | k | v]``, each ``num_heads x head_dim``; all ids of one
    head (its q, k and v rows) are tied, so a head is one score slot.
    """

    node: str
    style: str
    module: str | None
    qkv: str
    out: str
    num_heads: int
    head_dim: int
    qkv_weight: str
    bias_table: str | None = None

    @property
    def label(self) -> str:
        """Module path of the attention (``"window"``: the owner of its qkv weight's module)."""
        return self.module or self.qkv_weight.rpartition(".")[0].rpartition(".")[0] or self.node

    def head_ids(self, qkv_ids: np.ndarray) -> np.ndarray:
        """First q id of every head, ``(num_heads,)``."""
        return qkv_ids[: self.num_heads * self.head_dim: self.head_dim]


@dataclass
class NormSite:
    """A BatchNorm call (a call_module node, or an ATen ``batch_norm`` call) and the
    channel ids it normalises."""

    node: str
    module: str
    ids: np.ndarray
    #: ATen graphs: the call's (weight, bias, running_mean, running_var) parameter names
    #: (None where absent); empty for a BatchNorm module call of a module graph
    params: tuple = ()
    #: the parameters' dim of the channels (None: their first dim over 1; 1: a table's
    #: columns, :class:`~sparsify_fx.passes.aten.values.Gathered`)
    dim: int | None = None


@dataclass
class ChannelGroup:
    """Producers whose channels are removed together; ``components``: one entry per
    score (a set of tied channel ids), global component numbers."""

    index: int
    producers: list[str]
    components: np.ndarray


@dataclass
class ChannelGraph:
    """Result of :func:`analyze_channels`. ``component[id]``: component of a channel
    id; ``prunable[c]``: component c may be removed; ``group_of[c]`` / ``slot_of[c]``:
    its group and position in the group's score vector (-1 when whole)."""

    n_ids: int
    producers: dict[str, Producer]
    norms: dict[str, NormSite]
    layouts: dict[str, Layout]
    component: np.ndarray
    prunable: np.ndarray
    group_of: np.ndarray
    slot_of: np.ndarray
    groups: list[ChannelGroup]
    unsupported: list[str] = field(default_factory=list)
    attention: dict[str, AttentionSite] = field(default_factory=dict)

    def slots(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(group, slot) per channel id; -1 for whole ids."""
        comp = self.component[ids]
        return self.group_of[comp], self.slot_of[comp]
