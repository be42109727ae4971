"""Qwen2.5-VL: dynamic-resolution window-attention ViT -> 2x2 PatchMerger -> Qwen2 decoder with 3-D M-RoPE.

The host side (preprocessing equal to transformers' processor, the vision graph's window and rotary inputs, M-RoPE
position ids, the token layout; numpy/PIL only) is `families/qwen_host.py`, shared with Qwen3-VL; this module is the
family interface: recipes from a checkpoint's config, the vision graph's inputs and example, and the torch model.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from sts_export.errors import StsError
from sts_export.families import ImageInput
from sts_export.families.llava import load_image
from sts_export.families.qwen_host import (
    CLIP_MEAN, CLIP_STD, MIN_PIXELS, MAX_PIXELS, vision_host_inputs, rope_index, QwenImage, prepare_qwen_image,
)
from sts_export.recipe import (ImageProcessorConfig, PruningConfig, Recipe, TextConfig, VisionConfig, fit_context,
                               from_dict)
from sts_export.tokenizer import text_ids

if TYPE_CHECKING:
    import torch

    from sts_export.tokenizer import Prompt

NAME = "qwen2.5-vl"
MODEL_TYPES = ("qwen2_5_vl",)


# ---- family interface (see sts_export.families); torch is imported lazily
#
# Vision graph: pixel_values [Np, 1176], rotary_pos [Np, d/2], window_index [N], window_patches [W, P],
# patch_slot [Np] (host-computed, `vision_host_inputs`), one image per call; the windowed blocks attend per
# window ([W, P] gathered, the padding masked), the full-attention blocks over all Np patches. Stage 1 selects on V [1, N, C] = the 2x2
# means of the pre-merger ViT output, raster order; the PatchMerger then runs on the kept tokens' own
# four pre-merger patches (candidate_features' third output), so a kept token's embedding is exactly
# transformers' merger output for it. Position ids are 3-D (M-RoPE), from `rope_index` on the unpruned
# layout; kept tokens keep theirs (`position_ids`).
DEFAULT_EXPORT_MAX_PIXELS = 1280 * 28 * 28  # an export's default --max-pixels: N <= 1280 (K_max, TensorRT profiles)
VIDEO_TOKEN_ID = 151656  # <|video_pad|> of the published tokenizer (no video here; transformers' config wants one)
CHAT_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><image><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")


def no_cls(model: str) -> str:
    """The one-line refusal of `cls` / anchor `saliency` for a ViT without [CLS]."""
    return (f"{model}'s ViT has no [CLS] token, so method 'cls' (and anchor 'saliency') cannot run; "
            "use sts, sts-s, divprune, fastv or none (anchor mean or first)")


NO_CLS = no_cls("Qwen2.5-VL")


def preprocessor_bounds(config_dir: Path, default: tuple[int, int] = (MIN_PIXELS, MAX_PIXELS)) -> tuple[int, int]:
    """(min_pixels, max_pixels) from a checkpoint's preprocessor_config.json (`default`, the published values,
    without one)."""
    f = Path(config_dir) / "preprocessor_config.json"
    if not f.is_file():
        return default
    try:
        pp = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise StsError(f"{f}: not valid JSON ({e})") from None
    size = pp.get("size") or {}
    return (int(pp.get("min_pixels") or size.get("shortest_edge") or default[0]),
            int(pp.get("max_pixels") or size.get("longest_edge") or default[1]))


def text_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's fields of a Qwen config.json: the published flat layout and transformers-5's
    `text_config` alike (text_config wins)."""
    return {**{k: x for k, x in cfg.items() if k not in ("vision_config", "text_config")}, **(cfg.get("text_config") or {})}


