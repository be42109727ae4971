"""KNN consistency score (paper §3.1, Appendix A.1, eqs. 8-10): do feature-similar vision tokens get
similar attention scores?

    sigma_local  = 1/N * sum_i std({s_j : t_j in N_k(t_i)})      (8)
    sigma_global = std({s_i})                                     (9)
    C            = 1 - sigma_local / sigma_global                 (10)

Conventions (the paper leaves them open; these are ours):

* neighbours: cosine similarity of the l2-normalised features; ``N_k(t_i)`` is the k nearest
  OTHER tokens, the token itself excluded (so each neighbourhood has exactly k members and a
  token never vouches for its own score). Ties in similarity go to the lower token index.
* std: population standard deviation (ddof=0) for both sigma_local and sigma_global.
* C is NaN when sigma_global is 0 (all scores equal: the ratio is undefined).

Everything here is pure numpy: arrays in, numbers out. The model code feeds it per-layer patch
hidden states (CLS dropped) and the CLS token's head-mean attention to the patches.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sts_export.errors import StsError

NEIGHBOURS_DOC = "cosine similarity, k nearest other tokens (self excluded), ties to the lower index"
STD_DOC = "population standard deviation (ddof=0)"


def knn_indices(features: np.ndarray, k: int) -> np.ndarray:
    """Indices [N, k] of each token's k nearest other tokens by cosine similarity (self excluded,
    most similar first, ties to the lower index)."""
    f = np.asarray(features, dtype=np.float64)  # [N, C]
    if f.ndim != 2:
        raise ValueError(f"features must be [N, C], got shape {f.shape}")
    n = f.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}] (self is excluded), got {k}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # [N, C] unit rows
    sim = f @ f.T  # [N, N]
    np.fill_diagonal(sim, -np.inf)  # never one's own neighbour
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]  # [N, k]


def knn_consistency(features: np.ndarray, scores: np.ndarray, k: int) -> float:
    """KNN consistency score C = 1 - sigma_local / sigma_global (eqs. 8-10) of ``scores`` [N] over
    the cosine k-NN graph of ``features`` [N, C]; self excluded from neighbourhoods, ddof=0.
    Returns NaN when all scores are equal."""
    s = np.asarray(scores, dtype=np.float64)  # [N]
    n_feat = np.shape(features)[0] if np.ndim(features) == 2 else -1
    if s.ndim != 1 or s.shape[0] != n_feat:
        raise ValueError(f"scores must be [N] matching features [N, C]; got {s.shape} and {np.shape(features)}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    nbrs = knn_indices(features, k)  # [N, k]
    sigma_local = float(s[nbrs].std(axis=1).mean())  # eq. 8
    sigma_global = float(s.std())  # eq. 9
    if sigma_global == 0.0:
        return float("nan")
    return 1.0 - sigma_local / sigma_global  # eq. 10


def cls_attention_scores(attn: np.ndarray) -> np.ndarray:
    """FasterVLM-style score per patch [N] from one layer's attention probabilities
    [heads, 1+N, 1+N] (or [1, heads, 1+N, 1+N]) with CLS at position 0: the head-mean of the CLS
    row, read at the patch columns."""
    a = np.asarray(attn, dtype=np.float64)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"attention must be [heads, 1+N, 1+N], got shape {np.shape(attn)}")
    return a[:, 0, 1:].mean(axis=0)  # [N]


def consistency_per_layer(
    hidden_states: Sequence[np.ndarray],
    cls_attention: Sequence[np.ndarray],
    ks: Sequence[int] = (5, 10, 20),
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """C per layer and per k. ``hidden_states[l]`` [N, C] are layer l's output patch features (CLS
    dropped), ``cls_attention[l]`` [N] the CLS head-mean attention to the patches at that layer.
    ``layers`` labels the entries (default 0..L-1). Returns a JSON-ready dict:
    ``{"layers": [...], "ks": [...], "num_tokens": N, "consistency": {"5": [C per layer], ...}, ...}``."""
    if len(hidden_states) != len(cls_attention):
        raise ValueError(f"{len(hidden_states)} hidden states but {len(cls_attention)} attention vectors")
    if not hidden_states:
        raise ValueError("need at least one layer")
    labels = list(range(len(hidden_states))) if layers is None else [int(x) for x in layers]
    if len(labels) != len(hidden_states):
        raise ValueError(f"{len(labels)} layer labels for {len(hidden_states)} layers")
    ks = [int(k) for k in ks]
    curves: dict[str, list[float]] = {str(k): [] for k in ks}
    n = None
    for feats, scores in zip(hidden_states, cls_attention):
        feats = np.asarray(feats)  # [N, C]
        if n is None:
            n = feats.shape[0]
        elif feats.shape[0] != n:
            raise ValueError(f"token count changes across layers ({n} vs {feats.shape[0]})")
        for k in ks:
            curves[str(k)].append(knn_consistency(feats, np.asarray(scores), k))
    return {
        "metric": "knn_consistency",
        "definition": "C = 1 - mean_i std(s[kNN(i)]) / std(s)",
        "neighbours": NEIGHBOURS_DOC,
        "std": STD_DOC,
        "layers": labels,
        "ks": ks,
        "num_tokens": int(n or 0),
        "consistency": curves,
    }


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None so the JSON stays standard."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_report(
    result: dict[str, Any],
    json_path: str | os.PathLike | None,
    png_path: str | os.PathLike | None = None,
    *,
    title: str = "KNN consistency across vision encoder layers",
) -> None:
    """Write :func:`consistency_per_layer`'s result as JSON and/or a plot of C vs layer, one line per
    k (paper Figure 2). The plot needs matplotlib (``pip install sts-export[plot]``)."""
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(_json_safe(result), indent=2) + "\n")
    if png_path is None:
        return
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise StsError("the consistency plot needs matplotlib: pip install matplotlib") from None
    layers = result["layers"]
    fig = Figure(figsize=(6.0, 3.6), dpi=150)
    ax = fig.subplots()
    markers = "osD^v<>"
    for i, (k, values) in enumerate(result["consistency"].items()):
        y = [np.nan if v is None else v for v in values]
        ax.plot(layers, y, marker=markers[i % len(markers)], markersize=3.5, linewidth=1.5, label=f"k={k}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("vision encoder layer")
    ax.set_ylabel("KNN consistency score C")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)


__all__ = [
    "knn_indices",
    "knn_consistency",
    "cls_attention_scores",
    "consistency_per_layer",
    "write_report",
]
