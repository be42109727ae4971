"""TensorRT 10.3 / 10.16 / 11.x: strongly typed builds of real tiny exports on stand-ins of both Python APIs, the
multi-version static check through export.py, bad inputs refused in one line, and what runs a bf16 export here.

Exports are reused: the fp32 (tiny-llava sts 64) and fp16 (tiny-llava-gqa sts 32) ones of test_export.py when that
module ran first in this session, else made here without validation; the bf16 one (opset 22) is made once here.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from sts_export.backends.tensorrt import discovery as trt_discovery
from sts_export.errors import StsError
from sts_export.artifact.manifest import graph_dtype, graph_opset, read_manifest
from sts_export.export.onnx import export
from tests.test_trt_check import _attention
from tests.trt_stand_ins import APIS, NETWORK_FLAGS, StandInTrt, engine_meta, install

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trt-versions")


def _reuse_or_export(root: Path, key: tuple, **kw) -> Path:
    try:
        from tests import test_export

        d = test_export._EXPORTS.get(key)
        if d is not None and (d / "manifest.json").is_file():
            return d
    except ImportError:
        pass
    name, method, budget = key[:3]
    d = export(name, budget=budget, method=method, out=root / "-".join(map(str, key)), validate=False,
               progress=lambda s: None, **kw)
    try:
        from tests import test_export

        test_export._EXPORTS.setdefault(key, d)
    except ImportError:
        pass
    return d


@pytest.fixture(scope="module")
def fp32_dir(root: Path) -> Path:
    return _reuse_or_export(root, ("tiny-llava", "sts", 64))


@pytest.fixture(scope="module")
def fp16_dir(root: Path) -> Path:
    return _reuse_or_export(root, ("tiny-llava-gqa", "sts", 32, "fp16"), dtype="fp16")


@pytest.fixture(scope="module")
def bf16_dir(root: Path) -> Path:
    return export("tiny-llava", budget=64, method="sts", dtype="bf16", out=root / "tl-bf16", validate=False,
                  progress=lambda s: None)


def _stand_in(monkeypatch: pytest.MonkeyPatch, api: str) -> StandInTrt:
    """Install the stand-in `tensorrt` of `api`; its parser reads the real ONNX files (weights, IO)."""
    return install(monkeypatch, api)


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


# --- the graphs: dtype and opset as written, Stage 1/2 in float32 ---------------------------------------------

def _typed(graph: onnx.GraphProto, acc: dict[str, int]) -> dict[str, int]:
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        acc[vi.name] = vi.type.tensor_type.elem_type
    for t in graph.initializer:
        acc[t.name] = t.data_type
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _typed(a.g, acc)
    return acc


def _selection_input_types(path: Path) -> dict[str, str]:
    """The element type of the scores every greedy pick / top-k reads (ArgMin, ArgMax, TopK; Loop bodies too)."""
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)), data_prop=True)
    types = _typed(m.graph, {})
    found: dict[str, str] = {}

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            if n.op_type in ("ArgMin", "ArgMax", "TopK") and n.input and n.input[0]:
                found[n.name] = onnx.TensorProto.DataType.Name(types.get(n.input[0], 0))
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(m.graph)
    return found


@pytest.mark.parametrize("which,dtype,opset", [("bf16", "bf16", 22), ("fp16", "fp16", 18)])
def test_low_precision_graphs_keep_selection_in_fp32(which: str, dtype: str, opset: int, request) -> None:
    d = request.getfixturevalue(f"{which}_dir")
    m = read_manifest(d)
    assert m["dtype"] == dtype and m["opset"] == opset  # read from the files
    for name, g in m["graphs"].items():
        assert graph_opset(d / g["onnx"]) == opset and graph_dtype(d / g["onnx"]) == dtype, name
    picks = {**_selection_input_types(d / "vision.onnx"), **_selection_input_types(d / "prune.onnx")}
    assert picks and set(picks.values()) <= {"FLOAT", "INT64"}, picks  # never a bf16/fp16 score


# --- builds on both stand-in APIs ------------------------------------------------------------------------------

@pytest.mark.parametrize("api", list(APIS))
@pytest.mark.parametrize("which", ["bf16", "fp16"])
def test_builds_record_the_graphs_dtype(which: str, api: str, request, root: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from sts_export.export.tensorrt.engines import build_engines

    src = request.getfixturevalue(f"{which}_dir")
    work = root / f"build-{which}-{api}"
    shutil.copytree(src, work)
    fake = _stand_in(monkeypatch, api)
    m = build_engines(work, progress=lambda s: None)
    assert m["tensorrt"]["precision"] == which and m["tensorrt"]["strongly_typed"]
    assert m["tensorrt"]["version"] == fake.__version__ and m["tensorrt"]["compute_capability"] == "8.7"
    assert m["tensorrt"]["version_compatible"] is False
    for name, g in m["graphs"].items():
        assert g["engine_precision"] == which and engine_meta(work / g["engine"])["onnx"].endswith(g["onnx"]), name
    assert read_manifest(work)["tensorrt"]["precision"] == which  # what was written
    # the same strongly typed calls on both APIs: STRONGLY_TYPED network, TF32 off, no precision flag at all
    flag = 1 << NETWORK_FLAGS[api]["STRONGLY_TYPED"]  # as NvInfer.h of that release numbers it
    assert fake.calls.count(f"builder.create_network({flag})") == len(m["graphs"])
    assert not [c for c in fake.calls if "set_flag" in c]
    # asking the built dtype explicitly is the same build; asking another one is refused before any parse
    calls = len(fake.calls)
    other = "fp16" if which == "bf16" else "bf16"
    with pytest.raises(StsError, match=f"--dtype {other}"):
        build_engines(work, precision=other, progress=lambda s: None)
    assert len(fake.calls) == calls


@pytest.mark.parametrize("api", list(APIS))
def test_fp32_export_asked_for_fp16_is_refused(fp32_dir: Path, api: str, root: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from sts_export.export.tensorrt.engines import build_engines

    work = root / f"refuse-{api}"
    shutil.copytree(fp32_dir, work)
    before = _digest(work)
    fake = _stand_in(monkeypatch, api)
    with pytest.raises(StsError) as e:
        build_engines(work, precision="fp16", progress=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and "--precision fp16 cannot be met" in msg and "are fp32" in msg and "--dtype fp16" in msg
    assert fake.calls == [] and _digest(work) == before and not list(work.glob("*.engine"))


def test_next_export_builds_with_token_dims(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """LLaVA-NeXT's length-only inputs (k_pre [K], k_post [K']) and T/N/K/Kp dims go through the same build."""
    from tests import test_export

    src = test_export._EXPORTS.get(("tiny-llava-next", "sts", 320))
    if src is None:
        pytest.skip("reuses test_export.py's tiny-llava-next export (run the whole suite)")
    from sts_export.export.tensorrt.engines import build_engines

    work = root / "build-next"
    shutil.copytree(src, work)
    fake = _stand_in(monkeypatch, "11")
    m = build_engines(work, progress=lambda s: None)
    assert m["tensorrt"]["precision"] == "fp32" and fake.calls.count("builder.build_serialized_network") == len(m["graphs"])
    assert any("k_pre" in p for g in m["graphs"].values() for p in g["engine_profiles"])


def test_runtime_refuses_another_tensorrt_in_one_line(tmp_path: Path) -> None:
    here = {"trt_version": "11.4.1.2", "compute_capability": "8.7", "gpu": "Thor"}
    with pytest.raises(StsError) as e:
        trt_discovery.check_engine_compatible({"version": "10.16.1", "compute_capability": "8.7"}, here=here)
    assert "\n" not in str(e.value) and "TensorRT 10.16.1" in str(e.value) and "version-compatible" in str(e.value)
    trt_discovery.check_engine_compatible({"version": "11.4.1.2", "compute_capability": "8.7"}, here=here)


# --- export.py: the multi-version check and the bad inputs ---------------------------------------------------

def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_check_only_prints_one_verdict_per_version(bf16_dir: Path) -> None:
    r = _cli("--onnx-dir", str(bf16_dir), "--target", "trt", "--check-only", "--trt-version", "10.3,10.16,11.4")
    verdicts = [l for l in r.stdout.splitlines() if " compatibility: " in l]
    assert verdicts == ["TensorRT 10.3 compatibility: PASS", "TensorRT 10.16 compatibility: PASS",
                        "TensorRT 11.4 compatibility: PASS"], r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0
    assert "opset 22 is newer than the 20 TensorRT 10.3 documents" in r.stdout  # bf16 needs 22: a warning on 10.3


def test_planted_attention_passes_11_4_and_fails_10_3(fp16_dir: Path, root: Path) -> None:
    from click.testing import CliRunner

    import export as export_cli

    work = root / "planted"
    shutil.copytree(fp16_dir, work)
    onnx.save(_attention(), str(work / "attention.onnx"))  # ONNX Attention, opset 23, 4-D Q/K/V
    r = CliRunner().invoke(export_cli.main, ["--onnx-dir", str(work), "--target", "trt", "--check-only",
                                             "--trt-version", "10.3,11.4"])
    assert r.exit_code == 1
    assert "TensorRT 10.3 compatibility: FAIL" in r.output and "TensorRT 11.4 compatibility: PASS" in r.output
    assert "op 'Attention' is not in the TensorRT 10.3 ONNX parser's support table" in r.output


BAD = [
    (["--opset", "7"], "--opset 7 cannot be written"),
    (["--opset", "99"], "--opset 99 cannot be written"),
    (["--dtype", "bf16", "--opset", "18"], "cannot hold bf16 graphs"),
    (["--trt-version", "abc"], "--trt-version 'abc' is not a TensorRT version"),
    (["--trt-version", "9.0"], "TensorRT 9.0 is not covered"),
    (["--trt-version", "10.3,11.x"], "--trt-version '11.x' is not a TensorRT version"),
    (["--trt-version", "10.3.1.2.3.4"], "'10.3.1.2.3.4' is not a TensorRT version"),
    (["--out", "/proc/x"], "--out /proc/x cannot be written"),
    (["--dtype", "fp16", "--precision", "bf16", "--target", "trt"], "--precision bf16 cannot be met"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_inputs_are_one_line_and_write_nothing(args: list[str], msg: str, tmp_path: Path) -> None:
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    r = _cli("--model", "tiny-llava", *args, *out, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert msg in r.stderr
    assert list(tmp_path.iterdir()) == [] and not Path("/proc/x").exists()  # nothing written anywhere


def test_bad_inputs_on_the_onnx_dir_path(fp32_dir: Path) -> None:
    from click.testing import CliRunner

    import export as export_cli

    before = _digest(fp32_dir)
    for args, msg in [(["--trt-version", "11.x", "--check-only"], "'11.x' is not a TensorRT version"),
                      (["--precision", "fp16", "--check-only"], "--precision fp16 cannot be met"),
                      (["--precision", "fp16"], "--precision fp16 cannot be met")]:
        r = CliRunner().invoke(export_cli.main, ["--onnx-dir", str(fp32_dir), "--target", "trt", *args])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
    assert _digest(fp32_dir) == before


def test_bf16_export_needs_no_validate() -> None:
    with pytest.raises(StsError, match="no bfloat16 kernels.*--no-validate"):
        export("tiny-llava", dtype="bf16", out="/nonexistent/never", progress=lambda s: None)


# --- bf16: what runs it here -----------------------------------------------------------------------------------

def _bf16_ops() -> list[type]:
    """Op overrides for onnx's reference evaluator on bf16 graphs.

    * GatherElements: the reference goes through np.choose, which takes at most 64 choices (Stage 1 gathers along
      576 patches); np.take_along_axis does the same op.
    * Loop: the reference reads an omitted `cond` (Stage 1's Loop has none: ONNX says "true") as None and runs no
      iteration (onnx 1.23: every pick equal to the first); here an omitted cond is true.
    * MatMul, Conv, LayerNormalization, Softmax, Sigmoid, ReduceMean, ReduceSum: computed in float32 and rounded to
      bf16 once per output, as TensorRT's bf16 kernels and torch's CPU bf16 ops do. The plain reference evaluator
      accumulates in bfloat16 (ml_dtypes) and ignores LayerNormalization's stash_type: measured on the tiny vision
      graph its kept-token embeddings land 0.35 from torch bf16 (torch bf16 vs fp32: 0.037); with these, 0.047.
    """
    import ml_dtypes
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops import load_op

    bf = ml_dtypes.bfloat16

    class GatherElements(OpRun):
        def _run(self, data, indices, axis=None):  # noqa: ANN001, ANN202
            axis = int(axis or 0)
            idx = np.where(indices < 0, indices + data.shape[axis], indices)
            return (np.take_along_axis(data, idx.astype(np.int64), axis=axis),)

    class Loop(load_op("", "Loop", 21)):
        def _run(self, m, cond, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            return super()._run(m, np.array(True) if cond is None else cond, *args, **kw)

    def fp32_inside(op_type: str) -> type:
        base = load_op("", op_type, 22)

        def _run(self, *xs, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            low = any(getattr(x, "dtype", None) == bf for x in xs)
            ys = [x.astype(np.float32) if getattr(x, "dtype", None) == bf else x for x in xs]
            out = base._run(self, *ys, **kw)
            return tuple(o.astype(bf) if low and getattr(o, "dtype", None) == np.float32 else o for o in out)

        return type(op_type, (base,), {"_run": _run, "op_domain": ""})

    return [GatherElements, Loop] + [fp32_inside(o) for o in ("MatMul", "Conv", "LayerNormalization", "Softmax", "Sigmoid",
                                                       "ReduceMean", "ReduceSum")]


def _common_rows(keep_a: np.ndarray, emb_a: np.ndarray, keep_b: np.ndarray, emb_b: np.ndarray) -> tuple[int, float]:
    """(tokens both kept, max abs diff of their embeddings) for one image."""
    a, b = list(keep_a.reshape(-1)), list(keep_b.reshape(-1))
    both = sorted(set(a) & set(b))
    ea = emb_a.reshape(len(a), -1)[[a.index(i) for i in both]].astype(np.float32)
    eb = emb_b.reshape(len(b), -1)[[b.index(i) for i in both]].astype(np.float32)
    return len(both), float(np.abs(ea - eb).max(initial=0.0))


def test_bf16_graphs_run_in_onnx_reference_and_match_torch_bf16(bf16_dir: Path) -> None:
    """ONNX Runtime's CPU provider cannot load the bf16 graphs (no bfloat16 Mul/Conv kernels); onnx's reference
    evaluator runs them (ml_dtypes bfloat16, see `_bf16_ops`). Each graph against the torch bf16 module it was
    exported from: decoder graphs on the exporter's example inputs; vision on a smooth image, where Stage 1's
    greedy picks are compared as sets (bf16 rounding flips near-ties: torch bf16 vs torch fp32 keep 92/96 alike)."""
    import ml_dtypes
    import onnxruntime as ort
    import torch
    from onnx.reference import ReferenceEvaluator

    from sts_export.checkpoint import load_model, resolve
    from sts_export.export.io import example_inputs
    from sts_export.families.llava import preprocess_image
    from sts_export.artifact.plan import Plan
    from sts_export.graphs import build_graphs
    from tests.conftest import make_image

    with pytest.raises(Exception, match="bfloat16|NOT_IMPLEMENTED|Could not find an implementation"):
        ort.InferenceSession(str(bf16_dir / "segment1.onnx"), providers=["CPUExecutionProvider"])
    m = read_manifest(bf16_dir)
    src = resolve("tiny-llava", None, False)
    rec = src.recipe
    plan = Plan.create(rec, m["method"], m["budget"], "float32")
    graphs = build_graphs(load_model(src, torch.bfloat16), m["method"], m["budget"], m["anchor"])
    ops, tol, figures = _bf16_ops(), rec.tolerance.bf16, {}
    for name in m["graphs"]:
        ref = ReferenceEvaluator(str(bf16_dir / f"{name}.onnx"), new_ops=ops)
        in_names, out_names = plan.io(name)
        if name == "vision":
            pv = preprocess_image(make_image(seed=5), rec.image_processor)[None]
            with torch.no_grad():
                emb, keep = graphs[name](torch.from_numpy(pv))
            got_emb, got_keep = ref.run(None, {in_names[0]: pv})
            both, diff = _common_rows(got_keep, got_emb, keep.numpy(), emb.float().numpy())
            figures["vision:keep_pre overlap"] = f"{both}/{keep.shape[-1]}"
            figures["vision:image_embeds (tokens kept by both)"] = round(diff, 4)
            assert both >= 0.9 * keep.shape[-1] and diff <= tol, figures
            continue
        args, _ = example_inputs(name, plan, rec, torch.bfloat16)
        with torch.no_grad():
            want = graphs[name](*args)
        want = want if isinstance(want, (tuple, list)) else (want,)
        feeds = {n: (a.float().numpy().astype(ml_dtypes.bfloat16) if a.dtype == torch.bfloat16 else a.numpy())
                 for n, a in zip(in_names, args)}
        got = ref.run(None, feeds)
        assert len(got) == len(want) == len(out_names)
        for o, g, w in zip(out_names, got, want):
            if not w.dtype.is_floating_point:
                assert np.array_equal(np.asarray(g), w.numpy()), f"{name}:{o} indices differ"
                continue
            diff = float(np.max(np.abs(np.asarray(g).astype(np.float32) - w.float().numpy()), initial=0.0))
            figures[f"{name}:{o}"] = round(diff, 4)
            assert diff <= tol, f"{name}:{o} max abs diff {diff} > {tol}"
    print("bf16 parity, onnx.reference vs torch bf16 (max abs diff):", figures)
