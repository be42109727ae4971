"""The ORT form of the decoder graphs (DESIGN.md "Graph forms"): segment1/segment2 with ONNX Runtime's fused
kernels and an in-place KV cache, exported from the same torch layers as the portable graphs.

    <export>/segment1.ort.onnx  segment2.ort.onnx   manifest.json "ort_form": {graph: entry, "cache": ...}

Per decoder layer (ops in the com.microsoft domain unless noted):
    SimplifiedLayerNormalization (ai.onnx; the first layer's input norm only) | SkipSimplifiedLayerNormalization
      (residual add + the next RMSNorm in one kernel), one packed QKV MatMul, GroupQueryAttention (causal, packed
      q|k|v in, rotary inside), o_proj, gate and up MatMuls, SiLU (QuickGelu once ONNX Runtime fuses it) * up,
      down_proj: 10 kernels a layer, the layer of onnxruntime-genai's model builder.
Rotary: the graph computes cos/sin of *our* position ids once per call, float32 as the portable graphs
(`rope_angles`, M-RoPE's section mix included), as a per-token table [B*S, d/2]; GroupQueryAttention's rotary
reads row b*S+s for token (b, s) (position_ids = 0..B*S-1, `query_seqlens` = S so the kernel honours every id).
So gapped ids after Stage 2 and Qwen's [3, B, S] ids are honoured exactly, with no Split or RotaryEmbedding
kernel per layer. GroupQueryAttention's rotary needs head_dim % 16 == 0 (every recipe's). That layout (rotary
"kernel") needs onnxruntime 1.32+ (`query_seqlens`); an export made with an older one rotates q and k with two
RotaryEmbedding ops reading the same tables (rotary "ops", 13 kernels a layer; manifest ort_form.cache.rotary).

IO: the portable segment's, plus `seqlens_k` [B] int32 (entries after this call - 1) and
`total_sequence_length` [] int32 (entries after this call). past_*/present_* [B, kvh, C, dh] are one
buffer when bound to the same OrtValue (C = the cache's capacity, updated in place; the backend's
in-place cache), or past [.., P, ..] -> present [.., P+S, ..] when not (the same graph then concatenates).
The causal mask is by cache order, as the portable graphs'. Stage 1 and Stage 2 are not here: embed and prune
stay portable (their float32 math and picks are the validated ones). The vision graph's ORT form (CLIP towers
and the Qwen ViTs) swaps only its attention for fused kernels; Stage 1 inside it is the portable graph's ops.
"""
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from sts_export.artifact.manifest import ORT_FORM_VERSION, manifest_plan, manifest_recipe, read_manifest, write_manifest
from sts_export.artifact.plan import graph_io
from sts_export.backends.onnxruntime import OrtBackend, gqa_takes_query_seqlens
from sts_export.checkpoint import Source, ensure_synthetic, load_model
from sts_export.errors import StsError
from sts_export.export import reuse
from sts_export.export.compare import compare_generations
from sts_export.export.io import deepstack_example, example_positions, export_graph, file_entry, onnx_export
from sts_export.export.validate import sample_inputs
from sts_export.families.layers import (ClipAttention, QwenVisionAttention, apply_rope, attend_sdpa, repeat_kv, rope_angles,
                                        split_heads)
from sts_export.generate import generate
from sts_export.graphs import build_graphs, image_rows

FORM_GRAPHS = ("segment1", "segment2")
CACHE_INPUTS = ("seqlens_k", "total_sequence_length")
# where the segments rotate q and k: "kernel" (GroupQueryAttention's own rotary with query_seqlens: 10 kernels a
# layer, onnxruntime 1.32+) or "ops" (Split + RotaryEmbedding on q and k + GQA without rotary: 13 kernels a layer,
# the layout every onnxruntime with GQA loads, e.g. 1.31)
ROTARY = ("kernel", "ops")


def rotary_here() -> str:
    """The rotary layout this machine's onnxruntime runs: "kernel" when its GroupQueryAttention takes
    query_seqlens (1.32+), else "ops" (see ROTARY)."""
    return "kernel" if gqa_takes_query_seqlens() else "ops"


