"""The TensorRT build and runtime code against stand-ins of the TensorRT 10.3, 10.16 and 11 Python APIs
(tests/trt_stand_ins.py: each behaviour read from NVIDIA's headers and bindings; real TensorRT runs in
test_trt_gpu.py). The stand-in engines execute their ONNX graph with ONNX Runtime: a plumbing test of the runtime's
profiles, shapes, addresses and streams, never a TensorRT result."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sts_export.backends.tensorrt import discovery as trt_discovery
from sts_export.export.tensorrt import build as trt_build
from sts_export.backends.tensorrt import runtime as trt_runtime
from sts_export.errors import StsError
from tests.trt_stand_ins import (APIS, CACHE_MAGIC, DEFAULT_STREAM_WARNING, NETWORK_FLAGS, Network,
                                 StandInTrt, StandInTrt11, Tensor, TimingCache, _DT, _Flags, _LAYERS_10, _LAYERS_11,
                                 engine_meta, install)

ROOT = Path(__file__).resolve().parent.parent
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
D = 4


def _save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _segment(path: Path) -> Path:
    """segment-shaped: hidden_out = 2 * hidden [B, S, D]; present_key_0 = past_key_0 [B, 1, P, D] ++ hidden on P."""
    g = helper.make_graph(
        [helper.make_node("Mul", ["hidden", "two"], ["hidden_out"], name="scale"),
         helper.make_node("Unsqueeze", ["hidden", "ax1"], ["h1"], name="unsq"),
         helper.make_node("Concat", ["past_key_0", "h1"], ["present_key_0"], axis=2, name="cat")],
        "seg", [helper.make_tensor_value_info("hidden", FLOAT, ["B", "S", D]),
                helper.make_tensor_value_info("past_key_0", FLOAT, ["B", 1, "P", D])],
        [helper.make_tensor_value_info("hidden_out", FLOAT, ["B", "S", D]),
         helper.make_tensor_value_info("present_key_0", FLOAT, ["B", 1, "P+S", D])],
        initializer=[numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                     numpy_helper.from_array(np.array([1], np.int64), "ax1")])
    return _save(g, path)


SEG_SPEC = {"inputs": [{"name": "hidden", "dtype": "float32", "shape": ["B", "S", D]},
                       {"name": "past_key_0", "dtype": "float32", "shape": ["B", 1, "P", D]}]}


def _seg_profiles() -> list:
    return trt_build.profiles_for_graph("segment1", SEG_SPEC, max_batch=2, max_prompt=16, max_context=32)


def _quiet(msg: str) -> None:
    pass


# --- build: flags, calls, precision read-back -------------------------------------------------------------------

def _stand_in_network(api: str) -> Network:
    """A hand-made parsed network: fp16 weights (64 elements) and a small fp32 Stage-1 constant."""
    layers = _LAYERS_10 if api != "11" else _LAYERS_11
    f32, f16, i64 = _DT["FLOAT"], _DT["HALF"], _DT["INT64"]
    x = Tensor("hidden", f16, (-1, -1, 8), dim_names=("B", "S1", None))
    start = Tensor("image_start", i64, (), is_shape_tensor=True)
    return Network([
        layers["IConstantLayer"]("w_proj", [], [Tensor("w_proj", f16, (8, 8))], "CONSTANT",
                                 weights=np.zeros(64, np.float16)),
        layers["IConstantLayer"]("stage1_eps", [], [Tensor("stage1_eps", f32, (1,))], "CONSTANT",
                                 weights=np.zeros(1, np.float32)),
        layers["ILayer"]("stage1/MatMul", [x, x], [Tensor("stage1/scores", f32)]),
        layers["ILayer"]("lm/MatMul", [x, x], [Tensor("logits", f16)]),
    ], [x, start], [Tensor("logits", f16)])


@pytest.fixture(params=list(APIS))
def fake_trt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> StandInTrt:
    """The build stand-in with each API (10.3, 10.16, 11), holding a hand-made network."""
    fake = install(monkeypatch, request.param)
    fake.network = _stand_in_network(request.param)
    return fake


def _prune_graph(path: Path) -> Path:
    g = helper.make_graph([helper.make_node("Sub", ["x", "x"], ["s"], name="node_Sub_14"),
                           helper.make_node("Add", ["s", "x"], ["y"], name="node_Add_3")], "g",
                          [helper.make_tensor_value_info("x", FLOAT, [2])], [helper.make_tensor_value_info("y", FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    helper.set_metadata_props(m.graph.node[0], {"pkg.torch.onnx.name_scopes": "['', 'stage1', 'sub_14']"})
    helper.set_metadata_props(m.graph.node[1], {"pkg.torch.onnx.name_scopes": "['', 'lm', 'add_3']"})
    onnx.save(m, str(path))
    return path


PRUNE_SPEC = {"inputs": [{"name": "hidden", "dtype": "float16", "shape": ["B", "S1", 8]},
                         {"name": "image_start", "dtype": "int64", "shape": []}]}


def test_build_engine_plumbing(fake_trt: StandInTrt, tmp_path: Path) -> None:
    onnx_path = _prune_graph(tmp_path / "prune.onnx")
    assert trt_build.onnx_nodes_matching(onnx_path, "stage1") == {"node_Sub_14"}
    profiles = trt_build.profiles_for_graph("prune", PRUNE_SPEC, max_batch=2, max_prompt=100, max_context=200)
    logs: list[str] = []
    cache = tmp_path / "timing.cache"
    info = trt_build.build_engine(onnx_path, tmp_path / "out" / "prune.engine", precision="fp16", profiles=profiles,
                                  timing_cache_path=cache, workspace_bytes=1 << 30, progress=logs.append, opt_level=4)
    meta = engine_meta(tmp_path / "out" / "prune.engine")
    assert meta["version"] == fake_trt.__version__ and [t["name"] for t in meta["inputs"]] == ["hidden", "image_start"]
    assert not list((tmp_path / "out").glob(".*"))  # the temp file was renamed away
    assert cache.read_bytes().startswith(CACHE_MAGIC)
    cfg = fake_trt.configs[-1]
    # strongly typed on every API: the STRONGLY_TYPED network flag, no precision builder flag, TF32 off
    assert fake_trt.network_flags == {"STRONGLY_TYPED"} and cfg.flags == set() and cfg.cleared == {"TF32"}
    assert not any("set_flag" in c for c in fake_trt.calls)
    assert cfg.builder_optimization_level == 4 and cfg.pools == {"WORKSPACE": 1 << 30}
    for layer in fake_trt.network.layers:  # no layer precision is pinned (11 has no setter to call)
        assert getattr(layer, "precision", None) is None and getattr(layer, "out_types", {}) == {}
    # precision read back from the network: fp16 weights (64 elements) outweigh the fp32 Stage-1 constant
    assert info["precision"] == "fp16" and info["float_weights"] == {"fp16": 64, "fp32": 1}
    assert info["strongly_typed"] and info["trt_version"] == fake_trt.__version__
    assert info["io_dtypes"] == {"hidden": "HALF", "image_start": "INT64", "logits": "HALF"}
    (prof,) = cfg.profiles
    assert prof.shapes["hidden"] == ((1, 1, 8), (1, 100, 8), (2, 100, 8))
    assert prof.values["image_start"] == ((0,), (32,), (100,))
    assert any("Building engine" in m for m in logs) and any("100%" in m for m in logs)
    assert any(m.startswith("workspace pool limit: 1.00 GiB") for m in logs)
    # the timing cache is loaded on the next build, and gains what that build timed
    logs.clear()
    trt_build.build_engine(onnx_path, tmp_path / "prune.engine", profiles=profiles, timing_cache_path=cache,
                           progress=logs.append)
    assert fake_trt.configs[-1].cache.entries == 2 and any(m.startswith("timing cache: loaded") for m in logs)
    assert any("TensorRT's default limit, the device's total memory" in m for m in logs)  # no --workspace-gb
    assert fake_trt.configs[-1].pools == {}
    # asked for another precision than the network has: one line, before anything is built
    n_built = fake_trt.calls.count("builder.build_serialized_network")
    with pytest.raises(StsError) as e:
        trt_build.build_engine(onnx_path, tmp_path / "bf.engine", precision="bf16", profiles=profiles, progress=_quiet)
    assert "fp16 graph" in str(e.value) and "--dtype bf16" in str(e.value) and "\n" not in str(e.value)
    assert fake_trt.calls.count("builder.build_serialized_network") == n_built
    assert not (tmp_path / "bf.engine").exists()


@pytest.mark.parametrize("api", list(APIS))
def test_network_flags_as_each_release_numbers_them(api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NvInfer.h: STRONGLY_TYPED is 1 in 10.3 and 10.16 (EXPLICIT_BATCH is 0) and 0 in 11.0/11.1, which dropped
    EXPLICIT_BATCH and renumbered (1 is PREFER_JIT_PYTHON_PLUGINS there). The build derives the bit from the enum."""
    fake = install(monkeypatch, api)
    _build_calls(fake, tmp_path)
    bit = NETWORK_FLAGS[api]["STRONGLY_TYPED"]
    assert fake.flags == 1 << bit == trt_build._network_flags(fake) and fake.network_flags == {"STRONGLY_TYPED"}
    assert {"10.3": 2, "10.16": 2, "11": 1}[api] == fake.flags


