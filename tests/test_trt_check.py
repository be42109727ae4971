"""Static TensorRT checks (no TensorRT needed): the op table, planted incompatibilities, profiles, error lines."""
from __future__ import annotations

import builtins
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sts_export.backends.tensorrt import discovery as trt_discovery
from sts_export.export.tensorrt import build as trt_build
from sts_export.export.tensorrt import check as trt_check
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
    monkeypatch.setitem(trt_discovery._TRT_CACHE, "mod", None)  # no TensorRT here: JetPack 6.1/6.2's 10.3
    assert trt_check.default_version() == "10.3"
    monkeypatch.setitem(trt_discovery._TRT_CACHE, "mod", type("trt", (), {"__version__": "10.16.1.11"}))
    assert trt_check.default_version() == "10.16"  # a Jetson on JetPack 7.2 checks against its own TensorRT


def test_check_command_one_verdict_per_version(tmp_path) -> None:
    from click.testing import CliRunner

    from sts_export.cli.main import main

    onnx.save(_attention(), str(tmp_path / "attn.onnx"))
    r = CliRunner().invoke(main, ["check", str(tmp_path), "--trt-version", "10.3,11.4"])
    assert r.exit_code == 1, r.output
    assert "TensorRT 10.3 compatibility: FAIL" in r.output and "TensorRT 11.4 compatibility: PASS" in r.output
    assert "op 'Attention' is not in the TensorRT 10.3 ONNX parser's support table" in r.output
    r = CliRunner().invoke(main, ["check", str(tmp_path), "--trt-version", "abc"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: --trt-version 'abc'")


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
    trt_discovery._TRT_CACHE.clear()
    assert trt_discovery.trt_available() is False
    with pytest.raises(StsError) as e:
        trt_discovery.require_tensorrt()
    msg = str(e.value)
    assert "\n" not in msg and "TensorRT" in msg and "pip install tensorrt" in msg and "JetPack" in msg
    trt_discovery._TRT_CACHE.clear()


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
    trt_discovery.check_engine_compatible({"trt_version": "10.3.0", "compute_capability": "8.7"}, here=here)
    with pytest.raises(StsError, match="TensorRT 10.7.0"):
        trt_discovery.check_engine_compatible({"trt_version": "10.7.0", "compute_capability": "8.7"}, here=here)
    with pytest.raises(StsError, match="compute capability 8.9"):
        trt_discovery.check_engine_compatible({"trt_version": "10.3.0", "compute_capability": "8.9"}, here=here)


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
    assert callable(trt_build.build_engine) and callable(trt_discovery.device_info)
