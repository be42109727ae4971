"""Opening an export directory: the runner for its graphs, engines or packages, and the one backend vocabulary.

    ort    ONNX Runtime: the ONNX graphs (and their ORT form), CPU or CUDA      (also: onnxruntime, onnx)
    trt    TensorRT: the engines built from the ONNX graphs                        (also: tensorrt)
    aoti   AOTInductor: the <graph>.pt2 packages
    torch  the torch graphs of a checkpoint (not an export: `Pipeline.from_pretrained`)

Every CLI option and API argument that names a backend goes through `backend_name`, so a name means the same
thing everywhere. The runtimes are imported only when asked for (TensorRT and torch are optional on a device).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sts_export.artifact.manifest import manifest_plan, manifest_recipe, read_manifest
from sts_export.artifact.plan import Plan
from sts_export.errors import StsError
from sts_export.recipe import Recipe

BACKENDS = ("ort", "trt", "aoti", "torch")
ALIASES = {"onnxruntime": "ort", "onnx": "ort", "tensorrt": "trt"}
EXPORT_BACKENDS = ("auto", "ort", "trt", "aoti")  # what runs an export directory ("auto": what it holds)


def backend_name(name: str, allowed: tuple[str, ...] = BACKENDS + ("auto",)) -> str:
    """The canonical name of a backend (aliases accepted); one line for an unknown one."""
    canon = ALIASES.get(name, name)
    if canon not in allowed:
        raise StsError(f"unknown backend '{name}'; choose one of {', '.join(allowed)}")
    return canon


@dataclass
class OpenedExport:
    """An export directory opened for running: its runner, manifest, recipe and Plan."""

    backend: Any
    manifest: dict[str, Any]
    recipe: Recipe
    plan: Plan


def open_export(export_dir: str | Path, backend: str = "auto", device: str = "auto", threads: int | None = None,
                form: str = "auto", inplace: bool = True) -> OpenedExport:
    """The runner of an export directory. backend "auto": engines when it holds them, else ONNX graphs, else
    AOTInductor packages. ONNX Runtime only: `form` ("auto": the export's ORT form when it has a current one, "ort",
    "portable") and `inplace` (the ORT form's KV caches preallocated and written in place)."""
    export_dir = Path(export_dir)
    backend = backend_name(backend, EXPORT_BACKENDS)
    m = read_manifest(export_dir)
    recipe = manifest_recipe(m)
    plan = manifest_plan(m, recipe)
    has_engines = all("engine" in g for g in m["graphs"].values())
    has_onnx = all("onnx" in g for g in m["graphs"].values())
    if backend == "aoti" or (backend == "auto" and not has_engines and not has_onnx):
        from sts_export.backends.aoti import AotiBackend  # torch: only where packages are run

        be: Any = AotiBackend(export_dir, m, plan, device)
    elif not has_onnx:
        raise StsError(f"{export_dir} holds AOTInductor packages, no ONNX graphs; run it with --backend aoti")
    elif backend == "trt" or (backend == "auto" and has_engines):
        if not has_engines:
            raise StsError(f"{export_dir} holds no TensorRT engines; build them with export.py --onnx-dir {export_dir} "
                           f"--target trt")
        from sts_export.backends.tensorrt.runtime import TrtBackend  # tensorrt: only where engines are run

        be = TrtBackend(export_dir)
    else:
        from sts_export.backends.onnxruntime import OrtBackend

        be = OrtBackend(export_dir, m, device, threads, form=form, inplace=inplace, cache=True)
    return OpenedExport(be, m, recipe, plan)
