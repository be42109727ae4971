"""Static TensorRT checks (no TensorRT needed): the op table, planted incompatibilities, profiles, error lines."""
from __future__ import annotations

import builtins
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sts_export.backends.tensorrt import build as trt_build
from sts_export.backends.tensorrt import check as trt_check
from sts_export.backends.tensorrt import runtime as trt_runtime
from sts_export.errors import StsError

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _model(nodes: list, inputs: list, outputs: list, inits: list = (), opset: int = 17,
           domains: tuple = ()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=ops, ir_version=9)


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _loop_body(grow: bool) -> onnx.GraphProto:
    """Body carrying r [1, 8] (float) and picked [1] (int64); `grow` makes picked change shape every iteration."""
    nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        helper.make_node("ArgMin", ["r_in"], ["pick"], axis=1, keepdims=0, name="body_argmin"),
        helper.make_node("Add", ["r_in", "one_f"], ["r_out"], name="body_add"),
    ]
    if grow:
        nodes.append(helper.make_node("Concat", ["picked_in", "pick"], ["picked_out"], axis=0, name="body_concat"))
        picked_out = helper.make_tensor_value_info("picked_out", INT64, None)
    else:
        nodes.append(helper.make_node("Max", ["picked_in", "pick"], ["picked_out"], name="body_max"))
        picked_out = helper.make_tensor_value_info("picked_out", INT64, [1])
    return helper.make_graph(
        nodes, "body",
        [helper.make_tensor_value_info("i", INT64, []), helper.make_tensor_value_info("cond_in", BOOL, []),
         helper.make_tensor_value_info("r_in", FLOAT, [1, 8]), helper.make_tensor_value_info("picked_in", INT64, [1])],
        [helper.make_tensor_value_info("cond_out", BOOL, []), helper.make_tensor_value_info("r_out", FLOAT, [1, 8]),
         picked_out],
        initializer=[_const("one_f", np.ones((1, 8), np.float32))],
    )


def _compatible() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["scores"], name="stage1/matmul"),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("TopK", ["probs", "k"], ["vals", "idx"], axis=-1, name="topk"),
        helper.make_node("Gather", ["probs", "idx0"], ["row"], axis=1, name="gather"),
        helper.make_node("ArgMin", ["probs"], ["amin"], axis=-1, keepdims=0, name="argmin"),
        helper.make_node("Loop", ["trip", "cond", "r0", "picked0"], ["r_final", "picked_final"], body=_loop_body(False),
                         name="stage1/loop"),
    ]
    inits = [_const("w", np.ones((64, 64), np.float32)), _const("k", np.array([32], np.int64)),
             _const("idx0", np.array([0, 1], np.int64)), _const("trip", np.array(5, np.int64)),
             _const("cond", np.array(True)), _const("r0", np.zeros((1, 8), np.float32)),
             _const("picked0", np.zeros(1, np.int64))]
    return _model(nodes, [helper.make_tensor_value_info("x", FLOAT, ["B", 64])],
                  [helper.make_tensor_value_info(n, t, None) for n, t in
                   [("vals", FLOAT), ("idx", INT64), ("row", FLOAT), ("amin", INT64), ("r_final", FLOAT),
                    ("picked_final", INT64)]], inits)


def test_compatible_graph_passes() -> None:
    rep = trt_check.check_model(_compatible())
    assert rep.ok, rep.format()
    assert rep.problems == []
    assert rep.op_counts["Loop"] == 1 and rep.op_counts["ArgMin"] == 2  # body nodes are walked too
    assert "OK" in rep.format()


def _one(model: onnx.ModelProto, **kw) -> list[str]:
    rep = trt_check.check_model(model, **kw)
    assert not rep.ok
    for line in rep.problems:  # "graph:node(op): what", one line each
        assert "\n" not in line and line.count(":") >= 2
    return rep.problems


def test_custom_domain_op() -> None:
    m = _model([helper.make_node("FancyAttention", ["x"], ["y"], domain="com.example", name="attn")],
               [helper.make_tensor_value_info("x", FLOAT, [2])], [helper.make_tensor_value_info("y", FLOAT, [2])],
               domains=("com.example",))
    (line,) = _one(m)
    assert line.startswith("g:attn(FancyAttention):") and "plugin" in line and "com.example" in line


def test_unsupported_op_from_table() -> None:
    # Compress is listed "N" in onnx-tensorrt's operators.md (data-dependent output shape).
    m = _model([helper.make_node("Compress", ["x", "mask"], ["y"], axis=0, name="compress")],
               [helper.make_tensor_value_info("x", FLOAT, [4]), helper.make_tensor_value_info("mask", BOOL, [4])],
               [helper.make_tensor_value_info("y", FLOAT, None)])
    (line,) = _one(m)
    assert line.startswith("g:compress(Compress):") and "unsupported" in line


def test_op_missing_from_old_table_but_in_new() -> None:
    m = _model([helper.make_node("Attention", ["q", "k", "v"], ["y"], name="sdpa")],
               [helper.make_tensor_value_info(n, FLOAT, [1, 2, 4, 8]) for n in "qkv"],
               [helper.make_tensor_value_info("y", FLOAT, None)], opset=23)
    (line,) = _one(m, trt_version="10.3")
    assert "not in the TensorRT 10.3" in line
    assert trt_check.check_model(m, trt_version="10.14").ok


def _attention(q_shape: list = (1, 2, 4, 8), extra_inputs: int = 0, extra_outputs: int = 0, **attrs) -> onnx.ModelProto:
    names = ["q", "k", "v", "", "pk", "pv"][: 3 + extra_inputs]
    outs = ["y", "present_key"][: 1 + extra_outputs]
    inputs = [helper.make_tensor_value_info("q", FLOAT, list(q_shape))]
    inputs += [helper.make_tensor_value_info(n, FLOAT, [1, 2, 4, 8]) for n in ("k", "v", "pk", "pv")[: 2 + extra_inputs]]
    return _model([helper.make_node("Attention", names, outs, name="sdpa", **attrs)], inputs,
                  [helper.make_tensor_value_info(o, FLOAT, None) for o in outs], opset=23)


