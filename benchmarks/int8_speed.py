"""Pruning x int8 in onnxruntime (issue 25): latency, bytes and accuracy of every artefact.

Speed (random weights, batch 1, onnxruntime CPU): resnet18 and mobilenet_v2 at
224x224 (``bench_io.torchvision_channel_cs``; L1 channel ranking cut to
``target_latency=0.5`` by the measured latency table, then shrunk) as dense fp32,
dense int8, pruned fp32 and pruned int8 (static: QDQ, per-channel int8 weights,
activations calibrated on ``--calib`` random images; with random weights the
arg-max check is off, the max-abs bound is kept); BERT-base
(``BertForSequenceClassification(BertConfig())``, seq 128; heads + MLP units by
``plan_hf(target_macs=0.5)`` + ``shrink_hf``) as dense, dynamic int8, pruned and
pruned + dynamic int8. Every file is written by ``export_onnx`` (int8 verified
against PyTorch). Each file is timed in a process of its own (default session
options, 2 intra-op threads; warm-up, then at least ``--runs`` runs and 1 s),
the files of one model alternating (A B C D, D C B A, ...) for ``--rounds``
rounds. A latency ratio is the median over rounds of (file ms / dense fp32 ms in
the same round): every ratio is from this one run. onnxruntime's profiler
(``--profile-runs`` runs, own process) gives kernel ms per op type for the files
the goals name.

Accuracy (trained): the digits CNN (scikit-learn digits) and MNIST Conv-2
(``--data-dir``, MNIST test set split 8000/1000/1000), dense and channel-pruned
to 0.5 of the MACs (L1, fine-tuned), each as fp32 and static int8 calibrated on
8 training batches of 64; accuracy of the ONNX files on the test split.

    .venv/bin/python benchmarks/int8_speed.py [--quick] [--rounds 5] [--runs 30]
        [--models resnet18 mobilenet_v2] [--no-bert] [--no-accuracy]
        [--data-dir ../shared/data/mnist]
        [--out benchmarks/results/int8_speed]

Goals: resnet18 pruned + int8 <= 0.25 of dense fp32 latency and <= 0.15 of its
bytes; BERT-base pruned + dynamic int8 <= 0.35 of dense fp32 latency; MNIST
Conv-2 accuracy drop from int8 <= 0.5 points.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

THREADS = 2  # torch is imported where needed: the timing children only load onnxruntime
GOALS = {"resnet18_latency": 0.25, "resnet18_bytes": 0.15, "bert_latency": 0.35,
         "mnist_drop": 0.5}
FORMS = ["dense_fp32", "dense_int8", "pruned_fp32", "pruned_int8"]


# -- child processes: one onnxruntime session each ----------------------------------------
def _session(path: str, threads: int, profile: str | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()  # defaults (thread spinning on) but the thread count
    options.intra_op_num_threads = threads
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def child(mode: str, path: str, feed_file: str, runs: int, threads: int) -> dict[str, Any]:
    """``time``: median ms of ``path`` (5 warm-up runs, then >= ``runs`` runs and >= 1 s);
    ``profile``: kernel ms per run by op type (onnxruntime profiler, after 3 warm-ups)."""
    arrays = np.load(feed_file)
    sess = _session(path, threads, str(Path(feed_file).with_suffix("")) + "_prof"
                    if mode == "profile" else None)
    feed = {i.name: arrays[f"arr_{k}"] for k, i in enumerate(sess.get_inputs())}
    warm = 3 if mode == "profile" else 5
    for _ in range(warm):
        sess.run(None, feed)
    if mode == "profile":
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
        kernels = [e for e in events if e.get("cat") == "Node"
                   and e["name"].endswith("_kernel_time")]
        per_run = len(kernels) // (warm + runs)
        totals: collections.Counter = collections.Counter()
        for e in kernels[warm * per_run:]:
            totals[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
        return {"ops": dict(totals.most_common())}
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < 1.0:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return {"ms": statistics.median(times), "runs": len(times)}


def run_child(mode: str, path: Path, feed: Path, runs: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(feed),
                           str(runs), str(THREADS)], capture_output=True, text=True,
                          timeout=900)
    if done.returncode:
        raise RuntimeError(f"timing {path.name} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_files(paths: dict[str, Path], feed: Path, rounds: int, runs: int
               ) -> dict[str, dict[str, Any]]:
    """Per file: ms per round (own process, alternating order), median ms, and the median
    over rounds of its ratio to the first file of the same round."""
    keys = list(paths)
    ms: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            ms[k].append(run_child("time", paths[k], feed, runs)["ms"])
    base = ms[keys[0]]
    return {k: {"ms_rounds": v, "ms": statistics.median(v),
                "latency_ratio": statistics.median(a / b for a, b in zip(v, base)),
                "bytes": paths[k].stat().st_size} for k, v in ms.items()}


def save_feed(work: Path, name: str, arrays: list[np.ndarray]) -> Path:
    path = work / f"{name}_feed.npz"
    np.savez(path, *arrays)
    return path


def _int8_info(result: Any) -> dict[str, Any]:
    q = result.quantized
    return {"max_abs_diff": q.max_abs_diff, "tolerance": q.tolerance,
            "argmax_agreement": q.argmax_agreement, "rows": q.rows,
            "int8_weights": q.int8_weights, "fp32_max_abs_diff": q.fp32_max_abs_diff}


# -- speed: torchvision CNNs ----------------------------------------------------------------
def run_cnn(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import sparsify_fx as sf
    from bench_io import torchvision_channel_cs
    from sparsify_fx.budgets.cost_model import channel_latency
    from sparsify_fx.errors import BudgetError
    from sparsify_fx.export.onnx_export import export_onnx
    from sparsify_fx.export.quantize import Int8Tolerance
    from sparsify_fx.passes.channels.couple import channel_l1_scores
    t0 = time.perf_counter()
    model, x, gm = torchvision_channel_cs(name)
    cost = channel_latency(gm, x, threads=THREADS, cache_dir=work / f"cache_{name}",
                           progress=False)
    failures = []
    for _ in range(3):  # the cut is verified in onnxruntime: load bursts can fail it
        try:
            cut = sf.apply_budget(gm, target_latency=0.5, cost=cost,
                                  scores=channel_l1_scores(gm))
            break
        except BudgetError as exc:
            failures.append(str(exc))
            print(f"{name}: latency cut failed ({exc}); again", flush=True)
    else:
        raise RuntimeError(f"{name}: the latency cut failed 3 times: {failures}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = sf.shrink(gm).eval()
    cut_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(1, 3, 224, 224, generator=gen) for _ in range(args.calib)]
    paths, info = {}, {}
    t0 = time.perf_counter()
    for key, m in (("dense", model), ("pruned", small)):
        paths[f"{key}_fp32"] = work / f"{name}_{key}_fp32.onnx"
        paths[f"{key}_int8"] = work / f"{name}_{key}_int8.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # random weights: the logits barely depend on the image, so their arg-max
            # is noise (a pruned resnet18 flipped 3 of 16); the max-abs bound still holds
            res = export_onnx(m, x, paths[f"{key}_int8"], quantize="int8", calibration=calib,
                              fp32_path=paths[f"{key}_fp32"], latency_runs=0,
                              int8_tolerance=Int8Tolerance(min_argmax_agreement=None))
        info[f"{key}_int8"] = _int8_info(res)
    export_s = time.perf_counter() - t0
    paths = {k: paths[k] for k in FORMS}
    feed = save_feed(work, name, [x.numpy()])
    forms = time_files(paths, feed, args.rounds, args.runs)
    for k, v in info.items():
        forms[k]["verification"] = v
    dense_bytes = forms["dense_fp32"]["bytes"]
    for v in forms.values():
        v["bytes_ratio"] = v["bytes"] / dense_bytes
    checks = [c.to_dict() for c in (getattr(cut, "latency", None) or [])]
    row = {"model": name, "forms": forms, "latency_cut_checks": checks, "cut_s": cut_s,
           "cut_failures": failures,
           "export_s": export_s, "calibration_images": args.calib,
           "params": {"dense": sum(p.numel() for p in model.parameters()),
                      "pruned": sum(p.numel() for p in small.parameters())}}
    if name == "resnet18" or args.profile_all:
        row["profile"] = {k: run_child("profile", paths[k], feed, args.profile_runs)["ops"]
                          for k in ("dense_fp32", "dense_int8", "pruned_fp32", "pruned_int8")}
    print(f"{name}: " + "; ".join(f"{k} {v['ms']:.2f} ms ({v['latency_ratio']:.3f}), "
                                  f"{v['bytes_ratio']:.3f} bytes" for k, v in forms.items()),
          flush=True)
    return row


# -- speed: BERT-base -----------------------------------------------------------------------
def run_bert(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    import sparsify_fx as sf
    from sparsify_fx.export.onnx_export import export_onnx
    torch.manual_seed(0)
    config = (transformers.BertConfig(hidden_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=512)
              if args.quick else transformers.BertConfig())
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.seq))
    calib = [torch.randint(0, config.vocab_size, (1, args.seq)) for _ in range(4)]
    plan = sf.plan_hf(model, target_macs=0.5, seq_len=args.seq)
    small = sf.shrink_hf(model, plan).eval()
    paths, info = {}, {}
    t0 = time.perf_counter()
    for key, m in (("dense", model), ("pruned", small)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = sf.transform(m, example_inputs=(ids,), capture="export").eval()
            paths[f"{key}_fp32"] = work / f"bert_{key}_fp32.onnx"
            paths[f"{key}_dynamic"] = work / f"bert_{key}_dynamic.onnx"
            res = export_onnx(gm, (ids,), paths[f"{key}_dynamic"], quantize="dynamic",
                              calibration=calib, fp32_path=paths[f"{key}_fp32"],
                              latency_runs=0)
        info[f"{key}_dynamic"] = _int8_info(res)
        del gm, res
    export_s = time.perf_counter() - t0
    order = ["dense_fp32", "dense_dynamic", "pruned_fp32", "pruned_dynamic"]
    paths = {k: paths[k] for k in order}
    feed = save_feed(work, "bert", [ids.numpy()])
    forms = time_files(paths, feed, args.rounds, max(5, args.runs // 3))
    for k, v in info.items():
        forms[k]["verification"] = v
    for v in forms.values():
        v["bytes_ratio"] = v["bytes"] / forms["dense_fp32"]["bytes"]
    profile = {k: run_child("profile", paths[k], feed, max(3, args.profile_runs // 3))["ops"]
               for k in order}
    print("bert: " + "; ".join(f"{k} {v['ms']:.1f} ms ({v['latency_ratio']:.3f})"
                               for k, v in forms.items()), flush=True)
    return {"model": "bert-base" if not args.quick else "bert-tiny (quick)",
            "seq_len": args.seq, "plan": plan.summary(), "plan_macs_ratio": plan.macs_ratio,
            "forms": forms, "profile": profile, "export_s": export_s}


# -- accuracy: digits CNN and MNIST Conv-2 ----------------------------------------------------
def run_accuracy(kind: str, work: Path, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    import torch
    import sparsify_fx as sf
    from sparsify_fx.budgets.exact_cut import weight_costs
    from sparsify_fx.data import digits, mnist
    from sparsify_fx.export.onnx_export import export_onnx, run_onnx
    from sparsify_fx.models import Conv2, DigitsCNN
    from sparsify_fx.passes.channels.couple import channel_l1_scores
    data = digits(seed) if kind == "digits" else mnist(args.data_dir, seed)
    torch.manual_seed(seed)
    model = DigitsCNN() if kind == "digits" else Conv2()
    epochs = args.epochs if kind == "digits" else args.mnist_epochs
    sf.Trainer(model, data.train, epochs=epochs, lr=0.05, seed=seed, progress=False).fit()
    model.eval()
    x = data.train.tensors[0][:2]
    gm = sf.transform(model, method="fixed", granularity="channel")
    sf.apply_budget(gm, target_macs=0.5, costs=weight_costs(gm, x), scores=channel_l1_scores(gm))
    sf.Trainer(gm, data.train, epochs=args.finetune, lr=0.01, seed=seed + 1,
               progress=False).fit(finalize=False)
    small = sf.shrink(gm).eval()
    calib = list(itertools.islice(data.loader("train", batch_size=64), 8))
    x_test, y_test = data.test.tensors
    out: dict[str, Any] = {"dataset": kind, "seed": seed, "epochs": epochs,
                           "finetune": args.finetune, "test_rows": len(y_test)}
    for key, m in (("dense", model), ("pruned", small)):
        p8, p32 = work / f"{kind}_{key}_int8.onnx", work / f"{kind}_{key}_fp32.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = export_onnx(m, x, p8, quantize="int8", calibration=calib, fp32_path=p32,
                              latency_runs=0)
        for form, path in (("fp32", p32), ("int8", p8)):
            acc = 100.0 * float((run_onnx(path, x_test).argmax(1) == y_test.numpy()).mean())
            out[f"{key}_{form}"] = {"test_acc": acc, "bytes": path.stat().st_size}
        out[f"{key}_int8"]["verification"] = _int8_info(res)
        out[f"{key}_int8_drop"] = out[f"{key}_fp32"]["test_acc"] - out[f"{key}_int8"]["test_acc"]
    print(f"{kind} seed {seed}: " + ", ".join(
        f"{k} {out[k]['test_acc']:.2f}" for k in FORMS), flush=True)
    return out


# -- output -----------------------------------------------------------------------------------
def top_ops(profile: dict[str, float], n: int = 6) -> str:
    total = sum(profile.values()) or 1.0
    return ", ".join(f"{op} {ms:.2f} ms ({ms / total:.0%})"
                     for op, ms in list(profile.items())[:n])


def goals(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    speed = {r["model"]: r for r in result["speed"]}
    if "resnet18" in speed:
        f = speed["resnet18"]["forms"]["pruned_int8"]
        out["resnet18_latency"] = {"measured": f["latency_ratio"],
                                   "goal": GOALS["resnet18_latency"]}
        out["resnet18_bytes"] = {"measured": f["bytes_ratio"], "goal": GOALS["resnet18_bytes"]}
    if result.get("bert"):
        f = result["bert"]["forms"]["pruned_dynamic"]
        out["bert_latency"] = {"measured": f["latency_ratio"], "goal": GOALS["bert_latency"]}
    mn = [r for r in result["accuracy"] if r["dataset"] == "mnist"]
    if mn:
        drop = max(max(r["dense_int8_drop"], r["pruned_int8_drop"]) for r in mn)
        out["mnist_drop"] = {"measured": drop, "goal": GOALS["mnist_drop"]}
    for v in out.values():
        v["met"] = v["measured"] <= v["goal"]
    return out


def to_markdown(result: dict[str, Any]) -> str:
    lines = ["# Pruning x int8 in onnxruntime (issue 25)", "", f"`{result['command']}`", "",
             f"{result['machine']}; onnxruntime {result['onnxruntime']}, batch 1, "
             f"{THREADS} intra-op threads, default session options; each file timed in its "
             f"own process, alternating, {result['rounds']} rounds; ratios are medians over "
             "rounds of file ms / dense fp32 ms of the same round. Load average "
             f"start {result['load_start']}, end {result['load_end']} (shared 2-core machine).",
             "", "| model | form | bytes | bytes ratio | ms (median) | latency ratio | "
             "int8 max abs diff (tolerance) | arg-max agreement |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in result["speed"] + ([result["bert"]] if result.get("bert") else []):
        for k, v in r["forms"].items():
            ver = v.get("verification")
            diff = "" if not ver else f"{ver['max_abs_diff']:.3g} ({ver['tolerance']:.3g})"
            agree = "" if not ver or ver["argmax_agreement"] is None else (
                f"{ver['argmax_agreement']:.3f} of {ver['rows']}")
            lines.append(f"| {r['model']} | {k} | {v['bytes']:,} | {v['bytes_ratio']:.3f} | "
                         f"{v['ms']:.2f} | {v['latency_ratio']:.3f} | {diff} | {agree} |")
    if result["accuracy"]:
        lines += ["", "## Accuracy of the ONNX files on the test split (%)", "",
                  "| dataset | seed | dense fp32 | dense int8 | pruned fp32 (0.5 MACs) | "
                  "pruned int8 | int8 drop dense / pruned (points) |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in result["accuracy"]:
            lines.append(f"| {r['dataset']} | {r['seed']} | " + " | ".join(
                f"{r[k]['test_acc']:.2f}" for k in FORMS)
                + f" | {r['dense_int8_drop']:+.2f} / {r['pruned_int8_drop']:+.2f} |")
    lines += ["", "## Goals", "", "| goal | measured | target | met |", "|---|---:|---:|---|"]
    for k, v in result["goals"].items():
        lines.append(f"| {k} | {v['measured']:.3f} | <= {v['goal']} | "
                     f"{'yes' if v['met'] else 'NO'} |")
    profiles = [(r["model"], r["profile"]) for r in result["speed"] if r.get("profile")]
    if result.get("bert"):
        profiles.append((result["bert"]["model"], result["bert"]["profile"]))
    if profiles:
        lines += ["", "## onnxruntime profile: kernel ms per run by op type (top 6)", ""]
        for model, prof in profiles:
            for form, ops in prof.items():
                lines.append(f"- {model} {form} (total {sum(ops.values()):.2f} ms): "
                             f"{top_ops(ops)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        mode, path, feed, runs, threads = argv[1:6]
        print(json.dumps(child(mode, path, feed, int(runs), int(threads))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: resnet18 only, 2 rounds, a 2-layer BERT, short training")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--no-bert", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the digits/MNIST part")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--calib", type=int, default=16, help="calibration images (CNNs)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--profile-runs", type=int, default=20)
    ap.add_argument("--profile-all", action="store_true")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent
                                              / "shared" / "data" / "mnist"))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=None, help="digits training epochs")
    ap.add_argument("--mnist-epochs", type=int, default=None)
    ap.add_argument("--finetune", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    q = args.quick
    args.models = args.models if args.models is not None else (
        ["resnet18"] if q else ["resnet18", "mobilenet_v2"])
    args.rounds = args.rounds or (2 if q else 5)
    args.runs = args.runs or (10 if q else 30)
    args.epochs = args.epochs or (3 if q else 15)
    args.mnist_epochs = args.mnist_epochs or (1 if q else 3)
    args.finetune = args.finetune if args.finetune is not None else 1
    args.profile_runs = 5 if q else args.profile_runs
    args.out = args.out or str(Path(__file__).parent / "results"
                               / ("int8_speed_quick" if q else "int8_speed"))
    import onnxruntime
    import torch
    torch.set_num_threads(THREADS)

    from bench_io import command_line, machine, write_results
    result: dict[str, Any] = {"command": command_line("int8_speed.py", argv),
                              "machine": machine(THREADS), "onnxruntime": onnxruntime.__version__,
                              "rounds": args.rounds, "runs": args.runs,
                              "load_start": [round(v, 2) for v in os.getloadavg()],
                              "speed": [], "bert": None, "accuracy": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["SPARSIFY_FX_CACHE_DIR"] = str(work / "cache")
        for seed in ([] if args.no_accuracy else args.seeds):
            result["accuracy"].append(run_accuracy("digits", work, args, seed))
            if os.path.isdir(args.data_dir):
                result["accuracy"].append(run_accuracy("mnist", work, args, seed))
        for name in args.models:
            result["speed"].append(run_cnn(name, work, args))
        if not args.no_bert:
            result["bert"] = run_bert(work, args)
    result["load_end"] = [round(v, 2) for v in os.getloadavg()]
    result["wall_s"] = time.perf_counter() - t0
    result["goals"] = goals(result)
    write_results(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
