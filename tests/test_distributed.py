"""CS under two-process gloo DDP ends with identical masks, sparsity and controller
state on both ranks (issue 3, acceptance 5)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_rank_gloo_training(tmp_path: os.PathLike) -> None:
    out = os.path.join(tmp_path, "rank")
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    subprocess.run([sys.executable, worker, out, free_port()], check=True, timeout=300)
    r0 = torch.load(f"{out}.0", weights_only=False)
    r1 = torch.load(f"{out}.1", weights_only=False)
    assert len(r0["keep"]) == 4
    for a, b in zip(r0["keep"], r1["keep"]):
        assert torch.equal(a, b)
    assert r0["sparsity"] == r1["sparsity"]
    assert abs(r0["sparsity"] - 0.8) < 1e-3
    assert torch.equal(r0["controller"]["log_lmbda"], r1["controller"]["log_lmbda"])
    assert r0["controller"]["t"] == r1["controller"]["t"] == 2
    assert float(r0["controller"]["log_lmbda"][0]) != float(torch.log(torch.tensor(1e-8)))
    assert r0["changed"] == r1["changed"]
