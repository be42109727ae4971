"""Stage 1 greedy selectors as torch custom ops whose ONNX form is a `Loop` with a constant trip count.

For image-dependent N (LLaVA-NeXT: up to 2880 candidates, K up to ~960) an unrolled greedy is ~12 ONNX
nodes per step and takes minutes to export. Here each greedy is one torch custom op

* ``torch.ops.sts.potential_energy_picks(features [N, C], first [] int64, k_max: int) -> [k_max] int64``
* ``torch.ops.sts.divprune_picks(projected [N, H], first [] int64, k_max: int) -> [k_max] int64``

with an eager implementation (the reference: the same tensor ops as
:func:`sts_export.pruning.selection.potential_energy_select` / :func:`~sts_export.pruning.selection.divprune_select`,
so the picked *sets* are bit-identical to those selectors), a fake implementation (shape [k_max], so
``torch.export`` traces them with a dynamic N) and an ONNX translation (an onnxscript function whose greedy is
``for i in range(k_max - 1)``: one ``Loop`` node whose trip count is a constant initializer, no ``cond`` input
(= always true; TensorRT then adds only a count trip limit), and whose
loop-carried tensors keep fixed shapes: picked mask [N], potential / min-distance [N], picks [k_max]).
Pass :func:`translation_table` as ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.

Picks are returned **in greedy order** (the first pick is ``first``). The greedy is prefix-consistent, so the first
K picks of a K_max-step run equal a K-step run; :func:`first_k_ascending` keeps the first K (K a runtime int64
scalar, K <= K_max) in ascending order without a Sort op.

k_max > N: the first N picks are a permutation of 0..N-1; every later step finds all tokens masked
(+inf for sts, -inf for divprune), and ArgMin/ArgMax of a constant row returns index 0, so steps N..k_max-1 repeat
index 0 (valid, never crashes, and never among the first K <= N picks). The same holds in the ONNX graph.

All math is float32 whatever the input dtype; ties go to the lower index (torch.argmin/argmax and ONNX
ArgMin/ArgMax with the default select_last_index=0 both return the first extremum).
"""
import math
from typing import Callable, Optional, Union

import torch

from sts_export.errors import StsError
from sts_export.pruning.selection import EPS, anchor_index, cosine_distance, divprune_seed, pairwise_sq_dist, topk_ascending

__all__ = [
    "potential_energy_picks",
    "divprune_picks",
    "first_k_ascending",
    "translation_table",
    "ONNX_OPSET",
]

ONNX_OPSET = 18  # opset of the onnxscript translations (torch.onnx's default; export with opset_version >= 18)


# ---------------------------------------------------------------------------------------------------------------
# Eager math (the reference; distances, anchor and DivPrune seed come from selection.py)
# ---------------------------------------------------------------------------------------------------------------

def _greedy(dist: torch.Tensor, first: torch.Tensor, k_max: int, minimise_sum: bool) -> torch.Tensor:
    """The one eager greedy loop. dist [N, N] float32 (a row of D per pick); -> picks [k_max] int64, greedy order.

    minimise_sum (sts): score r += 1/(D[i*, :] + eps), next = argmin of r over unpicked (picked -> +inf).
    else (divprune): score = min over picks of dist[i*, :], next = argmax over unpicked (picked -> -inf).
    The step expressions are those of potential_energy_select / divprune_select with B = 1.
    """
    n = dist.shape[-1]
    d = dist[None]  # [1, N, N]: exactly the selectors' tensors at B = 1
    ar = torch.arange(n, device=dist.device)
    pick = first.reshape(1).to(torch.int64)  # [1]
    picked = torch.zeros(1, n, dtype=torch.bool, device=dist.device)
    if minimise_sum:
        score = torch.zeros(1, n, dtype=torch.float32, device=dist.device)
        masked = torch.full_like(score, math.inf)
    else:
        score = torch.full((1, n), math.inf, device=dist.device)
        masked = torch.full_like(score, -math.inf)
    picks = torch.empty(k_max, dtype=torch.int64, device=dist.device)
    for step in range(k_max):
        if step > 0:
            s = torch.where(picked, masked, score)
            pick = s.argmin(dim=-1) if minimise_sum else s.argmax(dim=-1)  # [1]; ties -> lower index
        picks[step] = pick[0]
        picked = picked | (ar[None, :] == pick[:, None])
        row = torch.gather(d, 1, pick[:, None, None].expand(1, 1, n)).squeeze(1)  # [1, N] = D[i*, :]
        score = score + 1.0 / (row + EPS) if minimise_sum else torch.minimum(score, row)
    return picks


