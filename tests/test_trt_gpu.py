"""TensorRT build + run on a real GPU, compared with onnxruntime. Skipped without `tensorrt` or CUDA."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.trt, pytest.mark.gpu]

trt = pytest.importorskip("tensorrt")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sts_export.backends.tensorrt import discovery as trt_discovery
from sts_export.export.tensorrt import build as trt_build  # noqa: E402
from sts_export.export.tensorrt import check as trt_check  # noqa: E402
from sts_export.errors import StsError  # noqa: E402
from sts_export.backends.tensorrt.runtime import TrtBackend  # noqa: E402

D = 16


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _matmul_softmax(path: Path) -> Path:
    """y = softmax(x @ W, -1) with x [B, S, D]; the matmul node carries the Stage-1 marker in its name."""
    w = np.random.default_rng(0).standard_normal((D, D)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["scores"], name="stage1/matmul"),
         helper.make_node("Softmax", ["scores"], ["y"], axis=-1, name="softmax")],
        "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", D])],
        initializer=[numpy_helper.from_array(w, "w")])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


def _segment(path: Path) -> Path:
    """A segment-shaped graph: hidden_out = 2*hidden, present = concat(past, hidden[:, None]) on the P axis."""
    g = helper.make_graph(
        [helper.make_node("Mul", ["hidden", "two"], ["hidden_out"], name="scale"),
         helper.make_node("Unsqueeze", ["hidden", "ax1"], ["h1"], name="unsq"),
         helper.make_node("Concat", ["past_key_0", "h1"], ["present_key_0"], axis=2, name="cat")],
        "seg",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["B", "S", D]),
         helper.make_tensor_value_info("past_key_0", TensorProto.FLOAT, ["B", 1, "P", D])],
        [helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, ["B", "S", D]),
         helper.make_tensor_value_info("present_key_0", TensorProto.FLOAT, ["B", 1, "P+S", D])],
        initializer=[numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                     numpy_helper.from_array(np.array([1], np.int64), "ax1")])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


SEG_SPEC = {"inputs": [{"name": "hidden", "dtype": "float32", "shape": ["B", "S", D]},
                       {"name": "past_key_0", "dtype": "float32", "shape": ["B", 1, "P", D]}],
            "outputs": [{"name": "hidden_out", "dtype": "float32", "shape": ["B", "S", D]},
                        {"name": "present_key_0", "dtype": "float32", "shape": ["B", 1, "P+S", D]}]}
MM_SPEC = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["B", "S", D]}],
           "outputs": [{"name": "y", "dtype": "float32", "shape": ["B", "S", D]}]}


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("trt-export")
    mm, seg = _matmul_softmax(d / "mm.onnx"), _segment(d / "segment1.onnx")
    assert trt_check.check_dir(d)["mm"].ok and trt_check.check_dir(d)["segment1"].ok
    cache = d / "timing.cache"
    logs: list[str] = []
    info_mm = trt_build.build_engine(  # strongly typed: an fp32 graph builds an fp32 engine
        mm, d / "mm.engine", precision="fp32", timing_cache_path=cache,
        profiles=trt_build.profiles_for_graph("mm", MM_SPEC, max_batch=2, max_prompt=64, max_context=128),
        workspace_bytes=1 << 28, opt_level=1, progress=logs.append)
    info_seg = trt_build.build_engine(
        seg, d / "segment1.engine", precision="fp32", timing_cache_path=cache, opt_level=1, progress=logs.append,
        profiles=trt_build.profiles_for_graph("segment1", SEG_SPEC, max_batch=2, max_prompt=64, max_context=128))
    return {"dir": d, "mm": mm, "seg": seg, "info_mm": info_mm, "info_seg": info_seg, "logs": logs, "cache": cache}


def test_build_info_and_files(built: dict) -> None:
    info = built["info_mm"]
    assert Path(info["engine"]).stat().st_size == info["size_bytes"] > 0
    assert info["trt_version"] == trt.__version__ and info["compute_capability"]
    assert info["precision"] == "fp32" and info["strongly_typed"]  # read back from TensorRT's parsed network
    with pytest.raises(StsError, match="--dtype fp16"):  # an fp32 graph is never labelled fp16
        trt_build.build_engine(built["mm"], built["dir"] / "mm16.engine", precision="fp16", opt_level=1,
                               profiles=trt_build.profiles_for_graph("mm", MM_SPEC, max_batch=2, max_prompt=64,
                                                                     max_context=128))
    assert built["cache"].exists() and built["cache"].stat().st_size > 0
    assert not list(built["dir"].glob(".*.tmp"))  # atomic writes left nothing behind
    assert any("parsing" in m for m in built["logs"])
    assert len(built["info_seg"]["profiles"]) == 2
    trt_discovery.check_engine_compatible(info)  # built here, so it runs here


def test_matmul_softmax_matches_onnxruntime(built: dict) -> None:
    be = TrtBackend(built["dir"], graphs=["mm"])
    x = np.random.default_rng(1).standard_normal((2, 7, D)).astype(np.float32)
    (ref,) = _ort(built["mm"], {"x": x})
    y = be.to_numpy(be.run("mm", {"x": be.from_numpy(x)})["y"])
    np.testing.assert_allclose(y, ref, atol=1e-4)  # fp32 engine (TF32 off)


def test_segment_prefill_then_decode_on_device(built: dict) -> None:
    be = TrtBackend(built["dir"], graphs=["segment1"])
    rng = np.random.default_rng(2)
    h = rng.standard_normal((1, 5, D)).astype(np.float32)
    past = np.zeros((1, 1, 0, D), np.float32)
    out = be.run("segment1", {"hidden": h, "past_key_0": be.from_numpy(past)})  # prefill: profile 0
    ref_h, ref_p = _ort(built["seg"], {"hidden": h, "past_key_0": past})
    np.testing.assert_allclose(be.to_numpy(out["hidden_out"]), ref_h, atol=1e-6)
    np.testing.assert_allclose(be.to_numpy(out["present_key_0"]), ref_p, atol=1e-6)
    assert isinstance(out["present_key_0"], torch.Tensor) and out["present_key_0"].is_cuda
    h1 = rng.standard_normal((1, 1, D)).astype(np.float32)
    out2 = be.run("segment1", {"hidden": h1, "past_key_0": out["present_key_0"]})  # decode: profile 1, cache on GPU
    assert be.engines["segment1"].active == 1
    _, ref_p2 = _ort(built["seg"], {"hidden": h1, "past_key_0": ref_p})
    np.testing.assert_allclose(be.to_numpy(out2["present_key_0"]), ref_p2, atol=1e-6)
    with pytest.raises(StsError, match="outside every optimisation profile"):
        be.run("segment1", {"hidden": np.zeros((1, 65, D), np.float32), "past_key_0": past})
    cat = be.concat([out["present_key_0"], out2["present_key_0"]], axis=2)
    assert tuple(cat.shape) == (1, 1, 11, D)


def test_second_build_reuses_timing_cache(built: dict) -> None:
    logs: list[str] = []
    trt_build.build_engine(built["mm"], built["dir"] / "mm2.engine", precision="fp32", opt_level=1,
                           timing_cache_path=built["cache"], progress=logs.append,
                           profiles=trt_build.profiles_for_graph("mm", MM_SPEC, max_batch=2, max_prompt=64,
                                                                 max_context=128))
    assert any("timing cache: loaded" in m for m in logs)
