"""Generation speed of pruned decoders (issue 33): prefill and decode tokens/s in onnxruntime.

Model: the pretrained SmolLM2-135M-Instruct (``sparsify_fx.hf.pretrained``, the
``pretrained`` extra: GGUF Q4_1 de-quantized to float32) when installed, else a
randomly initialised ``LlamaForCausalLM`` of the same shape (hidden 576, 30 layers,
9 heads / 3 KV heads, intermediate 1536, vocab 49152, tied embeddings; ``--model
random`` forces it). Forms: dense; structured at ``--keeps`` (0.75, 0.5) of the
blocks' MACs (``plan_hf``: one-shot L1 of heads / KV groups / MLP units, uniform
widths, then ``shrink_hf``). Each is written by ``export_decoder`` as one verified
decoder file with past key/values (fp32, greedy tokens equal ``generate()`` for 16 new
tokens) and as dynamic int8 (``quantize="dynamic"``, teacher-forced logits within the
int8 tolerance).

Timing (``sparsify_fx.compare_decode_speed``): batch 1, a prompt of ``--prompt`` (128)
tokens with an empty past (prefill), then ``--decode`` (64) decode steps; 2 intra-op
threads, default session options; each file in its own process (a warm-up generation
then ``--runs``, medians), all files alternating for ``--rounds`` rounds (A..F, F..A).
Ratios are medians over rounds of a file's tokens/s over dense fp32's in the same round.
With the pretrained model, perplexity of each file on the first ``--ppl-blocks``
blocks of ``--prompt`` tokens of the pydocs validation documents (``--corpus``; one
run per block with an empty past, every position's logits).

    .venv/bin/python benchmarks/llm_decode_speed.py [--model auto|pretrained|random]
        [--keeps 0.75 0.5] [--rounds 3] [--runs 2] [--prompt 128] [--decode 64]
        [--corpus ../shared/data/text/pydocs.txt] [--ppl-blocks 32]
        [--variants dynamic_pc nbits8] [--timings default no-spin]
        [--work /tmp/llm_decode_speed] [--skip-timing] [--no-dense]
        [--out benchmarks/results/llm_decode_speed]

Files and rows are kept in ``--work`` (``<form>.json`` per form: fp32 + int8 rows with
their checks and perplexity); a form found there is reused, so the exports can run
first (``--skip-timing``; ``--no-dense --keeps 0.5`` in a second process beside the
first) and the timing later over all files. ``--out`` is rewritten as forms finish and
after each timing configuration. ``--variants``: further int8 forms quantized from each
fp32 file (``sparsify_fx.export.int8_forms``: per-channel dynamic; 8-bit MatMulNBits +
int8 embedding table), verified teacher-forced against the fp32 file. ``--timings``:
each a full alternating comparison: ``default`` session options, or ``no-spin``
(``session.intra_op.allow_spinning=0``; spinning threads starve each other on a shared
2-core machine). Ratios are within one configuration's rounds.

Dynamic int8 is exported with the teacher-forced logits measured and compared with
``--int8-rtol`` (0.5 of the logit scale) afterwards, reported per row (a file past it is
kept and flagged, not exported twice); each file's perplexity says what int8 costs.

Goals: structured 0.5 decode tokens/s >= 1.7x dense fp32; + dynamic int8 >= 3x.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_io import command_line, machine, write_results

from sparsify_fx.export.int8_forms import INT8_VARIANTS as VARIANTS

THREADS = 2
#: timing configurations: onnxruntime session config entries (beside 2 intra-op threads)
TIMINGS: dict[str, dict[str, str] | None] = {
    "default": None, "no-spin": {"session.intra_op.allow_spinning": "0"}}
GOALS = {"structured_0.5": 1.7, "structured_0.5_int8": 3.0}
SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
             tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5,
             rope_theta=100000.0)


def _tokenizer() -> Any:
    import transformers
    from sparsify_fx.hf.pretrained import pretrained_path
    path = pretrained_path("smollm2")
    return transformers.AutoTokenizer.from_pretrained(os.fspath(path.parent), gguf_file=path.name,
                                                      local_files_only=True)


def load(which: str) -> tuple[torch.nn.Module, Any, str]:
    """(model, tokenizer or None, description)."""
    if which == "quick":  # smoke run: a tiny random model (+ the tokenizer if installed)
        import transformers
        torch.manual_seed(0)
        tiny = dict(SHAPE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128)
        try:
            tok = _tokenizer()
        except Exception:  # noqa: BLE001
            tok = None
        return (transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny)).eval(), tok,
                "quick: tiny random Llama (smoke run)")
    if which in ("auto", "pretrained"):
        try:
            from sparsify_fx.hf.checkpoint_files import load_pretrained
            from sparsify_fx.hf.pretrained import pretrained_path
            path = pretrained_path("smollm2")
            model, tok = load_pretrained(path)
            return model.eval(), tok, f"pretrained SmolLM2-135M-Instruct ({path.name})"
        except Exception as exc:  # noqa: BLE001 - the extra is optional
            if which == "pretrained":
                raise
            print(f"pretrained SmolLM2 unavailable ({type(exc).__name__}: {exc}); random init")
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).eval()
    return model, None, "random-init LlamaForCausalLM of SmolLM2-135M's shape"


def decode_macs(model: torch.nn.Module, context: int) -> dict[str, float]:
    """MACs of one decode step at ``context`` cached tokens: block Linears, lm_head,
    attention over the cache (q k^T and p v)."""
    cfg = model.config
    blocks = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}")
    head = model.get_output_embeddings().weight.numel()
    head_dim = getattr(cfg, "head_dim", None) or SHAPE["hidden_size"] // SHAPE[
        "num_attention_heads"]
    attention = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context
    return {"blocks": float(blocks), "lm_head": float(head), "attention": float(attention)}


def perplexity(path: Path, blocks: np.ndarray) -> float:
    from sparsify_fx.export.onnx_generate import OnnxDecoder
    dec = OnnxDecoder(path, THREADS)
    nll, count = 0.0, 0
    for block in blocks:
        ids = block[None, :].astype(np.int64)
        mask = np.ones_like(ids)
        logits, _ = dec.step(ids, mask, np.arange(ids.shape[1])[None, :], dec.empty_past(1))
        z = logits[0, :-1].astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(z)), ids[0, 1:]].sum())
        count += len(z)
    return math.exp(nll / count)


def validation_blocks(tok: Any, corpus: str, seq: int, n: int) -> np.ndarray:
    from llm_text import load_split
    _, val = load_split(corpus)
    ids: list[int] = []
    for doc in val:
        ids.extend(tok(doc)["input_ids"])
        if len(ids) >= seq * n:
            break
    k = min(n, len(ids) // seq)
    return np.asarray(ids[: k * seq], dtype=np.int64).reshape(k, seq)


def structured(model: torch.nn.Module, keep: float, seq: int
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``plan_hf`` (one-shot L1, uniform) at ``keep`` of the blocks' MACs, then ``shrink_hf``."""
    import sparsify_fx as sf
    t0 = time.perf_counter()
    plan = sf.plan_hf(model, target_macs=keep, seq_len=seq)
    small = sf.shrink_hf(model, plan).eval()
    c = small.config
    out_emb, in_emb = small.get_output_embeddings(), small.get_input_embeddings()
    retied = bool(getattr(c, "tie_word_embeddings", False) and out_emb.weight is not
                  in_emb.weight and torch.equal(out_emb.weight, in_emb.weight))
    if retied:  # shrink returns an untied copy of the (unpruned) tied embedding
        small.tie_weights()
    print(f"structured {keep}: {plan.summary()}", flush=True)
    return small, {"plan": plan.summary(), "blocks_macs_ratio": plan.macs_ratio,
                   "plan_s": time.perf_counter() - t0, "retied_embeddings": retied}


