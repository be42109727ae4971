"""Weight-only int8/int4 quantization of an export's graphs (DESIGN.md "Weight-only quantization"): the schemes,
the flags' checks, the graph rewrites and the read-back record. `quantize.py` runs it on an export and compares the
result with the float graphs.

The graphs are exported at the ONNX dtype as always, then each graph's linear weights are re-encoded by
onnxruntime.quantization (no hand-written packer), one graph at a time, after the torch weights are freed:

    encoding     for            what a MatMul W [K, N] becomes                          made by
    matmulnbits  ONNX Runtime   MatMulNBits (com.microsoft): block-wise symmetric int4  MatMulNBitsQuantizer (DEFAULT
                                or int8, K in blocks of 32/128, one scale per block     = blockwise round-to-nearest,
                                and output channel                                      the C++ kernels ORT runs)
    qdq          TensorRT       int4: DequantizeLinear(INT4, block_size 128, axis 0)    quant_utils
                 (>= 10)        -> MatMul; int8: DequantizeLinear(INT8, axis 1, one     (compute_scale_zp_blocked,
                                scale per output channel) -> MatMul; symmetric,         quantize_nparray)
                                positive scales (absmax / 7.5 for int4, / 127.5 int8)

What is quantized, per graph: `segment1`, `segment2` (every decoder linear, and lm_head, which torch exports as a
Gemm and is rewritten to the MatMul it is), the projector's two linears inside `vision`, and for int4 on ONNX Runtime
the embedding table (`embed`: a Gather, which becomes GatherBlockQuantized; the library quantizes Gathers to 4 bits
only, and the QDQ form has no Gather). Never: `prune` (Stage 2 relevance is computed from that layer's own q_proj
and k_proj in float, DESIGN.md), Stage 1 (a MatMul of activations, no constant weight), norms, biases, the anyres
newline. The vision tower's linears only with `quantize_vision`.

Why these encodings and not others: onnxruntime 1.32's weight-only quantizer writes QDQ weights for 4 bits only
(for 8 bits it logs "MatMul only supports QOperator format" and leaves the MatMul float), and those carry a
negative scale wherever a block's largest-magnitude weight is positive (it maps the signed absmax to -8), which
onnx-tensorrt's DequantizeLinear importer refuses ("Scale coefficients must all be positive"): so the TensorRT form
is quant_utils' symmetric quantization with positive scales, int4 and int8 alike. TensorRT dequantizes
blocks of INT4 only, in blocks of 64 or 128 (its "Working with Quantized Types" page; the static check's
`_BLOCK_DQ_TYPES`): so TensorRT int8 is per output channel, and TensorRT int4 refuses `--block-size 32`. HQQ and
GPTQ exist in this onnxruntime (HQQWeightOnlyQuantConfig, GPTQWeightOnlyQuantConfig) but write MatMulNBits only,
with zero points (HQQ) or calibration data (GPTQ); RTN is the default here (docs/results.md has what HQQ measured).

`check_weights` refuses, in one line and before any work, a combination that cannot be honoured; `quantize_export`
does the work on an export's temporary directory; `weights_record` reads the scheme back from the written graphs
(the manifest's "weights"); `quantize.compare_exports` is the fidelity check against the unquantized graphs
(validation.json's "weights" section).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sts_export.errors import StsError
from sts_export.artifact.memory import fmt, release_memory, rss

WEIGHTS = ("int8", "int4")
FLOAT_WEIGHTS = ("fp32", "fp16", "bf16")  # "--weights fp16" = the ONNX dtype's own weights (no quantization)
BLOCK_SIZES = (32, 128)
DEFAULT_BLOCK_SIZE = 128
# TensorRT "Working with Quantized Types" > Quantization Schemes: "INT4 quantization requires per-block scales. The
# supported block sizes are {64, 128}. The block dimension should be one of the last two dimensions."
TRT_INT4_BLOCK_SIZES = (64, 128)
# Weight-only quantization (a DequantizeLinear on a constant feeding a float MatMul) is a TensorRT 10 feature;
# block-wise INT4 is the first row of the static check's block table (`_BLOCK_DQ_TYPES`, 10.0).
TRT_WOQ_SINCE = (10, 0)
QDQ_OPSET = 21  # INT4 tensors and DequantizeLinear's block_size are opset 21 (float16 scales 19)
GATHER_INT4_OPSET = 21  # GatherBlockQuantized's INT4 table: the library raises the model to opset 21
PROJECTOR_SCOPES = ("projector", "merger")  # LLaVA's multi_modal_projector, Qwen2.5-VL's PatchMerger
QUANTIZED_GRAPHS = ("vision", "embed", "segment1", "segment2")  # never "prune" (Stage 2 math stays float)


def quantized_graphs(scheme: Scheme) -> tuple[str, ...]:
    """The graphs `scheme` changes: the embedding only as GatherBlockQuantized (int4, ONNX Runtime)."""
    return tuple(g for g in QUANTIZED_GRAPHS if g != "embed" or scheme.bits == 4 and scheme.encoding == "matmulnbits")
ALGORITHM = "rtn"  # onnxruntime.quantization's DEFAULT weight-only algorithm: blockwise round-to-nearest
# MatMulNBits' accuracy_level: the minimum precision ONNX Runtime may compute the product in (0 unset = the input
# dtype, 1 fp32, 2 fp16, 3 bf16, 4 int8: the activations quantized per block to int8, an int8 x int4 dot product).
# CPU: 4 lets MLAS run its int8 kernels, where 0 dequantizes to fp32 and runs an fp32 GEMV (measured on
# llava-1.5-7b-cpu int4: 21.9 -> 7.9 ms/token; docs/quantization.md has the fidelity per level). ONNX Runtime's CUDA
# MatMulNBits ignores the attribute (it dequantizes to the activations' dtype), so one export serves both.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_ACCURACY_LEVEL = 4
TWO_GB = 2 * 1024**3


@dataclass(frozen=True)
class Scheme:
    """What to quantize and how (checked by `check_weights`)."""

    weights: str  # int8 | int4
    block_size: int | None  # K elements per scale; None = one scale per output channel (TensorRT int8)
    encoding: str  # matmulnbits (ONNX Runtime) | qdq (TensorRT)
    quantize_vision: bool = False
    algorithm: str = ALGORITHM  # rtn; "hqq" (int4 MatMulNBits only: asymmetric, float zero points) for comparisons
    accuracy_level: int = 0  # MatMulNBits only (ACCURACY_LEVELS); 0 for the TensorRT form, which has no such attribute

    @property
    def bits(self) -> int:
        return 8 if self.weights == "int8" else 4

    @property
    def label(self) -> str:
        """e.g. int4-b128, int8-ch (per channel); with -qdq for the TensorRT form, -vis with the vision tower, -accN
        for a MatMulNBits accuracy_level other than the default."""
        block = f"b{self.block_size}" if self.block_size else "ch"
        acc = f"-acc{self.accuracy_level}" if self.encoding == "matmulnbits" and self.accuracy_level != DEFAULT_ACCURACY_LEVEL else ""
        return (f"{self.weights}-{block}" + ("-qdq" if self.encoding == "qdq" else "") + acc
                + ("-vis" if self.quantize_vision else ""))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "symmetric": self.algorithm == ALGORITHM}


def _trt_major_minor(text: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*(\d{1,3})(?:\.(\d{1,3}))?(?:\.\d+){0,2}\s*", str(text))
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def check_weights(weights: str | None, block_size: int | None = None, quantize_vision: bool = False, *,
                  target: str = "onnx", trt_versions: str | None = None, dtype: str = "fp32",
                  accuracy_level: int | None = None) -> Scheme | None:
    """The quantization an export is asked for (None: float weights), or one line saying why it cannot be had.

    `target` onnx -> MatMulNBits (ONNX Runtime); trt -> QDQ (TensorRT). `trt_versions` is --trt-version as given
    (comma-separated); checked here before the version parser so an old TensorRT gets the weights-specific reason.
    """
    if accuracy_level is not None and (weights not in WEIGHTS or target == "trt"):
        raise StsError(f"--accuracy-level {accuracy_level} applies to ONNX Runtime's quantized weights (MatMulNBits): "
                       f"use it with --weights int8|int4 and --target onnx, or drop it")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise StsError(f"--accuracy-level must be one of {', '.join(map(str, ACCURACY_LEVELS))} (0 unset, 1 fp32, 2 fp16, "
                       f"3 bf16, 4 int8), got {accuracy_level}")
    if weights is None or weights in FLOAT_WEIGHTS:
        if weights is not None and weights != dtype:
            raise StsError(f"--weights {weights} with --dtype {dtype}: unquantized weights are the ONNX dtype's; "
                           f"pass --dtype {weights} (or --weights int8|int4)")
        if block_size is not None or quantize_vision:
            flag = "--block-size" if block_size is not None else "--quantize-vision"
            raise StsError(f"{flag} applies to quantized weights: add --weights int8 or --weights int4")
        return None
    if weights not in WEIGHTS:
        raise StsError(f"--weights must be int8, int4 or the ONNX dtype ({', '.join(FLOAT_WEIGHTS)}), got '{weights}'")
    if block_size is not None and int(block_size) not in BLOCK_SIZES:
        raise StsError(f"--block-size must be {' or '.join(map(str, BLOCK_SIZES))}, got {block_size}")
    if target != "trt":
        if dtype == "bf16":
            raise StsError("--weights with --dtype bf16 for ONNX Runtime: its CPU MatMulNBits has no bfloat16 "
                           "kernel; export --dtype fp16 or fp32, or --target trt")
        return Scheme(weights, int(block_size or DEFAULT_BLOCK_SIZE), "matmulnbits", quantize_vision,
                      accuracy_level=DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level)
    for v in (trt_versions.split(",") if trt_versions else []):
        ver = _trt_major_minor(v)
        if ver is not None and ver < TRT_WOQ_SINCE:
            raise StsError(f"--weights {weights} cannot run on TensorRT {v.strip()}: weight-only {weights.upper()} "
                           f"(DequantizeLinear on constant weights into a float MatMul) arrived in TensorRT "
                           f"{TRT_WOQ_SINCE[0]}.{TRT_WOQ_SINCE[1]} (JetPack 6.1+ ships 10.3); target --trt-version "
                           f"10.3 or newer, or export --weights fp16")
    if weights == "int8":
        if block_size is not None:
            raise StsError(f"--weights int8 --block-size {block_size} for TensorRT: TensorRT dequantizes blocks of "
                           f"INT4 only; its int8 weights take one scale per output channel: drop --block-size")
        return Scheme(weights, None, "qdq", quantize_vision)
    block = int(block_size or DEFAULT_BLOCK_SIZE)
    if block not in TRT_INT4_BLOCK_SIZES:
        raise StsError(f"--weights int4 --block-size {block} for TensorRT: TensorRT's INT4 weights take blocks of "
                       f"{' or '.join(map(str, TRT_INT4_BLOCK_SIZES))} only; use --block-size 128")
    return Scheme(weights, block, "qdq", quantize_vision)


def required_opset(scheme: Scheme | None, opset: int | None) -> int | None:
    """The opset the graphs must be exported at for `scheme` (None: the dtype's default), or one line."""
    if scheme is None or scheme.encoding != "qdq" and scheme.bits != 4:
        return opset
    need = QDQ_OPSET if scheme.encoding == "qdq" else GATHER_INT4_OPSET
    if opset is None:
        return need
    if int(opset) < need:
        what = ("DequantizeLinear's block_size and float16 scales" if scheme.encoding == "qdq"
                else "GatherBlockQuantized's INT4 table")
        raise StsError(f"--weights {scheme.weights} needs --opset {need} or newer (INT4 tensors and {what} are opset {need}); "
                       f"drop --opset or pass --opset {need}")
    return int(opset)


# ----------------------------------------------------------------------------------------------- the library
def _quantizer() -> Any:
    """onnxruntime.quantization's MatMulNBitsQuantizer, imported without its side effect on logging (the module
    calls logging.basicConfig(level=INFO) at import, which would print every library's INFO lines)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: PLC0415

    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def _scopes(node: Any) -> str:
    """The torch module path a node came from (torch.onnx's name_scopes metadata), '' when absent."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            return p.value
    return ""


def _gemm_to_matmul(model: Any) -> None:
    """Rewrite Gemm(A, W, [C]) with a constant W, alpha = beta = 1, transA 0 into MatMul(A, W or W^T) [+ Add(C)],
    in place (any other Gemm is left as it is, float).

    torch exports a Linear on a 2-D input (lm_head on the last position) as Gemm(transB=1); the weight-only
    quantizer takes MatMul. The rewritten node keeps the Gemm's name and metadata (so it is still found by scope)."""
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    nodes = []
    for n in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or len(n.input) < 2 or n.input[1] not in inits or users.get(n.input[1], 0) != 1
                or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        w = inits[n.input[1]]
        if attrs.get("transB", 0):
            arr = numpy_helper.to_array(w).T.copy()
            new = numpy_helper.from_array(arr, w.name)
            w.CopyFrom(new)
            del arr, new
        has_c = len(n.input) > 2 and bool(n.input[2])
        out = n.output[0] + "_mm" if has_c else n.output[0]
        mm = onnx.helper.make_node("MatMul", [n.input[0], n.input[1]], [out], name=n.name)
        mm.metadata_props.extend(n.metadata_props)
        nodes.append(mm)
        if has_c:
            nodes.append(onnx.helper.make_node("Add", [out, n.input[2]], [n.output[0]], name=n.name + "_bias"))
    del g.node[:]
    g.node.extend(nodes)


def _targets(model: Any, graph: str, scheme: Scheme) -> tuple[list[str], list[str]]:
    """(names of the MatMul/Gather nodes with a constant weight to quantize, those to leave float)."""
    inits = {t.name for t in model.graph.initializer}
    take, leave = [], []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits:
            scope = _scopes(n)
            wanted = graph in ("segment1", "segment2") or (
                graph == "vision" and (any(p in scope for p in PROJECTOR_SCOPES)
                                       or scheme.quantize_vision and "vision" in scope))
            (take if wanted else leave).append(n.name)
        elif n.op_type == "Gather" and n.input and n.input[0] in inits:
            wanted = graph == "embed" and scheme.bits == 4 and scheme.encoding == "matmulnbits"
            (take if wanted else leave).append(n.name)
    return take, leave


def _symmetric_qdq(model: Any, names: set[str], bits: int, block_size: int) -> None:
    """The TensorRT form: each named MatMul(A, W [K, N]) becomes MatMul(A, DequantizeLinear(W_q, s)), symmetric with
    positive scales (onnxruntime.quantization.quant_utils computes scales and values). int8: one scale per output
    channel, s [N], axis=1; int4: one per block of `block_size` along K, s [ceil(K/b), N], axis=0, block_size=b.

    Positive scales are what onnx-tensorrt's DequantizeLinear importer asserts ("Scale coefficients must all be
    positive", QuantDequantLinearHelper). MatMulNBitsQuantizer's QDQ output maps each block's signed absmax to -8
    with a negative scale where that value is positive, so it is not used for the TensorRT form."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, numpy_helper  # noqa: PLC0415
    from onnxruntime.quantization.quant_utils import compute_scale_zp_blocked, quantize_nparray  # noqa: PLC0415

    qtype, suffix = (TensorProto.INT8, "_DQ_Q8") if bits == 8 else (TensorProto.INT4, "_DQ_Q4")
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes, dropped = [], set()
    for n in g.node:
        w = inits.get(n.input[1]) if n.name in names and len(n.input) > 1 else None
        if w is None or len(w.dims) != 2:
            nodes.append(n)
            continue
        arr = numpy_helper.to_array(w)
        work = arr.astype(np.float32)  # [K, N]
        block = work.shape[0] if bits == 8 else block_size
        zp, scale = compute_scale_zp_blocked(work, qtype, axis=0, block_size=block, symmetric=True)  # [ceil(K/b), N]
        rows = np.repeat(np.arange(scale.shape[0]), block)[: work.shape[0]]  # the scale row of each of the K rows
        q = quantize_nparray(qtype, work, scale[rows], zp[rows])  # [K, N], within the type's range
        qt = numpy_helper.from_array(q.astype(np.int8) if bits == 8 else q, w.name + suffix)
        st = numpy_helper.from_array((scale.reshape(-1) if bits == 8 else scale).astype(arr.dtype), w.name + "_DQ_scales")
        g.initializer.extend([qt, st])
        attrs = {"axis": 1} if bits == 8 else {"axis": 0, "block_size": block}
        dq = onnx.helper.make_node("DequantizeLinear", [qt.name, st.name], [qt.name + "_output"], name=n.name + suffix,
                                   **attrs)
        mm = onnx.helper.make_node("MatMul", [n.input[0], qt.name + "_output"], list(n.output), name=n.name)
        mm.metadata_props.extend(n.metadata_props)
        nodes += [dq, mm]
        dropped.add(w.name)
        del arr, work, q
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name not in dropped or t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _save(model: Any, path: Path) -> None:
    """Save one graph as the export writes them: `<g>.onnx`, plus `<g>.onnx.data` when the weights pass 2 GB."""
    import onnx  # noqa: PLC0415

    n_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink(missing_ok=True)
    if n_bytes > TWO_GB - 64 * 1024**2:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def quantize_graph(src: Path, dst: Path, graph: str, scheme: Scheme) -> int:
    """Quantize one graph file `src` into `dst` (both `<g>.onnx`, external data beside); returns the weights
    quantized. Reads the whole graph once (weights included), so the caller frees the torch weights first."""
    import onnx  # noqa: PLC0415

    model = onnx.load(str(src))  # external data (> 2 GB graphs) is read from beside src
    _gemm_to_matmul(model)
    take, leave = _targets(model, graph, scheme)
    if take:
        if scheme.encoding == "qdq":  # TensorRT: positive scales (see _symmetric_qdq)
            _symmetric_qdq(model, set(take), scheme.bits, scheme.block_size)
        else:
            from onnxruntime.quantization.quant_utils import QuantFormat  # noqa: PLC0415

            ops = ("MatMul", "Gather") if graph == "embed" else ("MatMul",)
            algo = None
            if scheme.algorithm == "hqq" and graph != "embed":  # HQQ has no Gather: the embedding stays RTN
                from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig  # noqa: PLC0415

                algo = HQQWeightOnlyQuantConfig(block_size=scheme.block_size, bits=scheme.bits, op_types_to_quantize=ops)
            q = _quantizer()(model, bits=scheme.bits, block_size=scheme.block_size, is_symmetric=True,
                             accuracy_level=scheme.accuracy_level or None,
                             nodes_to_exclude=leave, op_types_to_quantize=ops, algo_config=algo,
                             quant_format=QuantFormat.QOperator)
            q.process()
            model = q.model.model
    _save(model, dst)
    return len(take)


def _graph_files(d: Path, g: str) -> list[Path]:
    return [f for f in (d / f"{g}.onnx", d / f"{g}.onnx.data") if f.exists()]


def quantize_export(export_dir: Path, graphs: list[str], scheme: Scheme, *, keep_reference: bool,
                    progress: Callable[[str], None] = print) -> Path | None:
    """Quantize the graphs of an export directory in place, one at a time.

    keep_reference: the unquantized graphs move to `<dir>/.unquantized/` (with every other file of the export, as
    hard links), for `compare_exports`; the caller removes it. Otherwise each is deleted once its quantized form is
    written. Returns the reference directory (or None)."""
    ref = export_dir / ".unquantized"
    if keep_reference:
        shutil.rmtree(ref, ignore_errors=True)
        ref.mkdir()
        for f in export_dir.iterdir():
            if f.is_file() and f.name != "validation.json":
                os.link(f, ref / f.name)

    # a graph is a file stem: "segment1", or "segment1.ort" (its ORT form); the part before the dot picks the weights
    for i, g in enumerate([g for g in graphs if g.split(".")[0] in quantized_graphs(scheme)], 1):
        work = ref if keep_reference else export_dir / f".{g}.float"
        if not keep_reference:
            work.mkdir(exist_ok=True)
            for f in _graph_files(export_dir, g):
                os.replace(f, work / f.name)
        else:
            for f in _graph_files(export_dir, g):
                f.unlink()  # the hard link in `ref` keeps the float graph
        before = sum(f.stat().st_size for f in _graph_files(work, g))
        n = quantize_graph(work / f"{g}.onnx", export_dir / f"{g}.onnx", g.split(".")[0], scheme)
        after = sum(f.stat().st_size for f in _graph_files(export_dir, g))
        if not keep_reference:
            shutil.rmtree(work)
        release_memory()
        progress(f"quantize [{i}] {g}: {n} weights -> {scheme.label} ({scheme.encoding}), {before / 1e6:.1f} -> "
                 f"{after / 1e6:.1f} MB, RSS {fmt(rss())}")
    return ref if keep_reference else None


# ----------------------------------------------------------------------------------------------- reading back
def graph_weights(path: Path) -> dict[str, Any]:
    """What one written graph holds: quantized weights by (encoding, bits, block), float weight matmuls/gathers left,
    and the bytes of its files. Read from the file (nodes and initializer types), never from a request."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto  # noqa: PLC0415

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    kinds: dict[str, int] = {}
    levels: set[int] = set()  # MatMulNBits' accuracy_level (0 where the attribute is absent)
    float_mm = float_gather = zero_points = 0

    def add(key: str) -> None:
        kinds[key] = kinds.get(key, 0) + 1

    for n in m.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized", "DequantizeLinear"):
            zp = {"MatMulNBits": 3, "GatherBlockQuantized": 3, "DequantizeLinear": 2}[n.op_type]
            zero_points += int(len(n.input) > zp and bool(n.input[zp]))
        if n.op_type == "MatMulNBits":
            add(f"MatMulNBits int{attrs.get('bits', 4)} b{attrs.get('block_size')}")
            levels.add(int(attrs.get("accuracy_level", 0)))
        elif n.op_type == "GatherBlockQuantized":
            add(f"GatherBlockQuantized int{attrs.get('bits', 4)} b{attrs.get('block_size')}")
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits:
            bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8}.get(
                inits[n.input[0]].data_type)
            if bits:
                add(f"DequantizeLinear int{bits} " + (f"b{attrs['block_size']}" if attrs.get("block_size") else "ch"))
        elif n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits:
            float_mm += 1
        elif n.op_type == "Gather" and n.input and n.input[0] in inits and len(inits[n.input[0]].dims) == 2:
            float_gather += 1
    files = [path] + ([path.with_name(path.name + ".data")] if path.with_name(path.name + ".data").exists() else [])
    return {"quantized": kinds, "float_matmuls": float_mm, "float_gathers": float_gather, "zero_points": zero_points,
            "accuracy_levels": sorted(levels), "bytes": sum(f.stat().st_size for f in files)}


_SCHEME = re.compile(r"(MatMulNBits|GatherBlockQuantized|DequantizeLinear) int(\d) (b(\d+)|ch)")


def weights_record(export_dir: Path, graphs: list[str], scheme: Scheme | None) -> dict[str, Any]:
    """The manifest's "weights": the scheme read back from the written graphs (encoding, bits, block size per
    graph), the algorithm that was run, and the bytes per graph. Raises when the files disagree with the request."""
    per = {g: graph_weights(export_dir / f"{g}.onnx") for g in graphs}
    found = {k for r in per.values() for k in r["quantized"] if not k.startswith("GatherBlockQuantized")}
    if scheme is None:
        if any(r["quantized"] for r in per.values()):
            raise StsError(f"{export_dir}: float export holds quantized weights ({per}): this is a bug, please report it")
        return {"weights": "float", "graphs": per, "total_bytes": sum(r["bytes"] for r in per.values())}
    if not found:
        raise StsError(f"{export_dir}: no quantized weight was written for {scheme.label}: this is a bug, please report it")
    encodings = {_SCHEME.match(k).group(1) for k in found}  # type: ignore[union-attr]
    bits = {int(_SCHEME.match(k).group(2)) for k in found}  # type: ignore[union-attr]
    blocks = {(_SCHEME.match(k).group(4) or "channel") for k in found}  # type: ignore[union-attr]
    if len(encodings) != 1 or bits != {scheme.bits} or len(blocks) != 1:
        raise StsError(f"{export_dir}: the graphs hold {sorted(found)}, not one {scheme.label} scheme: this is a bug, "
                       f"please report it")
    block = blocks.pop()
    levels = {lv for r in per.values() for lv in r["accuracy_levels"]}
    if levels and levels != {scheme.accuracy_level}:
        raise StsError(f"{export_dir}: the MatMulNBits nodes hold accuracy_level {sorted(levels)}, not "
                       f"{scheme.accuracy_level} as asked: this is a bug, please report it")
    return {
        "weights": f"int{bits.pop()}", "encoding": encodings.pop(), "block_size": None if block == "channel" else int(block),
        "symmetric": not any(r["zero_points"] for r in per.values()), "algorithm": scheme.algorithm, "quantize_vision": scheme.quantize_vision,
        "accuracy_level": levels.pop() if levels else None,
        "label": scheme.label, "graphs": per, "total_bytes": sum(r["bytes"] for r in per.values()),
    }


def refuse_ort_weights(export_dir: Path) -> None:
    """One line when an export's weights are ONNX Runtime's MatMulNBits, which TensorRT cannot build."""
    import json  # noqa: PLC0415

    path = Path(export_dir) / "manifest.json"
    try:
        w = json.loads(path.read_text()).get("weights") or {}
    except (OSError, ValueError):
        return  # read_manifest reports a missing or broken manifest in its own words
    if w.get("encoding") == "MatMulNBits":
        raise StsError(f"{export_dir} holds ONNX Runtime's {w.get('label', 'quantized')} weights (MatMulNBits), which "
                       f"TensorRT cannot build; re-export with --target trt --weights {w.get('weights', 'int4')} "
                       f"(add --check-only on a host without TensorRT) for the DequantizeLinear form")
