"""``--task causal-lm``: the pruned model as an ONNX decoder, and its tokens/s beside dense.

:func:`write_decoder` writes ``decoder.onnx`` (the pruned model as its Hugging Face
class, exported by :func:`~sparsify_fx.export.onnx_decoder.export_decoder`: one file
with past key/values, verified inside the call: greedy onnxruntime tokens equal
``generate()``'s) and times generation with it against the input model exported the
same way (a scratch file, not kept, not verified: a timing reference only), with
:func:`~sparsify_fx.latency.decode_speed.compare_decode_speed`: a prompt of
``prompt_length`` random tokens then ``decode_tokens`` decode steps, batch 1,
:data:`THREADS` onnxruntime threads, each file in a process of its own, :data:`ROUNDS`
alternating rounds. :func:`generation_markdown` is report.md's section.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from sparsify_fx.prune.outdir import DECODER_FILE

#: the timed generation: prompt tokens (prefill), then decode steps, batch 1
PROMPT_LENGTH, DECODE_TOKENS = 128, 64
THREADS, ROUNDS, RUNS = 2, 3, 3


def generation_lengths(model: nn.Module) -> tuple[int, int]:
    """(prompt tokens, decode steps): :data:`PROMPT_LENGTH` / :data:`DECODE_TOKENS`, cut
    down (prompt first, halved decode next) to fit the model's position table."""
    cfg = getattr(model, "config", None)
    limit = next((int(v) for v in (getattr(cfg, n, None) for n in
                                    ("max_position_embeddings", "n_positions", "n_ctx"))
                  if isinstance(v, int) and v > 0), None)
    prompt, decode = PROMPT_LENGTH, DECODE_TOKENS
    if limit is None:
        return prompt, decode
    decode = min(decode, max(1, limit // 2 - 1))
    prompt = max(1, min(prompt, limit - decode - 1))
    return prompt, decode


def write_decoder(source: nn.Module, pruned: nn.Module, stage: Path) -> dict[str, Any]:
    """Write ``stage/decoder.onnx`` from ``pruned`` (verified) and time it against
    ``source`` (the input model); the summary's ``decoder`` entry."""
    from sparsify_fx.export.onnx_decoder import export_decoder
    from sparsify_fx.latency.decode_speed import compare_decode_speed
    res = export_decoder(pruned, stage / DECODER_FILE)
    prompt, decode = generation_lengths(source)
    with tempfile.TemporaryDirectory(dir=stage) as scratch:
        dense = export_decoder(source, Path(scratch) / "dense_decoder.onnx", verify=False)
        speed = compare_decode_speed({"dense": dense.path, "pruned": res.path}, rounds=ROUNDS,
                                     prompt_length=prompt, decode_tokens=decode,
                                     threads=THREADS, runs=RUNS)
    timed = speed.to_dict()

    def side(key: str, size: int) -> dict[str, Any]:
        return {"bytes": size, **{k: timed[key][k] for k in (
            "prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token")}}

    return {"file": DECODER_FILE, "bytes": res.bytes,
            "kv_heads": [h for h, _ in res.layout.keys],
            "verified": [c.to_dict() for c in res.checks],
            "timing": {"prompt_length": prompt, "decode_tokens": decode, "batch": 1,
                       "threads": THREADS, "rounds": ROUNDS, "runs": RUNS},
            "dense": side("dense", dense.bytes), "pruned": side("pruned", res.bytes),
            "prefill_ratio": timed["pruned"]["prefill_ratio"],
            "decode_ratio": timed["pruned"]["decode_ratio"]}


def generation_markdown(entry: dict[str, Any]) -> str:
    """report.md's generation section: tokens/s of the dense and the pruned decoder."""
    t = entry["timing"]
    lines = ["## Generation (onnxruntime, key/value cache)", "",
             f"Prompt of {t['prompt_length']} tokens (prefill), then {t['decode_tokens']} "
             f"decode steps; batch 1, {t['threads']} threads, each file in its own process, "
             f"{t['rounds']} alternating rounds (medians). `{entry['file']}` is verified: its "
             "greedy tokens equal `generate()`'s.", "",
             "| decoder | bytes | prefill tokens/s | decode tokens/s | decode ms/token |",
             "|---|---:|---:|---:|---:|"]
    for name, key in (("input model, dense fp32 (not kept)", "dense"),
                      (f"{entry['file']} (pruned)", "pruned")):
        s = entry[key]
        lines.append(f"| {name} | {s['bytes']:,} | {s['prefill_tokens_per_s']:.1f} | "
                     f"{s['decode_tokens_per_s']:.1f} | {s['decode_ms_per_token']:.3f} |")
    lines += ["", f"Pruned / dense tokens/s: prefill {entry['prefill_ratio']:.3f}x, decode "
              f"{entry['decode_ratio']:.3f}x."]
    return "\n".join(lines)


__all__ = ["write_decoder", "generation_markdown", "generation_lengths"]
