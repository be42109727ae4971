"""Analytic cost model (FLOPs, bytes moved, KV cache) per phase, and a roofline lower bound.

No timing and no model code: everything here is arithmetic on the recipe's dims.

Phases (DESIGN.md graphs):
  vision  = CLIP patch embedding + encoder layers up to the feature layer on N+1 tokens (the CLS
            token runs through the tower) + Stage 1 selection + projector on the kept tokens
            (on all N for `divprune`, which selects on projected embeddings)
  prefill = segment1 (layers < prune_layer) on S1 tokens + Stage 2 relevance + segment2
            (layers >= prune_layer) on S2 tokens + lm_head on the last position only
  decode  = one decode step (S = 1) at step t = decode_context: segment1 layers attend to
            S1 + t + 1 keys, segment2 layers to S2 + t + 1 (DESIGN.md: step t has position S1 + t)

Sequence arithmetic: S1 = T + K, S2 = S1 - K + K' = T + K', with T the prompt's text tokens and
(K, K') = split_budget(budget, recipe, method). Without Stage 2, S2 = S1.

Counting conventions:
  * FLOPs count 2 per multiply-add.
  * Transformer layers count matmuls only (linear layers + the two attention matmuls). Norms, RoPE,
    activations, softmax and residual adds are < 1 % of a layer and not tensor-core work.
  * Decoder attention is causal and counted exactly: query j (0-based, P cached entries) sees
    P + j + 1 keys, so QK^T and PV cost 2 * 2 * n_heads * head_dim * (S*P + S*(S+1)/2). That is the
    work a FlashAttention-style kernel that skips masked tiles does; a dense masked kernel does
    about twice the attention term. CLIP attention is bidirectional: 2 * 2 * T^2 * C.
  * Selection (Stage 1, Stage 2 scores) counts every elementwise op as one FLOP, since it is
    elementwise-dominated: Stage 1 = the N x N x C distance matmul + the K-iteration greedy loop
    (STS_LOOP_OPS per token per pick) + the final index sort. These FLOPs run in float32 (DESIGN.md)
    and are tagged `fp32_flops`, which the roofline charges at the fp32 peak.
  * Bytes are a DRAM-traffic lower bound:
      weights     every weight the phase uses, read once at the model dtype; the Stage 2 graph
                  re-reads layer prune_layer's q_proj/k_proj (it is a separate graph);
      kv          prefill writes the cache; decode reads the whole cache and writes one entry;
      activations graph inputs/outputs + each layer reading its input hidden state and writing its
                  output (the residual stream). Intra-layer intermediates (q/k/v, attention
                  probabilities, MLP hidden) are assumed fused/on-chip. Stage 1's N x N float32
                  distance matrix is written once and read once; the loop state (O(N)) stays in cache.
  * Kernel-launch overhead (e.g. Stage 1's K sequential picks) is invisible to a roofline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple


from sts_export.artifact.params import param_counts
from sts_export.bench.devices import Device, get_device, roofline_terms
from sts_export.pruning.budget import check_method, has_stage2, parse_budget, prune_layer_for, split_budget
from sts_export.errors import StsError
from sts_export.recipe import Recipe, TextConfig
from sts_export.families.qwen_host import token_layout, window_layout

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}
PHASES = ("vision", "prefill", "decode")
# Text tokens of a typical LLaVA-1.5 prompt: the template "USER: <image>\n{prompt} ASSISTANT:" is
# ~10 Llama tokens (BOS, "USER:", "\n", " ASSISTANT:"), around a ~15-token question plus the
# 11-token "Answer the question using a single word or phrase." -> 36, so S1 = 612 unpruned.
DEFAULT_TEXT_TOKENS = 36
FP32_BYTES = 4
INDEX_BYTES = 8  # int64 indices and position ids
STS_LOOP_OPS = 7  # per token per Stage 1 pick: mask-select, argmin, ==, |, +eps, reciprocal, +=
DIVPRUNE_LOOP_OPS = 5  # per token per pick: mask-select, argmax, ==, |, minimum
SOFTMAX_OPS = 5  # per score: max, subtract, exp, sum, divide
STAGE1_METHODS = ("sts", "sts-s", "divprune", "cls")


class Sequence(NamedTuple):
    text_tokens: int  # T: prompt text tokens (template + question), image excluded
    k_pre: int  # K: image tokens after Stage 1 (N when there is none)
    k_post: int  # K': image tokens after Stage 2 (== K when there is none)
    prune_layer: int  # first decoder layer on the S2 sequence
    s1: int  # T + K: tokens in layers < prune_layer
    s2: int  # T + K': tokens in layers >= prune_layer


@dataclass(frozen=True)
class PhaseCost:
    """Analytic cost of one phase for a batch. bytes = weight_bytes + kv_bytes + act_bytes."""

    flops: float  # total, 2 per multiply-add, fp32_flops included
    bytes: float  # DRAM traffic lower bound
    fp32_flops: float = 0.0  # the part that runs in float32 whatever the model dtype (selection math)
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0  # prefill: written; decode: read + the one new entry written
    act_bytes: float = 0.0
    dtype: str = "fp16"  # model dtype: which peak the non-fp32 FLOPs run at
    detail: dict[str, float] = field(default_factory=dict)  # FLOPs per component


# --------------------------------------------------------------------------- sequence and params


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise StsError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def token_grid(recipe: Recipe, image_size: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """Dynamic-resolution recipes (Qwen2.5-VL): (rows, cols) of the LLM-token grid an image of (width, height)
    gets after smart_resize; without a size, the largest square image max_pixels allows. None for the others
    (their N comes from the recipe)."""
    p = recipe.image_processor
    if not p.max_pixels:
        return None

    if image_size is None:
        side = math.isqrt(p.max_pixels)
        image_size = (side, side)
    lay = token_layout(image_size, patch_size=recipe.vision.patch_size, merge_size=recipe.vision.spatial_merge_size,
                       min_pixels=p.min_pixels, max_pixels=p.max_pixels)
    return lay.llm_grid


def sequence_lengths(
    recipe: Recipe, budget: int | str, method: str = "sts", prompt_tokens: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> Sequence:
    """T, K, K', prune_layer, S1 = T + K and S2 = S1 - K + K' for a method at a budget (or 'full').

    Dynamic-resolution recipes (Qwen2.5-VL): N is that of an image of `image_size` (width, height), see
    `token_grid`, and K, K' are that image's (ratio budgets: of its N)."""
    check_method(method)
    budget = parse_budget(budget)
    text = DEFAULT_TEXT_TOKENS if prompt_tokens is None else prompt_tokens
    if isinstance(text, bool) or not isinstance(text, int) or text < 1:
        raise StsError(f"prompt_tokens (text tokens around the image) must be a positive integer, got {text!r}")
    grid = token_grid(recipe, image_size)
    if grid is not None:
        k, k2 = split_budget(budget, recipe, method, n=grid[0] * grid[1])
        k2 = k2 if has_stage2(method, budget) else k
        return Sequence(text, k, k2, prune_layer_for(method, recipe), text + k, text + k2)
    k, k2 = split_budget(budget, recipe, method)
    if (budget == "full" or method in ("none", "fastv")) and recipe.dynamic_tokens:
        k = recipe.max_image_span  # no Stage 1: the whole packed span, anyres newline tokens included
        k2 = k if not has_stage2(method, budget) else k2
    if not has_stage2(method, budget):
        k2 = k
    return Sequence(text, k, k2, prune_layer_for(method, recipe), text + k, text + k2)


def kv_cache_bytes(
    recipe: Recipe, s1: int, s2: int, dtype_bytes: int, *, prune_layer: int | None = None
) -> int:
    """KV cache bytes for one sequence: layers < prune_layer hold s1 entries, the rest s2.

    = sum_{l < pl} 2*kv_heads*head_dim*s1*bytes + sum_{l >= pl} 2*kv_heads*head_dim*s2*bytes
    (MHA: 2*hidden*bytes per cached token per layer). prune_layer defaults to the recipe's.
    """
    t = recipe.text
    pl = recipe.pruning.prune_layer if prune_layer is None else prune_layer
    if not 0 <= pl <= t.num_layers:
        raise StsError(f"prune_layer must be in [0, {t.num_layers}], got {pl}")
    if min(s1, s2) < 0 or dtype_bytes < 1:
        raise StsError(f"kv_cache_bytes needs s1, s2 >= 0 and dtype_bytes >= 1, got {s1}, {s2}, {dtype_bytes}")
    per_entry = 2 * t.num_kv_heads * t.head_dim * dtype_bytes  # K and V of one token in one layer
    return pl * s1 * per_entry + (t.num_layers - pl) * s2 * per_entry


# --------------------------------------------------------------------------- FLOP formulas


def _decoder_layer_flops(t: TextConfig, s: int, past: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one Llama layer for s new tokens after `past` cached ones (q/o are heads * head_dim
    wide: 4096 on Qwen3-VL-4B's 2560-wide decoder)."""
    h, kvd, qd = t.hidden_size, t.num_kv_heads * t.head_dim, t.num_heads * t.head_dim
    linear = 2.0 * s * h * (2 * qd + 2 * kvd) + 2.0 * s * h * t.intermediate_size * 3  # q,o,k,v + gate,up,down
    keys = s * past + s * (s + 1) / 2  # causal: query j sees past + j + 1 keys
    attention = 2 * 2.0 * t.num_heads * t.head_dim * keys  # QK^T and PV
    return linear, attention


