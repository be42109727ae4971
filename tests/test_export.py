"""ONNX export + ONNX Runtime backend against the torch Pipeline, the graph contract, CLI errors."""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from sts_export.backends.tensorrt import discovery as trt_discovery
from sts_export.export.tensorrt import build as trt_build
from sts_export import Pipeline, StsError
from sts_export.export.onnx import export
from sts_export.pipeline import load_export_pipeline
from tests.conftest import make_image

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is shown in this image?"
# every method on tiny-llava; grouped KV heads (tiny-llava-gqa, prune_layer != L/2) where the decoder and Stage 2
# differ: no pruning, Stage 2 at its layer (sts), at layer 2 (fastv). Its Stage-1-only methods (sts-s, divprune,
# cls) run the same vision graphs as tiny-llava's; test_parity.py checks them against transformers on both models.
CASES = [("tiny-llava", "none", "full"), ("tiny-llava", "sts", 64), ("tiny-llava", "sts-s", 64),
         ("tiny-llava", "fastv", 300), ("tiny-llava", "divprune", 64), ("tiny-llava", "cls", 64),
         ("tiny-llava-gqa", "sts", 32), ("tiny-llava-gqa", "fastv", 300), ("tiny-llava-gqa", "none", "full")]
# LLaVA-NeXT (anyres, image-dependent N): every method through one export each (4 layers: FastV needs b > 1440)
NEXT = [("tiny-llava-next", "none", "full"), ("tiny-llava-next", "sts", 320), ("tiny-llava-next", "sts-s", 320),
        ("tiny-llava-next", "fastv", 2000), ("tiny-llava-next", "divprune", 320), ("tiny-llava-next", "cls", "10%")]
CASES += NEXT
# Qwen2.5-VL (dynamic resolution, 3-D M-RoPE ids): every method but cls (refused: no [CLS]) through one export each
QWEN = [("tiny-qwen2.5-vl", "none", "full"), ("tiny-qwen2.5-vl", "sts", "20%"), ("tiny-qwen2.5-vl", "sts-s", "10%"),
        ("tiny-qwen2.5-vl", "fastv", "60%"), ("tiny-qwen2.5-vl", "divprune", "10%")]
CASES += QWEN
_EXPORTS: dict[tuple, Path] = {}


def exported(tmp_root: Path, name: str, method: str, budget: int | str) -> Path:
    key = (name, method, budget)
    if key not in _EXPORTS:
        # validation is exercised for one case (test_validation_report); the others compare 16 tokens below
        _EXPORTS[key] = export(name, budget=budget, method=method, out=tmp_root / f"{name}-{method}-{budget}",
                               validate=False, progress=lambda s: None)
    return _EXPORTS[key]


def build_with_stubbed_trt(export_dir: Path, work: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list, dict]:
    """Copy `export_dir` to `work` and run build_engines there with TensorRT 10.3 discovered and each engine build
    stubbed: [(graph stem, build_engine's keyword arguments)] in call order, and the manifest build_engines wrote."""
    from sts_export.export.tensorrt.engines import build_engines

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(trt_discovery, "require_tensorrt", lambda *a, **k: type("trt", (), {"__version__": "10.3.0"}))
    monkeypatch.setattr(trt_discovery, "device_info", lambda *a, **k: {"gpu": "stand-in", "compute_capability": "8.7"})

    def fake_build(onnx_path, engine_path, **kw):
        calls.append((Path(engine_path).stem, kw))
        Path(engine_path).write_bytes(b"engine")
        return {"profiles": [], "build_seconds": 0.0, "size_bytes": 6, "precision": "fp32", "io_dtypes": {}}

    monkeypatch.setattr(trt_build, "build_engine", fake_build)
    shutil.copytree(export_dir, work)
    return calls, build_engines(work, progress=lambda s: None)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.mark.parametrize("name,method,budget", CASES)
