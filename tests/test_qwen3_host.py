"""Qwen3-VL host side against transformers: pixel_values/grid_thw bit-equal to the processor transformers builds
for a Qwen3-VL checkpoint (Qwen2VLImageProcessorPil with 16-px patches, mean/std 0.5, 65536..16777216 px); the
resampled position table's taps and weights equal to get_vision_interpolation_indices_and_weights (and to
F.interpolate of the table); the 2-D rotary equal to Qwen3VLVisionRotaryEmbedding; 3-D M-RoPE ids equal to
Qwen3VLModel.get_rope_index and to what its generate feeds at decode; the interleaved M-RoPE slots and the
recipes' numbers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sts_export.errors import StsError
from sts_export.families import qwen_host as q25
from sts_export.families import qwen3_vl as q3
from sts_export.recipe import RECIPE_DIR, load_recipe

from .conftest import make_image

TINY = load_recipe("tiny-qwen3-vl")
REAL = ("qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b")
PUB = (q3.MIN_PIXELS, q3.MAX_PIXELS)  # the published preprocessor_config.json's bounds
TINY_MAX = TINY.image_processor.max_pixels
IMG, VS, VE = TINY.image_token_id, TINY.vision_start_token_id, TINY.vision_end_token_id


# ---------------------------------------------------------------- preprocessing
def published_preprocessor(tmp_path: Path, min_pixels: int = PUB[0], max_pixels: int = PUB[1]):
    """transformers' image processor from a preprocessor_config.json with the published Qwen3-VL fields."""
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels}, "patch_size": 16,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}))
    return AutoImageProcessor.from_pretrained(tmp_path)


