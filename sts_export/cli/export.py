"""`sts export` (also `python export.py`): a model's graphs with STS pruning inside, to ONNX (validated with ONNX
Runtime), TensorRT engines or AOTInductor packages.

    sts export --model tiny-llava --budget 64                    # ONNX, validated with ONNX Runtime
    sts export --model llava-1.5-7b --budget 64 --target trt     # ONNX + engines (needs TensorRT)
    sts export --onnx-dir exports/x --target trt [--check-only]  # Jetson: engines from copied ONNX
    sts export --model tiny-llava --budget 64 --target aoti [--aoti-device cuda]   # AOTInductor packages
"""
from __future__ import annotations

from pathlib import Path

import click

from sts_export.cli.options import (CONTEXT, ENVIRONMENT, OUT_DIR, TRT_VERSION, model_options, precision_options,
                                    pruning_options)
from sts_export.cli.tools import check_and_exit


@click.command("export", context_settings=CONTEXT, epilog=ENVIRONMENT)
@model_options
@pruning_options
@precision_options
@click.option("--target", type=click.Choice(["onnx", "ort", "trt", "aoti"]), default="onnx", show_default=True,
              help="onnx (= ort): ONNX graphs with their ONNX Runtime form; trt: + TensorRT engines; aoti: "
                   "AOTInductor packages (<graph>.pt2) built for this machine.")
@OUT_DIR
@click.option("--opset", default=None, type=int, help="ONNX opset, 18..25 [18; 22 for bf16; 21 for int4, and for TensorRT's int8/int4 form].")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs torch validation.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@click.option("--no-reuse", is_flag=True,
              help="Export every graph anew, even those a sibling export in the same parent directory already holds "
                   "with the same build key (same weights, recipe, layers, configuration, dtype, opset and tool).")
@click.option("--onnx-dir", type=click.Path(path_type=Path), default=None,
              help="Build engines from an existing ONNX export (tensorrt + numpy only).")
@click.option("--check-only", is_flag=True, help="With --target trt: only run the static TensorRT compatibility check.")
@TRT_VERSION
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
              help="Engine precision; engines are strongly typed, so it must equal the ONNX dtype (exports: sets --dtype).")
@click.option("--max-batch", default=1, show_default=True, type=click.IntRange(1, 256), help="Largest batch the engines accept.")
@click.option("--opt-level", default=3, show_default=True, type=click.IntRange(0, 5), help="TensorRT builder optimisation level.")
@click.option("--workspace-gb", default=None, type=float, help="TensorRT workspace limit (GiB); small on Jetson.")
@click.option("--aoti-device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="With --target aoti: the device the packages are compiled for, on this machine [cpu].")
@click.option("--aoti-cache", type=click.Path(path_type=Path), default=None,
              help="With --target aoti: reuse packages compiled before for the same graph (embed and segments are "
                   "shared by methods and budgets) from this directory, and add new ones to it.")
def main(model: str | None, recipe: str | None, random_weights: bool, max_pixels: int | None, method: str, budget: str,
         anchor: str | None, dtype: str | None, weights: str | None, block_size: str | None, quantize_vision: bool,
         accuracy_level: int | None,
         target: str, out: Path | None, opset: int | None, no_validate: bool, force: bool, no_reuse: bool,
         onnx_dir: Path | None, check_only: bool, trt_version: str | None, precision: str | None, max_batch: int,
         opt_level: int, workspace_gb: float | None, aoti_device: str | None, aoti_cache: Path | None) -> None:
    """Export a model's graphs with STS pruning inside (ONNX, TensorRT engines or AOTInductor packages)."""
    from sts_export.errors import StsError, cli_errors

    target = "onnx" if target == "ort" else target
    with cli_errors("interrupted: nothing was left in the output directory"):
        if target == "aoti" or aoti_device is not None or aoti_cache is not None:
            given = {"--onnx-dir": onnx_dir, "--check-only": check_only or None, "--trt-version": trt_version,
                     "--precision": precision, "--opset": opset, "--weights": weights, "--block-size": block_size,
                     "--quantize-vision": quantize_vision or None, "--workspace-gb": workspace_gb,
                     "--no-reuse": no_reuse or None, "--accuracy-level": accuracy_level}
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
        from sts_export.export.tensorrt.check import parse_versions
        from sts_export.export.weights import check_weights, refuse_ort_weights, required_opset

        block = int(block_size) if block_size is not None else None
        if onnx_dir is None:  # before the version parser: an old TensorRT gets the weights' own reason
            scheme = check_weights(weights, block, quantize_vision, target=target, trt_versions=trt_version,
                                   dtype=dtype or precision or ("fp16" if target == "trt" else "fp32"),
                                   accuracy_level=accuracy_level)
        elif weights is not None or block is not None or quantize_vision or accuracy_level is not None:
            raise StsError("--weights/--block-size/--quantize-vision apply to an export; --onnx-dir builds engines "
                           "from the weights its export already holds")
        if trt_version is not None:
            parse_versions(trt_version)  # one line before any work
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
                check_and_exit([onnx_dir], trt_version)
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
            from sts_export.backends.tensorrt.discovery import require_tensorrt
            from sts_export.export.tensorrt.engines import build_version

            require_tensorrt()  # fail in one line before a long ONNX export
            build_version(trt_version)  # and on a --trt-version the installed TensorRT cannot build for
        path = export(model, budget=budget, method=method, out=out, recipe=recipe, dtype=dtype, anchor=anchor,
                      random_weights=random_weights, opset=opset, validate=not no_validate, force=force,
                      weights=weights, block_size=block, quantize_vision=quantize_vision, target=target,
                      max_pixels=max_pixels, reuse=not no_reuse, accuracy_level=accuracy_level)
        if target == "trt":
            from sts_export.export.tensorrt.engines import build_engines

            if check_only:
                check_and_exit([path], trt_version)
            build_engines(path, precision=dtype, max_batch=max_batch, opt_level=opt_level, workspace_gb=workspace_gb,
                          trt_version=trt_version)
