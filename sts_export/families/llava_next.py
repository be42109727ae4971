"""LLaVA-NeXT (v1.6, "anyres"): host-side preprocessing and the layout of its visual tokens.

An image is seen twice by the CLIP tower: once as a *base* crop (the whole image squashed to
shortest_edge x shortest_edge, aspect ratio not kept) and once as a grid of rows x cols *tiles*.
The grid comes from the pinpoint (height, width) that best fits the image
(`select_best_resolution`): the image is resized to fit it keeping its aspect ratio, centred on a
black (zero) canvas of exactly that size, and cut into crop x crop tiles in raster order. So
pixel_values is [T, 3, crop, crop] with T = 1 + rows * cols, the base first.

The language model gets the base tokens (patch_grid**2, raster) followed by the tile tokens
stitched into one (rows * patch_grid) x (cols * patch_grid) grid, with the rows/columns that
correspond to the canvas padding cut off (`unpad_image`, computed in token units from the
original size), and an `image_newline` embedding after every row of that grid. Everything here
is equal to transformers' `LlavaNextImageProcessorPil` and `LlavaNextModel.pack_image_features`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from sts_export.errors import StsError
from sts_export.families import ImageInput, llava
from sts_export.families.llava import load_image, resized_size, to_rgb  # noqa: F401  (load_image re-exported)
from sts_export.families.llava import raw_prompt_ids  # noqa: F401  (the family interface: LLaVA's raw prompt)
from sts_export.recipe import ImageProcessorConfig, Recipe

if TYPE_CHECKING:
    import torch

# ---- host side: preprocessing and token layout (numpy/PIL only)

Pinpoints = Sequence[Sequence[int]]  # (height, width) pairs


def _pinpoints(cfg_or_points: ImageProcessorConfig | Pinpoints) -> list[tuple[int, int]]:
    points = cfg_or_points.image_grid_pinpoints if isinstance(cfg_or_points, ImageProcessorConfig) else cfg_or_points
    points = [(int(h), int(w)) for h, w in points]
    if not points:
        raise StsError("image_processor.image_grid_pinpoints is empty; LLaVA-NeXT needs its anyres resolutions")
    return points


def select_best_resolution(image_hw: tuple[int, int], pinpoints: Pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps the most image pixels, ties to the least canvas waste.

    The fit uses int() (floor) for the downscaled size; the first pinpoint wins an exact tie.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    best, best_eff, best_waste = None, 0, math.inf
    for ph, pw in _pinpoints(pinpoints):
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    assert best is not None
    return best


def grid_shape(image_hw: tuple[int, int], cfg: ImageProcessorConfig) -> tuple[int, int]:
    """(rows, cols) of crop x crop tiles for an image of (height, width)."""
    th, tw = select_best_resolution(image_hw, cfg.image_grid_pinpoints)
    return th // cfg.crop_size, tw // cfg.crop_size


def _fit_size(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized into target keeping aspect ratio (ceil on the free side)."""
    h, w = image_hw
    th, tw = target_hw
    if tw / w < th / h:
        return min(math.ceil(h * (tw / w)), th), tw
    return th, min(math.ceil(w * (th / h)), tw)