def _check_args(x: torch.Tensor, first: torch.Tensor, k_max: int, what: str) -> None:
    torch._check(x.dim() == 2, lambda: f"{what} must be [N, C], got shape {tuple(x.shape)}")
    torch._check(first.dim() == 0, lambda: f"first must be a 0-d int64 tensor, got shape {tuple(first.shape)}")
    torch._check(k_max >= 1, lambda: f"k_max must be >= 1, got {k_max}")


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("sts::potential_energy_picks", mutates_args=())
def potential_energy_picks(features: torch.Tensor, first: torch.Tensor, k_max: int) -> torch.Tensor:
    """STS Stage 1 greedy (DESIGN.md Stage 1 steps 1, 3, 4) from the anchor `first`: [N, C] -> [k_max] picks.

    Picks in greedy order; sorted, the first k equal ``potential_energy_select(features[None], k)[0]`` when
    `first` is that selector's anchor (``anchor_index(features[None], anchor)[0]``).
    """
    _check_args(features, first, k_max, "features")
    d = pairwise_sq_dist(features.float()[None])[0]  # [N, N]
    return _greedy(d, first, k_max, minimise_sum=True)


@potential_energy_picks.register_fake
def _(features: torch.Tensor, first: torch.Tensor, k_max: int) -> torch.Tensor:
    _check_args(features, first, k_max, "features")
    return features.new_empty((k_max,), dtype=torch.int64)


@torch.library.custom_op("sts::divprune_picks", mutates_args=())
def divprune_picks(projected: torch.Tensor, first: torch.Tensor, k_max: int) -> torch.Tensor:
    """DivPrune greedy max-min cosine distance from the seed `first`: [N, H] -> [k_max] picks, greedy order.

    ``first < 0`` (e.g. -1) takes DivPrune's own seed, the token with the largest nearest-neighbour distance
    (``selection.divprune_seed``), from the same distance matrix (the graph then computes the N x N product once).
    With that seed the first k picks, sorted, equal ``divprune_select(projected[None], k)[0]``.
    """
    _check_args(projected, first, k_max, "projected")
    dist = cosine_distance(projected[None])  # [1, N, N]
    if int(first) < 0:
        first = divprune_seed(projected[None], dist)[0]
    return _greedy(dist[0], first, k_max, minimise_sum=False)


