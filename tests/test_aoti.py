"""AOTInductor target (export.py --target aoti): packages of the torch graphs, run by the one generation loop,
token for token equal to the torch eager pipeline; the build recorded in the manifest and foreign builds refused.

Compile time dominates (each package compiles its own C++ wrapper: ~5 CPU-s even for `embed`), so the exports
share one package cache for the session: graphs that are the same (code, dynamic axes, weights) compile once.
The set below covers every method on the fixed-N family (tiny-llava: prune_layer == FastV's layer, so one embed
and one segment pair serve all) and Stage 1's custom-op greedy + Stage 2 with length-only inputs on the
image-dependent families (NeXT: anyres; Qwen2.5-VL: M-RoPE ids), with sts-s reusing every sts package there
(same K_max), plus NeXT's unpruned vision graph and Qwen's divprune greedy, and Qwen3-VL's sts (DeepStack planes
from vision into segment1): 25 compiles in all. Not compiled here: FastV on the image-dependent families (its prune
graph is Stage 2's, run above with their length inputs; it would add a prune graph and a segment pair at layer 2 per
family).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sts_export import Pipeline, StsError
from sts_export.artifact.plan import Plan
from sts_export.pipeline import load_export_pipeline
from sts_export.recipe import load_recipe
from tests.conftest import make_image

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is shown in this image?"


def _sts_k(name: str, budget: int | str) -> int:
    """sts's K (K_max for image-dependent N): an sts-s export with this count budget has the same vision graph."""
    return Plan.create(load_recipe(name), "sts", budget).k_pre


CASES = [
    ("tiny-llava", "sts", 8),  # K=12, K'=4: vision, embed, segment1, prune, segment2
    ("tiny-llava", "sts-s", _sts_k("tiny-llava", 8)),  # every package is sts's
    ("tiny-llava", "none", "full"),  # + the unpruned vision graph
    ("tiny-llava", "fastv", 300),  # + its prune graph (K = N = 576, K' = 24)
    ("tiny-llava", "divprune", 12),  # + its vision graph
    ("tiny-llava-next", "sts", 320),  # sts::potential_energy_picks, prune with k_pre/k_post lengths
    ("tiny-llava-next", "sts-s", _sts_k("tiny-llava-next", 320)),
    ("tiny-llava-next", "none", "full"),  # + the unpruned anyres vision graph
    ("tiny-qwen2.5-vl", "sts", "20%"),  # the same on M-RoPE [3, B, S] position ids
    ("tiny-qwen2.5-vl", "sts-s", _sts_k("tiny-qwen2.5-vl", "20%")),
    ("tiny-qwen2.5-vl", "divprune", "10%"),  # + sts::divprune_picks
    ("tiny-qwen3-vl", "sts", "20%"),  # DeepStack planes out of vision, into segment1 (5 compiles)
]
IMAGES = {"tiny-llava": [(500, 400, 21)], "tiny-llava-next": [(640, 480, 5), (350, 700, 3)],
          "tiny-qwen2.5-vl": [(500, 400, 3), (300, 200, 4)],  # image-dependent N: two sizes through one export
          "tiny-qwen3-vl": [(500, 400, 3), (300, 200, 4)]}
_EXPORTS: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def aoti_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("aoti-exports")


def exported(root: Path, name: str, method: str, budget: int | str) -> Path:
    """One export per case, compiled once per session; packages shared through the session's cache."""
    from sts_export.export.aoti import export_aoti

    key = (name, method, budget)
    if key not in _EXPORTS:
        _EXPORTS[key] = export_aoti(name, budget=budget, method=method, out=root / f"{name}-{method}-{budget}",
                                    cache=Path(os.environ.get("STS_AOTI_TEST_CACHE", root / ".packages")),
                                    progress=lambda s: None)
    return _EXPORTS[key]


@pytest.mark.parametrize("name,method,budget", CASES)
def test_aoti_generation_equals_torch(aoti_root: Path, name: str, method: str, budget: int | str) -> None:
    d = exported(aoti_root, name, method, budget)
    ref = Pipeline.from_pretrained(name, budget=budget, method=method)
    pipe = Pipeline.from_export(d, backend="aoti")
    assert pipe.backend.name == "aoti"
    ns = set()
    for w, h, seed in IMAGES[name]:
        img = make_image(w, h, seed=seed)
        a = ref.generate(img, PROMPT, max_new_tokens=8)
        b = pipe.generate(img, PROMPT, max_new_tokens=8)
        assert b.tokens.tolist() == a.tokens.tolist()
        assert b.keep_pre.tolist() == a.keep_pre.tolist()
        assert (a.keep_post is None) == (b.keep_post is None) == (method not in ("sts", "fastv"))
        if a.keep_post is not None:
            assert b.keep_post.tolist() == a.keep_post.tolist()
        assert (b.s1, b.s2) == (a.s1, a.s2)
        assert np.abs(a.first_logits - b.first_logits).max() <= ref.recipe.tolerance.fp32
        ns.add(pipe.prepare_image(img).n)
    assert len(ns) == len(IMAGES[name])  # dynamic families: two token counts N through the same packages


