#!/usr/bin/env python
"""Export a LLaVA-family model with STS pruning inside the graphs: ONNX, then optionally TensorRT engines.

    python export.py --model tiny-llava --budget 64                 # ONNX, validated with ONNX Runtime
    python export.py --model llava-1.5-7b --budget 64 --target trt  # ONNX + engines (needs TensorRT)
    python export.py --onnx-dir exports/x --target trt [--check-only]  # Jetson: engines from copied ONNX
    python export.py --model tiny-llava --budget 64 --target aoti [--aoti-device cuda]  # AOTInductor packages
"""
from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", help="Recipe name, local checkpoint directory, or HF id in the local cache.")
@click.option("--recipe", default=None, help="Recipe name or YAML path (architecture/pruning defaults).")
@click.option("--budget", default="64", show_default=True, help="Average visual tokens per decoder layer, or 'full'.")
@click.option("--method", type=click.Choice(["sts", "sts-s", "fastv", "divprune", "cls", "none"]), default="sts", show_default=True)
@click.option("--anchor", type=click.Choice(["mean", "first", "saliency"]), default=None, help="Stage 1 first pick (recipe default).")
@click.option("--target", type=click.Choice(["onnx", "trt", "aoti"]), default="onnx", show_default=True,
              help="onnx graphs; trt: + TensorRT engines; aoti: AOTInductor packages (<graph>.pt2) built for this machine.")
@click.option("--aoti-device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="With --target aoti: the device the packages are compiled for, on this machine [cpu].")
@click.option("--aoti-cache", type=click.Path(path_type=Path), default=None,
              help="With --target aoti: reuse packages compiled before for the same graph (embed and segments are "
                   "shared by methods and budgets) from this directory, and add new ones to it.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output directory [exports/<model>-<method>-b<budget>].")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="ONNX dtype = engine precision [fp32 for onnx, fp16 for trt]; bf16 for Thor / desktop Blackwell.")
@click.option("--random-weights", is_flag=True, help="Full-size architecture with seeded random weights (no download).")
@click.option("--opset", default=None, type=int, help="ONNX opset, 18..25 [18; 22 for bf16].")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs torch validation.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@click.option("--no-reuse", is_flag=True,
              help="Export every graph anew, even those a sibling export in the same parent directory already holds "
                   "with the same build key (same weights, recipe, layers, configuration, dtype, opset and tool).")
@click.option("--onnx-dir", type=click.Path(path_type=Path), default=None, help="Build engines from an existing ONNX export (tensorrt + numpy only).")
@click.option("--check-only", is_flag=True, help="With --target trt: only run the static TensorRT compatibility check.")
@click.option("--trt-version", default=None,
              help="TensorRT version(s) the check targets, comma-separated, e.g. 10.3,10.16,11.4 [installed, else 10.3].")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
              help="Engine precision; engines are strongly typed, so it must equal the ONNX dtype (exports: sets --dtype).")
@click.option("--max-batch", default=1, show_default=True, type=click.IntRange(1, 256), help="Largest batch the engines accept.")
@click.option("--opt-level", default=3, show_default=True, type=click.IntRange(0, 5), help="TensorRT builder optimisation level.")
@click.option("--workspace-gb", default=None, type=float, help="TensorRT workspace limit (GiB); small on Jetson.")
@click.option("--weights", type=click.Choice(["int8", "int4", "fp32", "fp16", "bf16"]), default=None,
              help="Weight-only quantization of the decoder and projector linears [the ONNX dtype]: MatMulNBits for "
                   "ONNX Runtime, DequantizeLinear + MatMul for --target trt.")
@click.option("--block-size", type=click.Choice(["32", "128"]), default=None,
              help="K elements per quantization scale with --weights [128; TensorRT int4: 128, int8: per channel].")
@click.option("--quantize-vision", is_flag=True, help="With --weights: quantize the vision tower's linears too.")
@click.option("--max-pixels", type=int, default=None,
              help="Dynamic-resolution models (Qwen2.5-VL): the largest image area the graphs serve; smart_resize keeps "
                   "every image within it, and N, K_max and the TensorRT profiles follow [the recipe's, at most "
                   "1280*28*28 = 1003520, i.e. 1280 visual tokens].")
