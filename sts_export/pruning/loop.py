"""Stage 1 greedy selectors as torch custom ops whose ONNX form is a `Loop` with a constant trip count.

Every vision graph with a greedy Stage 1 runs it this way. An unrolled greedy is ~12 ONNX nodes per step: at
LLaVA-NeXT's K up to ~960 it takes minutes to export, and even at LLaVA-1.5-7B's fixed K = 96 it took 21 s where
this one takes 1 s, for the same ONNX Runtime time (docs/design.md). Each greedy is one torch custom op

* ``torch.ops.sts.potential_energy_picks(features [B, N, C], first [B] int64, k_max: int) -> [B, k_max] int64``
* ``torch.ops.sts.divprune_picks(projected [B, N, H], first [B] int64, k_max: int) -> [B, k_max] int64``

with an eager implementation (the reference: the same tensor ops as
:func:`sts_export.pruning.selection.potential_energy_select` / :func:`~sts_export.pruning.selection.divprune_select`,
so the picked *sets* are bit-identical to those selectors), a fake implementation (shape [B, k_max], so
``torch.export`` traces them with a dynamic B and N) and an ONNX translation (an onnxscript function whose greedy is
one explicit ``Loop(steps, '', picked, score, picks)`` with an ``@onnxscript.graph`` body: the trip count
``steps = k_max - 1`` is a constant (folded to an initializer), and the loop-carried tensors keep fixed shapes:
picked mask [B, N], potential / min-distance [B, N], picks [B, k_max]).

The Loop has **no** ``cond`` input and its body **never reads** ``cond_in``: TensorRT's ONNX parser (onnx-tensorrt,
``onnxOpImporters.cpp``, ``DEFINE_BUILTIN_OP_IMPORTER(Loop)``, 10.1 GA to 10.15 GA) registers the body's ``cond_in``
only when the node has a ``cond``, and fails any node that reads an unregistered name ("Node input was not
registered."): ``for i in range(...)`` in onnxscript writes ``cond_out = Identity(cond_in)`` with no ``cond``, which
is why the body is written out here. The body's ``cond_out = Less(i, steps)`` is true on every step (ONNX ignores it
without a ``cond``; ONNX Runtime reads it, so it must stay true). A count-only loop is the form the same importer
recommends ("export loops with only a trip limit"): TensorRT adds one kCOUNT trip limit and no kWHILE recurrence.
The iteration number ``i`` is registered because the trip count is given and below INT_MAX. The static check
(``export/tensorrt/check.py``) walks the graph the way the importer registers names, so a graph that reads
``cond_in`` again fails ``--check-only``.

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
    """The one eager greedy loop. dist [B, N, N] float32 (a row of D per pick), first [B] -> picks [B, k_max] int64,
    greedy order.

    minimise_sum (sts): score r += 1/(D[i*, :] + eps), next = argmin of r over unpicked (picked -> +inf).
    else (divprune): score = min over picks of dist[i*, :], next = argmax over unpicked (picked -> -inf).
    The step expressions are those of potential_energy_select / divprune_select.
    """
    b, n = dist.shape[0], dist.shape[-1]
    ar = torch.arange(n, device=dist.device)
    pick = first.reshape(b).to(torch.int64)  # [B]
    picked = torch.zeros(b, n, dtype=torch.bool, device=dist.device)
    if minimise_sum:
        score = torch.zeros(b, n, dtype=torch.float32, device=dist.device)
        masked = torch.full_like(score, math.inf)
    else:
        score = torch.full((b, n), math.inf, device=dist.device)
        masked = torch.full_like(score, -math.inf)
    picks = torch.empty(b, k_max, dtype=torch.int64, device=dist.device)
    for step in range(k_max):
        if step > 0:
            s = torch.where(picked, masked, score)
            pick = s.argmin(dim=-1) if minimise_sum else s.argmax(dim=-1)  # [B]; ties -> lower index
        picks[:, step] = pick
        picked = picked | (ar[None, :] == pick[:, None])
        row = torch.gather(dist, 1, pick[:, None, None].expand(b, 1, n)).squeeze(1)  # [B, N] = D[i*, :]
        score = score + 1.0 / (row + EPS) if minimise_sum else torch.minimum(score, row)
    return picks


def _check_args(x: torch.Tensor, first: torch.Tensor, k_max: int, what: str) -> None:
    torch._check(x.dim() == 3, lambda: f"{what} must be [B, N, C], got shape {tuple(x.shape)}")
    torch._check(first.dim() == 1, lambda: f"first must be a [B] int64 tensor, got shape {tuple(first.shape)}")
    torch._check(k_max >= 1, lambda: f"k_max must be >= 1, got {k_max}")


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("sts::potential_energy_picks", mutates_args=())
def potential_energy_picks(features: torch.Tensor, first: torch.Tensor, k_max: int) -> torch.Tensor:
    """STS Stage 1 greedy (DESIGN.md Stage 1 steps 1, 3, 4) from the anchors `first` [B]: [B, N, C] -> [B, k_max]
    picks.

    Picks in greedy order; sorted, the first k of each row equal ``potential_energy_select(features, k)`` when
    `first` is that selector's anchor (``anchor_index(features, anchor)``).
    """
    _check_args(features, first, k_max, "features")
    d = pairwise_sq_dist(features.float())  # [B, N, N]
    return _greedy(d, first, k_max, minimise_sum=True)


@potential_energy_picks.register_fake
def _(features: torch.Tensor, first: torch.Tensor, k_max: int) -> torch.Tensor:
    _check_args(features, first, k_max, "features")
    return features.new_empty((features.shape[0], k_max), dtype=torch.int64)


@torch.library.custom_op("sts::divprune_picks", mutates_args=())
def divprune_picks(projected: torch.Tensor, first: torch.Tensor, k_max: int) -> torch.Tensor:
    """DivPrune greedy max-min cosine distance from the seeds `first` [B]: [B, N, H] -> [B, k_max] picks, greedy
    order.

    ``first < 0`` (e.g. -1) takes DivPrune's own seed, the token with the largest nearest-neighbour distance
    (``selection.divprune_seed``), from the same distance matrix (the graph then computes the N x N product once).
    With that seed the first k picks of each row, sorted, equal ``divprune_select(projected, k)``.
    """
    _check_args(projected, first, k_max, "projected")
    dist = cosine_distance(projected)  # [B, N, N]
    first = torch.where(first < 0, divprune_seed(projected, dist), first)  # [B]
    return _greedy(dist, first, k_max, minimise_sum=False)


@divprune_picks.register_fake
def _(projected: torch.Tensor, first: torch.Tensor, k_max: int) -> torch.Tensor:
    _check_args(projected, first, k_max, "projected")
    return projected.new_empty((projected.shape[0], k_max), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# First k picks, ascending (plain torch ops: exports without a Sort op)
# ---------------------------------------------------------------------------------------------------------------

def first_k_ascending(picks: torch.Tensor, k: int | torch.SymInt | torch.Tensor,
                      n: Union[int, torch.SymInt, torch.Tensor]) -> torch.Tensor:
    """The first k of each row of `picks` [B, k_max] (greedy order) in ascending order -> [B, k] int64; 1 <= k <= k_max.

    k is an int, a symbolic size (a graph input's length: stays a dimension in ONNX/TensorRT) or a
    0-d int64 tensor (then a data-dependent Slice end). Kept picks are keyed by their (distinct:
    k <= N) index, the others by `n` (> every index), and a constant-k TopK(k_max, largest=False)
    puts the k kept ones first, ascending; a Slice keeps them. No Sort op.
    """
    k_max = picks.shape[-1]
    pos = torch.arange(k_max, device=picks.device)  # [k_max]
    kk = k.item() if isinstance(k, torch.Tensor) else k
    fill = n.to(picks).expand_as(picks) if isinstance(n, torch.Tensor) else torch.full_like(picks, n)
    keyed = torch.where(pos < kk, picks, fill)  # [B, k_max]
    ordered = torch.topk(keyed, k_max, dim=-1, largest=False, sorted=True).values  # [B, k_max]
    if isinstance(k, torch.Tensor):
        torch._check(kk >= 1)
        torch._check(kk <= k_max)
    if isinstance(kk, int) and kk == k_max:
        return ordered
    return ordered[:, :kk]


def keep_first_k(method: str, x: torch.Tensor, k: int | torch.SymInt, k_max: int, anchor: str = "mean",
                 cls_attention: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1 as the vision graphs run it: keep [B, k] ascending = the first k picks of a k_max-step greedy.

    x [B, N, C]: pre-projector features (sts, sts-s) or projected embeddings (divprune); `cls`
    takes the top-k of cls_attention [B, N] with a constant TopK(k_max). The greedy order is
    prefix-consistent, so this equals a run of exactly k steps (k == k_max for a fixed N).
    """
    if method == "cls":
        if cls_attention is None:
            raise StsError("method 'cls' needs cls_attention [B, N]")
        return topk_ascending(cls_attention, k) if isinstance(k, int) and k == k_max else \
            topk_ascending(cls_attention, k, k_max)
    if method == "divprune":
        first = torch.full(x.shape[:1], -1, dtype=torch.int64, device=x.device)  # [B]: the op's own seed
        picks = torch.ops.sts.divprune_picks(x, first, k_max)
    else:
        first = anchor_index(x.float(), anchor, cls_attention)  # [B], float32 as the greedy (DESIGN.md Stage 1)
        picks = torch.ops.sts.potential_energy_picks(x, first, k_max)
    return first_k_ascending(picks, k, x.shape[1])  # [B, k]


# ---------------------------------------------------------------------------------------------------------------
# ONNX translations (onnxscript): the greedy as a Loop with a constant trip count
# ---------------------------------------------------------------------------------------------------------------

def _build_translations() -> dict[str, Callable]:
    import onnxscript  # noqa: PLC0415 - only needed when exporting
    from onnxscript import BOOL, FLOAT, INT64  # noqa: PLC0415
    from onnxscript import opset18 as op  # noqa: PLC0415

    @onnxscript.script(opset=op, default_opset=op)
    def sts_potential_energy_picks(features, first: INT64, k_max: int) -> INT64:
        v = op.Cast(features, to=FLOAT.dtype)  # [B, N, C] float32
        sq = op.ReduceSum(op.Mul(v, v), op.Constant(value_ints=[2]), keepdims=1)  # [B, N, 1]
        gram = op.MatMul(v, op.Transpose(v, perm=[0, 2, 1]))  # [B, N, N]
        d = op.Max(op.Sub(op.Add(sq, op.Transpose(sq, perm=[0, 2, 1])), op.Mul(op.Constant(value_float=2.0), gram)),
                   op.Constant(value_float=0.0))  # D = max(|vi|^2 + |vj|^2 - 2 vi.vj, 0)
        eps = op.Constant(value_float=EPS)
        one = op.Constant(value_float=1.0)
        inf = op.Constant(value_float=math.inf)
        n = op.Squeeze(op.Shape(v, start=1, end=2), op.Constant(value_ints=[0]))  # [] int64
        ar = op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1))  # [N]
        kmax = op.Constant(value_int=k_max)
        slots = op.Range(op.Constant(value_int=0), kmax, op.Constant(value_int=1))  # [k_max]
        p0 = op.Unsqueeze(op.Cast(first, to=INT64.dtype), op.Constant(value_ints=[1]))  # [B, 1]
        picked = op.Equal(ar, p0)  # [B, N] bool
        # the picked rows D[b, p_b, :]: GatherND with one batch dim, whose output shape [B, N] ONNX infers from its
        # inputs' shapes (so the Loop's carried shapes are provably constant for the TensorRT check)
        r = op.Div(one, op.Add(op.GatherND(d, p0, batch_dims=1), eps))  # [B, N]
        picks = op.Add(p0, op.Mul(slots, op.Constant(value_int=0)))  # [B, k_max]: first in every slot
        steps = op.Sub(kmax, op.Constant(value_int=1))  # [] the k_max - 1 greedy steps after the first pick

        @onnxscript.graph()
        def step(i: INT64, cond_in: BOOL, picked_in, r_in, picks_in):  # iteration, cond, carried
            p = op.ArgMin(op.Where(picked_in, inf, r_in), axis=1, keepdims=1)  # [B, 1] ties -> lower index
            picked_out = op.Or(picked_in, op.Equal(ar, p))
            r_out = op.Add(r_in, op.Div(one, op.Add(op.GatherND(d, p, batch_dims=1), eps)))  # [B, N]
            picks_out = op.Where(op.Equal(slots, op.Add(i, op.Constant(value_int=1))), p, picks_in)
            cond_out = op.Less(i, steps)  # true on every step; never reads cond_in (module docstring)
            return cond_out, picked_out, r_out, picks_out

        picked, r, picks = op.Loop(steps, None, picked, r, picks, body=step)
        return picks

    @onnxscript.script(opset=op, default_opset=op)
    def sts_divprune_picks(projected, first: INT64, k_max: int) -> INT64:
        x = op.Cast(projected, to=FLOAT.dtype)  # [B, N, H] float32
        norm = op.Sqrt(op.ReduceSum(op.Mul(x, x), op.Constant(value_ints=[2]), keepdims=1))  # [B, N, 1]
        x = op.Div(x, op.Max(norm, op.Constant(value_float=1e-12)))
        one = op.Constant(value_float=1.0)
        dist = op.Sub(one, op.MatMul(x, op.Transpose(x, perm=[0, 2, 1])))  # [B, N, N] cosine distance
        ninf = op.Constant(value_float=-math.inf)
        n = op.Squeeze(op.Shape(x, start=1, end=2), op.Constant(value_ints=[0]))  # [] int64
        ar = op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1))  # [N]
        kmax = op.Constant(value_int=k_max)
        slots = op.Range(op.Constant(value_int=0), kmax, op.Constant(value_int=1))  # [k_max]
        inf = op.Constant(value_float=math.inf)
        eye = op.Equal(op.Unsqueeze(ar, op.Constant(value_ints=[1])), op.Unsqueeze(ar, op.Constant(value_ints=[0])))
        nn_dist = op.ReduceMin(op.Where(eye, inf, dist), op.Constant(value_ints=[2]), keepdims=0)  # [B, N]
        seed = op.ArgMax(nn_dist, axis=1, keepdims=1)  # [B, 1] DivPrune's seed: the most isolated token
        first64 = op.Unsqueeze(op.Cast(first, to=INT64.dtype), op.Constant(value_ints=[1]))  # [B, 1]
        p0 = op.Where(op.Less(first64, op.Constant(value_int=0)), seed, first64)  # first < 0: own seed
        picked = op.Equal(ar, p0)  # [B, N]
        min_d = op.GatherND(dist, p0, batch_dims=1)  # [B, N] = min(inf, dist[seed, :])
        picks = op.Add(p0, op.Mul(slots, op.Constant(value_int=0)))  # [B, k_max]: the seed in every slot
        steps = op.Sub(kmax, op.Constant(value_int=1))  # [] the k_max - 1 greedy steps after the first pick

        @onnxscript.graph()
        def step(i: INT64, cond_in: BOOL, picked_in, min_in, picks_in):  # iteration, cond, carried
            p = op.ArgMax(op.Where(picked_in, ninf, min_in), axis=1, keepdims=1)  # [B, 1] ties -> lower index
            picked_out = op.Or(picked_in, op.Equal(ar, p))
            min_out = op.Min(min_in, op.GatherND(dist, p, batch_dims=1))
            picks_out = op.Where(op.Equal(slots, op.Add(i, op.Constant(value_int=1))), p, picks_in)
            cond_out = op.Less(i, steps)  # true on every step; never reads cond_in (module docstring)
            return cond_out, picked_out, min_out, picks_out

        picked, min_d, picks = op.Loop(steps, None, picked, min_d, picks, body=step)
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
