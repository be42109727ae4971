"""patch_boxes must invert HF's own CLIP/LLaVA preprocessing; the drawings must style patches as documented."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from sts_export.show import pictures as vis
from sts_export.recipe import ImageProcessorConfig
from sts_export.show.pictures import compare_panels, draw_kept, patch_boxes, token_index_map

PATCH, GRID, SIZE = 14, 24, 336


def hf_pixels(img: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """HF's processed crop as raw 0..255 values: [crop, crop, 3] float64 (no rescale/normalise)."""
    cls = LlavaImageProcessorPil if cfg.do_pad else CLIPImageProcessorPil
    extra = {"do_pad": True} if cfg.do_pad else {}
    proc = cls(
        size={"shortest_edge": cfg.shortest_edge},
        crop_size={"height": cfg.crop_size, "width": cfg.crop_size},
        resample=Image.Resampling.BICUBIC,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        do_rescale=False,
        do_normalize=False,
        **extra,
    )
    px = proc(img, return_tensors="np")["pixel_values"][0]  # [3, crop, crop]
    return px.transpose(1, 2, 0).astype(np.float64)  # [crop, crop, 3]


def patch_of(px: np.ndarray, i: int) -> np.ndarray:
    r, c = divmod(i, GRID)
    return px[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]  # [14, 14, 3]


SLOPE, WRAP = 4, 64  # coordinate ramps: value = SLOPE * x mod 256, wrapping every WRAP px


