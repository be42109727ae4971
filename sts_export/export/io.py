"""Graph files: the example inputs and dynamic axes each graph is exported with, the one torch.onnx.export call, and
what the manifest records of a written file (sha256, IO names, dtypes, shapes, external data).

Shared by the portable export (`onnx.py`), the ORT form (`ort_form.py`) and weight quantization (`quantize.py`).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch.export import Dim

from sts_export.artifact.manifest import graph_dtype, graph_opset, sha256
from sts_export.artifact.plan import Plan
from sts_export.errors import StsError
from sts_export.families import family_module
from sts_export.pruning.loop import translation_table
from sts_export.recipe import Recipe

TWO_GB = 2 * 1024**3


def example_positions(plan: Plan, b: int, start: int, s: int, batch: Any, seq: Any) -> tuple[torch.Tensor, dict]:
    """Example position ids start..start+s-1 and their dynamic axes: [B, S], or [3, B, S] for M-RoPE
    (distinct rows, so no axis is traced as equal to another)."""
    ids = torch.arange(start, start + s).expand(b, s)
    if plan.position_axes == 1:
        return ids.contiguous(), {0: batch, 1: seq}
    rows = torch.stack([ids + r for r in range(plan.position_axes)])  # [3, B, S]
    return rows, {1: batch, 2: seq}


def example_inputs(graph: str, plan: Plan, recipe: Recipe, dtype: torch.dtype) -> tuple[tuple, tuple]:
    """(example args, dynamic shapes) for one graph. Dynamic dims get examples >= 2 (0/1 would specialise)."""
    b, s, p = 2, 5, 3
    batch = Dim("B", min=1, max=256)
    t = recipe.text
    if graph == "vision":
        pruned = "k_pre" in plan.vision_inputs
        args, shapes = family_module(recipe.family).vision_example(recipe, pruned)
        if pruned:  # length-only input: its length is this image's K (at most K_max)
            args, shapes = (*args, torch.zeros(min(plan.k_pre, 7), dtype=torch.int64)), (*shapes, {0: Dim("K", min=1, max=plan.k_pre)})
        return args, (tuple(shapes),)  # forward(*inputs): torch.export sees one nested argument
    if graph == "embed":
        return (torch.randint(0, t.vocab_size, (b, s)),), ({0: batch, 1: Dim("S", min=1, max=recipe.max_context)},)
    if graph == "prune":
        if plan.dynamic:  # this image's K and K' arrive as the lengths of k_pre [K] and k_post [K']
            k, kp = min(plan.k_pre, 40), min(plan.k_post, 13)
            s1 = k + 8
            seq = Dim("S1", min=2, max=recipe.max_prompt_tokens)
            pos, pos_shape = example_positions(plan, b, 0, s1, batch, seq)
            args = (torch.randn(b, s1, t.hidden_size, dtype=dtype), pos,
                    torch.tensor(3, dtype=torch.int64), torch.zeros(k, dtype=torch.int64), torch.zeros(kp, dtype=torch.int64))
            return args, ({0: batch, 1: seq}, pos_shape, None,
                          ({0: Dim("K", min=1, max=plan.k_pre)}, {0: Dim("Kp", min=1, max=plan.k_post)}))
        s1 = plan.k_pre + 8
        seq = Dim("S1", min=plan.k_pre + 1, max=recipe.max_prompt_tokens)
        pos, pos_shape = example_positions(plan, b, 0, s1, batch, seq)
        args = (torch.randn(b, s1, t.hidden_size, dtype=dtype), pos, torch.tensor(3, dtype=torch.int64))
        return args, ({0: batch, 1: seq}, pos_shape, None)
    layers = plan.segment_layers[graph]
    seq = Dim("S", min=1, max=recipe.max_context)
    past = Dim("P", min=0, max=recipe.max_context)
    # a distinct tensor per past slot: aliased example inputs would be merged into one graph input
    kv = tuple(torch.randn(b, t.num_kv_heads, p, t.head_dim, dtype=dtype) for _ in range(2 * len(layers)))
    pos, pos_shape = example_positions(plan, b, p, s, batch, seq)
    # forward(hidden, position_ids, [deepstack_embeds, image_start,] *past): torch.export sees *past (and the
    # DeepStack pair) as one nested argument
    deep, deep_shapes = deepstack_example(graph, plan, recipe, dtype, b, s, batch)
    args = (torch.randn(b, s, t.hidden_size, dtype=dtype), pos, *deep, *kv)
    shapes = ({0: batch, 1: seq}, pos_shape, (*deep_shapes, *[{0: batch, 2: past}] * (2 * len(layers))))
    return args, shapes


def deepstack_example(graph: str, plan: Plan, recipe: Recipe, dtype: torch.dtype, b: int, s: int, batch: Any
                      ) -> tuple[tuple, tuple]:
    """segment1's DeepStack inputs (a family with T taps; none elsewhere): deepstack_embeds [T, B, K, Hd] with a
    dynamic K (the kept image rows of this call: 1..K_max at prefill, one zero row at decode) and image_start []
    int64. The example's K (3) is below its S (5), as at prefill, and image_start 1 places it inside."""
    if graph != "segment1" or not plan.deepstack:
        return (), ()
    k = Dim("K", min=1, max=recipe.max_image_span)  # the kept rows (K) or, unpruned, the span: method-free
    planes = torch.randn(plan.deepstack, b, min(3, s - 1), recipe.text.hidden_size, dtype=dtype)
    return (planes, torch.tensor(1, dtype=torch.int64)), ({1: batch, 2: k}, None)