def main(model: str | None, recipe: str | None, budget: str, method: str, anchor: str | None, target: str,
         out: Path | None, dtype: str | None, random_weights: bool, opset: int | None, no_validate: bool, force: bool,
         no_reuse: bool, onnx_dir: Path | None, check_only: bool, trt_version: str | None, precision: str | None,
         max_batch: int, opt_level: int, workspace_gb: float | None, weights: str | None, block_size: str | None,
         quantize_vision: bool, max_pixels: int | None, aoti_device: str | None, aoti_cache: Path | None) -> None:
    """Export graphs with STS pruning inside (see README)."""
    from sts_export.errors import StsError, cli_errors

    with cli_errors("interrupted: nothing was left in the output directory"):
        if target == "aoti" or aoti_device is not None or aoti_cache is not None:
            given = {"--onnx-dir": onnx_dir, "--check-only": check_only or None, "--trt-version": trt_version,
                     "--precision": precision, "--opset": opset, "--weights": weights, "--block-size": block_size,
                     "--quantize-vision": quantize_vision or None, "--workspace-gb": workspace_gb,
                     "--no-reuse": no_reuse or None}
            if target != "aoti":
                raise StsError("--aoti-device/--aoti-cache compile AOTInductor packages: use them with --target aoti")
            bad = [k for k, v in given.items() if v is not None]
            if bad:
                verb = "does" if len(bad) == 1 else "do"
                raise StsError(f"{', '.join(bad)} {verb} not apply to --target aoti (AOTInductor packages of the "
                               f"torch graphs, in --dtype); drop them, or use --target onnx/trt")
            if not model:
                raise StsError("pass --model (a recipe name, a checkpoint directory or a cached HF id)")
            from sts_export.export.aoti import check_aoti_device, export_aoti
            from sts_export.export.onnx import check_out

            check_aoti_device(aoti_device or "cpu")
            if out is not None:
                check_out(out)
            export_aoti(model, budget=budget, method=method, out=out, recipe=recipe, dtype=dtype or "fp32",
                        anchor=anchor, random_weights=random_weights, force=force, max_pixels=max_pixels,
                        device=aoti_device or "cpu", cache=aoti_cache)
            return
        # every flag is checked before any work: a version, opset or output place that cannot be honoured is one line
        from sts_export.export.tensorrt.check import default_version, parse_versions
        from sts_export.export.weights import check_weights, refuse_ort_weights, required_opset

        block = int(block_size) if block_size is not None else None
        if onnx_dir is None:  # before the version parser: an old TensorRT gets the weights' own reason
            scheme = check_weights(weights, block, quantize_vision, target=target, trt_versions=trt_version,
                                   dtype=dtype or precision or ("fp16" if target == "trt" else "fp32"))
        elif weights is not None or block is not None or quantize_vision:
            raise StsError("--weights/--block-size/--quantize-vision apply to an export; --onnx-dir builds engines "
                           "from the weights its export already holds")
        versions = parse_versions(trt_version) if trt_version is not None else None
        if onnx_dir is not None:
            if target != "trt":
                raise StsError("--onnx-dir builds engines: use it with --target trt")
            refuse_ort_weights(onnx_dir)
            from sts_export.export.tensorrt.engines import build_engines, engine_precision
            from sts_export.artifact.manifest import read_manifest

            if check_only:
                if precision is not None:
                    engine_precision(onnx_dir, read_manifest(onnx_dir), precision)
                else:
                    read_manifest(onnx_dir)  # one line when DIR is not a complete export
                _check_and_exit(onnx_dir, versions or [default_version()])
            build_engines(onnx_dir, precision=precision, max_batch=max_batch, opt_level=opt_level,
                          workspace_gb=workspace_gb, trt_version=trt_version)
            click.echo(f"engines written to {onnx_dir}")
            return
        if not model:
            raise StsError("pass --model (a recipe name, a checkpoint directory or a cached HF id), or --onnx-dir")
        if dtype is not None and precision is not None and dtype != precision:
            raise StsError(f"--precision {precision} cannot be met with --dtype {dtype}: engines are strongly typed, "
                           f"their precision is the ONNX dtype; pass one of them")
        dtype = dtype or precision or ("fp16" if target == "trt" else "fp32")
        from sts_export.export.onnx import check_opset, check_out, export

        opset = check_opset(required_opset(scheme, opset), dtype)
        if out is not None:
            check_out(out)
        if target == "trt" and not check_only:
            from sts_export.export.tensorrt.build import require_tensorrt
            from sts_export.export.tensorrt.engines import build_version

            require_tensorrt()  # fail in one line before a long ONNX export
            build_version(trt_version)  # and on a --trt-version the installed TensorRT cannot build for
        path = export(model, budget=budget, method=method, out=out, recipe=recipe, dtype=dtype, anchor=anchor,
                      random_weights=random_weights, opset=opset, validate=not no_validate, force=force,
                      weights=weights, block_size=block, quantize_vision=quantize_vision, target=target,
                      max_pixels=max_pixels, reuse=not no_reuse)
        if target == "trt":
            from sts_export.export.tensorrt.engines import build_engines

            if check_only:
                _check_and_exit(path, versions or [default_version()])
            build_engines(path, precision=dtype, max_batch=max_batch, opt_level=opt_level, workspace_gb=workspace_gb,
                          trt_version=trt_version)


def _check_and_exit(onnx_dir: Path, versions: list[str]) -> None:
    """The static check for each version: its report, then one verdict line per version; exit 1 when any fails."""
    from sts_export.export.tensorrt.engines import check_versions

    results = check_versions(onnx_dir, versions)
    for v, _, report in results:
        if len(results) > 1:
            click.echo(f"== TensorRT {v} ==")
        click.echo(report)
    for v, ok, _ in results:
        click.echo(f"TensorRT {v} compatibility: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if all(ok for _, ok, _ in results) else 1)


if __name__ == "__main__":
    main()
