"""AOTInductor target: the graphs of an export configuration as `<graph>.pt2` packages (torch.export +
torch._inductor.aoti_compile_and_package), one directory per export, beside a manifest like the ONNX one.

    <out>/vision.pt2 embed.pt2 segment1.pt2 [prune.pt2] segment2.pt2  manifest.json recipe.yaml tokenizer.json ...

The graphs are those of `sts_export.graphs.build_graphs` (the torch backend's), exported with the ONNX
exporter's example inputs and dynamic axes (`onnx.example_inputs`: batch, sequence, cache length, and the
image-dependent token counts of NeXT/Qwen), so the float32 selection math is the same code.
Stage 1 for image-dependent N calls the custom ops `sts::potential_energy_picks` / `divprune_picks`
(`pruning/loop.py`); AOTInductor keeps them as fallback calls through its proxy executor into their registered
eager kernel (the same function the torch backend runs), so the runtime imports `sts_export.pruning.loop`.

Packages are built on the machine that runs them: the manifest's "aoti" section records the torch version and
the device, compute capability and CPU ISA read from the built package; `check_packages` refuses any other in
one line. Written into a temporary sibling directory and renamed when complete (as the ONNX export).
An optional package cache (`cache=DIR`) reuses a package compiled before for the same graph: same code, dynamic
axes, weights, dtype, device and torch version (e.g. embed and segments shared by methods of one model).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from sts_export.artifact import memory
from sts_export.artifact.manifest import sha256, write_manifest
from sts_export.backends.aoti import _capability, _cpu_isa, package_metadata
from sts_export.checkpoint import load_model
from sts_export.errors import StsError
from sts_export.export.io import example_inputs
from sts_export.export.onnx import (EXPORT_DTYPES, GRAPH_ORDER, manifest_base, move_into_place, prepare_export,
                                    write_side_files)
from sts_export.graphs import build_graphs
from sts_export.pruning.budget import check_method, parse_budget

AOTI_DEVICES = ("cpu", "cuda")
PACKAGE = "{graph}.pt2"
INDUCTOR_CONFIGS = {"scalar_asserts": False}  # see compile_graph


def check_aoti_device(device: str) -> str:
    """The device packages are built for; one line when it is unknown or absent here."""
    if device not in AOTI_DEVICES:
        raise StsError(f"--aoti-device must be cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise StsError("--aoti-device cuda: torch sees no CUDA GPU here, and AOTInductor packages are built on the "
                       "machine that runs them; build on the GPU machine, or use --aoti-device cpu")
    if device == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
        raise StsError("AOTInductor on CPU compiles C++: no g++/clang++ found; install one (apt-get install g++)")
    return device


def build_record(path: Path) -> dict[str, Any]:
    """The manifest's "aoti" section, from a built package and the torch that built it."""
    meta = package_metadata(path)
    return {"torch_version": torch.__version__, "device": meta.get("AOTI_DEVICE_KEY", "cpu"),
            "compute_capability": meta.get("AOTI_COMPUTE_CAPABILITY") or None,
            "machine": meta.get("AOTI_MACHINE") or platform.machine(), "cpu_isa": _cpu_isa(),
            "package_isa": meta.get("AOTI_CPU_ISA") or None, "host": platform.platform()}


def _to(x: Any, device: torch.device) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)


