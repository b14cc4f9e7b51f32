"""Decode-step op-time breakdown of an ONNX decoder file (onnxruntime's profiler).

    .venv/bin/python benchmarks/decode_profile.py FILE.onnx [--steps 32] [--prompt 128]

A file written by ``export_decoder``: a prefill of ``--prompt`` random tokens, then
``--steps`` greedy decode steps with the cache, 2 intra-op threads; prints the mean wall
time of a decode step, the sum of its kernel times, the nodes run per step and the op
types with the most kernel time. The profiler adds its own cost per node: compare
shares, not the step time (``llm_decode_speed.py`` times files as users run them).
"""
from __future__ import annotations

import argparse
import collections
import json
import os

import numpy as np
import onnxruntime as ort


def decode(session: ort.InferenceSession, prompt: int, steps: int) -> None:
    """Greedy prefill + ``steps`` decode steps over ``session`` (batch 1)."""
    names = [i.name for i in session.get_inputs()]
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past")}
    outputs = [o.name for o in session.get_outputs()]
    ids = np.random.default_rng(0).integers(10, 1000, (1, prompt)).astype(np.int64)
    start = 0
    for _ in range(steps + 1):
        feed = {"input_ids": ids, "attention_mask": np.ones((1, start + ids.shape[1]), np.int64),
                **past}
        if "position_ids" in names:
            feed["position_ids"] = np.arange(start, start + ids.shape[1])[None]
        out = session.run(None, feed)
        start += ids.shape[1]
        past = {n.replace("present", "past_key_values"): v for n, v in zip(outputs[1:], out[1:])}
        ids = out[0][:, -1:].argmax(-1).astype(np.int64)


def breakdown(events: list[dict], top: int) -> str:
    """Per decode step (every run after the first): wall, kernel sum, nodes, top ops."""
    runs = [e for e in events if e.get("name") == "model_run"]
    decode_runs = runs[1:]
    first = decode_runs[0]["ts"]
    time_by_op: collections.Counter = collections.Counter()
    nodes_by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            time_by_op[e["args"]["op_name"]] += e["dur"]
            nodes_by_op[e["args"]["op_name"]] += 1
    n = len(decode_runs)
    total = sum(time_by_op.values())
    lines = [f"decode step wall {sum(r['dur'] for r in decode_runs) / n / 1e3:.2f} ms, kernel "
             f"sum {total / n / 1e3:.2f} ms, nodes/step {sum(nodes_by_op.values()) / n:.0f}"]
    for op, d in time_by_op.most_common(top):
        lines.append(f"  {op:34s} {d / n / 1e3:7.3f} ms  {d / total:6.1%}  "
                     f"n/step {nodes_by_op[op] / n:.0f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(args.file, options, providers=["CPUExecutionProvider"])
    decode(session, args.prompt, args.steps)
    profile = session.end_profiling()
    with open(profile) as f:
        events = json.load(f)
    os.unlink(profile)
    print(f"{args.file}: {breakdown(events, args.top)}")


if __name__ == "__main__":
    main()
