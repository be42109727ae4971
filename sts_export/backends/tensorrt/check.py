"""Static TensorRT compatibility check of ONNX graphs (needs only `onnx` and numpy, no TensorRT, no GPU).

`check_model(path_or_model, trt_version="10.3")` walks every node (Loop/If/Scan bodies and model-local
functions included) and reports what TensorRT's ONNX parser (onnx-tensorrt) would reject or get wrong:

* op types the parser has no importer for in that version, and ops in custom domains (need a plugin);
* tensor dtypes TensorRT cannot hold (DOUBLE, INT16, UINT16/32/64, COMPLEX, STRING, ...) and, per op, the
  dtypes the support table lists (e.g. MatMul takes no INT64, Equal takes no BOOL);
* TopK whose K is not a build-time constant, is >= 3840 (TensorRT's limit), or whose `sorted` is 0;
* Loop without a constant trip count, or whose loop-carried values change shape between iterations;
* the table's "must be an initializer" restrictions (Reduce* axes, Slice/Pad/Squeeze axes before the
  release that lifted them, CumSum axis, OneHot depth) and a few attribute restrictions.

Weights are never loaded (`load_external_data=False`), so multi-GB exports check in seconds.

Source of the op table: onnx/onnx-tensorrt `docs/operators.md`, "ONNX-TensorRT 10.1 GA release" commit
96e781103cfc4adf4a6bb557e94bac8e693f6f4c (2024-06-17; its header still reads "TensorRT 10.0 supports opset 9
to 20"), https://github.com/onnx/onnx-tensorrt/blob/96e781103cfc4adf4a6bb557e94bac8e693f6f4c/docs/operators.md
That table is what TensorRT 10.2/10.3 ship: the onnx-tensorrt `docs/Changelog.md` lists no added operator for
10.2 or 10.3 (10.3 only lifts "Slice `axes` must be an initializer"). Later releases are applied as deltas from
the same Changelog and the 10.15 GA `docs/operators.md` (see `_DELTAS`); TensorRT 11.x rows come from NVIDIA's
TensorRT release pages (github.com/NVIDIA/TensorRT/releases, "Parsers" sections), which is where the 11.x parser
changes are announced. Every row names its source.

Versions: `parse_version` accepts "10.3", "10.16.1" or "11.4.1.2" (2 to 4 numbers) of TensorRT 10.x or 11.x and
refuses anything else (`VersionError`, a one-line StsError that is also a ValueError); `parse_versions("10.3,11.4")`
reads a comma-separated list; `default_version()` is the installed TensorRT's major.minor, else 10.3 (JetPack 6.1/6.2).
"""
from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from sts_export.errors import StsError

# ---------------------------------------------------------------------------------------------------------------
# The support table (data). Types are the table's "Supported Types" column; None = listed as not supported.
# ---------------------------------------------------------------------------------------------------------------

F = ("FP32", "FP16", "BF16")
F2 = ("FP32", "FP16")
FI = F + ("INT32", "INT64")
FIB = FI + ("BOOL",)
B = ("BOOL",)
N = None  # "Supported: N"

_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare")
_SEQUENCE = ("SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
             "SequenceLength", "SequenceMap")

# onnx-tensorrt 10.1 GA docs/operators.md (commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c), row by row.
OPS_10_1: dict[str, tuple[str, ...] | None] = {
    "Abs": FI, "Acos": F, "Acosh": F, "Add": FI, "AffineGrid": N, "And": B, "ArgMax": FI, "ArgMin": FI,
    "Asin": F, "Asinh": F, "Atan": F, "Atanh": F, "AveragePool": F, "BatchNormalization": F, "Bernoulli": N,
    "BitShift": N, "BitwiseAnd": N, "BitwiseNot": N, "BitwiseOr": N, "BitwiseXor": N, "BlackmanWindow": N,
    "Cast": FI + ("UINT8", "BOOL"), "CastLike": FI + ("UINT8", "BOOL"), "Ceil": F, "Col2Im": N, "Celu": F,
    "CenterCropPad": N, "Clip": F, "Compress": N, "Concat": FIB, "ConcatFromSequence": N, "Constant": FIB,
    "ConstantOfShape": FIB,  # the table prints "INF64", read as INT64
    "Conv": F, "ConvInteger": N, "ConvTranspose": F, "Cos": F, "Cosh": F, "CumSum": F, "DFT": N,
    "DeformConv": F2, "DepthToSpace": FI, "DequantizeLinear": ("INT8", "FP8", "INT4"), "Det": N, "Div": FI,
    "Dropout": F, "DynamicQuantizeLinear": N, "Einsum": F, "Elu": F, "Equal": FI, "Erf": F, "Exp": F,
    "Expand": FIB, "EyeLike": FIB, "Flatten": FIB, "Floor": F, "Gather": FIB, "GatherElements": FIB,
    "GatherND": FIB, "Gelu": FI + ("INT8",), "Gemm": F, "GlobalAveragePool": F, "GlobalLpPool": F,
    "GlobalMaxPool": F, "Greater": FI, "GreaterOrEqual": FI, "GridSample": F2, "GroupNormalization": F, "GRU": F,
    "HammingWindow": N, "HannWindow": N, "HardSigmoid": F, "HardSwish": F, "Hardmax": F, "Identity": FIB,
    "If": FIB, "ImageScaler": F, "ImageDecoder": N, "InstanceNormalization": F, "IsInf": F, "IsNaN": FI,
    "LayerNormalization": F, "LeakyRelu": F, "Less": FI, "LessOrEqual": FI, "Log": F, "LogSoftmax": F,
    "Loop": FIB, "LRN": F, "LSTM": F, "LpNormalization": F, "LpPool": F, "MatMul": F, "MatMulInteger": N,
    "Max": FI, "MaxPool": F, "MaxRoiPool": N, "MaxUnpool": N, "Mean": F + ("FP8", "INT32", "INT64"),
    "MeanVarianceNormalization": F, "MelWeightMatrix": N, "Min": FI, "Mish": F2, "Mod": FI, "Mul": FI,
    "Multinomial": N, "Neg": FI, "NegativeLogLikelihoodLoss": N, "NonMaxSuppression": F2, "NonZero": F2,
    "Not": B, "OneHot": FIB, "Optional": N, "OptionalGetElement": N, "OptionalHasElement": N, "Or": B,
    "Pad": FI, "ParametricSoftplus": F, "Pow": F, "PRelu": F, "QLinearConv": N, "QLinearMatMul": N,
    "QuantizeLinear": F, "RandomNormal": F, "RandomNormalLike": F, "RandomUniform": F, "RandomUniformLike": F,
    "Range": FI, "Reciprocal": F, **{op: FI for op in _REDUCE}, "RegexFullMatch": N, "Relu": FI,
    "Reshape": FIB, "Resize": F, "ReverseSequence": FIB, "RNN": F, "RoiAlign": F2, "Round": F, "STFT": N,
    "ScaledTanh": F, "Scan": F, "Scatter": FI, "ScatterElements": FI, "ScatterND": FI, "Selu": F,
    **{op: N for op in _SEQUENCE}, "Shape": FIB, "Shrink": FI, "Sigmoid": F, "Sign": FI, "Sin": F, "Sinh": F,
    "Size": FIB, "Slice": FIB, "Softmax": F, "SoftmaxCrossEntropyLoss": N, "Softplus": F, "Softsign": F,
    "SpaceToDepth": FI, "Split": FIB, "SplitToSequence": N, "Sqrt": F, "Squeeze": FIB, "StringConcat": N,
    "StringNormalizer": N, "StringSplit": N, "Sub": FI, "Sum": FI, "Tan": F, "Tanh": F, "TfIdfVectorizer": N,
    "ThresholdedRelu": F, "Tile": FIB, "TopK": FI, "Transpose": FIB, "Trilu": FIB, "Unique": N,
    "Unsqueeze": FIB, "Upsample": F, "Where": FIB, "Xor": B,
}

