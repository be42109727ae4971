"""The five graphs of an export (vision, embed, segment1, prune, segment2), built from any family.

    vision    pixel_values [B,3,H,W]            -> image_embeds [B,K,Hd], keep_pre [B,K]
    embed     input_ids [B,S]                   -> inputs_embeds [B,S,Hd]
    segment1  hidden, position_ids, past (layers < prune_layer)  -> hidden_out, presents
    prune     hidden [B,S1,Hd], position_ids, image_start -> hidden_out [B,S2,Hd], position_ids_out, keep_post
    segment2  hidden, position_ids, past (layers >= prune_layer) -> logits [B,V] (last position), presents

Token selection comes from `sts_export.pruning`; everything family-specific from the family.
"""
from __future__ import annotations

import torch
from torch import nn

from sts_export.families.layers import Llava, repeat_kv
from sts_export.pruning.budget import has_stage2, prune_layer_for, split_budget
from sts_export.pruning.selection import divprune_select, last_token_relevance, potential_energy_select, take_tokens, topk_ascending


class VisionGraph(nn.Module):
    """pixel_values [B,3,H,W] -> image_embeds [B,K,Hd], keep_pre [B,K] int64 (Stage 1 inside)."""

    def __init__(self, model: Llava, method: str, k_pre: int, anchor: str = "mean") -> None:
        super().__init__()
        self.vision, self.projector = model.vision, model.projector
        self.method, self.k_pre, self.anchor = method, k_pre, anchor
        self.n = model.recipe.num_image_tokens
        self.pruned = k_pre < self.n

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need_cls = self.pruned and (self.method == "cls" or self.anchor == "saliency")
        feats, cls_att, _ = self.vision(pixel_values, cls_attention=need_cls)  # [B, N, C], [B, N]
        b = feats.shape[0]
        if not self.pruned:
            keep = torch.arange(self.n, device=feats.device).expand(b, self.n)
            return self.projector(feats), keep
        if self.method == "divprune":
            projected = self.projector(feats)  # [B, N, Hd]
            keep = divprune_select(projected, self.k_pre)
            return take_tokens(projected, keep), keep
        if self.method == "cls":
            keep = topk_ascending(cls_att, self.k_pre)
        else:  # sts, sts-s
            keep = potential_energy_select(feats, self.k_pre, self.anchor, cls_att)
        kept = take_tokens(feats, keep)  # [B, K, C]
        return self.projector(kept), keep


class EmbedGraph(nn.Module):
    """input_ids [B,S] int64 -> inputs_embeds [B,S,Hd]."""

    def __init__(self, model: Llava) -> None:
        super().__init__()
        self.embed_tokens = model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class SegmentGraph(nn.Module):
    """Decoder layers [start, end) with explicit KV tensors; the last segment ends in norm + lm_head.

    forward(hidden [B,S,Hd], position_ids [B,S], past_key_i, past_value_i, ... [B,kvh,P,dh])
      -> (hidden_out [B,S,Hd] | logits [B,V], present_key_i, present_value_i, ... [B,kvh,P+S,dh])
    """

    def __init__(self, model: Llava, start: int, end: int) -> None:
        super().__init__()
        self.start, self.end = start, end
        self.layers = nn.ModuleList(model.layers[start:end])
        self.final = end == len(model.layers)
        if self.final:
            self.norm, self.lm_head = model.norm, model.lm_head

    def layer_indices(self) -> list[int]:
        return list(range(self.start, self.end))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        presents: list[torch.Tensor] = []
        x = hidden
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, position_ids, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        if self.final:
            x = self.lm_head(self.norm(x[:, -1]))  # [B, V]
        return (x, *presents)


class PruneGraph(nn.Module):
    """Stage 2 at layer prune_layer: keep the K' of the K image tokens the last token attends to most.

    hidden [B,S1,Hd], position_ids [B,S1], image_start [] int64
      -> hidden_out [B,S2,Hd], position_ids_out [B,S2], keep_post [B,K'] (indices into the K)
    Text tokens are always kept; kept tokens keep their position ids (S2 = S1 - K + K').
    """

    def __init__(self, model: Llava, prune_layer: int, k_pre: int, k_post: int) -> None:
        super().__init__()
        layer = model.layers[prune_layer]
        self.norm, self.attn = layer.input_layernorm, layer.self_attn
        self.k_pre, self.k_post = k_pre, k_post
        self.n_rep = model.recipe.text.num_heads // model.recipe.text.num_kv_heads

    def forward(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, image_start: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s1, hd = hidden.shape
        q, k = self.attn.qk(self.norm(hidden), position_ids)  # [B,h,S1,d], [B,kvh,S1,d]
        rel = last_token_relevance(q[:, :, -1:], repeat_kv(k, self.n_rep))  # [B, S1]
        offs = torch.arange(self.k_pre, device=hidden.device)  # [K]
        rel_img = torch.gather(rel, 1, (image_start + offs).expand(b, -1))  # [B, K]
        keep_post = topk_ascending(rel_img, self.k_post)  # [B, K']
        # source index of each of the S2 output slots: prefix text, kept image tokens, suffix text
        s2 = s1 - self.k_pre + self.k_post
        j = torch.arange(s2, device=hidden.device)[None].expand(b, -1)  # [B, S2]
        slot = j - image_start  # [B, S2] slot among the kept image tokens (valid where 0 <= slot < K')
        slot = torch.where(slot < 0, 0, torch.where(slot > self.k_post - 1, self.k_post - 1, slot))  # no INT64 Clip (TensorRT)
        img = image_start + torch.gather(keep_post, 1, slot)
        idx = torch.where(j < image_start, j, torch.where(j < image_start + self.k_post, img, j + self.k_pre - self.k_post))
        return take_tokens(hidden, idx), torch.gather(position_ids.expand(b, -1), 1, idx), keep_post


def build_graphs(model: Llava, method: str, budget: int | str, anchor: str | None = None) -> dict[str, nn.Module]:
    """The named graphs of one export configuration (no `prune` without Stage 2)."""
    recipe = model.recipe
    k_pre, k_post = split_budget(budget, recipe, method)
    pl = prune_layer_for(method, recipe)
    graphs: dict[str, nn.Module] = {
        "vision": VisionGraph(model, method, k_pre, anchor or recipe.pruning.anchor),
        "embed": EmbedGraph(model),
        "segment1": SegmentGraph(model, 0, pl),
        "segment2": SegmentGraph(model, pl, recipe.text.num_layers),
    }
    if has_stage2(method, budget):
        graphs["prune"] = PruneGraph(model, pl, k_pre, k_post)
    return graphs

