"""causal-lm evaluation batches are bounded by their logits' size (a 49k vocabulary at 256
tokens held 4.5 GB of logits in one batch of 89 blocks: the run was OOM-killed); the
perplexity does not depend on the batch size."""
from __future__ import annotations

import math

import pytest
import torch

from sparsify_fx.prune.hf_task import LOGIT_BUDGET, lm_eval_batch
from sparsify_fx.prune.task import Task
from sparsify_fx.prune.text_data import TokenBlocks


def test_bounds() -> None:
    assert lm_eval_batch(256, 49152) == 5
    assert lm_eval_batch(128, 1000) == 256
    assert lm_eval_batch(4096, 262144) == 1
    assert lm_eval_batch(256, 49152) * 256 * 49152 <= LOGIT_BUDGET


def test_perplexity_independent_of_batch() -> None:
    torch.manual_seed(0)
    vocab, block = 50, 8
    emb, head = torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab)

    class LM(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return head(torch.tanh(emb(x))).transpose(1, 2)  # (B, V, T)

    data = TokenBlocks(torch.randint(0, vocab, (8 * 13 + 1,)), block)
    values = [Task("perplexity", eval_batch_size=b).evaluate(LM(), data) for b in (256, 5, 1)]
    assert math.isfinite(values[0]) and values[0] > 1.0
    assert values[1] == pytest.approx(values[0], rel=1e-6)
    assert values[2] == pytest.approx(values[0], rel=1e-6)