# Operator additions after 10.1, from onnx-tensorrt docs/Changelog.md ("Added support for ...") with the types
# of the 10.15 GA docs/operators.md. Key: first TensorRT (major, minor) that has it.
_DELTAS: dict[tuple[int, int], dict[str, tuple[str, ...] | None]] = {
    (10, 4): {"BlackmanWindow": F2, "HammingWindow": F2, "HannWindow": F2},
    (10, 5): {"STFT": ("FP32",)},
    # 10.8 release notes: "Added support for E2M1 FP4 data type ... using explicit quantization"; the 10.15 GA
    # operators.md DequantizeLinear row reads "INT8, FP8, FP4, INT4".
    (10, 8): {"DequantizeLinear": ("INT8", "FP8", "INT4", "FP4")},
    (10, 12): {"Pow": FI},  # integer-typed base tensors
    # Changelog 10.14 GA (2025-11-7): "Added support for the `Attention` operator"; types and limits from the 10.15
    # GA operators.md row (Q/K/V/attn_mask 4-D; no past_key/past_value/nonpad_kv_seqlen inputs; no present_key/
    # present_value/qk_matmul_output outputs; no qk_matmul_output_mode/softcap): see `rule_Attention`.
    (10, 14): {"Attention": F + ("INT8", "FP8")},
    # Changelog 10.15 GA (2026-2-2): "Added support for `RotaryEmbedding`, `RMSNormalization` and `TensorScatter`";
    # types/limits from the 10.15 GA operators.md rows (see `rule_RotaryEmbedding`, `rule_TensorScatter`).
    (10, 15): {"RotaryEmbedding": F, "RMSNormalization": F, "TensorScatter": F + ("INT32",)},
    # 10.16: NVIDIA's TensorRT 10.16.0/10.16.1 release notes (docs.nvidia.com/deeplearning/tensorrt/10.16.x,
    # release-notes-10) announce MoE/multi-device layers and JetPack Orin support but no new ONNX operator, and no
    # onnx-tensorrt Changelog entry for 10.16 was available: 10.16 reads the 10.15 table.
    (10, 16): {},
    # TensorRT 11.0 release (github.com/NVIDIA/TensorRT/releases/tag/v11.0, 2026-06-02), Parsers: "Added support
    # for Swish operator" (also the TRT_Attention/TRT_MoE/TRT_KVCacheUpdate custom ops, which need no row: they are
    # custom-domain ops and stay plugin errors here). No operators.md row was available for its types: ONNX Swish
    # (opset 24) is float-only, read as FP32/FP16/BF16 like Sigmoid.
    (11, 0): {"Swish": F},
    # 11.1 (releases/tag/v11.1): Parsers only "Updated TRT_Attention to support raggedness" (custom op).
    # TensorRT 11.2 release (releases/tag/v11.2, 2026-08-04), Parsers: "Added support for the DFT operator and 5D
    # GridSample operators" (DFT runs as the new cuFFT FFTPlugin); no types row was available: FP32/FP16 read from
    # cuFFT's real/half transforms.
    (11, 2): {"DFT": F2},
    # 11.3 (releases/tag/v11.3) and 11.4 (releases/tag/v11.4): parser refit/external-weights changes only.
    # 11.5 (releases/tag/v11.5, onnx-tensorrt release/11.5-GA): "Added support for ONNX opset 25" and Squeeze
    # without `axes`: no new operator.
}
# Releases the table has a row for (the deltas above plus the releases that changed nothing the check reads).
_KNOWN_RELEASES = sorted({(10, m) for m in range(0, 17)} | {(11, m) for m in range(0, 6)})
_TABLE_LATEST = _KNOWN_RELEASES[-1]
# "must be a constant" input restrictions: (op, input index) -> (first release without it, input name).
_CONST_INPUT_UNTIL: dict[tuple[str, int], tuple[tuple[int, int], str]] = {
    ("Slice", 3): ((10, 3), "axes"),  # Changelog 10.3: "Added support for tensor `axes` inputs for `Slice` nodes"
    ("Pad", 3): ((10, 4), "axes"),  # 10.4: "Added support for tensor `axes` for `Pad` operations"
    ("Squeeze", 1): ((10, 7), "axes"),  # 10.7: "Added dynamic axes support for `Squeeze` and `Unsqueeze`"
    ("Unsqueeze", 1): ((10, 7), "axes"),
    ("CumSum", 1): ((10, 8), "axis"),  # 10.8: "Added support for dynamic axes ... of `CumSum` operations"
    ("OneHot", 1): ((99, 0), "depth"),  # "`depth` must be a build-time constant" (still in 10.15)
    **{(op, 1): ((99, 0), "axes") for op in _REDUCE},  # "`axes` must be an initializer" (still in 10.15)
}
# Highest default-domain opset the parser documents / vendors (header of operators.md, ONNX submodule version in
# the Changelog). Newer opsets only log a warning in the parser, so this is a warning here too.
_MAX_OPSET: list[tuple[tuple[int, int], int]] = [
    ((10, 0), 20), ((10, 6), 22), ((10, 11), 23),
    ((10, 15), 24),  # 10.15 GA operators.md: "supports operators in the inclusive range of opset 9 to opset 24"
    ((11, 5), 25),  # releases/tag/v11.5: "Added support for ONNX opset 25" (so 10.16 and 11.0-11.4 stay at 24)
]
# Block-wise DequantizeLinear (`block_size` > 0, opset 21+): the quantized types the parser takes per release.
# TensorRT's "Working with Quantized Types" (10.11 docs): symmetric quantization only, INT4 weight-only; block
# quantization of FP8/FP4 weights arrives with 10.13 (per the issue brief's reading of NVIDIA's notes; the latest
# IQuantizeLayer/IDequantizeLayer operator page lists block quantization for INT4, FP4, FP8 and INT8 scales).
_BLOCK_DQ_TYPES: list[tuple[tuple[int, int], tuple[str, ...]]] = [((10, 0), ("INT4",)),
                                                                   ((10, 13), ("INT4", "FP8", "FP4"))]
