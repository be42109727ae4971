"""Plain numpy references of the selectors, written step by step from the paper (Algorithm 1) and DESIGN.md, for
validating exported graphs on their own intermediate tensors, and the objectives that score a kept set.

The greedy steps run in float32 with the graph's operation order (r_i += 1 / (D[i, i*] + eps); ties to the lower
index), so on the *same* distance matrix they pick bit-identically to the ONNX Loop: any difference is a bug, never
rounding. Scores of kept sets (`set_objective`) are computed in float64.
"""
from __future__ import annotations

import numpy as np

EPS = np.float32(1e-6)  # DESIGN.md Stage 1 step 3, as the graphs hold it (a float32 constant)


def greedy_picks(dist: np.ndarray, first: int, k: int, minimise_sum: bool = True) -> np.ndarray:
    """Greedy order of k picks from `first` on one image's distance matrix dist [N, N] -> [k] int64.

    minimise_sum (sts, Algorithm 1 steps 3-4): r_i += 1 / (D[i, i*] + eps) after each pick i*; next = argmin of r
    over the unpicked. Else (DivPrune): next = argmax over the unpicked of the distance to the nearest pick.
    Steps past N (k > N) repeat index 0, as the graphs' masked ArgMin/ArgMax of a constant row do.
    """
    d = np.asarray(dist, dtype=np.float32)
    n = d.shape[0]
    picked = np.zeros(n, dtype=bool)
    score = np.zeros(n, dtype=np.float32) if minimise_sum else np.full(n, np.inf, dtype=np.float32)
    picks = np.empty(k, dtype=np.int64)
    pick = int(first)
    for step in range(k):
        if step > 0:
            masked = np.where(picked, np.float32(np.inf if minimise_sum else -np.inf), score)
            pick = int(np.argmin(masked) if minimise_sum else np.argmax(masked))  # first extremum: lower index
        picks[step] = pick
        picked[pick] = True
        row = d[pick]
        score = score + np.float32(1.0) / (row + EPS) if minimise_sum else np.minimum(score, row)
    return picks


def topk_ascending(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest of scores [N] (ties -> lower index), ascending -> [k] int64."""
    s = np.asarray(scores, dtype=np.float64)
    order = sorted(range(s.shape[0]), key=lambda i: (-s[i], i))
    return np.asarray(sorted(order[:k]), dtype=np.int64)


def potential_energy(x: np.ndarray, keep: np.ndarray) -> float:
    """STS's objective: the set's potential energy, paper Eq. 4 summed over the kept set, i.e. the sum over kept
    pairs i < j of 1 / (|v_i - v_j|^2 + eps), for features x [N, C] (float64). The greedy approximates its minimum
    (paper Eq. 5): lower is a better-spread set."""
    v = np.asarray(x, dtype=np.float64)[np.asarray(keep).reshape(-1)]
    sq = (v * v).sum(-1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * v @ v.T, 0.0)
    iu = np.triu_indices(len(v), 1)
    return float((1.0 / (d[iu] + float(EPS))).sum())


def min_cosine_distance(x: np.ndarray, keep: np.ndarray) -> float:
    """DivPrune's objective: the smallest pairwise cosine distance within the kept set (higher is better spread)."""
    v = np.asarray(x, dtype=np.float64)[np.asarray(keep).reshape(-1)]
    v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    d = 1.0 - v @ v.T
    iu = np.triu_indices(len(v), 1)
    return float(d[iu].min()) if iu[0].size else 0.0


def set_objective(method: str, x: np.ndarray, keep: np.ndarray, cls_attention: np.ndarray | None = None
                  ) -> tuple[str, float, bool] | None:
    """(name, value, higher_is_better) of the objective `method` optimises, for one image's kept set; None where
    the method has none (no Stage 1 selection)."""
    if method in ("sts", "sts-s"):
        return "potential_energy", potential_energy(x, keep), False
    if method == "divprune":
        return "min_cosine_distance", min_cosine_distance(x, keep), True
    if method == "cls" and cls_attention is not None:
        return "cls_attention_mass", float(np.asarray(cls_attention, dtype=np.float64)[np.asarray(keep)].sum()), True
    return None
