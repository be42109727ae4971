"""The rows of a bench result: the analytic cost fields of a configuration, the cost-only rows, the blank timing
of a row that did not run, and the speedup and FLOP ratios against the full budget."""
from __future__ import annotations

from pathlib import Path
from typing import Any


from sts_export.bench.cost import (DTYPE_BYTES, kv_cache_bytes, memory_fit, phase_costs, sequence_lengths, token_grid,
                                   weight_bytes_by_part, with_weight_bytes)
from sts_export.bench.devices import get_device, roofline_terms
from sts_export.bench.timing import STAT_KEYS
from sts_export.bench.options import PHASES, BenchOptions, Config, default_image
from sts_export.errors import StsError
from sts_export.pruning.budget import has_stage2
from sts_export.artifact.manifest import read_manifest


# ----------------------------------------------------------------------------------------------- rows
def cost_fields(recipe: Any, method: str, budget: int | str, dtype: str, text_tokens: int, decode_context: int,
                device: str | None, devices_file: str | None, image_size: tuple[int, int] | None = None,
                scheme: Any = None, new_tokens: int = 0) -> dict[str, Any]:
    """A row's analytic fields: flops_/bytes_ per phase (cost.phase_costs) and, with a device, the roofline.
    `image_size` (width, height): the image of dynamic-resolution recipes (Qwen2.5-VL), whose N it sets.
    `scheme` (quantized weights): the weight traffic at its bytes; every row gets the analytic weight bytes and the
    memory it needs resident after `new_tokens` decode steps (cost.memory_fit), with a device whether it fits."""
    costs = phase_costs(recipe, budget, method, dtype=dtype, prompt_tokens=text_tokens, decode_context=decode_context,
                        image_size=image_size)
    out: dict[str, Any] = {}
    for ph, c in costs.items():
        out[f"flops_{ph}"] = c.flops
        out[f"bytes_{ph}"] = c.bytes
    out["flops_stage1"] = costs["vision"].detail.get("stage1", 0.0)
    out["flops_stage2"] = costs["prefill"].detail.get("stage2", 0.0)
    q = scheme
    parts = weight_bytes_by_part(recipe, dtype, q.weights if q else None, q.block_size if q else None,
                                 q.encoding if q else "matmulnbits", bool(q and q.quantize_vision))
    if q is not None:
        costs = with_weight_bytes(costs, parts, has_stage2(method, budget))
        for ph, c in costs.items():
            out[f"bytes_{ph}"] = c.bytes
    out["weight_bytes_analytic"] = float(sum(parts.values()))
    dev = get_device(device, devices_file) if device is not None else None
    seq = sequence_lengths(recipe, budget, method, text_tokens, image_size)
    out.update(memory_fit(recipe, seq, dtype, parts, new_tokens, dev, grid=token_grid(recipe, image_size)))
    if device is not None:
        terms = roofline_terms(costs, dev)
        out["roofline_device"] = device
        for ph, t in terms.items():
            out[f"{ph}_roofline_ms"] = t["bound_ms"]
            out[f"{ph}_bound"] = t["bound"]
        out["ttft_roofline_ms"] = terms["vision"]["bound_ms"] + terms["prefill"]["bound_ms"]
    return out


def _blank_timing() -> dict[str, Any]:
    """The measured fields of a row, all empty (--cost-only rows)."""
    row: dict[str, Any] = {}
    for ph in PHASES:
        for s in STAT_KEYS:
            row[f"{ph}_ms_{s}"] = None
    row.update(stage1_ms_median=None, stage1_ms_iqr=None, stage1_share_ttft=None, peak_rss_bytes=None,
               peak_gpu_bytes=None, peak_mem_bytes=None, graph_ms_median={}, samples_ms={})
    return row


def _export_weight_bytes(export_dir: str) -> int | None:
    """Bytes of an export's ONNX graphs (weights included: `.onnx` + `.onnx.data`), from its manifest."""

    d = Path(export_dir)
    try:
        m = read_manifest(d, verify=False)
    except StsError:
        return None
    files = [g["onnx"] for g in m["graphs"].values()] + [g["external_data"]["file"] for g in m["graphs"].values()
                                                          if "external_data" in g]
    return int(sum((d / f).stat().st_size for f in files))