# Block-wise INT4 (same page, "Quantization Schemes"): "INT4 quantization requires per-block scales. The supported
# block sizes are {64, 128}. The block dimension should be one of the last two dimensions." Blocks are weight-only:
# the quantized tensor and its scales are build-time constants (TensorRT "only supports INT4 for weight quantization").
_BLOCK_DQ_INT4_SIZES = (64, 128)

TOPK_MAX_K = 3840  # operators.md, TopK: "`K` input must be less than 3840"
_INT32_MAX = 2**31 - 1  # the parser treats a Loop trip count >= INT32_MAX as "no trip count" (while-loop)

# ONNX element type name -> the table's type token. Anything else TensorRT has no type for.
_TYPE_TOKEN = {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "INT32": "INT32", "INT64": "INT64",
               "BOOL": "BOOL", "UINT8": "UINT8", "INT8": "INT8", "FLOAT8E4M3FN": "FP8", "INT4": "INT4",
               "FLOAT4E2M1": "FP4"}
# Which tensor the "Supported Types" column refers to, where it is not input 0.
_TYPED_SLOT: dict[str, tuple[str, int]] = {
    "Constant": ("out", 0), "ConstantOfShape": ("out", 0), "RandomNormal": ("out", 0),
    "RandomUniform": ("out", 0), "Where": ("in", 1), "OneHot": ("in", 2), "If": ("out", 0),
}
_CONTROL_FLOW = ("Loop", "If", "Scan")


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Issue:
    graph: str
    node: str
    op: str
    what: str
    severity: str = "error"  # "error" (TensorRT rejects or computes something else) | "warning"

    def line(self) -> str:
        return f"{self.graph}:{self.node}({self.op}): {self.what}"


