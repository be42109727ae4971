"""The TensorRT build and runtime code against stand-ins of the TensorRT 10.3 and 11 Python APIs
(tests/trt_stand_ins.py; real TensorRT runs in test_trt_gpu.py)."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sts_export.backends.tensorrt import build as trt_build
from sts_export.backends.tensorrt import runtime as trt_runtime
from sts_export.errors import StsError
from tests.test_trt_check import FLOAT, _model
from tests.trt_stand_ins import (_DT, _CpuMemory, _FakeEngine, _FakeLayer, _FakeLayer11, _FakeNetwork, _FakeTensor,
                                 _FakeTrt, _FakeTrt11, _Flags)


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