def test_attention_limits_from_10_14() -> None:
    assert trt_check.check_model(_attention(), trt_version="11.4").ok
    (line,) = _one(_attention(q_shape=[2, 4, 8]), trt_version="11.4")  # 3-D Q: heads folded the ONNX way
    assert "`Q` is 3-D" in line and "4-D" in line
    lines = _one(_attention(extra_inputs=3, extra_outputs=1, softcap=1.0), trt_version="10.16")
    assert any("`past_key`" in l for l in lines) and any("`present_key`" in l for l in lines)
    assert any("`softcap`" in l for l in lines)


def test_rows_of_10_15_and_11_x() -> None:
    rope = _model([helper.make_node("RotaryEmbedding", ["x", "c", "s", "pos"], ["y"], name="rope")],
                  [helper.make_tensor_value_info("x", FLOAT, [1, 2, 4, 8]),
                   helper.make_tensor_value_info("c", FLOAT, [4, 4]), helper.make_tensor_value_info("s", FLOAT, [4, 4]),
                   helper.make_tensor_value_info("pos", TensorProto.INT32, [1, 4])],
                  [helper.make_tensor_value_info("y", FLOAT, None)], opset=23)
    assert "not in the TensorRT 10.14" in _one(rope, trt_version="10.14")[0]
    assert "INT64 position ids" in _one(rope, trt_version="10.15")[0]
    swish = _model([helper.make_node("Swish", ["x"], ["y"], name="swish")],
                   [helper.make_tensor_value_info("x", FLOAT, [4])], [helper.make_tensor_value_info("y", FLOAT, None)],
                   opset=24)
    assert not trt_check.check_model(swish, trt_version="10.16").ok  # 11.0 parser release note: Swish added
    assert trt_check.check_model(swish, trt_version="11.0").ok
    dft = _model([helper.make_node("DFT", ["x"], ["y"], name="dft")],
                 [helper.make_tensor_value_info("x", FLOAT, [1, 8, 1])],
                 [helper.make_tensor_value_info("y", FLOAT, None)], opset=20)
    assert "unsupported" in _one(dft, trt_version="11.1")[0] and trt_check.check_model(dft, trt_version="11.2").ok
    assert [trt_check.max_opset(v) for v in ("10.3", "10.15", "10.16", "11.4", "11.5")] == [20, 24, 24, 24, 25]
    rep = trt_check.check_model(swish, trt_version="11.9")  # past the table: checked, with a warning that says so
    assert rep.ok and any("table ends at TensorRT 11.5" in w for w in rep.warnings)