def test_ort_generation_equals_torch(tmp_root: Path, name: str, method: str, budget: int | str) -> None:
    d = exported(tmp_root, name, method, budget)
    ref = Pipeline.from_pretrained(name, budget=budget, method=method)
    img = make_image(seed=21)
    a = ref.generate(img, PROMPT, max_new_tokens=16)
    for form in ("auto", "portable"):  # auto: the ORT form (fused kernels, in-place KV cache) users run
        ort_pipe = load_export_pipeline(d, backend="onnxruntime", device="cpu", form=form)
        b = ort_pipe.generate(img, PROMPT, max_new_tokens=16)
        assert b.tokens.tolist() == a.tokens.tolist(), form
        assert b.keep_pre.tolist() == a.keep_pre.tolist()
        assert (a.keep_post is None) == (b.keep_post is None)
        if a.keep_post is not None:
            assert b.keep_post.tolist() == a.keep_post.tolist()
        assert np.abs(a.first_logits - b.first_logits).max() <= ref.recipe.tolerance.fp32
        assert (b.s1, b.s2) == (a.s1, a.s2)


@pytest.mark.parametrize("name,method,budget", NEXT)
def test_next_two_image_sizes_through_one_export(tmp_root: Path, name: str, method: str, budget: int | str) -> None:
    """One NeXT export serves images of different grids and token counts, token for token equal to torch."""
    d = exported(tmp_root, name, method, budget)
    ref = Pipeline.from_pretrained(name, budget=budget, method=method)
    ort_pipe = load_export_pipeline(d, backend="onnxruntime", device="cpu")
    spans = set()
    for img in (make_image(350, 700, seed=3), make_image(900, 280, seed=4)):  # 2x1 and 1x3 tile grids
        a = ref.generate(img, PROMPT, max_new_tokens=8)
        b = ort_pipe.generate(img, PROMPT, max_new_tokens=8)
        assert b.tokens.tolist() == a.tokens.tolist() and b.keep_pre.tolist() == a.keep_pre.tolist()
        if a.keep_post is not None:
            assert b.keep_post.tolist() == a.keep_post.tolist()
        assert np.abs(a.first_logits - b.first_logits).max() <= ref.recipe.tolerance.fp32
        spans.add((ort_pipe.prepare_image(img).n, b.s1))
    assert len({n for n, _ in spans}) == 2  # the two images really have different token counts N
    if method in ("none", "fastv"):
        assert len({s1 for _, s1 in spans}) == 2  # and, without Stage 1, different sequence lengths
    m = json.loads((d / "manifest.json").read_text())
    vision_in = [v["name"] for v in m["graphs"]["vision"]["inputs"]]
    pruned = method not in ("none", "fastv")
    assert vision_in == ["pixel_values", "token_index" if pruned else "packed_index"] + (["k_pre"] if pruned else [])


@pytest.mark.parametrize("name,method,budget", QWEN)
def test_qwen_two_image_sizes_through_one_export(tmp_root: Path, name: str, method: str, budget: int | str) -> None:
    """One Qwen2.5-VL export serves two image sizes (N = 252 and 77) token for token like torch; the graphs take
    the host-computed ViT inputs and [3, B, S] position ids."""
    d = exported(tmp_root, name, method, budget)
    ref = Pipeline.from_pretrained(name, budget=budget, method=method)
    ort_pipe = load_export_pipeline(d, backend="onnxruntime", device="cpu")
    ns = set()
    for img in (make_image(500, 400, seed=3), make_image(300, 200, seed=4)):
        a = ref.generate(img, PROMPT, max_new_tokens=8)
        b = ort_pipe.generate(img, PROMPT, max_new_tokens=8)
        assert b.tokens.tolist() == a.tokens.tolist() and b.keep_pre.tolist() == a.keep_pre.tolist()
        assert (a.keep_post is None) == (b.keep_post is None)
        if a.keep_post is not None:
            assert b.keep_post.tolist() == a.keep_post.tolist()
        assert np.abs(a.first_logits - b.first_logits).max() <= ref.recipe.tolerance.fp32
        assert (b.s1, b.s2) == (a.s1, a.s2)
        ns.add(ort_pipe.prepare_image(img).n)
    assert ns == {252, 77}
    m = json.loads((d / "manifest.json").read_text())
    assert m["max_pixels"] == ref.recipe.image_processor.max_pixels
    io = {g: {v["name"]: v for v in m["graphs"][g]["inputs"]} for g in m["graphs"]}
    pruned = method not in ("none", "fastv")
    assert list(io["vision"]) == ["pixel_values", "rotary_pos", "window_index", "window_patches", "patch_slot"] + (
        ["k_pre"] if pruned else [])
    assert io["vision"]["pixel_values"]["shape"][1] == 1176 and isinstance(io["vision"]["pixel_values"]["shape"][0], str)
    for g in ("segment1", "segment2", "prune"):
        if g in io:
            assert len(io[g]["position_ids"]["shape"]) == 3 and io[g]["position_ids"]["shape"][0] == 3
    if "prune" in m["graphs"]:
        out = {v["name"]: v for v in m["graphs"]["prune"]["outputs"]}
        assert len(out["position_ids_out"]["shape"]) == 3