def ort_file(graph: str) -> str:
    return f"{graph}.ort.onnx"


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: eager math = the portable layers'; ONNX = the contrib op (translation table below)
# ---------------------------------------------------------------------------------------------------------------

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@torch.library.custom_op("sts_ort::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as `layers.RMSNorm` (float32 statistics) -> SimplifiedLayerNormalization."""
    return _rms(x, weight, eps)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("sts_ort::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + skip), x + skip) -> SkipSimplifiedLayerNormalization (outputs 0 and 3)."""
    s = x + skip
    return _rms(s, weight, eps), s


@skip_rms_norm.register_fake
def _(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


def _rope_rows(x: torch.Tensor, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE of x [B, S, n*d] with per-row tables cos/sin [R, d/2] read at ids [B, S] -> [B, S, n*d]."""
    b, s, nd = x.shape
    d = 2 * cos.shape[-1]
    c = torch.cat([cos[ids], cos[ids]], -1)[:, None]  # [B, 1, S, d]
    sn = torch.cat([sin[ids], sin[ids]], -1)[:, None]
    return apply_rope(x.view(b, s, nd // d, d).transpose(1, 2), c, sn).transpose(1, 2).reshape(b, s, nd)


def _attend_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                  total: torch.Tensor, num_heads: int, kv_num_heads: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention's cache and causal attention, eager: rotated q [B,S,h*d], k/v [B,S,kvh*d] ->
    (o [B,S,h*d], present_k, present_v). past [B,kvh,C,d] holds P = total - S valid entries. C >= total: present
    is the same buffer with the new entries written at P..total-1; else present = past + new ([B,kvh,P+S,d])."""
    b, s, _ = q.shape
    d = past_k.shape[-1]
    t = int(total)
    p = t - s
    qh = q.view(b, s, num_heads, d).transpose(1, 2)  # [B, h, S, d]
    kn = k.view(b, s, kv_num_heads, d).transpose(1, 2)  # [B, kvh, S, d]
    vn = v.view(b, s, kv_num_heads, d).transpose(1, 2)
    if past_k.shape[2] >= t:  # one buffer of capacity C
        pk, pv = past_k.clone(), past_v.clone()
        pk[:, :, p:t], pv[:, :, p:t] = kn, vn
    else:
        pk, pv = torch.cat([past_k[:, :, :p], kn], 2), torch.cat([past_v[:, :, :p], vn], 2)
    allowed = torch.arange(t)[None, :] <= (torch.arange(s) + p)[:, None]
    bias = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)
    rep = num_heads // kv_num_heads
    o = torch.nn.functional.scaled_dot_product_attention(qh, repeat_kv(pk[:, :, :t], rep), repeat_kv(pv[:, :, :t], rep),
                                                         attn_mask=bias)
    return o.transpose(1, 2).reshape(b, s, -1), pk, pv


@torch.library.custom_op("sts_ort::gqa", mutates_args=())
def gqa(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ids: torch.Tensor, query_seqlens: torch.Tensor,
        past_k: torch.Tensor, past_v: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor, num_heads: int,
        kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half-split RoPE + causal grouped-query attention with a KV cache -> one GroupQueryAttention (packed QKV,
    its own rotary fed our per-token tables; share-buffer when past is the capacity; onnxruntime 1.32+).

    qkv [B,S,(h+2kvh)*d] (q|k|v); cos/sin [R, d/2] with R >= total: row ids[b, s] is token (b, s)'s angles (any
    position ids, gapped or M-RoPE, computed by the caller); query_seqlens [B] int32 = S; past as `_attend_cache`.
    """
    d = past_k.shape[-1]
    q, k, v = qkv.split([num_heads * d, kv_num_heads * d, kv_num_heads * d], dim=-1)
    return _attend_cache(_rope_rows(q, ids, cos, sin), _rope_rows(k, ids, cos, sin), v, past_k, past_v, total,
                         num_heads, kv_num_heads)


@gqa.register_fake
def _(qkv, cos, sin, ids, query_seqlens, past_k, past_v, seqlens_k, total, num_heads, kv_num_heads):
    b, s, _ = qkv.shape
    return qkv.new_empty(b, s, num_heads * past_k.shape[-1]), torch.empty_like(past_k), torch.empty_like(past_v)


@torch.library.custom_op("sts_ort::gqa_qkv", mutates_args=())
def gqa_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ids: torch.Tensor,
            query_seqlens: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, seqlens_k: torch.Tensor,
            total: torch.Tensor, num_heads: int, kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gqa` with q [B,S,h*d], k, v [B,S,kvh*d] apart (GroupQueryAttention's unpacked inputs): what a decoder with
    q/k RMSNorm (Qwen3) feeds it, the norms having run on the q and k of the packed projection."""
    return _attend_cache(_rope_rows(q, ids, cos, sin), _rope_rows(k, ids, cos, sin), v, past_k, past_v, total,
                         num_heads, kv_num_heads)


@gqa_qkv.register_fake
def _(q, k, v, cos, sin, ids, query_seqlens, past_k, past_v, seqlens_k, total, num_heads, kv_num_heads):
    return torch.empty_like(q), torch.empty_like(past_k), torch.empty_like(past_v)


@torch.library.custom_op("sts_ort::rotary", mutates_args=())
def rotary(x: torch.Tensor, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`_rope_rows` -> RotaryEmbedding (the `rotary="ops"` layout: every onnxruntime with GroupQueryAttention
    loads it)."""
    return _rope_rows(x, ids, cos, sin)


@rotary.register_fake
def _(x, ids, cos, sin):
    return torch.empty_like(x)


@torch.library.custom_op("sts_ort::gqa_plain", mutates_args=())
def gqa_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
              seqlens_k: torch.Tensor, total: torch.Tensor, num_heads: int, kv_num_heads: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal grouped-query attention of rotated q [B,S,h*d], k/v [B,S,kvh*d] with a KV cache -> GroupQueryAttention
    without rotary (the `rotary="ops"` layout); past as `_attend_cache`."""
    return _attend_cache(q, k, v, past_k, past_v, total, num_heads, kv_num_heads)


@gqa_plain.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total, num_heads, kv_num_heads):
    return torch.empty_like(q), torch.empty_like(past_k), torch.empty_like(past_v)


@torch.library.custom_op("sts_ort::mha", mutates_args=())
def mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Bidirectional attention of q/k/v [B, T, C] (the vision tower's) -> MultiHeadAttention."""
    return attend_sdpa(q, k, v, num_heads)


@mha.register_fake
def _(q, k, v, num_heads):
    return torch.empty_like(q)


@torch.library.custom_op("sts_ort::mha_bias", mutates_args=())
def mha_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`mha` with an additive attention bias [B, 1, T, T] (Qwen2.5-VL's windows: the padding masked as keys)
    -> MultiHeadAttention's attention_bias."""
    o = F.scaled_dot_product_attention(split_heads(q, num_heads), split_heads(k, num_heads),
                                       split_heads(v, num_heads), attn_mask=bias)
    return o.transpose(1, 2).reshape(q.shape)


@mha_bias.register_fake
def _(q, k, v, bias, num_heads):
    return torch.empty_like(q)


def _qwen_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """QwenVisionAttention's `attend` in the ORT form."""
    ops = torch.ops.sts_ort
    return ops.mha(q, k, v, num_heads) if bias is None else ops.mha_bias(q, k, v, bias, num_heads)


_TRANSLATIONS: Optional[dict] = None


def translation_table() -> dict:
    global _TRANSLATIONS
    if _TRANSLATIONS is None:
        from sts_export.export.ort_ops import TRANSLATIONS  # onnxscript: only when exporting

        _TRANSLATIONS = TRANSLATIONS
    ops = torch.ops.sts_ort
    return {ops.rms_norm.default: _TRANSLATIONS["rms_norm"], ops.skip_rms_norm.default: _TRANSLATIONS["skip_rms_norm"],
            ops.gqa.default: _TRANSLATIONS["gqa"], ops.gqa_qkv.default: _TRANSLATIONS["gqa_qkv"],
            ops.mha.default: _TRANSLATIONS["mha"], ops.mha_bias.default: _TRANSLATIONS["mha_bias"],
            ops.rotary.default: _TRANSLATIONS["rotary"], ops.gqa_plain.default: _TRANSLATIONS["gqa_plain"]}


# ---------------------------------------------------------------------------------------------------------------
# The fused segment
# ---------------------------------------------------------------------------------------------------------------

class FusedSegment(nn.Module):
    """A portable SegmentGraph's decoder layers in the ORT form (q|k|v packed into one MatMul per layer; gate and up
    stay two MatMuls: a packed gate|up would add two Slices per layer, one kernel more than the second MatMul).

    forward(hidden [B,S,Hd], position_ids [B,S] | [3,B,S], seqlens_k [B] int32, total_sequence_length [] int32,
            [deepstack_embeds [T,B,K,Hd], image_start [] int64,] past_key_i, past_value_i, ...)
      -> (hidden_out [B,S,Hd] | logits [B,V], present_key_i, present_value_i, ...)

    Qwen3 (q/k RMSNorm): the packed projection is split, q and k normed per head (SimplifiedLayerNormalization over
    d) and GroupQueryAttention takes q, k, v apart, rotating them itself. DeepStack (segment1 of a family with T
    taps): after layer t < T the residual stream is (x + mlp) + plane t at the image rows, added in the portable
    graph's order (the layer's own sum first), so the sums are the portable graph's bit for bit.
    """

    def __init__(self, seg: nn.Module, cfg: Any, rotary: str = "kernel") -> None:
        super().__init__()
        if rotary not in ROTARY:
            raise ValueError(f"rotary must be one of {ROTARY}")
        self.cfg, self.rotary = cfg, rotary
        self.final = seg.final
        layers = seg.layers
        with torch.no_grad():
            self.qkv = nn.ModuleList(self._packed([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]) for l in layers)
        self.o_proj = nn.ModuleList(l.self_attn.o_proj for l in layers)
        self.gate = nn.ModuleList(l.mlp.gate_proj for l in layers)
        self.up = nn.ModuleList(l.mlp.up_proj for l in layers)
        self.down = nn.ModuleList(l.mlp.down_proj for l in layers)
        self.act = layers[0].mlp.act if len(layers) else torch.nn.functional.silu
        self.in_norm = nn.ParameterList(l.input_layernorm.weight for l in layers)
        self.post_norm = nn.ParameterList(l.post_attention_layernorm.weight for l in layers)
        self.qk_norm = bool(cfg.qk_norm)
        if self.qk_norm:  # Qwen3: RMSNorm over each head's d, before the rotary
            self.q_norm = nn.ParameterList(l.self_attn.q_norm.weight for l in layers)
            self.k_norm = nn.ParameterList(l.self_attn.k_norm.weight for l in layers)
        self.taps = seg.taps  # DeepStack planes this segment adds (segment1 of a family with taps), else 0
        self.eps = cfg.rms_norm_eps
        if self.final:
            self.norm, self.lm_head = seg.norm, seg.lm_head

    @staticmethod
    def _packed(linears: list[nn.Linear]) -> nn.Linear:
        w = torch.cat([l.weight for l in linears], 0)
        out = nn.Linear(w.shape[1], w.shape[0], bias=linears[0].bias is not None, dtype=w.dtype)
        out.weight = nn.Parameter(w, requires_grad=False)
        if linears[0].bias is not None:
            out.bias = nn.Parameter(torch.cat([l.bias for l in linears], 0), requires_grad=False)
        return out

    def _normed(self, i: int, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split the packed projection [B,S,(h+2kvh)*d] into q, k, v; q and k RMS-normed per head (Qwen3)."""
        c = self.cfg
        b, s, _ = qkv.shape
        h, kvh, d = c.num_heads, c.num_kv_heads, c.head_dim
        q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
        if self.qk_norm:
            ops = torch.ops.sts_ort
            q = ops.rms_norm(q.reshape(b, s, h, d), self.q_norm[i], self.eps).reshape(b, s, h * d)
            k = ops.rms_norm(k.reshape(b, s, kvh, d), self.k_norm[i], self.eps).reshape(b, s, kvh * d)
        return q, k, v

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c = self.cfg
        b, s, _ = hidden.shape
        h, kvh, d = c.num_heads, c.num_kv_heads, c.head_dim
        deep, image_start, past = (rest[0], rest[1], rest[2:]) if self.taps else (None, None, rest)
        # GroupQueryAttention's rotary reads row ids[b, s] of the tables for token (b, s) and asks for at least
        # total_sequence_length rows: our B*S rows, then as many rows as the cache's length C (>= total in place;
        # P = total - S when concatenating), never read: shapes only, nothing data-dependent
        ang = rope_angles(position_ids, d, c.rope_theta, c.mrope_section, c.mrope_interleaved).reshape(b * s, d // 2)
        ang = torch.cat([ang, ang.new_zeros(past[0].shape[2] if past else 0, d // 2)])  # [B*S + C, d/2]
        cos, sin = ang.cos().to(hidden.dtype), ang.sin().to(hidden.dtype)  # the portable graphs' float32 angles
        ids = torch.arange(b * s, device=hidden.device).view(b, s)  # [B, S]
        query_seqlens = torch.full_like(seqlens_k, s)  # [B] = S: every token's own id is honoured (see ort_ops)
        ops = torch.ops.sts_ort
        x, presents = hidden, []
        n = len(self.qkv)
        y = ops.rms_norm(x, self.in_norm[0], self.eps) if n else x
        for i in range(n):
            if self.rotary == "kernel" and not self.qk_norm:  # GroupQueryAttention rotates packed q and k itself
                o, pk, pv = ops.gqa(self.qkv[i](y), cos, sin, ids, query_seqlens, past[2 * i], past[2 * i + 1],
                                    seqlens_k, total, h, kvh)
            elif self.rotary == "kernel":  # q/k normed apart, then GroupQueryAttention rotates them
                q, k, v = self._normed(i, self.qkv[i](y))
                o, pk, pv = ops.gqa_qkv(q, k, v, cos, sin, ids, query_seqlens, past[2 * i], past[2 * i + 1],
                                        seqlens_k, total, h, kvh)
            else:  # Split, RotaryEmbedding on q and on k, GroupQueryAttention without rotary
                q, k, v = self._normed(i, self.qkv[i](y))
                q, k = ops.rotary(q, ids, cos, sin), ops.rotary(k, ids, cos, sin)
                o, pk, pv = ops.gqa_plain(q, k, v, past[2 * i], past[2 * i + 1], seqlens_k, total, h, kvh)
            presents += [pk, pv]
            y, x = ops.skip_rms_norm(self.o_proj[i](o), x, self.post_norm[i], self.eps)
            m = self.down[i](self.act(self.gate[i](y)) * self.up[i](y))
            if deep is not None and i < self.taps:  # DeepStack: (x + m) + plane i at the image rows, in that order
                x, m = x + m, image_rows(deep[i].to(x.dtype), image_start, s)
            if i + 1 < n:
                y, x = ops.skip_rms_norm(m, x, self.in_norm[i + 1], self.eps)
            elif self.final:  # final norm + lm_head on the last position only
                y, _ = ops.skip_rms_norm(m[:, -1], x[:, -1], self.norm.weight, self.eps)
                return (self.lm_head(y), *presents)
            else:
                x = x + m
        if self.final:  # a final segment without layers (not produced by any budget today)
            return (self.lm_head(ops.rms_norm(x[:, -1], self.norm.weight, self.eps)), *presents)
        return (x, *presents)


def form_io(graph: str, layers: list[int], deepstack: bool = False) -> tuple[list[str], list[str]]:
    inputs, outputs = graph_io(graph, layers, deepstack=deepstack)
    return [*inputs[:2], *CACHE_INPUTS, *inputs[2:]], outputs


def _example(plan: Any, recipe: Any, graph: str, dtype: torch.dtype) -> tuple[tuple, tuple]:
    b, s, p = 2, 5, 3
    t = recipe.text
    batch = Dim("B", min=1, max=256)
    seq = Dim("S", min=1, max=recipe.max_context)
    cap = Dim("C", min=0, max=recipe.max_context)
    layers = plan.segment_layers[graph]
    kv = tuple(torch.randn(b, t.num_kv_heads, p + s + 4, t.head_dim, dtype=dtype) for _ in range(2 * len(layers)))
    pos, pos_shape = example_positions(plan, b, p, s, batch, seq)
    deep, deep_shapes = deepstack_example(graph, plan, recipe, dtype, b, s, batch)  # segment1 of a DeepStack family
    args = (torch.randn(b, s, t.hidden_size, dtype=dtype), pos, torch.full((b,), p + s - 1, dtype=torch.int32),
            torch.tensor(p + s, dtype=torch.int32), *deep, *kv)
    past_shapes = [{0: batch, 2: cap}] * (2 * len(layers))
    shapes = ({0: batch, 1: seq}, pos_shape, {0: batch}, None, (*deep_shapes, *past_shapes))
    return args, shapes


def _fix_cache_dims(path: Path) -> None:
    """present_* have their own length symbol (the capacity when shared, P+S when not); drop traced value_info."""
    m = onnx.load(str(path), load_external_data=False)
    for o in m.graph.output:
        if o.name.startswith("present_"):
            o.type.tensor_type.shape.dim[2].dim_param = "present_length"
    del m.graph.value_info[:]
    onnx.save(m, str(path))


def export_vision_form(vision: nn.Module, plan: Any, recipe: Any, dtype: torch.dtype, path: Path, opset: int) -> list[str]:
    """Write the vision graph's ORT form: the same module and IO, its attention as ONNX Runtime's fused kernels:
    CLIP's as MultiHeadAttention (no head reshapes/transposes, no separate softmax); the Qwen ViT's 2-D rotary as
    RotaryEmbedding on q and k and its attention as MultiHeadAttention (the windows as a batch, the padding as an
    attention_bias). -> the contrib ops it holds ([]: nothing written, the tower has neither)."""
    clip = [m for m in vision.modules() if isinstance(m, ClipAttention)]
    qwen = [m for m in vision.modules() if isinstance(m, QwenVisionAttention)]
    if not clip and not qwen:
        return []
    for a in clip:
        a.attend = torch.ops.sts_ort.mha
    for a in qwen:
        a.rotate, a.attend = torch.ops.sts_ort.rotary, _qwen_attend
    try:
        export_graph(vision, "vision", plan, recipe, dtype, path, opset, translation_table())
    finally:
        for a in clip:
            a.attend = attend_sdpa
        for a in qwen:
            a.rotate = a.attend = None
    return ["com.microsoft.MultiHeadAttention"] + (["com.microsoft.RotaryEmbedding"] if qwen else [])


def _vision_form_ops(path: Path) -> list[str]:
    """The contrib ops a written vision form holds, read off the graph."""
    m = onnx.load(str(path), load_external_data=False)
    return sorted({f"com.microsoft.{n.op_type}" for n in m.graph.node if n.domain == "com.microsoft"})


def export_ort_form(graphs: dict[str, nn.Module], plan: Any, recipe: Any, dtype: torch.dtype, out: Path,
                    opset: int, keys: dict[str, str] | None = None, near: Sequence[tuple[Path, dict]] = (),
                    progress: Callable[[str], None] | None = None, rotary: str = "kernel") -> dict[str, Any]:
    """Write segment1/segment2 and vision (CLIP towers, Qwen ViTs) in the ORT form next to the portable graphs;
    -> the manifest's "ort_form" entry.

    `graphs` are the export's torch modules (their SegmentGraphs' layers are reused, q|k|v packed).
    keys: the graphs' build keys, recorded in their entries; a graph whose key one of the sibling exports `near`
    (`reuse.siblings`) records is copied from it (`export/reuse.py`)."""
    keys = keys or {}
    entry: dict[str, Any] = {}

    def record(g: str, **extra: str) -> None:  # the written file's entry, with its build key
        entry[g] = {**file_entry(out / ort_file(g)), **({"build_key": keys[g]} if g in keys else {}), **extra}

    def copied(g: str) -> bool:  # the sibling's file of the same key, when there is one
        hit = reuse.find(near, keys[g], "ort_form") if g in keys else None
        if hit is not None:
            reuse.copy_into(*hit, out)
            record(g, reused_from=hit[0].name)
            if progress is not None:
                progress(f"ORT form of {g}: copied from the sibling export {hit[0].name}")
        return hit is not None

    vision_ops: list[str] = []
    if not copied("vision"):
        vision_ops = export_vision_form(graphs["vision"], plan, recipe, dtype, out / ort_file("vision"), opset)
        if vision_ops:
            record("vision")
    for g in FORM_GRAPHS:
        if copied(g):
            continue
        fused = FusedSegment(graphs[g], recipe.text, rotary).eval()
        args, shapes = _example(plan, recipe, g, dtype)
        inputs, outputs = form_io(g, plan.segment_layers[g], plan.deepstack > 0)
        path = out / ort_file(g)
        onnx_export(fused, args, shapes, inputs, outputs, path, opset, translation_table())
        del fused
        _fix_cache_dims(path)
        record(g)
    entry["cache"] = {"inputs": list(CACHE_INPUTS), "layout": "BNSH", "share_buffer": True, "form_version": ORT_FORM_VERSION,
                      "rotary": rotary,
                      "ops": ["SimplifiedLayerNormalization", "com.microsoft.SkipSimplifiedLayerNormalization",
                              "com.microsoft.GroupQueryAttention"] + (
                                  ["com.microsoft.RotaryEmbedding"] if rotary == "ops" else [])}
    if "vision" in entry:  # a copied vision form holds what its tower's kernels are
        ops = entry["cache"]["ops"]
        ops += [o for o in vision_ops or _vision_form_ops(out / ort_file("vision")) if o not in ops]
    return entry


def add_ort_form(export_dir: Path, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Add the ORT form to an existing fp32 export (its weights rebuilt from the manifest's model source), checked
    before it is recorded: free-running generations (batch 1 and 2) of the ORT form, in place, against the
    export's portable graphs on ONNX Runtime: identical tokens, keep_pre and keep_post, first-token logits within
    the recipe's fp32 tolerance. -> the manifest's new "ort_form" entry (nothing is written when the check fails)."""
    export_dir = Path(export_dir)
    m = read_manifest(export_dir)
    if m["dtype"] != "fp32" or any(g.get("weights") for g in m["graphs"].values()) or m.get("weights"):
        raise StsError(f"{export_dir}: the ORT form is made for fp32 exports without weight quantization")
    recipe = manifest_recipe(m)
    plan = manifest_plan(m, recipe)
    src = m["model"]
    path = None if src["random_weights"] else ensure_synthetic(recipe) if src.get("synthetic") else Path(src["source"])
    t0 = time.perf_counter()
    model = load_model(Source(recipe, path), torch.float32)
    graphs = build_graphs(model, m["method"], m["budget"], m["anchor"])
    entry = export_ort_form(graphs, plan, recipe, torch.float32, export_dir, m["opset"], rotary=rotary_here())
    del graphs, model
    progress(f"ORT form written in {time.perf_counter() - t0:.1f} s; checking it against the portable graphs ...")
    trial = {**m, "ort_form": entry}
    report: dict[str, Any] = {}
    for batch in (1, 2):
        image, prompt = sample_inputs(export_dir, recipe, batch)
        ref = generate(OrtBackend(export_dir, trial, device="cpu", form="portable"), plan, image, prompt, 8)
        got = generate(OrtBackend(export_dir, trial, device="cpu", form="ort"), plan, image, prompt, 8)
        row = compare_generations(ref, got, recipe.tolerance.fp32)
        row["ok"] = all(row[k] for k in ("tokens_identical", "keep_pre_identical", "keep_post_identical")) and \
            row["first_logits"]["ok"]
        report[f"batch{batch}"] = row
    if not all(r["ok"] for r in report.values()):
        for g in ("vision", *FORM_GRAPHS):
            for f in export_dir.glob(f"{ort_file(g)}*"):
                f.unlink()
        raise StsError(f"the ORT form of {export_dir} disagrees with its portable graphs: {report}")
    entry["validation"] = {"against": "portable graphs on ONNX Runtime", **report}
    write_manifest(export_dir, {**m, "ort_form": entry})
    progress(f"ORT form recorded in {export_dir / 'manifest.json'}")
    return entry
