#!/usr/bin/env python
"""ONNX Runtime thread spinning (STS_ORT_SPIN, backends/onnxruntime.py) on one export: TTFT and decode per mode,
interleaved rounds in one process, medians.

    python scripts/ort_spinning.py EXPORT_DIR [--modes 0,run,1] [--rounds 3] [--threads 2] [--new-tokens 16]

0: workers never spin; run: they spin within a run and stop at its end (the default); 1: ONNX Runtime's default
(they keep spinning after a run). The prompt is 36 text ids around the image.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from sts_export.bench.cost import DEFAULT_TEXT_TOKENS
from sts_export.bench.runner import default_image, prompt_ids
from sts_export.pipeline import load_export_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--modes", default="0,run,1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    a = ap.parse_args()
    pipes = {}
    for mode in a.modes.split(","):
        os.environ["STS_ORT_SPIN"] = mode  # read when each session is created: load them now
        p = load_export_pipeline(a.export_dir, backend="onnxruntime", device="cpu", threads=a.threads)
        r = p.recipe
        ids = prompt_ids(p, "", DEFAULT_TEXT_TOKENS)  # bench.py's pseudo-prompt: 36 text ids around the image
        img = default_image(r)
        p.generate(img, input_ids=ids, max_new_tokens=a.new_tokens)  # warm-up, creates every session
        pipes[mode] = p
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in pipes}
    for _ in range(a.rounds):
        for mode, p in pipes.items():
            g = p.generate(img, input_ids=ids, max_new_tokens=a.new_tokens)
            times[mode].append((g.timings["ttft"], g.timings["decode"]))
    print(f"{a.export_dir}: {a.threads} threads, medians of {a.rounds}")
    for mode, v in times.items():
        t = np.median(np.array(v), 0) * 1e3
        print(f"  STS_ORT_SPIN={mode:4s} TTFT {t[0]:7.0f} ms  decode {t[1]:6.2f} ms/token")


if __name__ == "__main__":
    main()