def export_form(name: str, m: torch.nn.Module, work: Path, info: dict[str, Any], prompt: int,
                decode: int, rtol: float) -> dict[str, dict[str, Any]]:
    """Export ``m`` as ``work/<name>.onnx`` (fp32) and ``work/<name>_int8.onnx`` (dynamic
    int8); both verified (fp32: greedy tokens equal ``generate()``; int8: teacher-forced
    logits, measured and compared with ``rtol`` of the logit scale afterwards, so an int8
    file past the bound is reported, not exported twice). Rows saved to ``<name>.json``."""
    import sparsify_fx as sf
    from sparsify_fx.export.int8_verify import Int8Tolerance
    t0 = time.perf_counter()
    fp32, int8 = work / f"{name}.onnx", work / f"{name}_int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sf.export_decoder(m, int8, quantize="dynamic", fp32_path=fp32,
                                int8_tolerance=Int8Tolerance(rtol=1e3))
    checks = [c.to_dict() for c in res.checks]
    worst = max(checks, key=lambda c: c["max_abs_diff"])
    scale = (worst["bound"] - Int8Tolerance(rtol=1e3).atol) / 1e3
    c = m.config
    base = {**info, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "intermediate": c.intermediate_size, "params": sum(p.numel() for p in m.parameters()),
            "decode_macs_at_context": decode_macs(m, prompt + decode // 2),
            "export_s": time.perf_counter() - t0,
            "fusion": None if res.fusion is None else res.fusion.describe()}
    rows = {name: {**base, "file": str(fp32), "bytes": fp32.stat().st_size,
                   "checks": [c.to_dict() for c in res.fp32_checks]},
            f"{name}_int8": {**base, "file": str(int8), "bytes": res.bytes,
                             "quantization": "dynamic int8 (onnxruntime quantize_dynamic, "
                                             "per-tensor int8 MatMul weights)",
                             "teacher_forced_max_abs_diff": worst["max_abs_diff"],
                             "logit_scale": scale, "int8_rtol": rtol,
                             "int8_within_rtol": worst["max_abs_diff"] <= rtol * scale,
                             "checks": checks}}
    (work / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print(f"{name}: exported + verified in {base['export_s']:.0f} s ({res.summary()})",
          flush=True)
    return rows


def quantize_variant(fp32: Path, variant: str, rtol: float) -> dict[str, Any]:
    """The row fields of ``variant`` (``export/int8_forms.py``) of ``fp32``, verified
    teacher-forced against the fp32 file."""
    from sparsify_fx.export.int8_forms import quantize_form, verify_form
    t0 = time.perf_counter()
    dst = quantize_form(fp32, fp32.with_name(f"{fp32.stem}_{variant}.onnx"), variant)
    check = verify_form(fp32, dst)
    print(f"{dst.name}: {VARIANTS[variant]}; teacher-forced max |diff| "
          f"{check['max_abs_diff']:.3g} of scale {check['logit_scale']:.3g}", flush=True)
    return {"file": str(dst), "bytes": dst.stat().st_size, "quantization": VARIANTS[variant],
            "teacher_forced_max_abs_diff": check["max_abs_diff"],
            "logit_scale": check["logit_scale"], "int8_rtol": rtol,
            "int8_within_rtol": check["ratio"] <= rtol, "checks": [check],
            "export_s": time.perf_counter() - t0,
            "fusion": None if res.fusion is None else res.fusion.describe()}


def result_dict(args: argparse.Namespace, argv: list[str] | None, description: str,
                model: torch.nn.Module, rows: dict[str, dict[str, Any]], t_start: float,
                timing_s: dict[str, float] | None, loads: dict[str, float]) -> dict[str, Any]:
    timed = bool(timing_s) and all(set(args.timings) <= set(r.get("timing", {}))
                                   for r in rows.values())
    return {"command": command_line("llm_decode_speed.py", argv), "machine": machine(THREADS),
            "model": description, "config": {k: getattr(model.config, k, None) for k in SHAPE},
            "prompt": args.prompt, "decode": args.decode, "batch": 1, "rounds": args.rounds,
            "runs": args.runs, "int8_rtol": args.int8_rtol, "complete": timed,
            "ppl_blocks": args.ppl_blocks, "goals": GOALS,
            "timings": {n: TIMINGS[n] for n in args.timings},
            "goals_met": {t: {k: rows[k]["timing"][t]["decode_ratio"] >= g
                              for k, g in GOALS.items() if t in rows.get(k, {}).get("timing", {})}
                          for t in args.timings},
            "rows": rows, "timing_s": timing_s, "wall_s": time.perf_counter() - t_start,
            "load_average_1min": {**loads, "end": os.getloadavg()[0]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="auto", choices=["auto", "pretrained", "random", "quick"])
    ap.add_argument("--keeps", nargs="*", type=float, default=[0.75, 0.5])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared"
                                            / "data" / "text" / "pydocs.txt"))
    ap.add_argument("--ppl-blocks", type=int, default=32)
    ap.add_argument("--int8-rtol", type=float, default=0.5,
                    help="int8 teacher-forced logits bound, fraction of the logit scale (the "
                         "pretrained dense model measured 0.24 of 36; perplexity is reported)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="further int8 forms quantized from each fp32 file (export/quantize.py "
                         "INT8_VARIANTS), verified teacher-forced against the fp32 file")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "llm_decode_speed"),
                    help="folder for the files; a form whose <name>.json is there is reused")
    ap.add_argument("--skip-timing", action="store_true", help="export (+ perplexity) only")
    ap.add_argument("--timings", nargs="*", default=list(TIMINGS), choices=list(TIMINGS),
                    help="timing configurations, each a full alternating comparison")
    ap.add_argument("--no-dense", action="store_true",
                    help="leave the dense form out (a second export process beside a first)")
    ap.add_argument("--unfused-work", default=None,
                    help="a --work folder of files exported with fuse=False (an earlier "
                         "run): its --unfused-forms are timed beside these as <form>_unfused")
    ap.add_argument("--unfused-forms", nargs="*", default=["dense", "structured_0.5_int8"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "llm_decode_speed"))
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    t_start = time.perf_counter()
    loads = {"start": os.getloadavg()[0]}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    model, tok, description = load(args.model)
    print(description, flush=True)
    blocks = (validation_blocks(tok, args.corpus, args.prompt, args.ppl_blocks)
              if tok is not None else None)
    rows: dict[str, dict[str, Any]] = {}

    def save_partial() -> None:
        r = result_dict(args, argv, description, model, rows, t_start, None, loads)
        write_results(args.out, r, markdown(r))

    for keep in ([] if args.no_dense else [None]) + list(args.keeps):
        name = "dense" if keep is None else f"structured_{keep:g}"
        saved = work / f"{name}.json"
        if saved.exists() and all(Path(r["file"]).exists() for r in
                                  json.loads(saved.read_text()).values()):
            new = json.loads(saved.read_text())
            print(f"{name}: reusing {saved}", flush=True)
        else:
            m, info = (model, {}) if keep is None else structured(model, keep, args.prompt)
            new = export_form(name, m, work, info, args.prompt, args.decode, args.int8_rtol)
            del m
        for variant in args.variants:
            key = f"{name}_{variant}"
            if key not in new:
                new[key] = {**{k: v for k, v in new[name].items()
                               if k not in ("checks", "perplexity", "timing")},
                            **quantize_variant(Path(new[name]["file"]), variant, args.int8_rtol)}
                saved.write_text(json.dumps(new, indent=1))
        for key, row in new.items():
            if blocks is not None and "perplexity" not in row:
                row["perplexity"] = perplexity(Path(row["file"]), blocks)
                print(f"{key}: perplexity {row['perplexity']:.2f}", flush=True)
                saved.write_text(json.dumps(new, indent=1))
        rows.update(new)
        save_partial()
    rows.update(unfused_rows(args))
    if args.skip_timing:
        return 0
    timing_s: dict[str, float] = {}
    for name in args.timings:
        loads[f"{name}_start"] = os.getloadavg()[0]
        t0 = time.perf_counter()
        speed = sf_compare({k: Path(r["file"]) for k, r in rows.items()}, args, TIMINGS[name])
        timing_s[name] = time.perf_counter() - t0
        for key, s in speed.items():
            rows[key].setdefault("timing", {})[name] = s
        r = result_dict(args, argv, description, model, rows, t_start, timing_s, loads)
        write_results(args.out, r, markdown(r))
    return 0


