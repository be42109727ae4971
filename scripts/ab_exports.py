#!/usr/bin/env python
"""Two or more export directories of one model (e.g. the same export with two versions of its ORT form) on ONNX
Runtime in one process, interleaved: vision, prefill, TTFT and decode medians per directory, and whether their
greedy tokens agree.

    python scripts/ab_exports.py LABEL=EXPORT_DIR LABEL=EXPORT_DIR [...] [--rounds 9] [--threads 2] [--new-tokens 32]

Each round runs every directory once, in the order given (swap the order in a second run to see order effects).
The prompt is bench.py's: 36 text ids around the image.
"""
from __future__ import annotations

import argparse

import numpy as np

from sts_export.bench.options import PHASES
from sts_export.bench.runner import interleaved_generations
from sts_export.pipeline import load_export_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+", help="LABEL=EXPORT_DIR")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    if any("=" not in e for e in a.exports):
        ap.error("give each export as LABEL=EXPORT_DIR")
    pipes = {}
    for spec in a.exports:
        label, d = spec.split("=", 1)
        pipes[label] = load_export_pipeline(d, backend="onnxruntime", device="cpu", threads=a.threads)
    times, tokens = interleaved_generations(pipes, a.rounds, a.new_tokens)
    same = all(np.array_equal(t, next(iter(tokens.values()))) for t in tokens.values())
    print(f"{a.threads} threads, {a.new_tokens} new tokens, medians of {a.rounds} rounds; same tokens: {same}")
    for label, v in times.items():
        m = dict(zip(PHASES, np.median(v, 0) * 1e3))
        print(f"  {label:12s} vision {m['vision']:7.1f}  prefill {m['prefill']:7.1f}  TTFT {m['ttft']:7.1f} ms  "
              f"decode {m['decode']:6.2f} ms/token")


if __name__ == "__main__":
    main()
