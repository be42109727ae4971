"""bench.py: the JSON schema, the table and the plot, through the CLI (the benchmark's numbers are not tested)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench as bench_cli  # noqa: E402  (the CLI at the repo root)
from sts_export.bench import ROW_KEYS, STAT_KEYS  # noqa: E402
from sts_export.bench.cost import kv_cache_bytes, phase_costs  # noqa: E402
from sts_export.recipe import load_recipe  # noqa: E402

SYSTEM_KEYS = {"platform", "python", "cpu_model", "cpu_cores_logical", "memory_bytes", "gpus", "versions",
               "torch_threads", "load_average_start", "load_average_end"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _number_or_none(v: object) -> bool:
    return v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_schema(result: dict) -> None:
    """What every bench JSON holds, measured or analytic."""
    assert result["schema_version"] == 1
    assert SYSTEM_KEYS <= set(result["system"]), SYSTEM_KEYS - set(result["system"])
    assert {"torch", "onnxruntime", "numpy", "sts_export"} <= set(result["system"]["versions"])
    assert isinstance(result["rows"], list) and result["rows"]
    assert isinstance(result["notes"], list) and isinstance(result["skipped"], list)
    for row in result["rows"]:
        missing = set(ROW_KEYS) - set(row)
        assert not missing, f"row lacks {sorted(missing)}"
        assert isinstance(row["model"], str) and isinstance(row["backend"], str)
        assert row["budget"] == "full" or isinstance(row["budget"], int)
        for k in ("k_pre", "k_post", "seq_len_stage1", "seq_len_stage2", "kv_cache_bytes", "text_tokens"):
            assert isinstance(row[k], int) and row[k] > 0, k
        # sequence arithmetic of DESIGN.md: S1 = T + K, S2 = S1 - K + K'
        assert row["seq_len_stage1"] == row["text_tokens"] + row["k_pre"]
        assert row["seq_len_stage2"] == row["seq_len_stage1"] - row["k_pre"] + row["k_post"]
        for k in ROW_KEYS:
            if k.endswith(("_ms_median", "_ms_iqr", "_bytes", "_share_ttft")) or k.startswith(("flops_", "bytes_",
                                                                                                    "speedup", "flop_ratio")):
                assert _number_or_none(row[k]), (k, row[k])
        assert row["flops_prefill"] > 0 and row["flops_vision"] > 0


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """One tiny timed run through the CLI in a fresh process: torch + ONNX Runtime in three decoder forms (+ trt,
    skipped without it), with the roofline of this machine as measured by the run (--device host)."""
    tmp = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "STS_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "bench.py"), "--models", "tiny-llava", "--budgets", "full,64", "--methods", "sts",
           "--backends", "torch,ort,trt", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--max-new-tokens", "3",
           "--ort-forms", "auto,ort-concat,portable", "--roofline", "host",
           "--json", str(tmp / "out.json"), "--plot", str(tmp / "out.png")]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((tmp / "out.json").read_text()), tmp


def test_timed_run_json_schema(timed_run) -> None:
    proc, result, tmp = timed_run
    check_schema(result)
    rows = result["rows"]
    assert [(r["backend"], r["method"], r["budget"], r.get("graph_form")) for r in rows] == [
        ("torch", "none", "full", None), ("torch", "sts", 64, None),
        *[("ort", m, b, f) for f in ("ort/in-place", "ort/concat", "portable/concat") for m, b in (("none", "full"),
                                                                                                   ("sts", 64))]]
    host = result["system"]["host_profile"]  # --device host: measured by this run
    assert host["name"] == "host" and host["bandwidth_gbs"] > 0.1 and host["fp32_tflops"] > 1e-3
    assert host["memory_gb"] == pytest.approx(result["system"]["memory_bytes"] / 1e9)
    recipe = load_recipe("tiny-llava")
    for r in rows:
        assert (r["k_pre"], r["k_post"]) == ((576, 576) if r["budget"] == "full" else (96, 32))
        # KV bytes read off the cache shapes == the analytic formula at the run's S1/S2 (fp32)
        assert r["kv_cache_bytes"] == kv_cache_bytes(recipe, r["seq_len_stage1"], r["seq_len_stage2"], 4,
                                                     prune_layer=r["prune_layer"])
        cost = phase_costs(recipe, r["budget"], r["method"], dtype="fp32", prompt_tokens=r["text_tokens"])
        assert r["flops_prefill"] == pytest.approx(cost["prefill"].flops)
        for ph in ("vision", "prefill", "ttft", "decode"):
            assert r[f"{ph}_ms_median"] > 0 and r[f"{ph}_ms_iqr"] == 0.0  # one repeat: no spread
            assert set(STAT_KEYS) <= {k.split("_ms_")[1] for k in r if k.startswith(f"{ph}_ms_")}
            assert len(r["samples_ms"][ph]) == 1
        assert r["ttft_ms_median"] == pytest.approx(r["vision_ms_median"] + r["prefill_ms_median"], rel=1e-6)
        assert r["peak_mem_bytes"] > 0 and r["peak_mem_bytes"] == r["peak_rss_bytes"]  # CPU: host RSS
        assert r["decode_steps"] == 2  # EOS masked: every run decodes max_new_tokens
        assert {"vision", "segment1_prefill", "segment2_prefill", "segment1_decode"} <= set(r["graph_ms_median"])
        # the bound of this machine: a lower bound, so every measured phase takes longer than it
        assert r["roofline_device"] == "host" and r["decode_roofline_ms"] > 0
        assert r["decode_measured_over_bound"] > 1 and r["ttft_measured_over_bound"] > 1
        if r["budget"] == "full":  # each form's own full row is its base
            assert r["speedup_ttft"] == pytest.approx(1.0) and r["flop_ratio_ttft"] == pytest.approx(1.0)
            assert r["stage1_ms_median"] is None and r["keep_post_shape"] is None
        else:
            assert r["flop_ratio_ttft"] > 1 and r["speedup_ttft"] > 0
            assert 0 < r["stage1_share_ttft"] < 1 and r["stage1_ms_median"] > 0
            assert r["keep_pre_shape"] == [1, 96] and r["keep_post_shape"] == [1, 32] and "prune_prefill" in r["graph_ms_median"]
    # trt: skipped with a note when TensorRT (or an engine export) is missing, never an error
    assert any("trt" in n for n in result["notes"])
    assert {"cpu_model", "versions"} <= set(result["system"])


def test_timed_run_table_and_plot(timed_run) -> None:
    proc, result, tmp = timed_run
    out = proc.stdout
    assert "TTFT ms" in out and "FLOP x" in out and "tiny-llava" in out
    assert "ort/concat" in out and "portable/concat" in out and "dec meas/bound" in out
    assert "TTFT speedup" in out and "Stage 1" in out  # the summary line per pruned row
    assert "note:" in out and "trt" in out
    # where TTFT goes: one line per row, its parts (graph medians + the host's rest) adding up to the row's TTFT
    from sts_export.bench.report import format_ttft_parts, ttft_parts

    assert "where TTFT goes" in out
    for r in result["rows"]:
        parts = dict(ttft_parts(r))
        assert format_ttft_parts(r) in out
        assert sum(parts.values()) == pytest.approx(r["ttft_ms_median"])
        assert parts["vision"] == pytest.approx(r["graph_ms_median"]["vision"]) and parts["host"] >= 0
        assert ("Stage 2" in parts) == (r["budget"] != "full") and parts["segment1"] > 0 and parts["segment2"] > 0
    assert (tmp / "out.png").read_bytes()[:8] == PNG_MAGIC
    # the ORT export went to the cache (STS_CACHE), not into the working directory
    assert not (tmp / "exports").exists() and any((tmp / "cache" / "bench-exports").iterdir())


def test_cost_only(tmp_path: Path) -> None:
    """No weights, no timing: analytic rows for the real 7B, with the roofline for a chosen device."""
    js, png = tmp_path / "c.json", tmp_path / "c.png"
    res = CliRunner().invoke(bench_cli.main, ["--model", "llava-1.5-7b", "--cost-only", "--budgets", "full,128,64,32",
                                              "--methods", "sts,fastv", "--dtype", "fp16", "--roofline",
                                              "jetson-agx-orin-64gb", "--json", str(js), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    result = json.loads(js.read_text())
    check_schema(result)
    rows = {(r["method"], r["budget"]): r for r in result["rows"]}
    assert set(rows) == {("none", "full"), ("sts", 128), ("sts", 64), ("sts", 32), ("fastv", 128), ("fastv", 64)}
    r = rows[("sts", 64)]
    assert (r["k_pre"], r["k_post"], r["seq_len_stage1"], r["seq_len_stage2"]) == (96, 32, 132, 68)  # 36 text tokens
    assert r["kv_cache_bytes"] == 16 * 2 * 4096 * 2 * (132 + 68)  # MHA fp16: 16 layers at S1, 16 at S2
    assert r["backend"] == "analytic" and r["ttft_ms_median"] is None and r["peak_mem_bytes"] is None
    assert r["prefill_roofline_ms"] > 0 and r["prefill_bound"] in ("compute", "memory")
    assert rows[("none", "full")]["flop_ratio_ttft"] == pytest.approx(1.0) and r["flop_ratio_ttft"] > 4
    assert any("fastv b=32" in n for n in result["notes"])  # out of range for fastv: skipped, named
    assert "llava-1.5-7b" in res.output and png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("args, message", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--backends", "cuda-magic"], "unknown backend"),
    (["--budgets", "0"], "budget must be a positive integer"),
    (["--roofline", "h900"], "unknown device 'h900'"),
    (["--ort-forms", "fast"], "unknown --ort-forms fast"),
])
def test_errors_are_one_line(args: list[str], message: str) -> None:
    res = CliRunner().invoke(bench_cli.main, ["--model", "llava-1.5-7b", "--cost-only", *args])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("error: ")


def test_synthetic_cpu_recipe_keeps_7b_layout() -> None:
    """llava-1.5-7b-cpu: the 7B's layer/head/token layout at CPU widths, so K, K', S1, S2 per budget are the 7B's."""
    from sts_export import split_budget

    cpu, big = load_recipe("llava-1.5-7b-cpu"), load_recipe("llava-1.5-7b")
    assert cpu.synthetic and not big.synthetic
    for attr in ("num_layers", "num_heads", "num_kv_heads", "vocab_size"):
        assert getattr(cpu.text, attr) == getattr(big.text, attr)
    assert cpu.text.head_dim == 16 and cpu.vision.layers_used == big.vision.layers_used == 23
    assert cpu.num_image_tokens == 576 and cpu.prompt_template == big.prompt_template
    assert cpu.pruning == big.pruning
    for b in ("full", 128, 64, 32):
        assert split_budget(b, cpu) == split_budget(b, big)


def test_interleaved_generations_times_every_pipeline_every_round() -> None:
    """The scripts' A/B loop: one row of phase timings per round per pipeline, and each pipeline's greedy tokens."""
    from sts_export import Pipeline
    from sts_export.bench.options import PHASES
    from sts_export.bench.runner import interleaved_generations

    pipes = {"full": Pipeline.from_pretrained("tiny-llava"),
             "sts": Pipeline.from_pretrained("tiny-llava", budget=64, method="sts")}
    times, tokens = interleaved_generations(pipes, rounds=2, new_tokens=3, warmup_tokens=1)
    assert set(times) == set(tokens) == set(pipes)
    for label, t in times.items():
        assert t.shape == (2, len(PHASES)) and (t > 0).all()
        assert tokens[label].shape == (1, 3)
