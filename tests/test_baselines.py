"""Baselines (issue 6): each method's own rule, exact target sparsity, fold parity."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sparsify_fx as sf
from sparsify_fx.baselines import (GMPCallback, L0Callback, STECallback, callbacks_for,
                                   erk_densities, gmp_sparsity, imp_schedule, layer_sparsities,
                                   prune_remaining, run_imp)
from sparsify_fx.baselines.l0 import GAMMA, TEMPERATURE, ZETA, L0Mask
from sparsify_fx.baselines.ste import STEMask, top_fraction
from sparsify_fx.data import digits
from sparsify_fx.errors import ConfigError
from sparsify_fx.models import DigitsCNN
from sparsify_fx.training.trainer import Trainer


@pytest.fixture(scope="module")
def small_train() -> TensorDataset:
    x, y = digits(0).train.tensors
    return TensorDataset(x[:256], y[:256])


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN(width=4, hidden=16)


def counted(gm: nn.Module) -> tuple[int, int]:
    """(kept, total) over masked weights, counted from the mask tensors."""
    es = [e for e in sf.masks(gm) if not e.mask.auxiliary]
    return (sum(int(e.mask.fold_factor().ne(0).sum()) * e.mask.weights_per_score for e in es),
            sum(e.mask.numel() for e in es))


def assert_exact(gm: nn.Module, target: float) -> None:
    kept, total = counted(gm)
    assert kept == round((1 - target) * total), (kept, total, target)


# -- distributions ----------------------------------------------------------------
def test_erk_density_budget_and_shape_rule() -> None:
    shapes = {"a": (16, 1, 3, 3), "b": (32, 16, 3, 3), "c": (10, 512)}
    dens = erk_densities(shapes, 0.5)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    mean = sum(dens[n] * sizes[n] for n in shapes) / sum(sizes.values())
    assert mean == pytest.approx(0.5, rel=1e-9)
    assert dens["a"] == 1.0  # tiny first conv would exceed density 1: made dense
    raw = {n: sum(s) / sizes[n] for n, s in shapes.items()}
    assert dens["b"] / dens["c"] == pytest.approx(raw["b"] / raw["c"], rel=1e-9)


@pytest.mark.parametrize("dist", ["uniform", "erk"])
def test_layer_distribution_is_exact_globally(dist: str) -> None:
    gm = sf.transform(tiny(), method="magnitude", target_sparsity=0.9, scope="layer",
                      distribution=dist)
    assert_exact(gm, 0.9)
    per = sf.sparsity(gm, per_layer=True)
    if dist == "uniform":
        assert all(abs(v - 0.9) < 0.02 for v in per.values()), per


# -- magnitude ----------------------------------------------------------------------
def test_magnitude_global_keeps_largest_weights() -> None:
    gm = sf.transform(tiny(), method="magnitude", target_sparsity=0.8)
    assert_exact(gm, 0.8)
    kept = torch.cat([e.weight.abs()[e.mask.hard_mask()] for e in sf.masks(gm)])
    pruned = torch.cat([e.weight.abs()[~e.mask.hard_mask()] for e in sf.masks(gm)])
    assert kept.min() >= pruned.max()


def test_magnitude_explicit_per_layer_dict() -> None:
    names = [e.name for e in sf.masks(sf.transform(tiny(), method="magnitude"))]
    alloc = {n: s for n, s in zip(names, (0.0, 0.5, 0.9, 0.25))}
    gm = sf.transform(tiny(), method="magnitude", target_sparsity=alloc)
    for e in sf.masks(gm):
        assert e.mask.kept_weights() == round((1 - alloc[e.name]) * e.mask.numel())


# -- GMP ----------------------------------------------------------------------------
def test_gmp_cubic_schedule_values() -> None:
    assert gmp_sparsity(0, 0.9, 0.0, t0=10, n=4, dt=5) == 0.0
    assert gmp_sparsity(10, 0.9, 0.0, t0=10, n=4, dt=5) == 0.0
    assert gmp_sparsity(20, 0.9, 0.0, t0=10, n=4, dt=5) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    assert gmp_sparsity(15, 0.9, 0.2, t0=10, n=4, dt=5) == pytest.approx(0.9 - 0.7 * 0.75 ** 3)
    assert gmp_sparsity(30, 0.9, 0.0, t0=10, n=4, dt=5) == pytest.approx(0.9)
    assert gmp_sparsity(99, 0.9, 0.0, t0=10, n=4, dt=5) == pytest.approx(0.9)


def test_gmp_prunes_on_schedule_monotonically_and_exactly(small_train: TensorDataset) -> None:
    gm = sf.transform(tiny(), method="gmp", target_sparsity=0.9, every=2, begin=0.0, end=0.5)
    cb = GMPCallback(gm)
    seen: list[tuple[int, dict[str, float], list[torch.Tensor]]] = []

    class Watch:
        def after_step(self, epoch: int, step: int) -> None:
            seen.append((cb.step, sf.sparsity(gm, per_layer=True),
                         [e.mask.hard_mask().clone() for e in sf.masks(gm)]))

    run = Trainer(gm, small_train, epochs=2, batch_size=32, lr=0.05, progress=False,
                  callbacks=[cb, Watch()]).fit()
    assert cb.dt == 2 and cb.n == 4  # 16 steps, end at step 8
    sizes = {e.name: e.mask.numel() for e in sf.masks(gm)}
    checked = 0
    for t, s, _ in seen:
        expected = cb.sparsity_at(t) if (t - cb.t0) % 2 == 0 and t <= 8 else None
        if expected is not None:  # per-layer thresholds (the default scope)
            assert isinstance(expected, dict) and expected.keys() == s.keys()
            for name, want in expected.items():
                # each layer is cut to its schedule value to the nearest whole weight
                kept = round((1 - s[name]) * sizes[name])
                assert abs(kept - (1 - want) * sizes[name]) <= 0.5 + 1e-6, (t, name, kept, want)
            checked += 1
    assert checked == 4  # steps 2, 4, 6, 8
    # between prune steps the masks do not move
    assert seen[1][1] == seen[2][1] and seen[7][1] == seen[15][1]  # t = 2, 3 and 8, 16
    for (_, _, a), (_, _, b) in zip(seen, seen[1:]):  # a pruned weight never comes back
        assert all(not (bb & ~aa).any() for aa, bb in zip(a, b))
    assert run.cut is not None
    assert_exact(gm, 0.9)


def test_gmp_global_threshold_follows_schedule(small_train: TensorDataset) -> None:
    gm = sf.transform(tiny(), method="gmp", target_sparsity=0.8, scope="global", every=1,
                      begin=0.0, end=1.0)
    cb = GMPCallback(gm)
    seen: list[tuple[int, int]] = []

    class Watch:
        def after_step(self, epoch: int, step: int) -> None:
            seen.append((cb.step, counted(gm)[0]))

    Trainer(gm, small_train, epochs=1, batch_size=64, lr=0.05, progress=False,
            callbacks=[cb, Watch()]).fit()
    total = counted(gm)[1]
    assert [t for t, _ in seen] == [1, 2, 3, 4] and cb.n == 4
    for t, kept in seen:  # one global threshold: the total is on schedule to one weight
        assert kept == round((1 - gmp_sparsity(t, 0.8, 0.0, 0, 4, 1)) * total)
    assert_exact(gm, 0.8)


# -- IMP ----------------------------------------------------------------------------
def test_imp_schedule_prunes_20_percent_of_remaining() -> None:
    levels = imp_schedule(0.9, 0.2)
    assert len(levels) == math.ceil(math.log(0.1) / math.log(0.8))
    for k, s in enumerate(levels[:-1], 1):
        assert s == pytest.approx(1 - 0.8 ** k)
    assert levels[-1] == 0.9


def test_prune_remaining_removes_fraction_of_kept() -> None:
    gm = sf.transform(tiny(), method="imp")
    before_mask = [e.mask.hard_mask().clone() for e in sf.masks(gm)]
    _, total = counted(gm)
    prune_remaining(gm, 0.2)
    k1, _ = counted(gm)
    assert k1 == round(0.8 * total)
    prune_remaining(gm, 0.2)
    k2, _ = counted(gm)
    assert k2 == round(0.8 * k1)
    assert all(not (e.mask.hard_mask() & ~b).any() for e, b in zip(sf.masks(gm), before_mask))


def test_run_imp_rewinds_and_hits_each_level(small_train: TensorDataset,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    gm = sf.transform(tiny(), method="imp", rewind_iteration=0)
    init = {e.name: e.weight.detach().clone() for e in sf.masks(gm)}
    starts: list[dict[str, torch.Tensor]] = []

    class Probe:  # records the weights each level starts from
        def setup(self, trainer: Trainer) -> None:
            starts.append({e.name: e.weight.detach().clone() for e in sf.masks(gm)})

    orig_init = Trainer.__init__

    def patched(self: Trainer, *a: object, **kw: object) -> None:
        kw["callbacks"] = [*kw.get("callbacks", []), Probe()]
        orig_init(self, *a, **kw)

    monkeypatch.setattr(Trainer, "__init__", patched)
    rows = run_imp(gm, small_train, targets=[0.5, 0.75], epochs=1, batch_size=64,
                   lr=0.05, progress=False)
    assert [r["level"] for r in rows] == [0, 1, 2]
    assert [r["epochs"] for r in rows] == [1, 2, 3]
    assert [r["sparsity"] for r in rows][1:] == pytest.approx([0.5, 0.75], abs=1e-3)
    for start in starts:  # every level starts from the rewound (initial) weights
        for n, w in start.items():
            assert torch.equal(w, init[n]), n
    assert_exact(gm, 0.75)
    check_fold(gm)


# -- L0 -----------------------------------------------------------------------------
def test_hard_concrete_statistics() -> None:
    torch.manual_seed(0)
    m = L0Mask((20000,), "element")
    with torch.no_grad():
        m.log_alpha.fill_(0.7)
    draws = []
    for _ in range(20):
        m.resample()
        draws.append(m.sample_gate())
    z = torch.stack(draws).detach()
    assert not torch.equal(z[0], z[1])  # resample draws new noise
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    p_nonzero = torch.sigmoid(torch.tensor(0.7 - TEMPERATURE * math.log(-GAMMA / ZETA)))
    assert float((z > 0).float().mean()) == pytest.approx(float(p_nonzero), abs=0.01)
    assert float(m.prob_nonzero().detach()[0]) == pytest.approx(float(p_nonzero), rel=1e-6)
    c = (1 - GAMMA) / (ZETA - GAMMA)  # z == 1 iff s >= c
    p_one = torch.sigmoid(torch.tensor(0.7 - TEMPERATURE * math.log(c / (1 - c))))
    assert float((z == 1).float().mean()) == pytest.approx(float(p_one), abs=0.01)
    assert torch.equal(m.sample_gate().detach(), z[-1])  # one draw until log_alpha changes
    with torch.no_grad():
        m.log_alpha.add_(0.0)  # an in-place update (as optimizer.step does) redraws
    assert not torch.equal(m.sample_gate().detach(), z[-1])
    expected_gate = min(1.0, max(0.0, float(torch.sigmoid(torch.tensor(0.7))) * 1.2 - 0.1))
    assert float(m.test_gate().detach()[0]) == pytest.approx(expected_gate, rel=1e-6)
    with torch.no_grad():
        m.log_alpha.fill_(-3.0)  # sigmoid(-3)*1.2 - 0.1 < 0: gate closed
    assert not m.learned_keep().any()


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_l0_trains_to_exact_target_and_folds_exactly(small_train: TensorDataset,
                                                     granularity: str) -> None:
    gm = sf.transform(tiny(), method="l0", granularity=granularity, target_sparsity=0.6)
    cb = L0Callback(gm)
    assert cb.gates and all(isinstance(g, L0Mask) for g, _ in cb.gates)
    before = [g.log_alpha.detach().clone() for g, _ in cb.gates]
    run = Trainer(gm, small_train, epochs=2, batch_size=32, lr=0.05, mask_lr=0.05,
                  progress=False, callbacks=[cb]).fit()
    after = [g.log_alpha.detach() for g, _ in cb.gates]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert run.cut is not None
    if granularity == "element":
        assert_exact(gm, 0.6)
    else:  # coupled channel groups: exact to one channel slot (the weights it gates)
        kept, total = counted(gm)
        slot = max(float(u.max()) for _, u in cb.gates)
        assert abs(kept - round(0.4 * total)) <= slot, (kept, total, slot)
    check_fold(gm)


def test_l0_channel_gate_is_one_sample_per_step_for_all_followers() -> None:
    gm = sf.transform(tiny(), method="l0", granularity="channel")
    gm.train()
    weight = next(e.mask for e in sf.masks(gm) if e.name == "features.0.weight")
    bias = next(e.mask for e in sf.masks(gm) if e.name == "features.0.bias")
    bn = next(e.mask for e in sf.masks(gm) if e.name == "features.1.weight")
    a = weight.soft_mask().reshape(-1)
    assert torch.equal(a, bias.soft_mask().reshape(-1))
    assert torch.equal(a, bn.soft_mask().reshape(-1))
    assert ((a > 0) & (a < 1)).any()  # a real stochastic sample, not the test gate
    for g, _ in L0Callback(gm).gates:
        g.resample()
    assert not torch.equal(a, weight.soft_mask().reshape(-1))


def test_l0_penalty_is_expected_l0_over_n() -> None:
    gm = sf.transform(tiny(), method="l0")
    cb = L0Callback(gm, lmbda=2.0)
    expected = sum(float(e.mask.prob_nonzero().detach().sum()) for e in sf.masks(gm)) / cb.total
    assert float(cb.penalty().detach()) == pytest.approx(2.0 * expected, rel=1e-5)


# -- STE ----------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_ste_gradient_is_upstream_times_sign_w(granularity: str) -> None:
    torch.manual_seed(0)
    m = STEMask((6, 5), granularity)
    with torch.no_grad():
        m.scores.copy_(torch.randn(m.score_shape))
        m.density.fill_(0.5)
    m.mark_trained()
    w = torch.randn(6, 5, requires_grad=True)
    g = torch.randn(6, 5)
    out = m(w)
    keep = m.learned_keep()
    assert int(keep.sum()) == round(0.5 * keep.numel())
    assert torch.equal(out, w.detach() * keep.float())
    (out * g).sum().backward()
    want = g * torch.sign(w.detach())
    if granularity == "channel":
        want = want.sum(1, keepdim=True)
    assert torch.allclose(m.scores.grad, want)
    assert torch.allclose(w.grad, g * keep.float())


def test_top_fraction_exact_count_with_ties() -> None:
    keep = top_fraction(torch.zeros(10, 10), 0.37)
    assert int(keep.sum()) == 37


def test_ste_learns_masks_and_ends_exact(small_train: TensorDataset) -> None:
    gm = sf.transform(tiny(), method="ste", target_sparsity=0.8)
    start = [e.mask.hard_mask().clone() for e in sf.masks(gm)]
    run = Trainer(gm, small_train, epochs=2, batch_size=32, lr=0.05, mask_lr=0.05,
                  progress=False, callbacks=[STECallback(gm)]).fit()
    assert run.cut is not None and run.cut.changed_bits == 0  # top-k already exact per layer
    assert any(not torch.equal(a, e.mask.hard_mask()) for a, e in zip(start, sf.masks(gm)))
    assert_exact(gm, 0.8)
    check_fold(gm)


# -- random -------------------------------------------------------------------------
def test_random_masks_follow_the_layer_budget_and_seed() -> None:
    a = sf.transform(tiny(), method="random", target_sparsity=0.9, seed=1)
    b = sf.transform(tiny(), method="random", target_sparsity=0.9, seed=1)
    c = sf.transform(tiny(), method="random", target_sparsity=0.9, seed=2)
    assert_exact(a, 0.9)
    shares = layer_sparsities(a, 0.9, "erk")
    for e in sf.masks(a):
        assert e.mask.kept_weights() == round((1 - shares[e.name]) * e.mask.numel())
    ma, mb, mc = ([e.mask.hard_mask() for e in sf.masks(m)] for m in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(ma, mb))
    assert any(not torch.equal(x, z) for x, z in zip(ma, mc))


# -- shared contract: every method reaches the target and folds the same way -------
def check_fold(gm: nn.Module) -> None:
    x = digits(0).test.tensors[0][:16]
    gm.eval()
    with torch.no_grad(), sf.hard_masks(gm):
        ref = gm(x)
    folded = sf.fold(gm)
    with torch.no_grad():
        got = folded.eval()(x)
    assert torch.allclose(ref, got, atol=1e-5)
    params = dict(folded.named_parameters())
    zeros = sum(int((params[e.name] == 0).sum()) for e in sf.masks(gm))
    kept, total = counted(gm)
    assert zeros >= total - kept


@pytest.mark.parametrize("method", ["magnitude", "gmp", "l0", "ste", "random", "cs"])
def test_every_method_hits_exact_target_through_trainer(small_train: TensorDataset,
                                                        method: str) -> None:
    gm = sf.transform(tiny(), method=method, target_sparsity=0.95)
    Trainer(gm, small_train, epochs=1, batch_size=64, lr=0.05, mask_lr=0.01, progress=False,
            callbacks=callbacks_for(gm)).fit()
    assert_exact(gm, 0.95)
    check_fold(gm)


def test_methods_registered_and_bad_options_named() -> None:
    assert {"magnitude", "gmp", "imp", "l0", "ste", "random"} <= set(sf.available_methods())
    with pytest.raises(ConfigError, match="scope"):
        sf.transform(tiny(), method="magnitude", target_sparsity=0.5, scope="everywhere")
    with pytest.raises(ConfigError, match="distribution"):
        sf.transform(tiny(), method="random", target_sparsity=0.5, distribution="zipf")
    with pytest.raises(ConfigError, match="target_sparsity"):
        GMPCallback(sf.transform(tiny(), method="gmp"))


# -- trainer callbacks --------------------------------------------------------------
def test_trainer_callbacks_are_called_in_order(small_train: TensorDataset) -> None:
    calls: list[str] = []
    gm = sf.transform(tiny(), method="fixed")

    class CB:
        def setup(self, trainer: Trainer) -> None:
            calls.append("setup")

        def penalty(self) -> None:
            calls.append("penalty")

        def after_step(self, epoch: int, step: int) -> None:
            calls.append(f"step {epoch}.{step}")

        def after_epoch(self, epoch: int) -> None:
            calls.append(f"epoch {epoch}")

        def finalize(self) -> object:
            calls.append("final")
            return sf.apply_budget(gm, 0.5)

    t = Trainer(gm, small_train, epochs=2, batch_size=128, lr=0.01, progress=False,
                callbacks=[CB()])
    run = t.fit()
    per_epoch = lambda e: ["penalty", f"step {e}.0", "penalty", f"step {e}.1", f"epoch {e}"]  # noqa: E731
    assert t.steps_per_epoch == 2
    assert calls == ["setup", *per_epoch(0), *per_epoch(1), "final"]
    assert run.cut is not None and run.cut.sparsity == pytest.approx(0.5, abs=1e-3)
    assert_exact(gm, 0.5)


def test_trainer_adds_callback_penalty_to_the_loss(small_train: TensorDataset) -> None:
    """One SGD step (no momentum, no weight decay): the penalty ``c * |w|^2`` on one
    weight moves it by exactly ``-lr * 2c * w`` more than the same step without it."""
    one_batch = TensorDataset(*(t[:64] for t in small_train.tensors))
    gm = sf.transform(tiny(), method="fixed")
    twin = copy.deepcopy(gm)
    w0 = sf.masks(gm)[0].weight.detach().clone()
    c, lr = 3.0, 0.01

    class L2:
        def penalty(self) -> torch.Tensor:
            return c * (sf.masks(gm)[0].weight ** 2).sum()

    for model, cbs in ((gm, [L2()]), (twin, [])):
        Trainer(model, one_batch, epochs=1, batch_size=64, lr=lr, momentum=0.0,
                weight_decay=0.0, progress=False, callbacks=cbs).fit()
    delta = sf.masks(gm)[0].weight.detach() - sf.masks(twin)[0].weight.detach()
    assert torch.allclose(delta, -lr * 2 * c * w0, atol=1e-6)
    others = [(a, b) for a, b in zip(sf.masks(gm)[1:], sf.masks(twin)[1:])]
    assert all(torch.equal(a.weight, b.weight) for a, b in others)
