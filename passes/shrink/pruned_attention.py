"""What a shrunk model calls for attention with fewer heads (runtime code, no graph work).

The residual (embedding) width stays; only the inner width ``num_heads * head_dim``
shrinks, so neither form below needs ``embed_dim == num_heads * head_dim``:

* :class:`PrunedSelfAttention` replaces an ``nn.MultiheadAttention`` leaf: one
  packed ``qkv`` Linear, ``F.scaled_dot_product_attention`` and ``out_proj``;
  it accepts the MultiheadAttention call signature for self-attention;
* :func:`pruned_window_attention` replaces torchvision's
  ``shifted_window_attention`` (same arguments plus ``head_dim``).

Both export to ONNX (torch.export based exporter) and compute the same function
as the original modules with the pruned heads' outputs at zero.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsify_fx.errors import ShrinkError


class PrunedSelfAttention(nn.Module):
    """Self-attention with ``num_heads`` heads of ``head_dim`` over ``embed_dim`` features.

    ``forward(query, key, value, ...)`` follows ``nn.MultiheadAttention`` for
    self-attention without masks: ``query`` is ``(N, L, E)`` (``batch_first``),
    ``(L, N, E)`` or ``(L, E)``; ``key``/``value`` must be ``query``. Returns
    ``(output, None)`` (attention weights are not computed). ``total_heads``:
    heads of the layer it was shrunk from (reported only).
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, in_features: int,
                 bias: bool = True, out_bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, total_heads: int | None = None) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)
        self.total_heads = int(total_heads or num_heads)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(in_features, 3 * inner, bias=bias)
        self.out_proj = nn.Linear(inner, self.embed_dim, bias=out_bias)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ShrinkError("PrunedSelfAttention supports self-attention without masks; the "
                              "model was shrunk from a call without them")
        unbatched = query.dim() == 2
        x = query.unsqueeze(0) if unbatched else (query if self.batch_first
                                                   else query.transpose(0, 1))
        n, length = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = self.out_proj(y.transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim))
        if unbatched:
            return y.squeeze(0), None
        return (y if self.batch_first else y.transpose(0, 1)), None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} of {self.total_heads}, "
                f"head_dim={self.head_dim}, batch_first={self.batch_first}")


def _shift_mask(pad_h: int, pad_w: int, window: Sequence[int], shift: Sequence[int],
                like: Tensor) -> Tensor:
    """``(windows, T, T)``: -100 between tokens of a window that came from different
    regions of the cyclically shifted map, 0 elsewhere (as torchvision's Swin)."""
    def region(n: int, w: int, s: int) -> Tensor:
        idx = torch.arange(n, device=like.device)
        return (idx >= n - w).long() + (idx >= n - s).long()

    label = region(pad_h, window[0], shift[0])[:, None] * 3 + region(pad_w, window[1], shift[1])
    label = label.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    label = label.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    differ = label.unsqueeze(1) != label.unsqueeze(2)
    return differ.to(like.dtype) * -100.0


def pruned_window_attention(input: Tensor, qkv_weight: Tensor, proj_weight: Tensor,
                            relative_position_bias: Tensor, window_size: list[int],
                            num_heads: int, shift_size: list[int], attention_dropout: float = 0.0,
                            dropout: float = 0.0, qkv_bias: Tensor | None = None,
                            proj_bias: Tensor | None = None, logit_scale: Tensor | None = None,
                            training: bool = True, head_dim: int | None = None) -> Tensor:
    """Shifted-window multi-head self-attention (Swin V1) whose inner width
    ``num_heads * head_dim`` may differ from the input's ``C``.

    ``input``: ``(B, H, W, C)``; ``qkv_weight``: ``(3 * num_heads * head_dim, C)``;
    ``proj_weight``: ``(C_out, num_heads * head_dim)``; ``relative_position_bias``:
    ``(1, num_heads, T, T)`` with ``T = window_size[0] * window_size[1]``.
    Returns ``(B, H, W, C_out)``.
    """
    if logit_scale is not None:
        raise ShrinkError("cosine window attention (Swin V2) is not supported by head pruning")
    b, h, w, c = input.shape
    wh, ww = window_size
    x = F.pad(input, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    pad_h, pad_w = x.shape[1], x.shape[2]
    shift = [0 if wh >= pad_h else shift_size[0], 0 if ww >= pad_w else shift_size[1]]
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    rows, cols, tokens = pad_h // wh, pad_w // ww, wh * ww
    windows = rows * cols
    x = x.view(b, rows, wh, cols, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * windows, tokens, c)
    d = int(head_dim) if head_dim is not None else c // num_heads
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(b * windows, tokens, 3, num_heads, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * d ** -0.5).matmul(k.transpose(-2, -1)) + relative_position_bias
    if shifted:
        mask = _shift_mask(pad_h, pad_w, window_size, shift, attn)
        attn = attn.view(b, windows, num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    y = attn.matmul(v).transpose(1, 2).reshape(b * windows, tokens, num_heads * d)
    y = F.dropout(F.linear(y, proj_weight, proj_bias), p=dropout, training=training)
    c_out = y.shape[-1]
    y = y.view(b, rows, cols, wh, ww, c_out).permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w,
                                                                               c_out)
    if shifted:
        y = torch.roll(y, shifts=(shift[0], shift[1]), dims=(1, 2))
    return y[:, :h, :w, :].contiguous()
