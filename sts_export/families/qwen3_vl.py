"""Qwen3-VL: full-attention ViT with a resampled learned position table and DeepStack taps -> 2x2 mergers ->
Qwen3 decoder (q/k RMSNorm, explicit head_dim, interleaved 3-D M-RoPE), DeepStack planes added after its first layers.

What it shares with Qwen2.5-VL (`qwen2_5_vl`, imported, not copied): the processor (transformers builds
`Qwen2VLImageProcessorPil` for model_type qwen3_vl; here with 16-px patches, mean/std 0.5 and its own pixel
bounds), the 2-D rotary angles, the token layout and boxes (32-px cells), the unpruned prompt's 3-D ids
(`get_rope_index` gives the same ids for one image: Qwen3-VL's only differs for video timestamps), the raw
`input_ids` convention (`<|vision_start|>`, one `<|image_pad|>`, `<|vision_end|>`), the ViT attention and the
decoder layer.

What is its own:

* no windows: patches stay in processor order (merge units in raster order = LLM-token order), every block
  attends to the whole image, so the vision graph needs no window permutation or mask;
* the learned position table (`num_position_embeddings`, a square of side 48) bilinearly resampled to each
  image's patch grid: the host computes transformers' `get_vision_interpolation_indices_and_weights`
  (bilinear, align_corners, merge-unit order) as `interp_indices` / `interp_weights` [Np, 4];
* DeepStack: the outputs of ViT blocks `deepstack_visual_indexes` each pass their own merger (LayerNorm after
  the 2x2 shuffle) and are added to the decoder's hidden states at the image positions after decoder layers
  0..T-1 (transformers' `Qwen3VLTextModel._deepstack_process`). A kept token carries its main embedding and its
  own T DeepStack embeddings: the vision graph returns `deepstack_embeds` [T, B, K, Hd] beside `image_embeds`
  [B, K, Hd], and segment1 adds plane t after its layer t at the kept image positions.

Stage 1 selects on V = the 2x2 means of the last block's output (before the merger), in LLM-token order; the
mergers then run on the kept tokens' own patches only.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from sts_export.errors import StsError
from sts_export.families import ImageInput
from sts_export.families.llava import load_image
from sts_export.families.qwen2_5_vl import (  # noqa: F401  (position_ids, raw_prompt_ids: this family's too)
    derived_recipe, min_llm_tokens, no_cls, position_ids, preprocessor_bounds, qwen_hf_config,
    qwen_preprocessor_config, raw_prompt_ids, text_fields,
)
from sts_export.families.qwen_host import (QwenLayout, _grid, preprocess_qwen, rotary_pos, token_layout,
                                           vision_position_ids)
from sts_export.recipe import Recipe, TextConfig, VisionConfig

if TYPE_CHECKING:
    import torch

NAME = "qwen3-vl"
MODEL_TYPES = ("qwen3_vl",)

# The published Qwen/Qwen3-VL-*-Instruct preprocessor_config.json: size {shortest_edge 65536, longest_edge 16777216}
# (at least 64, at most 16384 LLM tokens of 32 x 32 px), patch_size 16, temporal_patch_size 2, merge_size 2,
# image_mean = image_std = [0.5, 0.5, 0.5].
MEAN = STD = (0.5, 0.5, 0.5)
MIN_PIXELS = 65536  # 256 * 256
MAX_PIXELS = 16777216  # 32 * 32 * 16384
PATCH = 16
# The published chat_template with one user turn holding one image then the text, add_generation_prompt=True:
# no default system prompt (unlike Qwen2.5-VL's).
CHAT_TEMPLATE = "<|im_start|>user\n<|vision_start|><image><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
NO_CLS = no_cls("Qwen3-VL")


# ---- host side (numpy/PIL only): the resampled position table's taps, one image's feeds

def interpolation_taps(grid_thw: Sequence[int], side: int, merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(interp_indices [Np, 4] int64, interp_weights [Np, 4] float32): for each patch in processor order, the four
    entries of the side x side position table that bilinear resampling (align_corners) to the (gh, gw) patch grid
    mixes, and their weights. Equal to transformers' get_vision_interpolation_indices_and_weights(mode="bilinear",
    align_corners=True, spatial_merge_size=merge_size) for one image, in the same float32 arithmetic."""
    gh, gw = _grid(grid_thw, merge_size)
    pos = vision_position_ids(grid_thw, merge_size)  # [Np, 2] (row, col), processor order

    def axis(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))  # float32, as torch
        floor = np.floor(src)
        offsets = np.arange(2)  # floor, floor + 1
        taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)  # [Np, 2]
        dist = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
        return taps, np.maximum(np.float32(1) - dist, np.float32(0))  # linear hat kernel [Np, 2] float32

    h_taps, h_w = axis(pos[:, 0], gh)
    w_taps, w_w = axis(pos[:, 1], gw)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return indices.astype(np.int64), weights.astype(np.float32)


