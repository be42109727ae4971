#!/usr/bin/env python
"""Export a LLaVA-family model with STS pruning inside the graphs: ONNX, then optionally TensorRT engines.

    python export.py --model tiny-llava --budget 64                 # ONNX, validated with ONNX Runtime
    python export.py --model llava-1.5-7b --budget 64 --target trt  # ONNX + engines (needs TensorRT)
    python export.py --onnx-dir exports/x --target trt [--check-only]  # Jetson: engines from copied ONNX
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
@click.option("--target", type=click.Choice(["onnx", "trt"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output directory [exports/<model>-<method>-b<budget>].")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default=None, help="ONNX dtype [fp32 for onnx, fp16 for trt].")
@click.option("--random-weights", is_flag=True, help="Full-size architecture with seeded random weights (no download).")
@click.option("--opset", default=18, show_default=True, type=int)
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs torch validation.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@click.option("--onnx-dir", type=click.Path(path_type=Path), default=None, help="Build engines from an existing ONNX export (tensorrt + numpy only).")
@click.option("--check-only", is_flag=True, help="With --target trt: only run the static TensorRT compatibility check.")
@click.option("--trt-version", default="10.3", show_default=True, help="TensorRT version the check targets.")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
              help="Engine precision [the ONNX dtype]; bf16 builds from an fp32 ONNX with the selection pinned to fp32.")
@click.option("--max-batch", default=1, show_default=True, type=click.IntRange(1, 256), help="Largest batch the engines accept.")
@click.option("--opt-level", default=3, show_default=True, type=click.IntRange(0, 5), help="TensorRT builder optimisation level.")
@click.option("--workspace-gb", default=None, type=float, help="TensorRT workspace limit (GiB); small on Jetson.")
def main(model: str | None, recipe: str | None, budget: str, method: str, anchor: str | None, target: str,
         out: Path | None, dtype: str | None, random_weights: bool, opset: int, no_validate: bool, force: bool,
         onnx_dir: Path | None, check_only: bool, trt_version: str, precision: str | None, max_batch: int, opt_level: int,
         workspace_gb: float | None) -> None:
    """Export graphs with STS pruning inside (see README)."""
    from sts_export.errors import StsError, cli_errors

    with cli_errors("interrupted: nothing was left in the output directory"):
        if onnx_dir is not None:
            if target != "trt":
                raise StsError("--onnx-dir builds engines: use it with --target trt")
            from sts_export.backends.tensorrt.engines import build_engines, check

            if check_only:
                ok, report = check(onnx_dir, trt_version)
                click.echo(report)
                click.echo(f"TensorRT {trt_version} compatibility: {'PASS' if ok else 'FAIL'}")
                sys.exit(0 if ok else 1)
            build_engines(onnx_dir, precision=precision, max_batch=max_batch, opt_level=opt_level, workspace_gb=workspace_gb, trt_version=trt_version)
            click.echo(f"engines written to {onnx_dir}")
            return
        if not model:
            raise StsError("pass --model (a recipe name, a checkpoint directory or a cached HF id), or --onnx-dir")
        if target == "trt" and not check_only:
            from sts_export.backends.tensorrt.build import require_tensorrt

            require_tensorrt()  # fail in one line before a long ONNX export
        from sts_export.export.onnx import export

        path = export(model, budget=budget, method=method, out=out, recipe=recipe,
                      dtype=dtype or ("fp16" if target == "trt" and precision in (None, "fp16") else "fp32"), anchor=anchor,
                      random_weights=random_weights, opset=opset, validate=not no_validate, force=force)
        if target == "trt":
            from sts_export.backends.tensorrt.engines import build_engines, check

            if check_only:
                ok, report = check(path, trt_version)
                click.echo(report)
                sys.exit(0 if ok else 1)
            build_engines(path, precision=precision, max_batch=max_batch, opt_level=opt_level, workspace_gb=workspace_gb, trt_version=trt_version)


if __name__ == "__main__":
    main()
