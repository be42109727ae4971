"""Analytic cost model and roofline: no weights, pure arithmetic on the recipes."""
from __future__ import annotations

import json

import pytest

from sts_export.bench.cost import (
    DEFAULT_TEXT_TOKENS,
    STS_LOOP_OPS,
    PhaseCost,
    cost_summary,
    kv_cache_bytes,
    phase_costs,
    sequence_lengths,
)
from sts_export.bench.devices import Device, get_device, load_devices, roofline, roofline_terms
from sts_export.errors import StsError
from sts_export.recipe import load_recipe

# LLaVA-1.5-7B paper settings (DESIGN.md): budget -> (K, K')
SPLITS_7B = {"full": (576, 576), 128: (192, 64), 64: (96, 32), 32: (48, 16)}


@pytest.fixture(scope="module")
def r7b():
    return load_recipe("llava-1.5-7b")


@pytest.mark.parametrize("budget", ["full", 128, 64, 32])
def test_kv_bytes_llava7b_fp16(r7b, budget) -> None:
    k, k2 = SPLITS_7B[budget]
    s1, s2 = DEFAULT_TEXT_TOKENS + k, DEFAULT_TEXT_TOKENS + k2
    seq = sequence_lengths(r7b, budget, "sts")
    assert (seq.k_pre, seq.k_post, seq.s1, seq.s2) == (k, k2, s1, s2)
    per_token = 32 * 2 * 4096 * 2  # layers x (K and V) x hidden x fp16 bytes, for MHA
    expected = per_token // 32 * (16 * s1 + 16 * s2)  # layers < 16 hold S1 entries, layers >= 16 hold S2
    assert kv_cache_bytes(r7b, s1, s2, 2) == expected
    assert phase_costs(r7b, budget, "sts")["prefill"].kv_bytes == expected  # prefill writes exactly the cache
    if budget == "full":
        assert expected == 612 * per_token  # 306 MiB for 612 tokens


def test_kv_bytes_grouped_heads_and_fastv(r7b) -> None:
    gqa = load_recipe("tiny-llava-gqa")  # 5 layers, 2 KV heads x head_dim 16, prune_layer 3
    assert kv_cache_bytes(gqa, 10, 4, 4) == 3 * 2 * 2 * 16 * 10 * 4 + 2 * 2 * 2 * 16 * 4 * 4
    seq = sequence_lengths(r7b, 64, "fastv")  # FastV prunes after layer 2
    assert seq.prune_layer == 2 and seq.k_pre == 576
    per_layer = 2 * 4096 * 2
    assert phase_costs(r7b, 64, "fastv")["prefill"].kv_bytes == per_layer * (2 * seq.s1 + 30 * seq.s2)


def test_decode_reads_cache_and_writes_one_entry(r7b) -> None:
    seq = sequence_lengths(r7b, 64, "sts")
    dec = phase_costs(r7b, 64, "sts", decode_context=10)["decode"]
    assert dec.kv_bytes == kv_cache_bytes(r7b, seq.s1 + 10, seq.s2 + 10, 2) + kv_cache_bytes(r7b, 1, 1, 2)


@pytest.mark.parametrize("method", ["sts", "sts-s", "divprune", "cls", "fastv"])
def test_flops_monotone_in_budget(r7b, method) -> None:
    budgets = [40, 64, 128, 192, 256]  # inside every method's valid range (FastV needs >= 37)
    runs = [phase_costs(r7b, b, method) for b in budgets] + [phase_costs(r7b, "full", method)]
    for phase in ("prefill", "decode"):
        values = [c[phase].flops for c in runs]
        assert values == sorted(values), (phase, values)
    prefill = [c["prefill"].flops for c in runs]
    assert all(a < b for a, b in zip(prefill, prefill[1:]))
    kv = [c["prefill"].kv_bytes for c in runs]
    assert kv == sorted(kv)
    if method == "sts":  # Stage 1 loop and projector grow with K
        vision = [c["vision"].flops for c in runs[:-1]]
        assert all(a < b for a, b in zip(vision, vision[1:]))


def test_prefill_full_7b_near_two_params_tokens(r7b) -> None:
    pre = phase_costs(r7b, "full", "none")["prefill"]
    tokens = 612
    assert sequence_lengths(r7b, "full", "none").s1 == tokens
    assert abs(pre.flops / (2 * 7e9 * tokens) - 1) < 0.15
    decoder_params = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # attention + SwiGLU matrices
    assert 1.0 < pre.flops / (2 * decoder_params * tokens) < 1.03  # + causal attention + one lm_head row


def _hand_prefill(s1: int, s2: int, k2: int | None) -> float:
    """Independent hand count for LLaVA-1.5-7B prefill (2 FLOPs/MAC, causal attention)."""
    h, inter, vocab = 4096, 11008, 32064

    def layer(s: int) -> float:
        return 2 * s * (4 * h * h + 3 * h * inter) + 4 * h * s * (s + 1) / 2

    total = 16 * layer(s1) + 16 * layer(s2) + 2 * h * vocab
    if k2 is not None:  # Stage 2: k_proj on S1 + q_proj on the last token + one score row per head
        total += 2 * s1 * h * h + 2 * h * h + 2 * h * s1
    return total


