"""Qwen3-VL through export/ (issue 31, phase B): the DeepStack planes leave the vision graph and enter segment1 in the
ONNX files and in the ORT form; ONNX Runtime (fused ORT form and portable graphs) gives torch's greedy tokens, keep_pre
and keep_post for every method at two image sizes through one export each; the static TensorRT check passes on the
fp32, fp16 and int4 QDQ exports; the TensorRT profiles cover the DeepStack rows; an fp16 export validates; the
DeepStack mergers are quantized with the projector; the cost model counts the Qwen3 ViT, the mergers and the adds as
the modules (ours and transformers') hold them.

One export per case, shared by the tests (as tests/test_export.py does); the sts case is exported at opset 21 so its
copies can be quantized to int4. The other cases copy embed/segment1/segment2 and the ORT form from their siblings.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from sts_export import Pipeline, StsError
from sts_export.export.onnx import export
from sts_export.pipeline import load_export_pipeline
from sts_export.recipe import load_recipe
from tests.conftest import make_image
from tests.test_export import PROMPT, build_with_stubbed_trt

NAME = "tiny-qwen3-vl"
RECIPE = load_recipe(NAME)
TAPS = len(RECIPE.vision.deepstack_visual_indexes)
HIDDEN = RECIPE.text.hidden_size
# every method but cls (refused: no [CLS]); fastv's layer 2 = the tiny model's 2 taps
CASES = [("none", "full"), ("sts", "20%"), ("sts-s", "10%"), ("fastv", "60%"), ("divprune", "10%")]
IMAGES = [(500, 400, 3), (300, 200, 4)]  # N = 192 and 70 LLM tokens (32-px cells)
VISION_INPUTS = ["pixel_values", "rotary_pos", "interp_indices", "interp_weights"]
_EXPORTS: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qwen3-exports")


def exported(root: Path, method: str, budget: str, dtype: str = "fp32") -> Path:
    """One export per case (fp32 unvalidated: the tests compare with torch; fp16 validated, as users export it)."""
    key = (method, budget, dtype)
    if key not in _EXPORTS:
        kw = {"opset": 21} if (method, dtype) == ("sts", "fp32") else {}
        _EXPORTS[key] = export(NAME, budget=budget, method=method, dtype=dtype, validate=dtype != "fp32",
                               out=root / f"{method}-{budget}-{dtype}", progress=lambda s: None, **kw)
    return _EXPORTS[key]


@pytest.mark.parametrize("method,budget", CASES)
def test_two_image_sizes_through_one_export(root: Path, method: str, budget: str) -> None:
    """ORT form (fused kernels, q/k norm before GroupQueryAttention's rotary, interleaved M-RoPE, DeepStack adds)
    and portable graphs: torch's greedy tokens, picks and first logits at N = 192 and 70."""
    d = exported(root, method, budget)
    ref = Pipeline.from_pretrained(NAME, budget=budget, method=method)
    pipes = {form: load_export_pipeline(d, backend="onnxruntime", device="cpu", form=form)
             for form in ("ort", "portable")}
    assert pipes["ort"].backend.form == "ort" and pipes["portable"].backend.form == "portable"
    ns = set()
    for w, h, seed in IMAGES:
        img = make_image(w, h, seed=seed)
        a = ref.generate(img, PROMPT, max_new_tokens=8)
        for form, pipe in pipes.items():
            b = pipe.generate(img, PROMPT, max_new_tokens=8)
            assert b.tokens.tolist() == a.tokens.tolist(), form
            assert b.keep_pre.tolist() == a.keep_pre.tolist(), form
            assert (a.keep_post is None) == (b.keep_post is None) == (method not in ("sts", "fastv"))
            if a.keep_post is not None:
                assert b.keep_post.tolist() == a.keep_post.tolist(), form
            assert np.abs(a.first_logits - b.first_logits).max() <= RECIPE.tolerance.fp32, form
            assert (b.s1, b.s2) == (a.s1, a.s2)
        ns.add(pipes["ort"].prepare_image(img).n)
    assert ns == {192, 70}


def test_deepstack_io_in_the_files(root: Path) -> None:
    """vision returns deepstack_embeds [T, 1, K, Hd]; segment1 (portable and ORT form) takes it with image_start [];
    segment2 and prune take neither."""
    d = exported(root, "sts", "20%")
    m = json.loads((d / "manifest.json").read_text())
    outs = {v["name"]: v for v in m["graphs"]["vision"]["outputs"]}
    assert list(outs) == ["image_embeds", "keep_pre", "deepstack_embeds"]
    assert outs["deepstack_embeds"]["shape"] == [TAPS, 1, "K", HIDDEN] and outs["image_embeds"]["shape"] == [1, "K", HIDDEN]
    assert [v["name"] for v in m["graphs"]["vision"]["inputs"]] == VISION_INPUTS + ["k_pre"]
    for spec in (m["graphs"]["segment1"], m["ort_form"]["segment1"]):
        ins = {v["name"]: v for v in spec["inputs"]}
        assert ins["deepstack_embeds"]["shape"] == [TAPS, "B", "K", HIDDEN] and ins["image_start"]["shape"] == []
        assert ins["position_ids"]["shape"] == [3, "B", "S"]
    for g in ("segment2", "prune"):
        assert not {"deepstack_embeds"} & {v["name"] for v in m["graphs"][g]["inputs"]}
    assert "deepstack_embeds" not in {v["name"] for v in m["ort_form"]["segment2"]["inputs"]}
    form = onnx.load(str(d / m["ort_form"]["segment1"]["onnx"]), load_external_data=False)
    ops = [n.op_type for n in form.graph.node]
    layers = m["prune_layer"]
    assert ops.count("GroupQueryAttention") == layers  # q/k normed, then GQA rotates them (no RotaryEmbedding)
    assert ops.count("SimplifiedLayerNormalization") >= 2 * layers and "RotaryEmbedding" not in ops


@pytest.mark.parametrize("method,budget", CASES)
def test_static_trt_check_passes(root: Path, method: str, budget: str) -> None:
    from sts_export.export.tensorrt.check import check_dir

    d = exported(root, method, budget)
    for version in ("10.3", "10.16", "11.4"):
        reports = check_dir(d, trt_version=version)
        assert reports and all(r.ok for r in reports.values()), {g: r.problems for g, r in reports.items()}


def test_engine_profiles_cover_the_deepstack_rows(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT profiles: vision spans 1..N_max LLM tokens (4 patches each) and 1..K_max; segment1's DeepStack K
    spans 1..K_max at prefill and is the one zero row at decode."""
    d = exported(root, "sts", "20%")
    calls, _ = build_with_stubbed_trt(d, root / "profiles", monkeypatch)
    seen = {stem: kw["profiles"] for stem, kw in calls}
    m = json.loads((d / "manifest.json").read_text())
    n_max, k_max = RECIPE.num_image_tokens, m["k_pre"]
    (vis,) = seen["vision"]
    assert vis["pixel_values"] == ((4, 1536), (4 * n_max, 1536), (4 * n_max, 1536))
    assert vis["interp_indices"] == ((4, 4), (4 * n_max, 4), (4 * n_max, 4)) and vis["k_pre"][2] == (k_max,)
    prefill, decode = seen["segment1"]
    assert prefill["deepstack_embeds"] == ((TAPS, 1, 1, HIDDEN), (TAPS, 1, k_max, HIDDEN), (TAPS, 1, k_max, HIDDEN))
    assert decode["deepstack_embeds"] == ((TAPS, 1, 1, HIDDEN),) * 3
    assert "image_start" in prefill and "deepstack_embeds" not in seen["segment2"][0]


def test_fp16_export_validates(root: Path) -> None:
    """fp16 graphs (DeepStack planes fp16, selection float32) validate against the float32 reference, per graph and
    end to end, and pass the static check."""
    from sts_export.export.tensorrt.check import check_dir

    d = exported(root, "sts", "20%", "fp16")
    rep = json.loads((d / "validation.json").read_text())
    assert rep["passed"] and rep["dtype"] == "float16", rep["summary"]
    assert {r["output"] for r in rep["graphs"]["vision/prefill"]} == {"image_embeds", "keep_pre", "deepstack_embeds"}
    assert rep["end_to_end"]["batch1"]["keep_pre_identical"]
    assert all(r.ok for r in check_dir(d, trt_version="10.3").values())


def test_deepstack_mergers_quantize_with_the_projector(root: Path) -> None:
    """int4: the merger and the T DeepStack mergers (2 linears each) are quantized, the ViT blocks are not; the
    quantized export validates against the float graphs; the TensorRT QDQ form passes the static check."""
    from sts_export.export.quantize import quantize_and_compare
    from sts_export.export.tensorrt.check import check_dir
    from sts_export.export.weights import check_weights

    d = exported(root, "sts", "20%")
    for target in ("onnx", "trt"):
        scheme = check_weights("int4", None, target=target, dtype="fp32")
        q = root / f"int4-{target}"
        shutil.copytree(d, q)
        report = quantize_and_compare(q, scheme, progress=lambda s: None)
        assert report["passed"] and report["end_to_end"]["keep_pre_identical"], report["summary"]
        w = json.loads((q / "manifest.json").read_text())["weights"]["graphs"]["vision"]
        assert sum(w["quantized"].values()) == 2 * (1 + TAPS)
        assert w["float_matmuls"] == 4 * RECIPE.vision.num_layers  # qkv, proj, fc1, fc2 of every block stay float
        if target == "trt":
            for version in ("10.3", "11.4"):
                assert all(r.ok for r in check_dir(q, trt_version=version).values())


def test_run_show_kept_draws_32px_cells(root: Path, tmp_path: Path) -> None:
    """`sts run --show-kept` on a Qwen3-VL export: the kept tokens as their 32-px cells of the resized image, mapped
    onto the original (500 x 400 -> 512 x 384: 12 x 16 cells of 31.25 x 33.3 px)."""
    from click.testing import CliRunner
    from PIL import Image

    from sts_export.cli.main import main

    d = exported(root, "sts", "20%")
    img, out = tmp_path / "in.png", tmp_path / "kept.png"
    make_image(500, 400, seed=3).save(img)
    r = CliRunner().invoke(main, ["run", str(d), "--image", str(img), "--prompt", PROMPT, "--max-new-tokens", "2",
                                  "--show-kept", str(out)])
    assert r.exit_code == 0, r.output[-2000:]
    boxes = load_export_pipeline(d, backend="onnxruntime").prepare_image(Image.open(img)).boxes
    assert boxes.shape == (192, 4)
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], 32 * 500 / 512)
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], 32 * 400 / 384)
    assert Image.open(out).width >= 500


def test_cls_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(StsError, match=r"no \[CLS\] token"):
        export(NAME, budget="10%", method="cls", out=tmp_path / "c", progress=lambda s: None)
    assert not (tmp_path / "c").exists()


def test_parameter_counts_equal_the_modules() -> None:
    """param_counts (cost model, memory estimates) equals our modules' parameters and transformers' Qwen3-VL class
    (built on the meta device from the 4B's config): ViT with its position table and conv bias, the merger and the
    DeepStack mergers, a Qwen3 decoder layer with q/k norms and q/o 4096 wide on a 2560-wide model."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from sts_export.artifact.params import param_counts
    from sts_export.families import qwen3_vl

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    ours = qwen3_vl.build(RECIPE)
    p = param_counts(RECIPE)
    mergers = count(ours.vision.merger) + count(ours.vision.deepstack_merger_list)
    assert (p["vision"], p["projector"]) == (count(ours.vision) - mergers, mergers)
    assert p["decoder_layer"] == count(ours.layers[0]) and p["decoder"] == count(ours.layers) + count(ours.norm)
    r4 = load_recipe("qwen3-vl-4b")
    with torch.device("meta"):
        hf = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**qwen3_vl.hf_config(r4)))
    p4, vis, lm = param_counts(r4), hf.model.visual, hf.model.language_model
    hf_mergers = count(vis.merger) + count(vis.deepstack_merger_list)
    assert (p4["vision"], p4["projector"]) == (count(vis) - hf_mergers, hf_mergers)
    assert (p4["decoder_layer"], p4["embed"]) == (count(lm.layers[0]), count(lm.embed_tokens))


def test_cost_model_counts_the_vit_mergers_and_adds() -> None:
    """bench --cost-only for the 4B at 640 x 480 (N = 300): every ViT block attends to all Np = 1200 patches; the
    merger and the 3 DeepStack mergers run on the K kept tokens; segment1 adds 3 planes of K rows; prefill's linear
    FLOPs are 2 x decoder linear parameters x S1."""
    from sts_export.bench.cost import _linear_params, phase_costs, token_grid

    r4 = load_recipe("qwen3-vl-4b")
    v = r4.vision
    assert token_grid(r4, (640, 480)) == (15, 20)
    full = phase_costs(r4, "full", "none", image_size=(640, 480), prompt_tokens=36)
    sts = phase_costs(r4, "20%", "sts", image_size=(640, 480), prompt_tokens=36)
    np_, c = 1200, v.hidden_size
    vit_linear = 2.0 * np_ * (4 * c * c + 2 * c * v.intermediate_size) * v.num_layers
    vit_attention = 4.0 * c * np_ * np_ * v.num_layers
    patch = 2.0 * np_ * 1536 * c + 8.0 * np_ * c
    assert full["vision"].detail["encoder"] == pytest.approx(patch + vit_linear + vit_attention)
    assert sts["vision"].detail["encoder"] == full["vision"].detail["encoder"]  # the ViT sees every patch
    k = 90  # sts 20 % of N = 300 on 36 layers, prune_layer 18
    assert sts["vision"].detail["deepstack"] == pytest.approx(3 * sts["vision"].detail["projector"])
    assert sts["vision"].detail["projector"] == pytest.approx(full["vision"].detail["projector"] * k / 300)
    assert (full["prefill"].detail["deepstack"], sts["prefill"].detail["deepstack"]) == (3 * 300 * 2560, 3 * k * 2560)
    t = r4.text
    linear_full = full["prefill"].detail["segment1"] + full["prefill"].detail["segment2"]
    attention = 4.0 * t.num_heads * t.head_dim * 336 * 337 / 2 * t.num_layers
    assert linear_full - attention == pytest.approx(2.0 * 336 * _linear_params(r4)["decoder"])
