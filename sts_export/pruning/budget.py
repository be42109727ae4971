"""Budget arithmetic: average visual tokens per decoder layer -> (K, K') for every method.

DESIGN.md: b = (prune_layer*K + (L - prune_layer)*K') / L. For STS,
K = round(b*L / (prune_layer + rho*(L - prune_layer))), K' = round(rho*K).
Methods without a Stage 2 keep K' = K (no prune graph); `full` means K = K' = N.
"""
from __future__ import annotations

from typing import NamedTuple

from sts_export.errors import StsError
from sts_export.recipe import Recipe

METHODS = ("sts", "sts-s", "divprune", "cls", "fastv", "none")
STAGE2_METHODS = ("sts", "fastv")
FASTV_LAYER = 2  # FastV prunes after layer 2 (its K=2)


class Split(NamedTuple):
    k_pre: int  # tokens kept by Stage 1 (N when there is no Stage 1)
    k_post: int  # tokens kept by Stage 2 (== k_pre when there is no Stage 2)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise StsError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    return method


def prune_layer_for(method: str, recipe: Recipe) -> int:
    """Index of the first decoder layer that sees the Stage-2-pruned sequence. With DeepStack (T taps added after
    decoder layers 0..T-1) it must be at least T, so FastV's fixed layer 2 is refused on a 3-tap model."""
    if method != "fastv":
        return recipe.pruning.prune_layer
    taps = len(recipe.vision.deepstack_visual_indexes)
    if FASTV_LAYER < taps:
        raise StsError(f"method 'fastv' prunes after decoder layer {FASTV_LAYER - 1}, but '{recipe.name}' still adds "
                       f"DeepStack features up to layer {taps - 1}; use sts, sts-s, divprune or none")
    return FASTV_LAYER


def has_stage2(method: str, budget: int | str) -> bool:
    return method in STAGE2_METHODS and budget != "full"


def _raw_split(b: float, n: int, recipe: Recipe, method: str) -> Split:
    layers = recipe.text.num_layers
    if method == "none":
        return Split(n, n)
    if method == "sts":
        pl, rho = recipe.pruning.prune_layer, recipe.pruning.post_ratio
        k = round(b * layers / (pl + rho * (layers - pl)))
        return Split(k, round(rho * k))
    if method == "fastv":
        return Split(n, round((b * layers - FASTV_LAYER * n) / (layers - FASTV_LAYER)))
    return Split(round(b), round(b))  # sts-s, divprune, cls


def _valid(split: Split, n: int) -> bool:
    return 1 <= split.k_post <= split.k_pre <= n


def valid_budget_range(recipe: Recipe, method: str = "sts") -> tuple[int, int]:
    """Smallest and largest integer budget that gives 1 <= K' <= K <= N."""
    n = recipe.num_image_tokens
    ok = [b for b in range(1, n + 1) if _valid(_raw_split(b, n, recipe, method), n)]
    if not ok:
        raise StsError(f"method '{method}' has no valid budget for recipe '{recipe.name}'")
    return ok[0], ok[-1]


def parse_budget(value: int | str) -> int | str:
    """'full', a positive integer count, or a ratio 'r%' (0 < r <= 100), from a CLI string or a Python int."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "full":
            return "full"
        if v.endswith("%"):
            try:
                r = float(v[:-1])
            except ValueError:
                r = -1.0
            if not 0.0 < r <= 100.0:
                raise StsError(f"a ratio budget must be in (0%, 100%], got '{value}'")
            return f"{r:g}%"
        try:
            value = int(v)
        except ValueError:
            raise StsError(f"budget must be a positive integer, a ratio like '20%', or 'full', got '{value}'") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StsError(f"budget must be a positive integer, a ratio like '20%', or 'full', got {value!r}")
    return value


def budget_tokens(budget: int | str, n: int) -> float:
    """b, the average visual tokens per decoder layer: a count as it is, a ratio r% as r*N (unrounded)."""
    return float(budget[:-1]) / 100.0 * n if isinstance(budget, str) and budget.endswith("%") else float(budget)


def split_budget(budget: int | str, recipe: Recipe, method: str = "sts", n: int | None = None) -> Split:
    """(K, K') for `method` at average budget `budget` (count, 'r%' or 'full'); errors name the valid range.

    `n` is the image's own token count where it depends on the image (anyres; for `fastv` the whole
    image span, newlines included): K is capped at n and K' at K. Without it, N is the recipe's
    largest N, and a budget outside the valid range is an error.
    """
    check_method(method)
    budget = parse_budget(budget)
    n_max = recipe.num_image_tokens
    n_img = n_max if n is None else n
    if budget == "full" or method == "none":
        return Split(n_img, n_img)
    split = _raw_split(budget_tokens(budget, n_img), n_img, recipe, method)
    if n is not None and recipe.dynamic_tokens:
        k = min(split.k_pre, n)  # capped at N; STS keeps its ratio rho = K'/K on the capped K
        kp = round(recipe.pruning.post_ratio * k) if method == "sts" else min(split.k_post, k)
        if kp < 1:
            raise StsError(f"budget {budget} leaves no image token for method '{method}' on an image of {n} tokens "
                           f"(K={split.k_pre}, K'={split.k_post}); use a larger budget")
        return Split(k, kp)
    if not _valid(split, n_img):
        lo, hi = valid_budget_range(recipe, method)
        raise StsError(
            f"budget {budget} is out of range for method '{method}' on '{recipe.name}' "
            f"(gives K={split.k_pre}, K'={split.k_post} with N={n_img}); valid budgets are {lo}..{hi}, a ratio "
            "like '20%', or 'full'"
        )
    return split


def export_split(budget: int | str, recipe: Recipe, method: str = "sts") -> Split:
    """(K, K') an export is built for: split_budget's, or for image-dependent N the largest any image
    can need (K_max, K'_max: the greedy's step count and Stage 2's constant TopK). FastV keeps the
    whole image span before Stage 2, and its K' grows as the span shrinks, so K'_max is the largest span."""
    split = split_budget(budget, recipe, method)
    if recipe.dynamic_tokens and method == "fastv" and budget != "full":
        return Split(recipe.max_image_span, recipe.max_image_span)
    return split
