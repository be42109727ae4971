"""Quantize an export directory in place and check it against its float graphs: `quantize_and_compare` (the export's
last step for `--weights int8|int4`), `compare_exports` (per graph on the reference's feeds, then end to end) and
`check_quantized_form` (the quantized ORT form against the quantized portable graphs). The encodings themselves are
`weights.py`; every comparison goes through the one comparator (`compare.py`).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from sts_export.artifact.manifest import manifest_plan, manifest_recipe, read_manifest, write_manifest
from sts_export.artifact.memory import (DTYPE_BYTES, ORT_BASE_EXTRA, ORT_CPU_WEIGHT_BYTES, ORT_SESSION_FACTOR,
                                        available_memory, fmt, release_memory)
from sts_export.artifact.protocol import Wrapped
from sts_export.backends.onnxruntime import OrtBackend
from sts_export.errors import StsError
from sts_export.export.compare import compare_array, compare_generations, cosine
from sts_export.export.io import file_entry, graph_entries
from sts_export.export.validate import release_weights, sample_inputs
from sts_export.export.weights import Scheme, _graph_files, quantize_export, quantized_graphs, required_opset, weights_record
from sts_export.families import family_module
from sts_export.generate import generate


class _Recorder(Wrapped):
    """Wraps a backend: EOS is masked in the logits (every run decodes all its tokens), the feeds and outputs of
    each graph's first prefill and first decode call are kept, and with `forced` the decode steps embed the given
    tokens instead of the loop's own argmax (teacher forcing; `logits` then holds each step's prediction)."""

    def __init__(self, inner: Any, eos: int, forced: np.ndarray | None = None) -> None:
        self.inner, self.eos, self.forced = inner, eos, forced
        self.calls: dict[str, dict[str, np.ndarray]] = {}
        self.outputs: dict[str, dict[str, np.ndarray]] = {}
        self.logits: list[np.ndarray] = []
        self.step = 0

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        decode = bool(self.logits)  # after the prefill's segment2 every call is a decode step
        if graph == "embed" and decode and self.forced is not None:
            feeds = {"input_ids": self.forced[:, self.step:self.step + 1]}
            self.step += 1
        out = dict(self.inner.run(graph, feeds))
        key = f"{graph}/{'decode' if decode else 'prefill'}"
        if key not in self.calls:  # the graph's own outputs (EOS not masked: the per-graph rows compare raw logits)
            self.calls[key] = {k: np.array(v, copy=True) for k, v in feeds.items()}
            self.outputs[key] = {k: np.array(v, copy=True) for k, v in out.items()}
        if graph == "segment2":
            out["logits"] = np.array(out["logits"], copy=True)
            out["logits"][:, self.eos] = -np.inf
            self.logits.append(np.asarray(out["logits"], dtype=np.float32))
        return out


class _OneLive(Wrapped):
    """A backend of which only the graph being run has a live session: a new one (from `make`) whenever the graph
    changes. For exports whose sessions do not fit in memory together (a 7B fp16 reference on a 24 GB host: ONNX
    Runtime's CPU kernels hold fp16 weights as fp32); a session load per graph call, so only a prefill is run."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make, self.graph, self.inner = make, None, make()

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        if graph != self.graph:

            self.inner = None
            release_memory()
            self.inner, self.graph = self.make(), graph
        return self.inner.run(graph, feeds)


def session_bytes(export_dir: Path, manifest: dict[str, Any]) -> int:
    """Resident bytes of ONNX Runtime CPU sessions of every graph of an export at once (an upper bound for quantized
    graphs): float weights as fp32, times the session factor (sts_export.artifact.memory)."""

    upcast = ORT_CPU_WEIGHT_BYTES / DTYPE_BYTES[manifest["dtype"]]
    files = sum(f.stat().st_size for g in manifest["graphs"] for f in _graph_files(export_dir, g))
    return int(files * upcast * ORT_SESSION_FACTOR) + ORT_BASE_EXTRA


def _agreement(name: str, got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    """One output of the quantized graph against the float one: the comparator's figures (no tolerance: weight
    quantization moves floats by design; `ok` = finite), its cosine, and for indices the share that agrees."""
    row = compare_array(name, got, want, tol=float("inf"))
    if "identical" in row:
        return {**row, "ok": True, "agreement": float((got == want).mean()) if want.size else 1.0}
    return {**row, "cosine": cosine(got, want)}


def sample_image() -> Any:
    """The deterministic synthetic image of the fidelity check (the validation's, through the family's own
    preprocessing, so it serves every family)."""

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((480, 360), Image.BILINEAR)


def compare_exports(ref_dir: Path, q_dir: Path, scheme: Scheme, new_tokens: int = 32,
                    progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The quantized export against the unquantized one (same weights), both on ONNX Runtime (CPU), batch 1:
    per graph on the reference's own feeds (first prefill and first decode call), then end to end over
    `new_tokens` greedy tokens (EOS masked): cosine of the first-token logits, greedy agreement (teacher-forced:
    the share of steps whose argmax equals the reference's token, given the reference's prefix), the identical
    prefix of a free-running generation, keep_pre identical, keep_post agreement. One export's sessions at a time."""



    t0 = time.perf_counter()
    m_ref, m_q = read_manifest(ref_dir), read_manifest(q_dir)
    recipe = manifest_recipe(m_q)
    plan = manifest_plan(m_q, recipe)
    image = family_module(recipe.family).prepare_image(sample_image(), recipe)
    _, prompt = sample_inputs(q_dir, recipe)
    need, (have, source) = session_bytes(ref_dir, m_ref), available_memory()
    one_live = need > have  # one session at a time, prefill only (the first token and both stages' picks)
    if one_live:
        progress(f"quantized vs unquantized: the reference's sessions need ~{fmt(need)} together, {fmt(have)} is "
                 f"available ({source}): one session at a time, prefill only (first token, keep_pre, keep_post; "
                 f"no {new_tokens}-token greedy agreement)")
        new_tokens = 1

    def backend(d: Path, m: dict[str, Any]) -> Any:
        # numpy outputs, portable graphs on both sides (the quantized export has no ORT form)
        make = lambda: OrtBackend(d, m, device="cpu", form="portable", resident=False)  # noqa: E731
        return _OneLive(make) if one_live else make()

    ref = _Recorder(backend(ref_dir, m_ref), recipe.eos_token_id)
    g_ref = generate(ref, plan, image, prompt, new_tokens)
    del ref.inner
    release_memory()
    progress(f"quantized vs unquantized: reference run {time.perf_counter() - t0:.1f} s")
    q_be = backend(q_dir, m_q)
    graphs: dict[str, Any] = {}
    for key, feeds in ref.calls.items():
        g = key.split("/")[0]
        if g not in quantized_graphs(scheme):
            continue
        out = q_be.run(g, feeds)
        graphs[key] = {n: _agreement(n, np.asarray(out[n]), want) for n, want in ref.outputs[key].items()
                       if not n.startswith("present_")}
        last = plan.segment_layers.get(g, [None])[-1]  # one layer's KV cache: the segment's last
        graphs[key].update({n: _agreement(n, np.asarray(out[n]), want) for n, want in ref.outputs[key].items()
                            if n in (f"present_key_{last}", f"present_value_{last}")})
    free = _Recorder(q_be, recipe.eos_token_id)
    g_free = generate(free, plan, image, prompt, new_tokens)
    forced = _Recorder(q_be, recipe.eos_token_id, forced=g_ref.tokens)
    if new_tokens > 1:
        generate(forced, plan, image, prompt, new_tokens)
    else:  # prefill only: the one prediction is the free run's first token
        forced.logits = free.logits[:1]
    del q_be, free.inner, forced.inner
    release_memory()
    preds = np.stack([lg.argmax(-1) for lg in forced.logits[:new_tokens]], axis=1)  # [B, steps]
    n = min(preds.shape[1], g_ref.tokens.shape[1])
    same = g_free.tokens[0, :n] == g_ref.tokens[0, :n]
    row = compare_generations(g_ref, g_free, tol=float("inf"))  # quantization: figures to judge, not a tolerance
    first = row["first_logits"]
    fin = np.isfinite(g_ref.first_logits)  # EOS is masked to -inf
    sd = float(g_ref.first_logits[fin].std())
    rms = float(np.sqrt(np.mean((g_free.first_logits[fin] - g_ref.first_logits[fin]) ** 2)))
    # how decisive the reference's greedy choices are: top-1 minus top-2 logit per step, in logit standard deviations
    # (random-weight models have near-flat logits, so a tiny weight error flips near-ties)
    gaps = [float(np.diff(np.sort(lg[0][np.isfinite(lg[0])])[-2:])[0] / max(lg[0][np.isfinite(lg[0])].std(), 1e-12))
            for lg in ref.logits[:new_tokens]]
    e2e = {
        "tokens": int(n), "eos_masked": True,
        "mode": ("one session at a time, prefill only: the reference's sessions need ~" + fmt(need) + ", " + fmt(have)
                 + " available") if one_live else "all sessions loaded",
        "first_logits_cosine": first.get("cosine"), "first_logits_max_abs": first.get("max_abs"),
        "first_logits_rms_error_over_std": rms / max(sd, 1e-12),
        "reference_top1_gap_over_std_median": float(np.median(gaps)),
        "first_token_same": bool(g_free.tokens[0, 0] == g_ref.tokens[0, 0]),
        "greedy_agreement": float((preds[:, :n] == g_ref.tokens[:, :n]).mean()),
        "free_running_identical_prefix": int(n if same.all() else np.argmin(same)),
        "keep_pre_identical": row["keep_pre_identical"],
        "keep_post_identical": None if g_ref.keep_post is None else row["keep_post_identical"],
        "keep_post_agreement": row.get("keep_post_overlap"),
        "reference_tokens": g_ref.tokens[0].tolist(), "quantized_tokens": g_free.tokens[0].tolist(),
    }
    problems = [f"{k}:{o}" for k, rows in graphs.items() for o, r in rows.items() if not r["ok"]]
    if not first.get("ok", False):
        problems.append("first logits not finite")
    if not scheme.quantize_vision and not e2e["keep_pre_identical"]:
        problems.append("keep_pre differs although the vision tower is not quantized")
    return {
        "reference": f"the unquantized export of the same weights ({m_ref['dtype']}), ONNX Runtime CPU, batch 1",
        "scheme": scheme.to_dict(), "graphs": graphs, "end_to_end": e2e, "passed": not problems,
        "summary": "quantized graphs finite, keep_pre identical" if not problems else "; ".join(problems[:6]),
        "seconds": round(time.perf_counter() - t0, 2),
    }


INT8_COMPUTE_FORM_COSINE = 0.999  # least first-logits cosine of the two forms when MatMulNBits computes in int8


def check_quantized_form(export_dir: Path, progress: Callable[[str], None] = print, new_tokens: int = 8) -> dict[str, Any]:
    """The quantized ORT form (fused kernels, in-place cache) against the quantized portable graphs of the same
    export on ONNX Runtime, batch 1. Both hold the same quantized weights (packing q|k|v joins output columns;
    MatMulNBits blocks run along K), so only the kernels differ. With accuracy_level 0..3 (float compute) they must
    agree exactly: identical greedy tokens, keep_pre and keep_post. With 4 (int8 compute) each MatMulNBits quantizes
    its activations per block, and the forms' last-bit differences (fused norms, packed q|k|v) move values across
    int8 rounding steps: then keep_pre must be identical and the first-token logits' cosine at least
    INT8_COMPUTE_FORM_COSINE; tokens and keep_post are reported."""
    m = read_manifest(export_dir)
    recipe = manifest_recipe(m)
    plan = manifest_plan(m, recipe)
    image = family_module(recipe.family).prepare_image(sample_image(), recipe)
    _, prompt = sample_inputs(export_dir, recipe)
    ref = generate(OrtBackend(export_dir, m, device="cpu", form="portable"), plan, image, prompt, new_tokens)
    got = generate(OrtBackend(export_dir, m, device="cpu", form="ort"), plan, image, prompt, new_tokens)
    row = {"against": "the quantized portable graphs, ONNX Runtime CPU, batch 1", "tokens": int(ref.tokens.shape[1]),
           **compare_generations(ref, got, tol=float("inf"))}
    int8 = (m.get("weights") or {}).get("accuracy_level") == 4
    row["rule"] = (f"int8 compute: keep_pre identical, first-logits cosine >= {INT8_COMPUTE_FORM_COSINE}" if int8
                   else "float compute: tokens, keep_pre and keep_post identical")
    row["ok"] = (row["keep_pre_identical"] and row["first_logits"]["cosine"] >= INT8_COMPUTE_FORM_COSINE if int8
                 else row["tokens_identical"] and row["keep_pre_identical"] and row["keep_post_identical"])
    progress(f"quantized ORT form vs quantized portable graphs: tokens {'identical' if row['tokens_identical'] else 'DIFFER'}"
             f", first logits max |diff| {row['first_logits'].get('max_abs')}")
    return row


def quantize_and_compare(export_dir: Path, scheme: Scheme, torch_graphs: dict[str, Any] | None = None,
                         compare: bool = True, progress: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Quantize a float export directory in place (the export's last step, or an existing export): frees the torch
    weights (`torch_graphs`, when the validation has not), quantizes graph by graph, rewrites the manifest (its
    graphs' entries, read from the files, and "weights", read back from them), and with `compare` checks the
    result against the unquantized graphs (returned; else None)."""

    m = read_manifest(export_dir, verify=False)
    if m.get("weights"):
        raise StsError(f"{export_dir} already holds {m['weights'].get('label')} weights; quantize a float export")
    required_opset(scheme, m["opset"])  # one line when the graphs' opset cannot hold the scheme
    if torch_graphs is not None:

        release_weights(torch_graphs)  # the ONNX graph being quantized must not sit beside the torch weights
    graphs = list(m["graphs"])
    form = {g: e for g, e in m.get("ort_form", {}).items() if isinstance(e, dict) and "onnx" in e}
    if form and scheme.encoding != "matmulnbits":  # TensorRT's QDQ weights: the ORT form (ONNX Runtime's) goes
        for e in form.values():
            for f in export_dir.glob(f"{e['onnx']}*"):
                f.unlink()
        m = {k: v for k, v in m.items() if k != "ort_form"}
        write_manifest(export_dir, m)  # before the reference's links are made
        form = {}
        progress("quantize: the ORT form is ONNX Runtime's; a DequantizeLinear (TensorRT) export drops it")
    stems = graphs + [e["onnx"][: -len(".onnx")] for e in form.values()]  # the ORT form quantizes like its graph
    ref = quantize_export(export_dir, stems, scheme, keep_reference=compare, progress=progress)
    try:
        opset, files = graph_entries(export_dir, graphs, m["dtype"], m["opset"])
        new = {**m, "opset": opset, "graphs": files, "weights": weights_record(export_dir, graphs, scheme)}
        if form:

            drop = ("build_key", "reused_from")  # they named the float graphs
            new["ort_form"] = {**m["ort_form"], **{g: {**{k: v for k, v in e.items() if k not in drop},
                                                       **file_entry(export_dir / e["onnx"])} for g, e in form.items()}}
            new["ort_form"].pop("validation", None)  # it was the float form's
        write_manifest(export_dir, new)
        if ref is None:
            return None
        report = compare_exports(ref, export_dir, scheme, progress=progress)
        if form:
            report["ort_form"] = check_quantized_form(export_dir, progress)
            report["passed"] = report["passed"] and report["ort_form"]["ok"]
            if not report["ort_form"]["ok"]:
                report["summary"] += "; the quantized ORT form disagrees with the quantized portable graphs"
        return report
    finally:
        if ref is not None:
            shutil.rmtree(ref, ignore_errors=True)


