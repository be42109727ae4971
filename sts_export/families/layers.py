"""Shared PyTorch layers of the families, in flat gpt-fast style: the CLIP vision tower, the
LLaVA projector and the Llama decoder (RMSNorm, RoPE, grouped-KV attention, SwiGLU MLP).

Parameter names mirror transformers' checkpoints after each family's key map, so weights load
without conversion. The causal mask follows sequence order, never position ids: after Stage 2
the ids have gaps. Nothing here selects tokens (that is `sts_export.pruning`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sts_export.recipe import Recipe, TextConfig, VisionConfig


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
