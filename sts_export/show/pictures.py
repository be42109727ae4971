"""Draw which vision tokens a pruning method kept, on the original image (paper Figures 6-7).

The geometry is the exact inverse of the model's HF image processor (CLIP / LLaVA semantics):

1. convert to RGB (transparency composited on white);
2. if ``do_pad``: pad to a square of side max(W, H) with the original centred, offset
   ``(max - side) // 2`` on the short axis (``LlavaImageProcessor.pad_to_square``);
3. resize so the shortest edge is ``shortest_edge``: long edge ``int(shortest_edge * long / short)``
   (``get_resize_output_image_size``, truncation), PIL bicubic;
4. center crop to ``crop_size``: offset ``(resized - crop) // 2`` per axis (``center_crop``; a
   negative offset means the crop is zero-padded around a too-small image).

The crop is cut into a grid of ``patch_size`` patches; vision token i (CLS dropped) is patch row
``i // grid``, column ``i % grid``. PIL's resize maps continuous coordinates linearly
(``x_out = x_in * out / in``), so each patch is an axis-aligned rectangle of the original image.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sts_export.families.llava import resized_size, to_rgb
from sts_export.recipe import ImageProcessorConfig

# Styling (RGB). Stage-2 survivors are red as in the paper's Figure 7 (STS = red).
PRUNED_GREY = (150, 150, 150)
PRUNED_MIX = 0.7  # pruned pixel = (1 - mix) * pixel + mix * PRUNED_GREY
STAGE1_COLOR = (255, 190, 0)  # amber outline: kept by Stage 1 (dropped by Stage 2 if it ran)
DROPPED_MIX = 0.35  # kept by Stage 1 but dropped by Stage 2: a lighter grey wash
STAGE2_COLOR = (230, 30, 30)  # red outline + tint: survives Stage 2
STAGE2_MIX = 0.35  # Stage-2 pixel = (1 - mix) * pixel + mix * STAGE2_COLOR
UNSEEN_COLOR = (40, 40, 40)  # pixels the centre crop cuts away: the model never sees them
UNSEEN_MIX = 0.8
EDGE_COLOR = (20, 20, 20)  # 1-px dark rim around coloured outlines, visible on yellow or red content
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)


class Geometry(NamedTuple):
    """Where the original image lands at each preprocessing step (all sizes are (width, height))."""

    orig_size: tuple[int, int]  # (W, H) of the original image
    pad_offset: tuple[int, int]  # (x, y) of the original inside the padded square; (0, 0) if no pad
    padded_size: tuple[int, int]  # (W, H) after pad_to_square (= orig_size if no pad)
    resized_size: tuple[int, int]  # (W, H) after the shortest-edge resize
    crop_offset: tuple[int, int]  # (left, top) of the crop in resized coordinates (may be < 0)
    crop_size: int


def preprocess_geometry(orig_size: tuple[int, int], cfg: ImageProcessorConfig) -> Geometry:
    """Pad / resize / crop geometry of HF's CLIP/LLaVA processor for an image of ``orig_size`` = (W, H)."""
    w, h = int(orig_size[0]), int(orig_size[1])
    if w < 1 or h < 1:
        raise ValueError(f"image size must be positive, got {orig_size}")
    ox = oy = 0
    pw, ph = w, h
    if cfg.do_pad and w != h:
        side = max(w, h)
        if w > h:
            oy = (side - h) // 2
        else:
            ox = (side - w) // 2
        pw = ph = side
    rw, rh = resized_size(pw, ph, cfg.shortest_edge)  # shortest edge -> shortest_edge, long edge int()
    crop = int(cfg.crop_size)
    return Geometry((w, h), (ox, oy), (pw, ph), (rw, rh), ((rw - crop) // 2, (rh - crop) // 2), crop)


def _grid(cfg: ImageProcessorConfig, image_size: int, patch_size: int) -> int:
    if cfg.crop_size != image_size:
        raise ValueError(f"crop_size {cfg.crop_size} differs from the vision tower's image_size {image_size}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return image_size // patch_size


def patch_boxes(
    orig_size: tuple[int, int],
    cfg: ImageProcessorConfig,
    image_size: int = 336,
    patch_size: int = 14,
) -> np.ndarray:
    """Each vision token's rectangle in ORIGINAL image pixels: [N, 4] float64 (x0, y0, x1, y1).

    ``orig_size`` is (width, height), i.e. PIL's ``image.size``. Coordinates are continuous
    (pixel i spans [i, i+1)) and clipped to the image. A patch that lies entirely in padding
    (the mean-colour square padding, or the crop's zero padding) has a row of NaN.
    """
    g = preprocess_geometry(orig_size, cfg)
    grid = _grid(cfg, image_size, patch_size)
    w, h = g.orig_size
    sx = g.padded_size[0] / g.resized_size[0]  # padded px per resized px
    sy = g.padded_size[1] / g.resized_size[1]
    edges = np.arange(grid + 1, dtype=np.float64) * patch_size  # [grid+1] crop coordinates
    xe = np.clip((edges + g.crop_offset[0]) * sx - g.pad_offset[0], 0.0, w)  # [grid+1] original x
    ye = np.clip((edges + g.crop_offset[1]) * sy - g.pad_offset[1], 0.0, h)  # [grid+1] original y
    rows, cols = np.divmod(np.arange(grid * grid), grid)  # [N], [N]
    boxes = np.stack([xe[cols], ye[rows], xe[cols + 1], ye[rows + 1]], axis=1)  # [N, 4]
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])  # [N]
    boxes[empty] = np.nan
    return boxes


def token_index_map(
    orig_size: tuple[int, int],
    cfg: ImageProcessorConfig,
    image_size: int = 336,
    patch_size: int = 14,
) -> np.ndarray:
    """Token index of every original pixel (by its centre): [H, W] int64, -1 where cropped away."""
    g = preprocess_geometry(orig_size, cfg)
    grid = _grid(cfg, image_size, patch_size)
    w, h = g.orig_size
    rx = g.resized_size[0] / g.padded_size[0]
    ry = g.resized_size[1] / g.padded_size[1]
    xc = (np.arange(w) + 0.5 + g.pad_offset[0]) * rx - g.crop_offset[0]  # [W] crop coordinates
    yc = (np.arange(h) + 0.5 + g.pad_offset[1]) * ry - g.crop_offset[1]  # [H]
    col = np.where((xc >= 0) & (xc < image_size), np.floor(xc / patch_size), -1).astype(np.int64)  # [W]
    row = np.where((yc >= 0) & (yc < image_size), np.floor(yc / patch_size), -1).astype(np.int64)  # [H]
    idx = row[:, None] * grid + col[None, :]  # [H, W]
    return np.where((row[:, None] >= 0) & (col[None, :] >= 0), idx, -1)


def _as_index_vector(x: object, name: str, upper: int) -> np.ndarray:
    """1-D int64 indices from a list/array/tensor ([K] or [1, K]), validated to lie in [0, upper)."""
    arr = np.asarray(x)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be [K] (or [1, K]) indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= upper):
        raise ValueError(f"{name} indices must lie in [0, {upper}), got [{arr.min()}, {arr.max()}]")
    if np.unique(arr).size != arr.size:
        raise ValueError(f"{name} has repeated indices")
    return arr


