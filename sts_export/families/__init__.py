"""Model families: one module per family, looked up by `Recipe.family`.

A family module provides exactly this (and nothing about selection, budgets, graph names, the
generation loop, export, validation, backends or bench, which are shared):

    NAME                      the `Recipe.family` value it serves
    MODEL_TYPES               the transformers `config.json` model_type(s) it loads
    recipe_from_config(cfg, config_dir, name) -> Recipe   recipe fields from a checkpoint's config
    hf_config(recipe) -> dict                             a transformers config (synthetic checkpoints)
    prepare_image(image, recipe) -> ImageInput            host preprocessing (numpy/PIL, equal to its
                                                          transformers processor) and token layout
    vision_inputs(pruned) -> list[str]                    the vision graph's input names
    build(recipe) -> torch.nn.Module                      empty modules (torch imported lazily)
    candidate_features(model, *inputs) -> (V [B,N,C], cls_attention [B,N] | None)
                                                          Stage 1 features, pre-projector, in kept order
    full_embeds(model, *inputs) -> [B, N_full, Hd]        the image span exactly as transformers packs it
    project(model, feats [B,K,C]) -> [B,K,Hd]             the projector
    raw_prompt_ids(recipe) -> [S] int64                   a valid raw prompt from the config's own token ids (one
                                                          image slot as the family's raw input ids hold it), for
                                                          models without a tokenizer (validation, the runner)

Optional, where a family differs from LLaVA:

    candidate_features may return a third tensor [B,N,D]: what `project` takes per candidate when it
                              is not V itself (Qwen2.5-VL: each LLM token's four pre-merger patches,
                              while V are their means)
    vision_example(recipe, pruned) -> (args, dynamic shapes)   example vision inputs for torch.export
    position_ids(image, prompt, recipe) -> [R, S_full]    explicit position ids of the *unpruned* prompt
                              (M-RoPE: R = 3); every kept token keeps its own (default: 1-D ids,
                              renumbered 0..S1-1 after Stage 1)
    check_selection(method, anchor)                       refuse a method/anchor the tower cannot serve
    profile_limits(recipe) -> dict[str, int]              the vision graph's own symbolic dims and their largest
                              value, for TensorRT's profiles (Qwen2.5-VL: W windows)
    deepstack(model, tokens [B,K,D]) -> [T,B,K,Hd]        DeepStack (Qwen3-VL): each kept candidate's T extra
                              embeddings, from the same per-candidate tokens `project` takes; segment1 adds plane t
                              after decoder layer t at the image positions. A family with it
                              (`Recipe.vision.deepstack_visual_indexes`) has candidates = its image span, in order
    preprocessor_config(recipe) -> dict                   preprocessor_config.json of synthetic checkpoints

Family modules import numpy/PIL at top level only, so the ONNX Runtime and TensorRT paths (which
need `prepare_image`) never import torch. Shared PyTorch layers live in `layers.py`.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from sts_export.errors import StsError
from sts_export.recipe import Recipe

FAMILIES = {"llava-1.5": "llava", "llava-next": "llava_next", "qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl"}


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image (or a batch, for fixed-N families) ready for the vision graph."""

    feeds: dict[str, np.ndarray]  # vision graph inputs, e.g. pixel_values [B,3,H,W]
    n: int  # Stage 1 candidates N of this image
    n_full: int  # image tokens the decoder sees without pruning (newline tokens included)
    size: tuple[int, int] = (0, 0)  # original (width, height)
    boxes: np.ndarray | None = field(default=None, compare=False)  # [N, 4] candidate boxes on the original image
    grid: tuple[int, ...] = ()  # the vision tower's patch grid where positions depend on it (Qwen2.5-VL: grid_thw)
    images: int = 0  # images in this input; 0: the leading axis of pixel_values (a batch of fixed-size images)

    @property
    def batch(self) -> int:
        if self.images:
            return self.images
        return 1 if "token_index" in self.feeds else int(next(iter(self.feeds.values())).shape[0])


def family_module(name: str) -> ModuleType:
    """The family module serving `Recipe.family == name`."""
    if name not in FAMILIES:
        raise StsError(f"unknown model family '{name}'; supported: {', '.join(FAMILIES)}")
    return importlib.import_module(f"sts_export.families.{FAMILIES[name]}")


def family_for_model_type(model_type: str | None) -> ModuleType:
    """The family that loads checkpoints whose config.json says `model_type`."""
    for name in FAMILIES:
        mod = family_module(name)
        if model_type in mod.MODEL_TYPES:
            return mod
    types = [t for n in FAMILIES for t in family_module(n).MODEL_TYPES]
    raise StsError(f"model_type '{model_type}' is not supported; supported: {', '.join(types)}")


def read_hf_config(config_dir: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory; missing or malformed is a one-line error."""
    path = Path(config_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StsError(f"{config_dir}: no config.json; is this a model checkpoint directory?") from None
    except json.JSONDecodeError as e:
        raise StsError(f"{path}: not valid JSON ({e})") from None


def recipe_from_hf_config(config_dir: str | os.PathLike, name: str | None = None) -> Recipe:
    """Derive a recipe from a checkpoint's config.json, by its model_type's family (family defaults)."""
    cfg = read_hf_config(config_dir)
    try:
        fam = family_for_model_type(cfg.get("model_type"))
    except StsError as e:
        raise StsError(f"{Path(config_dir) / 'config.json'}: {e}") from None
    return fam.recipe_from_config(cfg, Path(config_dir), name or Path(config_dir).name)


def check_matches_config(recipe: Recipe, config_dir: str | os.PathLike) -> None:
    """Refuse a checkpoint whose architecture differs from the named recipe's."""
    derived = recipe_from_hf_config(config_dir)
    if derived.family != recipe.family:
        raise StsError(f"checkpoint {config_dir} is a '{derived.family}' model, recipe '{recipe.name}' is "
                       f"'{recipe.family}'; pass the matching --recipe or omit it")
    for part in ("vision", "text"):
        a, b = getattr(recipe, part), getattr(derived, part)
        diffs = [
            f"{f.name}: recipe {getattr(a, f.name)} vs checkpoint {getattr(b, f.name)}"
            for f in dataclasses.fields(a)
            if getattr(a, f.name) != getattr(b, f.name) and f.name not in ("max_position_embeddings",)
        ]
        if diffs:
            raise StsError(
                f"checkpoint {config_dir} does not match recipe '{recipe.name}' ({part}: {'; '.join(diffs)}); "
                "pass --recipe for the right architecture or omit it to derive one from config.json"
            )
