"""--target trt: static TensorRT compatibility check, then one engine per graph, manifest updated.

Torch-free: `python export.py --onnx-dir DIR --target trt` runs on a Jetson with only tensorrt +
numpy (+ onnx for the check), after the ONNX export was made on an x86 host and copied over.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import StsError
from .manifest import manifest_recipe, read_manifest, sha256, write_manifest

ONNX_DTYPE_PRECISION = {"fp16": "fp16", "fp32": "fp32"}


def check(onnx_dir: Path, trt_version: str = "10.3") -> tuple[bool, str]:
    """(compatible, printable report) for every graph of an export directory."""
    from .trt_check import check_dir, format_reports

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
    """Check, then build `<graph>.engine` for every graph; the manifest gains engine hashes and TensorRT info."""
    from .trt_build import build_engine, device_info, profiles_for_graph, require_tensorrt

    m = read_manifest(onnx_dir)
    recipe = manifest_recipe(m)
    onnx_precision = ONNX_DTYPE_PRECISION[m["dtype"]]
    precision = precision or onnx_precision
    if precision != onnx_precision:
        raise StsError(
            f"the ONNX graphs are {m['dtype']} but --precision is {precision}; export the ONNX with "
            f"--dtype {precision} (engines are built strongly typed, so Stage 1 stays float32 via the graph's casts)"
        )
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
        profiles = profiles_for_graph(name, g, max_batch=max_batch, max_prompt=recipe.max_prompt_tokens,
                                      max_context=recipe.max_context,
                                      min_prompt=m["k_pre"] + 1 if name == "prune" else 1)  # prune: S1 > K
        progress(f"[{i}/{len(names)}] building {name}.engine ({precision}, {len(profiles)} profile(s)) ...")
        info = build_engine(onnx_dir / g["onnx"], onnx_dir / f"{name}.engine", precision=precision, profiles=profiles,
                            timing_cache_path=cache, opt_level=opt_level, strongly_typed=True,
                            workspace_bytes=int(workspace_gb * 1024**3) if workspace_gb else None, progress=progress)
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