def token_status(num_tokens: int, keep_pre: object, keep_post: object | None) -> np.ndarray:
    """Per-token state [N] int8: 0 pruned, 1 kept by Stage 1 only, 2 survives Stage 2.

    ``keep_pre`` indexes the N tokens (None = all); ``keep_post`` indexes INTO ``keep_pre``
    (token = keep_pre[keep_post]); None means Stage 2 did not run, so every Stage-1 token is 1.
    """
    pre = np.arange(num_tokens) if keep_pre is None else _as_index_vector(keep_pre, "keep_pre", num_tokens)
    status = np.zeros(num_tokens, dtype=np.int8)  # [N]
    status[pre] = 1
    if keep_post is not None:
        post = _as_index_vector(keep_post, "keep_post", len(pre))
        status[pre[post]] = 2
    return status


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    x0, y0, x1, y1 = font.getbbox(text)
    return int(x1 - min(x0, 0)), int(y1 - min(y0, 0))


def _legend_items(status: np.ndarray, boxes: np.ndarray, stage2: bool) -> list[tuple[str, str]]:
    """(kind, label) pairs; kind picks the swatch style."""
    in_pad = np.isnan(boxes[:, 0])  # [N]
    k_pre = int((status >= 1).sum())
    n_pruned = int((status == 0).sum())
    items = [("stage1", f"Stage 1: {k_pre} kept")] if n_pruned else [("note", f"no Stage 1: all {k_pre} tokens")]
    if stage2:
        items.append(("stage2", f"Stage 2: {int((status == 2).sum())} kept"))
        items.append(("dropped", f"Stage 2 dropped: {int((status == 1).sum())}"))
    if n_pruned:
        items.append(("pruned", f"Stage 1 pruned: {n_pruned}"))
    n_pad = int(((status >= 1) & in_pad).sum())
    if n_pad:
        items.append(("note", f"({n_pad} kept lie in padding)"))
    return items