def test_auto_image_processor(tmp_path: Path) -> None:
    """The published config builds Qwen2VLImageProcessor(Pil) with 16-px patches and the 0.5 mean/std."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision installed: AutoImageProcessor would build the torchvision processor")
    proc = published_preprocessor(tmp_path)
    assert type(proc).__name__ == "Qwen2VLImageProcessorPil"
    assert (proc.patch_size, proc.merge_size, proc.temporal_patch_size) == (16, 2, 2)
    assert list(proc.image_mean) == list(q3.MEAN) and list(proc.image_std) == list(q3.STD)
    assert (proc.size["shortest_edge"], proc.size["longest_edge"]) == PUB
    # the synthetic checkpoints' preprocessor_config.json builds the same processor with the recipe's bounds
    sub = tmp_path / "synthetic"
    sub.mkdir()
    (sub / "preprocessor_config.json").write_text(json.dumps(q3.preprocessor_config(TINY)))
    from transformers import AutoImageProcessor

    tiny = AutoImageProcessor.from_pretrained(sub)
    assert type(tiny) is type(proc) and (tiny.size["shortest_edge"], tiny.size["longest_edge"]) == (PUB[0], TINY_MAX)
    assert tiny.patch_size == 16 and list(tiny.image_mean) == [0.5] * 3


# (width, height), (min_pixels, max_pixels), what smart_resize does at factor 32
CASES = [
    ((448, 288), (PUB[0], TINY_MAX), "same"),
    ((500, 350), (PUB[0], TINY_MAX), "round"),
    ((640, 480), (PUB[0], TINY_MAX), "max"),  # 307 200 px > 262 144: shrink
    ((300, 200), PUB, "min"),  # 60 000 px < 65 536: grow
    ((1000, 37), PUB, "min"),  # a 27:1 strip
    ((1920, 1080), PUB, "round"),
    ((1500, 1000), (PUB[0], 1003520), "max"),  # the export default cap (980 tokens)
]


@pytest.mark.parametrize(("size", "bounds", "kind"), CASES, ids=[f"{s[0]}x{s[1]}-{k}" for s, _, k in CASES])
def test_pixel_values_bit_equal(tmp_path: Path, size: tuple[int, int], bounds: tuple[int, int], kind: str) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    w, h = size
    img = make_image(w, h, seed=w + h)
    rh, rw = q25.smart_resize(h, w, 32, *bounds)
    assert (rh, rw) == hf_smart_resize(h, w, 32, *bounds)
    assert {"same": (rh, rw) == (h, w), "round": (rh, rw) != (h, w) and bounds[0] <= rh * rw <= bounds[1],
            "max": rh * rw <= bounds[1] < h * w, "min": h * w < bounds[0] <= rh * rw}[kind]
    ref = published_preprocessor(tmp_path, *bounds)(images=img, return_tensors="np")
    rec = TINY.replace(image_processor=TINY.image_processor.__class__(min_pixels=bounds[0], max_pixels=bounds[1],
                                                                      image_mean=q3.MEAN, image_std=q3.STD))
    qi = q3.prepare_qwen3_image(img, rec)
    grid = qi.layout.grid_thw
    assert qi.pixel_values.dtype == np.float32 and qi.pixel_values.shape == (grid[1] * grid[2], 1536)
    assert grid == tuple(int(v) for v in ref["image_grid_thw"][0]) == (1, rh // 16, rw // 16)
    assert np.array_equal(qi.pixel_values, ref["pixel_values"])  # bit for bit
    assert qi.n == grid[1] * grid[2] // 4 and qi.layout.llm_grid == (rh // 32, rw // 32)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_pixel_values_bit_equal_other_modes(tmp_path: Path, mode: str) -> None:
    img = make_image(333, 222, seed=5).convert(mode)
    ref = published_preprocessor(tmp_path)(images=img, return_tensors="np")
    pv, grid = q25.preprocess_qwen(img, patch_size=16, min_pixels=PUB[0], max_pixels=PUB[1], mean=q3.MEAN, std=q3.STD)
    assert np.array_equal(pv, ref["pixel_values"]) and grid == tuple(ref["image_grid_thw"][0].tolist())


# ---------------------------------------------------------------- the resampled position table
GRIDS = [(1, 16, 16), (1, 18, 28), (1, 26, 36), (1, 48, 48), (1, 2, 200), (1, 60, 84), (1, 2, 2)]


@pytest.mark.parametrize("side", [24, 48])
@pytest.mark.parametrize("grid", GRIDS, ids=[f"{g[1]}x{g[2]}" for g in GRIDS])
def test_interpolation_taps_equal_transformers(grid: tuple[int, int, int], side: int) -> None:
    """Indices equal and weights bit-equal to transformers' helper (what Qwen3VLVisionModel.forward calls with
    bilinear, align_corners, merge 2); the weighted sum of table rows equals F.interpolate of the table."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    idx, w = q3.interpolation_taps(grid, side, 2)
    ref_idx, ref_w = get_vision_interpolation_indices_and_weights(torch.tensor([grid]), num_grid_per_side=side,
                                                                  mode="bilinear", align_corners=True,
                                                                  spatial_merge_size=2)
    np_ = grid[1] * grid[2]
    assert idx.dtype == np.int64 and idx.shape == (np_, 4) and w.dtype == np.float32 and w.shape == (np_, 4)
    assert np.array_equal(idx, ref_idx.numpy()) and np.array_equal(w, ref_w.numpy())
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    # independent check: F.interpolate of a random table, re-ordered into processor (merge-unit) order
    table = torch.randn(side * side, 8, generator=torch.Generator().manual_seed(side))
    mine = (table[torch.from_numpy(idx)] * torch.from_numpy(w)[:, :, None]).sum(1)  # [Np, 8]
    up = F.interpolate(table.T.reshape(1, 8, side, side), size=grid[1:], mode="bilinear", align_corners=True)[0]
    rc = q25.vision_position_ids(grid)  # [Np, 2] (row, col) in processor order
    torch.testing.assert_close(mine, up[:, rc[:, 0], rc[:, 1]].T, atol=1e-4, rtol=1e-4)  # other rounding order


def test_table_side() -> None:
    assert q3.table_side(2304) == 48 and q3.table_side(576) == 24
    with pytest.raises(StsError, match="square"):
        q3.table_side(2000)


