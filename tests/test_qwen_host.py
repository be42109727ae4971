"""Qwen2.5-VL host side: pixel_values/grid_thw bit-equal to transformers' PIL processor; rotary angles,
window index and cu_seqlens equal to transformers' own ViT; segment-id masks reproduce its forward;
3-D M-RoPE ids equal to Qwen2_5_VLModel.get_rope_index and to what `generate` feeds at decode; boxes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sts_export.errors import StsError
from sts_export.families import qwen_host as q
from sts_export.recipe import RECIPE_DIR

from .conftest import make_image

QWEN_RECIPES = ("qwen2.5-vl-7b", "qwen2.5-vl-3b", "tiny-qwen2.5-vl")


def recipe_dict(name: str) -> dict:
    """The recipe YAML as a plain dict (load_recipe refuses it until recipe.py has the Qwen fields)."""
    return yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())


TINY = recipe_dict("tiny-qwen2.5-vl")
PUB = recipe_dict("qwen2.5-vl-7b")["image_processor"]  # published min/max pixels
TINY_MAX = TINY["image_processor"]["max_pixels"]


# ---------------------------------------------------------------- preprocessing
def hf_processor(min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def test_auto_image_processor_is_the_pil_one(tmp_path: Path) -> None:
    """Without torchvision, AutoImageProcessor builds Qwen2VLImageProcessorPil from the published config."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision installed: AutoImageProcessor would build the torchvision processor")
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(q.CLIP_MEAN), "image_std": list(q.CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    proc = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(proc).__name__ == "Qwen2VLImageProcessorPil"
    assert (proc.size["shortest_edge"], proc.size["longest_edge"]) == (3136, 12845056)


# (width, height), (min_pixels, max_pixels), what smart_resize does
CASES = [
    ((500, 400), (PUB["min_pixels"], PUB["max_pixels"]), "round"),  # 504 x 392: both sides change
    ((640, 480), (PUB["min_pixels"], PUB["max_pixels"]), "round"),
    ((1000, 700), (3136, TINY_MAX), "max"),  # 700 000 px > max: shrink to <= 200 704
    ((30, 20), (PUB["min_pixels"], PUB["max_pixels"]), "min"),  # 600 px < 3136: grow
    ((1000, 37), (PUB["min_pixels"], PUB["max_pixels"]), "round"),  # 27:1 strip
    ((56, 56), (PUB["min_pixels"], PUB["max_pixels"]), "same"),
]


@pytest.mark.parametrize(("size", "bounds", "kind"), CASES, ids=[f"{s[0]}x{s[1]}-{k}" for s, _, k in CASES])
def test_pixel_values_bit_equal(size: tuple[int, int], bounds: tuple[int, int], kind: str) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    w, h = size
    img = make_image(w, h, seed=w + h)
    rh, rw = q.smart_resize(h, w, 28, *bounds)
    assert (rh, rw) == hf_smart_resize(h, w, 28, *bounds)
    assert {"same": (rh, rw) == (h, w), "round": (rh, rw) != (h, w) and rh * rw <= bounds[1],
            "max": rh * rw <= bounds[1] < h * w, "min": h * w < bounds[0] <= rh * rw}[kind]
    ref = hf_processor(*bounds)(images=img, return_tensors="np")
    pv, grid = q.preprocess_qwen(img, min_pixels=bounds[0], max_pixels=bounds[1])
    assert pv.dtype == np.float32 and pv.shape == (grid[1] * grid[2], 1176)
    assert grid == tuple(int(v) for v in ref["image_grid_thw"][0]) == (1, rh // 14, rw // 14)
    assert np.array_equal(pv, ref["pixel_values"])  # bit for bit


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA"])
def test_pixel_values_bit_equal_other_modes(mode: str) -> None:
    rgb = make_image(333, 222, seed=5)
    img = rgb.convert(mode)
    if mode in ("RGBA", "LA"):  # some transparency: composited on white on both sides
        alpha = Image.fromarray((np.arange(333 * 222).reshape(222, 333) % 256).astype(np.uint8))
        img.putalpha(alpha)
    ref = hf_processor(PUB["min_pixels"], PUB["max_pixels"])(images=img, return_tensors="np")
    pv, grid = q.preprocess_qwen(img, min_pixels=PUB["min_pixels"], max_pixels=PUB["max_pixels"])
    assert np.array_equal(pv, ref["pixel_values"]) and grid == tuple(ref["image_grid_thw"][0].tolist())


def test_smart_resize_matches_on_a_sweep() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    for h in range(1, 700, 13):
        for w in range(1, 700, 17):
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(StsError, match="aspect"):
                    q.smart_resize(h, w)
                continue
            for bounds in ((3136, 12845056), (3136, TINY_MAX), (50000, 100000)):
                got = q.smart_resize(h, w, 28, *bounds)
                assert got == hf_smart_resize(h, w, 28, *bounds), (h, w, bounds)
                if bounds[1] >= 200 * 28 * 28:
                    assert got[0] * got[1] // 784 <= q.max_llm_tokens(bounds[1])


# ---------------------------------------------------------------- vision-graph host inputs vs transformers' ViT
@pytest.fixture(scope="module")
def hf_vit():
    """transformers' Qwen2.5-VL ViT with the tiny recipe's dims (eager attention, fp32, random weights)."""
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    v = TINY["vision"]
    cfg = Qwen2_5_VLVisionConfig(
        depth=v["num_layers"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_heads=v["num_heads"], patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"],
        spatial_merge_size=v["spatial_merge_size"], window_size=v["window_size"],
        fullatt_block_indexes=v["fullatt_block_indexes"], out_hidden_size=v["out_hidden_size"], hidden_act="silu")
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return Qwen2_5_VisionTransformerPretrainedModel(cfg).eval()


GRIDS = [(1, 4, 4), (1, 8, 8), (1, 16, 16), (1, 10, 22), (1, 34, 46), (1, 2, 72), (1, 18, 6)]


@pytest.mark.parametrize("grid", GRIDS, ids=[f"{g[1]}x{g[2]}" for g in GRIDS])
def test_vision_host_inputs_equal_transformers(hf_vit, grid: tuple[int, int, int]) -> None:
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

    m = hf_vit
    head_dim = m.config.hidden_size // m.config.num_heads
    host = q.vision_host_inputs(grid, head_dim=head_dim, merge_size=m.spatial_merge_size,
                                window_size=m.window_size, patch_size=m.patch_size)
    g = torch.tensor([grid])
    np_, n = grid[1] * grid[2], grid[1] * grid[2] // 4

    pos = get_vision_position_ids(g, m.spatial_merge_size)  # [Np, 2]
    assert np.array_equal(q.vision_position_ids(grid), pos.numpy())
    # rot_pos_emb before cos/sin, from the model's own inv_freq buffer; cos/sin from its own forward
    freqs = pos[..., None].float() * m.rotary_pos_emb.inv_freq  # [Np, 2, d/4]
    assert host.rotary_pos.shape == (np_, head_dim // 2) and host.rotary_pos.dtype == np.float32
    assert torch.equal(torch.from_numpy(host.rotary_pos), torch.cat([freqs[:, 0], freqs[:, 1]], -1))
    assert np.array_equal(q.vision_inv_freq(head_dim), m.rotary_pos_emb.inv_freq.numpy())
    cos, sin = m.rotary_pos_emb(torch.zeros(1), pos)
    emb = torch.cat([torch.from_numpy(host.rotary_pos)] * 2, -1)
    assert torch.equal(cos, emb.cos()) and torch.equal(sin, emb.sin())

    win, cu_win = get_vision_window_index(g, m.spatial_merge_size, m.window_size, m.patch_size)
    cu, _ = get_vision_attention_seqlens(g, m.config)
    assert host.window_index.dtype == np.int64 and host.window_index.shape == (n,)
    assert np.array_equal(host.window_index, win.numpy())
    assert host.cu_window_seqlens.dtype == np.int32 and np.array_equal(host.cu_window_seqlens, cu_win.numpy())
    assert host.cu_seqlens.dtype == np.int32 and np.array_equal(host.cu_seqlens, cu.numpy())
    # segment ids: non-decreasing window ids, each window's patches contiguous in window order
    assert np.array_equal(np.bincount(host.window_segments), np.diff(host.cu_window_seqlens))
    assert not host.full_segments.any() and host.full_segments.shape == (np_,)
    assert np.array_equal(np.sort(host.patch_perm), np.arange(np_))
    assert np.array_equal(host.window_index[host.reverse], np.arange(n))


def _segment_forward(m, pixel_values: torch.Tensor, host: q.VisionHostInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The ViT with attention restricted by segment-id equality masks (what the graph builds), window order."""
    x = m.patch_embed(pixel_values)[torch.from_numpy(host.patch_perm)]  # [Np, C] window order
    r = torch.from_numpy(host.rotary_pos_window)
    cos, sin = torch.cat([r, r], -1).cos()[:, None], torch.cat([r, r], -1).sin()[:, None]  # [Np, 1, d]
    masks = {}
    for name, seg in (("window", host.window_segments), ("full", host.full_segments)):
        s = torch.from_numpy(seg)
        masks[name] = torch.where(s[:, None] == s[None, :], 0.0, float("-inf"))  # [Np, Np]

    def rot(t: torch.Tensor) -> torch.Tensor:
        a, b = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-b, a], -1) * sin

    for i, blk in enumerate(m.blocks):
        a = blk.attn
        qkv = a.qkv(blk.norm1(x)).reshape(x.shape[0], 3, a.num_heads, -1).permute(1, 2, 0, 3)  # [3, H, Np, d]
        qh, kh, vh = rot(qkv[0].transpose(0, 1)).transpose(0, 1), rot(qkv[1].transpose(0, 1)).transpose(0, 1), qkv[2]
        att = (qh @ kh.transpose(-1, -2)) * a.scaling + masks["full" if i in m.fullatt_block_indexes else "window"]
        o = (att.softmax(-1) @ vh).transpose(0, 1).reshape(x.shape[0], -1)  # [Np, C]
        x = x + a.proj(o)
        x = x + blk.mlp(blk.norm2(x))
    merged = m.merger(x)[torch.from_numpy(host.reverse)]  # [N, out] raster order
    return x, merged


@pytest.mark.parametrize("size", [(500, 400), (1000, 700), (30, 20)])
def test_segment_masks_reproduce_transformers_vit(hf_vit, size: tuple[int, int]) -> None:
    """Equality masks from the segment ids, with the host rotary angles, give transformers' ViT output;
    the same host tensors passed to transformers' forward as precomputed kwargs change nothing."""
    m = hf_vit
    img = make_image(*size, seed=1)
    qi = q.prepare_qwen_image(img, head_dim=m.config.hidden_size // m.config.num_heads, min_pixels=3136,
                              max_pixels=TINY_MAX)
    pv, grid = torch.from_numpy(qi.pixel_values), torch.tensor([qi.vision.grid_thw])
    with torch.no_grad():
        ref = m(pv, grid_thw=grid)
        mine_x, mine_merged = _segment_forward(m, pv, qi.vision)
        fed = m(pv, grid_thw=grid, window_index=torch.from_numpy(qi.vision.window_index),
                cu_window_seqlens=torch.from_numpy(qi.vision.cu_window_seqlens),
                cu_seqlens=torch.from_numpy(qi.vision.cu_seqlens),
                position_ids=torch.from_numpy(q.vision_position_ids(qi.vision.grid_thw)))
    torch.testing.assert_close(mine_x, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine_merged, ref.pooler_output, atol=1e-5, rtol=1e-5)
    assert torch.equal(fed.pooler_output, ref.pooler_output)
    # Stage 1 features: 2x2 means of the pre-merger output, in LLM-token (raster) order
    feats = q.merge_group_mean(ref.last_hidden_state.numpy(), qi.vision.window_index)  # [N, C]
    proc = ref.last_hidden_state.numpy()[np.argsort(qi.vision.patch_perm)]  # back to processor order
    assert feats.shape == (qi.n, m.config.hidden_size)
    np.testing.assert_allclose(feats, proc.reshape(qi.n, 4, -1).mean(1), rtol=0, atol=1e-6)
    assert set(qi.feeds()) == {"pixel_values", "rotary_pos", "window_index", "window_patches", "patch_slot"}
    # the window table: every patch once, in its own window's row, padding pointing at the row's first patch
    table, slot = qi.vision.window_patches, qi.vision.patch_slot
    assert np.array_equal(table.reshape(-1)[slot], np.arange(slot.shape[0]))
    assert np.array_equal(qi.vision.window_segments, slot // table.shape[1])


# ---------------------------------------------------------------- 3-D M-RoPE ids vs transformers
IMG, VS, VE = TINY["image_token_id"], TINY["vision_start_token_id"], TINY["vision_end_token_id"]


@pytest.fixture(scope="module")
def hf_qwen():
    """A tiny transformers Qwen2_5_VLForConditionalGeneration from the tiny recipe's dims."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    v, t = TINY["vision"], TINY["text"]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                         intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_layers"],
                         num_attention_heads=t["num_heads"], num_key_value_heads=t["num_kv_heads"],
                         rms_norm_eps=t["rms_norm_eps"], max_position_embeddings=t["max_position_embeddings"],
                         rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"],
                                          "mrope_section": list(t["mrope_section"])},
                         bos_token_id=TINY["bos_token_id"], eos_token_id=TINY["eos_token_id"],
                         pad_token_id=TINY["pad_token_id"]),
        vision_config=dict(depth=v["num_layers"], hidden_size=v["hidden_size"],
                           intermediate_size=v["intermediate_size"],
                           num_heads=v["num_heads"], out_hidden_size=v["out_hidden_size"],
                           fullatt_block_indexes=v["fullatt_block_indexes"]),
        image_token_id=IMG, video_token_id=7, vision_start_token_id=VS, vision_end_token_id=VE)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _prompt(grid: tuple[int, int, int], before: int, after: int) -> np.ndarray:
    n = grid[1] * grid[2] // 4
    rng = np.random.default_rng(before * 7 + after)
    raw = np.concatenate([rng.integers(10, 1000, before), [VS, IMG, VE], rng.integers(10, 1000, after)])
    return q.expand_image_pad(raw, n, IMG)


PROMPTS = [((1, 6, 10), 4, 5), ((1, 16, 16), 12, 9), ((1, 2, 72), 1, 3), ((1, 40, 8), 20, 1), ((1, 4, 4), 1, 1)]


@pytest.mark.parametrize(("grid", "before", "after"), PROMPTS)
def test_rope_index_equals_get_rope_index(hf_qwen, grid: tuple[int, int, int], before: int, after: int) -> None:
    ids = _prompt(grid, before, after)
    pos, delta = q.rope_index(ids, grid, IMG, VS)
    t = torch.from_numpy(ids)[None]
    ref, ref_delta = hf_qwen.model.get_rope_index(t, mm_token_type_ids=(t == IMG).int(),
                                                  image_grid_thw=torch.tensor([grid]))
    assert pos.dtype == np.int64 and pos.shape == (3, ids.shape[0])
    assert np.array_equal(pos, ref[:, 0].numpy()) and delta == int(ref_delta)
    p = before + 1  # first image token
    assert np.array_equal(pos[:, p:p + grid[1] * grid[2] // 4], q.image_position_ids(grid, p))


def test_decode_ids_equal_generate(hf_qwen) -> None:
    """The ids transformers' generate feeds the decoder: prefill = rope_index, decode step t = max + 1 + t,
    equal to cache_length + rope_delta on all three axes."""
    grid = (1, 6, 10)
    ids = _prompt(grid, 3, 4)
    pos, delta = q.rope_index(ids, grid, IMG, VS)
    seen: list[torch.Tensor] = []
    rope = hf_qwen.model.language_model.rotary_emb
    orig = rope.forward
    rope.forward = lambda x, position_ids: (seen.append(position_ids.clone()), orig(x, position_ids))[1]
    try:
        t = torch.from_numpy(ids)[None]
        torch.manual_seed(1)
        pv = torch.randn(grid[1] * grid[2], 1176)
        hf_qwen.generate(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=pv,
                         image_grid_thw=torch.tensor([grid]), mm_token_type_ids=(t == IMG).int(),
                         max_new_tokens=4, min_new_tokens=4, do_sample=False)
    finally:
        del rope.forward
    assert np.array_equal(seen[0][:, 0].numpy(), pos)
    steps = q.decode_position_ids(pos, 3)
    got = np.stack([s[:, 0, -1].numpy() for s in seen[1:4]], axis=1)  # [3, 3]
    assert np.array_equal(got, steps)
    s = len(ids)
    assert np.array_equal(steps[0], np.arange(s, s + 3) + delta)  # cache_length + rope_delta
    assert np.array_equal(q.decode_position_ids(pos, 2, start=5)[1], pos.max() + 1 + np.arange(5, 7))


def test_rope_index_errors() -> None:
    grid = (1, 4, 4)
    ids = _prompt(grid, 2, 2)
    with pytest.raises(StsError, match="contiguous run of 16"):
        q.rope_index(ids[:-3], (1, 8, 8), IMG, VS)
    bad = ids.copy()
    bad[2] = 99  # the token before the image is not <|vision_start|>
    with pytest.raises(StsError, match="vision_start"):
        q.rope_index(bad, grid, IMG, VS)
    with pytest.raises(StsError, match="exactly one image token"):
        q.expand_image_pad(ids, 4, IMG)
    text, d = q.rope_index(np.array([10, 11, 12]), grid, IMG, VS)
    assert d == 0 and np.array_equal(text, np.tile(np.arange(3), (3, 1)))
    with pytest.raises(StsError, match="t = 2"):
        q.vision_host_inputs((2, 4, 4), head_dim=16)


# ---------------------------------------------------------------- token layout and boxes
@pytest.mark.parametrize(("size", "bounds"), [((500, 400), (3136, 12845056)), ((1000, 700), (3136, TINY_MAX)),
                                             ((30, 20), (3136, 12845056)), ((1000, 37), (3136, 12845056))])
def test_boxes_tile_the_original_image(size: tuple[int, int], bounds: tuple[int, int]) -> None:
    w, h = size
    lay = q.token_layout(size, min_pixels=bounds[0], max_pixels=bounds[1])
    rh, rw = q.smart_resize(h, w, 28, *bounds)
    rows, cols = lay.llm_grid
    assert lay.resized == (rw, rh) and lay.grid_thw == (1, rh // 14, rw // 14)
    assert (rows, cols) == (rh // 28, rw // 28) and lay.n == rows * cols
    b = lay.boxes.reshape(rows, cols, 4)
    assert lay.boxes.dtype == np.float64
    np.testing.assert_allclose(b[0, 0, :2], 0)
    np.testing.assert_allclose(b[-1, -1, 2:], (w, h))
    np.testing.assert_allclose(b[:, 1:, 0], b[:, :-1, 2])  # cells touch, no gaps
    np.testing.assert_allclose(b[1:, :, 1], b[:-1, :, 3])
    np.testing.assert_allclose(b[..., 2] - b[..., 0], 28 * w / rw)  # equal cells, scaled back per axis
    np.testing.assert_allclose(b[..., 3] - b[..., 1], 28 * h / rh)
    # raster order: token j = (j // cols, j % cols); its centre maps into that 28-px cell of the resized image
    cx, cy = (lay.boxes[:, 0] + lay.boxes[:, 2]) / 2 * rw / w, (lay.boxes[:, 1] + lay.boxes[:, 3]) / 2 * rh / h
    j = np.arange(lay.n)
    assert np.array_equal((cy // 28).astype(int) * cols + (cx // 28).astype(int), j)


def test_window_raster_permutations() -> None:
    host = q.vision_host_inputs((1, 10, 22), head_dim=16)  # 5 x 11 tokens: ragged windows at the edges
    n = 5 * 11
    assert np.array_equal(np.diff(host.cu_window_seqlens) // 4, [16, 16, 12, 4, 4, 3])
    x = np.arange(n) * 10
    assert np.array_equal(q.window_to_raster(q.raster_to_window(x, host.window_index), host.window_index), x)
    assert np.array_equal(q.raster_to_window(x, host.window_index)[:4], [0, 10, 20, 30])  # first window, row 0
    assert np.array_equal(host.patch_perm[:8], [0, 1, 2, 3, 4, 5, 6, 7])  # merge units stay contiguous


# ---------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", QWEN_RECIPES)
def test_recipe_dims_consistent(name: str) -> None:
    r = recipe_dict(name)
    v, t = r["vision"], r["text"]
    assert r["family"] == "qwen2.5-vl"
    assert (v["patch_size"], v["temporal_patch_size"], v["spatial_merge_size"], v["window_size"]) == (14, 2, 2, 112)
    assert (v["hidden_size"] // v["num_heads"]) % 4 == 0  # 2-D rotary: d/4 frequencies per axis
    assert sum(t["mrope_section"]) == t["hidden_size"] // t["num_heads"] // 2
    assert v["out_hidden_size"] == t["hidden_size"] and t["num_heads"] % t["num_kv_heads"] == 0
    full = set(v["fullatt_block_indexes"])
    assert full < set(range(v["num_layers"]))  # at least one windowed block, every index a block
    assert full and 1 <= r["pruning"]["prune_layer"] < t["num_layers"]
    tmpl = r["prompt_template"]
    assert tmpl.count("<image>") == 1 and "{prompt}" in tmpl and "<|vision_start|><image><|vision_end|>" in tmpl
    assert q.max_llm_tokens(r["image_processor"]["max_pixels"]) <= r["max_prompt_tokens"] < r["max_context"]
    if not r.get("synthetic"):
        assert (r["image_token_id"], r["vision_start_token_id"], r["vision_end_token_id"], r["eos_token_id"]) == (
            151655, 151652, 151653, 151645)
        assert (v["num_layers"], v["hidden_size"], v["fullatt_block_indexes"]) == (32, 1280, [7, 15, 23, 31])
    else:
        assert t["num_kv_heads"] < t["num_heads"] and r["pruning"]["prune_layer"] != t["num_layers"] // 2
