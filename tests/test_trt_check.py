"""Static TensorRT checks (no TensorRT needed): the op table, planted incompatibilities, profiles, error lines."""
from __future__ import annotations

import builtins
import sys
import types

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


def test_double_tensor() -> None:
    m = _model([helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE, name="to_double"),
                helper.make_node("Cast", ["xd"], ["y"], to=FLOAT, name="to_float")],
               [helper.make_tensor_value_info("x", FLOAT, [3])], [helper.make_tensor_value_info("y", FLOAT, [3])])
    (line,) = _one(m)
    assert line.startswith("g:to_double(Cast):") and "DOUBLE" in line and "'xd'" in line


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


def test_topk_non_constant_k() -> None:
    (line,) = _one(_half_k([1, "N"]))  # K depends on a runtime dim
    assert line.startswith("g:topk(TopK):") and "not a constant" in line
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


def test_topk_k_as_overridable_input_is_not_constant() -> None:
    # an initializer that is also a graph input can be fed at runtime: not a constant
    m = _topk("k", [_const("k", np.array([8], np.int64))],
              extra_inputs=[helper.make_tensor_value_info("k", INT64, [1])])
    assert any("not a constant" in l for l in _one(m))


def test_loop_carried_value_changes_shape() -> None:
    m = _compatible()
    loop = next(n for n in m.graph.node if n.op_type == "Loop")
    loop.attribute[0].CopyFrom(helper.make_attribute("body", _loop_body(True)))
    (line,) = _one(m)
    assert line.startswith("g:stage1/loop(Loop):") and "picked0" in line and "shape" in line


def test_loop_trip_count_not_constant() -> None:
    m = _compatible()
    loop = next(n for n in m.graph.node if n.op_type == "Loop")
    loop.input[0] = "n_iter"
    m.graph.input.append(helper.make_tensor_value_info("n_iter", INT64, []))
    (line,) = _one(m)
    assert "trip count 'n_iter' is not a constant" in line


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
    loop.input[0] = ""  # a cond-driven while-loop
    (line,) = _one(m)
    assert "no trip count" in line


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


class _FakeTrt:
    """Just enough of the TensorRT 10 Python API (names as in its pybind bindings) to drive build_engine."""

    __version__ = "10.3.0.30"
    float32, float16, int64 = _Enum("FLOAT"), _Enum("HALF"), _Enum("INT64")

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level: int) -> None:
            self.level = level

    class BuilderFlag:
        FP16, BF16, TF32, OBEY_PRECISION_CONSTRAINTS = "FP16", "BF16", "TF32", "OBEY"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    def __init__(self, network: "_FakeNetwork", parse_ok: bool = True) -> None:
        self.network, self.parse_ok, self.configs = network, parse_ok, []
        fake = self

        class Builder:
            def __init__(self, logger: object) -> None:
                pass

            def create_network(self, flags: int) -> _FakeNetwork:
                fake.network.flags = flags
                return fake.network

            def create_builder_config(self) -> _FakeConfig:
                fake.configs.append(_FakeConfig())
                return fake.configs[-1]

            def create_optimization_profile(self) -> dict:
                return {}

            def build_serialized_network(self, network: object, config: _FakeConfig) -> bytes:
                mon = config.progress_monitor
                mon.phase_start("Building engine", None, 10)
                for i in range(10):
                    assert mon.step_complete("Building engine", i)
                mon.phase_finish("Building engine")
                return b"ENGINE-BYTES"

        class OnnxParser:
            def __init__(self, network: object, logger: object) -> None:
                self.num_errors = 0 if fake.parse_ok else 1

            def parse_from_file(self, path: str) -> bool:
                return fake.parse_ok

            def get_error(self, i: int) -> object:
                return types.SimpleNamespace(node_name=lambda: "n7", node=lambda: 7, node_operator=lambda: "Unique",
                                             desc=lambda: "No importer registered for op: Unique")

        self.Builder, self.OnnxParser = Builder, OnnxParser


