"""manifest.json of an export directory: written atomically, read with every file checked.

Torch-free, so the Jetson engine build (tensorrt + numpy only) can use it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sts_export.pruning.budget import has_stage2
from sts_export.errors import StsError
from sts_export.recipe import Recipe, from_dict
from sts_export.artifact.plan import NP_DTYPES, Plan


# the layout of an export's ORT form (manifest "ort_form" -> "cache" -> "form_version", `export/ort_form.py`); an
# export whose form is older runs its portable graphs until `sts ort-form DIR` rewrites it
# 1: RotaryEmbedding per q/k + GroupQueryAttention; 2: GroupQueryAttention's own rotary on packed q|k|v, separate
# gate/up MatMuls, and a vision graph with MultiHeadAttention (CLIP towers; Qwen ViTs also RotaryEmbedding, written
# by later 2's: an export without it runs its portable vision graph)
ORT_FORM_VERSION = 2


def ort_form_is_current(manifest: dict[str, Any]) -> bool:
    """Whether the export's ORT form is this version's layout."""
    return (manifest.get("ort_form", {}).get("cache") or {}).get("form_version") == ORT_FORM_VERSION


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(export_dir: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json via a temporary file and an atomic rename."""
    tmp = export_dir / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, export_dir / "manifest.json")


FORMAT_VERSION = 1

# ONNX element type -> the project's dtype name, for the float types a graph can be "in".
_ONNX_FLOAT = {1: "fp32", 10: "fp16", 16: "bf16"}  # TensorProto.FLOAT, FLOAT16, BFLOAT16


def _model(path: Path) -> Any:
    import onnx  # noqa: PLC0415 - torch-free, and only needed where graphs are read

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line
        raise StsError(f"{path} is not a readable ONNX file ({type(e).__name__}); copy it again or re-export") from None


def graph_dtype(path: Path) -> str | None:
    """The dtype a graph computes in, read from the file: the float type holding most initializer elements (its
    weights; Stage 1/2 keep a few small float32 constants). None for a graph without float weights."""
    counts: dict[str, int] = {}
    for t in _model(path).graph.initializer:
        name = _ONNX_FLOAT.get(t.data_type)
        if name:
            n = 1
            for d in t.dims:
                n *= max(int(d), 1)
            counts[name] = counts.get(name, 0) + n
    return max(counts, key=lambda k: counts[k]) if counts else None


def graph_opset(path: Path) -> int:
    """The default-domain opset a graph file imports."""
    return max((o.version for o in _model(path).opset_import if o.domain in ("", "ai.onnx")), default=0)


def export_dtype(export_dir: Path, manifest: dict[str, Any]) -> str:
    """The one dtype of every graph of an export, read from the graph files (not from the manifest's own field)."""
    found = {name: graph_dtype(export_dir / g["onnx"]) for name, g in manifest["graphs"].items()}
    kinds = {d for d in found.values() if d is not None}
    if len(kinds) != 1:
        raise StsError(f"{export_dir}: the graphs do not share one dtype ({', '.join(f'{k} {v}' for k, v in found.items())}); "
                       f"re-export")
    return kinds.pop()


def entry_files(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(file name, sha256) of every file one graph entry names: its ONNX file, external data, AOTInductor package."""
    files = [(entry["onnx"], entry["sha256"])] if "onnx" in entry else []  # an AOTInductor-only export has no ONNX
    files += [(entry["external_data"]["file"], entry["external_data"]["sha256"])] if "external_data" in entry else []
    files += [(entry["aoti"]["package"], entry["aoti"]["sha256"])] if "aoti" in entry else []
    return files


def read_manifest(export_dir: Path, verify: bool = True) -> dict[str, Any]:
    """manifest.json of an export directory, with every graph present and matching its sha256."""
    path = export_dir / "manifest.json"
    if not export_dir.is_dir():
        raise StsError(f"export directory {export_dir} does not exist")
    if not path.is_file():
        raise StsError(f"{export_dir} is not an export directory (no manifest.json); run export.py first")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise StsError(f"{path} is corrupted (not JSON); re-export") from None
    fmt = m.get("format_version")
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise StsError(f"{path} has format version {fmt}, newer than this sts-export reads ({FORMAT_VERSION}); upgrade sts-export")
    form = {k: v for k, v in m.get("ort_form", {}).items() if isinstance(v, dict) and "onnx" in v}
    for name, g in [*m.get("graphs", {}).items(), *form.items()]:
        for fname, digest in entry_files(g):
            f = export_dir / fname
            if not f.is_file():
                raise StsError(f"graph '{name}' is missing ({f.name}); copy the whole export directory again or re-export")
            if verify and sha256(f) != digest:
                raise StsError(f"{f.name} differs from the manifest's sha256 (corrupted or edited); copy it again or re-export")
    needed = {"vision", "embed", "segment1", "segment2"} | ({"prune"} if has_stage2(m.get("method"), m.get("budget")) else set())
    missing = sorted(needed - set(m.get("graphs", {})))
    if missing:
        raise StsError(f"{path} lists no graph(s) {', '.join(missing)}; re-export")
    return m


def manifest_recipe(m: dict[str, Any]) -> Recipe:
    return from_dict(Recipe, m["recipe"], "manifest.recipe")


def manifest_plan(m: dict[str, Any], recipe: Recipe) -> Plan:
    plan = Plan.create(recipe, m["method"], m["budget"], NP_DTYPES[m["dtype"]])
    if (plan.k_pre, plan.k_post, plan.prune_layer) != (m["k_pre"], m["k_post"], m["prune_layer"]):
        raise StsError("manifest K/K'/prune_layer disagree with its recipe; the export directory is inconsistent")
    return plan


