"""sts_export.show: methods side by side, and KNN consistency over every CLIP layer checked against
transformers' own CLIPVisionModel (hidden states + eager attentions) on the same weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.conftest import hf_llava, make_image
from sts_export import Pipeline, StsError, load_recipe
from sts_export.show.diagnostics import knn_consistency
from sts_export.cli.show import main
from sts_export.show.compare import compare_methods, consistency, full_vision_tower
from sts_export.show.pictures import compare_panels

MODEL = "tiny-llava"
PROMPT = "What is shown in this image?"
W, H = 320, 240  # small original image: panels are W wide (no display_size), 8 px gaps
GAP = 8
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return make_image(W, H, seed=3)


@pytest.fixture(scope="module")
def cons(image: Image.Image) -> dict:
    return consistency(MODEL, image, ks=(5, 10, 20))


# ---------------------------------------------------------------- compare_methods
def test_compare_one_panel_per_method(image: Image.Image) -> None:
    methods = ["sts", "divprune", "cls"]
    pic = compare_methods(MODEL, image, PROMPT, methods, 64)
    assert pic.width == len(methods) * W + GAP * (len(methods) + 1)
    assert pic.height > H  # caption + panel headers above the image
    # the shared model gives exactly what a fresh Pipeline per method gives
    rec = load_recipe(MODEL)
    results = {}
    for m in methods:
        gen = Pipeline.from_pretrained(MODEL, budget=64, method=m).generate(image, PROMPT, max_new_tokens=1)
        results[m] = (gen.keep_pre[0], None if gen.keep_post is None else gen.keep_post[0])
    assert results["sts"][1] is not None and results["cls"][1] is None
    ref = compare_panels(image, results, rec.image_processor, 64)
    assert np.array_equal(np.asarray(pic), np.asarray(ref))


def test_compare_fastv_budget(image: Image.Image) -> None:
    pic = compare_methods(MODEL, image, PROMPT, ["fastv"], 300)
    assert pic.width == W + 2 * GAP
    with pytest.raises(StsError) as e:
        compare_methods(MODEL, image, PROMPT, ["sts", "fastv"], 64)
    msg = str(e.value)
    assert "fastv" in msg and "valid budgets are" in msg and "\n" not in msg


def test_compare_rejects_unknown_and_empty_methods(image: Image.Image) -> None:
    with pytest.raises(StsError, match="unknown method"):
        compare_methods(MODEL, image, PROMPT, ["sts", "magic"], 64)
    with pytest.raises(StsError, match="no method"):
        compare_methods(MODEL, image, PROMPT, [], 64)


# ---------------------------------------------------------------- consistency
def test_consistency_covers_every_layer_and_k(cons: dict) -> None:
    rec = load_recipe(MODEL)
    layers = rec.vision.num_layers
    assert layers > rec.vision.layers_used  # the LLaVA tower is truncated; this must not be
    assert cons["layers"] == list(range(1, layers + 1))
    assert cons["ks"] == [5, 10, 20] and cons["num_tokens"] == rec.num_image_tokens
    assert set(cons["consistency"]) == {"5", "10", "20"}
    for vals in cons["consistency"].values():
        assert len(vals) == layers and all(np.isfinite(vals)) and all(-1.0 < v <= 1.0 for v in vals)
    assert cons["feature_layer"] == rec.vision.layers_used and cons["recipe"] == MODEL


def test_consistency_matches_transformers(cons: dict, image: Image.Image, tiny_dir) -> None:
    """Every layer and k against knn_consistency on transformers' hidden_states[l] / attentions[l-1]."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rec = load_recipe(MODEL)
    p = rec.image_processor
    proc = CLIPImageProcessorPil(size={"shortest_edge": p.shortest_edge},
                                 crop_size={"height": p.crop_size, "width": p.crop_size},
                                 resample=Image.Resampling.BICUBIC, image_mean=list(p.image_mean),
                                 image_std=list(p.image_std))
    pv = torch.from_numpy(proc(image, return_tensors="np")["pixel_values"]).float()  # [1, 3, 336, 336]
    hf = hf_llava(tiny_dir(MODEL))
    with torch.no_grad():
        out = hf.model.vision_tower(pv, output_hidden_states=True, output_attentions=True)
    assert len(out.attentions) == rec.vision.num_layers
    for layer in cons["layers"]:  # 1-based: hidden_states[layer] is that layer's output
        feats = out.hidden_states[layer][0, 1:].double().numpy()  # [N, C]
        scores = out.attentions[layer - 1][0].mean(dim=0)[0, 1:].double().numpy()  # [N]
        for k in cons["ks"]:
            ref = knn_consistency(feats, scores, k)
            assert abs(cons["consistency"][str(k)][layer - 1] - ref) < 1e-4, (layer, k)


def test_random_weights_tower_equals_synthetic_checkpoint() -> None:
    loaded, _, _ = full_vision_tower(MODEL)
    rand, _, desc = full_vision_tower(MODEL, random_weights=True)
    assert "random" in desc
    a, b = loaded.state_dict(), rand.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_consistency_bad_k(image: Image.Image) -> None:
    with pytest.raises(StsError, match="k must be in 1..575"):
        consistency(MODEL, image, ks=(5, 576))


# ---------------------------------------------------------------- CLI
def _env() -> dict[str, str]:
    import sts_export.checkpoint as ck

    return {**os.environ, "STS_CACHE": str(ck.CACHE_DIR), "HF_HUB_OFFLINE": "1"}


def _show(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sts_export.cli", "show", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_files(tmp_path: Path, image: Image.Image, tiny_dir) -> None:
    tiny_dir(MODEL)  # generate the synthetic model once, in the shared test cache
    img = tmp_path / "img.png"
    image.save(img)
    r = _show("consistency", "--model", MODEL, "--image", str(img), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "rep" / "consistency.json").read_text())
    assert data["layers"] == [1, 2, 3] and set(data["consistency"]) == {"5", "10", "20"}
    with Image.open(tmp_path / "rep" / "consistency.png") as im:
        assert im.width > 100 and im.height > 100
    out = tmp_path / "cmp.png"  # the same click group in-process (saves a second interpreter start)
    r = CliRunner().invoke(main, ["compare", "--model", MODEL, "--image", str(img), "--prompt", PROMPT,
                                  "--methods", "sts,cls", "--budget", "64", "--png", str(out)])
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.width == 2 * W + 3 * GAP


def test_cli_bad_image_one_line_exit_2(tmp_path: Path) -> None:
    r = _show("consistency", "--model", MODEL, "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.png" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bad_budget_one_line(tmp_path: Path, image: Image.Image) -> None:
    img = tmp_path / "img.png"
    image.save(img)
    r = CliRunner().invoke(main, ["compare", "--model", MODEL, "--image", str(img), "--prompt", PROMPT,
                                  "--methods", "sts,fastv", "--budget", "64", "--png", str(tmp_path / "x.png")])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "fastv" in r.stderr
    assert not (tmp_path / "x.png").exists()
