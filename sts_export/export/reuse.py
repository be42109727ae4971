"""Graphs shared between exports: copy a graph from a sibling export instead of exporting it again.

Exports of one model that differ only in method or budget write identical `embed` graphs, and identical
`segment1`/`segment2` (portable and ORT form) whenever their prune layer agrees; `vision` and `prune` are
identical between exports of the same method, budget and anchor (an int4 export beside its fp32 one, an export
redone with `--force`). Each graph's manifest entry records a `build_key`, the digest of everything its bytes
follow from (weights files or random seed, recipe, dtype, opset, graph and layer range, IO names, for vision and
prune the method, budget, K, K' and anchor, the torch / transformers / onnx / onnxscript versions and the source
of this package). An export looks for a sibling directory (same parent) whose unquantized manifest holds the same
key and whose file still has the recorded sha256, copies it, and records `reused_from`; validation then checks it
like every other graph.
"""
from __future__ import annotations

import functools
import hashlib
import json
import platform
import shutil
from pathlib import Path
from typing import Any, Sequence

from sts_export.artifact.manifest import entry_files, sha256

METHOD_FREE = ("embed", "segment1", "segment2")  # graphs that depend on neither the method nor the budget


@functools.lru_cache(maxsize=1)
def _tool_digest() -> str:
    """sha256 over this package's Python sources and the exporters' versions."""
    from importlib.metadata import PackageNotFoundError, version

    import sts_export

    h = hashlib.sha256()
    root = Path(sts_export.__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    for pkg in ("torch", "transformers", "onnx", "onnxscript"):
        try:
            h.update(f"{pkg}={version(pkg)}".encode())
        except PackageNotFoundError:
            h.update(f"{pkg}=none".encode())
    h.update(platform.python_version().encode())
    return h.hexdigest()


def _source(src: Any) -> dict[str, Any]:
    """The weights' identity: the random seed (in the recipe), or the checkpoint's files by name, size and mtime."""
    if src.path is None:
        return {"random_weights": True}
    path = Path(src.path).resolve()
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".json"))
    return {"path": str(path), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def build_key(src: Any, recipe: Any, plan: Any, graph: str, form: str, dtype: str, opset: int,
              anchor: str) -> str:
    """The digest a graph's bytes follow from. form: "portable" or "ort"."""
    what = {"graph": graph, "form": form, "dtype": dtype, "opset": opset, "source": _source(src),
            "recipe": recipe.to_dict(), "layers": plan.segment_layers.get(graph), "io": plan.io(graph),
            "position_axes": plan.position_axes, "tool": _tool_digest()}
    if graph not in METHOD_FREE:  # vision (Stage 1), prune (Stage 2): the configuration too
        what["config"] = {"method": plan.method, "budget": plan.budget, "k_pre": plan.k_pre, "k_post": plan.k_post,
                          "prune_layer": plan.prune_layer, "anchor": anchor}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def siblings(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, manifest) of every export beside `out` whose graphs can be reused: complete (a manifest), not
    `out` itself, not a temporary or `.failed` directory, not quantized in place after export."""
    parent = out.parent
    found = []
    for d in sorted(parent.iterdir()) if parent.is_dir() else []:
        if d == out or d.name.startswith(".") or d.name.endswith(".failed") or not (d / "manifest.json").is_file():
            continue
        try:
            m = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if not m.get("weights"):  # a quantized export's graphs are not the float ones
            found.append((d, m))
    return found


def find(near: Sequence[tuple[Path, dict[str, Any]]], key: str, form: str) -> tuple[Path, dict[str, Any]] | None:
    """The first of `near` (`siblings`) whose `form` entry ("graphs" or "ort_form") has `key` and whose files still
    match their recorded sha256: (its directory, the entry); None when there is none."""
    for d, m in near:
        for e in (m.get(form) or {}).values():
            if isinstance(e, dict) and e.get("build_key") == key and all(
                    (d / f).is_file() and sha256(d / f) == digest for f, digest in entry_files(e)):
                return d, e
    return None


def copy_into(sibling: Path, entry: dict[str, Any], tmp: Path) -> None:
    """Copy one graph's files (ONNX and external data) from a sibling export into the temporary directory."""
    for f, _ in entry_files(entry):
        shutil.copyfile(sibling / f, tmp / f)
