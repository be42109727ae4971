"""bench.py's peers (sts_export.bench.peers): transformers' own model and onnxruntime-genai's decoder run on the same
weights and inputs as our rows, their rows and the ratios read against them, and a missing peer skipped with a note.

onnxruntime-genai is part of `.[dev]`: without it the ort-genai tests fail (they do not skip), so a CI that lost it
says so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sts_export.bench.options import BenchOptions, default_image, prompt_ids, recipe_of  # noqa: E402
from sts_export.bench.runner import run_bench  # noqa: E402
from sts_export.pipeline import Pipeline  # noqa: E402
from tests.test_bench import check_schema  # noqa: E402

NEW = 4


def _opts(model: str, **kw: object) -> BenchOptions:
    base = dict(models=[model], budgets=["full"], methods=["sts"], backends=["torch"], random_weights=True,
                max_new_tokens=NEW, repeats=1, warmup=0, stage1_probe=False)
    return BenchOptions(**{**base, **kw})


def _require_genai() -> None:
    import importlib.util

    assert importlib.util.find_spec("onnxruntime_genai") is not None, (
        "onnxruntime-genai is not installed: pip install -e '.[dev]' (it includes the bench peers)")


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-llava-next", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_transformers_peer_matches_our_torch_backend(model: str) -> None:
    """transformers' class on the peer's checkpoint (the synthetic one for --random-weights) gives our torch rows'
    first logits (1e-4) and greedy tokens on the same image and ids: same weights, same inputs."""
    from sts_export.bench.peers import HF_CLASSES, TransformersPeer

    opts = _opts(model, ignore_eos=False)  # EOS unmasked on both sides
    recipe = recipe_of(model)
    img = default_image(recipe)
    peer = TransformersPeer(model, recipe, opts, img, cuda=False)
    assert type(peer.hf).__name__ == HF_CLASSES[recipe.family]
    assert peer.hf.config._attn_implementation == "sdpa"
    peer.run(record=True)
    pipe = Pipeline.from_pretrained(model, budget="full", method="none", random_weights=True,
                                    max_pixels=recipe.image_processor.max_pixels or None)
    gen = pipe.generate(pipe.prepare_image(img), input_ids=prompt_ids(pipe, opts.prompt, None), max_new_tokens=NEW)
    assert np.abs(gen.first_logits - peer.first_logits).max() <= 1e-4
    assert peer.tokens.tolist() == gen.tokens.tolist()
    row = peer.row()
    assert row["seq_len_stage1"] == gen.s1 == peer.inputs["input_ids"].shape[1]
    assert (row["scope"], row["method"], row["budget"], row["attn_implementation"]) == ("full model", "none", "full", "sdpa")
    for ph in ("vision", "prefill", "ttft", "decode"):
        assert row[f"{ph}_ms_median"] > 0, ph
    assert row["ttft_ms_median"] == pytest.approx(row["vision_ms_median"] + row["prefill_ms_median"])
    peer.close()


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_ort_genai_decoder_matches_transformers(model: str, tmp_path: Path) -> None:
    """The decoder ort-genai's builder makes from the checkpoint's language model (LlamaForCausalLM /
    Qwen2ForCausalLM / Qwen3ForCausalLM) gives transformers' own VLM class's logits on the same ids (text only), is
    timed on S1 = our full prefill length ids, and is cached (a second peer reuses it)."""
    _require_genai()
    import torch
    import transformers

    from sts_export.bench.peers import HF_CLASSES, GenaiPeer, peer_source
    from sts_export.families import family_module

    opts = _opts(model)
    recipe = recipe_of(model)
    img = default_image(recipe)
    peer = GenaiPeer(model, recipe, opts, img, cuda=False, root=tmp_path)
    assert peer.dir.parent == tmp_path / "ort-genai" and (peer.dir / "genai_config.json").is_file()
    assert len(peer.ids) == peer.text_tokens + peer.n_full and peer.text_tokens == 36  # S1 of the full rows
    assert peer.n_full == family_module(recipe.family).prepare_image(img, recipe).n_full  # 576 for tiny-llava
    og = peer.og
    params = og.GeneratorParams(peer.og_model)
    params.set_search_options(max_length=len(peer.ids) + 1, do_sample=False)
    gen = og.Generator(peer.og_model, params)
    gen.append_tokens(peer.ids)
    theirs = np.asarray(gen.get_logits())[0, -1]
    hf = getattr(transformers, HF_CLASSES[recipe.family]).from_pretrained(peer_source(model, recipe, opts)[0],
                                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(peer.ids.astype(np.int64))[None]).logits[0, -1].numpy()
    assert np.abs(theirs - ref).max() <= 1e-3
    peer.run(record=True)
    assert peer.tokens.shape == (1, NEW)
    row = peer.row()
    assert row["scope"] == "decoder only" and row["vision_ms_median"] is None and row["ttft_ms_median"] is None
    assert row["prefill_ms_median"] > 0 and row["decode_ms_median"] > 0
    peer.close()
    if model != "tiny-llava":
        return
    mtime = (peer.dir / "model.onnx").stat().st_mtime
    again = GenaiPeer(model, recipe, opts, img, cuda=False, root=tmp_path)
    assert again.dir == peer.dir and (again.dir / "model.onnx").stat().st_mtime == mtime  # reused, not rebuilt


def test_bench_cli_with_peers(tmp_path: Path) -> None:
    """bench.py --backends transformers,ort-genai,torch: the peers' rows (marked), the schema, every row of ours read
    against them (columns, summary, JSON fields), in one interleaved round-robin."""
    _require_genai()
    env = {**os.environ, "STS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "bench.py"), "--models", "tiny-llava", "--random-weights", "--budgets", "full,64",
           "--methods", "sts", "--backends", "transformers,ort-genai,torch", "--device", "cpu", "--repeats", "1",
           "--warmup", "0", "--max-new-tokens", "3", "--threads", "2", "--no-stage1-probe", "--json",
           str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    check_schema(result)
    rows = result["rows"]
    assert [(r["backend"], r["method"], r["budget"], r["scope"]) for r in rows] == [
        ("torch", "none", "full", "full model"), ("torch", "sts", 64, "full model"),
        ("transformers", "none", "full", "full model"), ("ort-genai", "none", "full", "decoder only")]
    full, hf, genai = rows[0], rows[2], rows[3]
    assert hf["seq_len_stage1"] == genai["seq_len_stage1"] == full["seq_len_stage1"]  # S ids = our full S1
    for r in rows[:2]:
        for k in ("ttft_vs_transformers", "prefill_vs_transformers", "decode_vs_transformers",
                  "prefill_vs_ort_genai", "decode_vs_ort_genai"):
            assert r[f"speedup_{k}"] > 0, k
    assert full["speedup_ttft_vs_transformers"] == pytest.approx(hf["ttft_ms_median"] / full["ttft_ms_median"])
    assert full["speedup_decode_vs_ort_genai"] == pytest.approx(genai["decode_ms_median"] / full["decode_ms_median"])
    assert not any("speedup_ttft_vs_transformers" in r for r in rows[2:])
    out = proc.stdout
    for s in ("decoder only", "TTFT vs HF x", "pre vs GenAI x", "dec vs GenAI x", "vs peers: TTFT"):
        assert s in out, s
    assert any("measured with torch's configurations (in the same round-robin)" in n for n in result["notes"])


def test_missing_peer_is_one_note(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that is not installed is skipped with one note (no failure, no traceback); the other peer still runs
    (alone: no backend of ours here)."""
    import importlib.util

    from sts_export.bench import peers

    real = importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime_genai" else real(name, *a))
    result = run_bench(_opts("tiny-llava", backends=["ort-genai", "transformers"]))
    assert [r["backend"] for r in result["rows"]] == ["transformers"]
    assert not result["failures"]
    notes = [n for n in result["notes"] if "ort-genai" in n]
    assert notes == ["backend ort-genai skipped: onnxruntime-genai is not installed (pip install -e '.[peers]')"]
    assert result["skipped"] == [{"model": "tiny-llava", "backend": "ort-genai", "reason": notes[0].split(": ", 1)[1]}]