@dataclass
class Report:
    """Result of `check_model`: `.ok`, `.problems` (one line each), `.warnings`, `.format()`."""

    graph: str
    trt_version: str
    issues: list[Issue] = field(default_factory=list)
    num_nodes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(i.severity == "error" for i in self.issues)

    @property
    def problems(self) -> list[str]:
        return [i.line() for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[str]:
        return [i.line() for i in self.issues if i.severity == "warning"]

    def format(self, width: int = 120) -> str:
        """A text table: one row per issue (errors first), under a one-line verdict."""
        n_err = len(self.problems)
        verdict = "OK" if self.ok else f"{n_err} problem{'s' * (n_err != 1)}"
        head = f"{self.graph}: {verdict} ({self.num_nodes} nodes, TensorRT {self.trt_version} ONNX parser table)"
        rows = sorted(self.issues, key=lambda i: i.severity != "error")
        if not rows:
            return head
        cells = [(("E" if i.severity == "error" else "W"), i.node, i.op, i.what) for i in rows]
        w_node = min(max(len(c[1]) for c in cells + [("", "node", "", "")]), 48)
        w_op = min(max(len(c[2]) for c in cells + [("", "", "op", "")]), 20)
        w_what = max(30, width - w_node - w_op - 6)
        lines = [head, f"  {'':1} {'node':<{w_node}} {'op':<{w_op}} what", "  " + "-" * (w_node + w_op + w_what + 3)]
        pad = " " * (w_node + w_op + 5)
        for sev, node, op, what in cells:
            node = node if len(node) <= w_node else "…" + node[-(w_node - 1):]
            wrapped = textwrap.wrap(what, w_what) or [""]
            lines.append(f"  {sev} {node:<{w_node}} {op[:w_op]:<{w_op}} {wrapped[0]}")
            lines.extend(pad + more for more in wrapped[1:])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def format_reports(reports: dict[str, Report]) -> str:
    """All reports of `check_dir`, one table per graph."""
    return "\n\n".join(r.format() for r in reports.values())


# ---------------------------------------------------------------------------------------------------------------
# Version handling
# ---------------------------------------------------------------------------------------------------------------

class VersionError(StsError, ValueError):
    """A TensorRT version the check cannot read or does not cover (one line; also a ValueError)."""


SUPPORTED = "TensorRT 10.x and 11.x (e.g. 10.3 = JetPack 6.1/6.2, 10.16 = JetPack 7.2, 11.4 = desktop wheels)"
_VERSION = re.compile(r"(\d{1,3})\.(\d{1,3})(?:\.(\d{1,5})){0,2}")


def parse_version(v: str | tuple[int, ...]) -> tuple[int, int]:
    """'10.3', '10.16.1', '11.4.1.2' or (10, 3) -> (major, minor). Refuses what is not a TensorRT 10.x/11.x version."""
    if isinstance(v, tuple):
        if len(v) < 2 or not all(isinstance(x, int) and x >= 0 for x in v):
            raise VersionError(f"TensorRT version {v!r} must be (major, minor, ...) integers")
        major, minor = int(v[0]), int(v[1])
        text = ".".join(str(x) for x in v)
    else:
        text = str(v).strip()
        m = _VERSION.fullmatch(text)
        if not m:
            raise VersionError(f"--trt-version '{v}' is not a TensorRT version: give major.minor (2 to 4 numbers, "
                               f"e.g. 10.3 or 11.4.1); supported: {SUPPORTED}")
        major, minor = int(m.group(1)), int(m.group(2))
    if major not in (10, 11):
        raise VersionError(f"TensorRT {text} is not covered by this check or by sts-export's build and runtime: "
                           f"supported are {SUPPORTED}")
    return major, minor


def parse_versions(text: str) -> list[str]:
    """'10.3,10.16,11.4' -> ['10.3', '10.16', '11.4'] (each checked by `parse_version`, duplicates dropped)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise VersionError(f"--trt-version '{text}' has an empty entry: give versions separated by commas, e.g. "
                           f"10.3,10.16,11.4")
    out: list[str] = []
    for p in parts:
        parse_version(p)
        if p not in out:
            out.append(p)
    return out


def version_label(v: str | tuple[int, ...]) -> str:
    major, minor = parse_version(v)
    return f"{major}.{minor}"


def default_version() -> str:
    """The installed TensorRT's major.minor when there is one (and it is covered), else 10.3 (JetPack 6.1/6.2)."""
    from sts_export.backends.tensorrt.build import _import_trt  # noqa: PLC0415 - tensorrt stays optional

    trt = _import_trt()
    if trt is not None:
        try:
            return version_label(str(trt.__version__))
        except VersionError:
            pass
    return "10.3"


def op_table(trt_version: str | tuple[int, ...] = "10.3") -> dict[str, tuple[str, ...] | None]:
    """The parser's op -> supported types table for a TensorRT version (None: op listed as unsupported)."""
    ver = parse_version(trt_version)
    table = dict(OPS_10_1)
    for since, ops in sorted(_DELTAS.items()):
        if ver >= since:
            table.update(ops)
    return table


def max_opset(trt_version: str | tuple[int, ...] = "10.3") -> int:
    ver = parse_version(trt_version)
    return max(o for since, o in _MAX_OPSET if ver >= since)


# ---------------------------------------------------------------------------------------------------------------
# Scopes: what is known about each tensor name (type, shape, constant value), with outer-scope fallback
# ---------------------------------------------------------------------------------------------------------------

_UNKNOWN = object()  # a constant whose value could not be read (external data not found, or too big to bother)
_MAX_READ = 4096  # elements: K, trip counts and axes are tiny; weights are never read


class _Lazy:
    """An initializer whose value is read (from external data if need be) only when a check needs it."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: str | None) -> None:
        self.tensor, self.base_dir, self.value = tensor, base_dir, None

    def get(self) -> Any:
        if self.value is None:
            n = int(np.prod(list(self.tensor.dims), dtype=np.int64))
            self.value = _read_tensor(self.tensor, self.base_dir) if n <= _MAX_READ else _UNKNOWN
        return self.value


@dataclass
class _Scope:
    types: dict[str, tuple[int, list[int | str | None] | None]]  # name -> (elem_type, dims or None)
    consts: dict[str, Any]  # name -> np.ndarray | _UNKNOWN (initializers, Constant outputs, folded)
    strict: set[str]  # names that are initializers or Constant outputs (the parser's "weights")
    producers: dict[str, tuple[str, str]]  # name -> (node label, op)
    graph_io: set[str]  # graph inputs and outputs of the top-level graph (UINT8 allowed there)
    parent: "_Scope | None" = None

    def type(self, name: str) -> tuple[int, list[int | str | None] | None] | None:
        s: _Scope | None = self
        while s is not None:
            if name in s.types:
                return s.types[name]
            s = s.parent
        return None

    def raw(self, name: str) -> Any:
        """Constant value, possibly partial (object array with None for runtime dims), or None."""
        s: _Scope | None = self
        while s is not None:
            if name in s.consts:
                v = s.consts[name]
                return v.get() if isinstance(v, _Lazy) else v
            if name in s.types:
                return None  # a non-constant tensor of this scope (shadows outer names)
            s = s.parent
        return None

    def const(self, name: str, strict: bool = False) -> Any:
        """Constant value (np.ndarray or _UNKNOWN) or None when `name` is not a build-time constant."""
        s: _Scope | None = self
        while s is not None:
            if name in s.consts:
                if strict and name not in s.strict:
                    return None
                v = s.consts[name]
                v = v.get() if isinstance(v, _Lazy) else v
                return v if v is _UNKNOWN or _known(v) else None
            if name in s.types:
                return None
            s = s.parent
        return None


def _dims(t: onnx.TypeProto) -> tuple[int, list[int | str | None] | None] | None:
    if not t.HasField("tensor_type"):
        return None
    tt = t.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, None
    return tt.elem_type, [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def _read_tensor(t: onnx.TensorProto, base_dir: str | None) -> Any:
    try:
        if onnx.external_data_helper.uses_external_data(t):
            if base_dir is None:
                return _UNKNOWN
            return numpy_helper.to_array(t, base_dir=base_dir)
        return numpy_helper.to_array(t)
    except Exception:  # noqa: BLE001 - unreadable value: still a constant, value unknown
        return _UNKNOWN


def _constant_node_value(node: onnx.NodeProto, base_dir: str | None) -> Any:
    for a in node.attribute:
        if a.name == "value":
            return _read_tensor(a.t, base_dir)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
    return _UNKNOWN


def _known(v: Any) -> bool:
    """A fully known value (partial shape values are object arrays holding None for runtime dims)."""
    return v is not None and v is not _UNKNOWN and not (v.dtype == object and any(x is None for x in v.flat))


def _fold(node: onnx.NodeProto, vals: list[Any], in_dims: list[int | str | None] | None) -> Any:
    """Value of `node` when its inputs are (partially) constant: the shape arithmetic exporters emit for TopK K
    or loop trip counts, e.g. Gather(Shape(x), 1) on a static dim, or Cast(Constant). None when not constant."""
    op, x = node.op_type, (vals[0] if vals else None)
    if op == "Shape":
        if in_dims is None:
            return None
        dims = np.array([d if isinstance(d, int) else None for d in in_dims], dtype=object)
        return dims[_attr(node, "start", 0): _attr(node, "end", None)]
    if op == "Size":
        ok = in_dims is not None and all(isinstance(d, int) for d in in_dims)
        return np.array(int(np.prod(in_dims, dtype=np.int64)), dtype=np.int64) if ok else None
    if any(v is _UNKNOWN for v in vals if v is not None):
        return _UNKNOWN
    try:
        if op == "Identity":
            return x
        if op == "Cast":
            to = onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "to"))
            return x.astype(to) if _known(x) else x
        if op == "Unsqueeze":
            axes = _attr(node, "axes") if len(vals) < 2 else [int(a) for a in vals[1].reshape(-1)]
            out = x
            for a in sorted(int(a) % (x.ndim + len(axes)) for a in axes):
                out = np.expand_dims(out, a)
            return out
        if op == "Squeeze":
            axes = _attr(node, "axes") if len(vals) < 2 else [int(a) for a in vals[1].reshape(-1)]
            return np.squeeze(x, axis=tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)
        if op == "Reshape":
            shape = [int(d) for d in vals[1].reshape(-1)]
            shape = [x.shape[i] if d == 0 and not _attr(node, "allowzero", 0) else d for i, d in enumerate(shape)]
            return x.reshape(shape)
        if op == "Flatten":
            axis = _attr(node, "axis", 1) % max(x.ndim, 1)
            return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
        if op == "Concat":
            return np.concatenate([np.atleast_1d(v) for v in vals], axis=_attr(node, "axis", 0))
        if op == "Gather":
            idx = vals[1]
            return np.take(x, idx.astype(np.int64), axis=_attr(node, "axis", 0)) if _known(idx) else None
        if op == "Slice" and x.ndim == 1 and all(_known(v) for v in vals[1:] if v is not None):
            starts, ends = int(vals[1].reshape(-1)[0]), int(vals[2].reshape(-1)[0])
            steps = int(vals[4].reshape(-1)[0]) if len(vals) > 4 and vals[4] is not None else 1
            return x[slice(starts, ends, steps)]
        if op in ("Add", "Sub", "Mul", "Div") and _known(x) and _known(vals[1]):
            a, b = x, vals[1]
            if op == "Div" and np.issubdtype(a.dtype, np.integer):
                return (np.trunc(a / b)).astype(np.result_type(a, b))
            return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, b)
    except Exception:  # noqa: BLE001 - anything unusual: treat as not foldable
        return None
    return None


_FOLDABLE = ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Concat", "Shape", "Size", "Gather",
             "Slice", "Add", "Sub", "Mul", "Div")


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# ---------------------------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------------------------

class _Checker:
    def __init__(self, model: onnx.ModelProto, graph_name: str, trt_version: str, base_dir: str | None) -> None:
        self.model, self.graph_name, self.base_dir = model, graph_name, base_dir
        self.ver = parse_version(trt_version)
        self.table = op_table(self.ver)
        self.report = Report(graph_name, trt_version)
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.flagged_tensors: set[str] = set()

    def add(self, node: str, op: str, what: str, severity: str = "error") -> None:
        self.report.issues.append(Issue(self.graph_name, node, op, what, severity))

    # -- scopes ---------------------------------------------------------------------------------------------
    def scope(self, g: onnx.GraphProto, parent: _Scope | None, top: bool = False) -> _Scope:
        types: dict[str, Any] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            d = _dims(vi.type)
            if d is not None and vi.name:
                types[vi.name] = d
        consts: dict[str, Any] = {}
        strict: set[str] = set()
        input_names = {i.name for i in g.input}
        for init in g.initializer:
            types.setdefault(init.name, (init.data_type, list(init.dims)))
            if init.name not in input_names:  # an initializer that is also a graph input can be overridden
                consts[init.name] = _Lazy(init, self.base_dir)
                strict.add(init.name)
        producers: dict[str, tuple[str, str]] = {}
        io = ({i.name for i in g.input} | {o.name for o in g.output}) if top else set()
        s = _Scope(types, consts, strict, producers, io, parent)
        for idx, node in enumerate(g.node):
            label = node.name or f"#{idx}"
            for o in node.output:
                if o:
                    producers[o] = (label, node.op_type)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for o in node.output:
                    consts[o] = _constant_node_value(node, self.base_dir)
                    strict.add(o)
            elif node.op_type in _FOLDABLE and node.domain in ("", "ai.onnx") and node.input and node.output[0]:
                vals = [s.raw(i) if i else None for i in node.input]
                dims = (s.type(node.input[0]) or (0, None))[1]
                if node.op_type in ("Shape", "Size") or all(v is not None for v, i in zip(vals, node.input) if i):
                    val = _fold(node, vals, dims)
                    if val is not None and val is not _UNKNOWN:
                        val = np.asarray(val)
                        if val.dtype == object and _known(val):
                            val = val.astype(np.int64)
                    if val is not None:
                        consts[node.output[0]] = val
        return s

    # -- graph walk -----------------------------------------------------------------------------------------
    def check_graph(self, g: onnx.GraphProto, scope: _Scope, prefix: str = "") -> None:
        self.check_tensor_types(g, scope, prefix)
        for idx, node in enumerate(g.node):
            self.check_node(node, prefix + (node.name or f"#{idx}"), scope)

    def check_tensor_types(self, g: onnx.GraphProto, scope: _Scope, prefix: str) -> None:
        graph_inputs = {i.name for i in g.input}
        for name, (elem, _) in scope.types.items():
            if not elem or name in self.flagged_tensors:
                continue
            what = self.dtype_problem(elem, name, scope)
            if what is None:
                continue
            self.flagged_tensors.add(name)
            if name in scope.producers:
                node, op = scope.producers[name]
                node = prefix + node
            elif name in graph_inputs:
                node, op = prefix + name, "input"
            else:
                node, op = prefix + name, "initializer"
            self.add(node, op, what)

    def dtype_problem(self, elem: int, name: str, scope: _Scope) -> str | None:
        tname = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else str(elem)
        token = _TYPE_TOKEN.get(tname)
        if tname == "DOUBLE":
            return (f"tensor '{name}' is DOUBLE: TensorRT has no float64 (the parser silently casts it to float32, "
                    f"clamping at +-FLT_MAX); export it as float32")
        if token is None or (token == "FP4" and self.ver < (10, 8)):
            return f"tensor '{name}' is {tname}: TensorRT {self.ver[0]}.{self.ver[1]} has no such type"
        if token == "UINT8" and scope.parent is None and name not in scope.graph_io and name in scope.producers:
            return f"tensor '{name}' is UINT8: TensorRT takes UINT8 only as a network input/output"
        return None

    def check_node(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        op = node.op_type
        self.report.num_nodes += 1
        self.report.op_counts[op] = self.report.op_counts.get(op, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            fn = self.functions.get((node.domain, op))
            if fn is not None:  # model-local function: the parser imports its body (TensorRT >= 9)
                self.check_function(fn, label, scope)
                return
            self.add(label, op, f"custom op (domain '{node.domain}'): TensorRT needs a plugin registered for "
                                f"'{op}'; none ships with TensorRT's ONNX parser")
            return
        if op not in self.table:
            fn = self.functions.get((node.domain, op))
            if fn is not None:
                self.check_function(fn, label, scope)
                return
            self.add(label, op, f"op '{op}' is not in the TensorRT {self._v()} ONNX parser's support table "
                                f"(no importer; it would need a plugin)")
            return
        types = self.table[op]
        if types is None:
            self.add(label, op, f"op '{op}' is listed as unsupported by the TensorRT {self._v()} ONNX parser")
            return
        self.check_op_dtype(node, label, scope, types)
        rule = getattr(self, f"rule_{op}", None)
        if rule is not None:
            rule(node, label, scope)
        for (rop, idx), (until, what) in _CONST_INPUT_UNTIL.items():
            if rop == op and self.ver < until:
                self.need_const_input(node, label, scope, idx, what)
        for a in node.attribute:  # Loop/If/Scan bodies
            if a.type == onnx.AttributeProto.GRAPH:
                self.check_graph(a.g, self.scope(a.g, scope), prefix=f"{label}/{a.name}/")
            elif a.type == onnx.AttributeProto.GRAPHS:
                for k, sub in enumerate(a.graphs):
                    self.check_graph(sub, self.scope(sub, scope), prefix=f"{label}/{a.name}[{k}]/")

    def check_function(self, fn: onnx.FunctionProto, label: str, scope: _Scope) -> None:
        fscope = _Scope({}, {}, set(), {}, set(), scope)
        for idx, n in enumerate(fn.node):
            self.check_node(n, f"{label}/{fn.name}/{n.name or '#' + str(idx)}", fscope)

    def _v(self) -> str:
        return f"{self.ver[0]}.{self.ver[1]}"

    # -- per-op dtype column --------------------------------------------------------------------------------
    def check_op_dtype(self, node: onnx.NodeProto, label: str, scope: _Scope, types: tuple[str, ...]) -> None:
        if node.op_type in _CONTROL_FLOW and node.op_type != "If":
            return
        kind, idx = _TYPED_SLOT.get(node.op_type, ("in", 0))
        names = node.input if kind == "in" else node.output
        if idx >= len(names) or not names[idx]:
            return
        t = scope.type(names[idx])
        if t is None or not t[0]:
            return
        tname = onnx.TensorProto.DataType.Name(t[0]) if t[0] in onnx.TensorProto.DataType.values() else "?"
        token = _TYPE_TOKEN.get(tname)
        if token is None or names[idx] in self.flagged_tensors:
            return  # reported once as an impossible tensor type
        if token == "UINT8" and node.op_type not in ("Cast", "CastLike"):
            return  # UINT8 is reported by the tensor check (only allowed as network IO, which then feeds a Cast)
        if token not in types:
            self.add(label, node.op_type, f"{'input' if kind == 'in' else 'output'} '{names[idx]}' is {tname}; the "
                                          f"TensorRT {self._v()} parser table lists {node.op_type} for "
                                          f"{', '.join(types)} only")

    def need_const_input(self, node: onnx.NodeProto, label: str, scope: _Scope, idx: int, what: str) -> None:
        if idx < len(node.input) and node.input[idx] and scope.const(node.input[idx], strict=True) is None:
            self.add(label, node.op_type, f"`{what}` ('{node.input[idx]}') must be an initializer/Constant for the "
                                          f"TensorRT {self._v()} parser")

    # -- op rules -------------------------------------------------------------------------------------------
    def rule_TopK(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        if _attr(node, "sorted", 1) == 0:
            self.add(label, "TopK", "`sorted` must be 1 for TensorRT (sorted=0 is not supported)")
        k_attr = _attr(node, "k")
        if len(node.input) < 2 and k_attr is not None:  # opset < 10: K is an attribute
            k = k_attr
        else:
            name = node.input[1] if len(node.input) > 1 else ""
            val = scope.const(name) if name else None
            if val is None:
                self.add(label, "TopK", f"K ('{name}') is not a constant initializer: TensorRT needs K at build time "
                                        f"to check it against its limit ({TOPK_MAX_K}); export K as a constant")
                return
            if val is _UNKNOWN:
                self.add(label, "TopK", f"K ('{name}') is constant but its value could not be read", "warning")
                return
            k = int(np.asarray(val).reshape(-1)[0])
        if k >= TOPK_MAX_K:
            self.add(label, "TopK", f"K={k} >= {TOPK_MAX_K}: TensorRT's TopK supports K < {TOPK_MAX_K}")

    def rule_Loop(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        body = _attr(node, "body")
        trip = node.input[0] if node.input else ""
        if not trip:
            self.add(label, "Loop", "no trip count (a while-loop driven by `cond`): TensorRT needs a constant trip "
                                    "count (scan-output length cannot be dynamic); loop a fixed number of times")
        else:
            val = scope.const(trip)
            if val is None:
                self.add(label, "Loop", f"trip count '{trip}' is not a constant: TensorRT needs a fixed iteration "
                                        f"count (scan-output length cannot be dynamic)")
            elif val is not _UNKNOWN and int(np.asarray(val).reshape(-1)[0]) >= _INT32_MAX:
                self.add(label, "Loop", "trip count is INT_MAX, which TensorRT treats as 'no trip count' "
                                        "(while-loop); loop a fixed number of times")
        if body is None:
            return
        bscope = self.scope(body, scope)
        n_carried = max(0, len(node.input) - 2)
        induced: list[list[int | str | None] | None] | None = None
        for i in range(n_carried):
            init_name = node.input[2 + i]
            in_vi = body.input[2 + i] if 2 + i < len(body.input) else None
            out_vi = body.output[1 + i] if 1 + i < len(body.output) else None
            if in_vi is None or out_vi is None:
                continue
            shapes = {
                "initial": (scope.type(init_name) or (0, None))[1],
                "body input": (bscope.type(in_vi.name) or (0, None))[1],
                "after one iteration": (bscope.type(out_vi.name) or (0, None))[1],
            }
            verdict = _shape_change(shapes)
            if verdict is not None and verdict[0] == "warning":
                # not provable from the body's own annotations: try induction (see `_carried_shapes_by_induction`)
                if induced is None:
                    induced = self._carried_shapes_by_induction(node, body, scope) or [None] * n_carried
                if induced[i] is not None:
                    verdict = _shape_change({**shapes, "after one iteration": induced[i]})
            if verdict is None:
                continue
            severity, why = verdict
            self.add(label, "Loop", f"loop-carried '{init_name}' {why}: TensorRT requires loop-carried values to "
                                    f"keep the same shape across iterations", severity)

    def _carried_shapes_by_induction(self, node: onnx.NodeProto, body: onnx.GraphProto,
                                     scope: _Scope) -> list[list[int | str | None] | None] | None:
        """Shapes of the body's loop-carried outputs when every carried input has its initial shape; None on failure.

        ONNX's Loop shape inference clears the shapes of loop-carried inputs before it infers the body (they may
        change between iterations), so a body whose inputs are typed without shapes (what torch.onnx/onnxscript emit)
        never has inferable carried-output shapes. Induction recovers them: the body is inferred on its own with each
        carried input declared at its initial shape S (outer-scope values typed from the enclosing graph); a carried
        output inferred as S again keeps S in every iteration, anything else is reported as before.
        """
        n_carried = max(0, len(node.input) - 2)
        try:
            g = onnx.GraphProto()
            g.name = body.name or "body"
            g.node.extend(body.node)
            g.initializer.extend(body.initializer)
            for idx, vi in enumerate(body.input):
                if 2 <= idx < 2 + n_carried:
                    declared = _dims(vi.type)
                    init = scope.type(node.input[idx])
                    elem = (init[0] if init and init[0] else 0) or (declared[0] if declared else 0)
                    dims = init[1] if init and init[1] is not None else (declared[1] if declared else None)
                    if not elem:
                        return None
                    g.input.append(onnx.helper.make_tensor_value_info(vi.name, elem, dims))
                else:
                    g.input.append(vi)
            defined = {v.name for v in body.input} | {t.name for t in body.initializer}
            defined |= {o for n in body.node for o in n.output}
            for name in sorted(_used_names(body) - defined):  # outer-scope values the body reads
                t = scope.type(name)
                if t is None or not t[0]:
                    continue
                val = scope.const(name)
                if (isinstance(val, np.ndarray) and val.dtype != object and val.size <= _MAX_READ
                        and onnx.helper.np_dtype_to_tensor_dtype(val.dtype) == t[0]):
                    g.initializer.append(numpy_helper.from_array(val, name))  # constants feed data propagation
                else:
                    g.input.append(onnx.helper.make_tensor_value_info(name, t[0], t[1]))
            g.output.extend(onnx.ValueInfoProto(name=o.name) for o in body.output)
            m = onnx.helper.make_model(g, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
            m.functions.extend(self.model.functions)
            out = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True).graph.output
        except Exception:  # noqa: BLE001 - best effort: the caller keeps its warning
            return None
        res: list[list[int | str | None] | None] = []
        for i in range(n_carried):
            d = _dims(out[1 + i].type) if 1 + i < len(out) else None
            res.append(d[1] if d else None)
        return res

    def _rank(self, name: str, scope: _Scope) -> int | None:
        t = scope.type(name) if name else None
        return len(t[1]) if t is not None and t[1] is not None else None

    def rule_Attention(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        # 10.15 GA operators.md, Attention: "`Q`, `K`, `V` and `attn_mask` must be 4D. `past_key`, `past_value` and
        # `nonpad_kv_seqlen` inputs are unsupported. `present_key`, `present_value` and `qk_matmul_output` outputs
        # are unsupported. `qk_matmul_output_mode` and `softcap` attributes are unsupported."
        for idx, what in enumerate(("Q", "K", "V", "attn_mask")):
            if idx < len(node.input) and node.input[idx]:
                r = self._rank(node.input[idx], scope)
                if r is not None and r != 4:
                    self.add(label, "Attention", f"`{what}` is {r}-D: TensorRT {self._v()} takes 4-D Q, K, V and "
                                                 f"attn_mask only (fold the heads into dim 1)")
        for idx, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
            if idx < len(node.input) and node.input[idx]:
                self.add(label, "Attention", f"input `{what}` is not supported by TensorRT {self._v()}'s Attention "
                                             f"importer (concatenate the KV cache outside the node)")
        for idx, what in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
            if idx < len(node.output) and node.output[idx]:
                self.add(label, "Attention", f"output `{what}` is not supported by TensorRT {self._v()}'s Attention "
                                             f"importer")
        for a in ("qk_matmul_output_mode", "softcap"):
            if _attr(node, a, 0):
                self.add(label, "Attention", f"attribute `{a}` is not supported by TensorRT {self._v()}")

    def rule_RotaryEmbedding(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        # 10.15 GA operators.md, RotaryEmbedding: "`position_ids` must be INT64"
        if len(node.input) > 3 and node.input[3]:
            t = scope.type(node.input[3])
            if t is not None and t[0] and t[0] != onnx.TensorProto.INT64:
                self.add(label, "RotaryEmbedding", f"`position_ids` is {onnx.TensorProto.DataType.Name(t[0])}: "
                                                   f"TensorRT takes INT64 position ids")

    def rule_TensorScatter(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        # 10.15 GA operators.md, TensorScatter: "`past_cache` and `update` must be 4D. `axis` must be -2."
        for idx, what in ((0, "past_cache"), (1, "update")):
            r = self._rank(node.input[idx], scope) if idx < len(node.input) else None
            if r is not None and r != 4:
                self.add(label, "TensorScatter", f"`{what}` is {r}-D: TensorRT takes 4-D past_cache and update only")
        axis = _attr(node, "axis", -2)
        if axis != -2:
            self.add(label, "TensorScatter", f"axis={axis}: TensorRT supports axis=-2 only")

    def rule_DequantizeLinear(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        # operators.md (10.1 and 10.15 GA), DequantizeLinear: "`x_zero_point` must be zero" (symmetric only)
        if len(node.input) > 2 and node.input[2]:
            zp = scope.const(node.input[2])
            if zp is None:
                self.add(label, "DequantizeLinear", f"`x_zero_point` ('{node.input[2]}') is not a constant: TensorRT "
                                                    f"quantization is symmetric (zero point must be 0)")
            elif zp is not _UNKNOWN and np.any(np.asarray(zp).astype(np.float64) != 0):
                self.add(label, "DequantizeLinear", "`x_zero_point` is not zero: TensorRT supports symmetric "
                                                    "quantization only")
        block = _attr(node, "block_size", 0)
        if not block:
            return
        t = scope.type(node.input[0]) if node.input else None
        tname = onnx.TensorProto.DataType.Name(t[0]) if t is not None and t[0] else None
        token = _TYPE_TOKEN.get(tname or "", tname)
        allowed = max((since, types) for since, types in _BLOCK_DQ_TYPES if self.ver >= since)[1]
        if token is not None and token not in allowed:
            self.add(label, "DequantizeLinear", f"block-wise (block_size={block}) {token} weights: TensorRT "
                                                f"{self._v()} dequantizes blocks of {', '.join(allowed)} only")
        self._block_dq_rules(node, label, scope, block, token)

    def _block_dq_rules(self, node: onnx.NodeProto, label: str, scope: _Scope, block: int, token: str | None) -> None:
        """Block-wise DequantizeLinear: constant weights and scales, INT4 blocks of 64/128, block axis in the last two
        dims (see `_BLOCK_DQ_INT4_SIZES`)."""
        for idx, what in ((0, "x"), (1, "x_scale")):
            if idx < len(node.input) and node.input[idx] and scope.const(node.input[idx], strict=True) is None:
                self.add(label, "DequantizeLinear", f"block-wise `{what}` ('{node.input[idx]}') is not an "
                                                    f"initializer: TensorRT dequantizes blocks of constant weights only")
        if token == "INT4" and block not in _BLOCK_DQ_INT4_SIZES:
            self.add(label, "DequantizeLinear", f"INT4 block_size={block}: TensorRT takes INT4 blocks of "
                                                f"{' or '.join(map(str, _BLOCK_DQ_INT4_SIZES))} only")
        rank = self._rank(node.input[0], scope) if node.input else None
        axis = _attr(node, "axis", 1)
        if rank is not None and rank >= 2 and axis % rank < rank - 2:
            self.add(label, "DequantizeLinear", f"block axis {axis} of a {rank}-D tensor: TensorRT blocks one of the "
                                                f"last two dimensions only")

    def rule_ScatterND(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        red = _attr(node, "reduction", b"none")
        red = red.decode() if isinstance(red, bytes) else red
        if red != "none":
            self.add(label, "ScatterND", f"reduction='{red}' is not supported by TensorRT (only 'none')")

    def rule_MaxPool(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        if len(node.output) > 1 and node.output[1]:
            self.add(label, "MaxPool", "the `Indices` output is not supported by TensorRT")

    def rule_LayerNormalization(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        if any(o for o in node.output[1:]):
            self.add(label, "LayerNormalization", "only the first output `Y` is supported by TensorRT")

    def rule_Resize(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        mode = _attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("nearest", "linear"):
            self.add(label, "Resize", f"mode='{mode}' is not supported by TensorRT (nearest, linear)")
        if _attr(node, "antialias", 0):
            self.add(label, "Resize", "antialiasing is not supported by TensorRT")

    def rule_Dropout(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        if len(node.input) > 2 and node.input[2]:
            val = scope.const(node.input[2], strict=True)
            if val is None or (val is not _UNKNOWN and bool(np.asarray(val).reshape(-1)[0])):
                self.add(label, "Dropout", "`training_mode` must be an initializer that is False")

    def rule_Constant(self, node: onnx.NodeProto, label: str, scope: _Scope) -> None:
        for a in node.attribute:
            if a.name in ("sparse_value", "value_string", "value_strings"):
                self.add(label, "Constant", f"attribute `{a.name}` is not supported by TensorRT")

    def run(self) -> Report:
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                if imp.version < 7:
                    self.add("<model>", "opset", f"opset {imp.version} < 7: the TensorRT parser rejects it")
                elif imp.version > max_opset(self.ver):
                    self.add("<model>", "opset", f"opset {imp.version} is newer than the {max_opset(self.ver)} "
                                                 f"TensorRT {self._v()} documents (the parser only warns)", "warning")
        if self.ver > _TABLE_LATEST:
            self.add("<model>", "table", f"the encoded table ends at TensorRT {_TABLE_LATEST[0]}.{_TABLE_LATEST[1]}; "
                                         f"{self._v()} may support more", "warning")
        elif self.ver not in _KNOWN_RELEASES:
            known = max(r for r in _KNOWN_RELEASES if r <= self.ver)
            self.add("<model>", "table", f"TensorRT {self._v()} is not a release the table has a row for; checked "
                                         f"with the {known[0]}.{known[1]} table", "warning")
        top = self.scope(self.model.graph, None, top=True)
        self.check_graph(self.model.graph, top)
        return self.report


def _shape_change(shapes: dict[str, list[int | str | None] | None]) -> tuple[str, str] | None:
    """(severity, why) when a loop-carried value's shape is not provably constant; None when it is."""
    known = {k: v for k, v in shapes.items() if v is not None}
    ref_key = "initial" if "initial" in known else next(iter(known), None)
    if ref_key is None or "after one iteration" not in known:
        return ("warning", "has no inferable shape after an iteration, so its shape could not be checked")
    ref = known[ref_key]
    for k, dims in known.items():
        if k == ref_key:
            continue
        if len(dims) != len(ref):
            return ("error", f"changes rank ({ref_key} {_fmt(ref)}, {k} {_fmt(dims)})")
        for a, b in zip(ref, dims):
            if isinstance(a, int) and a > 0 and isinstance(b, int) and b > 0 and a != b:
                return ("error", f"changes shape ({ref_key} {_fmt(ref)}, {k} {_fmt(dims)})")
            if isinstance(a, int) and a > 0 and isinstance(b, str):
                return ("error", f"changes shape ({ref_key} {_fmt(ref)}, {k} {_fmt(dims)})")
            if isinstance(a, int) and a > 0 and b is None and k == "after one iteration":
                return ("warning", f"may change shape ({ref_key} {_fmt(ref)}, {k} {_fmt(dims)})")
    return None