def _draw_swatch(draw: ImageDraw.ImageDraw, x: int, y: int, s: int, kind: str) -> None:
    lw = max(1, s // 6)
    if kind == "stage1":
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=BACKGROUND, outline=STAGE1_COLOR, width=lw)
    elif kind == "stage2":
        tint = tuple(int(round((1 - STAGE2_MIX) * 255 + STAGE2_MIX * c)) for c in STAGE2_COLOR)
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=tint, outline=STAGE2_COLOR, width=lw)
    elif kind == "pruned":
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=PRUNED_GREY)
    elif kind == "dropped":
        wash = tuple(int(round((1 - DROPPED_MIX) * 255 + DROPPED_MIX * c)) for c in PRUNED_GREY)
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=wash, outline=STAGE1_COLOR, width=max(1, s // 6))


def _header(width: int, title: str, items: list[tuple[str, str]], font_ref: int | None = None) -> Image.Image:
    """White strip: the title on one line, then the legend items (wrapped to ``width``).
    The font scales with ``font_ref`` (default ``width``)."""
    fs = int(np.clip(round((font_ref or width) / 28), 11, 28))
    font = _font(fs)
    pad = max(3, fs // 3)
    line_h = max(fs, _text_size(font, "Hg")[1]) + pad
    # lay out legend entries left to right, wrapping
    placed: list[tuple[int, int, str, str]] = []  # (x, line, kind, label)
    x, line = pad, 0
    for kind, label in items:
        w_item = (0 if kind == "note" else fs + pad) + _text_size(font, label)[0] + 2 * pad
        if x > pad and x + w_item > width:
            x, line = pad, line + 1
        placed.append((x, line, kind, label))
        x += w_item
    title_lines = 1 if title else 0
    n_lines = title_lines + (placed[-1][1] + 1 if placed else 0)
    strip = Image.new("RGB", (width, pad + n_lines * line_h), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    if title:
        draw.text((pad, pad), title, fill=TEXT_COLOR, font=font)
    for x, line, kind, label in placed:
        y = pad + (title_lines + line) * line_h
        tx = x
        if kind != "note":
            _draw_swatch(draw, x, y + max(0, (line_h - pad - fs) // 2), fs, kind)
            tx = x + fs + pad
        draw.text((tx, y), label, fill=TEXT_COLOR, font=font)
    return strip


def draw_kept(
    image: Image.Image,
    keep_pre: object | None,
    keep_post: object | None,
    cfg: ImageProcessorConfig,
    *,
    title: str = "",
    image_size: int = 336,
    patch_size: int = 14,
    display_size: int | None = None,
) -> Image.Image:
    """The original image with pruned patches greyed out, Stage-1 kept patches outlined in amber and
    Stage-2 survivors tinted and outlined in red, under a header with the title and a legend.
    When Stage 2 ran, the Stage-1 tokens it dropped get a lighter grey wash.

    ``keep_pre`` [K] indexes the N vision tokens (None = all kept); ``keep_post`` [K'] indexes into
    ``keep_pre`` (None = no Stage 2). The result is the image (scaled so its longest side is
    ``display_size``, if given) with the header stacked on top: width W, height header + H.
    Pixels the center crop cuts away are greyed like pruned ones (the model never sees them).
    When Stage 1 kept every token (fastv, none) the Stage-1 outlines are left out.
    """
    rgb = to_rgb(image)
    w, h = rgb.size
    grid = _grid(cfg, image_size, patch_size)
    status = token_status(grid * grid, keep_pre, keep_post)  # [N]
    boxes = patch_boxes((w, h), cfg, image_size, patch_size)  # [N, 4]
    tok = token_index_map((w, h), cfg, image_size, patch_size)  # [H, W]
    pix_status = np.where(tok >= 0, status[np.maximum(tok, 0)], -1)  # [H, W]; -1: cropped away

    arr = np.asarray(rgb, dtype=np.float32)  # [H, W, 3]
    pruned = pix_status == 0
    arr[pruned] = (1 - PRUNED_MIX) * arr[pruned] + PRUNED_MIX * np.array(PRUNED_GREY, np.float32)
    unseen = pix_status == -1
    arr[unseen] = (1 - UNSEEN_MIX) * arr[unseen] + UNSEEN_MIX * np.array(UNSEEN_COLOR, np.float32)
    if keep_post is not None:
        s1 = pix_status == 1
        arr[s1] = (1 - DROPPED_MIX) * arr[s1] + DROPPED_MIX * np.array(PRUNED_GREY, np.float32)
    s2 = pix_status == 2
    arr[s2] = (1 - STAGE2_MIX) * arr[s2] + STAGE2_MIX * np.array(STAGE2_COLOR, np.float32)
    styled = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))

    scale = 1.0
    if display_size is not None:
        scale = display_size / max(w, h)
        styled = styled.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    boxes = boxes * scale

    finite = ~np.isnan(boxes[:, 0])
    sides = np.minimum(boxes[finite, 2] - boxes[finite, 0], boxes[finite, 3] - boxes[finite, 1])
    lw = max(1, int(round(0.1 * float(np.median(sides))))) if sides.size else 1
    draw = ImageDraw.Draw(styled)
    stage1_pruned = bool((status == 0).any())
    rects: list[tuple[list[int], tuple[int, int, int]]] = []
    for level, color in ((1, STAGE1_COLOR), (2, STAGE2_COLOR)):
        if level == 1 and not stage1_pruned:
            continue  # Stage 1 kept everything (fastv, none): outlining every patch says nothing
        for x0, y0, x1, y1 in boxes[(status == level) & finite]:
            rect = [int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1]
            if rect[2] >= rect[0] and rect[3] >= rect[1]:
                rects.append((rect, color))
    for rect, _ in rects:  # dark rims first, so every coloured outline stays on top of them
        draw.rectangle([rect[0] - 1, rect[1] - 1, rect[2] + 1, rect[3] + 1], outline=EDGE_COLOR, width=1)
    for rect, color in rects:
        draw.rectangle(rect, outline=color, width=lw)

    header = _header(styled.width, title, _legend_items(status, boxes, keep_post is not None))
    out = Image.new("RGB", (styled.width, header.height + styled.height), BACKGROUND)
    out.paste(header, (0, 0))
    out.paste(styled, (0, header.height))
    return out


def compare_panels(
    image: Image.Image,
    results: dict[str, tuple[object | None, object | None]],
    cfg: ImageProcessorConfig,
    budget: float | int | str,
    *,
    image_size: int = 336,
    patch_size: int = 14,
    display_size: int | None = None,
    gap: int = 8,
) -> Image.Image:
    """One :func:`draw_kept` panel per method, side by side, titled by method name, under a caption
    with the budget. ``results`` maps method name -> (keep_pre, keep_post or None)."""
    if not results:
        raise ValueError("compare_panels needs at least one method's result")
    panels = [
        draw_kept(image, pre, post, cfg, title=name, image_size=image_size, patch_size=patch_size,
                  display_size=display_size)
        for name, (pre, post) in results.items()
    ]
    height = max(p.height for p in panels)
    width = sum(p.width for p in panels) + gap * (len(panels) + 1)
    caption = _header(width, f"budget b = {budget} (average visual tokens per decoder layer)", [],
                      font_ref=int(1.2 * max(p.width for p in panels)))
    out = Image.new("RGB", (width, caption.height + height + gap), BACKGROUND)
    out.paste(caption, (0, 0))
    x = gap
    for p in panels:
        out.paste(p, (x, caption.height + height - p.height))  # bottoms aligned: images line up
        x += p.width + gap
    return out


__all__ = [
    "Geometry",
    "preprocess_geometry",
    "patch_boxes",
    "token_index_map",
    "token_status",
    "draw_kept",
    "compare_panels",
]
