"""The five graphs of an export (vision, embed, segment1, prune, segment2), built from any family.

    vision    pixel_values [B,3,H,W]            -> image_embeds [B,K,Hd], keep_pre [B,K]
                                                   (+ deepstack_embeds [T,B,K,Hd] with T DeepStack taps)
    embed     input_ids [B,S]                   -> inputs_embeds [B,S,Hd]
    segment1  hidden, position_ids, (deepstack_embeds, image_start,) past (layers < prune_layer)
                                                -> hidden_out, presents
    prune     hidden [B,S1,Hd], position_ids, image_start -> hidden_out [B,S2,Hd], position_ids_out, keep_post
    segment2  hidden, position_ids, past (layers >= prune_layer) -> logits [B,V] (last position), presents

Token selection comes from `sts_export.pruning`; everything family-specific from the family.
"""
from __future__ import annotations

import torch
from torch import nn

from sts_export.families import family_module
from sts_export.families.layers import repeat_kv
from sts_export.pruning.budget import export_split, has_stage2, prune_layer_for
from sts_export.pruning.loop import keep_first_k
from sts_export.pruning.selection import last_token_relevance, take_tokens, topk_ascending


class VisionGraph(nn.Module):
    """The vision tower with Stage 1 inside: the family's inputs -> image_embeds [B,K,Hd], keep_pre [B,K] int64.

    The greedy is one ONNX Loop of K_max steps (`pruning.loop`). Fixed-N families (LLaVA-1.5): K = K_max is
    fixed per export, any batch. Image-dependent N (anyres): one image per call, N = len(token_index); K_max is
    the export's largest K and the graph keeps the first K picks, K = len(k_pre) (a length-only input, so every
    shape stays a dimension TensorRT can build profiles for).
    Without pruning, image_embeds is the image span exactly as transformers packs it.
    DeepStack families (T = len(deepstack_visual_indexes) > 0) also return deepstack_embeds [T, B, K, Hd]: the kept
    tokens' own DeepStack embeddings (the family's `deepstack`), in keep_pre's order.
    `forced_keep` [B, K] (None outside validation): keep these tokens instead of selecting (the reference run with a
    candidate's picks, so numerics are compared on the same kept tokens).
    """

    def __init__(self, model: nn.Module, method: str, budget: int | str, k_pre: int, anchor: str = "mean") -> None:
        super().__init__()
        recipe = model.recipe
        self.model, self.family = model, family_module(recipe.family)
        self.method, self.k_max, self.anchor = method, k_pre, anchor
        self.dynamic = recipe.dynamic_tokens
        self.taps = len(recipe.vision.deepstack_visual_indexes)
        self.pruned = method not in ("none", "fastv") and budget != "full"
        self.inputs = self.family.vision_inputs(self.pruned) + (["k_pre"] if self.dynamic and self.pruned else [])
        check = getattr(self.family, "check_selection", None)  # a tower without [CLS] refuses cls / saliency
        if check is not None and self.pruned:
            check(method, anchor)
        self.forced_keep: torch.Tensor | None = None

    def selection_input(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """What Stage 1 selects on: (x [B,N,C|Hd] pre-projector features, or projected embeddings for divprune;
        cls_attention [B,N] | None; the tokens the projector takes [B,N,D])."""
        need_cls = self.method == "cls" or self.anchor == "saliency"
        feats, cls_att, *rest = self.family.candidate_features(self.model, *inputs, cls_attention=need_cls)
        tokens = rest[0] if rest else feats
        x = self.family.project(self.model, tokens) if self.method == "divprune" else feats  # [B, N, C|Hd]
        return x, cls_att, tokens

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fam, model = self.family, self.model
        k_len = inputs[-1] if self.dynamic and self.pruned else None  # [K] length-only
        tower_inputs = inputs[:-1] if k_len is not None else inputs
        if not self.pruned and self.taps:  # DeepStack: the span is every candidate, each with its planes
            tokens = fam.candidate_features(model, *tower_inputs)[2]  # [B, N, D]
            b, n = tokens.shape[:2]
            everything = torch.arange(n, device=tokens.device).expand(b, n)
            return fam.project(model, tokens), everything, fam.deepstack(model, tokens)
        if not self.pruned:
            emb = fam.full_embeds(model, *tower_inputs)  # [B, N_full, Hd]
            b, n = emb.shape[:2]
            return emb, torch.arange(n, device=emb.device).expand(b, n)
        # V [B,N,C] selects; the projector takes `tokens` [B,N,D] (V itself, or the family's own per-token input)
        x, cls_att, tokens = self.selection_input(*tower_inputs)
        # the first K of a K_max-step greedy (an ONNX Loop): K = len(k_pre) for image-dependent N, else K = K_max
        k = k_len.shape[0] if k_len is not None else self.k_max
        keep = keep_first_k(self.method, x, k, self.k_max, self.anchor, cls_att) if self.forced_keep is None \
            else self.forced_keep  # [B, K]
        kept = take_tokens(tokens, keep)  # [B, K, D]
        # [B, K, Hd]: divprune selected on the projected tokens
        emb = take_tokens(x, keep) if self.method == "divprune" else fam.project(model, kept)
        return (emb, keep, fam.deepstack(model, kept)) if self.taps else (emb, keep)


class EmbedGraph(nn.Module):
    """input_ids [B,S] int64 -> inputs_embeds [B,S,Hd]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


def image_rows(plane: torch.Tensor, image_start: torch.Tensor, s: int) -> torch.Tensor:
    """plane [B, K, Hd] placed at sequence rows image_start .. image_start+K-1 of an [B, S, Hd] tensor, zeros
    elsewhere (K >= 1, image_start + K <= S). A gather and a select (static shapes, no scatter)."""
    b, k, _ = plane.shape
    slot = torch.arange(s, device=plane.device) - image_start  # [S] row j holds plane row j - image_start
    inside = (slot >= 0) & (slot < k)
    slot = torch.where(slot < 0, 0, torch.where(slot > k - 1, k - 1, slot))  # no INT64 Clip (TensorRT)
    rows = take_tokens(plane, slot[None].expand(b, -1))  # [B, S, Hd]
    return torch.where(inside[None, :, None], rows, torch.zeros((), dtype=plane.dtype, device=plane.device))


class SegmentGraph(nn.Module):
    """Decoder layers [start, end) with explicit KV tensors; the last segment ends in norm + lm_head.

    forward(hidden [B,S,Hd], position_ids [B,S] (M-RoPE: [3,B,S]), past_key_i, past_value_i, ... [B,kvh,P,dh])
      -> (hidden_out [B,S,Hd] | logits [B,V], present_key_i, present_value_i, ... [B,kvh,P+S,dh])

    With T DeepStack taps the segment holding layers 0..T-1 (segment1: prune_layer >= T) also takes, after
    position_ids, deepstack_embeds [T,B,K,Hd] and image_start [] int64, and adds plane t to rows image_start ..
    image_start+K-1 of layer t's output (transformers' `_deepstack_process` at the K image tokens present). Decode
    steps feed one zero row (K = 1, image_start 0): they add nothing.
    """

    def __init__(self, model: nn.Module, start: int, end: int) -> None:
        super().__init__()
        self.start, self.end = start, end
        self.layers = nn.ModuleList(model.layers[start:end])
        self.final = end == len(model.layers)
        if self.final:
            self.norm, self.lm_head = model.norm, model.lm_head
        taps = len(model.recipe.vision.deepstack_visual_indexes)
        self.taps = taps if start == 0 else 0
        if (start == 0 and end < taps) or 0 < start < taps:
            raise ValueError(f"layers {start}..{end - 1}: the DeepStack layers 0..{taps - 1} must all be in segment1")

    def layer_indices(self) -> list[int]:
        return list(range(self.start, self.end))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        deep, image_start, past = (rest[0], rest[1], rest[2:]) if self.taps else (None, None, rest)
        presents: list[torch.Tensor] = []
        x = hidden
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, position_ids, past[2 * i], past[2 * i + 1])
            if deep is not None and i < self.taps:
                x = x + image_rows(deep[i].to(x.dtype), image_start, x.shape[1])
            presents += [k, v]
        if self.final:
            x = self.lm_head(self.norm(x[:, -1]))  # [B, V]
        return (x, *presents)


class PruneGraph(nn.Module):
    """Stage 2 at layer prune_layer: keep the K' of the K image tokens the last token attends to most.

    hidden [B,S1,Hd], position_ids [B,S1] (M-RoPE: [3,B,S1]), image_start [] int64
      -> hidden_out [B,S2,Hd], position_ids_out [B,S2] ([3,B,S2]), keep_post [B,K'] (indices into the K)
    Text tokens are always kept; kept tokens keep their position ids (S2 = S1 - K + K').
    With image-dependent N, two length-only inputs give this image's K and K' ([K], [K']); the
    TopK is then a constant K'_max (the export's largest K') of which the first K' are kept.
    `forced_keep` [B, K'] (None outside validation): keep these instead of the top K' (see VisionGraph).
    """

    def __init__(self, model: nn.Module, prune_layer: int, k_pre: int, k_post: int) -> None:
        super().__init__()
        layer = model.layers[prune_layer]
        self.norm, self.attn = layer.input_layernorm, layer.self_attn
        self.k_pre, self.k_post = k_pre, k_post
        self.dynamic = model.recipe.dynamic_tokens
        self.n_rep = model.recipe.text.num_heads // model.recipe.text.num_kv_heads
        self.inputs = ["hidden", "position_ids", "image_start"] + (["k_pre", "k_post"] if self.dynamic else [])
        self.forced_keep: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, image_start: torch.Tensor,
                *lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s1, hd = hidden.shape
        k_pre, k_post = (lengths[0].shape[0], lengths[1].shape[0]) if self.dynamic else (self.k_pre, self.k_post)
        q, k = self.attn.qk(self.norm(hidden), position_ids)  # [B,h,S1,d], [B,kvh,S1,d]
        rel = last_token_relevance(q[:, :, -1:], repeat_kv(k, self.n_rep))  # [B, S1]
        offs = torch.arange(k_pre, device=hidden.device)  # [K]
        rel_img = torch.gather(rel, 1, (image_start + offs).expand(b, -1))  # [B, K]
        keep_post = topk_ascending(rel_img, k_post, self.k_post if self.dynamic else None) if self.forced_keep is None \
            else self.forced_keep  # [B, K']
        # source index of each of the S2 output slots: prefix text, kept image tokens, suffix text
        s2 = s1 - k_pre + k_post
        j = torch.arange(s2, device=hidden.device)[None].expand(b, -1)  # [B, S2]
        slot = j - image_start  # [B, S2] slot among the kept image tokens (valid where 0 <= slot < K')
        slot = torch.where(slot < 0, 0, torch.where(slot > k_post - 1, k_post - 1, slot))  # no INT64 Clip (TensorRT)
        img = image_start + torch.gather(keep_post, 1, slot)
        idx = torch.where(j < image_start, j, torch.where(j < image_start + k_post, img, j + k_pre - k_post))
        # position ids [B,S1] or M-RoPE [3,B,S1]: every survivor keeps its own, gathered along the sequence axis
        pos = position_ids.expand(*position_ids.shape[:-2], b, -1)
        return take_tokens(hidden, idx), torch.gather(pos, -1, idx.expand(*pos.shape[:-2], -1, -1)), keep_post


def build_graphs(model: nn.Module, method: str, budget: int | str, anchor: str | None = None) -> dict[str, nn.Module]:
    """The named graphs of one export configuration (no `prune` without Stage 2)."""
    recipe = model.recipe
    k_pre, k_post = export_split(budget, recipe, method)
    pl = prune_layer_for(method, recipe)
    graphs: dict[str, nn.Module] = {
        "vision": VisionGraph(model, method, budget, k_pre, anchor or recipe.pruning.anchor),
        "embed": EmbedGraph(model),
        "segment1": SegmentGraph(model, 0, pl),
        "segment2": SegmentGraph(model, pl, recipe.text.num_layers),
    }
    if has_stage2(method, budget):
        graphs["prune"] = PruneGraph(model, pl, k_pre, k_post)
    return graphs

