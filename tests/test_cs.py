"""Faithfulness of the CS implementation to the paper/reference (issue 3, acceptance 3)."""
from __future__ import annotations

import math

import pytest
import torch

import sparsify_fx as sf
from sparsify_fx.data import digits
from sparsify_fx.models import DigitsCNN
from sparsify_fx.training.trainer import Trainer
from tests.helpers import max_diff


def tiny(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return sf.transform(DigitsCNN(width=4, hidden=16), **kw)


def betas_of(gm: torch.nn.Module) -> set[float]:
    return {float(e.mask.beta) for e in sf.masks(gm)}


def test_beta_schedule_per_epoch() -> None:
    gm = tiny()
    cs = sf.CSScheduler(gm, epochs=5, beta_final=200.0)
    seen = []
    for _ in range(5):
        (b,) = betas_of(gm)
        seen.append(b)
        cs.step()
    expected = [200.0 ** (e / 4) for e in range(5)]
    assert seen == pytest.approx(expected, rel=1e-6)
    assert seen[0] == 1.0 and seen[-1] == pytest.approx(200.0)


def test_beta_schedule_per_step() -> None:
    gm = tiny()
    cs = sf.CSScheduler(gm, epochs=2, beta_final=50.0, per_step=True, steps_per_epoch=3)
    seen = []
    for _ in range(6):
        seen.append(cs.beta)
        cs.step()
    assert seen == pytest.approx([50.0 ** (t / 5) for t in range(6)])
    with pytest.raises(sf.ConfigError, match="steps_per_epoch"):
        sf.CSScheduler(gm, epochs=2, per_step=True)


def test_penalty_value_is_lambda_times_sum_of_soft_masks() -> None:
    gm = tiny(s_init=-0.3)
    cs = sf.CSScheduler(gm, epochs=3, lmbda=1e-3)
    cs.step()  # beta = sqrt(200)
    beta = 200.0 ** 0.5
    scale = 1.0 / (1.0 / (1.0 + math.exp(0.3)))
    n = sum(e.mask.numel() for e in sf.masks(gm))
    expected = 1e-3 * n * scale / (1.0 + math.exp(0.3 * beta))
    assert float(cs.penalty().detach()) == pytest.approx(expected, rel=1e-5)


def test_initial_mask_is_one_and_hard_mask_keeps_scale() -> None:
    gm = tiny(s_init=-0.5)
    m = sf.masks(gm)[0].mask
    assert torch.allclose(m.soft_mask(), torch.ones(m.score_shape))
    with torch.no_grad():
        m.scores.copy_(torch.linspace(-1, 1, m.scores.numel()).reshape(m.score_shape))
    # untrained (no scheduler ran): the hard mask keeps everything, factor exactly 1
    assert torch.equal(m.fold_factor(), torch.ones(m.score_shape))
    m.mark_trained()
    factor = m.fold_factor()
    scale = 1.0 + math.exp(0.5)
    assert factor.unique().tolist() == pytest.approx([0.0, scale])
    assert torch.equal(factor > 0, m.scores > 0)
    no_rescale = tiny(s_init=-0.5, rescale=False)
    assert sf.masks(no_rescale)[0].mask.scale == 1.0


def test_param_groups_no_weight_decay_on_scores() -> None:
    gm = tiny()
    groups = sf.param_groups(gm, lr=0.1, weight_decay=5e-4)
    weights, scores = groups
    mask_ids = {id(e.mask.scores) for e in sf.masks(gm)}
    assert {id(p) for p in scores["params"]} == mask_ids
    assert not mask_ids & {id(p) for p in weights["params"]}
    assert weights["weight_decay"] == 5e-4 and scores["weight_decay"] == 0.0
    assert scores["lr"] == 0.1
    opt = torch.optim.SGD(groups, lr=0.1)
    assert len(opt.param_groups) == 2
    assert sf.param_groups(gm, mask_lr=0.01, lr=0.1)[1]["lr"] == 0.01


@pytest.mark.parametrize("reference", [False, True])
def test_round_clamp(reference: bool) -> None:
    gm = tiny(s_init=-0.1)
    cs = sf.CSScheduler(gm, epochs=2, beta_final=100.0)
    m = sf.masks(gm)[0].mask
    s = torch.tensor([-0.5, -0.01, 0.0, 0.0005, 0.002, 0.3])
    with torch.no_grad():
        m.scores.view(-1)[:6] = s
    cs.step()
    cs.next_round(reference_clamp=reference)
    factor = 1.0 if reference else 100.0
    assert torch.allclose(m.scores.view(-1)[:6], torch.clamp(factor * s, max=-0.1))
    assert cs.beta == 1.0 and float(m.beta) == 1.0 and cs.round == 1
    # the two rules differ on pruned scores: the intended one pushes them 100x further down
    assert float(m.scores.detach().view(-1)[1]) == pytest.approx(-0.1 if reference else -1.0)
    assert float(m.scores.detach().view(-1)[5]) == pytest.approx(-0.1)  # kept ones restart at s_init


def test_fold_after_training_reproduces_trained_model() -> None:
    data = digits(0)
    gm = tiny(target_sparsity=0.8)
    Trainer(gm, data.train, epochs=3, lr=0.05, mask_lr=0.01, progress=False).fit()
    x = data.test.tensors[0][:64]
    gm.eval()
    sf.set_hard(gm)
    folded = sf.fold(gm)
    with torch.no_grad():
        assert max_diff(folded(x), gm(x)) <= 1e-5
    assert sf.sparsity(gm) == pytest.approx(0.8, abs=1.0 / sum(e.mask.numel() for e in sf.masks(gm)))


def test_controller_lands_near_the_target_before_the_cut() -> None:
    """The PI controller brings the learned mask (``s > 0``) close to the target, so the
    exact final cut flips few bits (the reviewers' complaint: CS cannot hit a target)."""
    data = digits(1)
    torch.manual_seed(1)
    gm = sf.transform(DigitsCNN(), target_sparsity=0.9)
    trainer = Trainer(gm, data.train, epochs=12, lr=0.05, mask_lr=0.01, seed=1, progress=False)
    trainer.fit(finalize=False)
    learned = sum(int(e.mask.learned_keep().sum()) for e in sf.masks(gm))
    total = sum(e.mask.numel() for e in sf.masks(gm))
    assert abs(learned / total - 0.1) < 0.03, learned / total
    cut = trainer.scheduler.finalize()
    assert abs(learned - cut.kept) <= cut.changed_bits < 0.03 * total
    assert sf.sparsity(gm) == pytest.approx(0.9, abs=1.0 / total)


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_transform_keeps_the_function_and_rescale_false_halves_it(granularity: str) -> None:
    """Default (reference) rescaling: the transformed model computes the original
    function; ``rescale=False`` starts every mask at sigmoid(0) = 0.5."""
    torch.manual_seed(0)
    model = DigitsCNN(width=4, hidden=16).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert max_diff(sf.transform(model, granularity=granularity)(x), model(x)) <= 1e-5
        halved = sf.transform(model, granularity=granularity, rescale=False)
        assert all(m.scale == 1.0 for m in halved.modules() if isinstance(m, sf.CSMask))
        assert max_diff(halved(x), model(x)) > 1e-3


@pytest.mark.parametrize("s_init, beta, rescale", [(0.0, 1.0, True), (0.0, 7.5, True),
                                                   (0.4, 7.5, True), (-0.2, 0.3, False)])
def test_cs_element_mask_step_equals_the_plain_expression(s_init: float, beta: float,
                                                          rescale: bool) -> None:
    """The element CSMask's fused forward/backward gives autograd's values of
    ``weight * (sigmoid(beta * s) * scale)`` for the weight and the scores: bit for bit
    when the scale is a power of two (the default s_init=0: 2; rescale=False: 1)."""
    torch.manual_seed(0)
    mask = sf.CSMask((64, 32, 3, 3), s_init=s_init, beta=beta, rescale=rescale)
    with torch.no_grad():
        mask.scores.add_(torch.randn_like(mask.scores))
    weight = torch.randn(64, 32, 3, 3, requires_grad=True)
    grad = torch.randn(64, 32, 3, 3)
    mask(weight).backward(grad)
    fused = (mask(weight).detach(), weight.grad.clone(), mask.scores.grad.clone())
    weight.grad, mask.scores.grad = None, None
    plain = weight * (torch.sigmoid(mask.beta * mask.scores) * mask.scale)
    plain.backward(grad)
    assert fused[1].abs().max() > 0 and fused[2].abs().max() > 0
    exact = math.frexp(mask.scale)[0] == 0.5
    for got, want in zip(fused, (plain.detach(), weight.grad, mask.scores.grad)):
        if exact:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
