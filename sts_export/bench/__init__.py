"""Benchmarks: timing of the generation loop per phase, analytic cost model and roofline, reports.

    options  what a run measures: BenchOptions, backend names, configurations, inputs
    cost     the analytic FLOPs/bytes/KV model
    devices  roofline profiles (data/devices.yaml, or this machine measured) and the roofline bound
    timing   measuring: repeat and per-graph-call timing, statistics, peak memory, system info
    exports  the exports measured (found or made) and the pipelines opened on them
    probe    Stage 1 timed on its own
    rows     a result's rows: cost fields, cost-only rows, ratios to the full budget
    peers    the frameworks users would otherwise run: transformers, onnxruntime-genai
    runner   one loaded configuration (Runner), measure_backend, run_bench
    report   output: the table, the JSON file (schema) and the plot of a result
"""
from __future__ import annotations

from sts_export.bench.report import ROW_KEYS, format_table, write_json, write_plot
from sts_export.bench.options import DEFAULT_PROMPT, BenchOptions
from sts_export.bench.runner import run_bench
from sts_export.bench.timing import STAT_KEYS

__all__ = ["DEFAULT_PROMPT", "ROW_KEYS", "STAT_KEYS", "BenchOptions", "format_table", "run_bench", "write_json", "write_plot"]