class _FakeTensor:
    def __init__(self, name: str, dtype: _Enum, shape: tuple = (-1, 8), is_shape_tensor: bool = False) -> None:
        self.name, self.dtype, self.shape, self.is_shape_tensor = name, dtype, shape, is_shape_tensor


class _FakeLayer:
    def __init__(self, name: str, ins: list, outs: list, type_: str = "MATRIX_MULTIPLY", metadata: str = "") -> None:
        self.name, self.type, self.metadata, self.ins, self.outs = name, _Enum(type_), metadata, ins, outs
        self.num_inputs, self.num_outputs, self.precision, self.out_types = len(ins), len(outs), None, {}

    def get_input(self, i: int) -> _FakeTensor:
        return self.ins[i]

    def get_output(self, i: int) -> _FakeTensor:
        return self.outs[i]

    def set_output_type(self, i: int, dtype: _Enum) -> None:
        self.out_types[i] = dtype


class _FakeNetwork:
    def __init__(self, layers: list, inputs: list) -> None:
        self.layers, self.inputs = layers, inputs

    num_layers = property(lambda self: len(self.layers))
    num_inputs = property(lambda self: len(self.inputs))

    def get_layer(self, i: int) -> _FakeLayer:
        return self.layers[i]

    def get_input(self, i: int) -> _FakeTensor:
        return self.inputs[i]


class _FakeConfig:
    def __init__(self) -> None:
        self.flags, self.cleared, self.profiles, self.pools = set(), set(), [], {}
        self.builder_optimization_level, self.progress_monitor, self.cache = None, None, None

    def set_flag(self, f: str) -> None:
        self.flags.add(f)

    def clear_flag(self, f: str) -> None:
        self.cleared.add(f)

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, p: dict) -> int:
        self.profiles.append(p)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob: bytes) -> types.SimpleNamespace:
        return types.SimpleNamespace(blob=blob, serialize=lambda: b"CACHE" + blob[-3:])

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> object:
        return self.cache


