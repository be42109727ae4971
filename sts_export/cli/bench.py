"""`sts bench` (also `python bench.py`): time pruned vs full models per phase, beside the frameworks users would
otherwise run, with the analytic cost model and the roofline.

    sts bench --model llava-1.5-7b-cpu --random-weights --budgets full,64 --methods sts --backends transformers,ort-genai,ort
    sts bench --model llava-1.5-7b --cost-only --dtype fp16 --roofline jetson-agx-orin-64gb     # no weights

The logic lives in the sts_export.bench package (options, exports, probe, rows, runner, report, cost).
"""
from __future__ import annotations

import sys

import click

from sts_export.cli.options import (ACCURACY_LEVEL, BLOCK_SIZE, CONTEXT, DEVICE, DTYPE, ENVIRONMENT, MAX_NEW_TOKENS_OPTION, MODEL, PROMPT,
                                    RANDOM_WEIGHTS, THREADS, WEIGHTS, image_option, split_list)
from sts_export.errors import StsError, cli_errors


@click.command("bench", context_settings=CONTEXT, epilog=ENVIRONMENT)
@MODEL
@RANDOM_WEIGHTS
@DTYPE
@WEIGHTS
@BLOCK_SIZE
@ACCURACY_LEVEL
@image_option()
@PROMPT
@MAX_NEW_TOKENS_OPTION
@DEVICE
@THREADS
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
@click.option("--roofline", default=None,
              help="Roofline profile from sts_export/bench/data/devices.yaml (e.g. jetson-agx-orin-64gb, h100-sxm), or "
                   "'host': this machine, its read bandwidth and fp32 GEMM rate measured at the start of the run "
                   "(every row then gets measured/bound).")
@click.option("--roofline-file", default=None, type=click.Path(dir_okay=False),
              help="Another roofline-profile YAML (same keys as devices.yaml).")
@click.option("--on-device", is_flag=True,
              help="The --roofline profile is the machine running this (report measured/bound even when the GPU "
                   "is not recognised automatically).")
@click.option("--text-tokens", default=None, type=int,
              help="Use a fixed pseudo-prompt of N text tokens instead of tokenizing --prompt (default when the "
                   "model has no tokenizer: 36, a typical LLaVA-1.5 VQA prompt).")
@click.option("--exports", default=None, type=click.Path(file_okay=False),
              help="Directory where ONNX/TensorRT exports are looked up and created (default: the sts-export "
                   "cache; ./exports is searched too).")
@click.option("--interleave/--sequential", default=None,
              help="Interleave: load every configuration of a backend, run warm-ups and repeats round-robin, so "
                   "load changes on the machine hit all alike. Sequential: one configuration at a time. "
                   "Default: interleave when all their weights fit in half the free memory.")
@click.option("--no-stage1-probe", is_flag=True, help="Do not time Stage 1 on its own.")
@click.option("--keep-eos", is_flag=True,
              help="Stop decoding at EOS (default: EOS is masked so every run decodes --max-new-tokens tokens).")
@click.option("--ort-forms", default=None,
              help="Comma-separated ONNX Runtime decoder forms per ort configuration: auto (the export's ORT form, "
                   "in place, when it has one), ort, ort-concat (the ORT form, cache concatenated each step), "
                   "portable (the TensorRT-portable graphs) [auto].")
@click.option("--cost-only", is_flag=True, help="Analytic FLOPs/bytes/KV/roofline only: no weights, no timing.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write results as JSON.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG: latency vs budget per method, measured speedup vs FLOP ratio.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def main(model: str | None, random_weights: bool, dtype: str | None, weights: str | None, block_size: str | None,
         accuracy_level: int | None,
         image: str | None, prompt: str | None, max_new_tokens: int, device: str, threads: int | None, budgets: str,
         methods: str, backends: str, repeats: int, warmup: int, roofline: str | None, roofline_file: str | None,
         on_device: bool, text_tokens: int | None, exports: str | None, interleave: bool | None, no_stage1_probe: bool,
         keep_eos: bool, ort_forms: str | None, cost_only: bool, json_path: str | None, plot_path: str | None,
         quiet: bool) -> None:
    """Time vision (+ Stage 1), prefill, TTFT and decode per budget, method and backend; report KV cache bytes,
    peak memory, analytic FLOPs and the roofline."""
    with cli_errors():
        from sts_export.bench import DEFAULT_PROMPT, BenchOptions, format_table, run_bench, write_json, write_plot

        if not model:
            raise StsError("pass --model (a recipe name, a checkpoint directory or a cached HF id; several: a,b)")
        opts = BenchOptions(
            models=split_list(model), budgets=split_list(budgets), methods=split_list(methods),
            backends=split_list(backends), repeats=repeats, warmup=warmup, max_new_tokens=max_new_tokens,
            dtype=dtype or "fp32", device=device, roofline=roofline, roofline_file=roofline_file,
            on_device=on_device, random_weights=random_weights,
            prompt=prompt or DEFAULT_PROMPT, text_tokens=text_tokens, image=image, exports=exports,
            stage1_probe=not no_stage1_probe, interleave=interleave, threads=threads, ignore_eos=not keep_eos, cost_only=cost_only,
            weights=split_list(weights), block_size=int(block_size) if block_size else None,
            accuracy_level=accuracy_level,
            ort_forms=split_list(ort_forms),
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


