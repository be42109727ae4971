"""Weight-only int8/int4 (sts_export.export.quantize): every scheme exports, validates against the unquantized
graphs of the same weights, runs, reads back from the files into the manifest, passes (TensorRT form) or fails (ONNX
Runtime form) the static TensorRT check; bad combinations are refused in one line; bench's weights column and fit."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from sts_export import StsError
from sts_export.artifact.manifest import read_manifest
from sts_export.export.onnx import export
from sts_export.export.weights import Scheme, check_weights, required_opset
from sts_export.export.quantize import quantize_and_compare
from sts_export.pipeline import load_export_pipeline
from tests.conftest import make_image
from tests.test_export import PROMPT, run_cli

# (weights, block size, target) -> encoding, block recorded
SCHEMES = [("int8", None, "onnx", "MatMulNBits", 128), ("int4", 32, "onnx", "MatMulNBits", 32),
           ("int4", None, "trt", "DequantizeLinear", 128), ("int8", None, "trt", "DequantizeLinear", None)]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quant")


@pytest.fixture(scope="module")
def float_export(root: Path) -> Path:
    """tiny-llava sts b64, fp32 at opset 21 (what int4 needs), unquantized: each test quantizes a copy."""
    return export("tiny-llava", budget=64, out=root / "tiny-fp32", opset=21, validate=False, progress=lambda s: None)


def _quantized(float_dir: Path, dest: Path, scheme: Scheme) -> tuple[Path, dict]:
    d = dest / f"tiny-{scheme.label}"
    if not d.exists():
        shutil.copytree(float_dir, d)
        report = quantize_and_compare(d, scheme, progress=lambda s: None)
        (d / "fidelity.json").write_text(json.dumps(report))
    return d, json.loads((d / "fidelity.json").read_text())


@pytest.mark.parametrize("weights,block,target,encoding,recorded", SCHEMES,
                         ids=[f"{w}-{b or 'default'}-{t}" for w, b, t, _, _ in SCHEMES])
def test_scheme_quantizes_validates_and_runs(float_export: Path, root: Path, weights: str, block: int | None,
                                             target: str, encoding: str, recorded: int | None) -> None:
    scheme = check_weights(weights, block, target=target, dtype="fp32")
    d, report = _quantized(float_export, root, scheme)
    # validation against the unquantized export of the same weights
    e2e = report["end_to_end"]
    assert report["passed"], report["summary"]
    assert e2e["tokens"] == 32 and e2e["keep_pre_identical"]  # the vision tower (Stage 1's input) is not quantized
    assert e2e["first_logits_cosine"] > (0.999 if weights == "int8" else 0.9)
    assert 0.0 <= e2e["greedy_agreement"] <= 1.0 and 0.0 <= e2e["keep_post_agreement"] <= 1.0
    if weights == "int8":
        assert e2e["greedy_agreement"] >= 0.9
    assert {"segment1/prefill", "segment1/decode", "segment2/prefill", "vision/prefill"} <= set(report["graphs"])
    assert "prune/prefill" not in report["graphs"]  # Stage 2 stays float: nothing to compare
    for key in ("segment1/prefill", "segment2/prefill", "segment2/decode"):  # the graphs' raw outputs (EOS unmasked)
        out = "logits" if key.startswith("segment2") else "hidden_out"
        assert 0.9 < report["graphs"][key][out]["cosine"] <= 1.0 + 1e-9, (key, report["graphs"][key][out])
    # the manifest's scheme is read back from the written graphs, and every file still matches its sha256
    m = read_manifest(d)
    w = m["weights"]
    assert (w["weights"], w["encoding"], w["block_size"], w["symmetric"]) == (weights, encoding, recorded, True)
    assert w["graphs"]["prune"]["quantized"] == {} and w["graphs"]["prune"]["float_matmuls"] == 2
    assert w["graphs"]["segment1"]["float_matmuls"] == 0 and w["graphs"]["segment2"]["float_matmuls"] == 0  # lm_head too
    assert sum(w["graphs"]["vision"]["quantized"].values()) == 2  # the projector's two linears, not the tower's
    embed_q = w["graphs"]["embed"]["quantized"]
    assert embed_q == ({"GatherBlockQuantized int4 b32": 1} if (weights, target) == ("int4", "onnx") else {})
    assert w["graphs"]["segment1"]["bytes"] < (float_export / "segment1.onnx").stat().st_size  # + graph overhead
    # MatMulNBits computes in int8 on the CPU by default (accuracy_level 4, as GenAI's builder writes it): every node
    # holds it, the manifest reads it back from them, validation.json's scheme names it; the QDQ form has none
    level = 4 if encoding == "MatMulNBits" else None
    assert w["accuracy_level"] == level and report["scheme"]["accuracy_level"] == (level or 0)
    nbits = [n for g in ("segment1", "segment2") for n in onnx.load(str(d / f"{g}.onnx"), load_external_data=False)
             .graph.node if n.op_type == "MatMulNBits"]
    assert (len(nbits) > 0) == (level is not None)
    assert all(onnx.helper.get_node_attr_value(n, "accuracy_level") == 4 for n in nbits)
    # it runs: the ONNX Runtime pipeline over the quantized export
    pipe = load_export_pipeline(d, backend="onnxruntime", device="cpu")
    out = pipe.generate(make_image(seed=3), PROMPT, max_new_tokens=4)
    assert out.tokens.shape == (1, 4) and out.keep_pre.shape == (1, 96) and out.keep_post.shape == (1, 32)
    from sts_export.export.weights import graph_weights

    if encoding == "MatMulNBits":  # the ORT form (fused kernels) is quantized with its graphs, checked against them
        assert report["ort_form"]["ok"] and report["ort_form"]["tokens_identical"], report["ort_form"]
        for g in ("segment1", "segment2"):
            fw = graph_weights(d / m["ort_form"][g]["onnx"])
            assert fw["float_matmuls"] == 0 and sum(fw["quantized"].values()) > 0, fw
        fv = graph_weights(d / m["ort_form"]["vision"]["onnx"])  # like the portable vision: the projector only
        assert sum(fv["quantized"].values()) == 2 and fv["float_matmuls"] == w["graphs"]["vision"]["float_matmuls"], fv
        assert pipe.backend.form == "ort"
    else:  # TensorRT's QDQ export: ONNX Runtime's ORT form is dropped
        assert "ort_form" not in m and not list(d.glob("*.ort.onnx*"))
    # the static TensorRT check: the QDQ form passes, ONNX Runtime's MatMulNBits is a custom op TensorRT lacks
    from sts_export.export.tensorrt.check import check_dir

    reports = check_dir(d, trt_version="10.3")
    if target == "trt":
        assert all(r.ok for r in reports.values()), {g: [i.what for i in r.issues] for g, r in reports.items()}
    else:
        assert not reports["segment1"].ok and any("MatMulNBits" in i.what for i in reports["segment1"].issues)


def test_cli_export_int4_validates_against_the_float_graphs(float_export: Path, root: Path) -> None:
    """export.py --weights int4: the torch validation of the float graphs, then the quantized ones against them.
    Its float graphs are those of `float_export` beside it (same configuration, opset 21): copied, then validated."""
    out = root / "cli-int4"
    r = run_cli("export.py", "--model", "tiny-llava", "--budget", "64", "--weights", "int4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    for g in ("[1/5] vision", "[4/5] prune", "ORT form of vision", "ORT form of segment2"):
        assert f"{g}: copied from the sibling export {float_export.name}" in r.stdout, r.stdout
    assert "validation: PASS" in r.stdout and "validation of int4-b128 vs the unquantized graphs: PASS" in r.stdout
    v = json.loads((out / "validation.json").read_text())
    assert v["passed"] and v["weights"]["passed"] and v["graphs"]  # torch vs ORT (float) kept beside
    e2e = v["weights"]["end_to_end"]
    assert set(e2e) >= {"first_logits_cosine", "greedy_agreement", "keep_pre_identical", "keep_post_agreement"}
    m = read_manifest(out)
    assert m["weights"]["label"] == "int4-b128" and m["opset"] == 21 and m["dtype"] == "fp32"
    assert not (out / ".unquantized").exists()
    # a MatMulNBits export is refused for TensorRT engines in one line
    r = run_cli("export.py", "--onnx-dir", str(out), "--target", "trt", "--check-only")
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.count("error:") == 1
    assert "MatMulNBits" in r.stderr and "--target trt --weights int4" in r.stderr


def test_the_tensorrt_form_passes_the_check_for_each_version(float_export: Path, root: Path) -> None:
    from click.testing import CliRunner

    import export as export_cli

    d, _ = _quantized(float_export, root, check_weights("int4", None, target="trt"))
    r = CliRunner().invoke(export_cli.main, ["--onnx-dir", str(d), "--target", "trt", "--check-only",
                                             "--trt-version", "10.3,10.16,11.4"])
    assert r.exit_code == 0, r.output[-3000:]
    assert [l for l in r.output.splitlines() if "compatibility:" in l] == [
        f"TensorRT {v} compatibility: PASS" for v in ("10.3", "10.16", "11.4")]


BAD = [
    (["--weights", "int4", "--target", "trt", "--trt-version", "8.6"],
     "--weights int4 cannot run on TensorRT 8.6: weight-only INT4"),
    (["--weights", "int8", "--target", "trt", "--trt-version", "10.3,9.0"], "cannot run on TensorRT 9.0"),
    (["--weights", "int4", "--target", "trt", "--block-size", "32"], "INT4 weights take blocks of 64 or 128 only"),
    (["--weights", "int8", "--target", "trt", "--block-size", "128"], "its int8 weights take one scale per output"),
    (["--weights", "int4", "--opset", "18"], "--weights int4 needs --opset 21 or newer"),
    (["--weights", "int8", "--target", "trt", "--opset", "18"], "--weights int8 needs --opset 21 or newer"),
    (["--block-size", "32"], "--block-size applies to quantized weights"),
    (["--quantize-vision"], "--quantize-vision applies to quantized weights"),
    (["--weights", "fp16"], "--weights fp16 with --dtype fp32"),
    (["--weights", "int4", "--dtype", "bf16", "--no-validate"], "no bfloat16 kernel"),
    (["--weights", "int4", "--target", "trt", "--accuracy-level", "4"], "--accuracy-level 4 applies to ONNX Runtime's"),
    (["--accuracy-level", "4"], "--accuracy-level 4 applies to ONNX Runtime's"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_combinations_are_one_line_and_write_nothing(args: list[str], msg: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    import export as export_cli

    r = CliRunner().invoke(export_cli.main, ["--model", "tiny-llava", *args, "--out", str(tmp_path / "out")])
    assert r.exit_code != 0 and r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert msg in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_check_weights_api() -> None:
    assert check_weights(None) is None and check_weights("fp16", dtype="fp16") is None
    s = check_weights("int4")
    assert (s.bits, s.block_size, s.encoding, s.label) == (4, 128, "matmulnbits", "int4-b128")
    assert check_weights("int8", target="trt").label == "int8-ch-qdq"
    assert required_opset(s, None) == 21 and required_opset(check_weights("int8"), None) is None
    with pytest.raises(StsError, match="--block-size must be 32 or 128"):
        check_weights("int4", 64)


def test_next_family_quantizes(root: Path) -> None:
    """LLaVA-NeXT (anyres, image-dependent N): its decoder, projector and embedding quantize the same way."""
    d = export("tiny-llava-next", budget=320, out=root / "next-fp32", opset=21, validate=False, progress=lambda s: None)
    report = quantize_and_compare(d, check_weights("int4"), progress=lambda s: None)
    assert report["passed"] and report["end_to_end"]["keep_pre_identical"], report["summary"]
    assert report["end_to_end"]["first_logits_cosine"] > 0.9
    m = read_manifest(d)
    assert m["weights"]["graphs"]["vision"]["quantized"] == {"MatMulNBits int4 b128": 2}
    with pytest.raises(StsError, match="already holds int4-b128 weights"):
        quantize_and_compare(d, check_weights("int8"), progress=lambda s: None)
    pipe = load_export_pipeline(d, backend="onnxruntime", device="cpu")
    assert pipe.generate(make_image(seed=4), PROMPT, max_new_tokens=2).tokens.shape == (1, 2)


def test_bench_weights_column_and_fit(float_export: Path, root: Path) -> None:
    from sts_export.bench import BenchOptions, format_table, run_bench

    _quantized(float_export, root, check_weights("int4"))  # the int4-b128 export, found by the bench
    res = run_bench(BenchOptions(models=["tiny-llava"], budgets=[64], methods=["sts"], backends=["ort"], repeats=1,
                                 warmup=0, max_new_tokens=3, weights=["fp32", "int4"], exports=str(root),
                                 stage1_probe=False))
    rows = {r["weights"]: r for r in res["rows"]}
    assert set(rows) == {"fp32", "int4-b128"} and not res["failures"]
    assert rows["int4-b128"]["weight_bytes"] < rows["fp32"]["weight_bytes"]
    assert rows["int4-b128"]["weight_bytes_source"] == "export files"
    for r in rows.values():
        assert r["decode_ms_median"] is not None and r["ttft_ms_median"] is not None and r["peak_rss_bytes"] > 0
    assert "int4-b128" in format_table(res)
    # the analytic fit on an 8 GB Orin Nano: the 7B fits with int4 weights only
    res = run_bench(BenchOptions(models=["llava-1.5-7b"], budgets=["full", 64], methods=["sts"], dtype="fp16",
                                 weights=["fp16", "int8", "int4"], roofline="jetson-orin-nano-8gb", cost_only=True))
    fit = {(r["weights"], r["budget"]): r["fits"] for r in res["rows"]}
    assert fit == {("fp16", "full"): False, ("fp16", 64): False, ("int8-ch-qdq", "full"): False,
                   ("int8-ch-qdq", 64): False, ("int4-b128-qdq", "full"): True, ("int4-b128-qdq", 64): True}
    w = {r["weights"]: r["weight_bytes"] for r in res["rows"]}
    assert w["int4-b128-qdq"] < 4.5e9 < w["int8-ch-qdq"] < w["fp16"]
    dec = {r["weights"]: r["decode_roofline_ms"] for r in res["rows"] if r["budget"] == 64}
    assert dec["int4-b128-qdq"] < 0.4 * dec["fp16"]  # decode reads the weights: int4 is ~3.5x fewer bytes
    assert "fits jetson-orin-nano-8gb" in format_table(res)
    assert np.isfinite([r["mem_need_bytes"] for r in res["rows"]]).all()


def test_qwen_family_quantizes(root: Path) -> None:
    """Qwen2.5-VL (ViT + PatchMerger, M-RoPE decoder with q/k/v bias): the decoder and the merger's linears
    quantize; keep_pre is untouched (the ViT stays float), and the quantized export runs."""
    d = export("tiny-qwen2.5-vl", budget="20%", out=root / "qwen-fp32", opset=21, validate=False,
               progress=lambda s: None)
    report = quantize_and_compare(d, check_weights("int4"), progress=lambda s: None)
    assert report["passed"] and report["end_to_end"]["keep_pre_identical"], report["summary"]
    assert report["end_to_end"]["first_logits_cosine"] > 0.9
    m = read_manifest(d)
    assert m["weights"]["label"] == "int4-b128" and m["weights"]["graphs"]["segment2"]["float_matmuls"] == 0
    assert sum(m["weights"]["graphs"]["vision"]["quantized"].values()) >= 2  # the merger's two linears
    pipe = load_export_pipeline(d, backend="onnxruntime", device="cpu")
    assert pipe.generate(make_image(seed=4), PROMPT, max_new_tokens=2).tokens.shape == (1, 2)


def test_comparison_one_session_at_a_time_when_memory_is_short(float_export: Path, root: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """When the reference's sessions do not fit together (a 7B fp16 reference on a 24 GB host), the comparison
    loads one session at a time and runs the prefill only: first token, keep_pre, keep_post are still compared."""
    d = root / "tiny-int4-short-memory"
    shutil.copytree(float_export, d)
    monkeypatch.setenv("STS_FAKE_AVAILABLE_MEMORY", "100M")
    lines: list[str] = []
    report = quantize_and_compare(d, check_weights("int4"), progress=lines.append)
    e2e = report["end_to_end"]
    assert e2e["mode"].startswith("one session at a time") and e2e["tokens"] == 1, e2e
    assert report["passed"] and e2e["keep_pre_identical"] and e2e["keep_post_agreement"] is not None
    assert any("one session at a time" in s for s in lines)
    assert {k.split("/")[1] for k in report["graphs"]} == {"prefill"}  # no decode call was made
