"""The exports a bench run measures: found in the export cache (or ./exports) by recipe, configuration, dtype and
weights, made when missing (ONNX, AOTInductor), and the pipelines opened on them for each backend."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


from sts_export.bench.timing import timed_call
from sts_export.bench.options import ORT_FORMS, BenchOptions, Config, _unique
from sts_export.errors import StsError
from sts_export.artifact.manifest import ort_form_is_current, read_manifest
from sts_export.export.aoti import export_aoti
from sts_export.export.onnx import export
from sts_export.pipeline import Pipeline, load_export_pipeline


# ----------------------------------------------------------------------------------------------- exports
def _cache_root() -> Path:
    from sts_export import checkpoint

    return Path(checkpoint.CACHE_DIR)


def _recipe_digest(recipe: Any) -> str:
    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _export_roots(opts: BenchOptions) -> list[Path]:
    """Where exports are looked up: --exports (or the cache's bench-exports, where new ones go) first, then
    ./exports."""
    root = Path(opts.exports) if opts.exports else _cache_root() / "bench-exports"
    return _unique([root, Path("exports")])


def _export_matches(d: Path, recipe: Any, cfg: Config, dtype: str, random_weights: bool, engines: bool,
                    aoti: str | None = None) -> bool:
    if not (d / "manifest.json").is_file():
        return False
    try:
        m = read_manifest(d, verify=False)
    except StsError:
        return False
    same_recipe = json.loads(json.dumps(m.get("recipe"))) == json.loads(json.dumps(recipe.to_dict()))
    same_config = (m.get("k_pre"), m.get("k_post")) == (cfg.k_pre, cfg.k_post) and (
        cfg.budget == "full" and m.get("budget") == "full" or (m.get("method"), m.get("budget")) == (cfg.method, cfg.budget))
    has_engines = all("engine" in g for g in m.get("graphs", {}).values())
    if aoti is not None:  # AOTInductor packages for this device, built by this torch (else: ONNX graphs)
        import torch

        built = m.get("aoti") or {}
        if not (all("aoti" in g for g in m.get("graphs", {}).values()) and built.get("device") == aoti
                and built.get("torch_version") == torch.__version__):
            return False
    elif not all("onnx" in g for g in m.get("graphs", {}).values()):
        return False
    same_weights = (m.get("weights") or {}).get("label") == (cfg.scheme.label if cfg.scheme is not None else None)

    if aoti is None and not engines and "ort_form" in m and not ort_form_is_current(m):
        return False  # an older ORT form: export anew rather than time what users no longer get
    return (same_recipe and same_config and same_weights and m.get("dtype") == dtype
            and bool(m.get("model", {}).get("random_weights")) == random_weights and (has_engines or not engines))


def find_export(recipe: Any, cfg: Config, dtype: str, random_weights: bool, roots: list[Path],
                engines: bool = False, aoti: str | None = None) -> Path | None:
    """An existing export directory for this configuration under any of `roots` (one level deep)."""
    for root in roots:
        if not root.is_dir():
            continue
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if _export_matches(d, recipe, cfg, dtype, random_weights, engines, aoti):
                return d
    return None


def find_trt_export(recipe: Any, cfg: Config, opts: BenchOptions) -> Path | None:
    """An existing export with TensorRT engines for this configuration (engines are built by export.py, not here)."""
    return find_export(recipe, cfg, opts.dtype, opts.random_weights, _export_roots(opts), engines=True)


def _no_trt_export(what: str, opts: BenchOptions) -> str:
    return (f"no TensorRT export of {what} ({opts.dtype}) under {_export_roots(opts)[0]} or ./exports; build one with "
            "export.py --target trt and pass --exports DIR")


def ensure_onnx_export(model: str, recipe: Any, cfg: Config, opts: BenchOptions) -> Path:
    """Reuse a matching export (--exports, ./exports, the cache) or export one into --exports / the cache
    (validate=False: the export's correctness is the exporter's tests' business, not the benchmark's)."""

    roots = _export_roots(opts)
    root = roots[0]
    found = find_export(recipe, cfg, opts.dtype, opts.random_weights, roots)
    if found is not None:
        opts.progress(f"  reusing export {found}")
        return found
    suffix = "-rw" if opts.random_weights else ""
    q = cfg.scheme
    suffix += f"-{q.label}" if q is not None else ""
    out = root / f"{recipe.name}-{_recipe_digest(recipe)}-{cfg.method}-b{cfg.budget}-{opts.dtype}{suffix}"
    opts.progress(f"  exporting {model} {cfg.method} b={cfg.budget} to {out} (once; reused later) ...")
    _, secs = timed_call(lambda: export(model, budget=cfg.budget, method=cfg.method, out=out, dtype=opts.dtype,
                                        random_weights=opts.random_weights, validate=False, force=True,
                                        weights=q.weights if q else None, block_size=q.block_size if q else None,
                                        accuracy_level=q.accuracy_level if q and q.encoding == "matmulnbits" else None,
                                        progress=lambda s: None))
    opts.progress(f"  exported in {secs:.0f} s")
    return out


def ensure_aoti_export(model: str, recipe: Any, cfg: Config, opts: BenchOptions, device: str) -> Path:
    """Reuse a matching AOTInductor export (this device and torch) or compile one into --exports / the cache;
    packages already compiled for the same graph (embed, segments) come from the cache's .aoti-packages."""

    roots = _export_roots(opts)
    found = find_export(recipe, cfg, opts.dtype, opts.random_weights, roots, aoti=device)
    if found is not None:
        opts.progress(f"  reusing AOTInductor export {found}")
        return found
    suffix = "-rw" if opts.random_weights else ""
    out = roots[0] / f"{recipe.name}-{_recipe_digest(recipe)}-{cfg.method}-b{cfg.budget}-{opts.dtype}-aoti-{device}{suffix}"
    opts.progress(f"  compiling AOTInductor packages of {model} {cfg.method} b={cfg.budget} to {out} (once) ...")
    _, secs = timed_call(lambda: export_aoti(model, budget=cfg.budget, method=cfg.method, out=out, dtype=opts.dtype,
                                             random_weights=opts.random_weights, force=True, device=device,
                                             cache=roots[0] / ".aoti-packages", progress=lambda s: None))
    opts.progress(f"  compiled in {secs:.0f} s")
    return out


def _aoti_packages(export_dir: str) -> dict[str, Any] | None:
    """Per graph: compile seconds, package bytes, cache hit (from an AOTInductor export's manifest)."""

    try:
        m = read_manifest(Path(export_dir), verify=False)
    except StsError:
        return None
    return {g: {k: e["aoti"][k] for k in ("compile_s", "size_bytes", "cached")} for g, e in m["graphs"].items()}


# ----------------------------------------------------------------------------------------------- pipelines
def _want_cuda(opts: BenchOptions) -> bool:
    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        raise StsError("--device cuda: torch sees no CUDA GPU; use --device cpu")
    return opts.device == "cuda" or opts.device == "auto" and torch.cuda.is_available()


def load_pipeline(model: str, recipe: Any, cfg: Config, backend: str, opts: BenchOptions) -> Any:
    cuda = _want_cuda(opts)
    if backend in ("torch", "torch-compile"):  # dynamic resolution: the same pixel cap as the exports (recipe_of)
        return Pipeline.from_pretrained(model, budget=cfg.budget, method=cfg.method, backend="torch", dtype=opts.dtype,
                                        device="cuda" if cuda else "cpu", random_weights=opts.random_weights,
                                        compile=backend == "torch-compile",
                                        max_pixels=recipe.image_processor.max_pixels or None)
    if opts.dtype == "bf16":
        raise StsError("ONNX exports are fp32 or fp16; run the ort/trt backends with --dtype fp32 or fp16")

    if backend == "aoti":
        dev = "cuda" if cuda else "cpu"
        return load_export_pipeline(ensure_aoti_export(model, recipe, cfg, opts, dev), backend="aoti", device=dev)
    if backend == "ort":
        d = ensure_onnx_export(model, recipe, cfg, opts)
        form, inplace = ORT_FORMS[cfg.form]
        return load_export_pipeline(d, backend="onnxruntime", device="cuda" if cuda else "cpu", threads=opts.threads,
                                    form=form, inplace=inplace)
    # trt: engines come from export.py --target trt; the benchmark does not build them
    d = find_trt_export(recipe, cfg, opts)
    if d is None:
        raise StsError(_no_trt_export(f"{model} {cfg.method} b={cfg.budget}", opts))
    return load_export_pipeline(d, backend="tensorrt")


