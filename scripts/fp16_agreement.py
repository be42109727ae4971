#!/usr/bin/env python
"""How far a reduced-precision export's kept sets are from the float32 reference's, over many images.

    python scripts/fp16_agreement.py EXPORT_DIR [--images 24]

The export's portable graphs run on ONNX Runtime (free-running, as users run them); the reference is the export's
own torch graphs computing in float32 on the same weights (validation's reference, `Fp32Compute`). Per image:
Stage 1 / Stage 2 overlap (share of the reference's kept tokens the graphs kept too), the margin of the set's
objective (STS: potential energy; positive = the graphs' set is worse) and the first-token logits' max abs error
against the reference re-run with the graphs' own picks. These figures set validation's AGREEMENT floors
(docs/design.md, "What a reduced-precision export promises").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sts_export.backends.onnxruntime import OrtBackend  # noqa: E402
from sts_export.backends.torch import TorchBackend  # noqa: E402
from sts_export.checkpoint import Source, ensure_synthetic, load_model  # noqa: E402
from sts_export.export.compare import compare_generations  # noqa: E402
from sts_export.artifact.manifest import manifest_plan, manifest_recipe, read_manifest  # noqa: E402
from sts_export.export.precision import (AGREEMENT, Fp32Compute, agreement, forced_picks,  # noqa: E402
                                         selection_inputs)
from sts_export.export.validate import sample_inputs  # noqa: E402
from sts_export.families import family_module  # noqa: E402
from sts_export.artifact.plan import TORCH_DTYPES  # noqa: E402
from sts_export.generate import generate  # noqa: E402
from sts_export.graphs import build_graphs  # noqa: E402


def images(n: int) -> list:
    """Smooth random images (blocks + noise) of varied sizes and aspect ratios."""
    from PIL import Image

    out = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        w, h = [(640, 480), (480, 640), (500, 500), (800, 400), (336, 336), (1000, 750)][i % 6]
        blocks = rng.integers(0, 256, (6 + i % 5, 8 + i % 7, 3)).astype(np.uint8)
        arr = np.asarray(Image.fromarray(blocks).resize((w, h), Image.BILINEAR)).astype(np.int16)
        arr = arr + rng.integers(-20, 21, arr.shape)
        out.append(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=1)
    a = ap.parse_args()
    m = read_manifest(a.export_dir)
    recipe = manifest_recipe(m)
    plan = manifest_plan(m, recipe)
    src = m["model"]
    path = None if src["random_weights"] else ensure_synthetic(recipe) if src.get("synthetic") else Path(src["source"])
    tdtype = getattr(torch, TORCH_DTYPES[m["dtype"]])
    graphs = build_graphs(load_model(Source(recipe, path), tdtype), m["method"], m["budget"], m["anchor"])
    ref_be, ort_be = TorchBackend(graphs, plan), OrtBackend(a.export_dir, m, device="cpu", form="portable")
    fam = family_module(recipe.family)
    _, prompt = sample_inputs(a.export_dir, recipe, 1)
    tol = getattr(recipe.tolerance, m["dtype"])
    print(f"{a.export_dir}: {recipe.name} {m['method']} b={m['budget']} {m['dtype']}; floors {AGREEMENT}")
    print("image | N | stage1 overlap | stage2 overlap | objective margin | logits max abs (same picks) | free")
    rows = []
    for i, img in enumerate(images(a.images)):
        image = fam.prepare_image([img], recipe)
        got = generate(ort_be, plan, image, prompt, a.new_tokens)
        with Fp32Compute():
            ref = generate(ref_be, plan, image, prompt, a.new_tokens)
            feats = selection_inputs(graphs["vision"], image, plan)
            with forced_picks(graphs, got.keep_pre, got.keep_post):
                same = generate(ref_be, plan, image, prompt, a.new_tokens)
        ag = agreement(m["method"], ref, got, feats)
        same_l = compare_generations(same, got, tol, m["dtype"])["first_logits"]["max_abs"]
        free_l = compare_generations(ref, got, tol, m["dtype"])["first_logits"]["max_abs"]
        margin = max(ag["objective"]["margin"]) if "objective" in ag else float("nan")
        rows.append((ag["keep_pre_overlap"], ag.get("keep_post_overlap", 1.0), margin, same_l, free_l))
        print(f"{i:5d} | {image.n} | {ag['keep_pre_overlap']:.4f} | {ag.get('keep_post_overlap', 1.0):.4f} | "
              f"{margin:+.2e} | {same_l:.4g} | {free_l:.4g}", flush=True)
    r = np.asarray(rows)
    print(f"min stage1 overlap {r[:, 0].min():.4f} (median {np.median(r[:, 0]):.4f}); min stage2 overlap "
          f"{r[:, 1].min():.4f} (median {np.median(r[:, 1]):.4f}); worst objective margin {np.nanmax(r[:, 2]):+.2e}; "
          f"logits max abs with the same picks: worst {r[:, 3].max():.4g} (tolerance {tol}), free: worst {r[:, 4].max():.4g}; "
          f"images with Stage 1 picks that differ: {(r[:, 0] < 1).sum()}/{len(r)}, Stage 2: {(r[:, 1] < 1).sum()}/{len(r)}")


if __name__ == "__main__":
    main()
