"""Misuses across the API and the CLI (issue 11): each raises a named SparsifyError
subclass whose message names the fix, leaves the input model unchanged and leaves no
partial output file behind."""
from __future__ import annotations

import errno
import os
import pathlib
from typing import Any, Callable

import pytest
import torch
from torch import nn

import sparsify_fx as sf
from sparsify_fx.cli import main as cli_main
from sparsify_fx.errors import (BudgetError, ConfigError, ExportError, FoldError, InputError,
                                SelectionError, ShrinkError, SparsifyError,
                                TargetNotAppliedError, TrainingError)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


X = torch.randn(2, 1, 8, 8)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():  # NaN-aware: a model holding NaN must keep it as it was
        assert torch.equal(torch.isnan(after[k]), torch.isnan(v)), k
        assert torch.equal(after[k].nan_to_num(0.0), v.nan_to_num(0.0)), k


def files(path: pathlib.Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def expect(error: type[SparsifyError], fix: str, call: Callable[[], Any],
           model: nn.Module | None = None, folder: pathlib.Path | None = None) -> None:
    """``call()`` raises ``error`` naming ``fix``; ``model`` and ``folder`` stay as they were."""
    before = snapshot(model) if model is not None else None
    present = files(folder) if folder is not None else None
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, SparsifyError)
    assert fix.lower() in str(info.value).lower(), str(info.value)
    if model is not None:
        assert_unchanged(model, before)  # type: ignore[arg-type]
    if folder is not None:
        assert files(folder) == present, "a partial output file was left behind"


# -- transform ---------------------------------------------------------------------------
TRANSFORM_MISUSES = {
    "target above 1": (dict(target_sparsity=1.0), ConfigError, "[0, 1)"),
    "negative target": (dict(target_sparsity=-0.1), ConfigError, "[0, 1)"),
    "target_macs zero": (dict(target_macs=0.0), ConfigError, "(0, 1]"),
    "two targets": (dict(target_sparsity=0.5, target_macs=0.5), ConfigError, "not both"),
    "unknown method": (dict(method="obs"), ConfigError, "choose one of"),
    "unknown granularity": (dict(granularity="block"), ConfigError, "use element"),
    "unknown method option": (dict(s_iinit=0.1), ConfigError, "its options are"),
    "saturated s_init": (dict(s_init=50.0), ConfigError, "s_init in [-1, 1]"),
    "globs match nothing": (dict(include=["nope.*"]), SelectionError, "loosen the globs"),
    "per-layer key matches nothing": (dict(target_sparsity={"decoder.*": 0.5}), ConfigError,
                                      "matches no masked weight"),
    "ste with target_macs": (dict(method="ste", target_macs=0.5), ConfigError,
                             "cannot honour target_macs"),
    "per-layer MACs": (dict(target_macs=0.5, per_layer=True), ConfigError,
                       "global budgets"),
    "example input not a tensor": (dict(example_inputs="image.png"), InputError,
                                   "example_inputs=torch.randn"),
}


@pytest.mark.parametrize("case", sorted(TRANSFORM_MISUSES))
def test_transform_misuse(case: str) -> None:
    kwargs, error, fix = TRANSFORM_MISUSES[case]
    model = Tiny()
    expect(error, fix, lambda: sf.transform(model, **kwargs), model)


def test_transform_of_a_function() -> None:
    expect(InputError, "wrap plain functions", lambda: sf.transform(torch.relu))  # type: ignore[arg-type]


def test_nan_weight_is_named() -> None:
    model = Tiny()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    expect(InputError, "fc.weight", lambda: sf.transform(model), model)


# -- fold / shrink / export --------------------------------------------------------------
def test_fold_twice() -> None:
    folded = sf.fold(sf.transform(Tiny()))
    expect(FoldError, "call sparsify_fx.transform(model) first", lambda: sf.fold(folded), folded)


def test_fold_of_an_untrained_target() -> None:
    gm = sf.transform(Tiny(), target_sparsity=0.9)
    expect(TargetNotAppliedError, "apply_budget", lambda: sf.fold(gm), gm)


def test_shrink_of_an_untrained_target() -> None:
    gm = sf.transform(Tiny(), granularity="channel", target_sparsity=0.5)
    expect(TargetNotAppliedError, "cannot shrink", lambda: sf.shrink(gm), gm)


