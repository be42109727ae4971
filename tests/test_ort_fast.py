"""The ORT form of the decoder graphs (fused ONNX Runtime kernels, in-place KV cache) against the portable graphs
and torch: greedy tokens, keep_pre/keep_post, first logits, for every method on the tiny model of every family;
the in-place cache against the concatenating one; the saved optimized sessions.

Per family the ORT-form segments are exported once per prune layer (the recipe's; FastV's) and the loop runs
with the method's vision/embed/prune on torch and the segments on ONNX Runtime, in place and concatenating, so
each method's Stage 2 (gapped position ids, M-RoPE ids) reaches the fused graphs without a full export per
method (test_export.py runs every method's full export in both forms). One full export (shared with
test_export.py when both run) checks the directory path: manifest, portable = ORT form = torch, start-up cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sts_export import Pipeline
from sts_export.backends.onnxruntime import OrtBackend, prefill_chunk
from sts_export.generate import generate
from tests.conftest import make_image

PROMPT = "What is shown in this image?"
METHODS = {  # family's tiny model -> (method, budget) for every method (budgets as test_export.py's)
    "tiny-llava": [("none", "full"), ("sts", 64), ("sts-s", 64), ("fastv", 300), ("divprune", 64)],
    "tiny-llava-next": [("none", "full"), ("sts", 320), ("sts-s", 320), ("fastv", 2000), ("divprune", 320)],
    "tiny-qwen2.5-vl": [("none", "full"), ("sts", "20%"), ("sts-s", "10%"), ("fastv", "60%"), ("divprune", "10%")],
    # q/k RMSNorm before GroupQueryAttention's rotary, interleaved M-RoPE, DeepStack rows per prefill chunk
    "tiny-qwen3-vl": [("none", "full"), ("sts", "20%"), ("sts-s", "10%"), ("fastv", "60%"), ("divprune", "10%")],
}
# (form, in place, prefill chunk): chunks of 16 split every prefill here (pruned ones too: S2 > 16 for every method),
# None runs each prefill as one call
FORMS = [("ort", True, 16), ("ort", False, 16), ("ort", True, None)]
NEW_TOKENS = 8


class Routed:
    """vision/embed/prune on torch (the method's own graphs), segment1/segment2 on an OrtBackend; host arrays
    between the two, OrtValues (KV caches, hidden states) fed back to ONNX Runtime as they are."""

    name = "routed"

    def __init__(self, torch_be: Any, ort_be: OrtBackend) -> None:
        self.torch, self.ort = torch_be, ort_be

    def _np(self, x: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            return x.detach().numpy()
        return self.ort.to_numpy(x)

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        if graph.startswith("segment"):
            return self.ort.run(graph, {k: v if isinstance(v, self.ort.ort.OrtValue) else self._np(v) for k, v in feeds.items()})
        return self.torch.run(graph, {k: torch.from_numpy(np.ascontiguousarray(self._np(v))) for k, v in feeds.items()})

    def kv_cache(self, graph: str, layers: list[int], batch: int, capacity: int) -> Any:
        return self.ort.kv_cache(graph, layers, batch, capacity)

    def from_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def to_numpy(self, x: Any) -> np.ndarray:
        return self._np(x)

    def concat(self, xs: list[Any], axis: int) -> np.ndarray:
        return np.concatenate([self._np(x) for x in xs], axis=axis)


@pytest.fixture(scope="module")
def segments(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(family, prune layer, rotary layout) -> a directory with the ORT form of segment1/segment2 and its
    manifest-like dict."""
    from sts_export.export.ort_form import export_ort_form

    made: dict[tuple[str, int, str], tuple[Path, dict[str, Any]]] = {}

    def get(name: str, pipe: Pipeline, rotary: str = "kernel") -> tuple[Path, dict[str, Any]]:
        key = (name, pipe.plan.prune_layer, rotary)
        if key not in made:
            d = tmp_path_factory.mktemp(f"seg-{name}-{key[1]}-{rotary}")
            graphs, plan, rec = pipe.backend.graphs, pipe.plan, pipe.recipe
            form = export_ort_form(graphs, plan, rec, torch.float32, d, 18, rotary=rotary)
            m = {"recipe": rec.to_dict(), "dtype": "fp32", "ort_form": form,
                 "graphs": {g: {"onnx": f"{g}.onnx"} for g in ("segment1", "segment2")}}
            made[key] = (d, m)
        return made[key]

    return get


def method_pipelines(name: str) -> Any:
    """The family's torch Pipeline per method, all on one loaded model (graphs built per method)."""
    from sts_export.backends.torch import TorchBackend
    from sts_export.artifact.plan import Plan
    from sts_export.graphs import build_graphs

    base = Pipeline.from_pretrained(name, budget="full", method="none")
    for method, budget in METHODS[name]:
        plan = Plan.create(base.recipe, method, budget)
        graphs = build_graphs(base.model, method, budget, base.anchor)
        yield method, budget, Pipeline(base.recipe, TorchBackend(graphs, plan), plan, base.tokenizer, base.anchor,
                                       base.source, base.model)


@pytest.mark.parametrize("name", list(METHODS))
def test_fused_segments_equal_torch_for_every_method(segments: Any, name: str) -> None:
    img = make_image(seed=21)
    for method, budget, pipe in method_pipelines(name):
        image, prompt = pipe.prepare_image(img), pipe.encode(PROMPT)
        ref = generate(pipe.backend, pipe.plan, image, prompt, NEW_TOKENS)
        d, m = segments(name, pipe)
        runs = {}
        for form, inplace, chunk in FORMS:
            be = OrtBackend(d, m, device="cpu", form=form, inplace=inplace)
            assert be.form == form
            be.prefill_chunk = chunk
            runs[(form, inplace, chunk)] = got = generate(Routed(pipe.backend, be), pipe.plan, image, prompt, NEW_TOKENS)
            what = f"{name} {method} b={budget} {form} in_place={inplace} prefill_chunk={chunk}"
            assert got.tokens.tolist() == ref.tokens.tolist(), what
            assert got.keep_pre.tolist() == ref.keep_pre.tolist(), what
            assert (got.keep_post is None) == (ref.keep_post is None), what
            if ref.keep_post is not None:
                assert got.keep_post.tolist() == ref.keep_post.tolist(), what
            assert np.abs(got.first_logits - ref.first_logits).max() <= pipe.recipe.tolerance.fp32, what
            assert (got.s1, got.s2, got.cache_lengths) == (ref.s1, ref.s2, ref.cache_lengths), what
        # in place = concatenating, on the same fused graphs (bit for bit: the same kernels read the same entries)
        a, b = runs[("ort", True, 16)], runs[("ort", False, 16)]
        assert np.array_equal(a.first_logits, b.first_logits) and a.tokens.tolist() == b.tokens.tolist()
        assert ref.s2 > 16, "the chunks must split segment2's prefill too"


@pytest.mark.parametrize("name", list(METHODS))
def test_rotary_ops_layout_equals_torch(segments: Any, name: str) -> None:
    """The ORT form with rotary="ops" (Split + RotaryEmbedding on q and k + GroupQueryAttention without rotary: what
    an export writes with an onnxruntime before 1.32): STS's gapped ids after Stage 2 (and Qwen's M-RoPE ids) give
    torch's tokens, picks and first logits, in one prefill call and in chunks."""
    import onnx

    img = make_image(seed=21)
    method, budget, pipe = next((m, b, p) for m, b, p in method_pipelines(name) if m == "sts")
    image, prompt = pipe.prepare_image(img), pipe.encode(PROMPT)
    ref = generate(pipe.backend, pipe.plan, image, prompt, NEW_TOKENS)
    d, m = segments(name, pipe, "ops")
    assert m["ort_form"]["cache"]["rotary"] == "ops"
    nodes = onnx.load(str(d / "segment2.ort.onnx"), load_external_data=False).graph.node
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert sum(n.op_type == "RotaryEmbedding" for n in nodes) == 2 * len(gqa) > 0
    assert all(len(n.input) <= 7 and all(a.name != "do_rotary" or a.i == 0 for a in n.attribute) for n in gqa)
    for chunk in (None, 16):
        be = OrtBackend(d, m, device="cpu", form="ort")
        be.prefill_chunk = chunk
        got = generate(Routed(pipe.backend, be), pipe.plan, image, prompt, NEW_TOKENS)
        assert got.tokens.tolist() == ref.tokens.tolist() and got.keep_post.tolist() == ref.keep_post.tolist(), chunk
        assert np.abs(got.first_logits - ref.first_logits).max() <= pipe.recipe.tolerance.fp32, chunk
        assert (got.s1, got.s2, got.cache_lengths) == (ref.s1, ref.s2, ref.cache_lengths), chunk


def test_in_place_cache_is_written_in_place(segments: Any) -> None:
    """The ORT form's presents are the preallocated past buffers themselves: no per-step copy, no growth."""
    pipe = Pipeline.from_pretrained("tiny-llava", budget=64, method="sts")
    d, m = segments("tiny-llava", pipe)
    be = OrtBackend(d, m, device="cpu", form="ort")
    cache = be.kv_cache("segment1", pipe.plan.segment_layers["segment1"], 1, 20)
    bufs = dict(cache.kv)
    h = np.random.default_rng(0).standard_normal((1, 5, pipe.recipe.text.hidden_size)).astype(np.float32)
    out = be.run("segment1", {"hidden": h, "position_ids": np.arange(5)[None], **cache.feeds(5)})
    cache.update(out, 5)
    for k, v in bufs.items():
        present = out[k.replace("past_", "present_")]
        assert present.shape() == [1, pipe.recipe.text.num_kv_heads, 20, pipe.recipe.text.head_dim]
        assert present.data_ptr() == v.data_ptr()  # the same memory: written in place
    assert cache.length == 5 and np.abs(bufs[next(iter(bufs))].numpy()[:, :, :5]).sum() > 0
    # a decode step: the same buffers and the same length inputs (rewritten in place, bound once) come back;
    # GroupQueryAttention writes entry 5 only, which it does only if it read the new lengths
    lengths = {k: cache.feeds(0)[k] for k in ("seqlens_k", "total_sequence_length")}
    h1 = np.random.default_rng(1).standard_normal((1, 1, pipe.recipe.text.hidden_size)).astype(np.float32)
    feeds = cache.feeds(1)
    assert all(feeds[k] is v for k, v in lengths.items())
    assert int(feeds["seqlens_k"].numpy()[0]) == 5 and int(feeds["total_sequence_length"].numpy()) == 6
    out = be.run("segment1", {"hidden": h1, "position_ids": np.array([[5]]), **feeds})
    cache.update(out, 1)
    for k, v in bufs.items():
        assert out[k.replace("past_", "present_")] is v  # our own OrtValue, not a new wrapper
        kv = v.numpy()
        assert np.abs(kv[:, :, 5]).sum() > 0 and not kv[:, :, 6:].any()


def test_export_records_validates_and_caches_the_ort_form(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A full export holds the ORT form in its manifest; the pipeline runs it (auto), equal to the portable graphs
    and torch; the second load reads the optimized sessions saved beside the export."""
    from sts_export.pipeline import load_export_pipeline
    from tests.test_export import exported

    from sts_export.artifact.manifest import read_manifest

    d = exported(tmp_path_factory.mktemp("exports"), "tiny-llava", "none", "full")  # test_export.py's too
    m = read_manifest(d)
    assert set(m["ort_form"]) >= {"vision", "segment1", "segment2", "cache"}
    img = make_image(seed=21)
    ref = Pipeline.from_pretrained("tiny-llava", budget="full", method="none").generate(img, PROMPT, max_new_tokens=NEW_TOKENS)
    portable = load_export_pipeline(d, backend="onnxruntime", device="cpu", form="portable")
    fused = load_export_pipeline(d, backend="onnxruntime", device="cpu")
    assert fused.backend.form == "ort" and portable.backend.form == "portable"
    a, b = portable.generate(img, PROMPT, max_new_tokens=NEW_TOKENS), fused.generate(img, PROMPT, max_new_tokens=NEW_TOKENS)
    assert a.tokens.tolist() == b.tokens.tolist() == ref.tokens.tolist()
    assert a.keep_pre.tolist() == b.keep_pre.tolist() == ref.keep_pre.tolist() and a.keep_post is b.keep_post is None
    saved = sorted(p.name for p in (d / "ort_cache").glob("*.onnx"))
    assert any(n.startswith("segment1.ort.") for n in saved) and any(n.startswith("vision.ort.") for n in saved)
    again = load_export_pipeline(d, backend="onnxruntime", device="cpu")
    c = again.generate(img, PROMPT, max_new_tokens=NEW_TOKENS)
    assert c.tokens.tolist() == b.tokens.tolist() and np.array_equal(c.first_logits, b.first_logits)
    assert sorted(p.name for p in (d / "ort_cache").glob("*.onnx")) == saved  # read, not written again


_LOAD = """
import json, sys
from sts_export.pipeline import load_export_pipeline
from tests.conftest import make_image
p = load_export_pipeline(sys.argv[1], backend="onnxruntime", device="cpu")
r = p.generate(make_image(seed=21), "What is shown in this image?", max_new_tokens=4)
print(json.dumps({"tokens": r.tokens.tolist(), "form": p.backend.form}))
"""


def test_session_cache_survives_loads_at_once(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two processes that load one export at once with no saved sessions both run, leave one complete optimized
    copy per graph and no temporary directory; a third load reads those copies and gives the same tokens."""
    import json
    import shutil
    import subprocess
    import sys

    from tests.test_export import exported

    src = exported(tmp_path_factory.mktemp("exports"), "tiny-llava", "none", "full")  # test_export.py's too
    d = tmp_path_factory.mktemp("racing") / "export"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("ort_cache"))
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD, str(d)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    cache = d / "ort_cache"
    names = sorted(p.name for p in cache.iterdir())
    assert not [n for n in names if ".tmp-" in n], names  # every process removed its own temporary directory
    graphs = [n for n in names if n.endswith(".onnx")]
    stems = [n.rsplit(".", 2)[0] for n in graphs]  # embed.<digest>.onnx -> embed, vision.ort.<digest>...
    assert len(stems) == len(set(stems)) and {"vision.ort", "embed", "segment1.ort", "segment2.ort"} <= set(stems), names
    for n in graphs:  # each saved graph loads on its own (its data file, if any, is complete beside it)
        import onnxruntime as ort

        ort.InferenceSession(str(cache / n), providers=["CPUExecutionProvider"])
    before = {n: (cache / n).stat().st_mtime_ns for n in names}
    third = subprocess.run([sys.executable, "-c", _LOAD, str(d)], cwd=root, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert json.loads(third.stdout.strip().splitlines()[-1]) == results[0] == results[1]
    assert results[0]["form"] == "ort"
    assert {n: (cache / n).stat().st_mtime_ns for n in sorted(p.name for p in cache.iterdir())} == before  # read only


def test_bad_tuning_variables_are_one_line(segments: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """STS_ORT_SPIN and STS_ORT_PREFILL_CHUNK with a value they do not take: a one-line error, no traceback."""
    from sts_export.errors import StsError

    pipe = Pipeline.from_pretrained("tiny-llava", budget=64, method="sts")
    d, m = segments("tiny-llava", pipe)
    monkeypatch.setenv("STS_ORT_SPIN", "sometimes")
    with pytest.raises(StsError, match="STS_ORT_SPIN must be one of run, 0, 1"):
        OrtBackend(d, m, device="cpu").session("segment1")
    monkeypatch.setenv("STS_ORT_SPIN", "run")
    monkeypatch.setenv("STS_ORT_PREFILL_CHUNK", "-4")
    with pytest.raises(StsError, match="STS_ORT_PREFILL_CHUNK must be a whole number"):
        OrtBackend(d, m, device="cpu")
    monkeypatch.setenv("STS_ORT_PREFILL_CHUNK", "0")
    assert OrtBackend(d, m, device="cpu").prefill_chunk is None
    monkeypatch.setenv("STS_ORT_PREFILL_CHUNK", "48")
    assert OrtBackend(d, m, device="cpu").prefill_chunk == 48
    monkeypatch.delenv("STS_ORT_PREFILL_CHUNK")  # unset: the size follows the decoder's heads
    be = OrtBackend(d, m, device="cpu")
    assert be.text["head_dim"] == 16 and be.prefill_chunk == prefill_chunk(16) == 256
    assert prefill_chunk(128) == 512


def _gqa_session(with_query_seqlens: bool, heads: int, kv_heads: int, d: int) -> Any:
    """One GroupQueryAttention node as the ORT form calls it: packed q|k|v, rotary inside from per-token tables."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as H

    f = lambda n, s: H.make_tensor_value_info(n, T.FLOAT, s)  # noqa: E731
    i = lambda n, s, t=T.INT32: H.make_tensor_value_info(n, t, s)  # noqa: E731
    ins = [f("qkv", [1, "S", (heads + 2 * kv_heads) * d]), f("pk", [1, kv_heads, "C", d]), f("pv", [1, kv_heads, "C", d]),
           i("sk", [1]), i("tot", []), f("cos", ["R", d // 2]), f("sin", ["R", d // 2]), i("ids", [1, "S"], T.INT64)]
    names = ["qkv", "", "", "pk", "pv", "sk", "tot", "cos", "sin", "ids"]
    if with_query_seqlens:
        ins.append(i("qs", [1]))
        names += ["", "", "", "", "", "", "qs"]
    node = H.make_node("GroupQueryAttention", names, ["o", "ck", "cv"], domain="com.microsoft", num_heads=heads,
                       kv_num_heads=kv_heads, do_rotary=1)
    g = H.make_graph([node], "g", ins, [f("o", None), f("ck", None), f("cv", None)])
    m = H.make_model(g, opset_imports=[H.make_opsetid("", 18), H.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def test_gqa_rotary_honours_gapped_ids() -> None:
    """What the ORT form relies on: with query_seqlens given, GroupQueryAttention's own rotary rotates every token
    at its own position_ids entry (here Stage 2's gapped ids) - in a first prompt, a later chunk and decode steps -
    as a plain numpy RoPE + causal attention does. Without query_seqlens a first prompt reads only the first id and
    counts on from it, so the form always passes query_seqlens (its ids index per-token rows, per batch row)."""
    import onnxruntime as ort

    heads, kv_heads, d, cap = 4, 2, 16, 32
    inv = 1.0 / 10000 ** (np.arange(0, d, 2) / d)
    chunks = [np.array([0, 1, 2, 7, 9]), np.array([11, 12, 20]), np.array([25]), np.array([26])]  # Stage 2's gaps

    def rope(x: np.ndarray, pos: np.ndarray) -> np.ndarray:  # x [S, n, d]
        c, s = np.cos(pos[:, None] * inv)[:, None], np.sin(pos[:, None] * inv)[:, None]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def reference(qkv: np.ndarray, pos: np.ndarray) -> np.ndarray:  # every token so far, causal
        q = rope(qkv[:, : heads * d].reshape(-1, heads, d), pos)
        k = np.repeat(rope(qkv[:, heads * d: (heads + kv_heads) * d].reshape(-1, kv_heads, d), pos), heads // kv_heads, 1)
        v = np.repeat(qkv[:, (heads + kv_heads) * d:].reshape(-1, kv_heads, d), heads // kv_heads, 1)
        n = len(pos)
        sc = np.einsum("shd,thd->hst", q, k) / np.sqrt(d) + np.triu(np.full((n, n), -1e30), 1)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        return np.einsum("hst,thd->shd", p / p.sum(-1, keepdims=True), v).reshape(n, heads * d)

    worst = {}
    for with_qs in (True, False):
        sess, rng = _gqa_session(with_qs, heads, kv_heads, d), np.random.default_rng(0)
        pk = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv_heads, cap, d), np.float32))
        pv = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv_heads, cap, d), np.float32))
        seen_qkv, seen_pos, errs = [], [], []
        for pos in chunks:
            qkv = rng.standard_normal((len(pos), (heads + 2 * kv_heads) * d)).astype(np.float32)
            seen_qkv.append(qkv)
            seen_pos.append(pos)
            total = sum(len(p) for p in seen_pos)
            angles = np.arange(cap)[:, None] * inv  # a table of every id; the ids index it
            io = sess.io_binding()
            feeds = {"qkv": qkv[None], "sk": np.array([total - 1], np.int32), "tot": np.array(total, np.int32),
                     "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
                     "ids": pos[None].astype(np.int64)}
            if with_qs:
                feeds["qs"] = np.array([len(pos)], np.int32)
            for k, v in feeds.items():
                io.bind_cpu_input(k, v)
            io.bind_ortvalue_input("pk", pk)
            io.bind_ortvalue_input("pv", pv)
            io.bind_output("o")
            io.bind_ortvalue_output("ck", pk)
            io.bind_ortvalue_output("cv", pv)
            sess.run_with_iobinding(io)
            want = reference(np.concatenate(seen_qkv), np.concatenate(seen_pos))[-len(pos):]
            errs.append(float(np.abs(io.get_outputs()[0].numpy()[0] - want).max()))
        worst[with_qs] = errs
    assert max(worst[True]) < 1e-5, worst[True]
    assert worst[False][0] > 1e-2, worst[False]  # the first prompt's gapped ids are lost without query_seqlens


def test_older_ort_form_is_left_unused(segments: Any) -> None:
    """An export whose ORT form has an older layout (version 1: RotaryEmbedding ops) runs its portable graphs under
    form="auto"; form="ort" names the command that writes the current form; bench.py does not reuse it."""
    import copy

    from sts_export.errors import StsError
    from sts_export.artifact.manifest import ORT_FORM_VERSION, ort_form_is_current

    pipe = Pipeline.from_pretrained("tiny-llava", budget=64, method="sts")
    d, m = segments("tiny-llava", pipe)
    assert ort_form_is_current(m) and OrtBackend(d, m, device="cpu").form == "ort"
    old = copy.deepcopy(m)
    old["ort_form"]["cache"]["form_version"] = ORT_FORM_VERSION - 1
    assert not ort_form_is_current(old)
    assert OrtBackend(d, old, device="cpu").form == "portable"
    with pytest.raises(StsError, match="older ORT form.*sts ort-form"):
        OrtBackend(d, old, device="cpu", form="ort")


def test_onnxruntime_without_query_seqlens_runs_portable_segments(segments: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An onnxruntime whose GroupQueryAttention lacks query_seqlens (before 1.32) cannot load a form with rotary
    "kernel": form="auto" runs the portable segments, form="ort" says why in one line. The installed onnxruntime
    (the suite's) has it: every other ORT-form test runs the fused segments."""
    import sts_export.backends.onnxruntime as ob
    from sts_export.errors import StsError

    assert ob.gqa_takes_query_seqlens()
    pipe = Pipeline.from_pretrained("tiny-llava", budget=64, method="sts")
    d, m = segments("tiny-llava", pipe)
    monkeypatch.setattr(ob, "gqa_takes_query_seqlens", lambda: False)
    be = OrtBackend(d, m, device="cpu")
    assert be.form == "portable" and not be.form_graphs & {"segment1", "segment2"}
    with pytest.raises(StsError, match=r"needs onnxruntime 1\.32 or newer.*form 'portable'"):
        OrtBackend(d, m, device="cpu", form="ort")
    # the form such an onnxruntime exports (rotary as RotaryEmbedding ops) loads; prefill runs unchunked there
    # (GroupQueryAttention before 1.32 takes no batch of several rows with a past)
    d2, m2 = segments("tiny-llava", pipe, "ops")
    be = OrtBackend(d2, m2, device="cpu")
    assert be.form == "ort" and be.prefill_chunk is None


def test_device_cuda_without_the_cuda_provider_says_what_to_do(segments: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda where onnxruntime has no CUDA provider: one line; when onnxruntime-gpu is installed beside the
    CPU build (which then decides the providers), the line says to keep onnxruntime-gpu alone."""
    from importlib import metadata

    from sts_export.errors import StsError

    pipe = Pipeline.from_pretrained("tiny-llava", budget=64, method="sts")
    d, m = segments("tiny-llava", pipe)
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])

    def dists(*names: str) -> Any:
        def version(dist: str) -> str:
            if dist not in names:
                raise metadata.PackageNotFoundError(dist)
            return "1.31.1"
        return version

    monkeypatch.setattr(metadata, "version", dists("onnxruntime"))
    with pytest.raises(StsError, match="CUDA provider of onnxruntime is not available; pip install onnxruntime-gpu"):
        OrtBackend(d, m, device="cuda")
    monkeypatch.setattr(metadata, "version", dists("onnxruntime", "onnxruntime-gpu"))
    with pytest.raises(StsError, match="both installed.*pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"):
        OrtBackend(d, m, device="cuda")


def test_batch_of_two_in_prefill_chunks(segments: Any) -> None:
    """Two images at once with the prefill in chunks (each chunk appends to a cache that already holds the ones
    before it): tokens and picks equal torch's for both rows. The form passes query_seqlens, under which
    GroupQueryAttention takes batched multi-token chunks with a past (without it: 'batch_size must be 1 when
    sequence_length > 1 and past context is given', the version-1 form's failure on prompts over 256 tokens)."""
    pipe = Pipeline.from_pretrained("tiny-llava", budget=64, method="sts")
    image = pipe.prepare_image([make_image(seed=21), make_image(seed=5)])
    prompt = pipe.encode(PROMPT)
    ref = generate(pipe.backend, pipe.plan, image, prompt, NEW_TOKENS)
    d, m = segments("tiny-llava", pipe)
    be = OrtBackend(d, m, device="cpu", form="ort")
    be.prefill_chunk = 16
    got = generate(Routed(pipe.backend, be), pipe.plan, image, prompt, NEW_TOKENS)
    assert ref.tokens.shape[0] == 2 and ref.s2 > 16  # both segments' prefills are chunked
    assert got.tokens.tolist() == ref.tokens.tolist()
    assert got.keep_pre.tolist() == ref.keep_pre.tolist() and got.keep_post.tolist() == ref.keep_post.tolist()
    assert np.abs(got.first_logits - ref.first_logits).max() <= pipe.recipe.tolerance.fp32
