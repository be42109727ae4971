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

Families whose preprocessing gives each candidate's box directly (LLaVA-NeXT's ``ImageInput.boxes``)
use :func:`draw_kept_boxes` instead: one panel per token group (base crop, tiles), same styling;
:func:`draw_next_kept` maps a NeXT Generation's keep_pre/keep_post onto the candidates first.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sts_export.families.llava import resized_size, to_rgb
from sts_export.recipe import ImageProcessorConfig

if TYPE_CHECKING:
    from sts_export.families import ImageInput

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

    styled = _paint_status(rgb, pix_status, keep_post is not None)
    styled, scale = _scale_to(styled, display_size)
    boxes = boxes * scale
    _draw_outlines(ImageDraw.Draw(styled), boxes, status, stage1_pruned=bool((status == 0).any()))

    header = _header(styled.width, title, _legend_items(status, boxes, keep_post is not None))
    return _stack(header, styled)


def _paint_status(rgb: Image.Image, pix_status: np.ndarray, stage2: bool) -> Image.Image:
    """The image with every pixel washed by its token's state ``pix_status`` [H, W]
    (-1 unseen, 0 pruned, 1 Stage 1 only, 2 Stage 2); the Stage-1-only wash only when ``stage2``."""
    arr = np.asarray(rgb, dtype=np.float32)  # [H, W, 3]
    pruned = pix_status == 0
    arr[pruned] = (1 - PRUNED_MIX) * arr[pruned] + PRUNED_MIX * np.array(PRUNED_GREY, np.float32)
    unseen = pix_status == -1
    arr[unseen] = (1 - UNSEEN_MIX) * arr[unseen] + UNSEEN_MIX * np.array(UNSEEN_COLOR, np.float32)
    if stage2:
        s1 = pix_status == 1
        arr[s1] = (1 - DROPPED_MIX) * arr[s1] + DROPPED_MIX * np.array(PRUNED_GREY, np.float32)
    s2 = pix_status == 2
    arr[s2] = (1 - STAGE2_MIX) * arr[s2] + STAGE2_MIX * np.array(STAGE2_COLOR, np.float32)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))


def _scale_to(img: Image.Image, display_size: int | None) -> tuple[Image.Image, float]:
    """``img`` scaled (bicubic) so its longest side is ``display_size`` (unchanged if None), and the scale."""
    if display_size is None:
        return img, 1.0
    w, h = img.size
    scale = display_size / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC), scale


def _draw_outlines(draw: ImageDraw.ImageDraw, boxes: np.ndarray, status: np.ndarray, stage1_pruned: bool) -> None:
    """Amber outlines on Stage-1-only tokens (only if Stage 1 pruned anything), red on Stage-2 ones,
    each over a 1-px dark rim. ``boxes`` [N, 4] in display pixels (NaN rows skipped), ``status`` [N]."""
    finite = ~np.isnan(boxes[:, 0])
    sides = np.minimum(boxes[finite, 2] - boxes[finite, 0], boxes[finite, 3] - boxes[finite, 1])
    lw = max(1, int(round(0.1 * float(np.median(sides))))) if sides.size else 1
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


def _stack(header: Image.Image, body: Image.Image) -> Image.Image:
    out = Image.new("RGB", (body.width, header.height + body.height), BACKGROUND)
    out.paste(header, (0, 0))
    out.paste(body, (0, header.height))
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


# ---------------------------------------------------------------- explicit candidate boxes (LLaVA-NeXT)

Group = tuple[str, "Sequence[int] | range | np.ndarray"]


