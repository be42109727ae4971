#!/usr/bin/env python
"""Where a prefill's time goes, ours beside transformers': ONNX Runtime's profiler over one export's generation
(kernel time per op type per graph, prefill and the first token), and torch.profiler over transformers' language
model prefilling the same sequence length on the same synthetic weights (the bench's transformers peer).

    python scripts/prefill_profile.py EXPORT_DIR [--image PNG] [--rounds 2] [--threads 2] [--no-transformers]

EXPORT_DIR is an fp32 export with random weights of a recipe (what `sts bench --random-weights` writes); the
transformers side loads the same synthetic checkpoint (STS_CACHE). The text prompt is the bench's 36 ids.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile_ours(export_dir: Path, image: object, rounds: int, threads: int | None) -> int:
    """Kernel ms per op type per graph per generation (prefill + 1 token); returns the prefill's sequence length."""
    import onnxruntime as ort

    real, sessions, out = ort.InferenceSession, [], tempfile.mkdtemp(prefix="prefill-profile-")

    class Profiled(real):  # type: ignore[misc, valid-type]
        def __init__(self, path: object, sess_options: object = None, *a: object, **k: object) -> None:
            so = sess_options or ort.SessionOptions()
            so.enable_profiling = True
            name = os.path.basename(str(path)) if isinstance(path, (str, os.PathLike)) else "in-memory"
            so.profile_file_prefix = os.path.join(out, name)
            super().__init__(path, so, *a, **k)
            sessions.append((name, self))

    ort.InferenceSession = Profiled
    try:
        from sts_export.bench.options import prompt_ids
        from sts_export.pipeline import Pipeline

        pipe = Pipeline.from_export(export_dir, backend="ort", device="cpu", threads=threads)
        ids = prompt_ids(pipe, "", 36)
        for _ in range(rounds):
            g = pipe.generate(image, input_ids=ids, max_new_tokens=1)
            print("ours:", {k: round(v * 1e3, 1) for k, v in g.timings.items() if v}, "S =", g.s1)
    finally:
        ort.InferenceSession = real
    for path, sess in sessions:
        events = json.load(open(sess.end_profiling()))
        per_op: collections.Counter = collections.Counter()
        calls: collections.Counter = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_op[e["args"]["op_name"]] += e["dur"]
                calls[e["args"]["op_name"]] += 1
        total = sum(per_op.values())
        if total:
            print(f"  {path}: {total / rounds / 1e3:.0f} ms per generation")
            for op, us in per_op.most_common(6):
                print(f"    {op:34s} {us / rounds / 1e3:8.1f} ms  {100 * us / total:5.1f}%  calls {calls[op] // rounds}")
    shutil.rmtree(out, ignore_errors=True)  # the profiles were read above
    return int(g.s1)


def profile_transformers(model: str, seq_len: int, threads: int | None) -> None:
    """torch.profiler over the transformers class's language model prefilling `seq_len` embeddings."""
    import torch
    import transformers
    from torch.profiler import profile

    from sts_export.bench.options import BenchOptions, recipe_of
    from sts_export.bench.peers import HF_CLASSES, peer_source

    if threads:
        torch.set_num_threads(threads)
    opts = BenchOptions(models=[model], budgets=["full"], methods=["sts"], random_weights=True)
    recipe = recipe_of(model)
    path, _ = peer_source(model, recipe, opts)
    hf = getattr(transformers, HF_CLASSES[recipe.family]).from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa").eval()
    emb = torch.randn(1, seq_len, recipe.text.hidden_size) * 0.02  # [1, S, C]
    lm = hf.model.language_model
    with torch.inference_mode():
        lm(inputs_embeds=emb, use_cache=True)  # warm-up
        t = time.perf_counter()
        lm(inputs_embeds=emb, use_cache=True)
        print(f"transformers: language model prefill at S = {seq_len}: {1e3 * (time.perf_counter() - t):.0f} ms")
        with profile() as prof:
            lm(inputs_embeds=emb, use_cache=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path)
    ap.add_argument("--image", type=Path, default=None, help="[the validation's synthetic image]")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()
    from PIL import Image

    from sts_export.artifact.manifest import read_manifest
    from sts_export.export.quantize import sample_image

    image = Image.open(args.image) if args.image else sample_image()
    seq_len = profile_ours(args.export, image, args.rounds, args.threads)
    if not args.no_transformers:
        profile_transformers(read_manifest(args.export)["recipe"]["name"], seq_len, args.threads)


if __name__ == "__main__":
    main()
