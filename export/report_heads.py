"""Attention heads kept per attention layer, for ``report`` (read-only).

A head is kept when any of its q, k or v rows in the weight the model computes
with (hard-masked for transformed models) is nonzero. Recognised layers:

* ``nn.MultiheadAttention`` (packed ``in_proj_weight``);
* :class:`~sparsify_fx.passes.shrink.pruned_attention.PrunedSelfAttention` (a shrunk one:
  ``num_heads`` of ``total_heads``);
* Swin windowed attention: a module holding ``relative_position_bias_table``
  (one column per head) and a ``qkv`` weight. A shrunk Swin layer only knows its
  kept heads, so its total is the kept count (``compare`` shows the total before).
"""
from __future__ import annotations

from torch import Tensor, nn

from sparsify_fx.passes.shrink.pruned_attention import PrunedSelfAttention


def _kept(w: Tensor, heads: int) -> int:
    """Heads with a nonzero row among ``w``'s ``[q | k | v]`` rows (``(3 * heads * d, in)``)."""
    rows = (w.detach() != 0).reshape(3, heads, -1).any(0).any(1)
    return int(rows.sum())


def heads_kept(model: nn.Module, weights: dict[str, Tensor]) -> dict[str, tuple[int, int]]:
    """``{module path: (heads kept, heads)}``; ``weights``: name -> effective weight."""
    out: dict[str, tuple[int, int]] = {}
    for path, mod in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(mod, PrunedSelfAttention):
            w = weights.get(f"{prefix}qkv.weight")
            kept = _kept(w, mod.num_heads) if w is not None else mod.num_heads
            out[path] = (kept, mod.total_heads)
        elif isinstance(mod, nn.MultiheadAttention) and mod._qkv_same_embed_dim:
            w = weights.get(f"{prefix}in_proj_weight")
            if w is not None:
                out[path] = (_kept(w, mod.num_heads), mod.num_heads)
        elif isinstance(getattr(mod, "relative_position_bias_table", None), Tensor):
            w = weights.get(f"{prefix}qkv.weight")
            heads = int(mod.relative_position_bias_table.shape[-1])
            if w is not None and w.shape[0] % (3 * heads) == 0:
                out[path] = (_kept(w, heads), heads)
    return out


def heads_line(heads: dict[str, tuple[int, int]]) -> list[str]:
    """One summary line (empty list when the model has no attention layer)."""
    if not heads:
        return []
    kept = sum(a for a, _ in heads.values())
    total = sum(b for _, b in heads.values())
    per = ", ".join(f"{a}/{b}" for a, b in heads.values())
    return [f"attention heads kept: {kept} / {total} (per layer: {per})"]
