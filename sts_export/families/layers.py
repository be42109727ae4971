"""Shared PyTorch layers of the families, in flat gpt-fast style: the CLIP vision tower, the
LLaVA projector, Qwen2.5-VL's window-attention ViT and PatchMerger, Qwen3-VL's ViT (learned
position table resampled per image, DeepStack taps and their mergers), and the Llama/Qwen2/Qwen3
decoder (RMSNorm, RoPE or 3-D M-RoPE with contiguous or interleaved sections, grouped-KV attention
with optional q/k/v bias and q/k RMSNorm, SwiGLU MLP).

Parameter names mirror transformers' checkpoints after each family's key map, so weights load
without conversion. The causal mask follows sequence order, never position ids: after Stage 2
the ids have gaps. Nothing here selects tokens (that is `sts_export.pruning`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sts_export.recipe import Recipe, TextConfig, VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # transformers' "gelu_pytorch_tanh" (GELUTanh)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu, "gelu_pytorch_tanh": gelu_tanh}


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


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, C] -> [B, h, T, C/h]."""
    b, t, c = x.shape
    return x.view(b, t, num_heads, c // num_heads).transpose(1, 2)


def attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Bidirectional multi-head attention of q/k/v [B, T, C] -> [B, T, C] (torch's sdpa over [B, h, T, d])."""
    o = F.scaled_dot_product_attention(split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads))
    return o.transpose(1, 2).reshape(q.shape)


class ClipAttention(nn.Module):
    """`attend` is the attention kernel: torch's sdpa (the portable graphs), or ONNX Runtime's fused
    MultiHeadAttention when the ORT form of the vision graph is exported (`export/ort_form.py`)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, c // cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))
        self.attend = attend_sdpa

    def forward(self, x: torch.Tensor, cls_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, C]
        o = self.out_proj(self.attend(q, k, v, self.num_heads))
        cls_att = None
        if cls_attention:  # CLS row of the head-mean attention, over the patch tokens: [B, N]
            qh, kh = split_heads(q, self.num_heads), split_heads(k, self.num_heads)  # [B, h, T, d]
            att = torch.softmax((qh[:, :, :1].float() @ kh.float().transpose(-1, -2)) / math.sqrt(self.head_dim), -1)
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


def mrope_axes(mrope_section: tuple[int, ...], interleaved: bool = False) -> list[int]:
    """The position-id axis (0 t, 1 h, 2 w) each of the d/2 frequency slots reads under M-RoPE.

    Contiguous (Qwen2.5-VL's Qwen2_5_VLRotaryEmbedding): section i covers the next mrope_section[i] slots and reads
    axis i % 3. Interleaved (Qwen3-VL's Qwen3VLTextRotaryEmbedding.recomposition_frequencies): slots 1, 4, 7, ...
    (mrope_section[1] of them) read h, slots 2, 5, 8, ... (mrope_section[2]) read w, every other slot t.
    """
    if not interleaved:
        return [i % 3 for i, n in enumerate(mrope_section) for _ in range(n)]
    axes = [0] * sum(mrope_section)
    for axis in (1, 2):
        for j in range(axis, 3 * mrope_section[axis], 3):
            axes[j] = axis
    return axes


def rope_angles(position_ids: torch.Tensor, head_dim: int, theta: float,
                mrope_section: tuple[int, ...] = (), interleaved: bool = False) -> torch.Tensor:
    """Rotary angles [B, S, d/2] (float32, as transformers) of integer position ids [B, S].

    M-RoPE (`mrope_section` = (t, h, w) slot counts summing to d/2): ids are [3, B, S] and frequency slot j
    takes its angle from the axis `mrope_axes` gives it (contiguous sections, or Qwen3-VL's interleaved
    slots), so text tokens (equal ids on all axes) get plain RoPE. The same products as transformers,
    which multiplies every axis and then picks the slots.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    if mrope_section:
        axes = torch.tensor(mrope_axes(mrope_section, interleaved), device=position_ids.device)  # [d/2]
        position_ids = position_ids[axes].permute(1, 2, 0)  # [3, B, S] -> [B, S, d/2]: each slot's own id
        return position_ids.float() * inv_freq  # [B, S, d/2]
    return position_ids[..., None].float() * inv_freq  # [B, S, d/2]


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 mrope_section: tuple[int, ...] = (), interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, S, d] for integer position ids [B, S] ([3, B, S] for M-RoPE; see `rope_angles`)."""
    freqs = rope_angles(position_ids, head_dim, theta, mrope_section, interleaved)  # [B, S, d/2]
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
        h, d, kvh, bias = cfg.num_heads, cfg.head_dim, cfg.num_kv_heads, cfg.attention_bias  # bias: Qwen2
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kvh * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kvh * d, bias=bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's d, before RoPE
            self.q_norm, self.k_norm = RMSNorm(d, cfg.rms_norm_eps), RMSNorm(d, cfg.rms_norm_eps)

    def qk(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE'd queries [B,h,S,d] and keys [B,kvh,S,d] of the normed input x [B,S,Hd]; ids [B,S] or [3,B,S] (M-RoPE)."""
        b, s, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(b, s, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(position_ids, c.head_dim, c.rope_theta, x.dtype, c.mrope_section, c.mrope_interleaved)
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
    """SwiGLU: down(act(gate(x)) * up(x)); the decoder's has no bias, Qwen2.5-VL's ViT blocks' has."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

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


# ----------------------------------------------------------------------------- Qwen2.5-VL vision tower
# Np patches (processor order: merge units in raster order, the 2x2 patches of a unit contiguous),
# N = Np / unit LLM tokens (unit = merge**2 = 4), C the ViT width, d = C / heads.
class QwenPatchEmbed(nn.Module):
    """The checkpoint's Conv3d patch embedding (stride = kernel; a bias in Qwen3-VL, none in Qwen2.5-VL) run as
    one linear over the flattened patch: pixel_values [Np, 3*T*ps*ps] (1176 at 14 px, 1536 at 16) -> [Np, C]."""

    def __init__(self, cfg: VisionConfig, bias: bool = False) -> None:
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(3, cfg.hidden_size, k, k, bias=bias)  # weight [C, 3, T, ps, ps]: (C, T, y, x) = patch order

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w, b = self.proj.weight, self.proj.bias
        x = pixel_values.to(w.dtype) @ w.reshape(w.shape[0], -1).t()  # [Np, C]
        return x if b is None else x + b


class QwenVisionAttention(nn.Module):
    """Bidirectional attention over the patches with 2-D rotary: a full-attention block over all Np patches (one
    image per call), a windowed block within each window: the host's window table [W, P] gathers each window's
    patches (padded to P, the padding masked as keys), attention runs as one batch of W windows, and `patch_slot`
    [Np] gathers the outputs back (static shapes, no scatter: what TensorRT builds profiles for)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, c // cfg.num_heads
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        # the ORT form's kernels (export/ort_form.py sets both; None: the portable graph's ops below)
        self.rotate: Callable[..., torch.Tensor] | None = None  # (x [1, T, C], ids [1, T], cos/sin [T, d/2]) -> RotaryEmbedding
        self.attend: Callable[..., torch.Tensor] | None = None  # (q, k, v [B, T, C], heads, bias [B, 1, T, T] | None) -> MHA

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                windows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [Np, C], cos/sin [Np, 1, d] float32; windows (None: full attention): (window_patches [W, P],
        patch_slot [Np], key bias [W, 1, 1, P] in x's dtype: 0 valid, dtype-min padding) -> [Np, C]."""
        if self.attend is not None:
            return self.proj(self._fused(x, cos, sin, windows))
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # [Np, h, d] each
        q, k = apply_rope(q.float(), cos, sin).to(x.dtype), apply_rope(k.float(), cos, sin).to(x.dtype)  # fp32, as HF
        if windows is None:
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, h, Np, d]
            o = F.scaled_dot_product_attention(q, k, v)
            return self.proj(o[0].transpose(0, 1).reshape(n, -1))
        table, slot, bias = windows
        w, p = table.shape
        q, k, v = (t[table.reshape(-1)].view(w, p, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in (q, k, v))  # [W, h, P, d]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [W, h, P, d]
        o = o.transpose(1, 2).reshape(w * p, -1)[slot]  # [Np, C] window order
        return self.proj(o)

    def _fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               windows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The same attention on [B, T, C] tensors through `rotate` and `attend` (one kernel each, no head
        transposes): the ORT form's graph. -> [Np, C] before proj."""
        n, half = x.shape[0], cos.shape[-1] // 2
        q, k, v = self.qkv(x).view(n, 3, -1).unbind(1)  # [Np, C] each
        ids = torch.arange(n, device=x.device)[None]  # row t of the tables is patch t's angles
        c, s = cos[:, 0, :half], sin[:, 0, :half]  # [Np, d/2]: the angles, as cos/sin = cat(a, a)
        q, k = self.rotate(q[None], ids, c, s)[0], self.rotate(k[None], ids, c, s)[0]
        if windows is None:
            return self.attend(q[None], k[None], v[None], self.num_heads, None)[0]
        table, slot, bias = windows
        w, p = table.shape
        q, k, v = (t[table.reshape(-1)].view(w, p, -1) for t in (q, k, v))  # [W, P, C]
        o = self.attend(q, k, v, self.num_heads, bias.expand(w, 1, p, p))  # [W, P, C]
        return o.reshape(w * p, -1)[slot]  # [Np, C] window order


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in float32 whatever the weights' dtype (a float32 residual stream may meet fp16
    weights); equal to nn.LayerNorm in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


class Qwen3MLP(nn.Module):
    """linear_fc2(act(linear_fc1(x))) with biases: Qwen3-VL's ViT blocks (C -> I -> C) and its mergers (4C -> 4C -> Hd)."""

    def __init__(self, inp: int, hidden: int, out: int, act: str) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(inp, hidden)
        self.linear_fc2 = nn.Linear(hidden, out)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class QwenVisionBlock(nn.Module):
    """Qwen2.5-VL's block (RMSNorm, SwiGLU MLP) or, with `qwen3`, Qwen3-VL's (LayerNorm, two-layer MLP); the same
    attention."""

    def __init__(self, cfg: VisionConfig, qwen3: bool = False) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.norm1, self.norm2 = ((LayerNorm(c, cfg.layer_norm_eps), LayerNorm(c, cfg.layer_norm_eps)) if qwen3
                                  else (RMSNorm(c, cfg.layer_norm_eps), RMSNorm(c, cfg.layer_norm_eps)))
        self.attn = QwenVisionAttention(cfg)
        self.mlp = (Qwen3MLP(c, cfg.intermediate_size, c, cfg.hidden_act) if qwen3
                    else MLP(c, cfg.intermediate_size, bias=True, act=cfg.hidden_act))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                windows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [Np, C] float32 (the residual stream stays fp32 in reduced-precision models; the linears run in
        the weights' dtype on the normed input) -> [Np, C] float32."""
        dt = self.attn.qkv.weight.dtype
        x = x + self.attn(self.norm1(x).to(dt), cos, sin, windows).float()
        return x + self.mlp(self.norm2(x).to(dt)).float()


class QwenPatchMerger(nn.Module):
    """RMSNorm per patch, then the 2x2 group's patches concatenated -> MLP (Linear, GELU, Linear)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.unit, c = cfg.spatial_merge_size**2, cfg.hidden_size
        self.ln_q = RMSNorm(c, cfg.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(self.unit * c, self.unit * c), nn.GELU(), nn.Linear(self.unit * c, cfg.out_hidden_size))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """groups [..., unit*C] (a merge unit's patches concatenated, as the ViT returns them) -> [..., out]."""
        x = self.ln_q(groups.unflatten(-1, (self.unit, -1))).flatten(-2)  # RMSNorm over each patch's C
        return self.mlp(x.to(self.mlp[0].weight.dtype))


def vision_cos_sin(rotary_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [Np, 1, d] float32 of the ViT's 2-D rotary angles [Np, d/2] (rows | cols), repeated twice."""
    rot = rotary_pos.float()
    emb = torch.cat([rot, rot], dim=-1)[:, None]  # [Np, 1, d]
    return emb.cos(), emb.sin()


class QwenVision(nn.Module):
    """Qwen2.5-VL's ViT up to (not including) the PatchMerger, as transformers runs it: patches permuted
    into window order, windowed blocks attend within their 112-px window (one batch of windows), the
    full-attention blocks everywhere; the output is returned per LLM token in raster order."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg, self.unit = cfg, cfg.spatial_merge_size**2
        self.full = frozenset(cfg.fullatt_block_indexes)
        self.patch_embed = QwenPatchEmbed(cfg)
        self.blocks = nn.ModuleList(QwenVisionBlock(cfg) for _ in range(cfg.num_layers))
        self.merger = QwenPatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, rotary_pos: torch.Tensor, window_index: torch.Tensor,
                window_patches: torch.Tensor, patch_slot: torch.Tensor) -> torch.Tensor:
        """pixel_values [Np, 1176], rotary_pos [Np, d/2] (processor order), window_index [N] (window order ->
        raster unit), window_patches [W, P] and patch_slot [Np] (window order: `qwen_host.window_patch_table`)
        -> groups [N, unit*C] float32: each LLM token's pre-merger patches concatenated, raster order."""
        unit, n = self.unit, window_index.shape[0]
        perm = (window_index[:, None] * unit + torch.arange(unit, device=window_index.device)).reshape(-1)  # [Np]
        x = self.patch_embed(pixel_values).float()[perm]  # [Np, C] window order
        cos, sin = vision_cos_sin(rotary_pos[perm])  # [Np, 1, d]
        dt = self.patch_embed.proj.weight.dtype
        # windowed blocks: a slot of the window table is a real patch where the patch sits in that very slot; the
        # padding is masked as keys, additive in the attention's dtype (every window holds a real patch)
        w, p = window_patches.shape
        flat = torch.arange(w * p, device=x.device)
        valid = (patch_slot[window_patches.reshape(-1)] == flat).view(w, 1, 1, p)  # [W, 1, 1, P]
        bias = torch.zeros(valid.shape, dtype=dt, device=x.device).masked_fill(~valid, torch.finfo(dt).min)
        windows = (window_patches, patch_slot, bias)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, None if i in self.full else windows)
        groups = x.reshape(n, -1)  # [N, unit*C] window order
        # window order -> raster: reverse = argsort(window_index), as a scatter of the permutation (no Sort op)
        reverse = torch.zeros_like(window_index).scatter(0, window_index, torch.arange(n, device=x.device))
        return groups[reverse]


class QwenVL(nn.Module):
    """All weights of a Qwen2.5-VL model: the ViT with its PatchMerger (`vision`), the Qwen2 decoder; or of a
    Qwen3-VL model, given its ViT (`Qwen3Vision`) and a recipe whose decoder has q/k norms."""

    def __init__(self, recipe: Recipe, vision: nn.Module | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        t = recipe.text
        self.vision = vision if vision is not None else QwenVision(recipe.vision)
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(t) for _ in range(t.num_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)  # tied checkpoints: a copy of embed_tokens


# ----------------------------------------------------------------------------- Qwen3-VL vision tower
# No windows: patches stay in processor order (merge units in raster order = LLM-token order) and every block attends
# to the whole image. T = len(deepstack_visual_indexes) DeepStack taps.
class Qwen3PatchMerger(Qwen3MLP):
    """LayerNorm, then a merge unit's patches concatenated -> Linear, GELU, Linear (checkpoint names norm.*,
    linear_fc1.*, linear_fc2.*). The main merger normalises each patch's C before the shuffle; a DeepStack merger
    (`postshuffle`) normalises the concatenated unit*C after it."""

    def __init__(self, cfg: VisionConfig, postshuffle: bool = False) -> None:
        unit, c = cfg.spatial_merge_size**2, cfg.hidden_size
        super().__init__(unit * c, unit * c, cfg.out_hidden_size, "gelu")
        self.unit, self.postshuffle = unit, postshuffle
        self.norm = LayerNorm(unit * c if postshuffle else c, eps=1e-6)  # eps fixed in transformers

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """groups [..., unit*C] (a merge unit's patches concatenated, float32) -> [..., out]."""
        x = self.norm(groups) if self.postshuffle else self.norm(groups.unflatten(-1, (self.unit, -1))).flatten(-2)
        return super().forward(x.to(self.linear_fc1.weight.dtype))


class Qwen3Vision(nn.Module):
    """Qwen3-VL's ViT up to (not including) its mergers, as transformers runs it for one image: patch embedding plus
    the learned position table resampled to the image's grid (host-computed bilinear taps), 2-D rotary, blocks
    attending to the whole image. Returns each LLM token's pre-merger patches of the last block and of every
    DeepStack tap; the mergers (`merger`, `deepstack_merger_list`) run on the kept tokens only."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg, self.unit = cfg, cfg.spatial_merge_size**2
        self.taps = tuple(cfg.deepstack_visual_indexes)
        self.patch_embed = QwenPatchEmbed(cfg, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(QwenVisionBlock(cfg, qwen3=True) for _ in range(cfg.num_layers))
        self.merger = Qwen3PatchMerger(cfg)
        self.deepstack_merger_list = nn.ModuleList(Qwen3PatchMerger(cfg, postshuffle=True) for _ in self.taps)

    def forward(self, pixel_values: torch.Tensor, rotary_pos: torch.Tensor, interp_indices: torch.Tensor,
                interp_weights: torch.Tensor) -> torch.Tensor:
        """pixel_values [Np, 3*T*ps*ps], rotary_pos [Np, d/2], interp_indices [Np, 4] int64 and interp_weights [Np, 4]
        (bilinear taps into the position table), all in processor order -> groups [1+T, N, unit*C] float32: the last
        block's output, then each DeepStack tap's, per LLM token (raster order; N = Np / unit)."""
        pos = (self.pos_embed(interp_indices).float() * interp_weights.float()[:, :, None]).sum(1)  # [Np, C]
        x = self.patch_embed(pixel_values).float() + pos  # [Np, C] float32 residual stream
        cos, sin = vision_cos_sin(rotary_pos)  # [Np, 1, d]
        taps: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, None)  # one image: no mask
            if i in self.taps:
                taps.append(x)
        n = x.shape[0] // self.unit
        return torch.stack([x, *taps]).reshape(1 + len(taps), n, -1)  # [1+T, N, unit*C]

    def deepstack(self, groups: torch.Tensor) -> torch.Tensor:
        """Each tap's own merger on (kept) tokens' tap patches [T, ..., unit*C] -> [T, ..., out]."""
        return torch.stack([m(g) for m, g in zip(self.deepstack_merger_list, groups.unbind(0))])
