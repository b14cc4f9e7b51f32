"""``sparsify-fx prune`` end to end on digits (issue 16): outputs, exact sparsity, ONNX
accuracy equal to PyTorch's, kill + resume bit-identical, recipe errors, OUTDIR guard.

The model factory and the data function below are what the command imports
(``tests.test_prune:tiny_cnn``, ``tests.test_prune:digits_data``).
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from sparsify_fx.prune import load_pruned
from sparsify_fx.cli.prune import main as prune_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGET = 0.8
KILL_ENV = "SPARSIFY_FX_TEST_KILL_WHEN"  # path: once it exists, the next sample sends a signal
SIGNAL_ENV = "SPARSIFY_FX_TEST_KILL_SIGNAL"


def tiny_cnn() -> nn.Module:
    """A small digits CNN (1x8x8 -> 10), fast enough for the default suite."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 32), nn.ReLU(),
                         nn.Linear(32, 10))


class _Killing(Dataset):
    """Digits samples; sends itself a signal once the file named by KILL_ENV exists."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        when = os.environ.get(KILL_ENV)
        if when and os.path.exists(when):
            os.environ.pop(KILL_ENV)
            os.kill(os.getpid(), int(os.environ.get(SIGNAL_ENV, signal.SIGTERM)))
        return self.base[i]


def digits_data() -> tuple[Dataset, Dataset]:
    from sparsify_fx.data import digits
    s = digits(0)
    return _Killing(s.train), s.test


def _args(out: pathlib.Path, *extra: str) -> list[str]:
    return ["tests.test_prune:tiny_cnn", "--data", "tests.test_prune:digits_data", "-o", str(out),
            "--target-sparsity", str(TARGET), "--epochs", "2", "--finetune-epochs", "1",
            "--batch-size", "128", "--quiet", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One uninterrupted run (run from the repo root, as a user would)."""
    out = tmp_path_factory.mktemp("prune") / "run"
    assert _prune_from_root(_args(out)) == 0
    return out


