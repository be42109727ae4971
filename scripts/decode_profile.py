#!/usr/bin/env python
"""Where a decode step's time goes: ONNX Runtime's profiler on one export's sessions and, optionally, on an
onnxruntime-genai decoder of the same text shape (the one bench.py --backends ort-genai builds), kernel time per
op type per decode step, beside each step's wall time inside ONNX Runtime.

    python scripts/decode_profile.py EXPORT_DIR [--genai GENAI_DIR] [--new-tokens 16] [--threads 2]

The decode steps are each session's last N - 1 runs (N = --new-tokens; the first token comes from the prefill).
GenAI is fed S random ids, S = this export's S1 with its prompt (36 text ids around the image). The two run one
after the other, not interleaved: compare their kernel mix, and time them against each other with bench.py.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sts_export.backends import onnxruntime as ort_backend
from sts_export.bench.cost import DEFAULT_TEXT_TOKENS
from sts_export.bench.options import default_image, prompt_ids
from sts_export.pipeline import load_export_pipeline


def decode_ops(trace: Path, steps: int) -> tuple[int, float, dict[str, float]]:
    """(decode runs, ms per run, kernel ms per run per op type) of one ONNX Runtime profile: its last `steps` runs."""
    ev = json.loads(trace.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("name") == "model_run")[-steps:]
    starts = [a for a, _ in runs]
    per_op: collections.Counter[str] = collections.Counter()
    for e in ev:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            i = bisect.bisect_right(starts, e["ts"]) - 1
            if i >= 0 and e["ts"] <= runs[i][1]:
                per_op[e["args"]["op_name"]] += e["dur"]
    n = max(len(runs), 1)
    wall = sum(b - a for a, b in runs) / n / 1e3
    return len(runs), wall, {k: v / n / 1e3 for k, v in per_op.most_common()}


def show(label: str, runs: int, wall: float, ops: dict[str, float], top: int = 6) -> None:
    kern = sum(ops.values())
    parts = ", ".join(f"{k} {v:.2f}" for k, v in list(ops.items())[:top])
    print(f"  {label:10s} {runs:3d} steps  {wall:6.2f} ms/step in ORT, kernels {kern:6.2f} ms: {parts}")


def genai_child(genai_dir: str, s1: int, new_tokens: int, threads: int, prefix: str) -> None:
    """S1 random ids through onnxruntime-genai's decoder, then new_tokens greedy steps, profiled to `prefix`."""
    import onnxruntime_genai as og

    cfg = og.Config(genai_dir)
    cfg.clear_providers()
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1, "enable_profiling": prefix}}}}))
    model = og.Model(cfg)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=s1 + new_tokens, min_length=s1 + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.random.default_rng(0).integers(5, 1000, s1).astype(np.int32))
    for _ in range(new_tokens):
        gen.generate_next_token()


def main() -> None:
    if sys.argv[1:2] == ["--genai-child"]:
        d, s1, n, t, prefix = sys.argv[2:7]
        return genai_child(d, int(s1), int(n), int(t), prefix)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--genai", help="an onnxruntime-genai decoder directory (genai_config.json, model.onnx)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="sts-decode-profile-"))

    base = ort_backend.OrtBackend._options

    def profiled(self: Any) -> Any:  # every session of this process writes a profile under `out`
        o = base(self)
        o.enable_profiling, o.profile_file_prefix = True, str(out / "ours")
        return o

    ort_backend.OrtBackend._options = profiled  # type: ignore[method-assign]
    p = load_export_pipeline(a.export_dir, backend="onnxruntime", device="cpu", threads=a.threads)
    r = p.recipe
    ids = prompt_ids(p, "", DEFAULT_TEXT_TOKENS)  # bench.py's pseudo-prompt: 36 text ids around the image
    g = p.generate(default_image(r), input_ids=ids, max_new_tokens=a.new_tokens)
    print(f"{a.export_dir}: S1 = {g.s1}, S2 = {g.s2}, {a.new_tokens} tokens, {a.threads} threads "
          f"(decode {g.timings['decode'] * 1e3:.2f} ms/token with the profiler on)")
    backend = p.backend
    while hasattr(backend, "inner"):
        backend = backend.inner
    for graph, sess in backend.sessions.items():
        trace = Path(sess.end_profiling())
        if graph in ("embed", "segment1", "segment2"):  # the graphs of a decode step
            show(graph, *decode_ops(trace, a.new_tokens - 1))
    if a.genai:  # in a child process: onnxruntime-genai writes its profile when the process lets the model go
        subprocess.run([sys.executable, __file__, "--genai-child", a.genai, str(g.s1), str(a.new_tokens),
                        str(a.threads), str(out / "genai")], check=True)
        for trace in sorted(out.glob("genai*.json")):
            show("ort-genai", *decode_ops(trace, a.new_tokens - 1))
    print(f"profiles: {out}")


if __name__ == "__main__":
    main()
