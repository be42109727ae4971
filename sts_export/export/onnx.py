"""Export: the graphs of DESIGN.md to ONNX (torch.onnx.export, dynamo=True), one directory per export.

    <out>/vision.onnx embed.onnx segment1.onnx [prune.onnx] segment2.onnx  (+ *.onnx.data above 2 GB)
          manifest.json  recipe.yaml  tokenizer.json ...  validation.json

Written into a temporary sibling directory and renamed when complete, so an interrupted export
never leaves a directory that looks valid. Graphs are exported one at a time.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from sts_export import __version__
from sts_export.artifact import memory
from sts_export.artifact.manifest import FORMAT_VERSION, write_manifest
from sts_export.artifact.plan import NP_DTYPES, TORCH_DTYPES, Plan
from sts_export.checkpoint import Source, load_model, resolve
from sts_export.errors import StsError
from sts_export.export import reuse as sibling
from sts_export.export.io import export_graph, graph_entries
from sts_export.export.ort_form import export_ort_form, rotary_here
from sts_export.export.quantize import quantize_and_compare
from sts_export.export.validate import validate_export
from sts_export.export.weights import check_weights, required_opset
from sts_export.families.layers import Llava
from sts_export.graphs import build_graphs
from sts_export.pruning.budget import check_method, parse_budget, prune_layer_for, split_budget
from sts_export.recipe import Recipe, with_max_pixels

GRAPH_ORDER = ("vision", "embed", "segment1", "prune", "segment2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                   "generation_config.json", "chat_template.json")
EXPORT_DTYPES = ("fp32", "fp16", "bf16")
# Opsets the export honours: torch.onnx's dynamo exporter writes opset 18 or newer (asked for 7 it writes 18), and
# 25 is the newest any TensorRT in the static check's table reads (11.5). bf16 graphs need 22: ONNX gave Conv,
# pooling and the activations bfloat16 types in opset 22 (an opset-18 bf16 Conv fails onnx.checker).
OPSETS = (18, 25)
DEFAULT_OPSET = {"fp32": 18, "fp16": 18, "bf16": 22}
MIN_OPSET = {"bf16": 22}


def check_opset(opset: int | None, dtype: str) -> int:
    """The opset to export `dtype` graphs at (None: the default for the dtype); one line when it cannot be met."""
    if opset is None:
        return DEFAULT_OPSET.get(dtype, OPSETS[0])
    lo, hi = OPSETS
    if not lo <= int(opset) <= hi:
        raise StsError(f"--opset {opset} cannot be written: torch.onnx exports opset {lo} to {hi} here ({lo} is its "
                       f"oldest, {hi} the newest any supported TensorRT reads); choose one in {lo}..{hi}")
    if int(opset) < MIN_OPSET.get(dtype, lo):
        raise StsError(f"--opset {opset} cannot hold {dtype} graphs: ONNX gives Conv and friends bfloat16 types from "
                       f"opset {MIN_OPSET[dtype]}; use --opset {MIN_OPSET[dtype]} or newer (the default for {dtype})")
    return int(opset)


def check_out(out: Path) -> None:
    """Refuse in one line, before any work, an output place that cannot be created and written (nothing is left)."""
    probe = Path(os.path.abspath(out))
    while not probe.exists():
        probe = probe.parent
    why = None
    if not probe.is_dir():
        why = f"{probe} is not a directory"
    else:
        try:
            t = tempfile.mkdtemp(prefix=".sts-export-probe-", dir=probe)
            os.rmdir(t)
        except OSError as e:
            why = e.strerror or type(e).__name__
    if why is not None:
        raise StsError(f"--out {out} cannot be written ({why} at {probe}); choose another --out")


def manifest_for(recipe: Recipe, source: Source, method: str, budget: int | str, plan: Plan, anchor: str,
                 dtype: str, out: Path, graphs: list[str], opset: int) -> dict[str, Any]:
    written_opset, files = graph_entries(out, graphs, dtype, opset)
    base = manifest_base(recipe, source, method, budget, plan, anchor, dtype)
    return {**base, "opset": written_opset, "graphs": files}


def manifest_base(recipe: Recipe, source: Source, method: str, budget: int | str, plan: Plan, anchor: str,
                  dtype: str) -> dict[str, Any]:
    """The manifest's fields every target shares (model, recipe, configuration, tool and torch versions)."""
    return {
        "format_version": FORMAT_VERSION,
        "tool": "sts-export", "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"source": source.recipe.source if source.path is None else str(source.path),
                  "revision": source.revision, "random_weights": source.path is None,
                  "synthetic": recipe.synthetic},
        "recipe": recipe.to_dict(),
        "method": method, "budget": budget, "k_pre": plan.k_pre, "k_post": plan.k_post,
        "prune_layer": plan.prune_layer, "anchor": anchor, "dtype": dtype,
        "max_pixels": recipe.image_processor.max_pixels or None,  # dynamic resolution: the export's pixel cap
        "torch_version": torch.__version__, "host": platform.platform(),
    }