def test_peer_names_and_dtypes() -> None:
    """CLI aliases map to the peers; ort-genai refuses what its builder cannot make (fp16 on CPU, bf16)."""
    from sts_export.bench.peers import peer_unavailable

    assert _opts("tiny-llava", backends=["hf", "genai", "onnxruntime-genai"]).backends == ["transformers", "ort-genai"]
    assert peer_unavailable("ort-genai", _opts("tiny-llava", dtype="fp16")) is not None
    assert peer_unavailable("ort-genai", _opts("tiny-llava", dtype="bf16"), cuda=True) is not None


def test_failing_peer_keeps_our_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that raises while it runs is dropped from the round-robin with a note and a 'failures' entry (the
    exit status then says so); our rows measured with it are kept."""
    from sts_export.bench.peers import TransformersPeer

    def broken(self: TransformersPeer) -> None:
        raise RuntimeError("planted")

    monkeypatch.setattr(TransformersPeer, "generate", broken)
    result = run_bench(_opts("tiny-llava", backends=["transformers", "torch"], max_new_tokens=2))
    assert [(r["backend"], r["budget"]) for r in result["rows"]] == [("torch", "full")]
    assert [(f["backend"], f["error"]) for f in result["failures"]] == [("transformers", "RuntimeError: planted")]
    assert any(n.startswith("peer transformers FAILED on tiny-llava: RuntimeError: planted") for n in result["notes"])


def test_ort_genai_quantized_peer_is_built_as_ours(tmp_path: Path) -> None:
    """--weights int4 --block-size 32 --accuracy-level 1: ort-genai gets a second row built by its own builder with
    that scheme (MatMulNBits read back from its graph: bits, block_size, accuracy_level), labelled as our rows, and
    our quantized rows are read against it, our float rows against its float row; transformers runs float only."""
    _require_genai()
    import onnx

    from sts_export.bench.peers import GenaiPeer, add_peer_ratios, peer_schemes

    opts = _opts("tiny-llava", backends=["ort-genai"], weights=["fp32", "int4"], block_size=32, accuracy_level=1)
    assert peer_schemes("transformers", opts) == [None]
    float_, int4 = peer_schemes("ort-genai", opts)
    assert float_ is None and (int4.weights, int4.block_size, int4.accuracy_level) == ("int4", 32, 1)
    recipe = recipe_of("tiny-llava")
    peer = GenaiPeer("tiny-llava", recipe, opts, default_image(recipe), cuda=False, root=tmp_path, scheme=int4)
    nodes = [n for n in onnx.load(str(peer.dir / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    assert nodes, "the builder wrote no MatMulNBits"
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert {(a["bits"], a["block_size"], a.get("accuracy_level", 0)) for a in attrs} == {(4, 32, 1)}
    peer.run(record=True)
    row = peer.row()
    assert row["weights"] == int4.label == "int4-b32-acc1" and row["backend"] == "ort-genai"
    peer.close()
    genai_float = {**row, "weights": "fp32", "prefill_ms_median": 10.0, "decode_ms_median": 1.0}
    genai_int4 = {**row, "prefill_ms_median": 6.0, "decode_ms_median": 0.5}
    hf = {**genai_float, "backend": "transformers", "ttft_ms_median": 40.0}
    ours = [{"model": "tiny-llava", "dtype": "fp32", "weights": w, "backend": "ort", "prefill_ms_median": 5.0,
             "decode_ms_median": 0.25, "ttft_ms_median": 20.0} for w in ("fp32", "int4-b32-acc1", "int8-b32-acc1")]
    add_peer_ratios(ours + [genai_float, genai_int4, hf])
    assert ours[0]["speedup_decode_vs_ort_genai"] == pytest.approx(4.0)  # float against float
    assert ours[1]["speedup_decode_vs_ort_genai"] == pytest.approx(2.0)  # int4 against its int4
    assert "speedup_decode_vs_ort_genai" not in ours[2]  # no int8 peer row: no ratio
    assert all(r["speedup_ttft_vs_transformers"] == pytest.approx(2.0) for r in ours)  # HF's float row for all