@pytest.mark.parametrize("size", [(448, 280), (1000, 700), (30, 20)])
def test_qwen_vision_graph_attends_per_window_as_transformers(tmp_root: Path, tiny_dir, size: tuple[int, int]) -> None:
    """The exported vision graph (ONNX Runtime) attends per window (the host's [W, 64] window table, padding
    masked): its merger output equals transformers' ViT on three image sizes, one a whole number of windows
    (448 x 280 -> 10 x 16 tokens: no, ragged), one shrunk to max_pixels, one a single partial window."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = exported(tmp_root, "tiny-qwen2.5-vl", "none", "full")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir("tiny-qwen2.5-vl"), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    # the ORT form's vision graph: the 2-D rotary as RotaryEmbedding on q and k, attention as MultiHeadAttention
    # (every block: windows as a batch with an attention bias, full blocks over all patches)
    form = onnx.load(str(d / "vision.ort.onnx"), load_external_data=False)
    blocks = json.loads((d / "manifest.json").read_text())["recipe"]["vision"]["num_layers"]
    ops = [n.op_type for n in form.graph.node]
    assert ops.count("MultiHeadAttention") == blocks and ops.count("RotaryEmbedding") == 2 * blocks
    assert "Softmax" not in ops
    for graphs in ("portable", "ort"):
        pipe = load_export_pipeline(d, backend="ort", form=graphs)
        inp = pipe.prepare_image(make_image(*size, seed=3))
        table = inp.feeds["window_patches"]
        assert table.shape[1] == 64 and (table.shape[0] > 1) == (size != (30, 20))
        got = pipe.backend.run("vision", {n: inp.feeds[n] for n in pipe.plan.vision_inputs})
        with torch.no_grad():
            ref = hf.model.visual(torch.from_numpy(inp.feeds["pixel_values"]), grid_thw=torch.tensor([inp.grid]))
        np.testing.assert_allclose(np.asarray(pipe.backend.to_numpy(got["image_embeds"]))[0],
                                   ref.pooler_output.numpy(), rtol=0, atol=1e-4, err_msg=graphs)


def test_qwen_engine_profiles_span_the_patch_counts(tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TensorRT profiles of a Qwen export span 1..N_max LLM tokens (4 patches each), 1..K_max, 1..K'_max, and
    1..W_max windows of the windowed ViT blocks."""
    from sts_export.families.qwen2_5_vl import max_windows
    from sts_export.recipe import load_recipe

    d = exported(tmp_root, "tiny-qwen2.5-vl", "sts", "20%")
    calls, _ = build_with_stubbed_trt(d, tmp_root / "qwen-profiles", monkeypatch)
    seen = {stem: kw["profiles"] for stem, kw in calls}
    m = json.loads((d / "manifest.json").read_text())
    n_max = m["recipe"]["image_processor"]["max_pixels"] // 28**2
    (vis,) = seen["vision"]
    assert vis["pixel_values"] == ((4, 1176), (4 * n_max, 1176), (4 * n_max, 1176))
    assert vis["window_index"] == ((1,), (n_max,), (n_max,)) and vis["patch_slot"][2] == (4 * n_max,)
    w_max = max_windows(load_recipe("tiny-qwen2.5-vl"))  # windows of 4 x 4 LLM tokens, 64 patches each
    assert vis["window_patches"] == ((1, 64), (w_max, 64), (w_max, 64))
    assert vis["k_pre"][2] == (m["k_pre"],)
    prefill, decode = seen["segment1"]
    assert prefill["position_ids"][2][0] == 3 and decode["position_ids"] == ((3, 1, 1), (3, 1, 1), (3, 1, 1))
    assert seen["prune"][0]["k_post"][2] == (m["k_post"],)


def test_qwen_cls_export_refused(tmp_path: Path) -> None:
    with pytest.raises(StsError, match=r"no \[CLS\] token"):
        export("tiny-qwen2.5-vl", budget="10%", method="cls", out=tmp_path / "c", progress=lambda s: None)
    assert not (tmp_path / "c").exists()


