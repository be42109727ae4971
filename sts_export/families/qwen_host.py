"""The Qwen VL families' host side (Qwen2.5-VL, and Qwen3-VL where the processor is the same): numpy/PIL only, so
the ONNX Runtime and TensorRT paths never import torch. The family modules (`qwen2_5_vl`, `qwen3_vl`) build on it.

* preprocessing equal bit for bit to transformers' `Qwen2VLImageProcessorPil` (what `AutoImageProcessor`
  builds for Qwen2.5-VL when torchvision is absent): RGB -> smart_resize to multiples of 28 px within
  [min_pixels, max_pixels] (PIL bicubic) -> *(1/255) in float64 -> float32 -> (x - mean) / std in float32
  -> patches [Np, C*T*ps*ps] = [Np, 1176], grouped by 2x2 merge units, the frame repeated T=2 times;
* what the vision graph needs besides the pixels, from grid_thw = (1, gh, gw): the ViT's 2-D rotary
  angles, the window permutation, and the window table (each window's patches padded to 64, and each patch's
  slot in it) the windowed blocks gather and attend within; transformers' cu_seqlens and segment ids for
  the reference checks;
* the 3-D M-RoPE position ids of the unpruned prompt (transformers' `get_rope_index`) and the decode rule;
* the token layout: N = (gh/2)*(gw/2) LLM tokens in raster order of the merged grid, each a 28x28 cell
  of the resized image, with its box on the original image.

Orders (Np patches, N = Np/4 LLM tokens / merge units):
  processor order  patches as `pixel_values` has them: merge units in raster order of the merged grid,
                   the 4 patches of a unit (2x2, row-major) contiguous. LLM-token order = raster order
                   of the merge units.
  window order     what the ViT blocks see: merge units window by window (windows in raster order,
                   112 px = 4x4 merge units each, clipped at the right/bottom edge), raster inside a
                   window. `window_index[k]` = raster index of the k-th unit in window order;
                   `argsort(window_index)` takes window order back to raster (LLM-token) order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from sts_export.errors import StsError
from sts_export.families.llava import load_image, to_rgb


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN, Qwen's preprocessor_config image_mean
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The published Qwen2.5-VL preprocessor_config.json values (min 4 LLM tokens, max 16384 LLM tokens).
MIN_PIXELS = 3136  # 56 * 56
MAX_PIXELS = 12845056  # 28 * 28 * 16384
MAX_ASPECT = 200  # smart_resize refuses more extreme aspect ratios

GridTHW = tuple[int, int, int]


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(height, width) both multiples of `factor`, area within [min_pixels, max_pixels], aspect kept as
    closely as possible: transformers' `smart_resize` (Python's round-half-even, then floor/ceil by the
    area scale when a bound is crossed). Defaults are transformers' function defaults."""
    height, width = int(height), int(width)
    if min(height, width) < 1:
        raise StsError(f"image is empty ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise StsError(f"image aspect ratio {max(height, width) / min(height, width):.1f} is above {MAX_ASPECT}, "
                       "which Qwen's image processor refuses; crop the image")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)  # shrink
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))  # grow
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def max_llm_tokens(max_pixels: int, patch_size: int = 14, merge_size: int = 2) -> int:
    """Upper bound of N over all images: smart_resize keeps h*w <= max_pixels, so N <= max_pixels / 28^2.

    A true bound whenever max_pixels >= 200 * 28^2 (below that, the `max(factor, ...)` clamp of a 200:1
    image could exceed it); the export's K_max and TensorRT profiles come from this.
    """
    return int(max_pixels) // (patch_size * merge_size) ** 2