def unfused_rows(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``--unfused-forms`` read from ``--unfused-work``'s ``<form>.json`` files, keyed
    ``<form>_unfused`` (their files were exported with ``fuse=False``)."""
    if not args.unfused_work:
        return {}
    found: dict[str, dict[str, Any]] = {}
    for saved in sorted(Path(args.unfused_work).glob("*.json")):
        try:
            rows = json.loads(saved.read_text())
        except ValueError:
            continue
        for key, row in rows.items() if isinstance(rows, dict) else ():
            if key in args.unfused_forms and isinstance(row, dict) and "file" in row:
                found[f"{key}_unfused"] = {**{k: v for k, v in row.items() if k != "timing"},
                                           "fusion": "unfused (fuse=False)"}
    return found


def sf_compare(paths: dict[str, Path], args: argparse.Namespace,
               config: dict[str, str] | None) -> dict[str, Any]:
    import sparsify_fx as sf
    return sf.compare_decode_speed(paths, rounds=args.rounds, prompt_length=args.prompt,
                                   decode_tokens=args.decode, batch=1, threads=THREADS,
                                   runs=args.runs, session_config=config).to_dict()


def _fmt(row: dict[str, Any], key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


TIMING_LABELS = {"default": "default session options (2 intra-op threads, thread spinning on)",
                 "no-spin": "2 intra-op threads, spinning off (session.intra_op.allow_spinning=0)"}


def markdown(r: dict[str, Any]) -> str:
    loads = ", ".join(f"{k} {v:.2f}" for k, v in r["load_average_1min"].items())
    timing = ("not run" if not r["timing_s"] else
              ", ".join(f"{k} {v:.0f} s" for k, v in r["timing_s"].items()))
    lines = ["# Generation speed of pruned decoders in onnxruntime (prefill / decode tokens/s)",
             "", f"`{r['command']}`  ", f"{r['machine']}; {r['model']}; batch 1, prompt "
             f"{r['prompt']} tokens, {r['decode']} decode steps; each file in its own process, "
             f"alternating, {r['rounds']} rounds x {r['runs']} runs per timing configuration; "
             f"wall {r['wall_s']:.0f} s (timing: {timing}); 1-minute load average: {loads} "
             "(2 cores, shared)", ""]
    if not r["complete"]:
        lines += ["**Partial results: not every timing configuration has run.**", ""]
    lines += ["| file | params | bytes | perplexity | blocks MACs | KV heads / heads / MLP "
              "| graph |", "|---|---|---|---|---|---|---|"]
    for k, row in r["rows"].items():
        lines.append(f"| {k} | {row['params'] / 1e6:.1f} M | {row['bytes'] / 2**20:.0f} MiB | "
                     f"{_fmt(row, 'perplexity', '.2f')} | {row.get('blocks_macs_ratio', 1.0):.3f}"
                     f" | {row['kv_heads']} / {row['heads']} / {row['intermediate']} | "
                     f"{row.get('fusion') or '-'} |")
    for name in r["timings"]:
        if not any(name in row.get("timing", {}) for row in r["rows"].values()):
            continue
        lines += ["", f"### Speed: {TIMING_LABELS.get(name, name)}", "",
                  "| file | prefill tok/s | decode tok/s | ms / token | prefill x | decode x |",
                  "|---|---|---|---|---|---|"]
        for k, row in r["rows"].items():
            t = row.get("timing", {}).get(name, {})
            lines.append(f"| {k} | {_fmt(t, 'prefill_tokens_per_s', '.0f')} | "
                         f"{_fmt(t, 'decode_tokens_per_s', '.1f')} | "
                         f"{_fmt(t, 'decode_ms_per_token', '.1f')} | "
                         f"{_fmt(t, 'prefill_ratio', '.2f')} | {_fmt(t, 'decode_ratio', '.2f')} |")
        met = r["goals_met"].get(name, {})
        lines += ["", "Goals (decode tokens/s over dense fp32, same rounds): " + ", ".join(
            f"{k} >= {g}x: {'met' if met.get(k) else 'NOT met'}"
            for k, g in r["goals"].items() if k in met)]
    lines += ["", "int8 forms (teacher-forced logits: max |diff| vs the logit scale):"]
    for k, row in r["rows"].items():
        if "quantization" in row:
            lines.append(f"- {k}: {row['quantization']}; max |diff| "
                         f"{row['teacher_forced_max_abs_diff']:.2f} of scale "
                         f"{row['logit_scale']:.1f} (within {row['int8_rtol']:g}: "
                         f"{'yes' if row['int8_within_rtol'] else 'NO'})")
    lines += ["", "Decode MACs per token at the mean context (block Linears / lm_head / "
              "attention over the cache):"]
    for k, row in r["rows"].items():
        if "quantization" in row:
            continue
        m = row["decode_macs_at_context"]
        total = sum(m.values())
        lines.append(f"- {k}: {total / 1e6:.1f} M MACs: blocks {m['blocks'] / total:.1%}, "
                     f"lm_head {m['lm_head'] / total:.1%}, attention {m['attention'] / total:.1%}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
