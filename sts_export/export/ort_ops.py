"""onnxscript translations of `ort_form`'s custom ops to ONNX Runtime's kernels (imported only when exporting;
onnxscript resolves a script's annotations in module globals, hence a module of its own)."""
from typing import TypeVar, Union

from onnxscript import FLOAT, FLOAT16, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

ms = Opset("com.microsoft", 1)
T = TypeVar("T", bound=Union[FLOAT, FLOAT16])  # the exporter reads each function's outputs off its return annotation


@script(default_opset=op)
def ort_rms_norm(x: T, weight: T, eps: float) -> T:
    y = op.SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)
    return y


@script(default_opset=op)
def ort_skip_rms_norm(x: T, skip: T, weight: T, eps: float) -> tuple[T, T]:
    out, _mean, _inv, total = ms.SkipSimplifiedLayerNormalization(x, skip, weight, epsilon=eps)
    return out, total


@script(default_opset=op)
def ort_gqa(qkv: T, cos: T, sin: T, ids, query_seqlens, past_k: T, past_v: T, seqlens_k, total, num_heads: int,
            kv_num_heads: int) -> tuple[T, T, T]:
    # GroupQueryAttention rotates q and k itself, token (b, s) at row ids[b, s] of cos/sin (our per-token tables).
    # With query_seqlens given the kernel takes every token's own id in every case; without it a first prompt
    # reads only the first id.
    o, pk, pv = ms.GroupQueryAttention(qkv, None, None, past_k, past_v, seqlens_k, total, cos, sin, ids,
                                       None, None, None, None, None, None, query_seqlens,
                                       num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=1)
    return o, pk, pv


@script(default_opset=op)
def ort_gqa_qkv(q: T, k: T, v: T, cos: T, sin: T, ids, query_seqlens, past_k: T, past_v: T, seqlens_k, total,
                num_heads: int, kv_num_heads: int) -> tuple[T, T, T]:
    # as ort_gqa, with the query, key and value apart (q/k RMSNorm ran on them)
    o, pk, pv = ms.GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, ids,
                                       None, None, None, None, None, None, query_seqlens,
                                       num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=1)
    return o, pk, pv


@script(default_opset=op)
def ort_rotary(x: T, ids, cos: T, sin: T) -> T:
    y = ms.RotaryEmbedding(x, ids, cos, sin)
    return y


@script(default_opset=op)
def ort_gqa_plain(q: T, k: T, v: T, past_k: T, past_v: T, seqlens_k, total, num_heads: int, kv_num_heads: int
                  ) -> tuple[T, T, T]:
    o, pk, pv = ms.GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total,
                                       num_heads=num_heads, kv_num_heads=kv_num_heads)
    return o, pk, pv


@script(default_opset=op)
def ort_mha(q: T, k: T, v: T, num_heads: int) -> T:
    o = ms.MultiHeadAttention(q, k, v, num_heads=num_heads)
    return o


@script(default_opset=op)
def ort_mha_bias(q: T, k: T, v: T, bias: T, num_heads: int) -> T:
    o = ms.MultiHeadAttention(q, k, v, None, None, bias, num_heads=num_heads)
    return o


TRANSLATIONS = {"rms_norm": ort_rms_norm, "skip_rms_norm": ort_skip_rms_norm, "gqa": ort_gqa, "gqa_qkv": ort_gqa_qkv,
                "mha": ort_mha, "mha_bias": ort_mha_bias, "rotary": ort_rotary, "gqa_plain": ort_gqa_plain}
