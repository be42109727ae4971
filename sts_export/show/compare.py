"""Pictures of what pruning does: methods side by side (paper Figs. 6-7) and KNN consistency per
vision-encoder layer (paper Fig. 2).

    sts show compare --model tiny-llava --image cat.jpg --prompt "What is this?" \
        --methods sts,divprune,cls --budget 64 --png compare.png
    sts show consistency --model tiny-llava --image cat.jpg --out report/

Both run our torch modules on CPU by default; weights come from the same sources as
:class:`~sts_export.pipeline.Pipeline` (recipe name, local checkpoint dir, cached HF id).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from sts_export.pruning.budget import check_method, parse_budget, split_budget
from sts_export.checkpoint import init_random_, load_weights, resolve
from sts_export.show.diagnostics import consistency_per_layer
from sts_export.errors import StsError
from sts_export.families.layers import ClipLayer, ClipVision
from sts_export.graphs import build_graphs
from sts_export.pipeline import Pipeline
from sts_export.families.llava import load_image, preprocess_image
from sts_export.recipe import Recipe
from sts_export.backends.torch import TorchBackend
from sts_export.artifact.plan import Plan
from sts_export.show.pictures import compare_panels

def _methods(methods: Sequence[str] | str) -> list[str]:
    """Validated, de-duplicated method names (order kept); a comma-separated string is split."""
    if isinstance(methods, str):
        methods = methods.split(",")
    out: list[str] = []
    for m in methods:
        m = str(m).strip()
        if m and m not in out:
            out.append(check_method(m))
    if not out:
        raise StsError("no method given; pass e.g. --methods sts,divprune,cls,fastv")
    return out


def compare_methods(
    model: str,
    image: Image.Image | str | os.PathLike,
    prompt: str | None,
    methods: Sequence[str],
    budget: int | str,
    *,
    input_ids: Sequence[int] | None = None,
    recipe: str | None = None,
    random_weights: bool = False,
    anchor: str | None = None,
    device: str = "cpu",
    display_size: int | None = None,
) -> Image.Image:
    """Run every method through the torch Pipeline at the same budget (prefill + 1 new token) and
    draw what each kept, side by side (:func:`~sts_export.show.pictures.compare_panels`). ``input_ids``
    (holding one image token) replaces the prompt for models without a tokenizer (random weights).

    The model is loaded once and shared by all methods. Every (method, budget) pair is checked with
    :func:`~sts_export.pruning.budget.split_budget` before anything runs, so e.g. ``fastv`` at a budget too
    small for the model raises its one-line :class:`StsError` naming the valid range.
    """
    names = _methods(methods)
    budget = parse_budget(budget)
    rec = resolve(str(model), recipe, random_weights).recipe
    for m in names:
        split_budget(budget, rec, m)  # StsError (one line) for an invalid budget, before any loading
    img = load_image(image)

    first = Pipeline.from_pretrained(model, budget=budget, method=names[0], backend="torch", recipe=recipe,
                                     anchor=anchor, device=device, random_weights=random_weights)
    pv = first.pixel_values(img)  # [1, 3, H, W]
    results: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for m in names:
        if m == names[0]:
            pipe = first
        else:  # same weights, this method's graphs
            plan = Plan.create(first.recipe, m, budget, first.plan.dtype)
            graphs = build_graphs(first.model, m, budget, first.anchor)
            pipe = Pipeline(first.recipe, TorchBackend(graphs, plan, device), plan, first.tokenizer,
                            first.anchor, first.source, first.model)
        gen = pipe.generate(pv, prompt, input_ids=input_ids, max_new_tokens=1)
        results[m] = (gen.keep_pre[0], None if gen.keep_post is None else gen.keep_post[0])
    v = first.recipe.vision
    return compare_panels(img, results, first.recipe.image_processor, budget, image_size=v.image_size,
                          patch_size=v.patch_size, display_size=display_size)


class _Tower(nn.Module):
    """Holds a CLIP tower as ``.vision`` so checkpoint keys map onto it (``vision.*``)."""

    def __init__(self, vision: ClipVision) -> None:
        super().__init__()
        self.vision = vision


def full_vision_tower(model: str, *, recipe: str | None = None, random_weights: bool = False,
                      dtype: torch.dtype = torch.float32) -> tuple[ClipVision, Recipe, str]:
    """The model's CLIP tower with ALL its encoder layers (LLaVA's own is cut at the feature layer).

    Returns (tower, recipe, source description). With random weights the layers up to the feature
    layer are seeded exactly as :func:`~sts_export.checkpoint.load_model` seeds them and the later ones
    as the synthetic checkpoints do, so synthetic recipes give the same tower either way.
    """
    src = resolve(str(model), recipe, random_weights)
    rec = src.recipe
    all_cfg = dataclasses.replace(rec.vision, feature_layer=-1)  # hidden_states[-1]: every layer runs
    tower = _Tower(ClipVision(all_cfg))
    if src.path is not None:
        load_weights(tower, src.path, dtype)  # loads only the vision.* weights; all layers must be there
    else:
        used = rec.vision.layers_used
        head = _Tower(ClipVision(rec.vision))  # same parameter order as Llava's leading vision params
        init_random_(head, rec.seed)
        extra = nn.ModuleList(ClipLayer(rec.vision) for _ in range(rec.vision.num_layers - used))
        init_random_(extra, rec.seed + 1)
        tower.vision.embeddings, tower.vision.pre_layrnorm = head.vision.embeddings, head.vision.pre_layrnorm
        tower.vision.encoder.layers = nn.ModuleList([*head.vision.encoder.layers, *extra])
        tower = tower.to(dtype)
    return tower.vision.eval().requires_grad_(False), rec, src.description


def consistency(
    model: str,
    image: Image.Image | str | os.PathLike,
    *,
    recipe: str | None = None,
    random_weights: bool = False,
    ks: Sequence[int] = (5, 10, 20),
) -> dict[str, Any]:
    """KNN consistency (paper §3.1, eqs. 8-10) at every CLIP encoder layer, for every k.

    Layer l (1-based, as the paper; = transformers' ``hidden_states[l]``): features = that layer's
    output patch tokens (CLS dropped), scores = the CLS token's head-mean attention to the patches
    inside that layer. Returns :func:`~sts_export.show.diagnostics.consistency_per_layer`'s dict plus
    ``model`` (source), ``recipe`` (name), ``image_size`` (W, H) and ``feature_layer`` (the 1-based layer LLaVA feeds its projector).
    """
    ks = [int(k) for k in ks]
    tower, rec, desc = full_vision_tower(model, recipe=recipe, random_weights=random_weights)
    n = rec.num_image_tokens
    bad = [k for k in ks if not 1 <= k <= n - 1]
    if not ks or bad:
        raise StsError(f"k must be in 1..{n - 1} (the {n} patches, self excluded); got {', '.join(map(str, bad or ks))}")
    img = load_image(image)
    pv = torch.from_numpy(preprocess_image(img, rec.image_processor))[None]  # [1, 3, H, W]
    with torch.inference_mode():
        _, _, per_layer = tower(pv, all_layers=True)  # [(patches [1,N,C], cls attention [1,N])] per layer
    feats = [h[0].double().numpy() for h, _ in per_layer]  # [N, C] each
    scores = [a[0].double().numpy() for _, a in per_layer]  # [N] each
    result = consistency_per_layer(feats, scores, ks, layers=range(1, len(per_layer) + 1))
    result.update(model=desc, recipe=rec.name, image_size=list(img.size), feature_layer=rec.vision.layers_used)
    return result


__all__ = ["compare_methods", "consistency", "full_vision_tower"]
