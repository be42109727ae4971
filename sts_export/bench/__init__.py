"""Benchmarks: timing of the generation loop per phase, analytic cost model and roofline, reports."""
from __future__ import annotations

from sts_export.bench.runner import DEFAULT_PROMPT, ROW_KEYS, STAT_KEYS, BenchOptions, format_table, run_bench, write_json, write_plot

__all__ = ["DEFAULT_PROMPT", "ROW_KEYS", "STAT_KEYS", "BenchOptions", "format_table", "run_bench", "write_json", "write_plot"]