# ---------------------------------------------------------------- 2-D rotary
@pytest.mark.parametrize(("hidden", "heads"), [(64, 4), (1024, 16), (1152, 16), (256, 16)])
def test_rotary_equal_transformers(hidden: int, heads: int) -> None:
    """Host rotary angles -> cos/sin equal Qwen3VLVisionRotaryEmbedding's (its inv_freq, its recomposition), for the
    tiny, 2B/4B (head_dim 64), 8B (72) and 4b-cpu ViTs."""
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionRotaryEmbedding
    from transformers.vision_utils import get_vision_position_ids

    rope = Qwen3VLVisionRotaryEmbedding(Qwen3VLVisionConfig(hidden_size=hidden, num_heads=heads))
    grid = (1, 18, 28)
    pos = get_vision_position_ids(torch.tensor([grid]), 2)  # [Np, 2]
    assert np.array_equal(q25.vision_position_ids(grid), pos.numpy())
    ang = q25.rotary_pos(grid, hidden // heads, 2, 10000.0)  # [Np, d/2]
    assert np.array_equal(q25.vision_inv_freq(hidden // heads), rope.inv_freq.numpy())
    cos, sin = rope(torch.zeros(1), pos)  # [Np, d]
    emb = torch.cat([torch.from_numpy(ang)] * 2, -1)
    assert torch.equal(cos, emb.cos()) and torch.equal(sin, emb.sin())


# ---------------------------------------------------------------- interleaved M-RoPE
def test_mrope_axes_match_transformers_recomposition() -> None:
    """Slot j of the interleaved layout reads the axis transformers' recomposition_frequencies gives it, for the real
    sections and the tiny ones; the contiguous layout is Qwen2.5-VL's."""
    from sts_export.families.layers import mrope_axes

    for section in ((24, 20, 20), (6, 5, 5)):
        half = sum(section)
        freq = torch.arange(3)[:, None, None, None].expand(3, 1, 1, half).clone()  # slot value = its axis
        freqs_thw = freq[0].clone()
        for dim, offset in enumerate((1, 2), start=1):  # transformers' Qwen3VLTextRotaryEmbedding, verbatim logic
            idx = slice(offset, section[dim] * 3, 3)
            freqs_thw[..., idx] = freq[dim, ..., idx]
        assert mrope_axes(section, interleaved=True) == freqs_thw[0, 0].tolist()
    assert mrope_axes((16, 24, 24))[:17] == [0] * 16 + [1] and mrope_axes((16, 24, 24))[-1] == 2


def test_text_rotary_equal_transformers() -> None:
    """cos/sin of our rope_cos_sin at gapped 3-D ids equal Qwen3VLTextRotaryEmbedding's (tiny and real dims)."""
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from sts_export.families.layers import rope_cos_sin

    for head_dim, section, theta in ((32, (6, 5, 5), 5e6), (128, (24, 20, 20), 5e6)):
        cfg = Qwen3VLTextConfig(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                                    "mrope_section": list(section),
                                                                    "mrope_interleaved": True})
        rope = Qwen3VLTextRotaryEmbedding(cfg)
        ids = torch.stack([torch.arange(40) * 3, torch.arange(40) + 7, torch.arange(40) % 9])[:, None]  # [3, 1, 40]
        ref_cos, ref_sin = rope(torch.zeros(1, dtype=torch.float32), ids)  # [1, 40, d]
        cos, sin = rope_cos_sin(ids, head_dim, theta, torch.float32, section, interleaved=True)  # [1, 1, 40, d]
        assert torch.equal(cos[:, 0], ref_cos) and torch.equal(sin[:, 0], ref_sin)


# ---------------------------------------------------------------- 3-D M-RoPE ids vs transformers
@pytest.fixture(scope="module")
def hf_qwen3(tiny_dir):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir("tiny-qwen3-vl"), dtype=torch.float32).eval()


def _prompt(grid: tuple[int, int, int], before: int, after: int) -> np.ndarray:
    n = grid[1] * grid[2] // 4
    rng = np.random.default_rng(before * 7 + after)
    raw = np.concatenate([rng.integers(10, 1000, before), [VS, IMG, VE], rng.integers(10, 1000, after)])
    return q25.expand_image_pad(raw, n, IMG)


PROMPTS = [((1, 6, 10), 4, 5), ((1, 16, 16), 12, 9), ((1, 2, 72), 1, 3), ((1, 40, 8), 20, 1), ((1, 4, 4), 1, 1)]


@pytest.mark.parametrize(("grid", "before", "after"), PROMPTS)
def test_rope_index_equals_get_rope_index(hf_qwen3, grid: tuple[int, int, int], before: int, after: int) -> None:
    ids = _prompt(grid, before, after)
    pos, delta = q25.rope_index(ids, grid, IMG, VS)
    t = torch.from_numpy(ids)[None]
    ref, ref_delta = hf_qwen3.model.get_rope_index(t, mm_token_type_ids=(t == IMG).int(),
                                                   image_grid_thw=torch.tensor([grid]))
    assert pos.dtype == np.int64 and pos.shape == (3, ids.shape[0])
    assert np.array_equal(pos, ref[:, 0].numpy()) and delta == int(ref_delta)


def test_family_position_ids_and_decode_equal_generate(hf_qwen3) -> None:
    """The family's position_ids (what the pipeline feeds) = get_rope_index of the expanded prompt; the ids generate
    feeds at decode step t = max(prompt ids) + 1 + t on all three axes."""
    from sts_export.families import ImageInput
    from sts_export.tokenizer import Prompt

    grid = (1, 6, 10)
    ids = _prompt(grid, 3, 4)
    at = int(np.flatnonzero(ids == IMG)[0])
    n = grid[1] * grid[2] // 4
    image = ImageInput({}, n=n, n_full=n, grid=grid, images=1)
    pos = q3.position_ids(image, Prompt(ids[:at], ids[at + n:]), TINY)
    seen: list[torch.Tensor] = []
    rope = hf_qwen3.model.language_model.rotary_emb
    orig = rope.forward
    rope.forward = lambda x, position_ids: (seen.append(position_ids.clone()), orig(x, position_ids))[1]
    try:
        t = torch.from_numpy(ids)[None]
        torch.manual_seed(1)
        hf_qwen3.generate(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=torch.randn(60, 1536),
                          image_grid_thw=torch.tensor([grid]), mm_token_type_ids=(t == IMG).int(),
                          max_new_tokens=4, min_new_tokens=4, do_sample=False)
    finally:
        del rope.forward
    assert np.array_equal(seen[0][:, 0].numpy(), pos)
    got = np.stack([s[:, 0, -1].numpy() for s in seen[1:4]], axis=1)  # [3, 3]
    assert np.array_equal(got, q25.decode_position_ids(pos, 3))


# ---------------------------------------------------------------- feeds, errors
def test_prepare_image_feeds() -> None:
    img = make_image(500, 350, seed=3)
    inp = q3.prepare_image(img, TINY)
    assert list(inp.feeds) == q3.vision_inputs(True) == ["pixel_values", "rotary_pos", "interp_indices", "interp_weights"]
    np_ = inp.grid[1] * inp.grid[2]
    assert [inp.feeds[k].shape for k in inp.feeds] == [(np_, 1536), (np_, 8), (np_, 4), (np_, 4)]
    assert inp.n == inp.n_full == np_ // 4 == inp.boxes.shape[0] and inp.size == (500, 350) and inp.images == 1
    np.testing.assert_allclose(inp.boxes[-1, 2:], (500, 350))  # 32-px cells tile the original image
    with pytest.raises(StsError, match="one image per call"):
        q3.prepare_image([img, img], TINY)
    with pytest.raises(StsError, match="aspect ratio"):
        q3.prepare_image(make_image(1000, 4, seed=1), TINY)


# ---------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", REAL)
def test_published_recipes(name: str) -> None:
    """The published dims (recipes/qwen3-vl-*.yaml name their sources) and what they imply."""
    r = load_recipe(name)
    v, t = r.vision, r.text
    dims = {  # ViT depth, width, taps, out | text layers, width, MLP, heads, kv heads, tied
        "qwen3-vl-2b": ((24, 1024, (5, 11, 17), 2048), (28, 2048, 6144, 16, 8, True)),
        "qwen3-vl-4b": ((24, 1024, (5, 11, 17), 2560), (36, 2560, 9728, 32, 8, True)),
        "qwen3-vl-8b": ((27, 1152, (8, 16, 24), 4096), (36, 4096, 12288, 32, 8, False)),
    }[name]
    assert (v.num_layers, v.hidden_size, v.deepstack_visual_indexes, v.out_hidden_size) == dims[0]
    assert (t.num_layers, t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads,
            t.tie_word_embeddings) == dims[1]
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size, v.num_position_embeddings) == (16, 2, 2, 2304)
    assert (t.head_dim, t.mrope_section, t.mrope_interleaved, t.qk_norm, t.attention_bias) == (
        128, (24, 20, 20), True, True, False)
    assert (t.rope_theta, t.vocab_size, t.max_position_embeddings) == (5e6, 151936, 262144)
    assert (r.image_token_id, r.vision_start_token_id, r.vision_end_token_id, r.eos_token_id, r.stop_token_ids) == (
        151655, 151652, 151653, 151645, (151645, 151643))
    assert (r.image_processor.min_pixels, r.image_processor.max_pixels, r.image_processor.image_mean) == (
        *PUB, (0.5, 0.5, 0.5))
    assert r.pruning.prune_layer == t.num_layers // 2 > len(v.deepstack_visual_indexes) - 1
    assert r.num_image_tokens == 16384 and r.prompt_template.startswith("<|im_start|>user\n<|vision_start|>")
    # the recipe equals what its published config.json derives (family defaults for what is not in the file)
    assert r.vision.hidden_size // r.vision.num_heads in (64, 72)


