"""--target trt: static TensorRT compatibility check, then one engine per graph, manifest updated.

Torch-free: `python export.py --onnx-dir DIR --target trt` runs on a Jetson with only tensorrt +
numpy (+ onnx for the check), after the ONNX export was made on an x86 host and copied over.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from sts_export.backends.tensorrt import discovery
from sts_export.errors import StsError
from sts_export.families import family_module
from sts_export.artifact.manifest import export_dtype, manifest_recipe, read_manifest, sha256, write_manifest
from sts_export.artifact.memory import check_engine_memory, claim_engine_dir, release_engine_dir

PRECISIONS = ("fp16", "bf16", "fp32")
# The selection functions of Stage 1/2, found in a graph through the torch exporter's node metadata (see
# trt_build.onnx_nodes_matching); their math stays float32 in fp16/bf16 graphs by the graph's own casts.
SELECTION_PATTERN = (r"\b(potential_energy_select|divprune_select|topk_ascending|sorted_indices|anchor_index|"
                     r"pairwise_sq_dist|last_token_relevance)\b")


def engine_precision(onnx_dir: Path, m: dict[str, Any], precision: str | None) -> str:
    """The precision the engines will have: the dtype of the ONNX graphs, read from the files (TensorRT builds
    strongly typed). A `precision` that differs is refused in one line: converting graphs here could not be
    validated against torch like an export is (onnxconverter-common's float16 pass, measured on the tiny export,
    leaves 3 of 5 graphs with type errors and converts Stage 1's Loop too), so the fix is to re-export."""

    have = export_dtype(onnx_dir, m)
    if precision is not None and precision not in PRECISIONS:
        raise StsError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision is not None and precision != have:
        raise StsError(f"--precision {precision} cannot be met: the ONNX graphs in {onnx_dir} are {have}, and "
                       f"TensorRT builds strongly typed engines whose precision is the graphs' dtype; re-export with "
                       f"--dtype {precision} (python export.py --model ... --dtype {precision})")
    return have


def check(paths: Path | list[Path], trt_version: str = "10.3") -> tuple[bool, str]:
    """(compatible, printable report) for every graph of the export directories and .onnx files `paths`."""
    from sts_export.export.tensorrt.check import check_dir, check_model, format_reports

    reports = {}
    for p in [paths] if isinstance(paths, Path) else paths:
        if not p.exists():
            raise StsError(f"{p} does not exist")
        reports.update(check_dir(p, trt_version=trt_version) if p.is_dir() else {p.stem: check_model(p, trt_version=trt_version)})
    if not reports:
        raise StsError(f"{', '.join(map(str, [paths] if isinstance(paths, Path) else paths))} holds no *.onnx graphs")
    return all(r.ok for r in reports.values()), format_reports(reports)


def check_versions(paths: Path | list[Path], versions: list[str]) -> list[tuple[str, bool, str]]:
    """`check` for each TensorRT version: [(version, compatible, report), ...] in the order given."""
    return [(v, *check(paths, v)) for v in versions]


def build_version(trt_version: str | None) -> str:
    """The TensorRT version the build's check targets: the installed one (which parses the graphs); a different
    --trt-version is refused in one line (it only applies to --check-only)."""
    from sts_export.export.tensorrt.check import parse_versions, version_label

    here = version_label(str(discovery.require_tensorrt().__version__))
    if trt_version is not None:
        asked = parse_versions(trt_version)
        if [version_label(v) for v in asked] != [here]:
            raise StsError(f"--trt-version {trt_version}: engines are built by the installed TensorRT {here}, so "
                           f"the build checks against {here}; use --check-only to check other versions")
    return here


def build_engines(
    onnx_dir: Path,
    *,
    precision: str | None = None,
    max_batch: int = 1,
    opt_level: int = 3,
    workspace_gb: float | None = None,
    timing_cache: Path | None = None,
    trt_version: str | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Check, then build `<graph>.engine` for every graph; the manifest gains engine hashes and TensorRT info.

    First, within seconds: the host-memory estimate of the largest graph's build (`artifact.memory`; on a
    Jetson it includes the engine's weights on the GPU and the workspace, whose limit the build then sets when
    --workspace-gb is absent) against what is available."""
    m = read_manifest(onnx_dir)
    recipe = manifest_recipe(m)
    precision = engine_precision(onnx_dir, m, precision)  # the graphs' own dtype; another one is refused here
    trt_version = build_version(trt_version)
    workspace_bytes = int(workspace_gb * 1024**3) if workspace_gb else None
    # one line before parsing when it cannot fit; on unified memory without --workspace-gb it picks the limit
    workspace_bytes = check_engine_memory(onnx_dir, m, precision, workspace_bytes, progress).workspace_bytes
    lock = claim_engine_dir(onnx_dir, progress)  # removes what a killed build (dead pid) left; refuses a live one
    try:
        return _build_all(onnx_dir, m, recipe, precision, max_batch, opt_level, workspace_bytes, timing_cache,
                          trt_version, progress)
    finally:
        release_engine_dir(lock)


def _build_all(onnx_dir: Path, m: dict[str, Any], recipe: Any, precision: str, max_batch: int, opt_level: int,
               workspace_bytes: int | None, timing_cache: Path | None, trt_version: str,
               progress: Callable[[str], None]) -> dict[str, Any]:
    from sts_export.export.tensorrt.build import build_engine, profiles_for_graph

    ok, report = check(onnx_dir, trt_version)
    progress(report)
    if not ok:
        raise StsError("the graphs are not TensorRT-compatible (report above); nothing was built")
    trt = discovery.require_tensorrt()
    cache = timing_cache or onnx_dir / "timing.cache"
    built: dict[str, Any] = {}
    names = list(m["graphs"])
    for i, name in enumerate(names, 1):
        g = m["graphs"][name]
        dynamic = recipe.dynamic_tokens
        limits = {"T": recipe.num_image_tokens // recipe.vision.num_patches, "N": recipe.max_image_span,
                  "K": m["k_pre"], "Kp": m["k_post"],
                  **getattr(family_module(recipe.family), "profile_limits", lambda r: {})(recipe)} if dynamic else None
        profiles = profiles_for_graph(name, g, max_batch=max_batch, max_prompt=recipe.max_prompt_tokens,
                                      max_context=recipe.max_context, token_limits=limits,
                                      min_prompt=m["k_pre"] + 1 if name == "prune" and not dynamic else 1)  # prune: S1 > K
        progress(f"[{i}/{len(names)}] building {name}.engine ({precision}, {len(profiles)} profile(s)) ...")
        info = build_engine(onnx_dir / g["onnx"], onnx_dir / f"{name}.engine", precision=precision, profiles=profiles,
                            timing_cache_path=cache, opt_level=opt_level, workspace_bytes=workspace_bytes,
                            progress=progress)
        built[name] = info
        progress(f"[{i}/{len(names)}] {name}.engine: {info['build_seconds']} s, {info['size_bytes'] / 1e6:.1f} MB")
    got = {info.get("precision") for info in built.values()} - {None}
    if got - {precision}:  # build_engine refuses this per graph already; the manifest must never say otherwise
        raise StsError(f"the engines are {', '.join(sorted(got))}, not {precision}; nothing was recorded")
    for name, info in built.items():
        m["graphs"][name]["engine"] = f"{name}.engine"
        m["graphs"][name]["engine_sha256"] = sha256(onnx_dir / f"{name}.engine")
        m["graphs"][name]["engine_profiles"] = info["profiles"]
        m["graphs"][name]["engine_precision"] = info.get("precision")
        m["graphs"][name]["engine_io_dtypes"] = info.get("io_dtypes")
    dev = discovery.device_info()
    # read from what was built: TensorRT's version and the GPU from the build, precision from the parsed networks
    m["tensorrt"] = {"version": trt.__version__, "gpu": dev["gpu"], "compute_capability": dev["compute_capability"],
                     "precision": got.pop() if got else precision, "strongly_typed": True,
                     "version_compatible": False, "max_batch": max_batch, "opt_level": opt_level,
                     "workspace_bytes": workspace_bytes}  # None: TensorRT's default (the device's memory)
    write_manifest(onnx_dir, m)
    return m
