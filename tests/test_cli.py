"""Safe model loading and one-line errors for every ``sparsify-fx`` subcommand (issue 11)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparsify_fx.cli import main as cli_main
from sparsify_fx.errors import InputError
from sparsify_fx.cli.model_inputs import load_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
FACTORY = "tests.test_cli:small_mlp"


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


class _Payload:
    """Unpickling this touches a file: proof of whether code from the file ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_pickled_module_needs_trust_pickle_and_runs_no_code_without_it(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save(_Payload(str(marker)), evil)
    assert cli_main(["report", str(evil), "--input-shape", "1,16"]) == 2
    err = _one_line_error(capsys)
    assert "--trust-pickle" in err and "runs code" in err
    assert not marker.exists()
    # a genuine whole module loads with the flag (and only then)
    whole = tmp_path / "whole.pt"
    torch.manual_seed(0)
    torch.save(small_mlp(), whole)
    assert cli_main(["report", str(whole), "--input-shape", "1,16"]) == 2
    _one_line_error(capsys)
    assert cli_main(["report", str(whole), "--input-shape", "1,16", "--format", "json",
                     "--trust-pickle"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["params"] == 16 * 8 + 8 + 8 * 3 + 3


def test_factory_with_weights_loads_them_weights_only(tmp_path: pathlib.Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = small_mlp()
    with torch.no_grad():
        model[1].weight[:, :8] = 0.0  # half of the first layer's weights
    sd = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert cli_main(["report", FACTORY, "--weights", str(sd), "--input-shape", "2,16",
                         "--format", "json"]) == 0
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
        assert rows["1.weight"]["nonzeros"] == 64 and rows["3.weight"]["nonzeros"] == 24
        loaded = load_model(FACTORY, str(sd))
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
        # a state_dict passed as MODEL, and weights that do not fit, are named
        assert cli_main(["report", str(sd), "--input-shape", "2,16"]) == 2
        assert "--weights" in _one_line_error(capsys)
        wrong = tmp_path / "wrong.pt"
        torch.save(nn.Linear(3, 3).state_dict(), wrong)
        assert cli_main(["report", FACTORY, "--weights", str(wrong), "--input-shape", "2,16"]) == 2
        assert "does not fit" in _one_line_error(capsys)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("argv, words", [
    (["export", "torchvision:resnet18", "-o", "{tmp}/r.onnx", "--input-shape", "1,3"],
     ["fails on an example input of shape (1, 3)", "--input-shape"]),
    (["export", "{tmp}/missing.pt", "-o", "{tmp}/r.onnx", "--input-shape", "1,3,32,32"],
     ["not found"]),
    (["report", "torchvision:resnet18", "--input-shape", "1,a,3"], ["is not a shape"]),
    (["report", FACTORY, "--input-shape", "1,16", "--weights", "{tmp}/none.pt"], ["not found"]),
    (["report", "tests.test_cli:no_such_factory", "--input-shape", "1,16"], ["has no"]),
    (["report", "nopkg_xyz.models:net", "--input-shape", "1,16"], ["cannot import"]),
    (["report", FACTORY, "--input-shape", "1,16", "-o", "/proc/x/report.txt"],
     ["cannot write --output"]),
    (["prune", FACTORY, "--data", "mnist:{tmp}/nowhere", "-o", "{tmp}/o",
      "--target-sparsity", "0.5"], ["folder not found"]),
    (["prune", FACTORY, "--data", "digits", "-o", "{tmp}/o", "--target-sparsity", "0.5"],
     ["fails on an example input of shape (1, 1, 8, 8)", "DATA and MODEL do not fit"]),
    (["prune", FACTORY, "--data", "digits", "-o", "{tmp}/o"], ["exactly one of"]),
    (["prune", "tests.test_prune:tiny_cnn", "--data", "digits", "-o", "{tmp}/o",
      "--target-latency", "0.5"], ["target_latency", "granularity='channel'"]),
    (["prune", "--recipe", "{tmp}/none.toml", "-o", "{tmp}/o"], ["recipe", "not found"]),
])
def test_cli_errors_are_one_line_exit_2(argv: list[str], words: list[str],
                                        tmp_path: pathlib.Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert cli_main(argv) == 2
    finally:
        os.chdir(cwd)
    err = _one_line_error(capsys)
    for w in words:
        assert w in err, err
    assert not (tmp_path / "r.onnx").exists() and not (tmp_path / "o").exists()


def test_debug_shows_the_traceback_and_help_warns_about_pickle(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match="is not a shape"):
        cli_main(["report", "torchvision:resnet18", "--input-shape", "a", "--debug"])
    for sub in ("report", "export", "prune"):
        assert cli_main([sub, "--help"]) == 0
        assert "RUNS CODE FROM THE FILE" in " ".join(capsys.readouterr().out.split())
    assert cli_main(["frobnicate"]) == 2
    assert "unknown subcommand" in _one_line_error(capsys)


def test_real_process_prints_one_line_and_exits_2(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "sparsify_fx", "export", "torchvision:resnet18",
                           "-o", str(tmp_path / "r.onnx"), "--input-shape", "1,3"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("sparsify-fx export: error:")
    assert not (tmp_path / "r.onnx").exists()