EXPECTED = {
    "vision": (["pixel_values"], ["image_embeds", "keep_pre"]),
    "embed": (["input_ids"], ["inputs_embeds"]),
    "prune": (["hidden", "position_ids", "image_start"], ["hidden_out", "position_ids_out", "keep_post"]),
}


@pytest.mark.parametrize("name,method,budget", [("tiny-llava-gqa", "sts", 32), ("tiny-llava", "none", "full")])
def test_graph_io_contract(tmp_root: Path, name: str, method: str, budget: int | str) -> None:
    """Names, dtypes and ranks of the ONNX files as DESIGN.md says (read from the files)."""
    d = exported(tmp_root, name, method, budget)
    m = json.loads((d / "manifest.json").read_text())
    pl, layers = m["prune_layer"], m["recipe"]["text"]["num_layers"]
    files = sorted(p.stem for p in d.glob("*.onnx") if not p.name.endswith(".ort.onnx"))  # the portable graphs
    # the ORT form: the decoder segments, and the CLIP tower's vision graph with fused MultiHeadAttention
    assert sorted(p.name for p in d.glob("*.ort.onnx")) == ["segment1.ort.onnx", "segment2.ort.onnx", "vision.ort.onnx"]
    vis_form = onnx.load(str(d / "vision.ort.onnx"), load_external_data=False)
    assert sum(n.op_type == "MultiHeadAttention" for n in vis_form.graph.node) == m["recipe"]["vision"]["num_layers"] + \
        m["recipe"]["vision"]["feature_layer"] + 1  # every layer the tower runs (up to the feature layer)
    assert files == sorted(["vision", "embed", "segment1", "segment2"] + (["prune"] if method == "sts" else []))
    T = onnx.TensorProto
    for g in files:
        model = onnx.load(str(d / f"{g}.onnx"), load_external_data=False)
        ins = {v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in model.graph.input}
        outs = {v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in model.graph.output}
        if g in EXPECTED:
            assert list(ins) == EXPECTED[g][0] and list(outs) == EXPECTED[g][1]
        if g == "vision":
            assert ins["pixel_values"] == (T.FLOAT, 4)
            assert outs["image_embeds"] == (T.FLOAT, 3) and outs["keep_pre"] == (T.INT64, 2)
        if g == "embed":
            assert ins["input_ids"] == (T.INT64, 2) and outs["inputs_embeds"] == (T.FLOAT, 3)
        if g == "prune":
            assert ins["hidden"] == (T.FLOAT, 3) and ins["position_ids"] == (T.INT64, 2) and ins["image_start"] == (T.INT64, 0)
            assert outs["keep_post"] == (T.INT64, 2) and outs["position_ids_out"] == (T.INT64, 2)
        if g.startswith("segment"):
            idx = range(0, pl) if g == "segment1" else range(pl, layers)
            past = [f"past_{kv}_{i}" for i in idx for kv in ("key", "value")]
            assert list(ins) == ["hidden", "position_ids", *past]
            assert ins["hidden"] == (T.FLOAT, 3) and ins["position_ids"] == (T.INT64, 2)
            assert all(ins[p] == (T.FLOAT, 4) for p in past)
            first = "hidden_out" if g == "segment1" else "logits"
            assert list(outs) == [first, *[p.replace("past_", "present_") for p in past]]
            assert outs[first][1] == (3 if g == "segment1" else 2)
    assert m["graphs"]["vision"]["outputs"][0]["shape"][1] == m["k_pre"]  # K fixed per export
    for g in ("segment1", "segment2"):  # the ORT form: the portable IO plus the cache's lengths
        spec = m["ort_form"][g]
        portable = m["graphs"][g]
        ins = [v["name"] for v in spec["inputs"]]
        assert ins == ["hidden", "position_ids", "seqlens_k", "total_sequence_length", *[v["name"] for v in portable["inputs"][2:]]]
        assert [v["name"] for v in spec["outputs"]] == [v["name"] for v in portable["outputs"]]


def test_validation_report_and_tokenizer(tmp_path: Path) -> None:
    d = export("tiny-llava", budget=64, method="sts", out=tmp_path / "v", progress=lambda s: None)
    rep = json.loads((d / "validation.json").read_text())
    assert rep["passed"] is True
    assert {"vision/prefill", "prune/prefill", "segment1/decode", "segment2/decode"} <= set(rep["graphs"])
    for rows in rep["graphs"].values():
        for r in rows:
            assert r["ok"] and ("max_abs" in r or r.get("identical") is True)
    assert rep["end_to_end"]["batch2"]["tokens_identical"]
    for f in ("manifest.json", "tokenizer.json", "recipe.yaml", "vision.onnx"):
        assert (d / f).is_file()
    assert not list(tmp_path.glob(".v.tmp-*"))  # no temporary directory left behind


