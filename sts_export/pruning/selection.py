"""Token selection: Stage 1 selectors (before the LLM) and Stage 2 relevance (inside it).

Everything here is export-friendly: fixed iteration counts, masking instead of data-dependent
shapes, no Python branching on tensor values. Stage 1 math runs in float32 whatever the input
dtype. Ties always go to the lower index (torch.argmin/argmax return the first extremum, and
the ONNX ArgMin/ArgMax/TopK defaults do the same).
"""
from __future__ import annotations

import math

import torch

from sts_export.errors import StsError
from sts_export.recipe import ANCHORS

STAGE1_METHODS = ("sts", "sts-s", "divprune", "cls", "none")
EPS = 1e-6


def sorted_indices(mask: torch.Tensor, k: int | torch.SymInt, k_max: int | None = None) -> torch.Tensor:
    """Ascending indices of the k True entries of mask [B, N] -> [B, k] int64 (mask holds exactly k).

    With `k_max` (a constant >= k, for a k known only at run time) the TopK is over k_max and its
    first k are kept, so the graph's TopK stays constant (TensorRT needs that).
    """
    n = mask.shape[-1]
    idx = torch.arange(n, device=mask.device).expand_as(mask)
    # kept tokens are keyed by their (distinct) index, dropped ones by N: the k smallest keys are
    # the kept indices, ascending. TopK with a constant k (no sort op: exports to ONNX/TensorRT)
    keyed = torch.where(mask, idx, torch.full_like(idx, n))
    if k_max is None:
        return torch.topk(keyed, k, dim=-1, largest=False, sorted=True).values
    keyed = torch.cat([keyed, torch.full_like(keyed[:, :1], n).expand(-1, k_max)], dim=-1)  # at least k_max entries
    return torch.topk(keyed, k_max, dim=-1, largest=False, sorted=True).values[:, :k]


def take_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, C] at token indices idx [B, K] -> [B, K, C]."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def pairwise_sq_dist(v: torch.Tensor) -> torch.Tensor:
    """D[i,j] = max(|v_i|^2 + |v_j|^2 - 2 v_i.v_j, 0) for v [B, N, C] -> [B, N, N] (one matmul)."""
    sq = (v * v).sum(-1)  # [B, N]
    return (sq[:, :, None] + sq[:, None, :] - 2.0 * (v @ v.transpose(1, 2))).clamp_min(0.0)


def anchor_index(v: torch.Tensor, anchor: str, cls_attention: torch.Tensor | None = None) -> torch.Tensor:
    """First pick of Stage 1: [B, N, C] -> [B] int64."""
    if anchor == "mean":
        return ((v - v.mean(dim=1, keepdim=True)) ** 2).sum(-1).argmin(dim=-1)  # [B]
    if anchor == "first":
        return torch.zeros(v.shape[0], dtype=torch.int64, device=v.device)
    if anchor == "saliency":
        if cls_attention is None:
            raise StsError("anchor 'saliency' needs the CLS attention of the feature layer")
        return cls_attention.float().argmax(dim=-1)
    raise StsError(f"unknown anchor '{anchor}'; choose one of {', '.join(ANCHORS)}")


def potential_energy_select(
    features: torch.Tensor, k: int, anchor: str = "mean", cls_attention: torch.Tensor | None = None
) -> torch.Tensor:
    """STS Stage 1 (paper Algorithm 1): greedy potential-energy minimisation.

    features [B, N, C] -> keep_pre [B, k] int64, ascending. Exactly k picks in a fixed loop.
    """
    v = features.float()
    b, n, _ = v.shape
    d = pairwise_sq_dist(v)  # [B, N, N]
    ar = torch.arange(n, device=v.device)  # [N]
    pick = anchor_index(v, anchor, cls_attention)  # [B]
    picked = torch.zeros(b, n, dtype=torch.bool, device=v.device)  # [B, N]
    r = torch.zeros(b, n, dtype=torch.float32, device=v.device)  # [B, N] repulsive potential
    inf = torch.full_like(r, math.inf)
    for step in range(k):
        if step > 0:
            pick = torch.where(picked, inf, r).argmin(dim=-1)  # [B]; ties -> lower index
        picked = picked | (ar[None, :] == pick[:, None])
        row = take_tokens(d, pick[:, None]).squeeze(1)  # [B, N] = D[i*, :]
        r = r + 1.0 / (row + EPS)
    return sorted_indices(picked, k)


def cosine_distance(projected: torch.Tensor) -> torch.Tensor:
    """1 - cos(x_i, x_j) of projected embeddings [B, N, H] -> [B, N, N] (float32)."""
    x = projected.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 - x @ x.transpose(1, 2)


