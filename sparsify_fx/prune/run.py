"""The ``sparsify-fx prune`` pipeline: load, transform, train, exact cut, fine-tune, outputs.

Phases and their resume points in ``OUTDIR/checkpoints`` (see
:mod:`.outdir`): ``train.pt`` after every training epoch (model, optimizers,
CS state, RNG), ``cut.pt`` after the exact cut, ``finetune.pt`` after every
fine-tuning epoch, ``final.pt`` before the outputs are written. Each phase
seeds torch from the recipe's seed, and data order is seeded per epoch, so a
run killed anywhere and rerun ends bit-identical (CPU) to an uninterrupted one.
Under ``torchrun`` every rank trains on its shard through DDP; only rank 0
writes, and the masks are compared across ranks after the cut. ``hf:DIR``
models (:mod:`.hf_task`) run the same phases with their task's batching and
metric (:class:`~sparsify_fx.prune.task.Task`).
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Subset

from sparsify_fx.errors import ConfigError, InputError, TrainingError
from sparsify_fx.prune.datasets import Data, example_input, load_data
from sparsify_fx.prune.outdir import OutDir, save_atomic
from sparsify_fx.prune.task import Task


TARGETS = ("target_sparsity", "target_macs", "target_latency")


@dataclass
class Context:
    """Where a run is: its recipe, folder, process group position and device."""

    recipe: dict[str, Any]
    out: OutDir
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    progress: bool = True
    command: str = ""
    trust_pickle: bool = False
    notes: list[str] = field(default_factory=list)
    task: Task = field(default_factory=Task)
    hf: Any = None  # the loaded hf:DIR model (hf_task.HFModel), None for other MODELs
    #: method options given to transform (``cs_start: l1``: s_init 1, no rescale)
    method_options: dict[str, Any] = field(default_factory=dict)

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def say(self, text: str) -> None:
        if self.writer:
            print(text, flush=True)


def method_wiring(recipe: dict[str, Any], example: torch.Tensor) -> dict[str, Any]:
    """Everything that depends on the method, in one place.

    The Trainer runs each method's own session (CS scheduler, GMP, L0, STE);
    this returns the Trainer options for the training phase and ``imp=True``
    when IMP's own driver (:func:`sparsify_fx.baselines.run_imp`) runs the
    training phase instead of one Trainer.
    """
    method = recipe["method"]
    options: dict[str, Any] = {}
    if method in ("cs", "l0", "ste"):
        options["mask_lr"] = recipe["mask_lr"]
    if method == "cs":
        options["per_step"] = True  # smooth beta schedule for short runs
        if recipe["target_macs"] is not None:
            options["example_inputs"] = example
    return {"trainer": options, "imp": method == "imp"}


def _setup_distributed(device: str) -> tuple[int, int, str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return rank, world, device


def _barrier(ctx: Context) -> None:
    if ctx.world > 1:
        dist.barrier()


def _shard(ctx: Context, train: Any) -> Any:
    return train if ctx.world == 1 else Subset(train, list(range(ctx.rank, len(train), ctx.world)))


def _wrap(ctx: Context, gm: nn.Module) -> nn.Module:
    if ctx.world == 1:
        return gm
    from torch.nn.parallel import DistributedDataParallel
    ids = [torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
    return DistributedDataParallel(gm, device_ids=ids, find_unused_parameters=True)


def _fit(ctx: Context, gm: nn.Module, train: Any, ckpt: Path, epochs: int, lr: float,
         seed: int, **options: Any) -> Any:
    """One Trainer phase, checkpointed every epoch at ``ckpt`` (rank 0) and resumed from it."""
    from sparsify_fx.mask_index import unwrap
    from sparsify_fx.training.trainer import Trainer

    holder: dict[str, Any] = {}

    def checkpoint(epoch: int, _log: dict[str, float]) -> None:
        if ctx.writer:
            state = holder["trainer"].state_dict(epoch)
            state["model"] = unwrap(gm).state_dict()  # without DDP's "module." prefix
            save_atomic(state, ckpt)

    r = ctx.recipe
    trainer = Trainer(_wrap(ctx, gm), _shard(ctx, train), epochs=epochs,
                      batch_size=r["batch_size"], lr=lr, weight_decay=r["weight_decay"],
                      seed=seed, device=ctx.device, progress=ctx.progress and ctx.writer,
                      eval_hook=checkpoint, collate_fn=ctx.task.collate, **options)
    holder["trainer"] = trainer
    resume = str(ckpt) if ckpt.is_file() else None
    if resume:
        ctx.say(f"resuming from {ckpt} (epoch {torch.load(ckpt, weights_only=False)['epoch'] + 1}"
                f" of {epochs} done)")
    _barrier(ctx)
    return trainer.fit(resume_from=resume)


def _train_and_cut(ctx: Context, gm: nn.Module, data: Data, example: torch.Tensor) -> None:
    """Training phase (masks learned or scheduled), then the exact cut to the target."""
    from sparsify_fx.baselines import run_imp
    from sparsify_fx.budgets.exact_cut import apply_budget, weight_costs

    r = ctx.recipe
    torch.manual_seed(r["seed"] + 1)
    wiring = method_wiring(r, example)
    cut = None
    from sparsify_fx.prune.recipe import CALIBRATED
    if r["method"] in CALIBRATED:  # one-shot: calibrate() cuts exactly (and reconstructs)
        from itertools import islice
        from torch.utils.data import DataLoader
        from sparsify_fx.baselines.calibration import calibrate
        loader = DataLoader(data.train, batch_size=r["batch_size"], shuffle=False,
                            collate_fn=ctx.task.collate)
        count = max(1, -(-int(r["calibration_samples"]) // r["batch_size"]))
        wanted = int(r["calibration_samples"])  # the last batch cut to exactly that many
        batches = [(x[:wanted - i * r["batch_size"]].to(ctx.device),)
                   for i, (x, _) in enumerate(islice(loader, count))]
        result = calibrate(gm, batches)
        ctx.notes.append(f"{r['method']}: calibrated on {result.tokens} tokens / samples of "
                         f"{len(batches)} training batches in {result.seconds:.1f} s "
                         "(no mask training; fine-tune epochs follow)")
        return
    if wiring["imp"]:
        ctx.notes.append("imp: an interrupted run restarts the IMP phase (no per-epoch resume)")
        phase = dict(epochs=r["epochs"], batch_size=r["batch_size"], lr=r["lr"], seed=r["seed"],
                     progress=ctx.progress and ctx.writer, device=ctx.device,
                     collate_fn=ctx.task.collate)
        run_imp(gm, _shard(ctx, data.train), phases=[phase])
    elif r["epochs"] > 0:
        cut = _fit(ctx, gm, data.train, ctx.out.checkpoint("train.pt"), r["epochs"], r["lr"],
                   r["seed"], **wiring["trainer"]).cut
    if cut is None:  # one-shot methods, IMP, or no training epochs: cut here (exact)
        if r["target_macs"] is not None:
            apply_budget(gm, target_macs=r["target_macs"], costs=weight_costs(gm, example))
        elif r["target_latency"] is not None:
            apply_budget(gm, target_latency=r["target_latency"])
        else:
            apply_budget(gm, r["target_sparsity"])
    if ctx.hf is not None and r["granularity"] == "channel":
        from sparsify_fx.budgets.channel_cut import equalize_groups
        from sparsify_fx.budgets.exact_cut import budget_holds
        from sparsify_fx.mask_index import masks
        entries = [e for e in masks(gm) if not e.mask.auxiliary]
        holds = budget_holds(gm, entries, r["target_sparsity"], r["target_macs"],
                             weight_costs(gm, example) if r["target_macs"] is not None else None)
        kept = equalize_groups(gm, fits=holds)  # one width per layer kind: the HF config holds it
        ctx.notes.append("hf: channel widths made uniform across layers (slots kept per "
                         f"structure: {sorted(kept.values())})")


def _cs_start(ctx: Context) -> str:
    """The recipe's ``cs_start``; unset: ``l1`` for a pretrained ``hf:`` checkpoint pruned
    by CS channels to a sparsity or MACs target (docs/cs.md), else ``uniform``."""
    r = ctx.recipe
    if r["cs_start"] == "l1" and (r["method"] != "cs" or r["granularity"] != "channel"):
        raise ConfigError("cs_start: l1 applies to method cs with granularity channel; "
                          f"got method {r['method']}, granularity {r['granularity']}")
    if r["cs_start"] == "l1" and r["target_latency"] is not None:
        raise ConfigError("cs_start: l1 needs target_sparsity or target_macs (the L1 cut "
                          "it starts from); target_latency is measured after training")
    if r["cs_start"] is not None:
        return str(r["cs_start"])
    pretrained_cs = (ctx.hf is not None and r["method"] == "cs"
                     and r["granularity"] == "channel" and r["target_latency"] is None)
    return "l1" if pretrained_cs else "uniform"


def _start_from_l1(ctx: Context, gm: nn.Module, model: nn.Module, options: dict[str, Any]
                   ) -> None:
    """``cs_start: l1``: CS channel scores (``s_init=1``, ``rescale=False``: docs/cs.md)
    start from the one-shot L1 cut of ``model`` at the recipe's budget
    (``init_cs_from_masks``; mutates ``gm``'s scores and nothing else)."""
    from sparsify_fx.baselines.mask_init import init_cs_from_masks
    from sparsify_fx.budgets.exact_cut import apply_budget
    from sparsify_fx.passes.channels.couple import channel_l1_scores
    from sparsify_fx.prepare import transform
    r = ctx.recipe
    oneshot = transform(model, **{**options, "method": "magnitude"})
    apply_budget(oneshot, r["target_sparsity"], target_macs=r["target_macs"],
                 scores=channel_l1_scores(oneshot, per_weight=True))
    init_cs_from_masks(gm, oneshot)
    ctx.notes.append("cs_start l1: CS channel scores started from the one-shot L1 cut")


def _load_into(gm: nn.Module, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    gm.load_state_dict(state)


def _masks_equal_across_ranks(ctx: Context, gm: nn.Module) -> bool | None:
    """Rank 0's hard masks equal every rank's (None outside torchrun)."""
    if ctx.world == 1:
        return None
    from sparsify_fx.mask_index import masks
    mine = [e.mask.hard_mask().detach().cpu() for e in masks(gm)]
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, mine)
    return all(len(g) == len(mine) and all(torch.equal(a, b) for a, b in zip(g, mine))
               for g in gathered)


def _replay_warnings(ctx: Context, caught: list[warnings.WarningMessage]) -> None:
    """Warnings of ``transform`` shown again, except torch.export's specialisations of an
    hf: model (expected, e.g. the sequence length up to its positions): kept as notes."""
    from sparsify_fx.capture.export_modes import SpecializationWarning

    for w in caught:
        if ctx.hf is not None and issubclass(w.category, SpecializationWarning):
            lines = [ln.strip() for ln in str(w.message).splitlines()[1:-1]]
            ctx.notes.extend(f"torch.export: {ln}" for ln in lines)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _load_model_and_data(ctx: Context) -> tuple[nn.Module, Data]:
    """MODEL and DATA of the recipe; for hf:DIR also sets ``ctx.hf`` and ``ctx.task``."""
    from sparsify_fx.cli.model_inputs import load_model
    from sparsify_fx.prune.hf_task import hf_data, is_hf, load_hf

    r = ctx.recipe
    if is_hf(r["model"]):
        ctx.hf = load_hf(r["model"], r["task"])
        data, ctx.task = hf_data(ctx.hf, r)
        return ctx.hf.adapter, data
    return (load_model(r["model"], r["weights"], ctx.trust_pickle),
            load_data(r["data"], r["seed"], r["val_fraction"], r["image_size"]))


def run(ctx: Context, overwrite: bool) -> dict[str, Any] | None:
    """Run (or resume) the pipeline; rank 0 returns the summary, other ranks None."""
    from sparsify_fx.cli.model_inputs import check_runs
    from sparsify_fx.prepare import transform
    from sparsify_fx.prune.outputs import outputs_present, write_outputs

    from sparsify_fx.prune.hf_task import check_recipe

    started = time.monotonic()
    r = ctx.recipe
    if r["model"] is None:
        raise InputError("MODEL is required: torchvision:<name>, package.module:factory or "
                         "hf:DIR (on the command line or as `model` in the recipe)")
    if ":" in str(r["granularity"]) and all(r[k] is None for k in TARGETS):
        from sparsify_fx.granularity import parse_granularity
        g = parse_granularity(r["granularity"])
        r["target_sparsity"] = 1.0 - g.n / g.m  # the pattern is the budget
    targets = [k for k in TARGETS if r[k] is not None]
    if len(targets) != 1:
        raise ConfigError("give exactly one of --target-sparsity, --target-macs or "
                          f"--target-latency (flag or recipe key); got {targets or 'none'}")
    for key in ("epochs", "finetune_epochs"):
        if r[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {r[key]}")
    if r["batch_size"] < 1:
        raise ConfigError(f"batch_size must be >= 1, got {r['batch_size']}")
    for key in ("max_length", "block_size"):
        if r[key] is not None and r[key] < 2:
            raise ConfigError(f"{key} must be >= 2, got {r[key]}")
    check_recipe(r)
    if r["threads"] is not None:
        torch.set_num_threads(max(1, r["threads"]))
    ctx.rank, ctx.world, ctx.device = _setup_distributed(r["device"])
    # read-only first: a refused OUTDIR, MODEL, DATA or transform leaves nothing behind
    resuming = ctx.out.prepare(r, overwrite, writer=False)
    if resuming and outputs_present(ctx.out):
        ctx.say(f"{ctx.out.path} is complete for this recipe; nothing to do "
                "(--overwrite reruns it)")
        return None
    torch.manual_seed(r["seed"])
    model, data = _load_model_and_data(ctx)
    task = ctx.task
    example = task.example if task.example is not None else example_input(data)
    check_runs(model, example, "DATA and MODEL do not fit: MODEL must accept a batch of "
               "DATA samples")
    # hf: runs keep torch.export's specialisations as notes (others warn as they come)
    recorder = (warnings.catch_warnings(record=True) if ctx.hf is not None
                else contextlib.nullcontext([]))
    with recorder as caught:
        options = dict(method=r["method"], granularity=r["granularity"],
                       include=r["include"] or None, exclude=r["exclude"] or None,
                       keep_first=r["keep_first"], keep_last=r["keep_last"],
                       target_sparsity=r["target_sparsity"], target_macs=r["target_macs"],
                       target_latency=r["target_latency"], example_inputs=example,
                       capture=task.capture, dynamic_shapes=task.dynamic_shapes)
        if _cs_start(ctx) == "l1":  # kept slots at +1, pruned at -1, kept channels tend to 1
            ctx.method_options = {"s_init": 1.0, "rescale": False}
        from sparsify_fx.prune.recipe import CALIBRATED
        if r["method"] in CALIBRATED:  # one calibration pass per repeated block, not per group
            ctx.method_options = {"sequential": "block"}
        gm = transform(model, **options, **ctx.method_options)
        if ctx.hf is not None and r["granularity"] == "channel":
            from sparsify_fx.passes.shrink.to_source import config_cannot_hold
            fixed = config_cannot_hold(gm)  # e.g. a pooler: its config has no width for it
            if fixed:
                options["exclude"] = [*(r["exclude"] or []), *fixed]
                gm = transform(model, **options, **ctx.method_options)
                ctx.notes.append("hf: kept whole, the config holds no width for them: "
                                 + ", ".join(fixed))
        if _cs_start(ctx) == "l1":
            _start_from_l1(ctx, gm, model, options)
    _replay_warnings(ctx, caught or [])
    _barrier(ctx)  # every rank has read OUTDIR before rank 0 changes it
    if ctx.writer:
        ctx.out.prepare(r, overwrite, writer=True)
    _barrier(ctx)
    before = task.evaluate(model, data.val)
    ctx.say(f"data: {data.description}\nbefore pruning: val {task.metric} {before:.2f}"
            + (" %" if task.metric == "accuracy" else ""))
    gm.to(ctx.device)
    example_dev = example.to(ctx.device)

    final_ckpt, cut_ckpt = ctx.out.checkpoint("final.pt"), ctx.out.checkpoint("cut.pt")
    if final_ckpt.is_file():
        _load_into(gm, final_ckpt)
    else:
        if cut_ckpt.is_file():
            _load_into(gm, cut_ckpt)
        else:
            _train_and_cut(ctx, gm, data, example_dev)
            if ctx.writer:
                save_atomic(gm.state_dict(), cut_ckpt)
        if r["finetune_epochs"] > 0:
            torch.manual_seed(r["seed"] + 2)
            _fit(ctx, gm, data.train, ctx.out.checkpoint("finetune.pt"), r["finetune_epochs"],
                 r["finetune_lr"], r["seed"] + 1)
        if ctx.writer:
            save_atomic(gm.state_dict(), final_ckpt)
    equal = _masks_equal_across_ranks(ctx, gm)
    if equal is False:
        raise TrainingError("masks differ across torchrun ranks after the cut; check that "
                            "every rank runs the same recipe and data")
    _barrier(ctx)
    if not ctx.writer:
        return None
    gm.to("cpu")
    return write_outputs(ctx, model, gm, data, example, before, resuming, equal,
                         time.monotonic() - started)