def cost_image_size(recipe: Any, image: Any) -> tuple[int, int] | None:
    """(width, height) of the bench image where it sets N (dynamic resolution: Qwen2.5-VL), else None."""
    if not recipe.image_processor.max_pixels:
        return None
    return tuple((image if image is not None else default_image(recipe)).size)


def cost_row(model: str, recipe: Any, cfg: Config, opts: BenchOptions, image: Any = None) -> dict[str, Any]:
    """An analytic-only row (--cost-only): no weights, no timings."""
    t = opts.text_tokens or None
    size = cost_image_size(recipe, image)
    seq = sequence_lengths(recipe, cfg.budget, cfg.method, t, size)
    row: dict[str, Any] = {
        "model": model, "recipe": recipe.name, "method": cfg.method, "budget": cfg.budget, "backend": "analytic",
        "dtype": opts.dtype, "device": None, "k_pre": seq.k_pre, "k_post": seq.k_post,
        "prune_layer": seq.prune_layer, "text_tokens": seq.text_tokens, "seq_len_stage1": seq.s1,
        "seq_len_stage2": seq.s2,
        "kv_cache_bytes": kv_cache_bytes(recipe, seq.s1, seq.s2, DTYPE_BYTES[opts.dtype], prune_layer=seq.prune_layer),
        "repeats": 0, "warmup": 0, "max_new_tokens": opts.max_new_tokens,
    }
    row.update(_blank_timing())
    row.update(cost_fields(recipe, cfg.method, cfg.budget, opts.dtype, seq.text_tokens,
                           max(opts.max_new_tokens - 2, 0) // 2, opts.roofline, opts.roofline_file, size,
                           scheme=cfg.scheme, new_tokens=opts.max_new_tokens))
    row["weights"] = cfg.weights(opts.dtype)
    row["weight_bytes"], row["weight_bytes_source"] = row["weight_bytes_analytic"], "analytic"
    if size is not None:
        rows, cols = token_grid(recipe, size)
        row["image_size"], row["n_tokens"] = list(size), rows * cols
    return row


def add_ratios(rows: list[dict[str, Any]], on_device: str | None) -> None:
    """Speedups over the `full` row of the same model/backend, beside the analytic FLOP ratios; measured/bound."""
    for row in rows:
        base = next((r for r in rows if r["budget"] == "full" and r["model"] == row["model"]
                     and r["backend"] == row["backend"] and r["dtype"] == row["dtype"]
                     and r.get("weights") == row.get("weights") and r.get("graph_form") == row.get("graph_form")),
                    None)
        row.update(speedup_ttft=None, speedup_prefill=None, flop_ratio_ttft=None, flop_ratio_prefill=None,
                   speedup_over_flop_ratio=None)
        if base is not None:
            row["flop_ratio_ttft"] = (base["flops_vision"] + base["flops_prefill"]) / (row["flops_vision"] + row["flops_prefill"])
            row["flop_ratio_prefill"] = base["flops_prefill"] / row["flops_prefill"]
            if row["ttft_ms_median"] and base["ttft_ms_median"]:
                row["speedup_ttft"] = base["ttft_ms_median"] / row["ttft_ms_median"]
                row["speedup_prefill"] = base["prefill_ms_median"] / row["prefill_ms_median"]
                row["speedup_over_flop_ratio"] = row["speedup_ttft"] / row["flop_ratio_ttft"]
        if on_device and "ttft_roofline_ms" in row and row.get("ttft_ms_median") is not None:
            for ph in PHASES:
                bound, meas = row.get(f"{ph}_roofline_ms"), row.get(f"{ph}_ms_median")
                row[f"{ph}_measured_over_bound"] = meas / bound if bound and meas is not None else None
        if row.get("ttft_ms_median"):
            for ph, fl in (("vision", row["flops_vision"]), ("prefill", row["flops_prefill"])):
                ms = row.get(f"{ph}_ms_median")
                row[f"{ph}_gflops_per_s"] = fl / (ms * 1e6) if ms else None