def derived_recipe(cfg: dict[str, Any], config_dir: Path, name: str, family: str, vision: VisionConfig,
                   text: TextConfig, bounds: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                   template: str) -> Recipe:
    """A Qwen recipe from a config.json's token ids (the published Qwen ids without them), generation_config.json's
    stop ids, the pixel bounds and the family's template. Family defaults: prune_layer = L // 2, rho = 1/3."""
    t = text_fields(cfg)
    eos = t.get("eos_token_id", 151645)
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    gen = Path(config_dir) / "generation_config.json"
    if gen.is_file():
        g = json.loads(gen.read_text()).get("eos_token_id")
        eos_ids += [x for x in (g if isinstance(g, list) else [g]) if x is not None and x not in eos_ids]
    recipe = Recipe(
        name=name,
        family=family,
        source=str(config_dir),
        vision=vision,
        text=text,
        image_token_id=cfg.get("image_token_id", 151655),
        vision_start_token_id=cfg.get("vision_start_token_id", 151652),
        vision_end_token_id=cfg.get("vision_end_token_id", 151653),
        image_token="<|image_pad|>",
        stop_token_ids=tuple(eos_ids),
        pad_token_id=t.get("pad_token_id") if t.get("pad_token_id") is not None else 151643,
        bos_token_id=t.get("bos_token_id") if t.get("bos_token_id") is not None else 151643,
        eos_token_id=eos_ids[0],
        pruning=PruningConfig(prune_layer=max(1, text.num_layers // 2)),
        image_processor=ImageProcessorConfig(min_pixels=bounds[0], max_pixels=bounds[1], image_mean=tuple(mean),
                                             image_std=tuple(std)),
        prompt_template=template,
        description=f"derived from config.json with {family} family defaults",
    )
    recipe = fit_context(recipe, text.max_position_embeddings)  # N at max_pixels + text, within the context
    return from_dict(Recipe, json.loads(json.dumps(recipe.to_dict())), "config.json")  # the recipe checks


def recipe_from_config(cfg: dict[str, Any], config_dir: Path, name: str) -> Recipe:
    """A recipe from a Qwen2.5-VL config.json: the published (flat text fields, `rope_scaling`) and the
    transformers-5 layout (`text_config`, `rope_parameters`) alike. Family defaults: prune_layer = L // 2, rho = 1/3."""
    cfg_path = Path(config_dir) / "config.json"
    v = cfg.get("vision_config") or {}
    t = text_fields(cfg)
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise StsError(f"{cfg_path}: only M-RoPE with default frequencies is supported, got {rope}")
    if t.get("use_sliding_window"):
        raise StsError(f"{cfg_path}: use_sliding_window is not supported (every decoder layer attends to the whole "
                       "sequence here)")
    heads = t.get("num_attention_heads", 28)
    layers = t.get("num_hidden_layers", 28)
    vrope = v.get("rope_parameters") or {}
    vision = VisionConfig(  # image_size keeps its default: unused at dynamic resolution
        patch_size=v.get("patch_size", 14),
        hidden_size=v.get("hidden_size", 1280),
        intermediate_size=v.get("intermediate_size", 3420),
        num_layers=v.get("depth", 32),
        num_heads=v.get("num_heads", 16),
        feature_layer=-1,
        layer_norm_eps=1e-6,  # transformers fixes the ViT's and merger's RMSNorm eps
        hidden_act=v.get("hidden_act", "silu"),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        window_size=v.get("window_size", 112),
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        out_hidden_size=v.get("out_hidden_size", t.get("hidden_size", 3584)),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    text = TextConfig(
        hidden_size=t.get("hidden_size", 3584),
        intermediate_size=t.get("intermediate_size", 18944),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads,
        vocab_size=t.get("vocab_size", 152064),
        max_position_embeddings=t.get("max_position_embeddings", 128000),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1000000.0))),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        attention_bias=True,  # transformers' Qwen2.5-VL always has q/k/v biases
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
    )
    return derived_recipe(cfg, config_dir, name, NAME, vision, text, preprocessor_bounds(config_dir), CLIP_MEAN, CLIP_STD,
                          CHAT_TEMPLATE)


def qwen_hf_config(recipe: Recipe, architecture: str, model_type: str, vision: dict[str, Any],
                   text: dict[str, Any]) -> dict[str, Any]:
    """A transformers config dict (transformers-5 layout) of a Qwen VL model: the token ids (a video id no other token
    uses: transformers' config wants one), the ViT and decoder fields every Qwen VL has, plus the family's own
    `vision` / `text` fields."""
    v, t = recipe.vision, recipe.text
    used = {recipe.image_token_id, recipe.vision_start_token_id, recipe.vision_end_token_id, recipe.bos_token_id,
            recipe.eos_token_id, recipe.pad_token_id}
    video = VIDEO_TOKEN_ID if VIDEO_TOKEN_ID < t.vocab_size and VIDEO_TOKEN_ID not in used else max(used) + 1
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "image_token_id": recipe.image_token_id,
        "video_token_id": video,
        "vision_start_token_id": recipe.vision_start_token_id,
        "vision_end_token_id": recipe.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": {
            "model_type": f"{model_type}_vision", "depth": v.num_layers, "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "hidden_act": v.hidden_act,
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size, "in_channels": 3,
            "spatial_merge_size": v.spatial_merge_size, "out_hidden_size": v.out_hidden_size,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}, **vision,
        },
        "text_config": {
            "model_type": f"{model_type}_text", "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
            "bos_token_id": recipe.bos_token_id, "eos_token_id": recipe.eos_token_id,
            "pad_token_id": recipe.pad_token_id, "hidden_act": "silu", **text,
        },
    }