def _block_dq(elem: int, zero_point: int | None = None) -> onnx.ModelProto:
    inits = [helper.make_tensor("w", elem, [4, 128], [0] * 512), _const("s", np.ones((4, 2), np.float32))]
    ins = ["w", "s"]
    if zero_point is not None:
        inits.append(helper.make_tensor("zp", elem, [4, 2], [zero_point] * 8))
        ins.append("zp")
    return _model([helper.make_node("DequantizeLinear", ins, ["wd"], axis=1, block_size=64, name="dq"),
                   helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")],
                  [helper.make_tensor_value_info("x", FLOAT, [2, 4])], [helper.make_tensor_value_info("y", FLOAT, None)],
                  inits, opset=21)  # w [4, 128] in blocks of 64 along axis 1: scales [4, 2]


def test_blockwise_dequantize_per_release() -> None:
    assert trt_check.check_model(_block_dq(TensorProto.INT4), trt_version="10.3").ok  # INT4 weight-only blocks
    fp8 = _block_dq(TensorProto.FLOAT8E4M3FN)
    (line,) = _one(fp8, trt_version="10.12")
    assert "block-wise (block_size=64) FP8" in line and "INT4 only" in line
    assert trt_check.check_model(fp8, trt_version="10.13").ok
    assert "INT4, FP8, FP4 only" in _one(_block_dq(TensorProto.INT8), trt_version="11.4")[0]
    (line,) = _one(_block_dq(TensorProto.INT4, zero_point=1), trt_version="11.4")
    assert "symmetric" in line
    assert trt_check.check_model(_block_dq(TensorProto.INT4, zero_point=0), trt_version="11.4").ok


@pytest.mark.parametrize("bad", ["abc", "9.0", "8.6", "12.0", "10.3.1.2.3.4", "11.x", "10", "", "10.3,", " ,10.3"])
def test_bad_versions_are_one_line(bad: str) -> None:
    with pytest.raises(trt_check.VersionError) as e:
        trt_check.parse_versions(bad)
    assert "\n" not in str(e.value) and isinstance(e.value, StsError) and isinstance(e.value, ValueError)


def test_versions_parse_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert trt_check.parse_versions("10.3,10.16,11.4,10.3") == ["10.3", "10.16", "11.4"]
    assert trt_check.parse_version("10.3.0.26") == (10, 3) and trt_check.parse_version("11.4.1") == (11, 4)
    monkeypatch.setitem(trt_build._TRT_CACHE, "mod", None)  # no TensorRT here: JetPack 6.1/6.2's 10.3
    assert trt_check.default_version() == "10.3"
    monkeypatch.setitem(trt_build._TRT_CACHE, "mod", type("trt", (), {"__version__": "10.16.1.11"}))
    assert trt_check.default_version() == "10.16"  # a Jetson on JetPack 7.2 checks against its own TensorRT


def test_check_main_one_verdict_per_version(tmp_path, capsys: pytest.CaptureFixture) -> None:
    onnx.save(_attention(), str(tmp_path / "attn.onnx"))
    assert trt_check.main([str(tmp_path), "--trt-version", "10.3,11.4"]) == 1
    out = capsys.readouterr().out
    assert "TensorRT 10.3 compatibility: FAIL" in out and "TensorRT 11.4 compatibility: PASS" in out
    assert "op 'Attention' is not in the TensorRT 10.3 ONNX parser's support table" in out
    with pytest.raises(SystemExit) as e:
        trt_check.main([str(tmp_path), "--trt-version", "abc"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --trt-version 'abc'")


def test_double_tensor() -> None:
    m = _model([helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE, name="to_double"),
                helper.make_node("Cast", ["xd"], ["y"], to=FLOAT, name="to_float")],
               [helper.make_tensor_value_info("x", FLOAT, [3])], [helper.make_tensor_value_info("y", FLOAT, [3])])
    rep = trt_check.check_model(m)  # the parser maps DOUBLE to float32 (convertDtype): taken, with a warning
    (line,) = rep.warnings
    assert rep.ok and line.startswith("g:to_double(Cast):") and "DOUBLE" in line and "'xd'" in line


def test_unsupported_dtypes_and_op_dtype_column() -> None:
    m = _model([helper.make_node("MatMul", ["a", "b"], ["c"], name="int_matmul")],
               [helper.make_tensor_value_info("a", INT64, [2, 2]), helper.make_tensor_value_info("b", INT64, [2, 2]),
                helper.make_tensor_value_info("u", TensorProto.UINT32, [2])],
               [helper.make_tensor_value_info("c", INT64, [2, 2])])
    lines = _one(m)
    assert any("int_matmul(MatMul)" in l and "INT64" in l for l in lines)
    assert any("UINT32" in l and "(input)" in l for l in lines)


def _topk(k_input: str, inits: list, extra_nodes: list = (), extra_inputs: list = (),
          x_shape: list = (1, 5000)) -> onnx.ModelProto:
    nodes = list(extra_nodes) + [helper.make_node("TopK", ["x", k_input], ["v", "i"], name="topk")]
    return _model(nodes, [helper.make_tensor_value_info("x", FLOAT, list(x_shape))] + list(extra_inputs),
                  [helper.make_tensor_value_info("v", FLOAT, None), helper.make_tensor_value_info("i", INT64, None)],
                  inits)


def _half_k(x_shape: list) -> onnx.ModelProto:
    """TopK with K = x.shape[1] // 2, as exporters emit it (Shape -> Div)."""
    m = _topk("kk", [], [helper.make_node("Shape", ["x"], ["shp"], start=1, name="shape"),
                         helper.make_node("Div", ["shp", "two"], ["kk"], name="half")], x_shape=x_shape)
    m.graph.initializer.append(_const("two", np.array([2], np.int64)))
    return m


def test_topk_runtime_k_is_taken() -> None:
    # onnx-tensorrt's TopK importer passes K as a tensor (setInput(1)): a runtime K parses; only a warning says that
    # values above 3840 fail at runtime (NvInfer.h ITopKLayer)
    rep = trt_check.check_model(_half_k([1, "N"]))  # K depends on a runtime dim
    assert rep.ok and any("runtime tensor" in w and "3840" in w for w in rep.warnings), rep.format()
    assert trt_check.check_model(_half_k([1, 64])).ok  # a static dim: TensorRT folds K at build time
    (line,) = _one(_half_k([1, 8000]))  # ... and then it is checked against the limit
    assert "K=4000" in line


def test_topk_k_too_large_and_constant_node_k() -> None:
    (line,) = _one(_topk("k", [_const("k", np.array([4000], np.int64))]))
    assert "K=4000" in line and "3840" in line
    # K as a Cast(Constant) chain is still a build-time constant
    m = _topk("k64", [], [helper.make_node("Constant", [], ["k32"], value=_const("c", np.array([64], np.int32))),
                          helper.make_node("Cast", ["k32"], ["k64"], to=INT64)])
    assert trt_check.check_model(m).ok


def test_topk_k_as_overridable_input_is_a_runtime_k() -> None:
    # an initializer that is also a graph input can be fed at runtime: not a constant, so not checked at build time
    m = _topk("k", [_const("k", np.array([8], np.int64))],
              extra_inputs=[helper.make_tensor_value_info("k", INT64, [1])])
    rep = trt_check.check_model(m)
    assert rep.ok and any("runtime tensor" in w for w in rep.warnings), rep.format()


def test_loop_carried_value_changes_shape() -> None:
    m = _compatible()
    loop = next(n for n in m.graph.node if n.op_type == "Loop")
    loop.attribute[0].CopyFrom(helper.make_attribute("body", _loop_body(True)))
    (line,) = _one(m)
    assert line.startswith("g:stage1/loop(Loop):") and "picked0" in line and "shape" in line


def test_loop_runtime_trip_count_is_taken() -> None:
    # the Loop importer converts any trip count to a scalar kCOUNT limit: a runtime one parses (and the body's
    # iteration input is registered: the trip count is not INT_MAX weights)
    m = _compatible()
    loop = next(n for n in m.graph.node if n.op_type == "Loop")
    loop.input[0] = "n_iter"
    m.graph.input.append(helper.make_tensor_value_info("n_iter", INT64, []))
    rep = trt_check.check_model(m)
    assert rep.ok, rep.format()


def _exported_style(m: onnx.ModelProto) -> onnx.ModelProto:
    """The Loop body as torch.onnx/onnxscript emit it: carried inputs typed without shapes, outputs untyped."""
    body = next(n for n in m.graph.node if n.op_type == "Loop").attribute[0].g
    for vi in body.input[2:]:
        vi.type.tensor_type.ClearField("shape")
    for vi in body.output:
        vi.ClearField("type")
    return m


def test_loop_carried_shapes_proved_by_induction() -> None:
    # ONNX's Loop inference drops carried-input shapes, so only induction (body inferred with the carried inputs at
    # their initial shapes) can prove them constant: no "no inferable shape" warnings for a fixed-shape body
    rep = trt_check.check_model(_exported_style(_compatible()))
    assert rep.ok and rep.warnings == [], rep.format()


def test_loop_carried_growth_found_by_induction() -> None:
    m = _compatible()
    loop = next(n for n in m.graph.node if n.op_type == "Loop")
    loop.attribute[0].CopyFrom(helper.make_attribute("body", _loop_body(True)))
    (line,) = _one(_exported_style(m))
    assert line.startswith("g:stage1/loop(Loop):") and "picked0" in line and "changes shape" in line


def test_loop_without_trip_count_with_induction() -> None:
    m = _exported_style(_compatible())
    loop = next(n for n in m.graph.node if n.op_type == "Loop")
    loop.input[0] = ""  # a cond-driven while-loop: TensorRT's kWHILE limit; the body does not read its iteration input
    rep = trt_check.check_model(m)
    assert rep.ok and rep.warnings == [], rep.format()
    loop.input[1] = ""  # and no cond either: no trip limit at all, and the body's read of cond_in is unregistered
    limit, read = _one(m)
    assert limit.startswith("g:stage1/loop(Loop):") and "no trip limit" in limit
    assert read.startswith("g:stage1/loop/body/body_cond(Identity): Node input was not registered.") and "cond_in" in read


def test_subgraph_problem_is_found_and_named() -> None:
    m = _compatible()
    loop = next(n for n in m.graph.node if n.op_type == "Loop")
    body = loop.attribute[0].g
    body.node.append(helper.make_node("Unique", ["r_in"], ["uniq"], name="body_unique"))
    (line,) = _one(m)
    assert line.startswith("g:stage1/loop/body/body_unique(Unique):")


def test_version_sensitive_restrictions() -> None:
    # Slice with tensor `axes`: rejected before 10.3, fine from 10.3 (Changelog)
    m = _model([helper.make_node("Slice", ["x", "s", "e", "ax"], ["y"], name="slice")],
               [helper.make_tensor_value_info("x", FLOAT, [4, 4]), helper.make_tensor_value_info("ax", INT64, [1])],
               [helper.make_tensor_value_info("y", FLOAT, None)],
               [_const("s", np.array([0], np.int64)), _const("e", np.array([2], np.int64))])
    assert not trt_check.check_model(m, trt_version="10.2").ok
    assert trt_check.check_model(m, trt_version="10.3").ok
    with pytest.raises(ValueError):
        trt_check.check_model(m, trt_version="8.6")


def test_external_data_is_not_loaded(tmp_path) -> None:
    path = tmp_path / "vision.onnx"
    onnx.save(_topk("k", [_const("k", np.array([4000], np.int64))]), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="vision.onnx.data", size_threshold=0)
    rep = trt_check.check_model(path)  # only the small K tensor is read, lazily, from the data file
    assert rep.graph == "vision" and any("K=4000" in p for p in rep.problems)
    (tmp_path / "vision.onnx.data").write_bytes(b"")  # weights gone: still checkable, K value unknown
    rep = trt_check.check_model(path)
    assert rep.ok and any("could not be read" in w for w in rep.warnings)
    assert list(trt_check.check_dir(tmp_path)) == ["vision"]


def test_check_dir_and_format(tmp_path) -> None:
    onnx.save(_compatible(), str(tmp_path / "segment1.onnx"))
    bad = _model([helper.make_node("Compress", ["x", "m"], ["y"], name="c")],
                 [helper.make_tensor_value_info("x", FLOAT, [4]), helper.make_tensor_value_info("m", BOOL, [4])],
                 [helper.make_tensor_value_info("y", FLOAT, None)])
    onnx.save(bad, str(tmp_path / "prune.onnx"))
    reports = trt_check.check_dir(tmp_path)
    assert sorted(reports) == ["prune", "segment1"]
    assert reports["segment1"].ok and not reports["prune"].ok
    assert reports["prune"].problems[0].startswith("prune:c(Compress):")
    text = trt_check.format_reports(reports)
    assert "prune: 1 problem" in text and "Compress" in text and "segment1: OK" in text


# --- trt_build: importable and useful without TensorRT ---------------------------------------------------------

def test_require_tensorrt_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    trt_build._TRT_CACHE.clear()
    assert trt_build.trt_available() is False
    with pytest.raises(StsError) as e:
        trt_build.require_tensorrt()
    msg = str(e.value)
    assert "\n" not in msg and "TensorRT" in msg and "pip install tensorrt" in msg and "JetPack" in msg
    trt_build._TRT_CACHE.clear()


def _segment_spec() -> dict:
    kv = [{"name": f"past_{kv}_{i}", "dtype": "float16", "shape": ["B", 4, "P", 16]}
          for i in (0, 1) for kv in ("key", "value")]
    return {"inputs": [{"name": "hidden", "dtype": "float16", "shape": ["B", "S", 64]},
                       {"name": "position_ids", "dtype": "int64", "shape": ["B", "S"]}] + kv,
            "outputs": [{"name": "hidden_out", "dtype": "float16", "shape": ["B", "S", 64]}]}


def test_profiles_for_segment_graph() -> None:
    profiles = trt_build.profiles_for_graph("segment1", _segment_spec(), max_batch=2, max_prompt=700,
                                            max_context=1024)
    prefill, decode = profiles
    assert prefill["hidden"] == ((1, 1, 64), (1, 700, 64), (2, 700, 64))
    assert prefill["position_ids"] == ((1, 1), (1, 700), (2, 700))
    assert prefill["past_key_0"] == ((1, 4, 0, 16), (1, 4, 0, 16), (2, 4, 0, 16))
    assert decode["hidden"] == ((1, 1, 64), (1, 1, 64), (2, 1, 64))
    assert decode["past_value_1"][0] == (1, 4, 0, 16) and decode["past_value_1"][2] == (2, 4, 1023, 16)
    for p in profiles:  # min <= opt <= max everywhere
        for name, (lo, opt, hi) in p.items():
            if not name.startswith("__"):
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name


def test_profiles_for_other_graphs() -> None:
    vision = {"inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["B", 3, 336, 336]}], "outputs": []}
    (p,) = trt_build.profiles_for_graph("vision", vision, max_batch=4, max_prompt=700, max_context=1024)
    assert p == {"pixel_values": ((1, 3, 336, 336), (1, 3, 336, 336), (4, 3, 336, 336))}
    prune = {"inputs": [{"name": "hidden", "dtype": "float32", "shape": ["B", "S1", 64]},
                        {"name": "position_ids", "dtype": "int64", "shape": ["B", "S1"]},
                        {"name": "image_start", "dtype": "int64", "shape": []}], "outputs": []}
    (p,) = trt_build.profiles_for_graph("prune", prune, max_batch=1, min_prompt=97, max_prompt=700,
                                        max_context=1024)
    assert p["hidden"] == ((1, 97, 64), (1, 700, 64), (1, 700, 64)) and p["image_start"] == ((), (), ())
    assert p["__values__"]["image_start"][2] == (700,)
    with pytest.raises(StsError):
        trt_build.profiles_for_graph("vision", {"inputs": [{"name": "x", "dtype": "float32", "shape": ["Q"]}]},
                                     max_batch=1, max_prompt=8, max_context=8)


def test_check_engine_compatible() -> None:
    here = {"trt_version": "10.3.0.30", "compute_capability": "8.7", "gpu": "Orin"}
    trt_build.check_engine_compatible({"trt_version": "10.3.0", "compute_capability": "8.7"}, here=here)
    with pytest.raises(StsError, match="TensorRT 10.7.0"):
        trt_build.check_engine_compatible({"trt_version": "10.7.0", "compute_capability": "8.7"}, here=here)
    with pytest.raises(StsError, match="compute capability 8.9"):
        trt_build.check_engine_compatible({"trt_version": "10.3.0", "compute_capability": "8.9"}, here=here)


def test_runtime_profile_selection() -> None:
    ranges = [  # prefill (P = 0) and decode (S = 1) as profiles_for_graph builds them
        {"hidden": ((1, 1, 8), (1, 64, 8), (1, 64, 8)), "past": ((1, 2, 0, 4), (1, 2, 0, 4), (1, 2, 0, 4))},
        {"hidden": ((1, 1, 8), (1, 1, 8), (1, 1, 8)), "past": ((1, 2, 0, 4), (1, 2, 64, 4), (1, 2, 127, 4))},
    ]
    assert trt_runtime.select_profile(ranges, {"hidden": (1, 30, 8), "past": (1, 2, 0, 4)}) == 0
    assert trt_runtime.select_profile(ranges, {"hidden": (1, 1, 8), "past": (1, 2, 40, 4)}) == 1
    assert trt_runtime.select_profile(ranges, {"hidden": (1, 1, 8), "past": (1, 2, 0, 4)}) in (0, 1)
    assert trt_runtime.select_profile(ranges, {"hidden": (1, 2, 8), "past": (1, 2, 3, 4)}) is None


def test_modules_import_without_tensorrt() -> None:
    assert trt_runtime.TrtBackend.name == "tensorrt"
    assert callable(trt_build.build_engine) and callable(trt_build.device_info)


# --- build / run plumbing against a stand-in `tensorrt` module (real TensorRT runs in test_trt_gpu.py) -----------

class _Enum:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __int__(self) -> int:
        return {"STRONGLY_TYPED": 1}.get(self.name, 0)


# The float/int DataType members both APIs have (names as in the pybind bindings: trt.float32.name == "FLOAT").
_DT = {n: _Enum(n) for n in ("FLOAT", "HALF", "BF16", "INT32", "INT64", "BOOL", "INT8", "UINT8")}
_ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 3: "INT8", 2: "UINT8"}


class _Flags:
    """An enum namespace that has only the members it was made with: touching a removed one is AttributeError."""

    def __init__(self, *names: str) -> None:
        for n in names:
            setattr(self, n, _Enum(n))


class _FakeTensor:
    def __init__(self, name: str, dtype: _Enum, shape: tuple = (-1, 8), is_shape_tensor: bool = False) -> None:
        self.name, self.dtype, self.shape, self.is_shape_tensor = name, dtype, shape, is_shape_tensor


class _FakeLayer:
    """A TensorRT 10.3 ILayer: the weak-typing setters exist (and are recorded, so a test can prove none is used)."""

    def __init__(self, name: str, ins: list, outs: list, type_: str = "MATRIX_MULTIPLY", metadata: str = "") -> None:
        self.name, self.type, self.metadata, self.ins, self.outs = name, _Enum(type_), metadata, ins, outs
        self.num_inputs, self.num_outputs, self.precision, self.out_types = len(ins), len(outs), None, {}

    def get_input(self, i: int) -> _FakeTensor:
        return self.ins[i]

    def get_output(self, i: int) -> _FakeTensor:
        return self.outs[i]

    def set_output_type(self, i: int, dtype: _Enum) -> None:
        self.out_types[i] = dtype


class _FakeLayer11:
    """A TensorRT 11 ILayer: no `precision`, no `set_output_type` (removed with weak typing)."""

    __slots__ = ("name", "type", "metadata", "ins", "outs", "num_inputs", "num_outputs")

    def __init__(self, name: str, ins: list, outs: list, type_: str = "MATRIX_MULTIPLY", metadata: str = "") -> None:
        self.name, self.type, self.metadata, self.ins, self.outs = name, _Enum(type_), metadata, ins, outs
        self.num_inputs, self.num_outputs = len(ins), len(outs)

    def get_input(self, i: int) -> _FakeTensor:
        return self.ins[i]

    def get_output(self, i: int) -> _FakeTensor:
        return self.outs[i]


class _FakeNetwork:
    def __init__(self, layers: list, inputs: list, outputs: list = ()) -> None:
        self.layers, self.inputs, self.outputs = layers, inputs, list(outputs)

    num_layers = property(lambda self: len(self.layers))
    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_layer(self, i: int) -> _FakeLayer:
        return self.layers[i]

    def get_input(self, i: int) -> _FakeTensor:
        return self.inputs[i]

    def get_output(self, i: int) -> _FakeTensor:
        return self.outputs[i]


def network_from_onnx(path: str, api: str) -> _FakeNetwork:
    """What TensorRT's parser makes of an ONNX file, as far as build_engine reads it: one CONSTANT layer per float
    initializer (its dtype and shape), a MATRIX_MULTIPLY per MatMul, and the graph IO (dynamic dims are -1)."""
    m = onnx.load(path, load_external_data=False)
    layer = _FakeLayer if api == "10.3" else _FakeLayer11
    layers = [layer(f"const_{t.name}", [], [_FakeTensor(t.name, _DT[_ONNX_TO_TRT[t.data_type]], tuple(t.dims))],
                    "CONSTANT") for t in m.graph.initializer if t.data_type in _ONNX_TO_TRT]
    layers += [layer(n.name, [], [_FakeTensor(n.output[0], _DT["FLOAT"])]) for n in m.graph.node if n.op_type == "MatMul"]

    def io(v: onnx.ValueInfoProto) -> _FakeTensor:
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
        return _FakeTensor(v.name, _DT[_ONNX_TO_TRT[v.type.tensor_type.elem_type]], dims)

    return _FakeNetwork(layers, [io(v) for v in m.graph.input], [io(v) for v in m.graph.output])


class _FakeConfig:
    def __init__(self, calls: list, api: str) -> None:
        self.calls, self.api = calls, api
        self.flags, self.cleared, self.profiles, self.pools = set(), set(), [], {}
        self.builder_optimization_level, self.progress_monitor, self.cache = None, None, None

    def set_flag(self, f: _Enum) -> None:
        self.calls.append(f"config.set_flag({f})")
        self.flags.add(str(f))

    def clear_flag(self, f: _Enum) -> None:
        self.calls.append(f"config.clear_flag({f})")
        self.cleared.add(str(f))

    def set_memory_pool_limit(self, pool: object, size: int) -> None:
        self.calls.append(f"config.set_memory_pool_limit({pool})")
        self.pools[str(pool)] = size

    def add_optimization_profile(self, p: dict) -> int:
        self.calls.append("config.add_optimization_profile")
        self.profiles.append(p)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob: bytes) -> types.SimpleNamespace:
        self.calls.append("config.create_timing_cache")
        return types.SimpleNamespace(blob=blob, serialize=lambda: b"CACHE" + blob[-3:])

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        self.calls.append("config.set_timing_cache")
        self.cache = cache
        return True

    def get_timing_cache(self) -> object:
        self.calls.append("config.get_timing_cache")
        return self.cache


def _profile_recorder(calls: list) -> object:
    class P(dict):
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            calls.append("profile.set_shape")
            self[name] = (lo, opt, hi)

        def set_shape_input(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            calls.append("profile.set_shape_input")
            self["values:" + name] = (lo, opt, hi)

    return P()


class _FakeTrt:
    """A stand-in `tensorrt` module with the TensorRT 10.3 Python API (names as in its pybind bindings): the
    weakly typed builder flags and layer precision setters still exist, next to strong typing."""

    api = "10.3"
    __version__ = "10.3.0.30"
    float32, float16, bfloat16, int64 = _DT["FLOAT"], _DT["HALF"], _DT["BF16"], _DT["INT64"]
    BuilderFlag = _Flags("FP16", "BF16", "INT8", "FP8", "TF32", "OBEY_PRECISION_CONSTRAINTS",
                         "PREFER_PRECISION_CONSTRAINTS", "VERSION_COMPATIBLE")
    NetworkDefinitionCreationFlag = _Flags("STRONGLY_TYPED")
    MemoryPoolType = _Flags("WORKSPACE")

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level: int) -> None:
            self.level = level

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    def __init__(self, network: _FakeNetwork | None = None, parse_ok: bool = True) -> None:
        self.network, self.parse_ok, self.configs, self.calls = network, parse_ok, [], []
        fake = self

        class Builder:
            def __init__(self, logger: object) -> None:
                fake.calls.append("Builder")

            def create_network(self, flags: int) -> _FakeNetwork:
                fake.calls.append(f"builder.create_network({flags})")
                fake.flags = flags
                return fake.network if fake.network is not None else _FakeNetwork([], [])

            def create_builder_config(self) -> _FakeConfig:
                fake.calls.append("builder.create_builder_config")
                fake.configs.append(_FakeConfig(fake.calls, fake.api))
                return fake.configs[-1]

            def create_optimization_profile(self) -> dict:
                fake.calls.append("builder.create_optimization_profile")
                return _profile_recorder(fake.calls)

            def build_serialized_network(self, network: object, config: _FakeConfig) -> bytes:
                fake.calls.append("builder.build_serialized_network")
                mon = config.progress_monitor
                mon.phase_start("Building engine", None, 10)
                for i in range(10):
                    assert mon.step_complete("Building engine", i)
                mon.phase_finish("Building engine")
                return b"ENGINE-BYTES"

        class OnnxParser:
            def __init__(self, network: _FakeNetwork, logger: object) -> None:
                fake.calls.append("OnnxParser")
                self.network = network
                self.num_errors = 0 if fake.parse_ok else 1

            def parse_from_file(self, path: str) -> bool:
                fake.calls.append("parser.parse_from_file")
                if fake.parse_ok and fake.network is None:  # parse the real file: constants, IO, MatMuls
                    parsed = network_from_onnx(path, fake.api)
                    self.network.layers, self.network.inputs = parsed.layers, parsed.inputs
                    self.network.outputs = parsed.outputs
                return fake.parse_ok

            def get_error(self, i: int) -> object:
                return types.SimpleNamespace(node_name=lambda: "n7", node=lambda: 7, node_operator=lambda: "Unique",
                                             desc=lambda: "No importer registered for op: Unique")

        self.Builder, self.OnnxParser = Builder, OnnxParser


class _FakeTrt11(_FakeTrt):
    """The same stand-in with TensorRT 11's API: weak typing removed (no BuilderFlag.FP16/BF16/INT8/FP8,
    OBEY/PREFER_PRECISION_CONSTRAINTS; no ILayer.precision / set_output_type), STRONGLY_TYPED kept but ignored
    (NVIDIA's "TensorRT 10.x to 11.x Python API" migration guide, "Removed Python APIs and Replacements")."""

    api = "11"
    __version__ = "11.4.1.2"
    BuilderFlag = _Flags("TF32", "VERSION_COMPATIBLE")
    NetworkDefinitionCreationFlag = _Flags("STRONGLY_TYPED")


def _stand_in_layers(layer: type) -> tuple[list, list]:
    f32, f16, i64 = _DT["FLOAT"], _DT["HALF"], _DT["INT64"]
    x = _FakeTensor("hidden", f16, (-1, -1, 8))
    start = _FakeTensor("image_start", i64, (), is_shape_tensor=True)
    layers = [
        layer("w_proj", [], [_FakeTensor("w_proj", f16, (8, 8))], "CONSTANT"),
        layer("stage1_eps", [], [_FakeTensor("stage1_eps", f32, (1,))], "CONSTANT"),  # a small fp32 Stage-1 constant
        layer("stage1/MatMul", [x, x], [_FakeTensor("stage1/scores", f32)]),
        layer("lm/MatMul", [x, x], [_FakeTensor("logits", f16)]),
    ]
    return layers, [x, start]


@pytest.fixture(params=["10.3", "11"])
def fake_trt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> _FakeTrt:
    """The build stand-in, once with TensorRT 10.3's API and once with TensorRT 11's."""
    cls = _FakeTrt if request.param == "10.3" else _FakeTrt11
    layers, inputs = _stand_in_layers(_FakeLayer if request.param == "10.3" else _FakeLayer11)
    fake = cls(_FakeNetwork(layers, inputs, [_FakeTensor("logits", _DT["HALF"])]))
    monkeypatch.setitem(trt_build._TRT_CACHE, "mod", fake)
    return fake


def test_build_engine_plumbing(fake_trt: _FakeTrt, tmp_path) -> None:
    onnx_path = tmp_path / "prune.onnx"
    m = _model([helper.make_node("Sub", ["x", "x"], ["s"], name="node_Sub_14"),
                helper.make_node("Add", ["s", "x"], ["y"], name="node_Add_3")],
               [helper.make_tensor_value_info("x", FLOAT, [2])], [helper.make_tensor_value_info("y", FLOAT, [2])])
    onnx.helper.set_metadata_props(m.graph.node[0], {"pkg.torch.onnx.name_scopes": "['', 'stage1', 'sub_14']"})
    onnx.helper.set_metadata_props(m.graph.node[1], {"pkg.torch.onnx.name_scopes": "['', 'lm', 'add_3']"})
    onnx.save(m, str(onnx_path))
    assert trt_build.onnx_nodes_matching(onnx_path, "stage1") == {"node_Sub_14"}
    spec = {"inputs": [{"name": "hidden", "dtype": "float16", "shape": ["B", "S1", 8]},
                       {"name": "image_start", "dtype": "int64", "shape": []}]}
    profiles = trt_build.profiles_for_graph("prune", spec, max_batch=2, max_prompt=100, max_context=200)
    logs: list[str] = []
    cache = tmp_path / "timing.cache"
    info = trt_build.build_engine(onnx_path, tmp_path / "out" / "prune.engine", precision="fp16", profiles=profiles,
                                  timing_cache_path=cache, workspace_bytes=1 << 30, progress=logs.append, opt_level=4)
    assert (tmp_path / "out" / "prune.engine").read_bytes() == b"ENGINE-BYTES"
    assert not list((tmp_path / "out").glob(".*"))  # the temp file was renamed away
    assert cache.read_bytes() == b"CACHE"
    cfg = fake_trt.configs[-1]
    # strongly typed on both APIs: the STRONGLY_TYPED network flag, no precision builder flag, TF32 off
    assert fake_trt.flags == 1 << 1 and cfg.flags == set() and cfg.cleared == {"TF32"}
    assert not any("set_flag" in c for c in fake_trt.calls)
    assert cfg.builder_optimization_level == 4 and cfg.pools == {"WORKSPACE": 1 << 30}
    for layer in fake_trt.network.layers:  # no layer precision is pinned (11 has no setter to call)
        assert getattr(layer, "precision", None) is None and getattr(layer, "out_types", {}) == {}
    # precision read back from the network: fp16 weights (64 elements) outweigh the fp32 Stage-1 constant
    assert info["precision"] == "fp16" and info["float_constants"] == {"fp16": 64, "fp32": 1}
    assert info["strongly_typed"] and info["trt_version"] == fake_trt.__version__
    assert info["io_dtypes"] == {"hidden": "HALF", "image_start": "INT64", "logits": "HALF"}
    (prof,) = cfg.profiles
    assert prof["hidden"] == ((1, 1, 8), (1, 100, 8), (2, 100, 8))
    assert prof["values:image_start"] == ((0,), (32,), (100,))
    assert any("Building engine" in m for m in logs) and any("100%" in m for m in logs)
    # the timing cache is loaded on the next build
    trt_build.build_engine(onnx_path, tmp_path / "prune.engine", profiles=profiles, timing_cache_path=cache,
                           progress=logs.append)
    assert fake_trt.configs[-1].cache.blob == b"CACHE" and fake_trt.configs[-1].flags == set()
    # asked for another precision than the network has: one line, before anything is built
    n_built = fake_trt.calls.count("builder.build_serialized_network")
    with pytest.raises(StsError) as e:
        trt_build.build_engine(onnx_path, tmp_path / "bf.engine", precision="bf16", profiles=profiles, progress=print)
    assert "fp16 graph" in str(e.value) and "--dtype bf16" in str(e.value) and "\n" not in str(e.value)
    assert fake_trt.calls.count("builder.build_serialized_network") == n_built
    assert not (tmp_path / "bf.engine").exists()


def _build_calls(cls: type, tmp_path: Path) -> list[str]:
    """The TensorRT calls one build_engine makes on stand-in `cls` (the same graph, profiles and options)."""
    fake = cls()
    trt_build._TRT_CACHE["mod"] = fake
    try:
        path = tmp_path / f"g{cls.api}.onnx"
        w = numpy_helper.from_array(np.ones((8, 8), np.float16), "w")
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["B", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["B", 8])], [w])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
        spec = {"inputs": [{"name": "x", "dtype": "float16", "shape": ["B", 8]}]}
        info = trt_build.build_engine(path, tmp_path / f"g{cls.api}.engine", precision="fp16", progress=lambda s: None,
                                      profiles=trt_build.profiles_for_graph("g", spec, max_batch=2, max_prompt=8,
                                                                            max_context=16),
                                      timing_cache_path=tmp_path / f"t{cls.api}.cache", workspace_bytes=1 << 20)
        assert info["precision"] == "fp16" and info["trt_version"] == cls.__version__
        return fake.calls
    finally:
        trt_build._TRT_CACHE.pop("mod", None)