def write_side_files(tmp: Path, src: Source, rec: Recipe, progress: Callable[[str], None]) -> None:
    """The checkpoint's tokenizer/processor files and recipe.yaml, beside the graphs."""
    copied = [f for f in TOKENIZER_FILES if src.path is not None and (src.path / f).is_file()]
    for f in copied:
        shutil.copy2(src.path / f, tmp / f)
    if "tokenizer.json" not in copied:  # validation and the runner take the family's raw prompt
        from sts_export.families import family_module
        from sts_export.tokenizer import raw_prompt_note

        progress(raw_prompt_note(family_module(rec.family).raw_prompt_ids(rec), rec))
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(rec.to_dict())), sort_keys=False))


def default_out(model: str, method: str, budget: int | str, weights: str | None = None) -> Path:
    name = Path(model).name if Path(model).exists() else model.replace("/", "--")
    return Path("exports") / (f"{name}-{method}-b{budget}" + (f"-{weights}" if weights else ""))


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What every export target settles before any heavy work (`prepare_export`)."""

    src: Source
    recipe: Recipe
    plan: Plan
    torch_dtype: torch.dtype
    anchor: str
    out: Path


def prepare_export(model: str, *, method: str, budget: int | str, dtype: str, out: str | os.PathLike | None,
                   force: bool, recipe: str | None, random_weights: bool, max_pixels: int | None,
                   anchor: str | None, label: str | None) -> Prepared:
    """The checks and plan shared by the ONNX and AOTInductor exports: output place, checkpoint, the recipe at the
    export's pixel cap, budget range and the Plan; each refusal is one line, before any weights load.

    label: the default output directory's suffix (weights scheme, aoti-<device>)."""
    out = Path(out) if out else default_out(model, method, budget, label)
    if out.exists() and not force:
        raise StsError(f"output directory {out} already exists; pass --force to replace it or choose --out")
    check_out(out)
    src = resolve(model, recipe, random_weights)
    # dynamic resolution: the export's pixel cap (N, K_max, profiles); the modules carry it too
    src = dataclasses.replace(src, recipe=with_max_pixels(src.recipe, max_pixels))
    rec = src.recipe
    split_budget(budget, rec, method)  # range check before any heavy work
    return Prepared(src=src, recipe=rec, plan=Plan.create(rec, method, budget, NP_DTYPES[dtype]),
                    torch_dtype=getattr(torch, TORCH_DTYPES[dtype]), anchor=anchor or rec.pruning.anchor, out=out)