def io_spec(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes (ints or symbolic names) of a saved ONNX graph's inputs and outputs."""
    m = onnx.load(str(path), load_external_data=False)

    def info(v: Any) -> dict[str, Any]:
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": dims}

    return {"inputs": [info(v) for v in m.graph.input], "outputs": [info(v) for v in m.graph.output]}


def onnx_export(module: torch.nn.Module, args: tuple, shapes: Any, inputs: list[str], outputs: list[str], path: Path,
                opset: int, translations: dict | None = None) -> None:
    """The project's one torch.onnx.export call (dynamo, optimised, the Stage 1 selectors' Loop translations plus
    `translations`), saved to `path` with external data when the weights pass 2 GB.

    torch.onnx rebuilds its op registry on every export and, without torchvision, logs "torchvision is not
    installed. Skipping torchvision::nms" (and roi_align, roi_pool, deform_conv2d): those lines are dropped here,
    for every graph and form, and nothing else is."""
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    no_torchvision = lambda r: not r.getMessage().startswith("torchvision is not installed")  # noqa: E731
    registry_log.addFilter(no_torchvision)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                     custom_translation_table={**translation_table(), **(translations or {})},
                                     dynamic_shapes=shapes, opset_version=opset, optimize=True, verbose=False)
    finally:
        registry_log.removeFilter(no_torchvision)
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    prog.save(str(path), external_data=n_bytes > TWO_GB - 64 * 1024**2)
    del prog


def export_graph(module: torch.nn.Module, graph: str, plan: Plan, recipe: Recipe, dtype: torch.dtype,
                 path: Path, opset: int, translations: dict | None = None) -> None:
    """torch.onnx.export one graph with dynamic batch/sequence/past axes and DESIGN.md's IO names
    (`translations`: more custom ops' ONNX translations, e.g. the ORT form's fused kernels)."""
    args, shapes = example_inputs(graph, plan, recipe, dtype)
    inputs, outputs = plan.io(graph)
    onnx_export(module, args, shapes, inputs, outputs, path, opset, translations)


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest entry of one graph file, read from the file: name, sha256, IO, external data."""
    entry = {"onnx": path.name, "sha256": sha256(path), **io_spec(path)}
    data = path.with_name(f"{path.name}.data")
    if data.exists():
        entry["external_data"] = {"file": data.name, "sha256": sha256(data)}
    return entry


def graph_entries(out: Path, graphs: list[str], dtype: str, opset: int) -> tuple[int, dict[str, Any]]:
    """(the opset, the manifest's "graphs") of the graph files in `out`: sha256, IO, external data; dtype and opset
    are read from the written files, never copied from the request (one line when they differ from it)."""
    found = {g: graph_dtype(out / f"{g}.onnx") for g in graphs}
    if {d for d in found.values() if d is not None} != {dtype}:
        raise StsError(f"the exported graphs are {found}, not {dtype} as asked: this is a bug, please report it")
    opsets = {g: graph_opset(out / f"{g}.onnx") for g in graphs}
    if set(opsets.values()) != {opset}:
        raise StsError(f"torch.onnx wrote opsets {opsets} where {opset} was asked; choose another --opset")
    return opsets[graphs[0]], {g: file_entry(out / f"{g}.onnx") for g in graphs}