def test_same_strongly_typed_calls_on_10_3_and_11(tmp_path) -> None:
    calls_10, calls_11 = _build_calls(_FakeTrt, tmp_path), _build_calls(_FakeTrt11, tmp_path)
    assert calls_10 == calls_11  # one code path: no version branch in the calls made
    assert "builder.create_network(2)" in calls_10 and "config.clear_flag(TF32)" in calls_10
    assert not [c for c in calls_10 if "set_flag" in c or "precision" in c]


def test_network_flag_shim_without_strongly_typed_member() -> None:
    later = type("trt", (), {"NetworkDefinitionCreationFlag": _Flags()})  # a TensorRT that dropped the member
    assert trt_build._network_flags(later) == 0 and trt_build._network_flags(_FakeTrt11) == 2


def test_build_engine_errors_are_one_line(fake_trt: _FakeTrt, tmp_path) -> None:
    onnx_path = tmp_path / "vision.onnx"
    onnx_path.write_bytes(b"x")
    with pytest.raises(StsError) as e:  # dynamic input without a profile
        trt_build.build_engine(onnx_path, tmp_path / "v.engine", profiles=[], progress=print)
    assert "profile" in str(e.value) and "\n" not in str(e.value)
    fake_trt.parse_ok = False
    with pytest.raises(StsError) as e:
        trt_build.build_engine(onnx_path, tmp_path / "v.engine", profiles=[], progress=print)
    assert "n7(Unique)" in str(e.value) and "sts_export.backends.tensorrt.check" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StsError, match="precision"):
        trt_build.build_engine(onnx_path, tmp_path / "v.engine", precision="int8", profiles=[])
    assert not (tmp_path / "v.engine").exists()