def box_index_map(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Which box each pixel belongs to (by its centre): [H, W] int64 row of ``boxes``, -1 where none.

    ``boxes`` [M, 4] are (x0, y0, x1, y1) in continuous pixels of an image of ``size`` = (W, H);
    NaN rows are skipped; where boxes overlap the later one wins (grid boxes only share edges).
    """
    w, h = int(size[0]), int(size[1])
    idx = np.full((h, w), -1, dtype=np.int64)
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64)):
        if np.isnan(x0):
            continue
        # pixel c (centre c + 0.5) is inside [x0, x1) iff ceil(x0 - 0.5) <= c < ceil(x1 - 0.5)
        c0, c1 = max(0, int(np.ceil(x0 - 0.5))), min(w, int(np.ceil(x1 - 0.5)))
        r0, r1 = max(0, int(np.ceil(y0 - 0.5))), min(h, int(np.ceil(y1 - 0.5)))
        if c1 > c0 and r1 > r0:
            idx[r0:r1, c0:c1] = i
    return idx


def _group_caption(name: str, status: np.ndarray, stage1_pruned: bool, stage2: bool) -> str:
    n = len(status)
    text = f"{name}: {int((status >= 1).sum())}/{n} kept" if stage1_pruned else f"{name}: {n} tokens"
    if stage2:
        text += f", Stage 2 {int((status == 2).sum())}"
    return text


def draw_kept_boxes(
    image: Image.Image,
    boxes: np.ndarray,
    keep_pre: object | None,
    keep_post: object | None,
    *,
    groups: Sequence[Group] | None = None,
    title: str = "",
    display_size: int | None = None,
    notes: Sequence[str] = (),
    gap: int = 8,
) -> Image.Image:
    """:func:`draw_kept`'s picture from explicit candidate boxes, one panel per group, side by side.

    ``boxes`` [N, 4]: each candidate token's (x0, y0, x1, y1) in ORIGINAL image pixels (NaN = not
    drawn). ``keep_pre`` [K] indexes the N candidates (None = all kept), ``keep_post`` [K'] indexes
    into ``keep_pre`` (None = no Stage 2), as in :func:`token_status`. ``groups`` = [(name, candidate
    indices), ...] (default: one group of all N); each panel is the original image (longest side
    ``display_size``, if given) with that group's tokens styled by state (pruned greyed, Stage-1
    amber outline, Stage-2 red tint + outline, Stage-1-only washed when Stage 2 ran), pixels no
    token of the group covers darkened, under a caption with the group's counts. One header on
    top holds the title and the legend (counts over all N) plus ``notes``. Panels are ``gap`` px
    apart with a ``gap`` margin left and right; the result is that wide and header + caption + image tall.
    """
    rgb = to_rgb(image)
    w, h = rgb.size
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4], got shape {boxes.shape}")
    n = boxes.shape[0]
    status = token_status(n, keep_pre, keep_post)  # [N]
    stage2, stage1_pruned = keep_post is not None, bool((status == 0).any())
    groups = [("tokens", np.arange(n))] if groups is None else groups
    if not groups:
        raise ValueError("draw_kept_boxes needs at least one group")

    panels = []
    for name, members in groups:
        idx = _as_index_vector(np.asarray(members, dtype=np.int64), f"group '{name}'", n)  # [M]
        tok = box_index_map(boxes[idx], (w, h))  # [H, W] row of idx, -1: no token of this group
        pix_status = np.where(tok >= 0, status[idx][np.maximum(tok, 0)], -1)  # [H, W]
        styled, scale = _scale_to(_paint_status(rgb, pix_status, stage2), display_size)
        _draw_outlines(ImageDraw.Draw(styled), boxes[idx] * scale, status[idx], stage1_pruned)
        caption = _header(styled.width, _group_caption(name, status[idx], stage1_pruned, stage2), [])
        panels.append(_stack(caption, styled))

    pw = max(p.width for p in panels)
    width = sum(p.width for p in panels) + gap * (len(panels) + 1)
    height = max(p.height for p in panels)
    items = _legend_items(status, boxes, stage2) + [("note", t) for t in notes]
    header = _header(width, title, items, font_ref=pw)
    out = Image.new("RGB", (width, header.height + height), BACKGROUND)
    out.paste(header, (0, 0))
    x = gap
    for p in panels:
        out.paste(p, (x, header.height + height - p.height))  # bottoms aligned: images line up
        x += p.width + gap
    return out


class CandidateKeep(NamedTuple):
    """A LLaVA-NeXT generation's kept tokens, in Stage 1 candidate space (the N of ``token_index``)."""

    keep_pre: np.ndarray | None  # [K] candidate indices kept by Stage 1; None: Stage 1 did not prune
    keep_post: np.ndarray | None  # [K'] indices into keep_pre (into all N when keep_pre is None); None: no Stage 2
    newlines: int  # row-newline tokens in the decoder's image span (0 when Stage 1 pruned: they are dropped)
    newlines_kept: int  # of those, how many reach the layers after Stage 2 (all, without Stage 2)


def _packed_to_candidates(token_index: np.ndarray, packed_index: np.ndarray) -> np.ndarray:
    """Candidate index of every packed-span position: [N_full] int64, -1 for newline positions."""
    tok = np.asarray(token_index, dtype=np.int64).reshape(-1)  # [N] flat tower indices
    packed = np.asarray(packed_index, dtype=np.int64).reshape(-1)  # [N_full]
    size = int(max(tok.max(initial=-1), packed.max(initial=-1))) + 1
    inv = np.full(size, -1, dtype=np.int64)
    inv[tok] = np.arange(len(tok))
    cand = inv[packed]  # [N_full]
    found = cand[cand >= 0]
    if len(found) != len(tok) or np.unique(found).size != len(tok):
        raise ValueError("packed_index must hold every token_index entry exactly once (plus newline positions)")
    return cand