def _sort_ops(n: int) -> float:
    return float(n * max(1, math.ceil(math.log2(max(n, 2)))))


def _stage1_flops(method: str, n: int, c: int, h: int, k: int, anchor: str) -> float:
    """Stage 1 selection FLOPs (float32) for one image: distance matrix + greedy loop + sort."""
    if method in ("sts", "sts-s"):
        dist = 2.0 * n * c + 2.0 * n * n * c + 4.0 * n * n  # |v|^2; V V^T [N,C]x[C,N]; |vi|^2+|vj|^2-2x, clamp
        first = {"mean": 4.0 * n * c, "first": 0.0, "saliency": float(n)}[anchor]  # anchor pick
        return dist + first + k * STS_LOOP_OPS * n + _sort_ops(n)  # K picks over N tokens, then sort
    if method == "divprune":
        dist = 3.0 * n * h + 2.0 * n * n * h + n * n  # normalise; X X^T [N,H]x[H,N]; 1 - cos
        seed = 2.0 * n * n  # mask the diagonal, nearest-neighbour min per row
        return dist + seed + k * DIVPRUNE_LOOP_OPS * n + _sort_ops(n)
    if method == "cls":
        return 2 * _sort_ops(n)  # top-k by sorting the CLS attention, then sort the kept indices
    return 0.0


