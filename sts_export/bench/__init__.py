"""Benchmarks: timing of the generation loop per phase, analytic cost model and roofline, reports.

    timing   measuring: repeat and per-graph-call timing, statistics, peak memory, system info
    report   output: the table, the JSON file (schema) and the plot of a result
    runner   options, configurations, exports, pipelines, the Stage 1 probe, run_bench
    cost     the analytic FLOPs/bytes/KV model and the roofline
"""
from __future__ import annotations

from sts_export.bench.report import ROW_KEYS, format_table, write_json, write_plot
from sts_export.bench.runner import DEFAULT_PROMPT, BenchOptions, run_bench
from sts_export.bench.timing import STAT_KEYS

__all__ = ["DEFAULT_PROMPT", "ROW_KEYS", "STAT_KEYS", "BenchOptions", "format_table", "run_bench", "write_json", "write_plot"]