def test_export_of_an_untrained_target(tmp_path: pathlib.Path) -> None:
    gm = sf.transform(Tiny(), target_sparsity=0.9)
    expect(TargetNotAppliedError, "apply_budget",
           lambda: sf.export_onnx(gm, X, tmp_path / "m.onnx"), gm, tmp_path)


def test_shrink_of_element_masks() -> None:
    gm = sf.transform(Tiny())
    expect(ShrinkError, "granularity", lambda: sf.shrink(gm), gm)


def test_export_to_a_missing_directory(tmp_path: pathlib.Path) -> None:
    model = Tiny()
    expect(ExportError, "does not exist",
           lambda: sf.export_onnx(model, X, tmp_path / "no" / "m.onnx"), model, tmp_path)


def test_export_with_a_mismatched_input(tmp_path: pathlib.Path) -> None:
    model = Tiny()
    expect(InputError, "pass inputs the model accepts",
           lambda: sf.export_onnx(model, torch.randn(2, 3, 8, 8),
                                                   tmp_path / "m.onnx"), model, tmp_path)


def test_export_on_a_full_disk(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    def no_space(*_a: Any, **_k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", no_space)
    monkeypatch.setattr(onnx, "save", no_space)
    model = Tiny()
    expect(ExportError, "no space left", lambda: sf.export_onnx(model, X, tmp_path / "m.onnx"),
           model, tmp_path)


# -- report ------------------------------------------------------------------------------
def test_report_with_a_mismatched_input() -> None:
    model = Tiny()
    expect(InputError, "the model accepts",
           lambda: sf.report(model, torch.randn(2, 3, 8, 8)), model)


def test_report_with_a_non_tensor_input() -> None:
    model = Tiny()
    expect(InputError, "tensor", lambda: sf.report(model, "an image"), model)


def test_sparsity_of_a_plain_model() -> None:
    expect(InputError, "call sparsify_fx.transform first", lambda: sf.sparsity(Tiny()))


# -- budgets and schedulers ----------------------------------------------------------------
def test_apply_budget_without_a_target() -> None:
    gm = sf.transform(Tiny())
    expect(ConfigError, "exactly one of", lambda: sf.apply_budget(gm), gm)


def test_apply_budget_macs_without_inputs() -> None:
    gm = sf.transform(Tiny())
    expect(ConfigError, "example_inputs=", lambda: sf.apply_budget(gm, target_macs=0.5), gm)


def test_coupled_channel_masks_refuse_per_layer_targets() -> None:
    gm = sf.transform(Tiny(), granularity="channel")
    expect(ConfigError, "one global target",
           lambda: sf.apply_budget(gm, {"conv.weight": 0.5}), gm)


def test_channel_budget_that_cannot_be_met() -> None:
    gm = sf.transform(Tiny(), granularity="channel")
    expect(BudgetError, "raise the budget", lambda: sf.apply_budget(gm, 0.99999), gm)


def test_cs_scheduler_on_a_magnitude_model() -> None:
    gm = sf.transform(Tiny(), method="magnitude")
    expect(ConfigError, "method='cs'", lambda: sf.CSScheduler(gm, epochs=2), gm)


def test_cs_scheduler_with_no_epochs() -> None:
    gm = sf.transform(Tiny())
    expect(ConfigError, "epochs must be >= 1", lambda: sf.CSScheduler(gm, epochs=0), gm)


# -- training -------------------------------------------------------------------------------
DATA = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))


def test_frozen_weights_leave_nothing_to_train() -> None:
    model = Tiny().requires_grad_(False)
    gm = sf.transform(model, method="magnitude", target_sparsity=0.5)
    expect(TrainingError, "requires_grad_()",
           lambda: sf.Trainer(gm, DATA, epochs=1, progress=False), gm)


def test_method_options_for_a_method_without_training() -> None:
    gm = sf.transform(Tiny(), method="magnitude", target_sparsity=0.5)
    expect(TrainingError, "remove them",
           lambda: sf.Trainer(gm, DATA, epochs=1, progress=False, beta_final=100), gm)


def test_ticket_search_needs_rounds() -> None:
    gm = sf.transform(Tiny(), method="magnitude", target_sparsity=0.5)
    trainer = sf.Trainer(gm, DATA, epochs=1, progress=False)
    expect(TrainingError, "method='cs'", lambda: trainer.search_ticket(rounds=2), gm)


