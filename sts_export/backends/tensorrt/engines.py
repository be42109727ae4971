"""--target trt: static TensorRT compatibility check, then one engine per graph, manifest updated.

Torch-free: `python export.py --onnx-dir DIR --target trt` runs on a Jetson with only tensorrt +
numpy (+ onnx for the check), after the ONNX export was made on an x86 host and copied over.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from sts_export.errors import StsError
from sts_export.export.manifest import manifest_recipe, read_manifest, sha256, write_manifest
from sts_export.export.memory import check_engine_memory, claim_engine_dir, release_engine_dir

PRECISIONS = ("fp16", "bf16", "fp32")
# Selection math stays float32 in reduced-precision engines. The torch exporter records each node's
# source stack trace, so the selection functions' names find their nodes (see trt_build.onnx_nodes_matching).
SELECTION_PATTERN = (r"\b(potential_energy_select|divprune_select|topk_ascending|sorted_indices|anchor_index|"
                     r"pairwise_sq_dist|last_token_relevance)\b")


def build_mode(onnx_dtype: str, precision: str | None) -> tuple[str, bool, str | None]:
    """(precision, strongly_typed, fp32 layer pattern) for ONNX graphs of `onnx_dtype`.

    Same precision as the graphs: a strongly typed build (the graph's own casts keep Stage 1 in fp32).
    fp32 graphs built as fp16/bf16: a weakly typed build with the selection layers pinned to fp32.
    """
    precision = precision or onnx_dtype
    if precision not in PRECISIONS:
        raise StsError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == onnx_dtype:
        return precision, True, None
    if onnx_dtype == "fp32":
        return precision, False, SELECTION_PATTERN
    raise StsError(f"the ONNX graphs are {onnx_dtype}; a {precision} engine needs an fp32 (or {precision}) ONNX export")


def check(onnx_dir: Path, trt_version: str = "10.3") -> tuple[bool, str]:
    """(compatible, printable report) for every graph of an export directory."""
    from sts_export.backends.tensorrt.check import check_dir, format_reports

    reports = check_dir(onnx_dir, trt_version=trt_version)
    if not reports:
        raise StsError(f"{onnx_dir} holds no *.onnx graphs")
    return all(r.ok for r in reports.values()), format_reports(reports)


def build_engines(
    onnx_dir: Path,
    *,
    precision: str | None = None,
    max_batch: int = 1,
    opt_level: int = 3,
    workspace_gb: float | None = None,
    timing_cache: Path | None = None,
    trt_version: str = "10.3",
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Check, then build `<graph>.engine` for every graph; the manifest gains engine hashes and TensorRT info.

    First, within seconds: the host-memory estimate of the largest graph's build (`export.memory`; on a
    Jetson it includes the engine's weights on the GPU and the workspace) against what is available."""
    m = read_manifest(onnx_dir)
    recipe = manifest_recipe(m)
    precision, typed, pattern = build_mode(m["dtype"], precision)
    workspace_bytes = int(workspace_gb * 1024**3) if workspace_gb else None
    check_engine_memory(onnx_dir, m, precision, workspace_bytes, progress)  # one line before parsing when it cannot fit
    lock = claim_engine_dir(onnx_dir, progress)  # removes what a killed build (dead pid) left; refuses a live one
    try:
        return _build_all(onnx_dir, m, recipe, precision, typed, pattern, max_batch, opt_level, workspace_bytes,
                          timing_cache, trt_version, progress)
    finally:
        release_engine_dir(lock)


def _build_all(onnx_dir: Path, m: dict[str, Any], recipe: Any, precision: str, typed: bool, pattern: str | None,
               max_batch: int, opt_level: int, workspace_bytes: int | None, timing_cache: Path | None,
               trt_version: str, progress: Callable[[str], None]) -> dict[str, Any]:
    from sts_export.backends.tensorrt.build import build_engine, device_info, profiles_for_graph, require_tensorrt

    ok, report = check(onnx_dir, trt_version)
    progress(report)
    if not ok:
        raise StsError("the graphs are not TensorRT-compatible (report above); nothing was built")
    trt = require_tensorrt()
    cache = timing_cache or onnx_dir / "timing.cache"
    built: dict[str, Any] = {}
    names = list(m["graphs"])
    for i, name in enumerate(names, 1):
        g = m["graphs"][name]
        dynamic = recipe.dynamic_tokens
        limits = {"T": recipe.num_image_tokens // recipe.vision.num_patches, "N": recipe.max_image_span,
                  "K": m["k_pre"], "Kp": m["k_post"]} if dynamic else None
        profiles = profiles_for_graph(name, g, max_batch=max_batch, max_prompt=recipe.max_prompt_tokens,
                                      max_context=recipe.max_context, token_limits=limits,
                                      min_prompt=m["k_pre"] + 1 if name == "prune" and not dynamic else 1)  # prune: S1 > K
        progress(f"[{i}/{len(names)}] building {name}.engine ({precision}, {len(profiles)} profile(s)) ...")
        info = build_engine(onnx_dir / g["onnx"], onnx_dir / f"{name}.engine", precision=precision, profiles=profiles,
                            timing_cache_path=cache, opt_level=opt_level, strongly_typed=typed,
                            fp32_layers_pattern=pattern,
                            workspace_bytes=workspace_bytes, progress=progress)
        built[name] = info
        progress(f"[{i}/{len(names)}] {name}.engine: {info['build_seconds']} s, {info['size_bytes'] / 1e6:.1f} MB")
    for name, info in built.items():
        m["graphs"][name]["engine"] = f"{name}.engine"
        m["graphs"][name]["engine_sha256"] = sha256(onnx_dir / f"{name}.engine")
        m["graphs"][name]["engine_profiles"] = info["profiles"]
    dev = device_info()
    m["tensorrt"] = {"version": trt.__version__, "gpu": dev["gpu"], "compute_capability": dev["compute_capability"],
                     "precision": precision, "max_batch": max_batch, "opt_level": opt_level}
    write_manifest(onnx_dir, m)
    return m