def test_fp16_export_validates(tmp_path: Path) -> None:
    """fp16 graphs: Stage 1 still selects in float32 (casts in the graph), indices identical to torch fp16."""
    d = export("tiny-llava-gqa", budget=32, method="sts", dtype="fp16", out=tmp_path / "h", progress=lambda s: None)
    _EXPORTS[("tiny-llava-gqa", "sts", 32, "fp16")] = d  # test_trt_versions.py builds engines from it
    rep = json.loads((d / "validation.json").read_text())
    assert rep["passed"] and rep["dtype"] == "float16"
    # no ORT form at fp16: on CUDA its decode was not token-equal to torch (docs/design.md), the portable graphs are
    assert "ort_form" not in json.loads((d / "manifest.json").read_text())
    vis = onnx.load(str(d / "vision.onnx"), load_external_data=False)
    assert any(n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)
               for n in vis.graph.node)


def test_out_exists_refused_and_budget_range(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(StsError, match="already exists.*--force"):
        export("tiny-llava", out=tmp_path / "x")
    with pytest.raises(StsError, match="valid budgets are"):
        export("tiny-llava", budget=5000, out=tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_runtime_rejects_bad_directories(tmp_root: Path, tmp_path: Path) -> None:
    src = exported(tmp_root, "tiny-llava", "sts", 64)
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    with open(d / "segment2.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(StsError, match="segment2.onnx differs from the manifest's sha256"):
        load_export_pipeline(d)
    (d / "segment2.onnx").unlink()
    with pytest.raises(StsError, match="graph 'segment2' is missing"):
        load_export_pipeline(d)
    shutil.copy(src / "segment2.onnx", d)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StsError, match="format version 99, newer"):
        load_export_pipeline(d)
    with pytest.raises(StsError, match="not an export directory"):
        load_export_pipeline(tmp_path)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_cli_export_and_run(tmp_root: Path, tmp_path: Path) -> None:
    # a sibling export of the same model (method none): embed and the segments are copied from it, then validated
    shutil.copytree(exported(tmp_root, "tiny-llava", "none", "full"), tmp_path / "sibling")
    out = tmp_path / "cli-export"
    r = run_cli("export.py", "--model", "tiny-llava", "--budget", "64", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[1/5] exporting vision" in r.stdout and "validation: PASS" in r.stdout
    assert "[3/5] segment1: copied from the sibling export sibling" in r.stdout
    assert json.loads((out / "manifest.json").read_text())["graphs"]["segment2"]["reused_from"] == "sibling"
    img = tmp_path / "img.png"
    make_image(seed=2).save(img)
    kept = tmp_path / "kept.png"
    r = run_cli("-m", "sts_export.run", str(out), "--image", str(img), "--prompt", PROMPT, "--max-new-tokens", "6",
                "--show-kept", str(kept))
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    assert Image.open(kept).size[0] == Image.open(img).size[0]  # drawn on the input image
    cmp_png = tmp_path / "compare.png"
    r2 = run_cli("-m", "sts_export.run", str(out), "--image", str(img), "--prompt", PROMPT, "--max-new-tokens", "1",
                 "--show-kept", str(cmp_png), "--compare", "sts,divprune,cls")
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert Image.open(cmp_png).size[0] > 3 * Image.open(img).size[0]  # one panel per method
    assert "Stage 1 kept 96/576, Stage 2 kept 32" in r.stderr
    pipe = Pipeline.from_pretrained("tiny-llava", budget=64)
    want = pipe.decode(pipe.generate(img, PROMPT, max_new_tokens=6).tokens[0])
    assert r.stdout.strip() == want.strip()
    # the runner needs no transformers (and, for ONNX Runtime, no torch)
    code = ("import sys, runpy; sys.argv=['run', %r, '--image', %r, '--input-ids', '1,4,20,21', '--max-new-tokens', '2'];"
            "\ntry: runpy.run_module('sts_export.run', run_name='__main__')\nexcept SystemExit: pass\n"
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'heavy import'") % (str(out), str(img))
    r = run_cli("-c", code)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("args,msg", [
    (["export.py", "--model", "llava-9b"], "unknown model 'llava-9b'"),
    (["export.py", "--model", "tiny-llava", "--budget", "5000"], "valid budgets are"),
    (["export.py", "--model", "tiny-llava", "--target", "trt"], "TensorRT"),
])
def test_cli_errors_are_one_line(args: list[str], msg: str) -> None:
    r = run_cli(*args)
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.startswith("error:")]) == 1


def test_cli_out_exists_and_bad_image(tmp_root: Path, tmp_path: Path) -> None:
    d = exported(tmp_root, "tiny-llava", "sts", 64)
    r = run_cli("export.py", "--model", "tiny-llava", "--out", str(d))
    assert r.returncode != 0 and "already exists" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "x.jpg"
    bad.write_text("not an image")
    r = run_cli("-m", "sts_export.run", str(d), "--image", str(bad), "--prompt", "hi")
    assert r.returncode == 2 and "not a readable image" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name,method,budget", CASES)
def test_trt_static_check_passes_on_every_export(tmp_root: Path, name: str, method: str, budget: int | str) -> None:
    """export.py --check-only against JetPack 6's 10.3, JetPack 7.2's 10.16 and desktop 11.4: one verdict each."""
    from click.testing import CliRunner

    import export as export_cli

    d = exported(tmp_root, name, method, budget)
    r = CliRunner().invoke(export_cli.main, ["--onnx-dir", str(d), "--target", "trt", "--check-only",
                                             "--trt-version", "10.3,10.16,11.4"])
    verdicts = [line for line in r.output.splitlines() if line.endswith(("compatibility: PASS", "compatibility: FAIL"))]
    assert verdicts == [f"TensorRT {v} compatibility: PASS" for v in ("10.3", "10.16", "11.4")], r.output[-3000:]
    assert r.exit_code == 0


def test_trt_walk_refuses_the_previous_stage1_loop(tmp_root: Path) -> None:
    """The vision.onnx this export writes parses (the check's registration walk); rewritten to the Loop the previous
    code wrote (no cond, body reading cond_in) it fails with onnx-tensorrt's message naming the Loop and cond_in."""
    from sts_export.export.tensorrt.check import check_model
    from tests.test_trt_importer_rules import legacy_stage1_loop

    d = exported(tmp_root, "tiny-llava", "sts", 64)
    vision = onnx.load(str(d / "vision.onnx"), load_external_data=False)
    legacy, loop = legacy_stage1_loop(vision)
    for version in ("10.3", "10.16", "11.4"):
        assert check_model(vision, trt_version=version).ok
        (line,) = check_model(legacy, trt_version=version).problems
        assert f":{loop}/body/legacy_cond(Identity): Node input was not registered." in line and "'cond_in'" in line


def test_trt_check_only_cli(tmp_root: Path) -> None:
    d = exported(tmp_root, "tiny-llava", "sts", 64)
    r = run_cli("export.py", "--onnx-dir", str(d), "--target", "trt", "--check-only")
    assert r.returncode == 0 and "compatibility: PASS" in r.stdout
    # without TensorRT, building engines from the compatible graphs is one line naming TensorRT
    r = run_cli("export.py", "--onnx-dir", str(d), "--target", "trt")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert r.returncode != 0 and "TensorRT is not installed" in r.stderr and "Traceback" not in r.stderr


def test_engine_build_modes(tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines are strongly typed: their precision is the graphs' dtype, read from the files; another is refused."""
    from sts_export.export.tensorrt.engines import engine_precision
    from sts_export.artifact.manifest import read_manifest

    d = exported(tmp_root, "tiny-llava", "sts", 64)
    m = read_manifest(d)
    assert engine_precision(d, m, None) == "fp32" == m["dtype"]
    with pytest.raises(StsError, match="re-export with --dtype bf16"):
        engine_precision(d, m, "bf16")

    work = tmp_root / "modes"
    calls, m = build_with_stubbed_trt(d, work, monkeypatch)
    assert {c["precision"] for _, c in calls} == {"fp32"} and not any("fp32_layers_pattern" in c for _, c in calls)
    assert m["tensorrt"]["precision"] == "fp32" and m["tensorrt"]["strongly_typed"]
    assert all(g["engine_sha256"] for g in m["graphs"].values())
    assert read_manifest(work)["graphs"]["vision"]["engine"] == "vision.engine"  # still readable with engines listed



def test_sibling_exports_share_method_independent_graphs(tmp_root: Path) -> None:
    """Exports in one parent directory that differ in method/budget hold the same embed/segment files: one was
    exported, the other copied (its manifest says from where); their vision graphs differ and so do their keys.
    test_ort_generation_equals_torch runs every such export against torch."""
    a, b = exported(tmp_root, "tiny-llava", "none", "full"), exported(tmp_root, "tiny-llava", "sts", 64)
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for form, graphs in (("graphs", ("embed", "segment1", "segment2")), ("ort_form", ("segment1", "segment2"))):
        for g in graphs:
            ea, eb = ma[form][g], mb[form][g]
            assert ea["sha256"] == eb["sha256"] and ea["build_key"] == eb["build_key"]
            assert {ea.get("reused_from"), eb.get("reused_from")} in ({None, a.name}, {None, b.name}), (ea, eb)
    assert ma["graphs"]["vision"]["sha256"] != mb["graphs"]["vision"]["sha256"]
    assert ma["graphs"]["vision"]["build_key"] != mb["graphs"]["vision"]["build_key"]
    assert "reused_from" not in ma["graphs"]["vision"] and "reused_from" not in mb["graphs"]["vision"]


def test_sibling_reuse_refuses_changed_or_quantized_files(tmp_root: Path, tmp_path: Path) -> None:
    """A sibling is used only with the same build key, an intact file (its recorded sha256) and float weights;
    the key follows the layers, dtype, opset and weights."""
    from sts_export.checkpoint import resolve
    from sts_export.export import reuse
    from sts_export.artifact.plan import Plan

    src = exported(tmp_root, "tiny-llava", "sts", 64)
    key = json.loads((src / "manifest.json").read_text())["graphs"]["segment1"]["build_key"]
    sib = tmp_path / "sib"
    shutil.copytree(src, sib)
    out = tmp_path / "new"
    assert reuse.find(reuse.siblings(out), key, "graphs")[0] == sib
    assert reuse.find(reuse.siblings(out), "0" * 64, "graphs") is None
    os.replace(sib, tmp_path / "sib.failed")  # graphs kept after a failed validation are never reused
    assert reuse.find(reuse.siblings(out), key, "graphs") is None
    os.replace(tmp_path / "sib.failed", sib)
    with open(sib / "segment1.onnx", "ab") as f:  # edited after export: its sha256 no longer matches
        f.write(b"\0")
    assert reuse.find(reuse.siblings(out), key, "graphs") is None
    shutil.copyfile(src / "segment1.onnx", sib / "segment1.onnx")
    m = json.loads((sib / "manifest.json").read_text())
    (sib / "manifest.json").write_text(json.dumps({**m, "weights": {"weights": "int8"}}))
    assert reuse.find(reuse.siblings(out), key, "graphs") is None
    # the key: the same segments for sts and none (same prune layer), others for other layers/dtype/opset/weights
    gqa = resolve("tiny-llava-gqa")
    plans = {m: Plan.create(gqa.recipe, m, b, "float32") for m, b in (("sts", 32), ("none", "full"), ("fastv", 300),
                                                                        ("sts-s", 32))}
    key = functools.partial(reuse.build_key, gqa, gqa.recipe)
    k = {m: key(p, "segment2", "portable", "fp32", 18, "mean") for m, p in plans.items()}
    assert k["sts"] == k["none"] == k["sts-s"] != k["fastv"]  # FastV prunes after layer 2, STS at the recipe's layer
    p = plans["sts"]
    assert len({k["sts"], key(p, "segment2", "portable", "fp16", 18, "mean"),
                key(p, "segment2", "portable", "fp32", 21, "mean"), key(p, "segment2", "ort", "fp32", 18, "mean"),
                reuse.build_key(resolve("tiny-llava-gqa", random_weights=True), gqa.recipe, p, "segment2", "portable",
                                "fp32", 18, "mean")}) == 5
    # vision (Stage 1) and prune (Stage 2) also follow the method, budget and anchor
    vis = {key(q, "vision", "portable", "fp32", 18, a) for q in plans.values() for a in ("mean", "first")}
    assert len(vis) == 8 and key(p, "vision", "portable", "fp32", 18, "mean") in vis
    assert key(p, "prune", "portable", "fp32", 18, "mean") != key(plans["sts-s"], "prune", "portable", "fp32", 18,
                                                                    "mean")