def test_require_tensorrt_refuses_an_unknown_major(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(trt_build._TRT_CACHE, "mod", type("trt", (), {"__version__": "12.0.0"}))
    with pytest.raises(StsError, match="newer than sts-export knows"):
        trt_build.require_tensorrt()
    monkeypatch.setitem(trt_build._TRT_CACHE, "mod", type("trt", (), {"__version__": "10.2.0"}))
    with pytest.raises(StsError, match="too old"):
        trt_build.require_tensorrt()


class _FakeEngine:
    """Segment-shaped engine: hidden [B,S,4], past_key_0 [B,1,P,4] -> present_key_0 [B,1,P+S,4]; 2 profiles."""

    IN, OUT = _Enum("INPUT"), _Enum("OUTPUT")
    names = ["hidden", "past_key_0", "present_key_0"]
    profiles = [  # prefill, decode
        {"hidden": ((1, 1, 4), (1, 16, 4), (2, 16, 4)), "past_key_0": ((1, 1, 0, 4), (1, 1, 0, 4), (2, 1, 0, 4))},
        {"hidden": ((1, 1, 4), (1, 1, 4), (2, 1, 4)), "past_key_0": ((1, 1, 0, 4), (1, 1, 16, 4), (2, 1, 31, 4))},
    ]
    num_io_tensors, num_optimization_profiles = 3, 2

    def __init__(self) -> None:
        self.ctx = types.SimpleNamespace(calls=[], shapes={})
        c = self.ctx
        c.set_optimization_profile_async = lambda p, s: c.calls.append(("profile", p)) or True
        c.set_input_shape = lambda n, s: c.shapes.__setitem__(n, tuple(s)) or True
        c.set_tensor_address = lambda n, ptr: c.calls.append(("addr", n, ptr)) or True
        c.execute_async_v3 = lambda s: c.calls.append(("exec", s)) or True

        def get_tensor_shape(n: str) -> tuple:
            if n in c.shapes:
                return c.shapes[n]
            (b, s, _), p = c.shapes["hidden"], c.shapes["past_key_0"]
            return (b, 1, p[2] + s, 4)

        c.get_tensor_shape = get_tensor_shape

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, n: str) -> _Enum:
        return self.OUT if n.startswith("present") else self.IN

    def get_tensor_dtype(self, n: str) -> _Enum:
        return _Enum("FLOAT")

    def get_tensor_location(self, n: str) -> str:
        return "DEVICE"

    def get_tensor_profile_shape(self, n: str, p: int) -> tuple:
        return self.profiles[p][n]

    def is_shape_inference_io(self, n: str) -> bool:
        return False

    def create_execution_context(self) -> types.SimpleNamespace:
        return self.ctx