def table_side(num_position_embeddings: int) -> int:
    """The learned table's side (transformers: int(num_position_embeddings ** 0.5)); it must be a square."""
    side = math.isqrt(int(num_position_embeddings))
    if side < 2 or side * side != num_position_embeddings:
        raise StsError(f"num_position_embeddings {num_position_embeddings} is not the square of a side of at least 2")
    return side


@dataclass(frozen=True)
class Qwen3Image:
    """One preprocessed image: the vision graph's feeds and the token layout (N LLM tokens, raster order)."""

    pixel_values: np.ndarray  # [Np, 3*T*ps*ps] float32 (1536 at 16 px)
    rotary_pos: np.ndarray  # [Np, d/2] float32 2-D rotary angles (rows | cols), processor order
    interp_indices: np.ndarray  # [Np, 4] int64 taps into the position table
    interp_weights: np.ndarray  # [Np, 4] float32 their bilinear weights
    layout: QwenLayout

    @property
    def n(self) -> int:
        return self.layout.n

    def feeds(self) -> dict[str, np.ndarray]:
        return {"pixel_values": self.pixel_values, "rotary_pos": self.rotary_pos,
                "interp_indices": self.interp_indices, "interp_weights": self.interp_weights}


def vision_host_inputs(grid_thw: Sequence[int], v: VisionConfig) -> dict[str, np.ndarray]:
    """rotary_pos [Np, d/2], interp_indices and interp_weights [Np, 4] for one image's grid_thw."""
    idx, w = interpolation_taps(grid_thw, table_side(v.num_position_embeddings), v.spatial_merge_size)
    return {"rotary_pos": rotary_pos(grid_thw, v.hidden_size // v.num_heads, v.spatial_merge_size, v.rope_theta),
            "interp_indices": idx, "interp_weights": w}


def prepare_qwen3_image(image: Image.Image | str, recipe: Recipe) -> Qwen3Image:
    """Image (PIL or path) -> pixel patches (bit-equal to transformers' processor), ViT host inputs and layout."""
    v, p = recipe.vision, recipe.image_processor
    img = load_image(image)
    pv, grid = preprocess_qwen(img, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                               merge_size=v.spatial_merge_size, min_pixels=p.min_pixels, max_pixels=p.max_pixels,
                               mean=p.image_mean, std=p.image_std)
    host = vision_host_inputs(grid, v)
    layout = token_layout(img.size, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                          min_pixels=p.min_pixels, max_pixels=p.max_pixels)
    return Qwen3Image(pv, host["rotary_pos"], host["interp_indices"], host["interp_weights"], layout)


# ---- family interface (see sts_export.families); torch is imported lazily
#
# Vision graph: pixel_values [Np, 1536], rotary_pos [Np, d/2], interp_indices [Np, 4], interp_weights [Np, 4], one
# image per call -> image_embeds [1, K, Hd], keep_pre [1, K], deepstack_embeds [T, 1, K, Hd]. candidate_features'
# third output is each token's own pre-merger patches of the last block and of every tap, concatenated
# [1, N, (1+T)*4C]; `project` merges the first 4C, `deepstack` the rest (each tap with its own merger).

def prepare_image(image: Image.Image | str | os.PathLike | Sequence, recipe: Recipe) -> ImageInput:
    """One image -> the vision graph's feeds, its N LLM tokens (raster order of the merged grid), their 32-px cells
    on the original image, grid_thw."""
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise StsError(f"{recipe.family} takes one image per call, got {len(image)}")
        image = image[0]
    qi = prepare_qwen3_image(image, recipe)
    if qi.n > recipe.num_image_tokens:  # only a >= 200:1 strip under a small max_pixels can get here
        raise StsError(f"this image gives {qi.n} visual tokens, more than the {recipe.num_image_tokens} the recipe "
                       f"allows (max_pixels {recipe.image_processor.max_pixels}); crop it")
    return ImageInput(qi.feeds(), n=qi.n, n_full=qi.n, size=qi.layout.size, boxes=qi.layout.boxes,
                      grid=qi.layout.grid_thw, images=1)


def check_selection(method: str, anchor: str) -> None:
    if method == "cls" or anchor == "saliency":
        raise StsError(NO_CLS)


def vision_inputs(pruned: bool) -> list[str]:
    """pixel_values [Np,1536], rotary_pos [Np,d/2], interp_indices [Np,4], interp_weights [Np,4] (pruned or not)."""
    return ["pixel_values", "rotary_pos", "interp_indices", "interp_weights"]


def vision_example(recipe: Recipe, pruned: bool) -> tuple[tuple, tuple]:
    """Example vision inputs (an r x (r+1)-token image just above the smallest N) and their dynamic axes: N LLM tokens
    in [min, max] of the recipe's pixel bounds, Np = merge**2 * N patches."""
    import torch
    from torch.export import Dim

    v = recipe.vision
    unit = v.spatial_merge_size**2
    r = math.isqrt(min_llm_tokens(recipe)) + 1  # N = r * (r + 1) > min, not square (rows != cols)
    grid = (1, r * v.spatial_merge_size, (r + 1) * v.spatial_merge_size)
    host = vision_host_inputs(grid, v)
    n = Dim("tokens", min=min_llm_tokens(recipe), max=recipe.num_image_tokens)  # not "N": sympy reads that as N()
    args = (torch.randn(grid[1] * grid[2], 3 * v.temporal_patch_size * v.patch_size**2),
            *(torch.from_numpy(host[k]) for k in ("rotary_pos", "interp_indices", "interp_weights")))
    return args, tuple({0: unit * n} for _ in args)


def build(recipe: Recipe) -> "torch.nn.Module":
    """Empty Qwen3-VL modules (ViT with its mergers, Qwen3 decoder)."""
    from sts_export.families.layers import Qwen3Vision, QwenVL

    return QwenVL(recipe, Qwen3Vision(recipe.vision))


def candidate_features(model: "torch.nn.Module", pixel_values: "torch.Tensor", rotary_pos: "torch.Tensor",
                       interp_indices: "torch.Tensor", interp_weights: "torch.Tensor", cls_attention: bool = False
                       ) -> tuple["torch.Tensor", None, "torch.Tensor"]:
    """Stage 1 features V [1, N, C] = the 2x2 means of the last block's output in LLM-token (raster) order; no CLS
    attention; each token's own pre-merger patches, last block then every DeepStack tap, [1, N, (1+T)*4C]."""
    if cls_attention:
        raise StsError(NO_CLS)
    groups = model.vision(pixel_values, rotary_pos, interp_indices, interp_weights)  # [1+T, N, unit*C] float32
    n, unit = groups.shape[1], model.vision.unit
    v = groups[0].view(n, unit, -1).mean(dim=1)[None]  # [1, N, C]
    return v, None, groups.transpose(0, 1).reshape(n, -1)[None]


def full_embeds(model: "torch.nn.Module", pixel_values: "torch.Tensor", rotary_pos: "torch.Tensor",
                interp_indices: "torch.Tensor", interp_weights: "torch.Tensor") -> "torch.Tensor":
    """The merger output of every LLM token in raster order [1, N, Hd], as transformers splices it."""
    return project(model, candidate_features(model, pixel_values, rotary_pos, interp_indices, interp_weights)[2])


def project(model: "torch.nn.Module", tokens: "torch.Tensor") -> "torch.Tensor":
    """The main merger on (kept) tokens' last-block patches: tokens [B, K, (1+T)*4C] -> [B, K, Hd]."""
    width = model.vision.unit * model.recipe.vision.hidden_size
    return model.vision.merger(tokens[..., :width])


def deepstack(model: "torch.nn.Module", tokens: "torch.Tensor") -> "torch.Tensor":
    """Each DeepStack tap's merger on (kept) tokens' tap patches: tokens [B, K, (1+T)*4C] -> [T, B, K, Hd]."""
    width = model.vision.unit * model.recipe.vision.hidden_size
    taps = tokens[..., width:].unflatten(-1, (-1, width)).movedim(-2, 0)  # [T, B, K, 4C]
    return model.vision.deepstack(taps)


# ---- recipes and synthetic checkpoints

def recipe_from_config(cfg: dict[str, Any], config_dir: Path, name: str) -> Recipe:
    """A recipe from a Qwen3-VL config.json (the published layout with `rope_scaling`, or transformers-5's with
    `rope_parameters`). Keys it lacks take transformers' Qwen3VL*Config defaults, as `from_pretrained` would.
    Family defaults: prune_layer = L // 2 (above the last DeepStack layer), rho = 1/3."""
    cfg_path = Path(config_dir) / "config.json"
    v = cfg.get("vision_config") or {}
    t = text_fields(cfg)
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise StsError(f"{cfg_path}: only M-RoPE with default frequencies is supported, got {rope}")
    if t.get("attention_bias", False):
        raise StsError(f"{cfg_path}: attention_bias true (q/k/v/o biases) is not supported for Qwen3-VL")
    vrope = v.get("rope_parameters") or {}
    vision = VisionConfig(  # image_size keeps its default: unused at dynamic resolution
        patch_size=v.get("patch_size", PATCH),
        hidden_size=v.get("hidden_size", 1152),
        intermediate_size=v.get("intermediate_size", 4304),
        num_layers=v.get("depth", 27),
        num_heads=v.get("num_heads", 16),
        feature_layer=-1,
        layer_norm_eps=1e-6,  # transformers fixes the ViT's and mergers' LayerNorm eps
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        out_hidden_size=v.get("out_hidden_size", 3584),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
        num_position_embeddings=v.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))),
    )
    heads = t.get("num_attention_heads", 32)
    text = TextConfig(
        hidden_size=t.get("hidden_size", 4096),
        intermediate_size=t.get("intermediate_size", 22016),
        num_layers=t.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads,
        vocab_size=t.get("vocab_size", 151936),
        max_position_embeddings=t.get("max_position_embeddings", 128000),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 500000.0))),
        mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
        head_dim=t.get("head_dim", 128),
        qk_norm=True,
        mrope_interleaved=True,  # transformers' Qwen3VLTextRotaryEmbedding always interleaves
    )
    return derived_recipe(cfg, config_dir, name, NAME, vision, text, preprocessor_bounds(config_dir, (MIN_PIXELS, MAX_PIXELS)),
                          MEAN, STD, CHAT_TEMPLATE)


def hf_config(recipe: Recipe) -> dict[str, Any]:
    """A transformers Qwen3VLConfig dict (transformers-5 layout) for the recipe's architecture."""
    v, t = recipe.vision, recipe.text
    if t.attention_bias or not t.qk_norm or not t.mrope_interleaved or not v.deepstack_visual_indexes:
        raise StsError(f"recipe '{recipe.name}': Qwen3-VL has q/k norms, interleaved M-RoPE, DeepStack taps and no "
                       "attention bias (qk_norm: true, mrope_interleaved: true, attention_bias: false)")
    return qwen_hf_config(
        recipe, "Qwen3VLForConditionalGeneration", "qwen3_vl",
        {"num_position_embeddings": v.num_position_embeddings,
         "deepstack_visual_indexes": list(v.deepstack_visual_indexes)},
        {"head_dim": t.head_dim, "attention_bias": False,
         "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section),
                             "mrope_interleaved": True}})


def preprocessor_config(recipe: Recipe) -> dict[str, Any]:
    """preprocessor_config.json as the published checkpoints hold it (the pixel bounds in `size` only)."""
    return qwen_preprocessor_config(recipe, "Qwen3VLProcessor")
