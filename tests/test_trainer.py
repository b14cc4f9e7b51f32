"""Trainer: resume bit-identically, stop on NaN, ticket search rows (issue 3, 2/6/7)."""
from __future__ import annotations

import os

import pytest
import torch

import sparsify_fx as sf
from sparsify_fx.data import digits
from sparsify_fx.models import DigitsCNN
from sparsify_fx.training.trainer import Trainer, evaluate


def make(target: float | None = 0.9) -> torch.nn.Module:
    torch.manual_seed(0)
    return sf.transform(DigitsCNN(width=4, hidden=16), target_sparsity=target)


def trainer(gm: torch.nn.Module, path: str | None, epochs: int = 4) -> Trainer:
    return Trainer(gm, digits(0).train, epochs=epochs, lr=0.05, mask_lr=0.01, seed=3,
                   checkpoint_path=path, progress=False)


def test_resume_is_bit_identical(tmp_path: os.PathLike) -> None:
    full = make()
    trainer(full, None).fit()
    path = os.path.join(tmp_path, "ckpt.pt")
    first = make()

    class Stop(Exception):
        pass

    def stop_after_epoch_1(epoch: int, _log: dict) -> None:
        if epoch == 2:  # the hook runs before epoch 2's checkpoint: epoch 1's is the last
            raise Stop

    t = trainer(first, path)
    t.eval_hook = stop_after_epoch_1
    with pytest.raises(Stop):
        t.fit()
    assert torch.load(path, weights_only=False)["epoch"] == 1
    resumed = make()
    trainer(resumed, path).fit(resume_from=path)
    for a, b in zip(sf.masks(full), sf.masks(resumed)):
        assert torch.equal(a.mask.hard_mask(), b.mask.hard_mask()), a.name
        assert torch.equal(a.mask.scores, b.mask.scores), a.name


def test_nan_loss_stops_with_named_error_and_keeps_checkpoint(tmp_path: os.PathLike) -> None:
    path = os.path.join(tmp_path, "ckpt.pt")
    gm = make(None)
    t = trainer(gm, path, epochs=3)
    calls = {"n": 0}
    base = t.loss_fn

    def poisoned(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = base(out, y)
        return loss * float("nan") if calls["n"] > t.steps_per_epoch + 2 else loss

    t.loss_fn = poisoned
    with pytest.raises(sf.TrainingError, match=r"epoch 1, step 2, beta 14\.14") as info:
        t.fit()
    assert "checkpoint" in str(info.value)
    state = torch.load(path, weights_only=False)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_ticket_search_rows() -> None:
    gm = make(0.8)
    data = digits(0)
    t = Trainer(gm, data.train, data.loader("val"), epochs=2, lr=0.05, mask_lr=0.01,
                progress=False)
    rows = t.search_ticket(rounds=2, rewind_iteration=3, retrain_epochs=2)
    assert [r["stage"] for r in rows] == ["round 1", "round 2", "ticket (retrained)"]
    assert rows[-1]["epochs"] == 6
    assert rows[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    # every stage is above chance (10 %; two epochs per stage learn little), and the
    # ticket row reports the model as it is now
    assert all(r["accuracy"] > 20.0 for r in rows), rows
    assert rows[-1]["accuracy"] == pytest.approx(evaluate(gm, data.loader("val")))


def test_fine_tuning_a_cut_cs_model_keeps_the_mask_and_needs_no_scheduler() -> None:
    """After the exact cut, Trainer fine-tunes a CS model as a fixed mask: no penalty,
    no controller, no second cut (so a MACs budget needs no example_inputs again)."""
    data = digits(0)
    x = data.train.tensors[0][:2]
    torch.manual_seed(0)
    gm = sf.transform(DigitsCNN(width=4, hidden=16), granularity="channel", target_macs=0.5)
    Trainer(gm, data.train, epochs=2, lr=0.05, mask_lr=0.01, progress=False,
            example_inputs=x).fit()
    before = [e.mask.hard_mask().clone() for e in sf.masks(gm)]
    weight = sf.masks(gm)[1].weight.detach().clone()
    tune = Trainer(gm, data.train, epochs=1, lr=0.01, progress=False)
    assert tune.scheduler is None
    run = tune.fit()
    assert run.cut is None
    assert all(torch.equal(a, e.mask.hard_mask()) for a, e in zip(before, sf.masks(gm)))
    assert not torch.equal(weight, sf.masks(gm)[1].weight.detach())  # the weights did train
