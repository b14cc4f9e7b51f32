"""Two-process gloo run of CS under DistributedDataParallel (used by test_distributed).

Usage: python ddp_worker.py OUT_PATH PORT. Each rank trains on its half of the
digits training set and saves its masks, sparsity and controller state.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

import sparsify_fx as sf
from sparsify_fx.data import digits
from sparsify_fx.models import DigitsCNN


def run(rank: int, world: int, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gm = sf.transform(DigitsCNN(width=4, hidden=16), target_sparsity=0.8)
    ddp = DistributedDataParallel(gm)
    cs = sf.CSScheduler(ddp, epochs=2, controller_gain=0.5)
    opt = torch.optim.Adam(sf.param_groups(ddp, lr=0.01))
    data = digits(0).train
    shard = Subset(data, list(range(rank, len(data), world)))
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        for x, y in DataLoader(shard, batch_size=64, shuffle=True, generator=g):
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x), y) + cs.penalty()
            loss.backward()
            opt.step()
        cs.step()
    cut = cs.finalize()
    torch.save({"keep": [e.mask.hard_mask() for e in sf.masks(ddp)],
                "sparsity": sf.sparsity(ddp), "controller": cs.state_dict(),
                "changed": cut.changed_bits if cut else None}, f"{out}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(2, sys.argv[1], sys.argv[2]), nprocs=2, join=True)