def _stage2_flops(t: TextConfig, s1: int, k: int) -> tuple[float, float]:
    """(model-dtype, float32) FLOPs of Stage 2 relevance at prune_layer for one sequence."""
    h, kvd, nh, dh = t.hidden_size, t.num_kv_heads * t.head_dim, t.num_heads, t.head_dim
    proj = 2.0 * s1 * h * kvd + 2.0 * h * nh * dh  # k_proj on all S1 tokens, q_proj on the last one
    scores = 2.0 * nh * dh * s1  # q_last . K^T for every head [1,dh]x[dh,S1]
    fp32 = scores + SOFTMAX_OPS * nh * s1 + nh * s1 + 2 * _sort_ops(k)  # + softmax, head mean, top-K', sort
    return proj, fp32


# --------------------------------------------------------------------------- phases


def _phase(dtype: str, detail: dict[str, float], fp32_flops: float, weight: float, kv: float, act: float) -> PhaseCost:
    return PhaseCost(
        flops=float(sum(detail.values())),
        bytes=float(weight + kv + act),
        fp32_flops=float(fp32_flops),
        weight_bytes=float(weight),
        kv_bytes=float(kv),
        act_bytes=float(act),
        dtype=dtype,
        detail={name: float(value) for name, value in detail.items()},
    )