def hf_config(recipe: Recipe) -> dict[str, Any]:
    """A transformers Qwen2_5_VLConfig dict (transformers-5 layout) for the recipe's architecture."""
    v, t = recipe.vision, recipe.text
    if not t.attention_bias:
        raise StsError(f"recipe '{recipe.name}': Qwen2.5-VL's q/k/v projections always have a bias (attention_bias: true)")
    return qwen_hf_config(
        recipe, "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl",
        {"window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes)},
        {"rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)},
         "tie_word_embeddings": t.tie_word_embeddings, "use_sliding_window": False})


def qwen_preprocessor_config(recipe: Recipe, processor_class: str) -> dict[str, Any]:
    """preprocessor_config.json of a Qwen VL checkpoint (transformers builds its Qwen2VLImageProcessor from it)."""
    v, p = recipe.vision, recipe.image_processor
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor_class,
        "size": {"shortest_edge": p.min_pixels, "longest_edge": p.max_pixels},
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size, "merge_size": v.spatial_merge_size,
        "image_mean": list(p.image_mean), "image_std": list(p.image_std), "do_resize": True, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
    }


def preprocessor_config(recipe: Recipe) -> dict[str, Any]:
    """preprocessor_config.json as the published checkpoints hold it (min_pixels / max_pixels beside `size`)."""
    p = recipe.image_processor
    return {**qwen_preprocessor_config(recipe, "Qwen2_5_VLProcessor"), "min_pixels": p.min_pixels,
            "max_pixels": p.max_pixels}


def _prepare(img: Image.Image, recipe: Recipe) -> QwenImage:
    v, p = recipe.vision, recipe.image_processor
    return prepare_qwen_image(img, head_dim=v.hidden_size // v.num_heads, patch_size=v.patch_size,
                              temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
                              window_size=v.window_size, theta=v.rope_theta, min_pixels=p.min_pixels,
                              max_pixels=p.max_pixels, mean=p.image_mean, std=p.image_std)


def prepare_image(image: Image.Image | str | os.PathLike | Sequence, recipe: Recipe) -> ImageInput:
    """One image -> the vision graph's feeds (patches [Np, 1176] and the host-computed ViT inputs), its
    N LLM tokens (raster order of the merged grid), their 28-px cells on the original image, grid_thw."""
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise StsError(f"{recipe.family} takes one image per call, got {len(image)}")
        image = image[0]
    qi = _prepare(load_image(image), recipe)
    if qi.n > recipe.num_image_tokens:  # only a >= 200:1 strip under a small max_pixels can get here
        raise StsError(f"this image gives {qi.n} visual tokens, more than the {recipe.num_image_tokens} the recipe "
                       f"allows (max_pixels {recipe.image_processor.max_pixels}); crop it")
    return ImageInput(qi.feeds(), n=qi.n, n_full=qi.n, size=qi.layout.size, boxes=qi.layout.boxes,
                      grid=qi.vision.grid_thw, images=1)


def position_ids(image: ImageInput, prompt: "Prompt", recipe: Recipe) -> np.ndarray:
    """[3, S] int64 M-RoPE ids of the unpruned prompt prefix + N image tokens + suffix (`rope_index`)."""
    ids = np.concatenate([prompt.prefix, np.full(image.n_full, recipe.image_token_id, np.int64), prompt.suffix])
    pos, _ = rope_index(ids, image.grid, recipe.image_token_id, recipe.vision_start_token_id,
                        recipe.vision.spatial_merge_size)
    return pos


def raw_prompt_ids(recipe: Recipe) -> np.ndarray:
    """A valid raw prompt from the config's own ids, for a model without a tokenizer: two stand-in text ids,
    <|vision_start|>, one <|image_pad|> (the pipeline expands it to N), <|vision_end|>, three text ids (no BOS:
    Qwen's tokenizer adds none)."""
    text = text_ids(recipe)
    image = [recipe.vision_start_token_id, recipe.image_token_id, recipe.vision_end_token_id]
    return np.asarray([*text[:2], *image, *text[2:]], dtype=np.int64)


def check_selection(method: str, anchor: str) -> None:
    if method == "cls" or anchor == "saliency":
        raise StsError(NO_CLS)


