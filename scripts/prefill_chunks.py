#!/usr/bin/env python
"""TTFT, LLM prefill and decode of one export's ORT form on CPU per prefill chunk size (OrtBackend.prefill_chunk,
generate.run_segment), interleaved rounds in one process, medians; greedy tokens checked against one call.

    python scripts/prefill_chunks.py EXPORT_DIR [--chunks 0,512,256,128,64] [--rounds 2] [--threads 2]

0 = each prefill as one call. The prompt is 36 text ids around the image (the bench's default length).
"""
from __future__ import annotations

import argparse

import numpy as np

from sts_export.bench.cost import DEFAULT_TEXT_TOKENS
from sts_export.bench.options import default_image, prompt_ids
from sts_export.pipeline import load_export_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--chunks", default="0,512,256,128,64")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    chunks = [int(c) for c in a.chunks.split(",")]
    pipe = load_export_pipeline(a.export_dir, backend="onnxruntime", device="cpu", threads=a.threads)
    r = pipe.recipe
    ids = prompt_ids(pipe, "", DEFAULT_TEXT_TOKENS)  # bench.py's pseudo-prompt: 36 text ids around the image
    img = default_image(r)
    times: dict[int, list[tuple[float, float, float]]] = {c: [] for c in chunks}
    tokens: dict[int, list] = {}
    for rnd in range(a.rounds + 1):  # round 0 warms up
        for c in chunks:
            pipe.backend.prefill_chunk = c or None
            g = pipe.generate(img, input_ids=ids, max_new_tokens=4)
            tokens[c] = g.tokens.tolist()
            if rnd:
                times[c].append((g.timings["ttft"], g.timings["prefill"], g.timings["decode"]))
    print(f"{a.export_dir}: S1 = {g.s1}, {a.threads} threads, medians of {a.rounds}")
    for c in chunks:
        t = np.median(np.array(times[c]), 0) * 1e3
        print(f"  chunk {c or 'none':>5}: TTFT {t[0]:8.0f} ms  prefill {t[1]:8.0f} ms  decode {t[2]:6.1f} ms/token  "
              f"tokens as one call: {tokens[c] == tokens[chunks[0]]}")


if __name__ == "__main__":
    main()
