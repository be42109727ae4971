"""Parameter counts per part and per graph, from a recipe alone (no weights): what the memory estimates, the cost
model and the bench read."""
from __future__ import annotations

from typing import Any

from sts_export.pruning.budget import prune_layer_for
from sts_export.recipe import Recipe


def _qwen_vision_params(v: Any) -> tuple[int, int]:
    """(ViT, PatchMerger) parameters of Qwen2.5-VL's vision side."""
    c, ic, u = v.hidden_size, v.intermediate_size, v.spatial_merge_size**2
    block = (3 * c * c + 3 * c) + (c * c + c) + 3 * (c * ic) + 2 * ic + c + 2 * c  # qkv, proj, SwiGLU w/ bias, 2 norms
    patch = 3 * v.temporal_patch_size * v.patch_size**2 * c  # Conv3d, no bias
    merger = c + (u * c) ** 2 + u * c + u * c * v.out_hidden_size + v.out_hidden_size  # ln_q, Linear, Linear
    return patch + v.num_layers * block, merger


def _qwen3_vision_params(v: Any) -> tuple[int, int]:
    """(ViT, mergers) parameters of Qwen3-VL's vision side: the projector part is the main merger and the T DeepStack
    mergers (each a projector of its own, quantized with it)."""
    c, ic, u = v.hidden_size, v.intermediate_size, v.spatial_merge_size**2
    block = (3 * c * c + 3 * c) + (c * c + c) + (c * ic + ic) + (ic * c + c) + 2 * 2 * c  # qkv, proj, fc1, fc2, 2 LNs
    patch = 3 * v.temporal_patch_size * v.patch_size**2 * c + c  # Conv3d with bias
    table = v.num_position_embeddings * c  # the learned position table
    mlp = (u * c) ** 2 + u * c + u * c * v.out_hidden_size + v.out_hidden_size  # linear_fc1, linear_fc2
    mergers = (2 * c + mlp) + len(v.deepstack_visual_indexes) * (2 * u * c + mlp)  # LayerNorm before / after shuffle
    return patch + table + v.num_layers * block, mergers


def param_counts(recipe: Recipe) -> dict[str, int]:
    """Parameters per part: the CLIP layers that run (Qwen: its ViT), projector (Qwen2.5-VL: its PatchMerger;
    Qwen3-VL: its merger and DeepStack mergers), decoder, lm_head, embedding (tied checkpoints: lm_head and embed
    each count the table, as the embed and segment2 graphs each hold it)."""
    v, t = recipe.vision, recipe.text
    c, ic, h = v.hidden_size, v.intermediate_size, t.hidden_size
    kvd, qd = t.num_kv_heads * t.head_dim, t.num_heads * t.head_dim
    if recipe.image_processor.max_pixels:
        vit, merger = _qwen3_vision_params(v) if v.deepstack_visual_indexes else _qwen_vision_params(v)
        dec_layer = 2 * h * qd + 2 * h * kvd + 3 * h * t.intermediate_size + 2 * h  # q,o + k,v + SwiGLU + 2 RMSNorms
        dec_layer += (qd + 2 * kvd) * t.attention_bias + 2 * t.head_dim * t.qk_norm  # q/k/v biases; q/k RMSNorms
        return {"vision": vit, "projector": merger, "decoder_layer": dec_layer, "decoder": t.num_layers * dec_layer + h,
                "lm_head": t.vocab_size * h, "embed": t.vocab_size * h}
    clip_layer = 4 * (c * c + c) + (c * ic + ic) + (ic * c + c) + 4 * c  # q,k,v,o + fc1,fc2 + 2 LayerNorms
    # patch conv (no bias) + class embedding + position embedding + pre-LayerNorm
    vision_embed = 3 * v.patch_size**2 * c + c + (v.num_patches + 1) * c + 2 * c
    dec_layer = 2 * h * qd + 2 * h * kvd + 3 * h * t.intermediate_size + 2 * h  # q,o + k,v + gate,up,down + 2 RMSNorms
    return {
        "vision": vision_embed + v.layers_used * clip_layer,
        "projector": c * h + h + h * h + h,  # Linear(C,H) -> act -> Linear(H,H)
        "decoder_layer": dec_layer,
        "decoder": t.num_layers * dec_layer + h,  # + final norm
        "lm_head": t.vocab_size * h,
        "embed": t.vocab_size * h,
    }


def graph_params(recipe: Any, method: str) -> dict[str, int]:
    """Parameters of each graph of an export (analytic, from the recipe; no weights needed)."""
    p, t = param_counts(recipe), recipe.text
    pl = prune_layer_for(method, recipe)
    h, kvd = t.hidden_size, t.num_kv_heads * t.head_dim
    extra = h if getattr(recipe, "family", "") == "llava-next" else 0  # image_newline
    return {
        "vision": p["vision"] + p["projector"] + extra,
        "embed": p["embed"],
        "segment1": pl * p["decoder_layer"],
        "prune": h + h * t.num_heads * t.head_dim + h * kvd,  # input norm, q_proj, k_proj of layer prune_layer
        "segment2": (t.num_layers - pl) * p["decoder_layer"] + h + p["lm_head"],
    }


def total_params(recipe: Any) -> int:
    p = param_counts(recipe)
    extra = recipe.text.hidden_size if getattr(recipe, "family", "") == "llava-next" else 0
    return p["vision"] + p["projector"] + p["decoder"] + p["lm_head"] + p["embed"] + extra
