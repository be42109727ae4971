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

from sts_export.bench.options import PHASES
from sts_export.bench.runner import interleaved_generations
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
        os.environ["STS_ORT_SPIN"] = mode  # read when each session is created: create them now
        p = load_export_pipeline(a.export_dir, backend="onnxruntime", device="cpu", threads=a.threads)
        for graph in p.backend.manifest["graphs"]:
            p.backend.session(graph)
        pipes[mode] = p
    times, _ = interleaved_generations(pipes, a.rounds, a.new_tokens, warmup_tokens=a.new_tokens)
    print(f"{a.export_dir}: {a.threads} threads, medians of {a.rounds}")
    for mode, v in times.items():
        t = dict(zip(PHASES, np.median(v, 0) * 1e3))
        print(f"  STS_ORT_SPIN={mode:4s} TTFT {t['ttft']:7.0f} ms  decode {t['decode']:6.2f} ms/token")


if __name__ == "__main__":
    main()