def vision_inputs(pruned: bool) -> list[str]:
    """pixel_values [Np,1176], rotary_pos [Np,d/2], window_index [N], window_patches [W,P], patch_slot [Np]."""
    return ["pixel_values", "rotary_pos", "window_index", "window_patches", "patch_slot"]


def profile_limits(recipe: Recipe) -> dict[str, int]:
    """The vision graph's own symbolic dims and their largest value, for TensorRT's profiles: W windows."""
    return {"W": max_windows(recipe)}


def max_windows(recipe: Recipe) -> int:
    """The most windows any image within the recipe's max_pixels can have (the TensorRT profiles' W): over every
    merged grid rows x cols with rows * cols <= N_max, ceil(rows / ws) * ceil(cols / ws), ws = window side in
    LLM tokens (4 at 112 px)."""
    v = recipe.vision
    ws = max(1, v.window_size // v.patch_size // v.spatial_merge_size)
    n = recipe.num_image_tokens
    return max(math.ceil(r / ws) * math.ceil((n // r) / ws) for r in range(1, n + 1))


def min_llm_tokens(recipe: Recipe) -> int:
    """Smallest N any image gives: smart_resize keeps h*w >= min_pixels."""
    cell = recipe.vision.patch_size * recipe.vision.spatial_merge_size
    return max(1, math.ceil(recipe.image_processor.min_pixels / cell**2))


def vision_example(recipe: Recipe, pruned: bool) -> tuple[tuple, tuple]:
    """Example vision inputs (a 6 x 8-token image: two windows across, ragged) and their dynamic axes:
    N LLM tokens in [min, max] of the recipe's pixel bounds, Np = merge**2 * N patches."""
    import torch
    from torch.export import Dim

    v = recipe.vision
    unit = v.spatial_merge_size**2
    grid = (1, 6 * v.spatial_merge_size, 8 * v.spatial_merge_size)
    host = vision_host_inputs(grid, head_dim=v.hidden_size // v.num_heads, merge_size=v.spatial_merge_size,
                              window_size=v.window_size, patch_size=v.patch_size, theta=v.rope_theta)
    n = Dim("tokens", min=min_llm_tokens(recipe), max=recipe.num_image_tokens)  # not "N": sympy reads that as N()
    w = Dim("windows", min=1, max=max_windows(recipe))
    np_ = grid[1] * grid[2]
    args = (torch.randn(np_, 3 * v.temporal_patch_size * v.patch_size**2), torch.from_numpy(host.rotary_pos),
            torch.from_numpy(host.window_index), torch.from_numpy(host.window_patches), torch.from_numpy(host.patch_slot))
    return args, ({0: unit * n}, {0: unit * n}, {0: n}, {0: w}, {0: unit * n})


def build(recipe: Recipe) -> "torch.nn.Module":
    """Empty Qwen2.5-VL modules (ViT + PatchMerger, Qwen2 decoder)."""
    from sts_export.families.layers import QwenVL

    return QwenVL(recipe)


def candidate_features(model: "torch.nn.Module", pixel_values: "torch.Tensor", rotary_pos: "torch.Tensor",
                       window_index: "torch.Tensor", window_patches: "torch.Tensor", patch_slot: "torch.Tensor",
                       cls_attention: bool = False) -> tuple["torch.Tensor", None, "torch.Tensor"]:
    """Stage 1 features V [1, N, C] = the 2x2 means of the pre-merger ViT output in LLM-token (raster)
    order; no CLS attention; and each token's four pre-merger patches [1, N, 4C] for `project`."""
    if cls_attention:
        raise StsError(NO_CLS)
    groups = model.vision(pixel_values, rotary_pos, window_index, window_patches, patch_slot)  # [N, unit*C] float32
    n, unit = groups.shape[0], model.vision.unit
    return groups.view(n, unit, -1).mean(dim=1)[None], None, groups[None]


def full_embeds(model: "torch.nn.Module", pixel_values: "torch.Tensor", rotary_pos: "torch.Tensor",
                window_index: "torch.Tensor", window_patches: "torch.Tensor", patch_slot: "torch.Tensor") -> "torch.Tensor":
    """The merger output of every LLM token in raster order [1, N, Hd], as transformers splices it."""
    return project(model, model.vision(pixel_values, rotary_pos, window_index, window_patches, patch_slot)[None])


def project(model: "torch.nn.Module", groups: "torch.Tensor") -> "torch.Tensor":
    """The PatchMerger on (kept) tokens' pre-merger patches [B, K, 4C] -> [B, K, Hd]."""
    return model.vision.merger(groups)