def vit_attention_flops(recipe: Recipe, grid: tuple[int, int], windowed: bool = False) -> float:
    """QK^T and PV FLOPs of all Qwen2.5-VL ViT blocks on an image of `grid` LLM tokens: as the exported graph
    computes them (full blocks Np^2; windowed blocks W windows x P^2, each window padded to P = 64 patches), or
    `windowed` (the windowed blocks over each window's own patches only: transformers' varlen kernels)."""

    v = recipe.vision
    m, u = v.spatial_merge_size, v.spatial_merge_size**2
    np_ = grid[0] * grid[1] * u
    n_full = len(v.fullatt_block_indexes)
    _, win = window_layout((1, grid[0] * m, grid[1] * m), m, v.window_size, v.patch_size)  # units per window
    slots = (v.window_size // v.patch_size) ** 2  # P: patches a window holds (the graph's padded window)
    keys = float(((win * u) ** 2).sum()) if windowed else float(len(win)) * slots * slots
    return 2 * 2.0 * v.hidden_size * (n_full * float(np_) * np_ + (v.num_layers - n_full) * keys)


def _qwen_vision_cost(recipe: Recipe, seq: Sequence, method: str, selecting: bool, anchor: str, batch: int,
                      dtype: str, grid: tuple[int, int]) -> PhaseCost:
    """Qwen2.5-VL's vision graph on one image of `grid` LLM tokens: patch embedding (a linear over the 1176
    pixels of each of the Np = 4N patches), the blocks, Stage 1 on the N 2x2-mean features, and the
    PatchMerger (Linear 4C->4C, Linear 4C->Hd) on the kept tokens (on all N for `divprune`, which selects on
    merged embeddings, and without Stage 1).

    Attention is counted as the exported graph computes it: a windowed block gathers its W windows, each padded to
    P = 64 patches, and attends within each (W x P^2, the padding masked as keys); a full block attends over all
    Np^2. A varlen kernel (transformers with FlashAttention) does sum over windows of (patches in it)^2 in the
    windowed blocks instead: `vit_attention_flops(..., windowed=True)`."""
    v, h, db = recipe.vision, recipe.text.hidden_size, DTYPE_BYTES[dtype]
    u, c = v.spatial_merge_size**2, v.hidden_size
    rows, cols = grid
    n = rows * cols
    np_ = n * u
    patch = 2.0 * np_ * (3 * v.temporal_patch_size * v.patch_size**2) * c
    linear = 2.0 * np_ * (3 * c * c + c * c + 3 * c * v.intermediate_size)  # qkv, proj, gate/up/down
    attention = vit_attention_flops(recipe, grid)
    n_proj = n if (method == "divprune" and selecting) or not selecting else seq.k_pre
    stage1 = _stage1_flops(method, n, c, h, seq.k_pre, anchor) if selecting else 0.0
    detail = {
        "encoder": batch * (patch + v.num_layers * linear + attention),
        "stage1": batch * stage1,
        "projector": batch * 2.0 * n_proj * (u * c * u * c + u * c * h),  # the PatchMerger's two linears
    }
    params = param_counts(recipe)
    weight = (params["vision"] + params["projector"]) * db
    act = np_ * 3 * v.temporal_patch_size * v.patch_size**2 * db  # pixel_values in
    act += np_ * (v.hidden_size // v.num_heads // 2) * FP32_BYTES + (n + np_) * INDEX_BYTES  # rotary, window ids
    w = len(window_layout((1, rows * v.spatial_merge_size, cols * v.spatial_merge_size), v.spatial_merge_size,
                          v.window_size, v.patch_size)[1])
    p = (v.window_size // v.patch_size) ** 2
    act += w * p * (INDEX_BYTES + db)  # the window table and the padding's key bias, built once
    act += v.num_layers * 2 * np_ * c * FP32_BYTES  # residual stream in/out per block (kept fp32, see layers.py)
    act += n_proj * u * c * FP32_BYTES + seq.k_pre * (h * db + INDEX_BYTES)  # merger input, image_embeds + keep_pre
    if selecting and method in ("sts", "sts-s", "divprune"):
        feat_dim = h if method == "divprune" else c
        act += n * feat_dim * db + 2 * n * n * FP32_BYTES  # features read; D [N,N] fp32 written + read
    return _phase(dtype, detail, batch * stage1, weight, 0.0, batch * act)


def _qwen3_vision_cost(recipe: Recipe, seq: Sequence, method: str, selecting: bool, anchor: str, batch: int,
                       dtype: str, grid: tuple[int, int]) -> PhaseCost:
    """Qwen3-VL's vision graph on one image of `grid` LLM tokens: patch embedding (a Conv3d with bias, as a linear
    over the 1536 pixels of each of the Np = 4N patches), the learned position table resampled per patch (four rows
    weighted and summed: 8 C per patch), the blocks (LayerNorm, qkv, proj, two-matrix GELU MLP; full attention over
    all Np patches in every block: 2 * 2 * Np^2 * C each), Stage 1 on the N 2x2-mean features, then on the kept
    tokens (all N without Stage 1, and for `divprune`, which selects on merged embeddings) the merger and the T
    DeepStack mergers, each Linear 4C->4C, Linear 4C->Hd."""
    v, h, db = recipe.vision, recipe.text.hidden_size, DTYPE_BYTES[dtype]
    u, c, taps = v.spatial_merge_size**2, v.hidden_size, len(v.deepstack_visual_indexes)
    rows, cols = grid
    n = rows * cols
    np_ = n * u
    pixels = 3 * v.temporal_patch_size * v.patch_size**2
    patch = 2.0 * np_ * pixels * c + 8.0 * np_ * c  # Conv3d as a linear; position table: 4 rows weighted and summed
    linear = 2.0 * np_ * (3 * c * c + c * c + 2 * c * v.intermediate_size)  # qkv, proj, fc1, fc2
    attention = 2 * 2.0 * v.hidden_size * float(np_) * np_ * v.num_layers  # every block attends to the whole image
    n_proj = n if (method == "divprune" and selecting) or not selecting else seq.k_pre
    stage1 = _stage1_flops(method, n, c, h, seq.k_pre, anchor) if selecting else 0.0
    merger = 2.0 * n_proj * (u * c * u * c + u * c * h)  # one merger's two linears on n_proj tokens
    detail = {
        "encoder": batch * (patch + v.num_layers * linear + attention),
        "stage1": batch * stage1,
        "projector": batch * merger,
        "deepstack": batch * taps * merger,  # the DeepStack mergers on the same tokens
    }
    params = param_counts(recipe)
    weight = (params["vision"] + params["projector"]) * db
    act = np_ * pixels * db  # pixel_values in
    act += np_ * (c // v.num_heads // 2 + 4) * FP32_BYTES + np_ * 4 * INDEX_BYTES  # rotary, interp weights, indices
    act += v.num_layers * 2 * np_ * c * FP32_BYTES  # residual stream in/out per block (kept fp32, see layers.py)
    act += (1 + taps) * n_proj * u * c * FP32_BYTES  # the mergers' inputs: last block and each tap
    act += (1 + taps) * seq.k_pre * h * db + seq.k_pre * INDEX_BYTES  # image_embeds, deepstack_embeds, keep_pre
    if selecting and method in ("sts", "sts-s", "divprune"):
        feat_dim = h if method == "divprune" else c
        act += n * feat_dim * db + 2 * n * n * FP32_BYTES  # features read; D [N,N] fp32 written + read
    return _phase(dtype, detail, batch * stage1, weight, 0.0, batch * act)


def _vision_cost(
    recipe: Recipe, seq: Sequence, method: str, selecting: bool, anchor: str, batch: int, dtype: str,
    grid: tuple[int, int] | None = None,
) -> PhaseCost:
    if grid is not None and recipe.vision.deepstack_visual_indexes:
        return _qwen3_vision_cost(recipe, seq, method, selecting, anchor, batch, dtype, grid)
    if grid is not None:
        return _qwen_vision_cost(recipe, seq, method, selecting, anchor, batch, dtype, grid)
    v, h = recipe.vision, recipe.text.hidden_size
    crops = recipe.num_image_tokens // v.num_patches  # anyres: the base crop + the most tiles (LLaVA-1.5: 1)
    n, c, db = recipe.num_image_tokens, v.hidden_size, DTYPE_BYTES[dtype]  # n: Stage 1 candidates of all crops
    tv = v.num_patches + 1  # CLS + patches of one crop run through the tower
    patch = 2.0 * n * (3 * v.patch_size**2) * c  # conv as [N, 3*p*p] x [3*p*p, C] over every crop
    # per layer: q,k,v,o + fc1,fc2 [T,C]x[C,*], then QK^T and PV, bidirectional over T tokens
    layer = 2.0 * tv * (4 * c * c + 2 * c * v.intermediate_size) + 2 * 2.0 * tv * tv * c
    # divprune selects on projected tokens; without Stage 1 every crop's tokens are projected
    n_proj = n if (method == "divprune" and selecting) or not selecting else seq.k_pre
    stage1 = _stage1_flops(method, n, c, h, seq.k_pre, anchor) if selecting else 0.0
    detail = {
        "encoder": batch * (patch + crops * v.layers_used * layer),
        "stage1": batch * stage1,
        "projector": batch * 2.0 * n_proj * (c * h + h * h),  # [n,C]x[C,H], [n,H]x[H,H]
    }
    params = param_counts(recipe)
    weight = (params["vision"] + params["projector"]) * db
    act = crops * 3 * v.image_size**2 * db  # pixel_values in
    act += crops * v.layers_used * 2 * tv * c * db  # residual stream in/out per layer
    act += n_proj * h * db + seq.k_pre * (h * db + INDEX_BYTES)  # projector output, image_embeds + keep_pre out
    if selecting and method in ("sts", "sts-s", "divprune"):
        feat_dim = h if method == "divprune" else c
        act += n * feat_dim * db + 2 * n * n * FP32_BYTES  # features read; D [N,N] fp32 written + read
    return _phase(dtype, detail, batch * stage1, weight, 0.0, batch * act)


def _prefill_cost(recipe: Recipe, seq: Sequence, stage2: bool, batch: int, dtype: str) -> PhaseCost:
    t = recipe.text
    h, layers, pl, db = t.hidden_size, t.num_layers, seq.prune_layer, DTYPE_BYTES[dtype]
    lin1, att1 = _decoder_layer_flops(t, seq.s1, 0)
    lin2, att2 = _decoder_layer_flops(t, seq.s2, 0)
    s2_proj, s2_fp32 = _stage2_flops(t, seq.s1, seq.k_post) if stage2 else (0.0, 0.0)
    taps = len(recipe.vision.deepstack_visual_indexes)
    detail = {
        "segment1": batch * pl * (lin1 + att1),
        "stage2": batch * (s2_proj + s2_fp32),
        "segment2": batch * (layers - pl) * (lin2 + att2),
        "lm_head": batch * 2.0 * h * t.vocab_size,  # last position only
    }
    if taps:  # DeepStack: segment1 adds T planes of the K image rows (elementwise; the planes read once)
        detail["deepstack"] = batch * float(taps * seq.k_pre * h)
    params = param_counts(recipe)
    weight = (params["decoder"] + params["lm_head"]) * db
    act = seq.s1 * (h * db + INDEX_BYTES) + taps * seq.k_pre * h * db  # inputs_embeds, position_ids, deepstack in
    act += (pl * seq.s1 + (layers - pl) * seq.s2) * 2 * h * db  # residual stream in/out per layer
    act += t.vocab_size * db  # logits out
    if stage2:
        weight += (h * t.num_heads * t.head_dim + h * t.num_kv_heads * t.head_dim + h) * db  # q_proj, k_proj, norm
        act += (seq.s1 + seq.s2) * h * db + (seq.s1 + seq.s2 + seq.k_post) * INDEX_BYTES
    kv = kv_cache_bytes(recipe, seq.s1, seq.s2, db, prune_layer=pl)  # written
    return _phase(dtype, detail, batch * s2_fp32, weight, batch * kv, batch * act)


def _decode_cost(recipe: Recipe, seq: Sequence, step: int, batch: int, dtype: str) -> PhaseCost:
    t = recipe.text
    h, layers, pl, db = t.hidden_size, t.num_layers, seq.prune_layer, DTYPE_BYTES[dtype]
    ctx1, ctx2 = seq.s1 + step, seq.s2 + step  # cached entries before this step, per segment
    lin, att1 = _decoder_layer_flops(t, 1, ctx1)
    _, att2 = _decoder_layer_flops(t, 1, ctx2)
    detail = {
        "segment1": batch * pl * (lin + att1),
        "segment2": batch * (layers - pl) * (lin + att2),
        "lm_head": batch * 2.0 * h * t.vocab_size,
    }
    params = param_counts(recipe)
    weight = (params["decoder"] + params["lm_head"]) * db
    kv = kv_cache_bytes(recipe, ctx1, ctx2, db, prune_layer=pl)  # read
    kv += kv_cache_bytes(recipe, 1, 1, db, prune_layer=pl)  # the new entry written
    act = h * db + INDEX_BYTES + layers * 2 * h * db + t.vocab_size * db  # embedding row, residual, logits
    return _phase(dtype, detail, 0.0, weight, batch * kv, batch * act)


def phase_costs(
    recipe: Recipe,
    budget: int | str,
    method: str,
    *,
    dtype: str = "fp16",
    prompt_tokens: int | None = None,
    decode_context: int | None = None,
    batch: int = 1,
    anchor: str | None = None,
    image_size: tuple[int, int] | None = None,
) -> dict[str, PhaseCost]:
    """FLOPs and bytes of the vision, prefill and decode phases (see the module docstring).

    prompt_tokens: text tokens around the image (default DEFAULT_TEXT_TOKENS = 36).
    decode_context: decode step t (tokens generated before it, default 0); the step attends to
    S1 + t + 1 keys in layers < prune_layer and S2 + t + 1 in the rest.
    image_size: (width, height) of the image for dynamic-resolution recipes (Qwen2.5-VL; see `token_grid`).
    """
    check_method(method)
    budget = parse_budget(budget)
    _dtype_bytes(dtype)
    step = 0 if decode_context is None else decode_context
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise StsError(f"decode_context (tokens generated before the step) must be an integer >= 0, got {step!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise StsError(f"batch must be a positive integer, got {batch!r}")
    anchor = recipe.pruning.anchor if anchor is None else anchor
    if anchor not in ("mean", "first", "saliency"):
        raise StsError(f"unknown anchor '{anchor}'; choose one of mean, first, saliency")
    seq = sequence_lengths(recipe, budget, method, prompt_tokens, image_size)
    if seq.s1 + step + 1 > recipe.text.max_position_embeddings:
        raise StsError(
            f"S1 + decode_context + 1 = {seq.s1 + step + 1} exceeds the model's "
            f"{recipe.text.max_position_embeddings} positions; use a shorter prompt or context"
        )
    selecting = budget != "full" and method in STAGE1_METHODS
    return {
        "vision": _vision_cost(recipe, seq, method, selecting, anchor, batch, dtype, token_grid(recipe, image_size)),
        "prefill": _prefill_cost(recipe, seq, has_stage2(method, budget), batch, dtype),
        "decode": _decode_cost(recipe, seq, step, batch, dtype),
    }


def cost_summary(
    recipe: Recipe,
    budget: int | str,
    method: str,
    *,
    dtype: str = "fp16",
    prompt_tokens: int | None = None,
    decode_context: int | None = None,
    batch: int = 1,
    device: Device | str | None = None,
    image_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Flat, JSON-ready summary for `--cost-only`: sequence lengths, KV bytes, per-phase FLOPs/bytes (+ roofline)."""
    seq = sequence_lengths(recipe, budget, method, prompt_tokens, image_size)
    costs = phase_costs(
        recipe, budget, method, dtype=dtype, prompt_tokens=prompt_tokens, decode_context=decode_context, batch=batch,
        image_size=image_size,
    )
    out: dict[str, Any] = {
        "recipe": recipe.name,
        "method": method,
        "budget": parse_budget(budget),
        "dtype": dtype,
        "batch": batch,
        **seq._asdict(),
        "kv_cache_bytes": batch
        * kv_cache_bytes(recipe, seq.s1, seq.s2, DTYPE_BYTES[dtype], prune_layer=seq.prune_layer),
    }
    for phase, c in costs.items():
        out[f"{phase}_flops"] = c.flops
        out[f"{phase}_bytes"] = c.bytes
    if device is not None:
        dev = device if isinstance(device, Device) else get_device(device)
        out["device"] = dev.name
        for phase, t in roofline_terms(costs, dev).items():
            out[f"{phase}_roofline_ms"] = t["bound_ms"]
            out[f"{phase}_bound"] = t["bound"]
    return out


# --------------------------------------------------------------------------- weights (quantized) and memory fit
# What a configuration holds in memory besides weights, KV cache and activations: the CUDA context, cuBLAS/cuDNN
# handles and TensorRT's execution context (or ONNX Runtime's arena). An assumption, not a measurement here: no
# GPU or Jetson was available to this project (NVIDIA documents no figure; ~0.5-1 GB is what Jetson users report).
RUNTIME_OVERHEAD_BYTES = 0.75e9


def _linear_params(recipe: Recipe) -> dict[str, int]:
    """Parameters that sit in linear layers (what weight-only quantization re-encodes), per part."""
    v, t = recipe.vision, recipe.text
    c, ic, h = v.hidden_size, v.intermediate_size, t.hidden_size
    kvd, qd = t.num_kv_heads * t.head_dim, t.num_heads * t.head_dim
    taps = len(v.deepstack_visual_indexes)
    if taps:  # Qwen3-VL: qkv + proj + two-matrix MLP per ViT block; the merger and the T DeepStack mergers
        u = v.spatial_merge_size**2
        vision = v.num_layers * (4 * c * c + 2 * c * ic)
        projector = (1 + taps) * ((u * c) ** 2 + u * c * v.out_hidden_size)
    elif recipe.image_processor.max_pixels:  # Qwen2.5-VL: qkv + proj + SwiGLU per ViT block; the PatchMerger
        u = v.spatial_merge_size**2
        vision, projector = v.num_layers * (4 * c * c + 3 * c * ic), (u * c) ** 2 + u * c * v.out_hidden_size
    else:
        vision, projector = v.layers_used * (4 * c * c + 2 * c * ic), c * h + h * h
    return {"vision": vision, "projector": projector,
            "decoder": t.num_layers * (2 * h * qd + 2 * h * kvd + 3 * h * t.intermediate_size),
            "lm_head": t.vocab_size * h, "embed": t.vocab_size * h}


def weight_bytes_by_part(recipe: Recipe, dtype: str, weights: str | None = None, block_size: int | None = None,
                         encoding: str = "matmulnbits", quantize_vision: bool = False) -> dict[str, float]:
    """Bytes of the weights one export holds, per graph part (vision tower, projector, decoder, lm_head, embed, and
    `prune`: the float q_proj/k_proj Stage 2 keeps), as sts_export.export.quantize writes them: a quantized K x N
    linear is K*N*bits/8 plus one `dtype` scale per block of `block_size` along K (per output channel when
    block_size is None); the embedding is quantized only as int4 for ONNX Runtime (GatherBlockQuantized)."""
    db = _dtype_bytes(dtype)
    params, linear = param_counts(recipe), _linear_params(recipe)
    t = recipe.text
    out = {part: float(params[part] * db) for part in ("vision", "projector", "decoder", "lm_head", "embed")}
    out["prune"] = float(t.hidden_size * (t.num_heads + t.num_kv_heads) * t.head_dim * db)  # q_proj, k_proj
    if weights in (None, "fp32", "fp16", "bf16"):
        return out
    bits = {"int8": 8, "int4": 4}[weights]
    parts = ["projector", "decoder", "lm_head"] + (["vision"] if quantize_vision else [])
    if weights == "int4" and encoding == "matmulnbits":
        parts.append("embed")
    for part in parts:
        n = linear[part]
        k_per_scale = block_size or (recipe.text.hidden_size if part != "vision" else recipe.vision.hidden_size)
        out[part] += n * (bits / 8 + db / k_per_scale) - n * db
    return out


def with_weight_bytes(costs: Mapping[str, PhaseCost], parts: Mapping[str, float], stage2: bool) -> dict[str, PhaseCost]:
    """`costs` with the weight traffic of each phase read at the bytes of `parts` (weight_bytes_by_part)."""
    import dataclasses  # noqa: PLC0415

    per_phase = {"vision": parts["vision"] + parts["projector"],
                 "prefill": parts["decoder"] + parts["lm_head"] + (parts["prune"] if stage2 else 0.0),
                 "decode": parts["decoder"] + parts["lm_head"]}
    return {ph: dataclasses.replace(c, weight_bytes=per_phase[ph], bytes=c.bytes - c.weight_bytes + per_phase[ph])
            for ph, c in costs.items()}


def activation_bytes(recipe: Recipe, seq: Sequence, dtype: str, batch: int = 1,
                     grid: tuple[int, int] | None = None) -> float:
    """A peak-activation estimate: the larger of the vision graph's live set (one crop's residual stream, MLP hidden
    and attention scores, and Stage 1's N x N float32 distances) and the prefill's (hidden states, q/k/v, MLP
    hidden, the attention scores of one layer, the logits). Qwen3-VL (`grid`: the image's LLM-token grid): the ViT's
    live set is that of its Np = 4N patches, every block attending to all of them."""
    db = _dtype_bytes(dtype)
    v, t = recipe.vision, recipe.text
    tv = v.num_patches + 1
    if grid is not None and v.deepstack_visual_indexes:
        tv = grid[0] * grid[1] * v.spatial_merge_size**2
    vision = (3 * tv * v.hidden_size + tv * v.intermediate_size + v.num_heads * tv * tv) * db
    vision += recipe.num_image_tokens**2 * FP32_BYTES
    s1 = seq.s1
    prefill = (5 * s1 * t.hidden_size + 2 * s1 * t.intermediate_size + t.num_heads * s1 * s1) * db + t.vocab_size * db
    return float(batch * max(vision, prefill))


def memory_fit(recipe: Recipe, seq: Sequence, dtype: str, parts: Mapping[str, float], new_tokens: int,
               device: Device | None, batch: int = 1, grid: tuple[int, int] | None = None) -> dict[str, Any]:
    """What one configuration needs resident: weights (every graph) + KV cache after `new_tokens` decode steps +
    activations + RUNTIME_OVERHEAD_BYTES, and with a device whether that fits its memory less the system's share."""
    kv = batch * kv_cache_bytes(recipe, seq.s1 + new_tokens, seq.s2 + new_tokens, _dtype_bytes(dtype),
                                prune_layer=seq.prune_layer)
    w, act = float(sum(parts.values())), activation_bytes(recipe, seq, dtype, batch, grid)
    need = w + kv + act + RUNTIME_OVERHEAD_BYTES
    out: dict[str, Any] = {"mem_weights_bytes": w, "mem_kv_bytes": float(kv), "mem_activation_bytes": act,
                           "mem_runtime_bytes": RUNTIME_OVERHEAD_BYTES, "mem_need_bytes": need}
    if device is not None:
        avail = (device.memory_gb - device.system_reserve_gb) * 1e9
        out.update(mem_available_bytes=avail, fits=bool(need <= avail))
    return out