def ramp_images(w: int, h: int) -> tuple[Image.Image, Image.Image]:
    """Two images whose pixels encode their own x (first) or y (second): R = 4*c % 256 (fine, a
    linear ramp bicubic reproduces), G = 5 + 20*(c // 64) (which 64-px block), B = 0."""
    y, x = np.mgrid[0:h, 0:w]
    return tuple(
        Image.fromarray(np.stack([SLOPE * c % 256, 5 + 20 * (c // WRAP), 0 * c], axis=-1).astype(np.uint8))
        for c in (x, y)
    )


def decode_centre(p: np.ndarray) -> float:
    """Continuous source coordinate of a processed patch's centre from a ramp image's pixels."""
    block = int(round((np.median(p[..., 1]) - 5) / 20))
    # mean over the patch = the ramp at the patch centre; pixel i holds continuous coordinate i + 0.5
    return p[..., 0].mean() / SLOPE + 0.5 + WRAP * block


# ---------------------------------------------------------------- geometry vs HF's processor


@pytest.mark.parametrize("do_pad", [False, True])
def test_square_336_is_identity(do_pad: bool) -> None:
    # each 14-px patch coloured by its token index: HF must leave it untouched (no pad, no resize)
    idx = np.arange(GRID * GRID).reshape(GRID, GRID)
    colours = np.stack([idx // GRID * 10, idx % GRID * 10, np.full_like(idx, 77)], axis=-1)  # [24, 24, 3]
    img = Image.fromarray(np.kron(colours, np.ones((PATCH, PATCH, 1))).astype(np.uint8))
    cfg = ImageProcessorConfig(do_pad=do_pad)
    px = hf_pixels(img, cfg)
    for i in range(GRID * GRID):
        p = patch_of(px, i)
        assert (p == p[0, 0]).all()
        assert (round(p[0, 0, 0] / 10), round(p[0, 0, 1] / 10)) == divmod(i, GRID)
    boxes = patch_boxes((SIZE, SIZE), cfg)
    r, c = np.divmod(np.arange(GRID * GRID), GRID)
    expected = np.stack([c * PATCH, r * PATCH, (c + 1) * PATCH, (r + 1) * PATCH], axis=1)
    np.testing.assert_array_equal(boxes, expected)


CASES = [
    ((500, 400), False), ((500, 400), True),
    ((300, 600), False), ((300, 600), True),
    ((500, 399), False), ((500, 399), True),  # odd crop surplus (421 - 336) and odd pad difference (101)
    ((333, 518), False), ((333, 518), True),  # non-integer scales, resize truncation
    ((200, 150), False), ((200, 150), True),  # upscaling
]


@pytest.mark.parametrize("size,do_pad", CASES)
def test_patch_boxes_match_hf_processor(size: tuple[int, int], do_pad: bool) -> None:
    w, h = size
    cfg = ImageProcessorConfig(do_pad=do_pad)
    img_x, img_y = ramp_images(w, h)
    px_x, px_y = hf_pixels(img_x, cfg), hf_pixels(img_y, cfg)  # [336, 336, 3] each
    boxes = patch_boxes(size, cfg)  # [576, 4]
    assert boxes.shape == (GRID * GRID, 4)
    bg = np.array([int(m * 255) for m in cfg.image_mean], np.float64)

    g = vis.preprocess_geometry(size, cfg)  # one full patch's area in original pixels:
    full_area = (PATCH * g.padded_size[0] / g.resized_size[0]) * (PATCH * g.padded_size[1] / g.resized_size[1])
    margin = 3.0  # stay off block wraps, image borders and padding, where bicubic mixes values

    def off_wraps(lo: float, hi: float) -> bool:
        return all(hi <= WRAP * j - margin or lo >= WRAP * j + margin for j in range(1, int(hi) // WRAP + 1))

    checked = 0
    for i in range(GRID * GRID):
        px, py = patch_of(px_x, i), patch_of(px_y, i)  # [14, 14, 3]
        x0, y0, x1, y1 = boxes[i]
        if np.isnan(x0):
            assert do_pad, "without padding every patch shows image content"
            assert np.abs(px[5:9, 5:9] - bg).max() <= 2, f"token {i}: NaN box but HF patch is not padding"
            continue
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        if do_pad:  # share of the patch showing the image (not padding) = clipped box area / full area
            content = (np.abs(px - bg).max(axis=-1) > 3).mean()
            assert abs(content - (x1 - x0) * (y1 - y0) / full_area) <= 0.15, f"token {i}"
        if not (x0 >= margin and y0 >= margin and x1 <= w - margin and y1 <= h - margin):
            continue  # near the image border (or padding): bicubic mixes in outside values
        if off_wraps(x0, x1):
            cx = decode_centre(px)
            assert abs(cx - (x0 + x1) / 2) < 0.2, f"token {i}: x centre {cx:.3f} vs box {(x0 + x1) / 2:.3f}"
            checked += 1
        if off_wraps(y0, y1):
            cy = decode_centre(py)
            assert abs(cy - (y0 + y1) / 2) < 0.2, f"token {i}: y centre {cy:.3f} vs box {(y0 + y1) / 2:.3f}"
            checked += 1
    assert checked > 200


def test_crop_zero_padding_when_shortest_edge_is_smaller_than_crop() -> None:
    # shortest_edge < crop_size: HF's center_crop pads the resized image with zeros
    cfg = ImageProcessorConfig(shortest_edge=300, crop_size=SIZE)
    px = hf_pixels(ramp_images(500, 400)[0], cfg)  # resized 375x300: crop left 19, top -18
    boxes = patch_boxes((500, 400), cfg)
    for i in range(GRID * GRID):
        p = patch_of(px, i)
        if np.isnan(boxes[i, 0]):
            assert np.abs(p[5:9, 5:9]).max() <= 2  # black crop padding
        else:
            assert np.abs(p).max(axis=-1).max() > 3
    assert np.isnan(boxes[:GRID]).all() and np.isnan(boxes[-GRID:]).all()  # 18 px top/bottom > 14
    assert not np.isnan(boxes[GRID:-GRID]).any()
    np.testing.assert_allclose(boxes[GRID, 1], 0.0)  # second row starts at the image top (clipped)


@pytest.mark.parametrize("size,do_pad", [((500, 400), False), ((300, 600), True), ((333, 518), True)])
def test_token_index_map_agrees_with_boxes(size: tuple[int, int], do_pad: bool) -> None:
    cfg = ImageProcessorConfig(do_pad=do_pad)
    tok = token_index_map(size, cfg)  # [H, W]
    assert tok.shape == (size[1], size[0])
    boxes = patch_boxes(size, cfg)
    ys, xs = np.nonzero(tok >= 0)
    b = boxes[tok[ys, xs]]  # [P, 4]
    cx, cy = xs + 0.5, ys + 0.5
    assert ((b[:, 0] <= cx) & (cx < b[:, 2]) & (b[:, 1] <= cy) & (cy < b[:, 3])).all()
    # no token with a finite box is missing from the map (boxes are at least a pixel wide here)
    assert set(np.unique(tok[tok >= 0])) == set(np.nonzero(~np.isnan(boxes[:, 0]))[0])
    if not do_pad and size[0] > size[1]:
        assert (tok[:, :40] == -1).all()  # center crop cuts ~50 px off each side


# ---------------------------------------------------------------- drawing


def _mix(base: tuple[int, ...], colour: tuple[int, ...], a: float) -> np.ndarray:
    return (1 - a) * np.array(base, float) + a * np.array(colour, float)


@pytest.fixture()
def isolated_keep() -> tuple[np.ndarray, np.ndarray]:
    """Kept tokens on even rows and even columns, so no two kept patches touch."""
    r, c = np.divmod(np.arange(GRID * GRID), GRID)
    keep_pre = np.nonzero((r % 2 == 0) & (c % 2 == 0))[0]  # [144] ascending
    keep_post = np.arange(0, len(keep_pre), 3)  # [48] indices into keep_pre
    return keep_pre, keep_post


def test_draw_kept_styles_patches(isolated_keep: tuple[np.ndarray, np.ndarray]) -> None:
    keep_pre, keep_post = isolated_keep
    w, h, base = 500, 400, (200, 100, 50)
    cfg = ImageProcessorConfig()
    out = draw_kept(Image.new("RGB", (w, h), base), keep_pre, keep_post, cfg, title="sts b=64")
    assert out.mode == "RGB" and out.width == w and out.height > h
    img = np.asarray(out, float)[out.height - h:]  # [H, W, 3], the header sits on top
    assert (np.asarray(out, float)[: out.height - h] == 255).mean() > 0.5  # mostly white header

    status = vis.token_status(GRID * GRID, keep_pre, keep_post)
    assert (status == 2).sum() == len(keep_post) and (status >= 1).sum() == len(keep_pre)
    expected = {
        0: _mix(base, vis.PRUNED_GREY, vis.PRUNED_MIX),
        1: _mix(base, vis.PRUNED_GREY, vis.DROPPED_MIX),
        2: _mix(base, vis.STAGE2_COLOR, vis.STAGE2_MIX),
    }
    outline = {1: vis.STAGE1_COLOR, 2: vis.STAGE2_COLOR}
    boxes = patch_boxes((w, h), cfg)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        np.testing.assert_allclose(img[cy, cx], expected[status[i]], atol=1)
        if status[i]:
            np.testing.assert_array_equal(img[cy, int(round(x0))], outline[status[i]])  # left edge
            np.testing.assert_array_equal(img[int(round(y1)) - 1, cx], outline[status[i]])  # bottom edge
    # the cropped-away strip is darkened, distinct from pruned patches (the model never saw it)
    np.testing.assert_allclose(img[h // 2, 5], _mix(base, vis.UNSEEN_COLOR, vis.UNSEEN_MIX), atol=1)


def test_draw_kept_stage1_only(isolated_keep: tuple[np.ndarray, np.ndarray]) -> None:
    keep_pre, _ = isolated_keep
    base = (40, 160, 220)
    cfg = ImageProcessorConfig(do_pad=True)
    out = draw_kept(Image.new("RGBA", (300, 600), base + (255,)), keep_pre, None, cfg, title="sts-s")
    img = np.asarray(out, float)[out.height - 600:]
    boxes = patch_boxes((300, 600), cfg)
    for i in keep_pre:
        if np.isnan(boxes[i, 0]):
            continue  # kept patch that lies in the padding: nothing to draw
        x0, y0, x1, y1 = boxes[i]
        np.testing.assert_array_equal(img[int((y0 + y1) / 2), int((x0 + x1) / 2)], base)  # untouched
        np.testing.assert_array_equal(img[int((y0 + y1) / 2), int(round(x0))], vis.STAGE1_COLOR)


def test_draw_kept_transparency_and_display_size() -> None:
    rgba = Image.new("RGBA", (500, 400), (0, 0, 0, 0))  # fully transparent: white after compositing
    out = draw_kept(rgba, None, None, ImageProcessorConfig(), display_size=250)
    assert out.width == 250
    img = np.asarray(out, float)[out.height - 200:]
    assert (img[:, 30:-30] == 255).all()  # everything kept and no Stage 2: untouched, no outlines
    np.testing.assert_allclose(img[100, 2], _mix((255,) * 3, vis.UNSEEN_COLOR, vis.UNSEEN_MIX), atol=1)  # cropped away


def test_draw_kept_rejects_bad_indices() -> None:
    img, cfg = Image.new("RGB", (336, 336)), ImageProcessorConfig()
    with pytest.raises(ValueError, match="keep_pre"):
        draw_kept(img, [1, 1, 2], None, cfg)
    with pytest.raises(ValueError, match="keep_pre"):
        draw_kept(img, [576], None, cfg)
    with pytest.raises(ValueError, match="keep_post"):
        draw_kept(img, [0, 1, 2], [3], cfg)
    with pytest.raises(ValueError, match="image_size"):
        patch_boxes((336, 336), ImageProcessorConfig(crop_size=224))


def test_compare_panels(isolated_keep: tuple[np.ndarray, np.ndarray]) -> None:
    keep_pre, keep_post = isolated_keep
    img, cfg = Image.new("RGB", (400, 300), (90, 90, 90)), ImageProcessorConfig()
    results = {
        "sts": (keep_pre, keep_post),
        "sts-s": (keep_pre[:64], None),
        "fastv": (None, np.arange(0, GRID * GRID, 9)),
    }
    out = compare_panels(img, results, cfg, budget=64)
    panels = [draw_kept(img, a, b, cfg, title=name) for name, (a, b) in results.items()]
    gap = 8
    assert out.width == sum(p.width for p in panels) + gap * (len(panels) + 1)
    assert out.height > max(p.height for p in panels)
    # the first panel appears unchanged, bottom-aligned
    p0 = panels[0]
    top = out.height - gap - p0.height
    np.testing.assert_array_equal(np.asarray(out)[top:top + p0.height, gap:gap + p0.width], np.asarray(p0))
    with pytest.raises(ValueError):
        compare_panels(img, {}, cfg, 64)
