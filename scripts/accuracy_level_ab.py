"""Decode speed of a few exports of one model side by side: each loaded once in one process, then interleaved
rounds (one generation per export per round), so the machine's load hits them alike. Made for MatMulNBits'
accuracy_level (fp32 vs int4 at level 4 vs int4 at level 0), usable for any exports of one recipe.

    python scripts/accuracy_level_ab.py FP32_DIR INT4_DIR INT4_ACC0_DIR [--rounds 6] [--new-tokens 32] [--image PNG]

Prints per export the median decode ms/token over the rounds after the first, every round, and the ratio to the
first export's median. Backend: ONNX Runtime on the CPU (the ORT form where the export has it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sts_export.pipeline import Pipeline  # noqa: E402
from sts_export.export.quantize import sample_image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--image", type=Path, default=None, help="[the validation's synthetic image]")
    args = ap.parse_args()
    pipes = {d.name: Pipeline.from_export(d, backend="ort", device="cpu", threads=args.threads) for d in args.exports}
    image = args.image or sample_image()
    times: dict[str, list[float]] = {k: [] for k in pipes}
    for r in range(args.rounds):
        for name, pipe in pipes.items():
            g = pipe.generate(image, "What is shown in this image?", max_new_tokens=args.new_tokens)
            times[name].append(g.timings["decode"])  # seconds per token after the first
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    base = None
    for name, t in times.items():
        med = 1e3 * float(np.median(t[1:] if len(t) > 1 else t))
        base = base or med
        print(f"{name}: decode {med:.1f} ms/token ({base / med:.2f}x the first)  rounds "
              f"{[round(1e3 * x, 1) for x in t]}")


if __name__ == "__main__":
    main()