def _paste_offset(fit_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of the resized image on the target canvas (centred; the odd pixel goes bottom/right)."""
    return (target_hw[0] - fit_hw[0]) // 2, (target_hw[1] - fit_hw[1]) // 2


def _crop_tile(tile: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """A crop: resize shortest edge (a no-op when it already matches) + center crop -> [c, c, 3] uint8."""
    size = resized_size(*tile.size, cfg.shortest_edge)
    if size != tile.size:
        tile = tile.resize(size, resample=Image.BICUBIC)
    w, h = tile.size
    c = cfg.crop_size
    if w < c or h < c:
        raise StsError(f"image resized to {w}x{h} is smaller than the crop {c}x{c}")
    top, left = (h - c) // 2, (w - c) // 2
    return np.asarray(tile, dtype=np.uint8)[top:top + c, left:left + c]


def preprocess_anyres(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """PIL image -> pixel_values [T, 3, crop, crop] float32: the base crop, then the tiles in raster order.

    Bit-equal to LlavaNextImageProcessorPil. `cfg.do_pad` (LLaVA-1.5's pad-to-square) does not apply.
    """
    img = to_rgb(image)
    w, h = img.size
    if min(w, h) < 1:
        raise StsError(f"image is empty ({w}x{h})")
    target = select_best_resolution((h, w), cfg.image_grid_pinpoints)  # (th, tw)
    fit_h, fit_w = _fit_size((h, w), target)
    top, left = _paste_offset((fit_h, fit_w), target)
    canvas = np.zeros((*target, 3), dtype=np.uint8)  # [th, tw, 3], black (0), not the mean colour
    canvas[top:top + fit_h, left:left + fit_w] = np.asarray(img.resize((fit_w, fit_h), resample=Image.BICUBIC))
    se, c = cfg.shortest_edge, cfg.crop_size
    crops = [_crop_tile(img.resize((se, se), resample=Image.BICUBIC), cfg)]  # base: the whole image, squashed
    for y in range(0, target[0], c):
        for x in range(0, target[1], c):
            crops.append(_crop_tile(Image.fromarray(canvas[y:y + c, x:x + c]), cfg))
    arr = np.stack(crops)  # [T, c, c, 3] uint8
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, dtype=np.float32)) / np.asarray(cfg.image_std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # [T, 3, c, c]


def unpadded_grid(image_hw: tuple[int, int], rows: int, cols: int, patch_grid: int) -> tuple[int, int, int, int]:
    """(height, width, top, left) of the stitched (rows*g) x (cols*g) token grid after transformers' unpad_image.

    Computed in token units from the original size (round(x, 7) then int()); the same number of
    rows (or columns) is cut from both sides, so an odd surplus leaves one extra row/column.
    """
    oh, ow = int(image_hw[0]), int(image_hw[1])
    ch, cw = rows * patch_grid, cols * patch_grid
    if ow / oh > cw / ch:  # wider than the grid: rows are cut
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return ch - 2 * pad, cw, pad, 0
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return ch, cw - 2 * pad, 0, pad


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields, not layouts
class AnyresLayout:
    """Where each LLaVA-NeXT visual token comes from, for one image.

    Flat vision-token index: crop t (0 = base), patch p (raster in the crop) -> t * patch_grid**2 + p.
    """

    num_tiles: int  # T = 1 + rows * cols crops fed to the vision tower
    rows: int
    cols: int
    height: int  # unpadded stitched grid, in tokens
    width: int
    top: int  # offset of the unpadded grid in the full (rows*g) x (cols*g) grid
    left: int
    patch_grid: int
    candidates: np.ndarray  # [N] int64: base raster, then the unpadded stitched grid in raster order
    packed: np.ndarray  # [N_full] int64: transformers' packed order, newline = num_tiles * patch_grid**2
    boxes: np.ndarray  # [N, 4] float64: (x0, y0, x1, y1) of each candidate in original image pixels

    @property
    def n(self) -> int:
        return int(self.candidates.shape[0])

    @property
    def newline(self) -> int:
        """The index `packed` uses for the image_newline embedding (one past the last real token)."""
        return self.num_tiles * self.patch_grid**2


def token_layout(image_hw: tuple[int, int], cfg: ImageProcessorConfig, patch_grid: int) -> AnyresLayout:
    """Candidates, transformers' packed order and per-token boxes for an image of (height, width)."""
    h, w = int(image_hw[0]), int(image_hw[1])
    g, g2, c, se = patch_grid, patch_grid**2, cfg.crop_size, cfg.shortest_edge
    rows, cols = grid_shape((h, w), cfg)
    num_tiles = 1 + rows * cols
    uh, uw, top, left = unpadded_grid((h, w), rows, cols, g)

    gy = np.arange(top, top + uh)[:, None]  # [uh, 1] rows of the stitched grid
    gx = np.arange(left, left + uw)[None, :]  # [1, uw]
    tile = 1 + (gy // g) * cols + gx // g  # [uh, uw] crop index (divide_to_patches raster order)
    grid_idx = (tile * g2 + (gy % g) * g + gx % g).astype(np.int64)  # [uh, uw]
    base = np.arange(g2, dtype=np.int64)
    candidates = np.concatenate([base, grid_idx.reshape(-1)])  # [g2 + uh*uw]
    newline = np.full((uh, 1), num_tiles * g2, dtype=np.int64)
    packed = np.concatenate([base, np.concatenate([grid_idx, newline], axis=1).reshape(-1)])  # [g2 + uh*(uw+1)]

    # each crop is resized to se x se and center-cropped to c: processed pixel q <-> resized pixel q + off
    if se < c:
        raise StsError(f"image_processor.shortest_edge {se} is smaller than crop_size {c}")
    off, step = (se - c) // 2, c / g  # step: processed-crop pixels per token

    # base crop = the whole image resized to se x se: a g x g grid over the whole picture
    k = np.arange(g, dtype=np.float64)
    q0, q1 = off + k * step, off + (k + 1) * step  # [g] token edges in the resized base image
    bx0, bx1 = (q0 * (w / se)).clip(0, w), (q1 * (w / se)).clip(0, w)  # [g] in original pixels
    by0, by1 = (q0 * (h / se)).clip(0, h), (q1 * (h / se)).clip(0, h)
    base_boxes = np.stack(np.broadcast_arrays(bx0[None], by0[:, None], bx1[None], by1[:, None]), -1)  # [g, g, 4]

    # tiles: processed-crop pixel -> canvas pixel (tile origin + (q + off) * c / se) -> minus the
    # paste offset -> times original / resized size
    fit_h, fit_w = _fit_size((h, w), (rows * c, cols * c))
    pad_top, pad_left = _paste_offset((fit_h, fit_w), (rows * c, cols * c))

    def spans(first: int, count: int, pad: int, scale: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
        t = np.arange(first, first + count)  # [count] stitched-grid rows (or columns)
        origin = (t // g) * c
        q0, q1 = off + (t % g) * step, off + (t % g + 1) * step
        lo = ((origin + q0 * (c / se) - pad) * scale).clip(0, limit)
        hi = ((origin + q1 * (c / se) - pad) * scale).clip(0, limit)
        return lo, hi

    tx0, tx1 = spans(left, uw, pad_left, w / fit_w, w)  # [uw]
    ty0, ty1 = spans(top, uh, pad_top, h / fit_h, h)  # [uh]
    tile_boxes = np.stack(np.broadcast_arrays(tx0[None], ty0[:, None], tx1[None], ty1[:, None]), -1)  # [uh, uw, 4]
    boxes = np.concatenate([base_boxes.reshape(-1, 4), tile_boxes.reshape(-1, 4)]).astype(np.float64)
    return AnyresLayout(num_tiles, rows, cols, uh, uw, top, left, g, candidates, packed, boxes)


def max_candidates(cfg: ImageProcessorConfig, patch_grid: int) -> int:
    """Largest candidate count over all pinpoints: base + the largest tile count times patch_grid**2."""
    tiles = max((ph // cfg.crop_size) * (pw // cfg.crop_size) for ph, pw in _pinpoints(cfg))
    return (1 + tiles) * patch_grid**2


# ---- family interface (see sts_export.families); torch is imported lazily
NAME = "llava-next"
MODEL_TYPES = ("llava_next",)


def recipe_from_config(cfg: dict[str, Any], config_dir: Path, name: str) -> Recipe:
    """A recipe from a LLaVA-NeXT config.json: LLaVA's fields plus the anyres pinpoints."""
    points = cfg.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise StsError(f"{config_dir}/config.json: only vision_feature_select_strategy 'default' (CLS dropped) is supported")
    return llava.recipe_from_config(cfg, config_dir, name, family=NAME, pinpoints=tuple(tuple(p) for p in points))


def hf_config(recipe: Recipe) -> dict[str, Any]:
    """A transformers LlavaNextConfig dict for the recipe's architecture."""
    cfg = llava.hf_config(recipe)
    cfg.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
               image_grid_pinpoints=[list(p) for p in recipe.image_processor.image_grid_pinpoints])
    return cfg


def prepare_image(image: Image.Image | str | os.PathLike | Sequence, recipe: Recipe) -> ImageInput:
    """One image -> pixel_values [T,3,336,336] (base + tiles), its Stage 1 candidates and packed order."""
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise StsError(f"{recipe.family} takes one image per call, got {len(image)}")
        image = image[0]
    img = load_image(image)
    cfg = recipe.image_processor
    grid = recipe.vision.image_size // recipe.vision.patch_size
    layout = token_layout((img.size[1], img.size[0]), cfg, grid)
    feeds = {"pixel_values": preprocess_anyres(img, cfg), "token_index": layout.candidates, "packed_index": layout.packed}
    return ImageInput(feeds, n=layout.n, n_full=len(layout.packed), size=img.size, boxes=layout.boxes)


def vision_inputs(pruned: bool) -> list[str]:
    """pixel_values [T,3,336,336] and token_index [N] (candidates) when Stage 1 prunes, else packed_index [N_full]."""
    return ["pixel_values", "token_index" if pruned else "packed_index"]


def vision_example(recipe: Recipe, pruned: bool) -> tuple[tuple, tuple]:
    """Example inputs for torch.export: T crops (1 + tiles) and a token index, both dynamic."""
    import torch
    from torch.export import Dim

    size, g2 = recipe.vision.image_size, recipe.vision.num_patches
    t_max = recipe.num_image_tokens // g2  # 1 + the most tiles a pinpoint holds
    t = 3
    n = 2 * g2 + 7
    index = torch.randperm(t * g2 + (0 if pruned else 1))[:n]  # packed_index may name the newline row t*g2
    shapes = ({0: Dim("T", min=1, max=t_max)}, {0: Dim("N", min=1, max=recipe.max_image_span)})
    return (torch.randn(t, 3, size, size), index), shapes


def build(recipe: Recipe) -> "torch.nn.Module":
    """LLaVA's modules plus the newline embedding."""
    import torch

    model = llava.build(recipe)
    model.image_newline = torch.nn.Parameter(torch.empty(recipe.text.hidden_size))
    return model


def candidate_features(model: "torch.nn.Module", pixel_values: "torch.Tensor", token_index: "torch.Tensor",
                       cls_attention: bool = False) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """Every crop through CLIP, then the candidates in packed order: V [1,N,C], CLS attention [1,N] | None."""
    feats, cls_att, _ = model.vision(pixel_values, cls_attention=cls_attention)  # [T,576,C], [T,576]
    v = feats.reshape(-1, feats.shape[-1])[token_index][None]  # [1, N, C]
    return v, None if cls_att is None else cls_att.reshape(-1)[token_index][None]


def full_embeds(model: "torch.nn.Module", pixel_values: "torch.Tensor", packed_index: "torch.Tensor") -> "torch.Tensor":
    """The image span as transformers packs it (base, unpadded tiles with a newline per row): [1, N_full, Hd]."""
    import torch

    emb = model.projector(model.vision(pixel_values)[0])  # [T, 576, Hd]
    emb = torch.cat([emb.reshape(-1, emb.shape[-1]), model.image_newline[None].to(emb.dtype)])  # newline = last row
    return emb[packed_index][None]


def project(model: "torch.nn.Module", feats: "torch.Tensor") -> "torch.Tensor":
    return model.projector(feats)