def _profile_recorder() -> type:
    class P(dict):
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            self[name] = (lo, opt, hi)

        def set_shape_input(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            self["values:" + name] = (lo, opt, hi)

    return P


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> _FakeTrt:
    f32, i64 = _FakeTrt.float32, _FakeTrt.int64
    x = _FakeTensor("hidden", f32, (-1, -1, 8))
    start = _FakeTensor("image_start", i64, (), is_shape_tensor=True)
    layers = [
        _FakeLayer("stage1/MatMul", [x, x], [_FakeTensor("stage1/scores", f32)]),
        _FakeLayer("ONNXTRT_shuffle_3", [_FakeTensor("stage1/scores", f32)], [_FakeTensor("t3", f32)], "SHUFFLE"),
        _FakeLayer("node_12", [_FakeTensor("t3", f32)], [_FakeTensor("t4", f32)], "SOFTMAX",
                   metadata="[ONNX Layer: stage1/softmax]"),
        _FakeLayer("stage1/ArgMin", [_FakeTensor("t4", f32)], [_FakeTensor("idx", i64)], "TOPK"),
        _FakeLayer("stage1/cast_idx", [_FakeTensor("idx", i64)], [_FakeTensor("idx32", _FakeTrt.int64)], "CAST"),
        _FakeLayer("stage1/trip", [], [_FakeTensor("k", i64)], "TRIP_LIMIT"),
        _FakeLayer("lm/MatMul", [x, x], [_FakeTensor("logits", f32)]),
        # dynamo-style names: only the ONNX node's metadata says it is in the stage1 module
        _FakeLayer("node_Sub_14", [x], [_FakeTensor("sub_14", f32)], "ELEMENTWISE", "[ONNX Layer: node_Sub_14]"),
        _FakeLayer("node_Sub_14_1", [x], [_FakeTensor("sub_14b", f32)], "ELEMENTWISE"),
        _FakeLayer("node_Add_3", [x], [_FakeTensor("add_3", f32)], "ELEMENTWISE", "[ONNX Layer: node_Add_3]"),
    ]
    fake = _FakeTrt(_FakeNetwork(layers, [x, start]))
    fake.Builder.create_optimization_profile = lambda self: _profile_recorder()()
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
    spec = {"inputs": [{"name": "hidden", "dtype": "float32", "shape": ["B", "S1", 8]},
                       {"name": "image_start", "dtype": "int64", "shape": []}]}
    profiles = trt_build.profiles_for_graph("prune", spec, max_batch=2, max_prompt=100, max_context=200)
    logs: list[str] = []
    cache = tmp_path / "timing.cache"
    info = trt_build.build_engine(onnx_path, tmp_path / "out" / "prune.engine", precision="fp16", profiles=profiles,
                                  timing_cache_path=cache, workspace_bytes=1 << 30, fp32_layers_pattern="stage1",
                                  progress=logs.append, opt_level=4)
    assert (tmp_path / "out" / "prune.engine").read_bytes() == b"ENGINE-BYTES"
    assert not list((tmp_path / "out").glob(".*"))  # the temp file was renamed away
    assert cache.read_bytes() == b"CACHE"
    cfg = fake_trt.configs[-1]
    assert cfg.flags == {"FP16", "OBEY"} and "TF32" in cfg.cleared
    assert cfg.builder_optimization_level == 4 and cfg.pools == {"WORKSPACE": 1 << 30}
    layers = {l.name: l for l in fake_trt.network.layers}
    # pinned: by name, by input tensor name (importer helper layer), by ONNX-node metadata
    for name in ("stage1/MatMul", "ONNXTRT_shuffle_3", "node_12", "stage1/ArgMin", "node_Sub_14", "node_Sub_14_1"):
        assert layers[name].precision is _FakeTrt.float32, name
    assert layers["node_Add_3"].precision is None
    assert layers["stage1/MatMul"].out_types == {0: _FakeTrt.float32}
    assert layers["stage1/ArgMin"].out_types == {}  # int output left alone
    assert layers["stage1/cast_idx"].precision is None  # no float IO
    assert layers["stage1/trip"].precision is None and layers["lm/MatMul"].precision is None
    assert info["fp32_layers"] == 6 and info["precision"] == "fp16" and info["trt_version"] == "10.3.0.30"
    (prof,) = cfg.profiles
    assert prof["hidden"] == ((1, 1, 8), (1, 100, 8), (2, 100, 8))
    assert prof["values:image_start"] == ((0,), (32,), (100,))
    assert any("Building engine" in m for m in logs) and any("100%" in m for m in logs)
    # the timing cache is loaded on the next build
    trt_build.build_engine(onnx_path, tmp_path / "prune.engine", precision="fp32", profiles=profiles,
                           timing_cache_path=cache, progress=logs.append)
    assert fake_trt.configs[-1].cache.blob == b"CACHE" and fake_trt.configs[-1].flags == set()
    # strongly typed (what engines.py asks for; the only mode TensorRT 11 has): types come from the ONNX graph
    info = trt_build.build_engine(onnx_path, tmp_path / "st.engine", precision="fp16", profiles=profiles,
                                  fp32_layers_pattern="stage1", strongly_typed=True, progress=logs.append)
    assert fake_trt.network.flags == 1 << 1 and fake_trt.configs[-1].flags == set()
    assert info["strongly_typed"] and info["fp32_layers"] == 0


def test_build_engine_errors_are_one_line(fake_trt: _FakeTrt, tmp_path) -> None:
    onnx_path = tmp_path / "vision.onnx"
    onnx_path.write_bytes(b"x")
    with pytest.raises(StsError) as e:  # dynamic input without a profile
        trt_build.build_engine(onnx_path, tmp_path / "v.engine", precision="fp32", profiles=[], progress=print)
    assert "profile" in str(e.value) and "\n" not in str(e.value)
    fake_trt.parse_ok = False
    with pytest.raises(StsError) as e:
        trt_build.build_engine(onnx_path, tmp_path / "v.engine", precision="fp32", profiles=[], progress=print)
    assert "n7(Unique)" in str(e.value) and "sts_export.backends.tensorrt.check" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StsError, match="precision"):
        trt_build.build_engine(onnx_path, tmp_path / "v.engine", precision="int8", profiles=[])
    assert not (tmp_path / "v.engine").exists()


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
