"""``torchrun --nproc_per_node=2 -m sparsify_fx prune``: gloo DDP, rank 0 alone writes,
masks equal on both ranks, exact sparsity (issue 16)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_torchrun(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sparsify_fx", "prune", "tests.test_prune:tiny_cnn", "--data", "digits",
           "-o", str(out), "--target-sparsity", "0.8", "--epochs", "2", "--finetune-epochs", "1",
           "--batch-size", "64", "--threads", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("val accuracy: before") == 1  # only rank 0 reports (and writes)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["masks_equal_across_ranks"] is True
    assert summary["accuracy"]["onnx_equals_pytorch"] is True
    rep = json.loads((out / "report.json").read_text())
    masked = [r for r in rep["layers"] if r["masked"]]
    total = sum(r["params"] for r in masked)
    assert sum(r["nonzeros"] for r in masked) == round(0.2 * total)
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name or p.name == ".staging"]
    assert not leftovers
    # the checkpoint rank 0 wrote resumes in a plain (single-process) model: no DDP prefix
    state = torch.load(out / "checkpoints" / "finetune.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in state["model"])