def _program_digest(ep: Any, key: dict[str, Any]) -> str:
    """A digest of everything a compiled package depends on: code, signature, dynamic ranges, weights, `key`."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for part in (ep.graph_module.code, str(ep.graph_signature), str(ep.range_constraints), str(ep.call_spec)):
        h.update(part.encode())
    for name, t in sorted({**ep.state_dict, **ep.constants}.items()):
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _place(src: Path, dst: Path) -> None:
    """dst = a copy of src (a hard link where the filesystem allows)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def compile_graph(module: torch.nn.Module, graph: str, plan: Any, recipe: Any, dtype: torch.dtype, device: str,
                  path: Path, cache: Path | None = None) -> dict[str, Any]:
    """torch.export one graph (the ONNX export's example inputs and dynamic axes) and compile it into `path`.

    Returns the manifest entry (a graph's "aoti"): package file, sha256, size, export and compile seconds (a cache hit keeps the
    seconds of the compile that made the package, and says `cached`)."""
    args, shapes = example_inputs(graph, plan, recipe, dtype)
    dev = torch.device(device)
    args = _to(args, dev)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        # as torch.onnx does: a guard on a length-only input (e.g. `x[:, :k]` of a [K'_max] TopK guards k != K'_max)
        # becomes a runtime assert, which the package drops (scalar_asserts off; ONNX graphs have none either)
        ep = torch.export.export(module, args, dynamic_shapes=shapes, prefer_deferred_runtime_asserts_over_guards=True)
    export_s = time.perf_counter() - t0
    digest = cached = None
    if cache is not None:
        key = {"torch": torch.__version__, "device": device, "capability": _capability(device), "isa": _cpu_isa(),
               "dtype": str(dtype), "inductor": INDUCTOR_CONFIGS}
        digest = _program_digest(ep, key)
        hit = cache / f"{digest}.pt2"
        if hit.is_file() and (cache / f"{digest}.json").is_file():
            cached = json.loads((cache / f"{digest}.json").read_text())
            _place(hit, path)
    if cached is None:
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            configs = dict(INDUCTOR_CONFIGS)  # a copy: aoti_compile_and_package adds its own keys to it
            torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs)
        compile_s = time.perf_counter() - t1
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".{digest}.{os.getpid()}.tmp"
            shutil.copy2(path, tmp)
            os.replace(tmp, cache / f"{digest}.pt2")
            (cache / f"{digest}.json").write_text(json.dumps({"compile_s": compile_s}))
    else:
        compile_s = float(cached["compile_s"])
    del ep
    return {"package": path.name, "sha256": sha256(path), "size_bytes": path.stat().st_size,
            "export_s": round(export_s, 3), "compile_s": round(compile_s, 3), "cached": cached is not None}


def export_aoti(
    model: str,
    *,
    budget: int | str = 64,
    method: str = "sts",
    out: str | os.PathLike | None = None,
    recipe: str | None = None,
    dtype: str = "fp32",
    anchor: str | None = None,
    random_weights: bool = False,
    force: bool = False,
    max_pixels: int | None = None,
    device: str = "cpu",
    cache: str | os.PathLike | None = None,
    progress: Callable[[str], None] = print,
) -> Path:
    """Compile an export configuration's graphs into AOTInductor packages in an export directory; returns its path."""

    check_method(method)
    budget = parse_budget(budget)
    if dtype not in EXPORT_DTYPES:
        raise StsError(f"--dtype must be fp32, fp16 or bf16, got '{dtype}'")
    device = check_aoti_device(device)
    prep = prepare_export(model, method=method, budget=budget, dtype=dtype, out=out, force=force, recipe=recipe,
                          random_weights=random_weights, max_pixels=max_pixels, anchor=anchor, label=f"aoti-{device}")
    src, rec, plan, torch_dtype, anchor, out = prep.src, prep.recipe, prep.plan, prep.torch_dtype, prep.anchor, prep.out
    progress(f"model: {src.description} | recipe {rec.name} | method {method} budget {budget} -> K={plan.k_pre} "
             f"K'={plan.k_post} prune_layer={plan.prune_layer} | {dtype} | AOTInductor {device}")
    memory.clean_stale_tmp(out.parent, progress)
    t0 = time.perf_counter()
    net = load_model(src, torch_dtype).to(device).eval()
    graphs = build_graphs(net, method, budget, anchor)
    names = [g for g in GRAPH_ORDER if g in graphs]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = memory.make_tmp_dir(out)
    try:
        files = {}
        for i, g in enumerate(names, 1):
            progress(f"[{i}/{len(names)}] compiling {g} ...")
            entry = compile_graph(graphs[g], g, plan, rec, torch_dtype, device, tmp / PACKAGE.format(graph=g),
                                  Path(cache) if cache is not None else None)
            files[g] = {"aoti": entry}
            progress(f"[{i}/{len(names)}] {g}: export {entry['export_s']:.1f} s, compile {entry['compile_s']:.1f} s"
                     f"{' (cached)' if entry['cached'] else ''}, {entry['size_bytes'] / 1e6:.1f} MB")
            gc.collect()
        write_side_files(tmp, src, rec, progress)
        manifest = {**manifest_base(rec, src, method, budget, plan, anchor, dtype),
                    "aoti": build_record(tmp / files[names[0]]["aoti"]["package"]), "graphs": files}
        write_manifest(tmp, manifest)
        move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return out