def _used_names(g: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of `g` or of its nested subgraphs."""
    names: set[str] = set()
    for n in g.node:
        names.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= _used_names(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    names |= _used_names(sub)
    return names


def _fmt(dims: list[int | str | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------

def _load(model_or_path: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, str, str | None]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, (model_or_path.graph.name or "model"), None
    path = Path(model_or_path)
    model = onnx.load(str(path), load_external_data=False)
    return model, path.stem, str(path.parent)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape/type inference without weights; the model unchanged when inference fails (e.g. > 2 GB inline)."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best-effort; declared types are still checked
        return model


def check_model(model_or_path: onnx.ModelProto | str | os.PathLike, *, trt_version: str = "10.3",
                name: str | None = None) -> Report:
    """Check one ONNX model (a path or a ModelProto; weights are not loaded) against TensorRT's ONNX parser."""
    model, stem, base_dir = _load(model_or_path)
    return _Checker(_infer(model), name or stem, trt_version, base_dir).run()


def check_dir(onnx_dir: str | os.PathLike, *, trt_version: str = "10.3") -> dict[str, Report]:
    """`check_model` on every `*.onnx` of a directory, keyed by graph name (the file stem); an export's ORT form
    (`*.ort.onnx`: ONNX Runtime's fused kernels, never built by TensorRT) is not TensorRT's and is left out."""
    paths = sorted(p for p in Path(onnx_dir).glob("*.onnx") if not p.name.endswith(".ort.onnx"))
    return {p.stem: check_model(p, trt_version=trt_version) for p in paths}


def problems_of(reports: Iterable[Report]) -> list[str]:
    """Every problem line of several reports (for a single error message)."""
    return [line for r in reports for line in r.problems]


def main(argv: list[str] | None = None) -> int:
    """`python -m sts_export.backends.tensorrt.check EXPORT_DIR_OR_ONNX... [--trt-version 10.3,11.4]`; exit 1 on problems.

    One report and one verdict line per TensorRT version; the default version is the installed TensorRT, else 10.3.
    """
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m sts_export.backends.tensorrt.check", description=main.__doc__)
    ap.add_argument("paths", nargs="+", help="export directories (every *.onnx) or .onnx files")
    ap.add_argument("--trt-version", default=None,
                    help="TensorRT release(s) to check against, comma-separated (default: the installed one, else 10.3)")
    args = ap.parse_args(argv)
    from sts_export.errors import cli_errors  # noqa: PLC0415

    with cli_errors():
        versions = parse_versions(args.trt_version) if args.trt_version else [default_version()]
        for p in map(Path, args.paths):
            if not p.exists():
                raise StsError(f"{p} does not exist")
        verdicts = []
        for v in versions:
            reports: dict[str, Report] = {}
            for p in map(Path, args.paths):
                if p.is_dir():
                    reports.update(check_dir(p, trt_version=v))
                else:
                    reports[p.stem] = check_model(p, trt_version=v)
            print(format_reports(reports))
            verdicts.append((v, all(r.ok for r in reports.values())))
        for v, ok in verdicts:
            print(f"TensorRT {v} compatibility: {'PASS' if ok else 'FAIL'}")
        return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