def divprune_seed(projected: torch.Tensor, dist: torch.Tensor | None = None) -> torch.Tensor:
    """DivPrune's first pick: the token with the largest nearest-neighbour cosine distance [B, N, H] -> [B]."""
    dist = cosine_distance(projected) if dist is None else dist
    ar = torch.arange(dist.shape[-1], device=dist.device)
    eye = ar[:, None] == ar[None, :]
    return torch.where(eye, math.inf, dist).amin(dim=-1).argmax(dim=-1)


def divprune_select(projected: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune: greedy max-min cosine distance on projected embeddings [B, N, H] -> [B, k]."""
    dist = cosine_distance(projected)  # [B, N, N]
    b, n, _ = dist.shape
    ar = torch.arange(n, device=dist.device)
    inf = torch.tensor(math.inf, device=dist.device)
    pick = divprune_seed(projected, dist)  # [B] seed: the most isolated token
    picked = torch.zeros(b, n, dtype=torch.bool, device=dist.device)
    min_d = torch.full((b, n), math.inf, device=dist.device)  # distance to the kept set
    for step in range(k):
        if step > 0:
            pick = torch.where(picked, -inf, min_d).argmax(dim=-1)
        picked = picked | (ar[None, :] == pick[:, None])
        row = take_tokens(dist, pick[:, None]).squeeze(1)  # [B, N]
        min_d = torch.minimum(min_d, row)
    return sorted_indices(picked, k)


def topk_ascending(scores: torch.Tensor, k: int | torch.SymInt, k_max: int | None = None) -> torch.Tensor:
    """Indices of the k largest scores [B, N], ties -> lower index, returned ascending [B, k].

    Exact tie-breaking without a stable sort: everything above the k-th largest value is kept,
    and of the entries equal to it, the lowest-indexed ones fill the remaining slots. With
    `k_max` (constant >= k), k may be known only at run time: every TopK is over k_max.
    """
    s = scores.float()
    if k_max is None:
        kth = torch.topk(s, k, dim=-1).values[:, -1:]  # [B, 1] the k-th largest value
    else:  # pad so TopK(k_max) exists for any N; padding is -inf and never reaches the k-th place
        padded = torch.cat([s, torch.full_like(s[:, :1], -math.inf).expand(-1, k_max)], dim=-1)
        kth = torch.topk(padded, k_max, dim=-1).values[:, k - 1:k]
    above, tied = s > kth, s == kth  # [B, N]
    need = k - above.float().sum(-1, keepdim=True)  # [B, 1] slots left for tied entries
    take = tied & (torch.cumsum(tied.float(), dim=-1) <= need)
    return sorted_indices(above | take, k, k_max)


def select_tokens(
    method: str,
    features: torch.Tensor,
    k: int,
    *,
    anchor: str = "mean",
    cls_attention: torch.Tensor | None = None,
    projected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 1: keep k of the N vision tokens. features [B, N, C] -> keep_pre [B, k] int64 ascending.

    `sts`/`sts-s`: potential-energy selection on `features` (pre-projector).
    `divprune`: max-min cosine diversity on `projected` (defaults to `features`).
    `cls`: top-k of `cls_attention` [B, N] (CLS head-mean attention at the feature layer).
    `none`/`fastv`: all N tokens.
    """
    if features.dim() != 3:
        raise StsError(f"features must be [B, N, C], got shape {tuple(features.shape)}")
    b, n, _ = features.shape
    if not 1 <= k <= n:
        raise StsError(f"k must be in 1..{n}, got {k}")
    if method in ("sts", "sts-s"):
        return potential_energy_select(features, k, anchor, cls_attention)
    if method == "divprune":
        return divprune_select(features if projected is None else projected, k)
    if method == "cls":
        if cls_attention is None:
            raise StsError("method 'cls' needs cls_attention [B, N]")
        return topk_ascending(cls_attention, k)
    if method in ("none", "fastv"):
        return torch.arange(n, device=features.device).expand(b, n)[:, :k].contiguous()
    raise StsError(f"unknown method '{method}'; choose one of {', '.join(STAGE1_METHODS + ('fastv',))}")


def last_token_relevance(q_last: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Stage 2 relevance: mean over heads of softmax(q_last . k^T / sqrt(d)).

    q_last [B, H, 1, d] (RoPE applied), k [B, H, S, d] (KV heads already repeated) -> [B, S].
    The last token attends to every position, so no causal mask is needed.
    """
    scale = 1.0 / math.sqrt(q_last.shape[-1])
    att = torch.softmax((q_last.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)  # [B, H, 1, S]
    return att.mean(dim=1).squeeze(1)  # [B, S]
