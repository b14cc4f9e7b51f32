"""Learned N:M masks: CS at 2:4 granularity moves its mask while training and ends exactly
on the pattern. The task is built so that a different 2:4 mask is right: a teacher is the
same dense network with a random 2:4 mask; the student starts from the magnitude mask."""
from __future__ import annotations

import torch
from torch import nn

import sparsify_fx as sf
from sparsify_fx.baselines.mask_init import init_cs_from_masks
from sparsify_fx.granularity import parse_granularity


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def _groups_ok(keep: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    return bool((keep.reshape(keep.shape[0], -1, m).sum(-1) == n).all())


def test_pattern_threshold_relaxes_the_pattern() -> None:
    gran = parse_granularity("2:4")
    scores = (torch.randperm(72).float().reshape(6, 12) / 4).requires_grad_()  # no near-ties
    thr = gran.pattern_threshold(scores)
    assert torch.equal(scores.detach() > thr.detach(), gran.pattern_keep(scores))
    soft = torch.sigmoid(200.0 * (scores - thr))  # scores >= 1/8 from any threshold
    assert torch.allclose(soft, gran.pattern_keep(scores).float(), atol=1e-3)
    soft.sum().backward()  # the threshold carries gradient: scores of a group compete
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    # along dim 0 (x @ W weights) and a trailing short group (width 6: 4 + 2, keep 1 of 2)
    s0 = torch.randn(12, 5)
    assert torch.equal(s0 > gran.pattern_threshold(s0, input_dim=0),
                       gran.pattern_keep(s0, input_dim=0))
    s6 = torch.randn(3, 6)
    assert torch.equal(s6 > gran.pattern_threshold(s6), gran.pattern_keep(s6))


def test_cs_2_4_learns_a_mask_and_ends_exactly_on_the_pattern() -> None:
    dense = _net()
    gran = parse_granularity("2:4")
    teacher = _net()
    g = torch.Generator().manual_seed(1)
    truth = {}
    for name, p in teacher.named_parameters():
        if p.dim() == 2:
            truth[name] = gran.pattern_keep(torch.rand(p.shape, generator=g))
            p.data.mul_(truth[name])
    x = torch.randn(512, 16, generator=g)
    with torch.no_grad():
        y = teacher(x)
    assert float(y.std(0).min()) > 1e-3  # the target varies with the input

    start = sf.transform(dense, method="magnitude", granularity="2:4")
    sf.apply_budget(start, 0.5)
    cs = sf.transform(dense, method="cs", granularity="2:4", s_init=1.0)
    init_cs_from_masks(cs, start)
    begin = {e.name: e.mask.learned_keep().clone() for e in sf.masks(cs)}
    for e in sf.masks(cs):
        assert _groups_ok(begin[e.name])

    steps = 150
    sched = sf.CSScheduler(cs, epochs=1, per_step=True, steps_per_epoch=steps, beta_final=50.0)
    opt = torch.optim.Adam(sf.param_groups(cs, lr=1e-3, mask_lr=0.05))
    for step in range(steps):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = nn.functional.mse_loss(cs(x[idx]), y[idx]) + sched.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step < steps - 1:  # the hard mask holds the pattern at every step
            assert all(_groups_ok(e.mask.hard_mask()) for e in sf.masks(cs))
        sched.step()
    assert sched.cut is not None and sf.sparsity(cs) == 0.5
    changed = sched.mask_bits_changed()
    counted = sum(int((e.mask.hard_mask() != begin[e.name]).sum()) for e in sf.masks(cs))
    assert changed == counted > 0
    agree_start = agree_end = 0
    for e in sf.masks(cs):
        assert _groups_ok(e.mask.hard_mask())  # exactly 2 of every 4, counted from tensors
        agree_start += int((begin[e.name] == truth[e.name]).sum())
        agree_end += int((e.mask.hard_mask() == truth[e.name]).sum())
    assert agree_end > agree_start  # it moved toward the mask the task rewards
    folded = sf.fold(cs)
    for e in sf.masks(cs):
        w = folded.get_parameter(e.name)
        assert _groups_ok(w != 0)
