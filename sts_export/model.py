"""LLaVA-1.5 in flat PyTorch modules, organised as the exported graphs of DESIGN.md.

    vision    pixel_values [B,3,H,W]            -> image_embeds [B,K,Hd], keep_pre [B,K]
    embed     input_ids [B,S]                   -> inputs_embeds [B,S,Hd]
    segment1  hidden, position_ids, past (layers < prune_layer)  -> hidden_out, presents
    prune     hidden [B,S1,Hd], position_ids, image_start -> hidden_out [B,S2,Hd], position_ids_out, keep_post
    segment2  hidden, position_ids, past (layers >= prune_layer) -> logits [B,V] (last position), presents

Parameter names mirror transformers' LLaVA checkpoints after a prefix map (see checkpoint.py),
so weights load without conversion. The causal mask follows sequence order, never position ids:
after Stage 2 the ids have gaps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .budget import has_stage2, prune_layer_for, split_budget
from .recipe import Recipe, TextConfig, VisionConfig
from .selection import divprune_select, potential_energy_select, take_tokens, topk_ascending
from .selection import last_token_relevance


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu}


# ----------------------------------------------------------------------------- CLIP vision tower
class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, C, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, N, C]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, C]
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # [B, N+1, C]


class ClipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, c // cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, T, d]

    def forward(self, x: torch.Tensor, cls_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        o = F.scaled_dot_product_attention(q, k, v)  # [B, h, T, d]
        o = self.out_proj(o.transpose(1, 2).reshape(x.shape))
        cls_att = None
        if cls_attention:  # CLS row of the head-mean attention, over the patch tokens: [B, N]
            att = torch.softmax((q[:, :, :1].float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim), -1)
            cls_att = att.mean(dim=1)[:, 0, 1:]
        return o, cls_att


class ClipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg)

    def forward(self, x: torch.Tensor, cls_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, cls_att = self.self_attn(self.layer_norm1(x), cls_attention)
        x = x + h
        return x + self.mlp(self.layer_norm2(x)), cls_att


class ClipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg.layers_used))


class ClipVision(nn.Module):
    """CLIP vision tower truncated at the feature layer (LLaVA never uses the later layers)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = ClipEncoder(cfg)

    def forward(
        self, pixel_values: torch.Tensor, cls_attention: bool = False, all_layers: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]]]:
        """pixel_values [B,3,H,W] -> features [B,N,C] (CLS dropped), CLS attention of the last layer run [B,N].

        With all_layers, also every layer's (patch hidden states [B,N,C], CLS attention [B,N]).
        """
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # [B, N+1, C]
        per_layer: list[tuple[torch.Tensor, torch.Tensor]] = []
        cls_att = None
        last = len(self.encoder.layers) - 1
        for i, layer in enumerate(self.encoder.layers):
            x, att = layer(x, cls_attention=all_layers or (cls_attention and i == last))
            if all_layers:
                per_layer.append((x[:, 1:], att))
            cls_att = att if i == last else None
        return x[:, 1:], cls_att, per_layer


class Projector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.linear_2 = nn.Linear(text_hidden, text_hidden)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


# ----------------------------------------------------------------------------- Llama decoder
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, S, d] for integer position ids [B, S] (float32 math, as transformers)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [B, S, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, S, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kvh, S, d] -> [B, kvh*n_rep, S, d] (each KV head serves n_rep query heads)."""
    if n_rep == 1:
        return x
    b, kvh, s, d = x.shape
    return x[:, :, None].expand(b, kvh, n_rep, s, d).reshape(b, kvh * n_rep, s, d)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d, kvh = cfg.num_heads, cfg.head_dim, cfg.num_kv_heads
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kvh * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kvh * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)

    def qk(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE'd queries [B,h,S,d] and keys [B,kvh,S,d] of the normed input x [B,S,Hd]."""
        b, s, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(b, s, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(position_ids, c.head_dim, c.rope_theta, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, _ = x.shape
        c = self.cfg
        q, k = self.qk(x, position_ids)
        v = self.v_proj(x).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        k = torch.cat([past_k.to(k.dtype), k], dim=2)  # [B, kvh, P+S, d] (empty caches may arrive as fp32)
        v = torch.cat([past_v.to(v.dtype), v], dim=2)
        p = past_k.shape[2]
        # causal by sequence order: new token i (at sequence index P+i) sees cache entries 0..P+i
        allowed = torch.arange(p + s, device=x.device)[None, :] <= (torch.arange(s, device=x.device) + p)[:, None]
        n_rep = c.num_heads // c.num_kv_heads
        # an additive bias, not a boolean mask: ONNX Runtime runs the boolean form as extra Where/IsNaN
        # passes over the whole score tensor (35% of segment time at S=600). No row is fully masked.
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=x.device).masked_fill(~allowed, torch.finfo(q.dtype).min)
        o = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=bias)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, k, v = self.self_attn(self.input_layernorm(x), position_ids, past_k, past_v)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Llava(nn.Module):
    """All weights of a LLaVA-1.5 model (vision tower up to the feature layer, projector, decoder)."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        t = recipe.text
        self.vision = ClipVision(recipe.vision)
        self.projector = Projector(recipe.vision.hidden_size, t.hidden_size, recipe.projector_act)
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(t) for _ in range(t.num_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)


# ----------------------------------------------------------------------------- the graphs
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