def test_sts64_to_full_flop_ratio_matches_hand_count(r7b) -> None:
    full = phase_costs(r7b, "full", "sts")["prefill"].flops
    sts = phase_costs(r7b, 64, "sts")["prefill"].flops
    hand = _hand_prefill(36 + 96, 36 + 32, 32) / _hand_prefill(612, 612, None)
    assert sts / full == pytest.approx(hand, rel=2e-3)
    assert 0.15 < sts / full < 0.18


def test_stage1_cost_counts_distance_matmul_and_loop(r7b) -> None:
    n, c = 576, 1024
    s64 = phase_costs(r7b, 64, "sts-s")["vision"]
    s128 = phase_costs(r7b, 128, "sts-s")["vision"]
    assert s64.detail["stage1"] > 2 * n * n * c  # the N x N x C distance matmul
    assert s128.detail["stage1"] - s64.detail["stage1"] == (128 - 64) * STS_LOOP_OPS * n
    assert s64.fp32_flops == s64.detail["stage1"]
    assert phase_costs(r7b, "full", "sts")["vision"].detail["stage1"] == 0  # full: Stage 1 off


def test_roofline_picks_the_max_bound() -> None:
    dev = Device("fake", "fake", fp16_tflops=100.0, fp32_tflops=10.0, bandwidth_gbs=1000.0, memory_gb=1, source="x")
    costs = {
        "compute": PhaseCost(flops=2e12, bytes=1e9),  # 20 ms compute vs 1 ms memory
        "memory": PhaseCost(flops=1e9, bytes=5e10),  # 0.01 ms compute vs 50 ms memory
        "fp32": PhaseCost(flops=1e12, bytes=1.0, fp32_flops=1e12),  # all at the fp32 peak: 100 ms
    }
    ms = roofline(costs, dev)
    assert ms["compute"] == pytest.approx(20.0)
    assert ms["memory"] == pytest.approx(50.0)
    assert ms["fp32"] == pytest.approx(100.0)
    terms = roofline_terms(costs, dev)
    assert terms["compute"]["bound"] == "compute" and terms["memory"]["bound"] == "memory"
    for t in terms.values():
        assert t["bound_ms"] == max(t["compute_ms"], t["memory_ms"])


def test_devices_yaml_loads_with_sources() -> None:
    devices = load_devices()
    for name in ("h100-sxm", "a100-sxm-80gb", "rtx-4090", "jetson-agx-orin-64gb", "jetson-orin-nano-8gb"):
        assert name in devices
    for dev in devices.values():
        assert dev.source.strip() and "http" in dev.source
        assert dev.fp16_tflops > dev.fp32_tflops > 0 and dev.bandwidth_gbs > 0 and dev.memory_gb > 0
    assert get_device("h100-sxm").fp16_tflops == pytest.approx(989.4)  # dense, not the sparse 1979


def test_unknown_device_names_valid_ones(r7b) -> None:
    with pytest.raises(StsError, match="h100-sxm.*jetson-orin-nano-8gb"):
        get_device("tpu-v5")
    with pytest.raises(StsError, match="unknown device 'tpu-v5'"):
        roofline(phase_costs(r7b, 64, "sts"), "tpu-v5")


def test_device_file_unknown_key_is_error(tmp_path) -> None:
    bad = tmp_path / "devices.yaml"
    bad.write_text(
        "x:\n  title: X\n  fp16_tflops: 1\n  fp32_tflops: 1\n  bandwidth_gbs: 1\n  memory_gb: 1\n"
        "  source: s\n  fp16_tflops_sparse: 2\n"
    )
    with pytest.raises(StsError, match="unknown key.*fp16_tflops_sparse"):
        load_devices(bad)


def test_bad_inputs_are_sts_errors(r7b) -> None:
    with pytest.raises(StsError, match="dtype"):
        phase_costs(r7b, 64, "sts", dtype="int3")
    with pytest.raises(StsError, match="prompt_tokens"):
        phase_costs(r7b, 64, "sts", prompt_tokens=0)
    with pytest.raises(StsError, match="decode_context"):
        phase_costs(r7b, 64, "sts", decode_context=-1)
    with pytest.raises(StsError, match="valid budgets"):
        phase_costs(r7b, 1000, "sts")
    with pytest.raises(StsError, match="unknown method"):
        phase_costs(r7b, 64, "tome")


def test_cost_summary_is_json_ready(r7b) -> None:
    summary = cost_summary(r7b, 64, "sts", device="jetson-agx-orin-64gb")
    json.dumps(summary)
    assert (summary["k_pre"], summary["k_post"], summary["s1"], summary["s2"]) == (96, 32, 132, 68)
    assert summary["prefill_roofline_ms"] > 0 and summary["prefill_bound"] in ("compute", "memory")
