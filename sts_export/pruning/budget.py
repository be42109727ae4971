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
    """Index of the first decoder layer that sees the Stage-2-pruned sequence."""
    return FASTV_LAYER if method == "fastv" else recipe.pruning.prune_layer


def has_stage2(method: str, budget: int | str) -> bool:
    return method in STAGE2_METHODS and budget != "full"


def _raw_split(b: int, recipe: Recipe, method: str) -> Split:
    n, layers = recipe.num_image_tokens, recipe.text.num_layers
    if method == "none":
        return Split(n, n)
    if method == "sts":
        pl, rho = recipe.pruning.prune_layer, recipe.pruning.post_ratio
        k = round(b * layers / (pl + rho * (layers - pl)))
        return Split(k, round(rho * k))
    if method == "fastv":
        return Split(n, round((b * layers - FASTV_LAYER * n) / (layers - FASTV_LAYER)))
    return Split(b, b)  # sts-s, divprune, cls


def _valid(split: Split, n: int) -> bool:
    return 1 <= split.k_post <= split.k_pre <= n


def valid_budget_range(recipe: Recipe, method: str = "sts") -> tuple[int, int]:
    """Smallest and largest integer budget that gives 1 <= K' <= K <= N."""
    n = recipe.num_image_tokens
    ok = [b for b in range(1, n + 1) if _valid(_raw_split(b, recipe, method), n)]
    if not ok:
        raise StsError(f"method '{method}' has no valid budget for recipe '{recipe.name}'")
    return ok[0], ok[-1]


def parse_budget(value: int | str) -> int | str:
    """'full' or a positive integer (from a CLI string or a Python int)."""
    if isinstance(value, str):
        if value.strip().lower() == "full":
            return "full"
        try:
            value = int(value)
        except ValueError:
            raise StsError(f"budget must be a positive integer or 'full', got '{value}'") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StsError(f"budget must be a positive integer or 'full', got {value!r}")
    return value


def split_budget(budget: int | str, recipe: Recipe, method: str = "sts") -> Split:
    """(K, K') for `method` at average budget `budget` (or 'full'); errors name the valid range."""
    check_method(method)
    budget = parse_budget(budget)
    n = recipe.num_image_tokens
    if budget == "full" or method == "none":
        return Split(n, n)
    split = _raw_split(budget, recipe, method)
    if not _valid(split, n):
        lo, hi = valid_budget_range(recipe, method)
        raise StsError(
            f"budget {budget} is out of range for method '{method}' on '{recipe.name}' "
            f"(gives K={split.k_pre}, K'={split.k_post} with N={n}); valid budgets are {lo}..{hi} or 'full'"
        )
    return split