def test_nan_inputs_stop_training(tmp_path: pathlib.Path) -> None:
    bad = torch.utils.data.TensorDataset(torch.full((8, 1, 8, 8), float("nan")),
                                         torch.zeros(8, dtype=torch.long))
    gm = sf.transform(Tiny())
    trainer = sf.Trainer(gm, bad, epochs=1, progress=False,
                         checkpoint_path=str(tmp_path / "ck.pt"))
    expect(TrainingError, "check the inputs for nan", trainer.fit, folder=tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint(tmp_path: pathlib.Path, damage: str) -> None:
    path = tmp_path / "ck.pt"
    gm = sf.transform(Tiny())
    sf.Trainer(gm, DATA, epochs=1, progress=False, checkpoint_path=str(path)).fit()
    raw = path.read_bytes()
    path.write_bytes(b"not a checkpoint" if damage == "garbage" else raw[: len(raw) // 2])
    fresh = sf.transform(Tiny())
    trainer = sf.Trainer(fresh, DATA, epochs=2, progress=False)
    expect(TrainingError, "corrupt or truncated", lambda: trainer.fit(resume_from=str(path)),
           fresh, tmp_path)


def test_resume_with_another_model(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ck.pt"
    sf.Trainer(sf.transform(Tiny()), DATA, epochs=1, progress=False,
               checkpoint_path=str(path)).fit()
    other = sf.transform(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    trainer = sf.Trainer(other, DATA, epochs=2, progress=False)
    expect(TrainingError, "another model", lambda: trainer.fit(resume_from=str(path)),
           other, tmp_path)


def test_checkpoint_on_a_full_disk(tmp_path: pathlib.Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import sparsify_fx.training.checkpoint as ck

    def no_space(_obj: Any, f: Any) -> None:
        pathlib.Path(f).write_bytes(b"partial")  # a write that dies half way
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", no_space)
    gm = sf.transform(Tiny())
    trainer = sf.Trainer(gm, DATA, epochs=1, progress=False,
                         checkpoint_path=str(tmp_path / "ck.pt"))
    expect(TrainingError, "free disk space", trainer.fit, folder=tmp_path)


def test_ctrl_c_during_fit_keeps_the_last_checkpoint_loadable(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ck.pt"

    class CtrlC:
        def after_step(self, epoch: int, step: int) -> None:
            if epoch == 1 and step == 1:
                raise KeyboardInterrupt

    gm = sf.transform(Tiny(), target_sparsity=0.5)
    trainer = sf.Trainer(gm, DATA, epochs=3, batch_size=8, progress=False,
                         checkpoint_path=str(path), callbacks=[CtrlC()])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # no temporary file left
    fresh = sf.transform(Tiny(), target_sparsity=0.5)
    resumed = sf.Trainer(fresh, DATA, epochs=3, batch_size=8, progress=False)
    assert resumed.load_state_dict(torch.load(path, weights_only=False)) == 1
    resumed.fit(resume_from=str(path))
    assert sf.sparsity(fresh) == pytest.approx(0.5, abs=1e-3)


# -- command line -----------------------------------------------------------------------------
def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli_main(list(argv))
    err = capsys.readouterr().err
    return code, err


CLI_MISUSES = {
    "short input shape": (["export", "torchvision:resnet18", "-o", "{o}/r.onnx",
                           "--input-shape", "1,3"], "input"),
    "missing model file": (["report", "{o}/nothing.pt", "--trust-pickle"], "not found"),
    "unknown torchvision name": (["report", "torchvision:resnet19"], "resnet18"),
    "pickle without trust": (["report", "{o}/model.pt"], "--trust-pickle"),
    "unknown subcommand": (["sparsify"], "use one of"),
}


@pytest.mark.parametrize("case", sorted(CLI_MISUSES))
def test_cli_misuse(case: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, fix = CLI_MISUSES[case]
    torch.save(Tiny(), tmp_path / "model.pt")
    present = files(tmp_path)
    code, err = run_cli(capsys, *[a.format(o=tmp_path) for a in argv])
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fix.lower() in err.lower(), err
    assert files(tmp_path) == present


def test_cli_model_that_raises_on_the_input(tmp_path: pathlib.Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "report", "tests.test_bad_inputs:Tiny", "--input-shape", "1,3,8,8")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "fix --input-shape" in err