def test_recipe_from_published_config(tmp_path: Path) -> None:
    """The 4B's config.json in its published form (text fields under text_config with rope_scaling and rope_theta,
    vision_config model_type "qwen3_vl") and preprocessor_config.json derive the qwen3-vl-4b recipe's architecture."""
    from sts_export.families import recipe_from_hf_config

    r = load_recipe("qwen3-vl-4b")
    v, t = r.vision, r.text
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
        "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "tie_word_embeddings": True,
        "text_config": {"attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
                        "hidden_act": "silu", "hidden_size": 2560, "intermediate_size": 9728,
                        "max_position_embeddings": 262144, "model_type": "qwen3_vl_text", "num_attention_heads": 32,
                        "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                         "rope_type": "default"},
                        "rope_theta": 5000000, "tie_word_embeddings": True, "vocab_size": 151936},
        "vision_config": {"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
                          "hidden_size": 1024, "in_channels": 3, "intermediate_size": 4096, "model_type": "qwen3_vl",
                          "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2560,
                          "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "pad_token_id": 151643,
                                                                 "eos_token_id": [151645, 151643]}))
    published_preprocessor(tmp_path)
    d = recipe_from_hf_config(tmp_path)
    assert d.family == "qwen3-vl" and (d.vision, d.text) == (v, t)
    assert (d.image_processor.min_pixels, d.image_processor.max_pixels) == PUB
    assert (d.stop_token_ids, d.pad_token_id, d.pruning.prune_layer) == (r.stop_token_ids, 151643, 18)
    assert d.prompt_template == r.prompt_template


def test_recipe_refusals(tmp_path: Path) -> None:
    """prune_layer at or below the last DeepStack layer, and FastV's layer 2 under three taps, in one line each."""
    from sts_export.pruning.budget import prune_layer_for

    text = (RECIPE_DIR / "tiny-qwen3-vl.yaml").read_text()
    (tmp_path / "bad.yaml").write_text(text.replace("prune_layer: 3,", "prune_layer: 1,"))
    with pytest.raises(StsError, match="at or below decoder layer 1") as e:
        load_recipe(tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)
    assert prune_layer_for("fastv", TINY) == 2  # two taps: layers 0, 1 are before FastV's prune
    with pytest.raises(StsError, match="fastv.*DeepStack features up to layer 2") as e:
        prune_layer_for("fastv", load_recipe("qwen3-vl-4b"))
    assert "\n" not in str(e.value)
    (tmp_path / "bad2.yaml").write_text(text.replace("mrope_section: [6, 5, 5]", "mrope_section: [6, 5, 4]"))
    with pytest.raises(StsError, match="must sum to head_dim / 2 = 16"):
        load_recipe(tmp_path / "bad2.yaml")
