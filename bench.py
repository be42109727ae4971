#!/usr/bin/env python
"""Benchmark pruned vs full models: per-phase latency, memory, analytic FLOPs/bytes and roofline.

    python bench.py --model llava-1.5-7b --random-weights --budgets full,128,64,32 \
        --methods sts,sts-s,fastv,divprune --backends torch,ort,trt --json bench.json --plot bench.png
    python bench.py --model llava-1.5-7b-cpu --budgets full,64 --methods sts --backends ort --warmup 2 --repeats 7
    python bench.py --model llava-1.5-7b --cost-only --device jetson-agx-orin-64gb --dtype fp16

The logic lives in the sts_export.bench package (runner, timing, report, cost); this is the command line.
"""
from __future__ import annotations

import sys

import click

from sts_export.errors import cli_errors


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", "--models", "models", required=True,
              help="Comma-separated models: recipe names (e.g. llava-1.5-7b, llava-1.5-7b-cpu, tiny-llava), local "
                   "checkpoint dirs or cached HF ids.")
@click.option("--budgets", default="full,128,64,32", show_default=True,
              help="Comma-separated budgets (average visual tokens per decoder layer) or 'full'.")
@click.option("--methods", default="sts", show_default=True, help="Comma-separated: sts, sts-s, divprune, cls, fastv.")
@click.option("--backends", default="torch", show_default=True,
              help="Comma-separated: torch (eager), torch-compile, ort (ONNX Runtime), trt (TensorRT), aoti "
                   "(AOTInductor packages, compiled here once and reused); peers, on the "
                   "same weights and inputs: transformers (the family's own class, sdpa), ort-genai (onnxruntime-genai's "
                   "model builder on the text decoder: decoder only). A backend that cannot run here is skipped with "
                   "a note.")
@click.option("--repeats", default=5, show_default=True, type=int, help="Timed runs per configuration.")
@click.option("--warmup", default=1, show_default=True, type=int, help="Untimed runs first.")
@click.option("--max-new-tokens", default=8, show_default=True, type=int,
              help="Tokens generated per run (decode ms/token averages the steps after the first token).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--accelerator", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the model runs (auto: CUDA when torch sees a GPU).")
@click.option("--device", default=None,
              help="Roofline profile from sts_export/data/devices.yaml (e.g. jetson-agx-orin-64gb, h100-sxm), or "
                   "'host': this machine, its read bandwidth and fp32 GEMM rate measured at the start of the run "
                   "(every row then gets measured/bound).")
@click.option("--devices-file", default=None, type=click.Path(dir_okay=False),
              help="Another device-profile YAML (same keys as devices.yaml).")
@click.option("--on-device", is_flag=True,
              help="The --device profile is the machine running this (report measured/bound even when the GPU "
                   "is not recognised automatically).")
@click.option("--random-weights", is_flag=True,
              help="Seeded random weights with the recipe's full-size shapes (no checkpoint needed).")
@click.option("--prompt", default=None, help="Question (the recipe's template is applied).")
@click.option("--text-tokens", default=None, type=int,
              help="Use a fixed pseudo-prompt of N text tokens instead of tokenizing --prompt (default when the "
                   "model has no tokenizer: 36, a typical LLaVA-1.5 VQA prompt).")
@click.option("--image", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Image file (default: a deterministic synthetic image).")
@click.option("--exports", default=None, type=click.Path(file_okay=False),
              help="Directory where ONNX/TensorRT exports are looked up and created (default: the sts-export "
                   "cache; ./exports is searched too).")
@click.option("--interleave/--sequential", default=None,
              help="Interleave: load every configuration of a backend, run warm-ups and repeats round-robin, so "
                   "load changes on the machine hit all alike. Sequential: one configuration at a time. "
                   "Default: interleave when all their weights fit in half the free memory.")
@click.option("--threads", default=None, type=int,
              help="Intra-op threads for torch and ONNX Runtime (default: theirs, one per core).")
@click.option("--no-stage1-probe", is_flag=True, help="Do not time Stage 1 on its own.")
@click.option("--keep-eos", is_flag=True,
              help="Stop decoding at EOS (default: EOS is masked so every run decodes --max-new-tokens tokens).")
@click.option("--weights", "weights", default=None,
              help="Comma-separated weights per configuration: the --dtype (float), int8, int4 (weight-only; ort/trt "
                   "exports, MatMulNBits / DequantizeLinear), e.g. fp32,int4 [the --dtype].")
@click.option("--block-size", type=click.Choice(["32", "128"]), default=None,
              help="Quantization block along K for --weights int8/int4 [128].")
@click.option("--ort-forms", default=None,
              help="Comma-separated ONNX Runtime decoder forms per ort configuration: auto (the export's ORT form, "
                   "in place, when it has one), ort, ort-concat (the ORT form, cache concatenated each step), "
                   "portable (the TensorRT-portable graphs) [auto].")
@click.option("--cost-only", is_flag=True, help="Analytic FLOPs/bytes/KV/roofline only: no weights, no timing.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write results as JSON.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG: latency vs budget per method, measured speedup vs FLOP ratio.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def main(models: str, budgets: str, methods: str, backends: str, repeats: int, warmup: int, max_new_tokens: int,
         dtype: str, accelerator: str, device: str | None, devices_file: str | None, on_device: bool,
         random_weights: bool, prompt: str | None, text_tokens: int | None, image: str | None, exports: str | None,
         interleave: bool | None, threads: int | None, no_stage1_probe: bool, keep_eos: bool, weights: str | None,
         block_size: str | None, ort_forms: str | None, cost_only: bool, json_path: str | None, plot_path: str | None,
         quiet: bool) -> None:
    """Time vision (+ Stage 1), prefill, TTFT and decode per budget, method and backend; report KV cache bytes,
    peak memory, analytic FLOPs and the roofline."""
    with cli_errors():
        from sts_export.bench import DEFAULT_PROMPT, BenchOptions, format_table, run_bench, write_json, write_plot

        opts = BenchOptions(
            models=_split(models), budgets=_split(budgets), methods=_split(methods), backends=_split(backends),
            repeats=repeats, warmup=warmup, max_new_tokens=max_new_tokens, dtype=dtype, accelerator=accelerator,
            device=device, devices_file=devices_file, on_device=on_device, random_weights=random_weights,
            prompt=prompt or DEFAULT_PROMPT, text_tokens=text_tokens, image=image, exports=exports,
            stage1_probe=not no_stage1_probe, interleave=interleave, threads=threads, ignore_eos=not keep_eos, cost_only=cost_only,
            weights=_split(weights) if weights else [], block_size=int(block_size) if block_size else None,
            ort_forms=_split(ort_forms) if ort_forms else [],
            progress=(lambda s: None) if quiet else (lambda s: click.echo(s, err=True)),
        )
        result = run_bench(opts)
        click.echo(format_table(result))
        if json_path:
            write_json(result, json_path)
            click.echo(f"wrote {json_path}", err=True)
        if plot_path:
            write_plot(result, plot_path)
            click.echo(f"wrote {plot_path}", err=True)
        if result["failures"]:
            sys.exit(1)  # a backend failed (see the notes); the other rows are still reported


if __name__ == "__main__":
    main()