def move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` with the completed temporary directory `tmp` (its owner record removed) in one rename."""
    if out.exists():
        shutil.rmtree(out)
    (tmp / memory.OWNER_FILE).unlink(missing_ok=True)
    os.replace(tmp, out)


def _keep_failed(tmp: Path, out: Path, summary: str) -> None:
    """A failed validation: the graphs move to <out>.failed for inspection, and the export stops in one line."""
    failed = tmp.with_name(out.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    os.replace(tmp, failed)
    raise StsError(f"validation failed: {summary}; the graphs are kept in {failed} for inspection")


def export(
    model: str,
    *,
    budget: int | str = 64,
    method: str = "sts",
    out: str | os.PathLike | None = None,
    recipe: str | None = None,
    dtype: str = "fp32",
    anchor: str | None = None,
    random_weights: bool = False,
    opset: int | None = None,
    validate: bool = True,
    force: bool = False,
    weights: str | None = None,
    block_size: int | None = None,
    quantize_vision: bool = False,
    accuracy_level: int | None = None,
    target: str = "onnx",
    max_pixels: int | None = None,
    ort_form: bool = True,
    reuse: bool = True,
    progress: Callable[[str], None] = print,
) -> Path:
    """Export a model's pruned graphs to an ONNX directory; returns its path. Validates with ORT unless told not to.

    weights int8|int4 quantizes the linear weights after export (sts_export.export.quantize); `target` picks their
    encoding: onnx -> MatMulNBits (ONNX Runtime, `accuracy_level`: weights.ACCURACY_LEVELS, default 4 = int8
    compute), trt -> DequantizeLinear + MatMul (TensorRT).
    max_pixels (dynamic-resolution models): the largest image the graphs serve (default: the recipe's, at most
    1280 * 28 * 28); recorded in the manifest's recipe and `max_pixels`.
    ort_form: also write the ORT form of segment1/segment2 (fused ONNX Runtime kernels, in-place KV cache;
    `export/ort_form.py`) for fp32 exports (float, or int8/int4 MatMulNBits: quantized like the portable graphs),
    not for target trt, its rotary layout the one this onnxruntime loads (`ort_form.rotary_here`);
    validated with the rest.
    reuse: copy a graph (or its ORT form) from a sibling export in the same parent directory whose manifest records
    the same build key (`export/reuse.py`) instead of exporting it again."""
    check_method(method)
    budget = parse_budget(budget)
    scheme = check_weights(weights, block_size, quantize_vision, target=target, dtype=dtype, accuracy_level=accuracy_level)
    opset = required_opset(scheme, opset)
    if dtype not in EXPORT_DTYPES:
        raise StsError(f"--dtype must be fp32, fp16 or bf16 for ONNX export, got '{dtype}'")
    opset = check_opset(opset, dtype)
    if dtype == "bf16" and validate:  # validate_export runs ONNX Runtime on the CPU
        raise StsError("bf16 graphs cannot be validated here: ONNX Runtime's CPU provider has no bfloat16 kernels "
                       "(Conv, Mul, MatMul); pass --no-validate (then the TensorRT engine is the first runtime to "
                       "execute them), or export --dtype fp16")
    prep = prepare_export(model, method=method, budget=budget, dtype=dtype, out=out, force=force, recipe=recipe,
                          random_weights=random_weights, max_pixels=max_pixels, anchor=anchor,
                          label=scheme.label if scheme else None)
    src, rec, plan, torch_dtype, anchor, out = prep.src, prep.recipe, prep.plan, prep.torch_dtype, prep.anchor, prep.out
    progress(f"model: {src.description} | recipe {rec.name} | method {method} budget {budget} -> "
             f"K={plan.k_pre} K'={plan.k_post} prune_layer={prune_layer_for(method, rec)} | {dtype}"
             + (f" | weights {scheme.label}" if scheme else ""))
    memory.clean_stale_tmp(out.parent, progress)  # what killed exports left here (dead owner pid only)
    memory.check_export_memory(rec, method, budget, dtype, validate, progress)  # one line if it cannot fit
    t0 = time.perf_counter()
    net: Llava = load_model(src, torch_dtype)
    progress(f"loaded weights in {time.perf_counter() - t0:.1f} s")
    graphs = build_graphs(net, method, budget, anchor)
    names = [g for g in GRAPH_ORDER if g in graphs]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = memory.make_tmp_dir(out)  # .<name>.tmp-XXXXXXXX with this process's owner record
    rotary = rotary_here()  # the ORT form's rotary layout for this onnxruntime, part of its graphs' keys
    labels = {"portable": "portable", "ort": "ort" if rotary == "kernel" else f"ort/rotary-{rotary}"}
    keys = {(g, form): sibling.build_key(src, rec, plan, g, label, dtype, opset, anchor)
            for g in names for form, label in labels.items()}
    near = sibling.siblings(out) if reuse else []  # read once: the exports beside this one that may lend graphs
    try:
        reused: dict[str, str] = {}
        for i, g in enumerate(names, 1):
            hit = sibling.find(near, keys[g, "portable"], "graphs")
            if hit is not None:
                sibling.copy_into(*hit, tmp)
                reused[g] = hit[0].name
                progress(f"[{i}/{len(names)}] {g}: copied from the sibling export {hit[0].name} (same build key: "
                         f"weights, recipe, configuration, dtype, opset and tool)")
                continue
            t = time.perf_counter()
            progress(f"[{i}/{len(names)}] exporting {g} ...")
            export_graph(graphs[g], g, plan, rec, torch_dtype, tmp / f"{g}.onnx", opset)
            size = sum(f.stat().st_size for f in tmp.glob(f"{g}.onnx*"))
            progress(f"[{i}/{len(names)}] {g}: {time.perf_counter() - t:.1f} s, {size / 1e6:.1f} MB")
            gc.collect()
        write_side_files(tmp, src, rec, progress)
        manifest = manifest_for(rec, src, method, budget, plan, anchor, dtype, tmp, names, opset)
        for g, e in manifest["graphs"].items():
            e["build_key"] = keys[g, "portable"]
            if g in reused:
                e["reused_from"] = reused[g]
        # before validation frees the torch weights; MatMulNBits exports quantize it with the portable graphs
        # (not for --target trt: the engines' directory goes to the device without ONNX Runtime's form)
        # (GroupQueryAttention's rotary takes head_dim % 16 == 0: every real architecture's; else portable only)
        if ort_form and target != "trt" and dtype == "fp32" and (scheme is None or scheme.encoding == "matmulnbits") \
                and rec.text.head_dim % 16 == 0:
            t = time.perf_counter()
            progress("exporting the ORT form of segment1/segment2 (fused kernels, in-place KV cache) ...")
            manifest["ort_form"] = export_ort_form(graphs, plan, rec, torch_dtype, tmp, opset,
                                                   {g: k for (g, form), k in keys.items() if form == "ort"},
                                                   near, progress, rotary)
            progress(f"ORT form: {time.perf_counter() - t:.1f} s")
            gc.collect()
        write_manifest(tmp, manifest)
        if validate:
            progress("validating: ONNX Runtime vs torch, per graph and end to end ...")
            # frees the torch weights once its torch reference is recorded: one ORT session at a time after that
            report = validate_export(tmp, graphs, plan, rec, torch_dtype, release_torch=True, progress=progress,
                                     reload=lambda: build_graphs(load_model(src, torch_dtype), method, budget, anchor))
            (tmp / "validation.json").write_text(json.dumps(report, indent=2))
            progress(f"validation: {'PASS' if report['passed'] else 'FAIL'} (see validation.json)")
            if not report["passed"]:
                _keep_failed(tmp, out, report["summary"])
        if scheme is not None:  # weight-only int8/int4: graph by graph, once the torch weights are freed
            fidelity = quantize_and_compare(tmp, scheme, None if validate else graphs, validate, progress)
            if fidelity is not None:
                report = {**report, "weights": fidelity, "passed": report["passed"] and fidelity["passed"]}
                (tmp / "validation.json").write_text(json.dumps(report, indent=2))
                e2e = fidelity["end_to_end"]
                progress(f"validation of {scheme.label} vs the unquantized graphs: "
                         f"{'PASS' if fidelity['passed'] else 'FAIL'} (first-token logits cosine "
                         f"{e2e['first_logits_cosine']:.4f}, greedy agreement {e2e['greedy_agreement']:.2f} over "
                         f"{e2e['tokens']} tokens)")
                if not fidelity["passed"]:
                    _keep_failed(tmp, out, fidelity["summary"])
        move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return out