@divprune_picks.register_fake
def _(projected: torch.Tensor, first: torch.Tensor, k_max: int) -> torch.Tensor:
    _check_args(projected, first, k_max, "projected")
    return projected.new_empty((k_max,), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# First k picks, ascending (plain torch ops: exports without a Sort op)
# ---------------------------------------------------------------------------------------------------------------

def first_k_ascending(picks: torch.Tensor, k: int | torch.SymInt | torch.Tensor,
                      n: Union[int, torch.SymInt, torch.Tensor]) -> torch.Tensor:
    """The first k of `picks` [k_max] (greedy order) in ascending order -> [k] int64; 1 <= k <= k_max.

    k is an int, a symbolic size (a graph input's length: stays a dimension in ONNX/TensorRT) or a
    0-d int64 tensor (then a data-dependent Slice end). Kept picks are keyed by their (distinct:
    k <= N) index, the others by `n` (> every index), and a constant-k TopK(k_max, largest=False)
    puts the k kept ones first, ascending; a Slice keeps them. No Sort op.
    """
    k_max = picks.shape[0]
    pos = torch.arange(k_max, device=picks.device)
    kk = k.item() if isinstance(k, torch.Tensor) else k
    fill = n.to(picks) if isinstance(n, torch.Tensor) else torch.full_like(picks, n)
    keyed = torch.where(pos < kk, picks, fill)
    ordered = torch.topk(keyed, k_max, largest=False, sorted=True).values  # [k_max]
    if isinstance(k, torch.Tensor):
        torch._check(kk >= 1)
        torch._check(kk <= k_max)
    return ordered[:kk]


def keep_first_k(method: str, x: torch.Tensor, k: int | torch.SymInt, k_max: int, anchor: str = "mean",
                 cls_attention: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1 for an image-dependent N: keep [1, k] ascending = the first k picks of a k_max-step greedy.

    x [1, N, C]: pre-projector features (sts, sts-s) or projected embeddings (divprune); `cls`
    takes the top-k of cls_attention [1, N] with a constant TopK(k_max). The greedy order is
    prefix-consistent, so this equals a run of exactly k steps.
    """
    if method == "cls":
        if cls_attention is None:
            raise StsError("method 'cls' needs cls_attention [1, N]")
        return topk_ascending(cls_attention, k, k_max)
    if method == "divprune":
        picks = torch.ops.sts.divprune_picks(x[0], torch.tensor(-1, dtype=torch.int64, device=x.device), k_max)
    else:
        picks = torch.ops.sts.potential_energy_picks(x[0], anchor_index(x, anchor, cls_attention)[0], k_max)
    return first_k_ascending(picks, k, x.shape[1])[None]  # [1, k]


# ---------------------------------------------------------------------------------------------------------------
# ONNX translations (onnxscript): the greedy as a Loop with a constant trip count
# ---------------------------------------------------------------------------------------------------------------

def _build_translations() -> dict[str, Callable]:
    import onnxscript  # noqa: PLC0415 - only needed when exporting
    from onnxscript import FLOAT, INT64  # noqa: PLC0415
    from onnxscript import opset18 as op  # noqa: PLC0415

    @onnxscript.script(opset=op, default_opset=op)
    def sts_potential_energy_picks(features, first: INT64, k_max: int) -> INT64:
        v = op.Cast(features, to=FLOAT.dtype)  # [N, C] float32
        sq = op.ReduceSum(op.Mul(v, v), op.Constant(value_ints=[1]), keepdims=1)  # [N, 1]
        gram = op.MatMul(v, op.Transpose(v, perm=[1, 0]))  # [N, N]
        d = op.Max(op.Sub(op.Add(sq, op.Transpose(sq, perm=[1, 0])), op.Mul(op.Constant(value_float=2.0), gram)),
                   op.Constant(value_float=0.0))  # D = max(|vi|^2 + |vj|^2 - 2 vi.vj, 0)
        eps = op.Constant(value_float=EPS)
        one = op.Constant(value_float=1.0)
        inf = op.Constant(value_float=math.inf)
        n = op.Squeeze(op.Shape(v, start=0, end=1), op.Constant(value_ints=[0]))  # [] int64
        ar = op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1))  # [N]
        kmax = op.Constant(value_int=k_max)
        slots = op.Range(op.Constant(value_int=0), kmax, op.Constant(value_int=1))  # [k_max]
        p0 = op.Cast(first, to=INT64.dtype)  # []
        picked = op.Equal(ar, p0)  # [N] bool
        r = op.Div(one, op.Add(op.Gather(d, p0, axis=0), eps))  # [N]
        picks = op.Expand(p0, op.Reshape(kmax, op.Constant(value_ints=[1])))  # [k_max], slot 0 = first
        for i in range(k_max - 1):
            p = op.ArgMin(op.Where(picked, inf, r), axis=0, keepdims=0)  # [] ties -> lower index
            picked = op.Or(picked, op.Equal(ar, p))
            r = op.Add(r, op.Div(one, op.Add(op.Gather(d, p, axis=0), eps)))
            picks = op.Where(op.Equal(slots, op.Add(i, op.Constant(value_int=1))), p, picks)
        return picks

    @onnxscript.script(opset=op, default_opset=op)
    def sts_divprune_picks(projected, first: INT64, k_max: int) -> INT64:
        x = op.Cast(projected, to=FLOAT.dtype)  # [N, H] float32
        norm = op.Sqrt(op.ReduceSum(op.Mul(x, x), op.Constant(value_ints=[1]), keepdims=1))  # [N, 1]
        x = op.Div(x, op.Max(norm, op.Constant(value_float=1e-12)))
        one = op.Constant(value_float=1.0)
        dist = op.Sub(one, op.MatMul(x, op.Transpose(x, perm=[1, 0])))  # [N, N] cosine distance
        ninf = op.Constant(value_float=-math.inf)
        n = op.Squeeze(op.Shape(x, start=0, end=1), op.Constant(value_ints=[0]))
        ar = op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1))  # [N]
        kmax = op.Constant(value_int=k_max)
        slots = op.Range(op.Constant(value_int=0), kmax, op.Constant(value_int=1))  # [k_max]
        inf = op.Constant(value_float=math.inf)
        eye = op.Equal(op.Unsqueeze(ar, op.Constant(value_ints=[1])), op.Unsqueeze(ar, op.Constant(value_ints=[0])))
        nn_dist = op.ReduceMin(op.Where(eye, inf, dist), op.Constant(value_ints=[1]), keepdims=0)  # [N]
        seed = op.ArgMax(nn_dist, axis=0, keepdims=0)  # DivPrune's seed: the most isolated token
        first64 = op.Cast(first, to=INT64.dtype)
        p0 = op.Where(op.Less(first64, op.Constant(value_int=0)), seed, first64)  # first < 0: own seed
        picked = op.Equal(ar, p0)  # [N]
        min_d = op.Gather(dist, p0, axis=0)  # [N] = min(inf, dist[seed, :])
        picks = op.Expand(p0, op.Reshape(kmax, op.Constant(value_ints=[1])))
        for i in range(k_max - 1):
            p = op.ArgMax(op.Where(picked, ninf, min_d), axis=0, keepdims=0)  # ties -> lower index
            picked = op.Or(picked, op.Equal(ar, p))
            min_d = op.Min(min_d, op.Gather(dist, p, axis=0))
            picks = op.Where(op.Equal(slots, op.Add(i, op.Constant(value_int=1))), p, picks)
        return picks

    return {"potential_energy_picks": sts_potential_energy_picks, "divprune_picks": sts_divprune_picks}


_TRANSLATIONS: Optional[dict] = None


def translation_table() -> dict:
    """``{torch.ops.sts.<op>.default: onnxscript function}`` for ``torch.onnx.export(..., custom_translation_table=)``."""
    global _TRANSLATIONS
    if _TRANSLATIONS is None:
        _TRANSLATIONS = _build_translations()
    return {
        torch.ops.sts.potential_energy_picks.default: _TRANSLATIONS["potential_energy_picks"],
        torch.ops.sts.divprune_picks.default: _TRANSLATIONS["divprune_picks"],
    }
