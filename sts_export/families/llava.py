"""LLaVA-1.5: CLIP ViT-L/14 (hidden state -2, CLS dropped) -> 2-layer MLP projector -> Llama/Vicuna.

The family glue only (see `sts_export.families` for the interface): config -> recipe, host image
preprocessing equal to transformers' LLaVA/CLIP processors (PIL + numpy: convert to RGB with alpha
composited on white -> [pad to square with the mean colour] -> resize shortest edge (bicubic) ->
center crop -> /255 -> normalize), and the vision side of the graphs. The image is one slot of 576
tokens in raster order; position ids are 1-D. Towers and decoder come from `layers.py`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from typing import TYPE_CHECKING, Any, Sequence

from sts_export.errors import StsError
from sts_export.families import ImageInput
from sts_export.recipe import (CLIP_MEAN, CLIP_STD, LLAVA_TEMPLATE, ImageProcessorConfig, PruningConfig, Recipe,
                               TextConfig, VisionConfig, fit_context, from_dict)
from sts_export.tokenizer import text_ids

if TYPE_CHECKING:
    import torch

NAME = "llava-1.5"
MODEL_TYPES = ("llava",)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' convert_to_rgb: transparency composited onto white, others converted."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # high bit depth grayscale: scale to 8 bit
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr * 255.0 / hi, 0, 255).astype(np.uint8))  # mode L
    return image.convert("RGB")


def load_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """Open an image file (or take a PIL image) and return it as RGB; clear errors for non-images."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = Path(image)
    if not path.is_file():
        raise StsError(f"image '{path}' does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            img = to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise StsError(f"'{path}' is not a readable image ({type(e).__name__}); pass a PNG/JPEG/WebP file") from None
    if min(img.size) < 1:
        raise StsError(f"image '{path}' is empty ({img.size[0]}x{img.size[1]})")
    return img


def pad_to_square(img: Image.Image, mean: tuple[float, float, float]) -> Image.Image:
    """Pad to a square with the mean colour, the original centred (LlavaImageProcessor.pad_to_square)."""
    w, h = img.size
    if w == h:
        return img
    s = max(w, h)
    out = Image.new("RGB", (s, s), tuple(int(m * 255) for m in mean))
    out.paste(img, ((s - w) // 2, (s - h) // 2))
    return out


def resized_size(w: int, h: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to shortest_edge (HF rounding: int())."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def preprocess_image(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """RGB PIL image -> pixel_values [3, crop, crop] float32."""
    img = to_rgb(image)
    if cfg.do_pad:
        img = pad_to_square(img, cfg.image_mean)
    img = img.resize(resized_size(*img.size, cfg.shortest_edge), resample=Image.BICUBIC)
    w, h = img.size
    c = cfg.crop_size
    if w < c or h < c:
        raise StsError(f"image resized to {w}x{h} is smaller than the crop {c}x{c}")
    top, left = (h - c) // 2, (w - c) // 2
    arr = np.asarray(img, dtype=np.uint8)[top:top + c, left:left + c]  # [c, c, 3]
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, dtype=np.float32)) / np.asarray(cfg.image_std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # [3, c, c]


def check_pixel_values(pixel_values: np.ndarray, image_size: int) -> None:
    """Wrong sizes or modes are one-line errors before any graph runs."""
    shape = tuple(pixel_values.shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2:] != (image_size, image_size):
        raise StsError(f"pixel_values must be [B, 3, {image_size}, {image_size}], got {list(shape)}")


# ----------------------------------------------------------------------------- family interface
# Text models a LLaVA checkpoint may hold: transformers' Llama (LLaVA-1.5, Vicuna) and Mistral (llava-v1.6-mistral).
# Both are the decoder of layers.py: a Mistral differs only by its sliding window, which a context no longer than the
# window makes moot (every cached token is within it), so the context is capped there.
TEMPLATES = {"llama": LLAVA_TEMPLATE, "mistral": "[INST] <image>\n{prompt} [/INST]"}


def _unsupported(cfg_path: Path, cfg: dict[str, Any], t: dict[str, Any]) -> str | None:
    """Why this LLaVA config cannot be served exactly (None: it can)."""
    rope = t.get("rope_parameters") or {}
    fl = cfg.get("vision_feature_layer", -2)
    checks = [
        (t.get("model_type", "llama") not in TEMPLATES,
         f"text model '{t.get('model_type')}' is not supported (supported: {', '.join(TEMPLATES)})"),
        (cfg.get("vision_feature_select_strategy", "default") != "default",
         "only vision_feature_select_strategy 'default' (CLS dropped) is supported"),
        (not isinstance(fl, int), f"a single integer vision_feature_layer is required, got {fl}"),
        (rope.get("rope_type", "default") != "default" or bool(t.get("rope_scaling")),
         f"only default RoPE is supported, got {rope or t.get('rope_scaling')}"),
        (t.get("hidden_act", "silu") != "silu", f"text hidden_act '{t.get('hidden_act')}' is not supported (silu)"),
        (bool(t.get("attention_bias")) or bool(t.get("mlp_bias")),
         "a text model with attention_bias/mlp_bias is not supported"),
        (cfg.get("multimodal_projector_bias", True) is False, "a projector without bias is not supported"),
    ]
    why = next((msg for bad, msg in checks if bad), None)
    return None if why is None else f"{cfg_path}: {why}"


def _image_processor(config_dir: Path, size: int, pinpoints: tuple[tuple[int, int], ...]) -> ImageProcessorConfig:
    """The checkpoint's preprocessor_config.json (resize, crop, pad, mean/std) as our image processor settings;
    without one, CLIP's at the tower's image size."""
    f = Path(config_dir) / "preprocessor_config.json"
    pp: dict[str, Any] = {}
    if f.is_file():
        try:
            pp = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise StsError(f"{f}: not valid JSON ({e})") from None
    edge, crop = pp.get("size") or {}, pp.get("crop_size") or {}
    crop = crop if isinstance(crop, dict) else {"height": crop}
    return ImageProcessorConfig(
        shortest_edge=int((edge if isinstance(edge, dict) else {"shortest_edge": edge}).get("shortest_edge", size)),
        crop_size=int(crop.get("height", size)),
        do_pad=bool(pp.get("do_pad", False)) and not pinpoints,  # NeXT's do_pad pads tile batches, not the image
        image_grid_pinpoints=pinpoints,
        image_mean=tuple(pp.get("image_mean", CLIP_MEAN)),
        image_std=tuple(pp.get("image_std", CLIP_STD)),
    )


def recipe_from_config(cfg: dict[str, Any], config_dir: Path, name: str, family: str = NAME,
                       pinpoints: tuple[tuple[int, int], ...] = ()) -> Recipe:
    """A recipe from a LLaVA-architecture config.json (family defaults: prune_layer = L // 2, rho = 1/3), its limits
    from the model's context (`fit_context`); an architecture served inexactly is refused in one line.

    LLaVA-NeXT reuses it with its `family` and anyres `pinpoints`.
    """
    cfg_path = Path(config_dir) / "config.json"
    v, t = cfg.get("vision_config", {}), cfg.get("text_config", {})
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise StsError(f"{cfg_path}: vision tower '{v.get('model_type')}' is not CLIP")
    why = _unsupported(cfg_path, cfg, t)
    if why:
        raise StsError(why)
    text_model = t.get("model_type", "llama")
    heads = t.get("num_attention_heads", 32)
    layers = t.get("num_hidden_layers", 32)
    hidden = t.get("hidden_size", 4096)
    rope = t.get("rope_parameters") or {}
    vision = VisionConfig(
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 32),
        hidden_size=v.get("hidden_size", 768),
        intermediate_size=v.get("intermediate_size", 3072),
        num_layers=v.get("num_hidden_layers", 12),
        num_heads=v.get("num_attention_heads", 12),
        feature_layer=cfg.get("vision_feature_layer", -2),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        hidden_act=v.get("hidden_act", "quick_gelu"),
    )
    head_dim = t.get("head_dim") or hidden // heads
    text = TextConfig(
        hidden_size=hidden,
        intermediate_size=t.get("intermediate_size", 14336 if text_model == "mistral" else 11008),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads,
        vocab_size=t.get("vocab_size", 32000),
        max_position_embeddings=t.get("max_position_embeddings", 4096 * 32 if text_model == "mistral" else 2048),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
        head_dim=0 if head_dim * heads == hidden else head_dim,
        tie_word_embeddings=bool(t.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
    )
    context = text.max_position_embeddings
    window = t.get("sliding_window") if text_model == "mistral" else None
    if window and window < context:  # attention within the window only: exact while no sequence is longer
        context = window
    pad = cfg.get("pad_token_id", t.get("pad_token_id"))
    recipe = Recipe(
        name=name,
        family=family,
        source=str(config_dir),
        vision=vision,
        text=text,
        projector_act=cfg.get("projector_hidden_act", "gelu"),
        image_token_id=cfg.get("image_token_id", cfg.get("image_token_index", 32000)),
        pad_token_id=pad if pad is not None else 0,
        bos_token_id=t.get("bos_token_id") if t.get("bos_token_id") is not None else 1,
        eos_token_id=t.get("eos_token_id") if t.get("eos_token_id") is not None else 2,
        pruning=PruningConfig(prune_layer=max(1, layers // 2)),
        image_processor=_image_processor(config_dir, vision.image_size, pinpoints),
        prompt_template=TEMPLATES[text_model],
        description=f"derived from config.json with {family} family defaults ({text_model} text model"
                    + (f"; context capped at its sliding window {window}" if context == window else "") + ")",
    )
    recipe = fit_context(recipe, context)
    return from_dict(Recipe, json.loads(json.dumps(recipe.to_dict())), cfg_path.name)  # the recipe checks


def hf_config(recipe: Recipe) -> dict[str, Any]:
    """A transformers LlavaConfig dict for the recipe's architecture."""
    v, t = recipe.vision, recipe.text
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_id": recipe.image_token_id,
        "pad_token_id": recipe.pad_token_id,
        "projector_hidden_act": recipe.projector_act,
        "vision_feature_layer": v.feature_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            "projection_dim": v.hidden_size,
        },
        "text_config": {
            "model_type": "llama", "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta, "bos_token_id": recipe.bos_token_id, "eos_token_id": recipe.eos_token_id,
            "pad_token_id": recipe.pad_token_id, "tie_word_embeddings": False, "hidden_act": "silu",
            "head_dim": t.head_dim,
        },
    }


def prepare_image(images: Image.Image | str | os.PathLike | Sequence, recipe: Recipe) -> ImageInput:
    """One image or a list (a batch) -> pixel_values [B, 3, 336, 336] float32, as transformers' processor."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise StsError("no image given")
    loaded = [load_image(im) for im in items]
    pv = np.stack([preprocess_image(im, recipe.image_processor) for im in loaded])
    n = recipe.num_image_tokens
    return ImageInput({"pixel_values": pv}, n=n, n_full=n, size=loaded[0].size)


def pixel_input(pixel_values: np.ndarray, recipe: Recipe) -> ImageInput:
    """Already preprocessed pixel_values [B, 3, H, W] as an ImageInput (checked)."""
    check_pixel_values(pixel_values, recipe.vision.image_size)
    n = recipe.num_image_tokens
    return ImageInput({"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)}, n=n, n_full=n)


def vision_inputs(pruned: bool) -> list[str]:
    return ["pixel_values"]


def vision_example(recipe: Recipe, pruned: bool) -> tuple[tuple, tuple]:
    """Example vision-graph inputs for torch.export and their dynamic axes (the batch)."""
    import torch
    from torch.export import Dim

    size = recipe.vision.image_size
    return (torch.randn(2, 3, size, size),), ({0: Dim("B", min=1, max=256)},)


def build(recipe: Recipe) -> "torch.nn.Module":
    """Empty LLaVA modules (CLIP tower to the feature layer, projector, decoder)."""
    from sts_export.families.layers import Llava

    return Llava(recipe)


def candidate_features(model: "torch.nn.Module", pixel_values: "torch.Tensor", cls_attention: bool = False
                       ) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """pixel_values [B,3,H,W] -> Stage 1 features [B,576,C] (pre-projector), CLS attention [B,576] | None."""
    feats, cls_att, _ = model.vision(pixel_values, cls_attention=cls_attention)
    return feats, cls_att


def full_embeds(model: "torch.nn.Module", pixel_values: "torch.Tensor") -> "torch.Tensor":
    """pixel_values [B,3,H,W] -> image embeddings [B,576,Hd], as transformers' LLaVA."""
    return model.projector(model.vision(pixel_values)[0])


def raw_prompt_ids(recipe: Recipe) -> np.ndarray:
    """A valid raw prompt from the config's own ids, for a model without a tokenizer: BOS (as Llama/Mistral
    tokenizers add it), two stand-in text ids, one image token (the pipeline expands it), three text ids."""
    text = text_ids(recipe)
    return np.asarray([recipe.bos_token_id, *text[:2], recipe.image_token_id, *text[2:]], dtype=np.int64)


def project(model: "torch.nn.Module", feats: "torch.Tensor") -> "torch.Tensor":
    """[B,K,C] vision features -> [B,K,Hd] LLM embeddings."""
    return model.projector(feats)