def _prune_from_root(argv: list[str]) -> int:
    """``sparsify-fx prune argv`` run from the repo root, as a user would."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return prune_main(argv)
    finally:
        os.chdir(cwd)


def _state(out: pathlib.Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


def test_end_to_end_outputs_exact_sparsity_and_onnx_accuracy(finished: pathlib.Path) -> None:
    import onnxruntime as ort

    for name in ("model.pt", "report.md", "report.json", "sparsity.png", "model.onnx",
                 "summary.json", "recipe.toml"):
        assert (finished / name).is_file(), name
    assert not (finished / ".staging").exists()
    rep = json.loads((finished / "report.json").read_text())
    masked = [row for row in rep["layers"] if row["masked"]]
    total = sum(row["params"] for row in masked)
    kept = sum(row["nonzeros"] for row in masked)
    assert kept == round((1 - TARGET) * total)  # exact to one weight
    assert abs(rep["totals"]["masked_sparsity"] - TARGET) <= 1.0 / total

    summary = json.loads((finished / "summary.json").read_text())
    assert summary["command"].startswith("sparsify-fx prune tests.test_prune:tiny_cnn")
    assert summary["recipe"]["target_sparsity"] == TARGET
    # the pruned model, rebuilt from model.pt alone, is the model the summary measured
    model = load_pruned(finished / "model.pt").eval()
    x_val, y_val = digits_data()[1].tensors
    with torch.no_grad():
        logits = model(x_val)
    assert not torch.allclose(logits[0], logits[1])  # the output depends on the input
    torch_acc = 100.0 * int((logits.argmax(1) == y_val).sum()) / len(y_val)
    assert torch_acc == pytest.approx(summary["accuracy"]["after"], abs=1e-9)
    assert torch_acc > 30.0  # well above chance (10 %) after 3 short epochs at 80 % sparsity
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    zeros = sum(int((p == 0).sum()) for p in weights)
    assert zeros == total - kept
    session = ort.InferenceSession(str(finished / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: x_val.numpy()})[0]
    onnx_acc = 100.0 * int((np.argmax(onnx_logits, 1) == y_val.numpy()).sum()) / len(y_val)
    assert onnx_acc == pytest.approx(torch_acc, abs=1e-9)
    assert onnx_acc == pytest.approx(summary["accuracy"]["onnx"], abs=1e-9)
    assert np.abs(onnx_logits - logits.numpy()).max() < 1e-3


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM,
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_kill_after_epoch_one_then_resume_is_bit_identical(finished: pathlib.Path,
                                                           tmp_path: pathlib.Path,
                                                           sig: signal.Signals) -> None:
    out = tmp_path / "killed"
    env = {**os.environ, KILL_ENV: str(out / "checkpoints" / "train.pt"),
           SIGNAL_ENV: str(int(sig))}
    # A shell that starts jobs in the background (CI runners, `make test &`, nohup) hands them
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler: restore the
    # default disposition in the child so that it sees the signal as a user's Ctrl-C would.
    proc = subprocess.run([sys.executable, "-m", "sparsify_fx", "prune", *_args(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=_default_sigint)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "resume" in proc.stderr
    assert torch.load(out / "checkpoints" / "train.pt", weights_only=False)["epoch"] == 0
    assert not any((out / n).exists() for n in ("model.pt", "model.onnx", "summary.json"))
    assert _prune_from_root(_args(out)) == 0
    resumed, straight = _state(out), _state(finished)
    assert resumed.keys() == straight.keys()
    differ = [k for k in straight if not torch.equal(resumed[k], straight[k])]
    assert not differ, (differ, torch.get_num_threads(), torch.get_num_interop_threads())
    assert json.loads((out / "summary.json").read_text())["resumed"] is True
    assert (out / "model.onnx").read_bytes() == (finished / "model.onnx").read_bytes()


def test_existing_outdir_with_another_recipe_is_refused(finished: pathlib.Path, capsys) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in finished.iterdir()}
    assert prune_main(_args(finished, "--lr", "0.2")) == 2
    err = capsys.readouterr().err
    assert "another recipe" in err and "lr" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in finished.iterdir()} == before
    assert prune_main(_args(finished)) == 0  # the same recipe: complete, nothing to do
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("text, words", [
    ("epochs = 2\nlearning_rate = 0.1\n", ["unknown key 'learning_rate'", "valid keys:",
                                            "target_sparsity", "finetune_epochs"]),
    ("epochs = 2\ntarget-sparsity = \"high\"\n", ["target_sparsity must be a float", "'high'"]),
    ("epochs = 2.5\n", ["epochs must be a int"]),
    ("keep_first = 1\n", ["keep_first must be a bool"]),
    ("method = \"prune-it\"\n", ["not one of", "cs"]),
    ("epochs = \n", ["not valid TOML"]),
])
def test_bad_recipe_is_one_named_line(tmp_path: pathlib.Path, capsys, text: str,
                                      words: list[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    out = tmp_path / "out"
    assert prune_main(_args(out, "--recipe", str(recipe))) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err, err
    assert not out.exists()


def test_flags_override_recipe_and_print_recipe_round_trips(tmp_path: pathlib.Path,
                                                            capsys) -> None:
    from sparsify_fx.prune.recipe import load_recipe
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "m:f"\ndata = "digits"\nepochs = 7\nlr = 0.3\n'
                      'exclude = ["classifier.*"]\n')
    assert prune_main(["--recipe", str(recipe), "--lr", "0.1", "--print-recipe",
                       "--no-keep-last"]) == 0
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out)
    effective = load_recipe(str(printed), {})
    assert effective["epochs"] == 7 and effective["lr"] == 0.1
    assert effective["exclude"] == ["classifier.*"] and effective["keep_last"] is False
    assert effective == load_recipe(str(recipe), {"lr": 0.1, "keep_last": False})


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["--granularity", "channel", "--target-macs", "0.5"],
    ["--method", "magnitude", "--target-sparsity", "0.7"],
    ["--method", "gmp", "--target-sparsity", "0.7"],
])
def test_other_methods_and_channel_shrink(tmp_path: pathlib.Path, extra: list[str]) -> None:
    out = tmp_path / "run"
    args = [a for a in _args(out) if a not in ("--target-sparsity", str(TARGET))]
    assert _prune_from_root(args + extra) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"]["onnx_equals_pytorch"] is True
    model = load_pruned(out / "model.pt").eval()
    assert sum(p.numel() for p in model.parameters()) == summary["params"]["after"]
    x_val, y_val = digits_data()[1].tensors
    with torch.no_grad():
        acc = 100.0 * int((model(x_val).argmax(1) == y_val).sum()) / len(y_val)
    assert acc == pytest.approx(summary["accuracy"]["after"], abs=1e-9)
    if "--target-macs" in extra:
        assert summary["macs"]["ratio"] <= 0.5
        assert summary["params"]["after"] < summary["params"]["before"]  # a smaller model
    else:
        assert summary["sparsity"]["masked"] == pytest.approx(0.7, abs=1e-3)


def test_quantize_int8_writes_a_verified_int8_file_beside_fp32(tmp_path: pathlib.Path) -> None:
    import onnx

    from sparsify_fx.export.quantize import count_int8_weights

    out = tmp_path / "q"
    assert _prune_from_root(_args(out, "--quantize", "int8", "--target-sparsity", "0.5")) == 0
    summary = json.loads((out / "summary.json").read_text())
    q = summary["int8"]
    assert q["mode"] == "int8" and q["calibration_batches"] > 0
    assert (out / "model_int8.onnx").stat().st_size == q["bytes"] < q["fp32_bytes"]
    n_int8, _ = count_int8_weights(onnx.load(str(out / "model_int8.onnx")))
    assert n_int8 >= 3  # conv and both linear weights
    assert abs(q["accuracy_onnx"] - summary["accuracy"]["onnx"]) <= 2.0
    assert summary["accuracy"]["onnx"] > 50.0  # a trained model, not a constant output
    table = (out / "report.md").read_text()
    assert "model_int8.onnx (pruned int8)" in table and "input model, dense fp32" in table
    assert q["bytes"] < summary["dense_onnx"]["bytes"]
    assert not list(out.rglob("dense.onnx"))  # the reference export is not kept


def test_cs_start_l1_starts_channel_scores_from_the_l1_cut(tmp_path: pathlib.Path) -> None:
    """``--cs-start l1`` with no training epochs: the exact cut keeps every channel the
    one-shot L1 cut keeps (rows of the first conv found in the pruned model by value)."""
    from sparsify_fx.budgets.exact_cut import apply_budget
    from sparsify_fx.passes.channels.couple import channel_l1_scores
    import sparsify_fx
    out = tmp_path / "l1start"
    args = [a for a in _args(out) if a not in ("--target-sparsity", str(TARGET))]
    args = [a if a not in ("2", "1") else "0" for a in args]  # --epochs 0 --finetune-epochs 0
    assert _prune_from_root(args + ["--granularity", "channel", "--target-macs", "0.5",
                                    "--cs-start", "l1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["macs"]["ratio"] <= 0.5
    assert any("cs_start l1" in n for n in summary["notes"])
    torch.manual_seed(0)  # the job's seed 0 before building MODEL
    x = digits_data()[1].tensors[0][:2]
    l1 = sparsify_fx.transform(tiny_cnn(), method="magnitude", granularity="channel",
                               example_inputs=(x,))
    apply_budget(l1, target_macs=0.5, scores=channel_l1_scores(l1, per_weight=True))
    small = sparsify_fx.shrink(l1)
    l1_rows = [p for p in small.parameters() if p.dim() == 4][0]  # the conv weight
    pruned = [p for p in load_pruned(out / "model.pt").parameters() if p.dim() == 4][0]
    assert 0 < l1_rows.shape[0] <= pruned.shape[0] < 8
    for row in l1_rows:
        assert any(torch.equal(row, r) for r in pruned), "an L1-kept channel was cut"