class _CpuMemory(trt_runtime._TorchMemory):
    """torch CPU tensors standing in for CUDA ones."""

    def __init__(self) -> None:
        import torch

        self.torch, self.device = torch, torch.device("cpu")
        self.dummy = torch.empty(256, dtype=torch.uint8)

    def stream(self) -> int:
        return 0


def test_runtime_run_plumbing() -> None:
    fake = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT=_FakeEngine.IN),
                                 TensorLocation=types.SimpleNamespace(HOST="HOST"))
    be = object.__new__(trt_runtime.TrtBackend)
    be.mem = _CpuMemory()
    engine = _FakeEngine()
    be.engines = {"segment1": trt_runtime._Engine(fake, engine, "segment1")}
    e = be.engines["segment1"]
    assert e.inputs == ["hidden", "past_key_0"] and e.outputs == ["present_key_0"]
    out = be.run("segment1", {"hidden": np.ones((1, 5, 4), np.float32),
                              "past_key_0": be.from_numpy(np.zeros((1, 1, 0, 4), np.float32))})
    assert tuple(out["present_key_0"].shape) == (1, 1, 5, 4) and e.active == 0
    addrs = {c[1]: c[2] for c in engine.ctx.calls if c[0] == "addr"}
    assert addrs["past_key_0"] == be.mem.dummy.data_ptr()  # empty tensor gets a valid dummy address
    out2 = be.run("segment1", {"hidden": np.ones((1, 1, 4), np.float64),  # dtype converted to the engine's
                               "past_key_0": out["present_key_0"]})
    assert tuple(out2["present_key_0"].shape) == (1, 1, 6, 4) and e.active == 1
    assert ("profile", 1) in engine.ctx.calls
    assert be.to_numpy(be.concat([out["present_key_0"], out2["present_key_0"]], 2)).shape == (1, 1, 11, 4)
    with pytest.raises(StsError, match="missing input"):
        be.run("segment1", {"hidden": np.ones((1, 1, 4), np.float32)})
    with pytest.raises(StsError, match="no TensorRT engine 'vision'"):
        be.run("vision", {})
    with pytest.raises(StsError, match="outside every optimisation profile"):
        be.run("segment1", {"hidden": np.ones((1, 2, 4), np.float32), "past_key_0": np.zeros((1, 1, 3, 4), np.float32)})