def next_candidate_keep(image: "ImageInput", keep_pre: object, keep_post: object | None) -> CandidateKeep:
    """Map a LLaVA-NeXT Generation's ``keep_pre`` [K] / ``keep_post`` [K'] (``[1, K]`` rows accepted)
    onto the image's N Stage 1 candidates.

    When Stage 1 pruned (sts, sts-s, divprune, cls) ``keep_pre`` already indexes the candidates
    (K <= N). Otherwise (none, fastv, budget full) it indexes the packed span of N_full > N tokens
    (``packed_index``: newline after every grid row) and ``keep_post`` indexes into it; each span
    position is mapped to its candidate through ``packed_index`` / ``token_index`` and newline
    positions are left out (only counted).
    """
    n, n_full = int(image.n), int(image.n_full)
    pre = np.asarray(keep_pre)
    pre = pre[0] if pre.ndim == 2 and pre.shape[0] == 1 else pre
    if len(pre) <= n:  # Stage 1 pruned: candidate indices already
        pre = _as_index_vector(pre, "keep_pre", n)
        post = None if keep_post is None else _as_index_vector(keep_post, "keep_post", len(pre))
        return CandidateKeep(pre, post, 0, 0)
    span = token_status(n_full, pre, keep_post)  # [N_full] over the packed span
    cand = _packed_to_candidates(image.feeds["token_index"], image.feeds["packed_index"])  # [N_full]
    status = np.zeros(n, dtype=np.int8)  # [N]
    status[cand[cand >= 0]] = span[cand >= 0]
    line = cand < 0
    newlines = int((span[line] >= 1).sum())
    newlines_kept = int((span[line] == 2).sum()) if keep_post is not None else newlines
    kept = np.nonzero(status >= 1)[0]  # [K] ascending
    cpre = None if len(kept) == n else kept
    cpost = None
    if keep_post is not None:
        s2 = np.nonzero(status == 2)[0]
        cpost = s2 if cpre is None else np.searchsorted(cpre, s2)
    return CandidateKeep(cpre, cpost, newlines, newlines_kept)


def next_token_status(image: "ImageInput", keep_pre: object, keep_post: object | None) -> np.ndarray:
    """Per-candidate state [N] int8 (0 pruned, 1 Stage 1 only, 2 survives Stage 2) of a LLaVA-NeXT
    generation (see :func:`next_candidate_keep`)."""
    ck = next_candidate_keep(image, keep_pre, keep_post)
    return token_status(int(image.n), ck.keep_pre, ck.keep_post)


def next_groups(image: "ImageInput") -> list[Group]:
    """[("base crop ...", 0..B-1), ("tiles ...", B..N-1)] for a LLaVA-NeXT ImageInput, named with
    the tile grid (rows x cols crops) and the unpadded token grid (height x width)."""
    tok = np.asarray(image.feeds["token_index"], dtype=np.int64).reshape(-1)  # [N]
    packed = np.asarray(image.feeds["packed_index"], dtype=np.int64).reshape(-1)  # [N_full]
    crops = int(image.feeds["pixel_values"].shape[0])  # T = 1 + rows * cols
    per_crop = int(packed.max()) // crops  # the newline is encoded as T * patches-per-crop
    base = int((tok < per_crop).sum())
    side = int(round(per_crop ** 0.5))
    uh = int(image.n_full) - int(image.n)  # one newline per stitched grid row
    uw = (len(tok) - base) // max(uh, 1)
    cols = len(np.unique(tok[base:base + uw] // per_crop))  # the first stitched row crosses every tile column
    rows = (crops - 1) // max(cols, 1)
    return [(f"base crop ({side}x{side})", np.arange(base)),
            (f"tiles {rows}x{cols} ({uh}x{uw} tokens)", np.arange(base, len(tok)))]


def draw_next_kept(
    image: Image.Image,
    prepared: "ImageInput",
    keep_pre: object,
    keep_post: object | None,
    *,
    title: str = "",
    display_size: int | None = None,
) -> Image.Image:
    """The kept-token picture of a LLaVA-NeXT generation: the base-crop and tile panels side by side
    (:func:`draw_kept_boxes`), ``prepared`` being the family's ImageInput of ``image``
    (``Pipeline.prepare_image``), ``keep_pre`` / ``keep_post`` the Generation's (see
    :func:`next_candidate_keep`)."""
    if prepared.boxes is None:
        raise ValueError("the ImageInput carries no candidate boxes (not a LLaVA-NeXT image?)")
    if tuple(to_rgb(image).size) != tuple(prepared.size):
        raise ValueError(f"image is {image.size[0]}x{image.size[1]} but was prepared at {prepared.size[0]}x{prepared.size[1]}")
    ck = next_candidate_keep(prepared, keep_pre, keep_post)
    notes = []
    if ck.newlines:
        notes.append(f"row newlines: {ck.newlines_kept}/{ck.newlines} kept" if keep_post is not None
                     else f"+ {ck.newlines} row newlines")
    return draw_kept_boxes(image, prepared.boxes, ck.keep_pre, ck.keep_post, groups=next_groups(prepared),
                           title=title, display_size=display_size, notes=notes)


__all__ = [
    "Geometry",
    "preprocess_geometry",
    "patch_boxes",
    "token_index_map",
    "token_status",
    "draw_kept",
    "compare_panels",
    "box_index_map",
    "draw_kept_boxes",
    "CandidateKeep",
    "next_candidate_keep",
    "next_token_status",
    "next_groups",
    "draw_next_kept",
]
