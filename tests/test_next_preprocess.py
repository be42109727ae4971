"""LLaVA-NeXT host side: anyres pixel_values bit-equal to transformers' PIL processor, and the token
layout (candidates, packed order with newlines, boxes) equal to LlavaNextModel.pack_image_features."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sts_export.families import llava_next as nx
from sts_export.recipe import load_recipe

from .conftest import make_image

CFG = load_recipe("llava-next-7b").image_processor
G = 24  # 336 / 14 patches per side
# (width, height) -> (rows, cols) the best resolution gives
SIZES = {
    (700, 350): (1, 2),
    (350, 700): (2, 1),
    (640, 480): (2, 2),
    (900, 280): (1, 3),
    (280, 900): (3, 1),
    (13, 9): (1, 2),  # tiny: every pinpoint keeps all pixels, least waste, first one wins
    (4000, 3000): (2, 2),  # huge
    (337, 335): (1, 2),
}


@pytest.fixture(scope="module")
def processor():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        image_grid_pinpoints=[list(p) for p in CFG.image_grid_pinpoints],
        size={"shortest_edge": CFG.shortest_edge},
        crop_size={"height": CFG.crop_size, "width": CFG.crop_size},
        image_mean=list(CFG.image_mean),
        image_std=list(CFG.image_std),
    )


def test_recipes_share_the_processor() -> None:
    assert load_recipe("tiny-llava-next").image_processor == CFG
    assert CFG.image_grid_pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    assert nx.max_candidates(CFG, G) == 2880


def test_select_best_resolution_matches_transformers() -> None:
    from transformers.image_processing_utils import select_best_resolution

    pins = [list(p) for p in CFG.image_grid_pinpoints]
    rng = np.random.default_rng(1)
    sizes = [tuple(s) for s in rng.integers(1, 2500, (400, 2))] + [(336, 672), (672, 336), (1, 1), (336, 336)]
    for hw in sizes:
        assert nx.select_best_resolution(hw, CFG.image_grid_pinpoints) == tuple(select_best_resolution(hw, pins))


@pytest.mark.parametrize("wh", list(SIZES), ids=lambda wh: f"{wh[0]}x{wh[1]}")
def test_pixel_values_bit_exact(processor, wh: tuple[int, int]) -> None:
    w, h = wh
    img = make_image(w, h, seed=w + h) if w * h < 10**6 else make_image(400, 300).resize((w, h), Image.BICUBIC)
    out = processor(img, return_tensors="np")
    ref = out["pixel_values"][0]
    rows, cols = SIZES[wh]
    assert nx.grid_shape((h, w), CFG) == (rows, cols)
    assert out["image_sizes"].tolist() == [[h, w]]  # (height, width) of the original image
    mine = nx.preprocess_anyres(img, CFG)
    assert mine.dtype == np.float32 and ref.dtype == np.float32
    assert mine.shape == ref.shape == (1 + rows * cols, 3, 336, 336)
    assert np.array_equal(mine, ref)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_pixel_values_other_modes(processor, mode: str) -> None:
    rgb = make_image(500, 300, seed=7)
    if mode == "RGBA":
        alpha = np.tile(np.linspace(0, 255, 500).astype(np.uint8), (300, 1))
        img = Image.fromarray(np.dstack([np.asarray(rgb), alpha]), "RGBA")
    elif mode == "P":
        img = rgb.convert("P")
        img.info["transparency"] = 0
    else:
        img = rgb.convert(mode)
    ref = processor(img, return_tensors="np")["pixel_values"][0]
    assert np.array_equal(nx.preprocess_anyres(img, CFG), ref)


def test_padding_is_black_not_mean() -> None:
    """The canvas padding is 0 before rescale/normalize: -mean/std after it (LLaVA-1.5 pads with the mean)."""
    px = nx.preprocess_anyres(Image.new("RGB", (700, 200), (255, 255, 255)), CFG)  # 1x3, pads top and bottom
    black = (0 - np.asarray(CFG.image_mean, np.float32)) / np.asarray(CFG.image_std, np.float32)
    assert np.array_equal(px[1, :, 0, 0], black) and np.array_equal(px[3, :, -1, -1], black)


# --- packing order vs transformers' LlavaNextModel.pack_image_features ------------------------------

@pytest.fixture(scope="module")
def hf_next():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextModel

    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=8, intermediate_size=16,
                              num_hidden_layers=1, num_attention_heads=2)
    text = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=64)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=5,
                          image_grid_pinpoints=[list(p) for p in CFG.image_grid_pinpoints])
    return LlavaNextModel(cfg).eval()


# (width, height): no crop, rows cropped (wide), columns cropped (tall), odd surplus, tiny, huge
PACK_SIZES = [(700, 350), (640, 480), (480, 640), (600, 340), (340, 600), (1200, 340), (340, 1200),
              (800, 300), (300, 800), (13, 9), (4000, 3000), (500, 500), (1000, 333), (333, 1001)]


@pytest.mark.parametrize("wh", PACK_SIZES, ids=lambda wh: f"{wh[0]}x{wh[1]}")
def test_packed_order_matches_transformers(hf_next, wh: tuple[int, int]) -> None:
    w, h = wh
    lay = nx.token_layout((h, w), CFG, G)
    t = lay.num_tiles
    feats = torch.arange(t * G * G, dtype=torch.float32).reshape(t, G * G, 1).expand(t, G * G, 2)  # t*576 + p
    sentinel = -7.0
    newline = torch.full((2,), sentinel)
    with torch.no_grad():
        packed, lens = hf_next.pack_image_features([feats], torch.tensor([[h, w]]), "default", newline)
    ref = packed[0][:, 0].numpy()
    assert int(lens[0]) == len(lay.packed) == len(ref)
    mine = np.where(lay.packed == t * G * G, sentinel, lay.packed.astype(np.float32))
    assert np.array_equal(mine, ref)
    assert lay.newline == t * G * G
    assert np.array_equal(lay.candidates, lay.packed[lay.packed != lay.newline])
    assert lay.candidates.dtype == np.int64 and lay.packed.dtype == np.int64
    assert lay.n == len(lay.candidates) == G * G + lay.height * lay.width
    assert np.array_equal(lay.candidates[: G * G], np.arange(G * G))
    assert (lay.packed == lay.newline).sum() == lay.height  # one newline per row of the unpadded grid
    assert lay.n <= nx.max_candidates(CFG, G)
    # the crop offsets say which side was cut
    if w / h > lay.cols / lay.rows:
        assert lay.width == lay.cols * G and lay.left == 0 and lay.top >= 0
    else:
        assert lay.height == lay.rows * G and lay.top == 0 and lay.left >= 0


def test_unpad_crops_rows_and_columns() -> None:
    assert nx.unpadded_grid((480, 640), 2, 2, G) == (36, 48, 6, 0)  # 640x480 -> 576 + 1728 (DESIGN.md)
    assert nx.token_layout((480, 640), CFG, G).n == 576 + 1728
    h, w, top, left = nx.unpadded_grid((340, 600), 2, 2, G)  # 27.2 rows -> 27, surplus 21 is odd
    assert (h, w, top, left) == (28, 48, 10, 0)
    assert nx.unpadded_grid((600, 340), 2, 2, G) == (48, 28, 0, 10)
    assert nx.unpadded_grid((350, 700), 1, 2, G) == (24, 48, 0, 0)


# --- boxes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wh", PACK_SIZES, ids=lambda wh: f"{wh[0]}x{wh[1]}")
def test_boxes(wh: tuple[int, int]) -> None:
    w, h = wh
    lay = nx.token_layout((h, w), CFG, G)
    b = lay.boxes
    assert b.shape == (lay.n, 4)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()  # every kept token shows some image
    base = b[: G * G].reshape(G, G, 4)
    assert np.allclose(base[0, 0], [0, 0, w / G, h / G]) and np.allclose(base[-1, -1, 2:], [w, h])
    assert np.allclose(base[:, 1:, 0], base[:, :-1, 2]) and np.allclose(base[1:, :, 1], base[:-1, :, 3])
    area = ((base[..., 2] - base[..., 0]) * (base[..., 3] - base[..., 1])).sum()
    assert np.isclose(area, w * h)  # the base grid tiles the whole picture
    tiles = b[G * G:].reshape(lay.height, lay.width, 4)
    assert np.allclose(tiles[:, 1:, 0], tiles[:, :-1, 2]) and np.allclose(tiles[1:, :, 1], tiles[:-1, :, 3])
    # the unpadded grid covers the picture up to less than one token per side (unpad works in token
    # units, so it may drop a row that shows a few image pixels, or keep one that is partly padding)
    fit_h, fit_w = nx._fit_size((h, w), (lay.rows * 336, lay.cols * 336))
    tok_x, tok_y = 14 * w / fit_w, 14 * h / fit_h  # one token in original pixels
    assert tiles[0, 0, 0] < tok_x and tiles[0, 0, 1] < tok_y
    assert tiles[-1, -1, 2] > w - tok_x and tiles[-1, -1, 3] > h - tok_y


def test_boxes_follow_the_resize() -> None:
    """700x350 fills a 1x2 canvas exactly (scale 0.96): tile token j spans 14 / 0.96 original pixels."""
    lay = nx.token_layout((350, 700), CFG, G)
    tiles = lay.boxes[G * G:].reshape(24, 48, 4)
    assert np.allclose(tiles[3, 30], [30 * 14 / 0.96, 3 * 14 / 0.96, 31 * 14 / 0.96, 4 * 14 / 0.96])


def test_boxes_of_padded_image_in_unpadded_area() -> None:
    """Wide image, rows padded: boxes map back through the paste offset and the resize scale."""
    w, h = 1200, 340  # 1x3 canvas 336x1008, resized to 1008x286 (ceil 285.6), pasted at y = 25
    lay = nx.token_layout((h, w), CFG, G)
    assert (lay.top, lay.height) == (2, 20)  # round(340 * 72 / 1200) = 20 rows kept, 2 cut each side
    tiles = lay.boxes[G * G:].reshape(lay.height, lay.width, 4)
    sx, sy = 1200 / 1008, 340 / 286
    assert np.allclose(tiles[0, 0], [0, (28 - 25) * sy, 14 * sx, (42 - 25) * sy])  # canvas rows 28..42
    assert np.allclose(tiles[-1, -1], [(1008 - 14) * sx, (294 - 25) * sy, w, (308 - 25) * sy])


def test_boxes_clip_rows_that_are_partly_padding() -> None:
    """600x340 on a 2x2 canvas: unpad keeps 28 rows (odd surplus); first and last are partly padding."""
    w, h = 600, 340  # resized to 672x381 (ceil 380.8), pasted at y = 145; kept rows 10..37 = y 140..532
    lay = nx.token_layout((h, w), CFG, G)
    tiles = lay.boxes[G * G:].reshape(lay.height, lay.width, 4)
    sy = 340 / 381
    assert tiles[0, 0, 1] == 0 and np.isclose(tiles[0, 0, 3], (154 - 145) * sy)
    assert np.isclose(tiles[-1, 0, 1], (518 - 145) * sy) and tiles[-1, 0, 3] == h  # image ends at y = 526
