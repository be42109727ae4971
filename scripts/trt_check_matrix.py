"""The static TensorRT check over every tiny family x method x dtype (and the int4 QDQ form): one table.

Exports each tiny family with every Stage 1/2 method at fp32 and fp16, and with int4 weights as TensorRT's QDQ form
(`--weights int4 --target trt`, fp16), into one parent directory per family (so sibling exports lend each other the
graphs whose build key matches: the decoder graphs are exported once per dtype/opset), `validate=False`. Then runs
`check_model` (the registration walk and the per-op rules of onnx-tensorrt's importer) on every `*.onnx` for each
TensorRT version and prints one row per export: the graphs, their verdicts per version, the registration walk alone
over every graph and version, and the first problem; then the problems counted by message. ONNX Runtime's form of the
vision graph (`vision.ort.onnx`, fused ONNX Runtime ops TensorRT never builds) gets the registration walk only: its
Stage 1 Loop is the same onnxscript translation.

Usage: python scripts/trt_check_matrix.py [--out /tmp/trt-matrix] [--families tiny-llava,tiny-qwen2.5-vl]
                                          [--versions 10.3,10.16,11.4] [--check-only]
--check-only reuses the exports already under --out (re-exporting nothing). Exit 1 when any graph fails.
Needs STS_CACHE for the synthetic checkpoints (e.g. STS_CACHE=/tmp/x/cache).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sts_export.export.tensorrt.check import check_model, parse_versions  # noqa: E402
from sts_export.export.tensorrt.parser_walk import registration_problems  # noqa: E402

# (method, budget) per family: the budgets tests/test_export.py exports (Qwen has no [CLS]: no cls)
LLAVA = [("none", "full"), ("sts", 64), ("sts-s", 64), ("fastv", 300), ("divprune", 64), ("cls", 64)]
FAMILIES: dict[str, list[tuple[str, int | str]]] = {
    "tiny-llava": LLAVA,
    "tiny-llava-gqa": LLAVA,
    "tiny-llava-next": [("none", "full"), ("sts", 320), ("sts-s", 320), ("fastv", 2000), ("divprune", 320),
                        ("cls", "10%")],
    "tiny-qwen2.5-vl": [("none", "full"), ("sts", "20%"), ("sts-s", "10%"), ("fastv", "60%"), ("divprune", "10%")],
}
FORMS = [("fp32", None), ("fp16", None), ("fp16", "int4")]  # (dtype, weights): int4 is the TensorRT QDQ form


def _label(dtype: str, weights: str | None) -> str:
    return f"{dtype}-{weights}" if weights else dtype


def export_all(out: Path, families: list[str], check_only: bool) -> list[tuple[str, str, str, Path]]:
    """Export (or, with check_only, find) every family x method x form; [(family, method, form, dir), ...]."""
    from sts_export.export.onnx import export  # noqa: PLC0415

    done = []
    for fam in families:
        for method, budget in FAMILIES[fam]:
            for dtype, weights in FORMS:
                d = out / fam / f"{method}-{_label(dtype, weights)}"
                if not check_only and not (d / "manifest.json").exists():
                    t = time.perf_counter()
                    export(fam, budget=budget, method=method, dtype=dtype, out=d, validate=False, force=True,
                           weights=weights, target="trt" if weights else "onnx", progress=lambda s: None)
                    print(f"exported {fam} {method} {_label(dtype, weights)} in {time.perf_counter() - t:.1f} s",
                          flush=True)
                if (d / "manifest.json").exists():
                    done.append((fam, method, _label(dtype, weights), d))
    return done


def check_all(exports: list[tuple[str, str, str, Path]], versions: list[str]) -> bool:
    """Print the table (full check per version; the registration walk alone over every graph and version, and over
    ONNX Runtime's vision form) and a count of the problems by message; True when every graph passes."""
    head = (f"{'family':<16} {'method':<9} {'form':<10} {'graphs':>6} {'nodes':>6} "
            + " ".join(f"{'TRT ' + v:>9}" for v in versions) + f"  {'walk':>5}  {'walk ORT vision':>15}  first problem")
    print(head)
    print("-" * len(head))
    all_ok, kinds = True, Counter()
    for fam, method, form, d in exports:
        paths = sorted(p for p in d.glob("*.onnx") if not p.name.endswith(".ort.onnx"))
        verdicts, first, nodes = [], "", 0
        for v in versions:
            reports = [check_model(p, trt_version=v) for p in paths]
            nodes = sum(r.num_nodes for r in reports)
            bad = [line for r in reports for line in r.problems]
            kinds.update(f"TRT {v}: {line.split('): ', 1)[-1][:110]}" for line in bad)
            verdicts.append("PASS" if not bad else f"FAIL {len(bad)}")
            first = first or (bad[0] if bad else "")
        walk_bad = [line for v in versions for p in paths for line in registration_problems(p, v)]
        walk = "PASS" if not walk_bad else f"FAIL {len(walk_bad)}"
        ort_vision, ort_walk = d / "vision.ort.onnx", "-"
        if ort_vision.exists():
            ort_bad = [line for v in versions for line in registration_problems(ort_vision, v)]
            ort_walk = "PASS" if not ort_bad else f"FAIL {len(ort_bad)}"
            first = first or (ort_bad[0] if ort_bad else "")
        all_ok &= all(x == "PASS" for x in verdicts) and walk == "PASS" and ort_walk in ("PASS", "-")
        print(f"{fam:<16} {method:<9} {form:<10} {len(paths):>6} {nodes:>6} "
              + " ".join(f"{x:>9}" for x in verdicts) + f"  {walk:>5}  {ort_walk:>15}  {first[:100]}", flush=True)
    if kinds:
        print("\nproblems by message (count over every graph and version):")
        for what, n in kinds.most_common():
            print(f"  {n:>5}  {what}")
    return all_ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/trt-matrix"))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--versions", default="10.3,10.16,11.4")
    ap.add_argument("--check-only", action="store_true", help="check the exports already under --out")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    families = [f.strip() for f in args.families.split(",")]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    t = time.perf_counter()
    exports = export_all(args.out, families, args.check_only)
    print(f"{len(exports)} exports ready in {time.perf_counter() - t:.0f} s\n", flush=True)
    t = time.perf_counter()
    ok = check_all(exports, parse_versions(args.versions))
    print(f"\nchecked in {time.perf_counter() - t:.0f} s: {'every graph PASSES' if ok else 'FAILURES above'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