def test_manifest_records_the_build_and_the_cache(aoti_root: Path) -> None:
    d = exported(aoti_root, "tiny-llava", "sts", 8)
    m = json.loads((d / "manifest.json").read_text())
    assert m["aoti"]["torch_version"] == torch.__version__
    assert m["aoti"]["device"] == "cpu" and m["aoti"]["compute_capability"] is None  # read from the package
    assert sorted(m["graphs"]) == ["embed", "prune", "segment1", "segment2", "vision"]
    for g, e in m["graphs"].items():
        pkg = d / e["aoti"]["package"]
        assert pkg.name == f"{g}.pt2" and pkg.stat().st_size == e["aoti"]["size_bytes"] > 0
        assert e["aoti"]["compile_s"] > 0 and "onnx" not in e
    assert not list(d.glob("*.onnx")) and (d / "tokenizer.json").is_file() and (d / "recipe.yaml").is_file()
    # sts-s with sts's K: every package came from the cache, with the seconds of the compile that made it
    s = json.loads((exported(aoti_root, "tiny-llava", "sts-s", _sts_k("tiny-llava", 8)) / "manifest.json").read_text())
    assert all(e["aoti"]["cached"] for e in s["graphs"].values())
    assert {g: e["aoti"]["sha256"] for g, e in s["graphs"].items()} == {
        g: e["aoti"]["sha256"] for g, e in m["graphs"].items() if g != "prune"}


@pytest.mark.parametrize("field,value,message", [
    ("torch_version", "2.0.0", "built by torch 2.0.0"),
    ("device", "cuda", "cuda"),
    ("machine", "aarch64", "built on aarch64"),
])
def test_foreign_build_refused_in_one_line(aoti_root: Path, tmp_path: Path, field: str, value: str,
                                           message: str) -> None:
    src = exported(aoti_root, "tiny-llava", "sts", 8)
    d = tmp_path / "doctored"
    shutil.copytree(src, d)
    m = json.loads((d / "manifest.json").read_text())
    m["aoti"][field] = value
    if field == "device":  # a GPU build of a compute capability no GPU has: refused with or without a GPU here
        m["aoti"]["compute_capability"] = "1.0"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StsError, match=message) as e:
        load_export_pipeline(d, backend="aoti")
    assert "\n" not in str(e.value) and "export.py --target aoti" in str(e.value)


def test_wrong_backend_for_the_directory_refused(aoti_root: Path) -> None:
    d = exported(aoti_root, "tiny-llava", "sts", 8)
    with pytest.raises(StsError, match="no ONNX graphs; run it with --backend aoti"):
        load_export_pipeline(d, backend="onnxruntime")
    assert load_export_pipeline(d).backend.name == "aoti"  # auto: the packages


def test_run_cli_aoti_without_transformers(aoti_root: Path, tmp_path: Path) -> None:
    d = exported(aoti_root, "tiny-llava", "sts", 8)
    img = tmp_path / "img.png"
    make_image(seed=2).save(img)
    code = ("import sys, runpy; sys.argv=['run', %r, '--image', %r, '--input-ids', '1,4,20,21', '--max-new-tokens', '4',"
            " '--backend', 'aoti'];\ntry: runpy.run_module('sts_export.run', run_name='__main__')\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'") % (str(d), str(img))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[aoti] Stage 1 kept 12/576, Stage 2 kept 4" in r.stderr
    ref = Pipeline.from_pretrained("tiny-llava", budget=8)
    want = ref.generate(img, input_ids=[1, 4, 20, 21], max_new_tokens=4).tokens[0]
    assert r.stdout.strip() == ref.decode(want).strip()


def _export_cli() -> object:
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize("args,message", [
    (["--target", "aoti", "--weights", "int8"], "--weights does not apply to --target aoti"),
    (["--target", "aoti", "--opset", "18", "--precision", "fp16"], "--precision, --opset do not apply"),
    (["--aoti-device", "cpu"], "use them with --target aoti"),
    (["--target", "trt", "--aoti-cache", "x"], "use them with --target aoti"),
    (["--target", "aoti", "--budget", "5000"], "valid budgets are"),
])
def test_cli_bad_combinations_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(_export_cli(), ["--model", "tiny-llava", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal of --aoti-device cuda on a machine without a GPU")
def test_cli_cuda_without_gpu_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(_export_cli(), ["--model", "tiny-llava", "--target", "aoti", "--aoti-device", "cuda",
                                             "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "torch sees no CUDA GPU" in res.output


def test_bench_aoti_rows_report_packages(aoti_root: Path) -> None:
    """bench --backends aoti reuses the exports above (no compile) and reports compile time and size per graph."""
    from sts_export.bench import BenchOptions, run_bench

    for case in (("tiny-llava", "none", "full"), ("tiny-llava", "sts", 8)):
        exported(aoti_root, *case)
    notes: list[str] = []
    res = run_bench(BenchOptions(models=["tiny-llava"], budgets=["full", "8"], methods=["sts"], backends=["aoti"],
                                 exports=str(aoti_root), repeats=1, warmup=0, max_new_tokens=3, device="cpu",
                                 stage1_probe=False, progress=notes.append))
    rows = [r for r in res["rows"] if r["backend"] == "aoti"]
    assert [r["budget"] for r in rows] == ["full", 8], res["notes"]
    assert not any("compiling AOTInductor" in n for n in notes)  # found, not rebuilt
    for r in rows:
        pk = r["aoti_packages"]
        assert set(pk) == ({"vision", "embed", "segment1", "segment2"} | ({"prune"} if r["budget"] == 8 else set()))
        assert all(v["compile_s"] > 0 and v["size_bytes"] > 0 for v in pk.values())
        assert r["ttft_ms_median"] > 0 and r["decode_ms_median"] > 0
