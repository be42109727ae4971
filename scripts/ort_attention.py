#!/usr/bin/env python
"""Causal prefill attention of one decoder layer on ONNX Runtime's CPU kernels against torch's sdpa, and
GroupQueryAttention run in prefill chunks on a shared past/present buffer (what the ORT form's chunked prefill
does, `generate.run_segment`), plain MatMul + Softmax per chunk, and non-causal MultiHeadAttention (MLAS's flash
kernel, which has no causal mode) for scale. Random q/k/v; medians of --repeats after one warm-up; every causal
variant's output is compared with GQA in one call.

    python scripts/ort_attention.py [--seq 2964] [--heads 32] [--head-dim 16] [--threads 2] [--chunks 1024,512,256,128,64]

Defaults: llava-next-7b-cpu's layer at full budget (S1 = 2964, 32 heads of 16).
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import numpy as np


def _session(ort: Any, nodes: Any, inputs: list, outputs: list, opsets: list[tuple[str, int]], threads: int,
             initializers: tuple = ()) -> Any:
    """A CPU session of one node (or a list of nodes) with `threads` intra-op threads, spinning off."""
    from onnx import helper

    g = helper.make_graph(nodes if isinstance(nodes, list) else [nodes], "g", inputs, outputs,
                          initializer=list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])


def _median_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3, out


def main() -> None:
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2964)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunks", default="1024,512,256,128,64")
    a = ap.parse_args()
    s, h, d = a.seq, a.heads, a.head_dim
    torch.set_num_threads(a.threads)
    f = TensorProto.FLOAT

    def vi(name: str, shape: list) -> Any:
        return helper.make_tensor_value_info(name, f, shape)

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, s, h * d), dtype=np.float32) for _ in range(3))
    gqa = _session(ort, helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "tot"],
                                         ["o", "prk", "prv"], domain="com.microsoft", num_heads=h, kv_num_heads=h),
                   [vi("q", [1, "s", h * d]), vi("k", [1, "s", h * d]), vi("v", [1, "s", h * d]),
                    vi("pk", [1, h, "c", d]), vi("pv", [1, h, "c", d]),
                    helper.make_tensor_value_info("sl", TensorProto.INT32, [1]),
                    helper.make_tensor_value_info("tot", TensorProto.INT32, [])],
                   [vi("o", [1, "s", h * d]), vi("prk", [1, h, "c2", d]), vi("prv", [1, h, "c2", d])],
                   [("", 18), ("com.microsoft", 1)], a.threads)

    def gqa_chunked(chunk: int) -> np.ndarray:
        pk = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, h, s, d), np.float32))
        pv = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, h, s, d), np.float32))
        outs = []
        for lo in range(0, s, chunk):
            hi = min(s, lo + chunk)
            io = gqa.io_binding()
            for name, x in (("q", q), ("k", k), ("v", v)):
                io.bind_cpu_input(name, np.ascontiguousarray(x[:, lo:hi]))
            io.bind_ortvalue_input("pk", pk)
            io.bind_ortvalue_input("pv", pv)
            io.bind_cpu_input("sl", np.array([hi - 1], np.int32))
            io.bind_cpu_input("tot", np.array(hi, np.int32))
            io.bind_output("o")
            io.bind_ortvalue_output("prk", pk)
            io.bind_ortvalue_output("prv", pv)
            gqa.run_with_iobinding(io)
            outs.append(io.get_outputs()[0].numpy())
        return np.concatenate(outs, 1)

    three = [vi("q", [1, "s", h * d]), vi("k", [1, "s", h * d]), vi("v", [1, "s", h * d])]
    a23 = _session(ort, helper.make_node("Attention", ["q", "k", "v"], ["o"], is_causal=1, q_num_heads=h,
                                         kv_num_heads=h), three, [vi("o", [1, "s", h * d])], [("", 23)], a.threads)
    mha = _session(ort, helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft",
                                         num_heads=h, unidirectional=1), three, [vi("o", [1, "s", h * d])],
                   [("", 18), ("com.microsoft", 1)], a.threads)
    full = _session(ort, helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft",
                                          num_heads=h), three, [vi("o", [1, "s", h * d])],
                    [("", 18), ("com.microsoft", 1)], a.threads)
    # plain ops on one chunk of rows: q [1,c,h*d], k/v [1,t,h*d], mask [c,t] (0 / -inf) -> o [1,c,h*d]
    i64 = TensorProto.INT64
    consts = [helper.make_tensor("heads", i64, [4], [1, -1, h, d]), helper.make_tensor("flat", i64, [3], [1, -1, h * d]),
              helper.make_tensor("scale", f, [], [d ** -0.5])]
    ops = [helper.make_node("Reshape", ["q", "heads"], ["q4"]), helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
           helper.make_node("Reshape", ["k", "heads"], ["k4"]), helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 3, 1]),
           helper.make_node("Reshape", ["v", "heads"], ["v4"]), helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
           helper.make_node("MatMul", ["qh", "kh"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s1"]),
           helper.make_node("Add", ["s1", "mask"], ["s2"]), helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
           helper.make_node("MatMul", ["p", "vh"], ["oh"]), helper.make_node("Transpose", ["oh"], ["o4"], perm=[0, 2, 1, 3]),
           helper.make_node("Reshape", ["o4", "flat"], ["o"])]
    plain = _session(ort, ops, [vi("q", [1, "c", h * d]), vi("k", [1, "t", h * d]), vi("v", [1, "t", h * d]),
                                vi("mask", ["c", "t"])], [vi("o", [1, "c", h * d])], [("", 18)], a.threads, consts)

    def plain_chunked(chunk: int) -> np.ndarray:
        outs = []
        for lo in range(0, s, chunk):
            hi = min(s, lo + chunk)
            mask = np.zeros((hi - lo, hi), np.float32)
            mask[:, lo:] = np.triu(np.full((hi - lo, hi - lo), -np.inf, np.float32), 1)
            outs.append(plain.run(None, {"q": q[:, lo:hi], "k": k[:, :hi], "v": v[:, :hi], "mask": mask})[0])
        return np.concatenate(outs, 1)

    qt, kt, vt = (torch.from_numpy(x).view(1, s, h, d).transpose(1, 2) for x in (q, k, v))

    def sdpa() -> np.ndarray:
        o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        return o.transpose(1, 2).reshape(1, s, h * d).numpy()

    print(f"causal attention, S={s}, {h} heads x {d}, {a.threads} threads, median of {a.repeats}")
    ms, ref = _median_ms(lambda: gqa_chunked(s), a.repeats)
    print(f"  {'ORT GroupQueryAttention, one call':46s} {ms:8.1f} ms")
    rows = [(f"ORT GroupQueryAttention, chunks of {c}", lambda c=c: gqa_chunked(c)) for c in map(int, a.chunks.split(","))]
    rows += [("ORT ai.onnx Attention-23 (is_causal)", lambda: a23.run(None, {"q": q, "k": k, "v": v})[0]),
             ("ORT MultiHeadAttention (unidirectional)", lambda: mha.run(None, {"q": q, "k": k, "v": v})[0]),
             ("torch sdpa (is_causal)", sdpa)]
    rows += [(f"ORT MatMul + Softmax, chunks of {c}", lambda c=c: plain_chunked(c)) for c in (512, 128)]
    print(f"  {'ORT MultiHeadAttention, NOT causal (MLAS flash)':46s} "
          f"{_median_ms(lambda: full.run(None, {'q': q, 'k': k, 'v': v})[0], a.repeats)[0]:8.1f} ms   "
          "(the whole S x S: twice a causal pass's work, not a causal result)")
    for name, fn in rows:
        ms, out = _median_ms(fn, a.repeats)
        print(f"  {name:46s} {ms:8.1f} ms   max |diff| vs one GQA call {np.abs(out - ref).max():.1e}")


if __name__ == "__main__":
    main()