def patchify(x: np.ndarray, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2) -> np.ndarray:
    """[C, H, W] float32 -> [Np, C*T*ps*ps]: patches grouped by merge unit (units in raster order, 2x2
    row-major inside), each patch flattened as (C, T, ps, ps) with the frame repeated T times."""
    c, h, w = x.shape
    gh, gw = h // patch_size, w // patch_size
    if gh * patch_size != h or gw * patch_size != w or gh % merge_size or gw % merge_size:
        raise StsError(f"image {w}x{h} is not a multiple of {patch_size * merge_size} px")
    m, ps = merge_size, patch_size
    p = x.reshape(c, gh // m, m, ps, gw // m, m, ps).transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, ps, ps]
    p = np.broadcast_to(p[:, :, :, :, :, None], (*p.shape[:5], temporal_patch_size, ps, ps))  # + T axis
    return np.ascontiguousarray(p.reshape(gh * gw, c * temporal_patch_size * ps * ps), dtype=np.float32)


def preprocess_qwen(image: Image.Image, *, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                    min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
                    ) -> tuple[np.ndarray, GridTHW]:
    """PIL image -> (pixel_values [Np, 3*T*ps*ps] float32, grid_thw (1, gh, gw)); equal bit for bit to
    transformers' Qwen2VLImageProcessorPil with the same settings (Np = gh*gw; 1176 = 3*2*14*14).
    Exception: 16-bit grayscale ("I;16") images, which `to_rgb` scales to 8 bit where transformers clips."""
    img = to_rgb(image)
    w0, h0 = img.size
    h, w = smart_resize(h0, w0, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels)
    img = img.resize((w, h), resample=Image.BICUBIC)  # PIL takes (width, height)
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)  # rescale: float64 product, then float32
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)  # float32 throughout
    pixel_values = patchify(x.transpose(2, 0, 1), patch_size, temporal_patch_size, merge_size)  # [Np, 1176]
    return pixel_values, (1, h // patch_size, w // patch_size)


def _grid(grid_thw: Sequence[int] | np.ndarray, merge_size: int) -> tuple[int, int]:
    """(gh, gw) of one image's grid_thw (t must be 1), checked against the merge size."""
    g = np.asarray(grid_thw).reshape(-1)
    if g.shape[0] != 3:
        raise StsError(f"grid_thw must be (t, gh, gw) of one image, got {g.tolist()}")
    t, gh, gw = (int(v) for v in g)
    if t != 1:
        raise StsError(f"grid_thw t = {t}: only still images (t = 1) are supported")
    if gh < merge_size or gw < merge_size or gh % merge_size or gw % merge_size:
        raise StsError(f"grid_thw {g.tolist()} is not a whole number of {merge_size}x{merge_size} merge units")
    return gh, gw


# host side: vision-graph inputs from grid_thw
def vision_position_ids(grid_thw: Sequence[int], merge_size: int = 2) -> np.ndarray:
    """[Np, 2] int64 (row, col) of each patch in the patch grid, in processor order."""
    gh, gw = _grid(grid_thw, merge_size)
    m = merge_size
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")  # [gh, gw]
    rows = rows.reshape(gh // m, m, gw // m, m).transpose(0, 2, 1, 3).reshape(-1)  # merge-unit grouping
    cols = cols.reshape(gh // m, m, gw // m, m).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols], axis=-1).astype(np.int64)


def vision_inv_freq(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """[head_dim/4] float32 inverse frequencies of the ViT's axial rotary embedding (one set per axis).

    The exponent is float32 as in torch, the power in float64 rounded to float32: equal to torch's
    float32 `theta ** x` for the real ViT (head_dim 80) and the small dims tested (<= 128 at theta 1e4);
    elsewhere torch's pow may differ by an ulp.
    """
    if head_dim % 4:
        raise StsError(f"vision head_dim {head_dim} must be a multiple of 4 (2-D rotary)")
    half = head_dim // 2
    expo = np.arange(0, half, 2, dtype=np.float32) / np.float32(half)  # [head_dim/4] float32
    return (np.float32(1.0) / (float(theta) ** expo.astype(np.float64)).astype(np.float32)).astype(np.float32)


def rotary_pos(grid_thw: Sequence[int], head_dim: int, merge_size: int = 2, theta: float = 10000.0) -> np.ndarray:
    """[Np, head_dim/2] float32 rotary angles per patch in processor order: [row * inv_freq, col * inv_freq]
    (transformers' rot_pos_emb before cos/sin; the blocks use cos/sin of it repeated twice, in window order)."""
    pos = vision_position_ids(grid_thw, merge_size).astype(np.float32)  # [Np, 2]
    freqs = pos[:, :, None] * vision_inv_freq(head_dim, theta)  # [Np, 2, head_dim/4] float32 products
    return np.ascontiguousarray(freqs.reshape(pos.shape[0], -1))  # [Np, head_dim/2] = [rows | cols]


def window_layout(grid_thw: Sequence[int], merge_size: int = 2, window_size: int = 112,
                  patch_size: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """(window_index [N] int64, window_tokens [W] int64): merge units in window order (their raster
    indices) and how many units each non-empty window holds (transformers' get_window_index)."""
    gh, gw = _grid(grid_thw, merge_size)
    lh, lw = gh // merge_size, gw // merge_size  # merged (LLM-token) grid
    ws = window_size // merge_size // patch_size  # window side in merge units (112 px -> 4)
    if ws < 1:
        raise StsError(f"window_size {window_size} px is smaller than one merge unit")
    raster = np.arange(lh * lw, dtype=np.int64).reshape(lh, lw)
    order, sizes = [], []
    for r0 in range(0, lh, ws):
        for c0 in range(0, lw, ws):
            win = raster[r0:r0 + ws, c0:c0 + ws].reshape(-1)  # raster inside the window
            order.append(win)
            sizes.append(win.size)
    return np.concatenate(order), np.asarray(sizes, dtype=np.int64)


def patch_window_perm(window_index: np.ndarray, merge_size: int = 2) -> np.ndarray:
    """[Np] int64: processor-order patch index of each patch in window order (x_window = x[perm])."""
    unit = merge_size * merge_size
    return (np.asarray(window_index, dtype=np.int64)[:, None] * unit + np.arange(unit)).reshape(-1)


def cu_seqlens_full(grid_thw: Sequence[int], merge_size: int = 2) -> np.ndarray:
    """[2] int32: transformers' cu_seqlens for the full-attention blocks of one image ([0, Np])."""
    gh, gw = _grid(grid_thw, merge_size)
    return np.asarray([0, gh * gw], dtype=np.int32)


def cu_seqlens_window(window_tokens: np.ndarray, merge_size: int = 2) -> np.ndarray:
    """[W+1] int32: transformers' cu_window_seqlens (patch boundaries of the windows, in window order)."""
    return np.concatenate([[0], np.cumsum(np.asarray(window_tokens) * merge_size * merge_size)]).astype(np.int32)


def segment_ids(cu_seqlens: np.ndarray) -> np.ndarray:
    """[Np] int64 segment id of each position from cumulative boundaries: attention is allowed where
    ids are equal (mask = ids[:, None] == ids[None, :]), equal to transformers' per-chunk attention."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    return np.repeat(np.arange(len(cu) - 1, dtype=np.int64), np.diff(cu))


@dataclass(frozen=True)
class VisionHostInputs:
    """What the vision graph needs besides pixel_values, for one image of grid (1, gh, gw).

    Np = gh*gw patches, N = Np/4 merge units (= LLM tokens), W windows. The ViT blocks run in window
    order; the Stage-1 features and the merger output must be returned to raster order with `reverse`.
    """

    grid_thw: GridTHW
    rotary_pos: np.ndarray  # [Np, d/2] float32, processor order (rot_pos_emb before cos/sin)
    window_index: np.ndarray  # [N] int64, window order -> raster index of the merge unit
    reverse: np.ndarray  # [N] int64 = argsort(window_index): x_raster = x_window[reverse]
    patch_perm: np.ndarray  # [Np] int64: x_window = x_processor[patch_perm]
    window_segments: np.ndarray  # [Np] int64, window order: window id of each patch (windowed blocks)
    full_segments: np.ndarray  # [Np] int64, window order: all 0 for one image (full blocks need no mask)
    window_patches: np.ndarray  # [W, P] int64: each window's patches (window-order indices), padded to P
    patch_slot: np.ndarray  # [Np] int64: where each window-order patch sits in window_patches flattened (w*P + j)
    cu_seqlens: np.ndarray  # [2] int32 (transformers, full blocks)
    cu_window_seqlens: np.ndarray  # [W+1] int32 (transformers, windowed blocks)

    @property
    def rotary_pos_window(self) -> np.ndarray:
        """[Np, d/2] float32 rotary angles already in window order (what the blocks consume)."""
        return self.rotary_pos[self.patch_perm]

    def feeds(self) -> dict[str, np.ndarray]:
        """The vision graph's host inputs besides pixel_values (the full-attention blocks of a single
        image attend everywhere, so they need no window input)."""
        return {"rotary_pos": self.rotary_pos, "window_index": self.window_index,
                "window_patches": self.window_patches, "patch_slot": self.patch_slot}


def window_patch_table(window_tokens: np.ndarray, merge_size: int = 2, window_size: int = 112,
                       patch_size: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """(window_patches [W, P] int64, patch_slot [Np] int64) for the windowed blocks' per-window attention, with
    P = (window_size / patch_size)^2 patches a window can hold (64 at 112 px / 14 px). Row w lists window w's
    patches (window order, contiguous) and pads with its first patch; patch_slot inverts it (w*P + j), so a
    graph gathers [W, P] windows, attends within each (the padding masked: a slot is valid where
    patch_slot[window_patches] equals its own flat index) and gathers the Np outputs back."""
    p = (window_size // patch_size) ** 2
    sizes = np.asarray(window_tokens, dtype=np.int64) * merge_size * merge_size  # patches per window
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    j = np.arange(p, dtype=np.int64)
    table = np.where(j[None] < sizes[:, None], starts[:, None] + j[None], starts[:, None])  # [W, P]
    slot = np.concatenate([w * p + np.arange(n, dtype=np.int64) for w, n in enumerate(sizes)])  # [Np]
    return np.ascontiguousarray(table), slot


def vision_host_inputs(grid_thw: Sequence[int], *, head_dim: int, merge_size: int = 2, window_size: int = 112,
                       patch_size: int = 14, theta: float = 10000.0) -> VisionHostInputs:
    """All of the vision graph's host inputs for one image's grid_thw (head_dim = ViT hidden / heads: 80)."""
    gh, gw = _grid(grid_thw, merge_size)
    win, sizes = window_layout(grid_thw, merge_size, window_size, patch_size)
    cu_win = cu_seqlens_window(sizes, merge_size)
    cu_full = cu_seqlens_full(grid_thw, merge_size)
    table, slot = window_patch_table(sizes, merge_size, window_size, patch_size)
    return VisionHostInputs(
        grid_thw=(1, gh, gw),
        rotary_pos=rotary_pos(grid_thw, head_dim, merge_size, theta),
        window_index=win,
        reverse=np.argsort(win, kind="stable").astype(np.int64),
        patch_perm=patch_window_perm(win, merge_size),
        window_segments=segment_ids(cu_win),
        full_segments=segment_ids(cu_full),
        window_patches=table,
        patch_slot=slot,
        cu_seqlens=cu_full,
        cu_window_seqlens=cu_win,
    )


def window_to_raster(x_window: np.ndarray, window_index: np.ndarray) -> np.ndarray:
    """Rows of [N, ...] from window order to raster (LLM-token) order."""
    return np.asarray(x_window)[np.argsort(window_index, kind="stable")]


def raster_to_window(x_raster: np.ndarray, window_index: np.ndarray) -> np.ndarray:
    """Rows of [N, ...] from raster (LLM-token) order to window order."""
    return np.asarray(x_raster)[np.asarray(window_index)]


def merge_group_mean(vit_out_window: np.ndarray, window_index: np.ndarray, merge_size: int = 2) -> np.ndarray:
    """Stage 1 features: ViT output before the merger [Np, C] (window order) -> mean over each 2x2 merge
    unit -> [N, C] in LLM-token (raster) order. Numpy reference of what the vision graph computes."""
    x = np.asarray(vit_out_window)
    unit = merge_size * merge_size
    groups = x.reshape(x.shape[0] // unit, unit, *x.shape[1:]).mean(axis=1)  # [N, C] window order
    return window_to_raster(groups, window_index)


# host side: token layout (raster order of the merged grid)
@dataclass(frozen=True)
class QwenLayout:
    """Where the N LLM tokens of one image come from."""

    size: tuple[int, int]  # original (width, height)
    resized: tuple[int, int]  # (width, height) after smart_resize
    grid_thw: GridTHW  # (1, gh, gw) patches
    boxes: np.ndarray  # [N, 4] float64 (x0, y0, x1, y1) on the original image, raster order
    merge_size: int = 2

    @property
    def llm_grid(self) -> tuple[int, int]:
        """(rows, cols) of the merged grid, gh/m x gw/m."""
        return self.grid_thw[1] // self.merge_size, self.grid_thw[2] // self.merge_size

    @property
    def n(self) -> int:
        return int(self.boxes.shape[0])


def token_boxes(size: tuple[int, int], resized: tuple[int, int], cell: int = 28) -> np.ndarray:
    """[N, 4] float64 boxes (x0, y0, x1, y1) in original pixels of the LLM tokens in raster order: the
    `cell`-px cells of the resized (width, height) image, scaled by original / resized per axis."""
    (w, h), (rw, rh) = size, resized
    xs = np.arange(rw // cell + 1, dtype=np.float64) * cell * (w / rw)  # [cols+1] cell edges
    ys = np.arange(rh // cell + 1, dtype=np.float64) * cell * (h / rh)  # [rows+1]
    x0, y0 = np.meshgrid(xs[:-1], ys[:-1])  # [rows, cols]
    x1, y1 = np.meshgrid(xs[1:], ys[1:])
    return np.stack([x0, y0, x1, y1], axis=-1).reshape(-1, 4)


def token_layout(size: tuple[int, int], *, patch_size: int = 14, merge_size: int = 2,
                 min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> QwenLayout:
    """The layout of an image of original (width, height), without reading its pixels."""
    w, h = int(size[0]), int(size[1])
    factor = patch_size * merge_size
    rh, rw = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return QwenLayout((w, h), (rw, rh), (1, rh // patch_size, rw // patch_size), token_boxes((w, h), (rw, rh), factor),
                      merge_size)


# host side: 3-D M-RoPE position ids
def image_position_ids(grid_thw: Sequence[int], start: int, merge_size: int = 2) -> np.ndarray:
    """[3, N] int64 (t, h, w) ids of the image's LLM tokens in raster order: (start, start+row, start+col)."""
    gh, gw = _grid(grid_thw, merge_size)
    lh, lw = gh // merge_size, gw // merge_size
    rows, cols = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
    return np.stack([np.zeros(lh * lw, np.int64), rows.reshape(-1), cols.reshape(-1)]).astype(np.int64) + int(start)


def expand_image_pad(input_ids: np.ndarray, n: int, image_token_id: int) -> np.ndarray:
    """Raw ids with one image pad token -> the pad repeated N times (what the Qwen processor emits)."""
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    at = np.flatnonzero(ids == image_token_id)
    if at.size != 1:
        raise StsError(f"input_ids must hold exactly one image token ({image_token_id}) before expansion, "
                       f"found {at.size}")
    return np.concatenate([ids[:at[0]], np.full(int(n), image_token_id, np.int64), ids[at[0] + 1:]])


def rope_index(input_ids: np.ndarray, grid_thw: Sequence[int], image_token_id: int, vision_start_id: int,
               merge_size: int = 2) -> tuple[np.ndarray, int]:
    """(position_ids [3, S] int64, rope_delta) for a prompt [S] with one expanded image: transformers'
    get_rope_index. Text before the image counts 0..P-1 on all axes (P includes <|vision_start|>);
    image token (r, c) gets (P, P+r, P+c); text after restarts at P + max(rows, cols) on all axes.
    rope_delta = max(ids) + 1 - S; decode step t (0-based) then has id S + t + rope_delta =
    max(ids) + 1 + t on all three axes (see `decode_position_ids`)."""
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    s = ids.shape[0]
    at = np.flatnonzero(ids == image_token_id)
    if at.size == 0:  # text only: 1-D ids on every axis
        return np.broadcast_to(np.arange(s, dtype=np.int64), (3, s)).copy(), 0
    gh, gw = _grid(grid_thw, merge_size)
    lh, lw = gh // merge_size, gw // merge_size
    p, n = int(at[0]), lh * lw
    if at.size != n or int(at[-1]) != p + n - 1:
        raise StsError(f"input_ids must hold one contiguous run of {n} image tokens for grid_thw "
                       f"{[1, gh, gw]}, found {at.size}")
    if p == 0 or ids[p - 1] != vision_start_id:
        raise StsError(f"the image tokens must follow <|vision_start|> ({vision_start_id})")
    pos = np.empty((3, s), dtype=np.int64)
    pos[:, :p] = np.arange(p)
    pos[:, p:p + n] = image_position_ids(grid_thw, p, merge_size)
    nxt = p + max(lh, lw)
    pos[:, p + n:] = nxt + np.arange(s - p - n)
    return pos, int(pos.max()) + 1 - s


def decode_position_ids(prompt_position_ids: np.ndarray, steps: int, start: int = 0) -> np.ndarray:
    """[3, steps] int64 ids of decode steps start..start+steps-1: max(prompt ids) + 1 + t on all axes
    (equal to transformers' cache_length + rope_delta). Prune-independent: kept tokens keep their ids."""
    nxt = int(np.asarray(prompt_position_ids).max()) + 1 + int(start)
    return np.broadcast_to(np.arange(nxt, nxt + int(steps), dtype=np.int64), (3, int(steps))).copy()


# host side: one image, everything the host computes
@dataclass(frozen=True)
class QwenImage:
    """One preprocessed image: vision-graph feeds and the token layout."""

    pixel_values: np.ndarray  # [Np, 1176] float32
    vision: VisionHostInputs
    layout: QwenLayout

    @property
    def n(self) -> int:
        return self.layout.n

    def feeds(self) -> dict[str, np.ndarray]:
        """pixel_values [Np, 1176], rotary_pos [Np, d/2], window_index [N], window_patches [W, P], patch_slot [Np]."""
        return {"pixel_values": self.pixel_values, **self.vision.feeds()}


def prepare_qwen_image(image: Image.Image | str, *, head_dim: int, patch_size: int = 14, temporal_patch_size: int = 2,
                       merge_size: int = 2, window_size: int = 112, theta: float = 10000.0,
                       min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                       mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> QwenImage:
    """Image (PIL or path) -> pixel patches, vision host inputs and layout (plain arguments; the family's
    `prepare_image(image, recipe)` passes the recipe's fields)."""
    img = load_image(image)
    pv, grid = preprocess_qwen(img, patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                               merge_size=merge_size, min_pixels=min_pixels, max_pixels=max_pixels, mean=mean, std=std)
    vis = vision_host_inputs(grid, head_dim=head_dim, merge_size=merge_size, window_size=window_size,
                             patch_size=patch_size, theta=theta)
    layout = token_layout(img.size, patch_size=patch_size, merge_size=merge_size,
                          min_pixels=min_pixels, max_pixels=max_pixels)
    return QwenImage(pv, vis, layout)

