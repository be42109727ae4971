#!/usr/bin/env python
"""Measure onnxruntime.quantization's int4/int8 algorithms and MatMulNBits' accuracy_level on one float export: RTN
(symmetric, the default) vs HQQ (asymmetric, float zero points, half-quadratic refinement of scales and zeros), and
per accuracy_level (0 unset = fp32 compute on CPU, 4 = int8 compute, the default), each against the unquantized graphs.

    python scripts/quant_algorithms.py --export exports/llava-1.5-7b-cpu-sts-b64 [--block-size 128] [--json out.json]
    python scripts/quant_algorithms.py --export EXPORT --algorithms rtn --accuracy-levels 0,4 [--weights int4,int8]

The export must be float (no --weights) at opset 21 (`export.py ... --opset 21`). Each algorithm quantizes a copy
(sts_export.export.quantize.quantize_and_compare), so the figures are those validation.json reports. GPTQ
(GPTQWeightOnlyQuantConfig) needs calibration inputs per model and is not measured here.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from sts_export.export.weights import Scheme
from sts_export.export.quantize import quantize_and_compare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, type=Path)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--algorithms", default="rtn,hqq")
    ap.add_argument("--accuracy-levels", default="4", help="comma-separated MatMulNBits accuracy_level values")
    ap.add_argument("--weights", default="int4", help="comma-separated: int4, int8 (int8: rtn only)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = {}
    runs = [(w, alg, int(lv)) for w in args.weights.split(",") for alg in args.algorithms.split(",")
            for lv in args.accuracy_levels.split(",") if w == "int4" or alg == "rtn"]
    for w, alg, level in runs:
        key = f"{w}-{alg}-acc{level}"
        with tempfile.TemporaryDirectory(dir=args.export.parent) as tmp:
            d = Path(tmp) / "q"
            shutil.copytree(args.export, d)
            t = time.perf_counter()
            r = quantize_and_compare(d, Scheme(w, args.block_size, "matmulnbits", algorithm=alg, accuracy_level=level),
                                     progress=lambda s: None)
            e2e = r["end_to_end"]
            seg = {k: v.get("logits", v.get("hidden_out", {})).get("cosine") for k, v in r["graphs"].items()
                   if k.startswith("segment")}
            results[key] = {"seconds": round(time.perf_counter() - t, 1), **{k: e2e[k] for k in (
                "first_logits_cosine", "first_logits_rms_error_over_std", "greedy_agreement",
                "free_running_identical_prefix", "keep_post_agreement")}, "segment_cosines": seg}
            print(key, json.dumps(results[key]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