def _build_calls(fake: StandInTrt, tmp_path: Path) -> list[str]:
    """The TensorRT calls one build_engine makes on stand-in `fake` (the same graph, profiles and options)."""
    path = tmp_path / f"g{fake.api}.onnx"
    w = numpy_helper.from_array(np.ones((8, 8), np.float16), "w")
    _save(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                            [helper.make_tensor_value_info("x", FLOAT16, ["B", 8])],
                            [helper.make_tensor_value_info("y", FLOAT16, ["B", 8])], [w]), path, opset=18)
    spec = {"inputs": [{"name": "x", "dtype": "float16", "shape": ["B", 8]}]}
    info = trt_build.build_engine(path, tmp_path / f"g{fake.api}.engine", precision="fp16", progress=_quiet,
                                  profiles=trt_build.profiles_for_graph("g", spec, max_batch=2, max_prompt=8,
                                                                        max_context=16),
                                  timing_cache_path=tmp_path / f"t{fake.api}.cache", workspace_bytes=1 << 20)
    assert info["precision"] == "fp16" and info["trt_version"] == fake.__version__
    return fake.calls


def test_same_strongly_typed_calls_on_every_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {}
    for api in APIS:
        fake = install(monkeypatch, api)
        calls[api] = [c if not c.startswith("builder.create_network(") else "builder.create_network(STRONGLY_TYPED)"
                      for c in _build_calls(fake, tmp_path)]
    assert calls["10.3"] == calls["10.16"] == calls["11"]  # one code path: no version branch in the calls made
    assert "config.clear_flag(TF32)" in calls["10.3"]
    assert not [c for c in calls["10.3"] if "set_flag" in c or "precision" in c]


def test_network_flag_shim_without_strongly_typed_member() -> None:
    later = type("trt", (), {"NetworkDefinitionCreationFlag": _Flags("NetworkDefinitionCreationFlag", ())})
    assert trt_build._network_flags(later) == 0  # a TensorRT that dropped the member: no flag at all
    assert trt_build._network_flags(StandInTrt) == 2 and trt_build._network_flags(StandInTrt11) == 1


def _conv_graph(path: Path, elem: int) -> Path:
    """A vision-like graph: an fp16/bf16 Conv (kernel 16x3x8x8 = 3072 weights + 16 bias) and one fp32 constant."""
    np_t = {FLOAT16: np.float16, TensorProto.BFLOAT16: np.float32}[elem]
    k = numpy_helper.from_array(np.zeros((16, 3, 8, 8), np_t), "patch.weight")
    b = numpy_helper.from_array(np.zeros((16,), np_t), "patch.bias")
    if elem == TensorProto.BFLOAT16:  # numpy has no bf16: retype the float32 initializers' raw bytes (zeros)
        for t in (k, b):
            t.data_type, t.raw_data = TensorProto.BFLOAT16, bytes(len(t.raw_data) // 2)
    eps = numpy_helper.from_array(np.full((1, 16, 1, 1), 1e-6, np.float32), "stage1_eps")
    g = helper.make_graph([helper.make_node("Conv", ["x", "patch.weight", "patch.bias"], ["c"], strides=[8, 8],
                                            name="patch"),
                           helper.make_node("Cast", ["c"], ["c32"], to=FLOAT, name="cast"),
                           helper.make_node("Add", ["c32", "stage1_eps"], ["y"], name="add")], "v",
                          [helper.make_tensor_value_info("x", elem, ["B", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", FLOAT, ["B", 16, 4, 4])], [k, b, eps])
    return _save(g, path, opset=22 if elem == TensorProto.BFLOAT16 else 18)


@pytest.mark.parametrize("api", list(APIS))
@pytest.mark.parametrize("elem,precision", [(FLOAT16, "fp16"), (TensorProto.BFLOAT16, "bf16")])
def test_precision_counts_layer_weights(elem: int, precision: str, api: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx-tensorrt gives a Conv's initializer kernel and bias to the IConvolutionLayer (not to constants): the
    read-back counts them (numpy arrays for fp16, trt.Weights for bf16), so a vision graph whose float weights are
    mostly in its Conv reads as the Conv's dtype, not as its small fp32 constants'."""
    install(monkeypatch, api)
    path = _conv_graph(tmp_path / "vision.onnx", elem)
    spec = {"inputs": [{"name": "x", "dtype": "float16", "shape": ["B", 3, 32, 32]}]}
    info = trt_build.build_engine(path, tmp_path / "vision.engine", precision=precision, progress=_quiet,
                                  profiles=trt_build.profiles_for_graph("vision", spec, max_batch=1, max_prompt=8,
                                                                        max_context=16))
    assert info["precision"] == precision and info["float_weights"] == {precision: 3072 + 16, "fp32": 16}


def test_build_engine_errors_are_one_line(fake_trt: StandInTrt, tmp_path: Path) -> None:
    onnx_path = tmp_path / "vision.onnx"
    onnx_path.write_bytes(b"x")
    with pytest.raises(StsError) as e:  # dynamic input without a profile
        trt_build.build_engine(onnx_path, tmp_path / "v.engine", profiles=[], progress=_quiet)
    assert "profile" in str(e.value) and "\n" not in str(e.value)
    fake_trt.parse_ok = False
    with pytest.raises(StsError) as e:
        trt_build.build_engine(onnx_path, tmp_path / "v.engine", profiles=[], progress=_quiet)
    assert "n7(Unique)" in str(e.value) and "sts check" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StsError, match="precision"):
        trt_build.build_engine(onnx_path, tmp_path / "v.engine", precision="int8", profiles=[])
    assert not (tmp_path / "v.engine").exists()


def test_require_tensorrt_refuses_an_unknown_major(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(trt_discovery._TRT_CACHE, "mod", type("trt", (), {"__version__": "12.0.0"}))
    with pytest.raises(StsError, match="newer than sts-export knows"):
        trt_discovery.require_tensorrt()
    monkeypatch.setitem(trt_discovery._TRT_CACHE, "mod", type("trt", (), {"__version__": "10.2.0"}))
    with pytest.raises(StsError, match="too old"):
        trt_discovery.require_tensorrt()


# --- build: the error paths the real API has -------------------------------------------------------------------

@pytest.mark.parametrize("api", list(APIS))
def test_foreign_timing_cache_starts_a_new_one(api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export directory copied from an x86 host to a Jetson carries a timing cache of another TensorRT:
    create_timing_cache gives None for it; the build notes it in one line, starts a new cache and replaces the file.
    A damaged file goes the same way; a cache of another GPU is refused by set_timing_cache (False)."""
    fake = install(monkeypatch, api)
    cache = tmp_path / "timing.cache"
    other = "11.1.0" if api != "11" else "10.3.0.30"
    for blob, says in [(TimingCache(other, fake.device, 7).serialize(), "written by another TensorRT version"),
                       (b"\x00garbage", "written by another TensorRT version (or is damaged)"),
                       (TimingCache(fake.__version__, "another GPU", 7).serialize(), "made on a GPU with other")]:
        cache.write_bytes(blob)
        logs: list[str] = []
        _build_calls_logged(fake, tmp_path, cache, logs.append)
        notes = [m for m in logs if "timing cache" in m]
        assert len(notes) == 1 and says in notes[0] and "starting a new one" in notes[0], logs
        assert cache.read_bytes() == TimingCache(fake.__version__, fake.device, 1).serialize()  # replaced


def _build_calls_logged(fake: StandInTrt, tmp_path: Path, cache: Path, log) -> dict:
    path = _segment(tmp_path / "segment1.onnx")
    return trt_build.build_engine(path, tmp_path / "segment1.engine", profiles=_seg_profiles(),
                                  timing_cache_path=cache, progress=log)


@pytest.mark.parametrize("api", list(APIS))
def test_failed_build_says_which_graph_and_why(api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """build_serialized_network returns None on a failed build, the reason in TensorRT's log: one line with both."""
    fake = install(monkeypatch, api)
    fake.fail_build = "Could not find any implementation for node cat."
    with pytest.raises(StsError) as e:
        _build_calls_logged(fake, tmp_path, tmp_path / "t.cache", _quiet)
    msg = str(e.value)
    assert "\n" not in msg and "segment1.onnx" in msg and "Could not find any implementation for node cat" in msg
    assert "+1 more TensorRT error" in msg and not (tmp_path / "segment1.engine").exists()


def _bad(profile: dict, **change) -> list[dict]:
    return [{**profile, **change}]


PROFILE = {"hidden": ((1, 1, D), (1, 8, D), (2, 16, D)), "past_key_0": ((1, 1, 0, D), (1, 1, 0, D), (2, 1, 0, D))}
BAD_PROFILES = {  # what is wrong -> (profile, words the one line must hold)
    "opt below min": (_bad(PROFILE, hidden=((1, 9, D), (1, 8, D), (2, 16, D))),
                      ["profile 0", "'hidden'", "0 <= min <= opt <= max", "9/8/16"]),
    "rank of the input differs": (_bad(PROFILE, hidden=((1, 1), (1, 8), (2, 16))),
                                  ["profile 0", "'hidden'", "rank 3", "2/2/2"]),
    "min/opt/max ranks differ": (_bad(PROFILE, hidden=((1, 1, D), (1, 8), (2, 16, D))),
                                 ["profile 0", "'hidden'", "ranks 3/2/3"]),
    "fixed dim changed": (_bad(PROFILE, hidden=((1, 1, 8), (1, 8, 8), (2, 16, 8))),
                          ["profile 0", "'hidden'", "dim 2 is fixed at 4"]),
    "dynamic input not covered": ([{"hidden": PROFILE["hidden"]}], ["profile 0", "'past_key_0'", "no shapes"]),
}


@pytest.mark.parametrize("case", list(BAD_PROFILES))
def test_invalid_profile_is_one_line_before_any_build(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conditions of IOptimizationProfile::setDimensions (NvInferRuntime.h), checked against the parsed network
    before TensorRT sees the profile: one line naming the graph, the profile, the input and what is wrong."""
    fake = install(monkeypatch, "11")
    profiles, words = BAD_PROFILES[case]
    path = _segment(tmp_path / "segment1.onnx")
    with pytest.raises(StsError) as e:
        trt_build.build_engine(path, tmp_path / "segment1.engine", profiles=profiles, progress=_quiet)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("segment1: ") and all(w in msg for w in words), msg
    assert "builder.build_serialized_network" not in fake.calls


def test_shape_tensor_values_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """setShapeValuesV2: one value per element of the shape tensor, min <= opt <= max."""
    fake = install(monkeypatch, "10.3")
    fake.network = _stand_in_network("10.3")
    path = _prune_graph(tmp_path / "prune.onnx")
    (good,) = trt_build.profiles_for_graph("prune", PRUNE_SPEC, max_batch=1, max_prompt=100, max_context=200)
    for values, words in [(((0, 1), (5, 5), (9, 9)), "holds 1 value(s) but the profile gives 2/2/2"),
                          (((50,), (5,), (100,)), "value 0 needs min <= opt <= max, got 50/5/100")]:
        with pytest.raises(StsError) as e:
            trt_build.build_engine(path, tmp_path / "p.engine", profiles=[{**good, "__values__": {"image_start": values}}],
                                   progress=_quiet)
        assert "\n" not in str(e.value) and "'image_start'" in str(e.value) and words in str(e.value), str(e.value)
    assert "builder.build_serialized_network" not in fake.calls


def test_stand_in_refuses_what_the_real_api_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in itself: set_shape raises on a rank mismatch, an invalid profile is -1, a profile that does not
    fit the network fails the build (None) with the reason logged, set_timing_cache(None) is a TypeError."""
    fake = install(monkeypatch, "11")
    logger = trt_discovery.trt_logger(fake)
    builder = fake.Builder(logger)
    config = builder.create_builder_config()
    p = builder.create_optimization_profile()
    with pytest.raises(RuntimeError, match="Shape provided for opt is inconsistent with other shapes"):
        p.set_shape("hidden", (1, 1, D), (1, 8), (2, 16, D))
    p.set_shape("hidden", (1, 9, D), (1, 8, D), (2, 16, D))
    assert not p and config.add_optimization_profile(p) == -1
    with pytest.raises(TypeError):
        config.set_timing_cache(None, False)
    path = _segment(tmp_path / "segment1.onnx")
    network = builder.create_network(0)
    parser = fake.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path))
    q = builder.create_optimization_profile()
    q.set_shape("hidden", (1, 1, D), (1, 8, D), (2, 16, D))
    assert config.add_optimization_profile(q) == 0
    since = len(logger.errors)
    assert builder.build_serialized_network(network, config) is None
    assert "past_key_0: dynamic input is missing dimensions in profile 0." in logger.why(since)


# --- runtime ----------------------------------------------------------------------------------------------------

def _engine_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: str = "11") -> tuple[StandInTrt, Path]:
    fake = install(monkeypatch, api)
    d = tmp_path / "engines"
    d.mkdir(exist_ok=True)
    path = _segment(d / "segment1.onnx")
    trt_build.build_engine(path, d / "segment1.engine", profiles=_seg_profiles(), progress=_quiet)
    return fake, d


def _ort(path: Path, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("api", ["10.3", "11"])
def test_runtime_run_plumbing(api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill then decode through TrtBackend: profile chosen from the shapes, buffers 256-byte aligned, outputs
    read back by shape, and the stand-in's execution (ONNX Runtime underneath) equal to ONNX Runtime's own run."""
    fake, d = _engine_dir(tmp_path, monkeypatch, api)
    be = trt_runtime.TrtBackend(d, check_manifest=False)
    e = be.engines["segment1"]
    assert e.inputs == ["hidden", "past_key_0"] and e.outputs == ["hidden_out", "present_key_0"] and len(e.ranges) == 2
    rng = np.random.default_rng(0)
    h = rng.standard_normal((1, 5, D)).astype(np.float32)
    past = np.zeros((1, 1, 0, D), np.float32)
    out = be.run("segment1", {"hidden": h, "past_key_0": be.from_numpy(past)})
    want = _ort(d / "segment1.onnx", {"hidden": h, "past_key_0": past})
    assert e.active == 0 and np.array_equal(be.to_numpy(out["hidden_out"]), want[0])
    assert np.array_equal(be.to_numpy(out["present_key_0"]), want[1])
    h2 = rng.standard_normal((1, 1, D))  # float64: converted to the engine's float32
    out2 = be.run("segment1", {"hidden": h2, "past_key_0": out["present_key_0"]})
    want2 = _ort(d / "segment1.onnx", {"hidden": h2.astype(np.float32), "past_key_0": want[1]})
    assert e.active == 1
    assert np.array_equal(be.to_numpy(out2["present_key_0"]), want2[1]) and be.to_numpy(out2["present_key_0"]).shape == (1, 1, 6, D)
    assert be.to_numpy(be.concat([out["present_key_0"], out2["present_key_0"]], 2)).shape == (1, 1, 11, D)
    for t in (out["hidden_out"], out2["present_key_0"]):
        assert t.data_ptr() % 256 == 0
    with pytest.raises(StsError, match="missing input"):
        be.run("segment1", {"hidden": np.ones((1, 1, D), np.float32)})
    with pytest.raises(StsError, match="no TensorRT engine 'vision'"):
        be.run("vision", {})
    with pytest.raises(StsError, match="outside every optimisation profile"):
        be.run("segment1", {"hidden": np.ones((1, 2, D), np.float32), "past_key_0": np.zeros((1, 1, 3, D), np.float32)})


def test_runtime_runs_on_a_stream_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NvInferRuntime.h (enqueueV3): the default stream "may lead to performance issues due to additional
    cudaDeviceSynchronize() calls by TensorRT"; TensorRT logs a warning for it. The engine gets a stream of its own,
    which waits for torch's stream before and is waited for after (events, no host sync)."""
    fake, d = _engine_dir(tmp_path, monkeypatch)
    be = trt_runtime.TrtBackend(d, check_manifest=False)
    be.run("segment1", {"hidden": np.ones((1, 3, D), np.float32), "past_key_0": np.zeros((1, 1, 0, D), np.float32)})
    ctx = be.engines["segment1"].context
    assert ctx.streams and 0 not in ctx.streams  # not the legacy default stream
    assert not [m for _, m in fake.logs if m == DEFAULT_STREAM_WARNING]
    s = ctx.streams[0]
    assert fake.torch.cuda.waits == [(s, 0), (0, s)]  # engine waits for torch, then torch for the engine


def test_runtime_refusals_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What TensorRT refuses at run time is one line naming the graph, the tensor and TensorRT's logged reason:
    set_input_shape False (with the profile's range), an address refused, an enqueue refused (here: dims named B
    differ between inputs; NvInfer.h: "Dimensions with the same non-empty name must be equal at runtime"), an
    engine of another TensorRT version."""
    fake, d = _engine_dir(tmp_path, monkeypatch)
    be = trt_runtime.TrtBackend(d, check_manifest=False)
    feeds = {"hidden": np.ones((1, 3, D), np.float32), "past_key_0": np.zeros((1, 1, 0, D), np.float32)}
    ctx = be.engines["segment1"].context
    real_set = ctx.set_input_shape

    def refuse_past(name: str, shape: tuple) -> bool:  # TensorRT refusing a shape the runtime thought fits
        if name != "past_key_0":
            return real_set(name, shape)
        real_set(name, (9, 9, 9, 9))  # the stand-in's own refusal: logs TensorRT's satisfyProfile error
        return False

    monkeypatch.setattr(ctx, "set_input_shape", refuse_past)
    with pytest.raises(StsError) as e:
        be.run("segment1", feeds)
    msg = str(e.value)
    assert "\n" not in msg and "input 'past_key_0'" in msg and "[1, 1, 0, 4]..[2, 1, 0, 4]" in msg, msg
    assert "satisfyProfile" in msg
    monkeypatch.setattr(ctx, "set_input_shape", real_set)
    with pytest.raises(StsError) as e:  # B = 1 and B = 2: each within the profile, together inconsistent
        be.run("segment1", {**feeds, "past_key_0": np.zeros((2, 1, 0, D), np.float32)})
    msg = str(e.value)
    assert "\n" not in msg and "execution failed" in msg and "B: input dimensions with this name are inconsistent" in msg
    real_empty = be.mem.empty

    def misaligned(shape: tuple, trt_name: str) -> tuple:
        t, _ = real_empty((int(np.prod(shape)) + 1,), trt_name)
        v = t[1:].view(shape)
        return v, v.data_ptr()

    monkeypatch.setattr(be.mem, "empty", misaligned)
    with pytest.raises(StsError) as e:
        be.run("segment1", feeds)
    assert "\n" not in str(e.value) and "tensor 'hidden_out'" in str(e.value) and "256-byte aligned" in str(e.value)
    other = APIS["10.3"]()
    monkeypatch.setitem(trt_discovery._TRT_CACHE, "mod", other)
    with pytest.raises(StsError) as e:
        trt_runtime.TrtBackend(d, check_manifest=False)
    assert "\n" not in str(e.value) and "could not load" in str(e.value) and "Version tag does not match" in str(e.value)


def test_stand_in_context_follows_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """get_tensor_shape: -1 for every runtime dim not known yet; set_input_shape: False outside the profile;
    set_tensor_address: False for a device pointer that is not 256-byte aligned."""
    fake, d = _engine_dir(tmp_path, monkeypatch)
    engine = fake.Runtime(trt_discovery.trt_logger(fake)).deserialize_cuda_engine((d / "segment1.engine").read_bytes())
    ctx = engine.create_execution_context()
    assert ctx.get_tensor_shape("hidden") == (-1, -1, D) and ctx.get_tensor_shape("present_key_0") == (-1, 1, -1, D)
    assert not ctx.set_input_shape("hidden", (3, 1, D)) and not ctx.set_input_shape("hidden", (1, 1, 5))
    assert ctx.set_input_shape("hidden", (1, 2, D)) and ctx.get_tensor_shape("hidden") == (1, 2, D)
    assert ctx.get_tensor_shape("hidden_out") == (-1, -1, D)  # past_key_0 not bound yet
    assert not ctx.set_tensor_address("hidden", 4096 + 64) and ctx.set_tensor_address("hidden", 4096 * 3)
    assert not ctx.set_tensor_address("nope", 4096)


# --- workspace (memory.py) and the self-test, on real tiny exports --------------------------------------------

@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny-llava fp32 and tiny-llava-gqa fp16 (test_export.py's exports when they exist in this session)."""
    from tests.test_trt_versions import _reuse_or_export

    root = tmp_path_factory.mktemp("trt-api")
    return {"tiny-llava-fp32": _reuse_or_export(root, ("tiny-llava", "sts", 64)),
            "tiny-llava-gqa-fp16": _reuse_or_export(root, ("tiny-llava-gqa", "sts", 32, "fp16"), dtype="fp16")}


@pytest.mark.parametrize("unified", [True, False])
def test_workspace_limit(unified: bool, exports: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT's default workspace pool is the device's whole memory (NvInfer.h, kWORKSPACE). On a discrete GPU the
    build leaves it (GPU memory, outside the host estimate); on unified memory (Jetson) it would be all host memory,
    so without --workspace-gb the build sets the limit the estimate counted and says so in one line."""
    import shutil

    from sts_export.export.tensorrt.engines import build_engines
    from sts_export.artifact import memory

    fake = install(monkeypatch, "11")
    work = tmp_path / "e"
    shutil.copytree(exports["tiny-llava-gqa-fp16"], work)
    monkeypatch.setattr(memory, "is_unified_memory", lambda: unified)
    monkeypatch.setenv(memory.FAKE_ENV, "8G")
    lines: list[str] = []
    m = build_engines(work, progress=lines.append)
    pools = {c.pools.get("WORKSPACE") for c in fake.configs}
    ws = [line for line in lines if line.startswith("workspace: ")]
    assert len(ws) == 1, lines
    if unified:
        (limit,) = pools
        est = [line for line in lines if line.startswith("memory: engine build needs")][0]
        assert f"workspace (limit set by the build) {memory.fmt(limit)}" in est
        assert 1024**3 <= limit <= 8 * 1024**3 * 0.9 and f"{limit / 1024**3:.1f} GiB" in ws[0]
        assert "TensorRT's default is the whole unified memory" in ws[0] and m["tensorrt"]["workspace_bytes"] == limit
    else:
        assert pools == {None} and "TensorRT's default pool limit" in ws[0] and m["tensorrt"]["workspace_bytes"] is None


def _selftest(args: list[str]) -> int:
    """`sts selftest ARGS` in this process (the stand-in installed by the test); its exit status."""
    from sts_export.cli.main import main

    try:
        main(["selftest", *args], prog_name="sts", standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_selftest_report_on_the_stand_in(exports: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    """The self-test's plumbing: engines built with the package's own build, run through TrtBackend and compared
    with ONNX Runtime on the same feeds, one report. On the stand-in the engines ARE ONNX Runtime, so every figure
    must be exact; the report's first line says it is a stand-in run."""
    from sts_export.show import selftest

    fake = install(monkeypatch, "11")
    rc = _selftest(["--work", str(tmp_path / "w"), "--use-export", f"tiny-llava:fp32={exports['tiny-llava-fp32']}",
                        "--use-export", f"tiny-llava-gqa:fp16={exports['tiny-llava-gqa-fp16']}",
                        "--max-new-tokens", "6"])
    assert sum(c.startswith("context.execute_async_v3") for c in fake.calls) >= 2 * 5  # the engines ran
    out = capsys.readouterr().out
    report = out[out.index(selftest.REPORT_START):]
    lines = report.splitlines()
    assert rc == 0, report
    assert lines[1].startswith("STAND-IN") and "not a TensorRT result" in lines[1]
    rows = {(r.split()[0], r.split()[1]): r for r in lines if r.startswith("tiny-")}
    assert set(rows) == {("tiny-llava", "fp32"), ("tiny-llava-gqa", "fp16")}
    for row in rows.values():
        assert row.split()[-1] == "PASS" and " 6/6 " in row, row
    assert "summary: 2 PASS, 0 DIFFERS, 0 FAIL" in report
    assert (tmp_path / "w" / "tiny-llava-fp32" / "segment1.engine").is_file()  # built in a copy, not in the export
    assert not list(exports["tiny-llava-fp32"].glob("*.engine"))


def test_selftest_reports_a_failed_build(exports: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    fake = install(monkeypatch, "10.3")
    fake.fail_build = "Could not find any implementation for node /Loop."
    rc = _selftest(["--work", str(tmp_path / "w"), "--use-export", f"tiny-llava:fp32={exports['tiny-llava-fp32']}"])
    report = capsys.readouterr().out
    assert rc == 1
    row = [r for r in report.splitlines() if r.startswith("tiny-llava ")][0]
    assert row.split()[2] == "failed" and row.split()[-1] == "FAIL"
    assert "tiny-llava fp32: TensorRT failed to build" in report and "Could not find any implementation" in report


def test_selftest_sees_a_difference(exports: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    """The comparison is real: engines whose logits are off by 0.01 (above fp32's 1e-4) are DIFFERS, with the figure."""
    fake = install(monkeypatch, "11")
    fake.perturb = {"logits": 0.01}
    rc = _selftest(["--work", str(tmp_path / "w"), "--use-export", f"tiny-llava:fp32={exports['tiny-llava-fp32']}",
                        "--max-new-tokens", "4"])
    report = capsys.readouterr().out
    row = [r for r in report.splitlines() if r.startswith("tiny-llava ")][0]
    assert rc == 1 and row.split()[-1] == "DIFFERS" and "1.0e-02 (1e-04)" in row, report
    tokens, keep_pre, keep_post = row.split()[-6:-3]  # a constant shift keeps the argmax and the picks
    assert tokens == "4/4" and all(a == b for a, b in (f.split("/") for f in (keep_pre, keep_post))), row


def test_selftest_without_tensorrt_is_one_line(tmp_path: Path) -> None:
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'tensorrt' or name.startswith('tensorrt.'):\n"
            "        raise ImportError(\"No module named 'tensorrt'\")\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "from sts_export.cli.main import main\n"
            "main(['selftest'], prog_name='sts')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and "TensorRT is not installed" in r.stderr
