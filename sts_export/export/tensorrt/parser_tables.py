"""What TensorRT's ONNX parser (onnx-tensorrt) supports, per release: the data the static check reads.

* the operator table (`OPS_10_1` plus `DELTAS` per release): op -> the tensor types its importer takes;
* input restrictions lifted in a given release (`CONST_INPUT_UNTIL`: "must be an initializer" axes), the opset each
  release documents, block-quantization types and sizes, TopK's K bound;
* `parse_version` / `parse_versions` / `version_label` / `default_version` (TensorRT 10.x and 11.x only).

Sources (every row and rule names its own):

* onnx-tensorrt `docs/operators.md` and `docs/Changelog.md`, and the importer's source, at the commits TensorRT's
  own repository pins as its `parsers/onnx` submodule (github.com/NVIDIA/TensorRT, `git ls-tree <tag> parsers/onnx`):
  10.1 GA 96e781103cfc4adf4a6bb557e94bac8e693f6f4c, 10.3.0 62bdde2a04fcd53c2409cb895ee18db445b7e755,
  10.15 fa5aa9f61e7781d2ca8f5351d42c1f19525a6124, 10.16 6bde6596eca84abf9afe9b4d21c18c32800fd3ad,
  11.0 5ab48c5c436a5686b8574c4a372cbca224273b5a (11.1: 7c51a63a719180eb5160c874c111746f3fb46a6b). Source read: 10.1 GA
  (whole tree), 10.6 GA (0137504e2b25fe5253bd85d26b073378fb67805b, `toposort.hpp`), 10.15 GA
  (dd0a3a9f8794ae4f0316ed07ea68cda9b944bb3c: `ModelImporter.cpp`, `onnxOpImporters.cpp`, `importerUtils.cpp` at
  fa5aa9f6), 10.16 and 11.0 (`ModelImporter.cpp`, `onnxOpImporters.cpp`). The 10.3.0 commit's files were not
  available: a 10.3 rule is one the 10.1 GA source asserts and no Changelog entry of 10.2/10.3 changes (where 10.1 and
  10.6 agree, 10.3 is read as the same). 11.x after 11.0 reads the 11.0 source.
* TensorRT's `include/NvInfer.h` at the v10.3.0, v10.16 and v11.1 tags (limits the TensorRT API enforces behind the
  importer: TopK's K, loop trip limits).
* NVIDIA's TensorRT release pages for the 11.x parser changes.
"""
from __future__ import annotations

import re

from sts_export.backends.tensorrt import discovery
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

REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare")
SEQUENCE = ("SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
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
    "Multinomial": N, "Neg": FI, "NegativeLogLikelihoodLoss": N, "NonMaxSuppression": F2,
    # operators.md lists NonZero for FP32, FP16 only; the importer (onnxOpImporters.cpp NonZero, 10.1 GA) takes
    # "FLOAT32, FLOAT16, BFLOAT16, INT32, INT64, INT8 or BOOL": the importer's own list is the rule
    "NonZero": F + ("INT32", "INT64", "INT8", "BOOL"),
    "Not": B, "OneHot": FIB, "Optional": N, "OptionalGetElement": N, "OptionalHasElement": N, "Or": B,
    "Pad": FI, "ParametricSoftplus": F, "Pow": F, "PRelu": F, "QLinearConv": N, "QLinearMatMul": N,
    "QuantizeLinear": F, "RandomNormal": F, "RandomNormalLike": F, "RandomUniform": F, "RandomUniformLike": F,
    # Range: operators.md lists FP32, FP16, BF16, INT32, INT64; the importer (onnxOpImporters.cpp Range, 10.1 GA)
    # asserts "This version of TensorRT only supports int32, int64, and float input types for Range!"
    "Range": ("FP32", "INT32", "INT64"), "Reciprocal": F, **{op: FI for op in REDUCE}, "RegexFullMatch": N, "Relu": FI,
    "Reshape": FIB, "Resize": F, "ReverseSequence": FIB, "RNN": F, "RoiAlign": F2, "Round": F, "STFT": N,
    "ScaledTanh": F, "Scan": F, "Scatter": FI, "ScatterElements": FI, "ScatterND": FI, "Selu": F,
    **{op: N for op in SEQUENCE}, "Shape": FIB, "Shrink": FI, "Sigmoid": F, "Sign": FI, "Sin": F, "Sinh": F,
    "Size": FIB, "Slice": FIB, "Softmax": F, "SoftmaxCrossEntropyLoss": N, "Softplus": F, "Softsign": F,
    "SpaceToDepth": FI, "Split": FIB, "SplitToSequence": N, "Sqrt": F, "Squeeze": FIB, "StringConcat": N,
    "StringNormalizer": N, "StringSplit": N, "Sub": FI, "Sum": FI, "Tan": F, "Tanh": F, "TfIdfVectorizer": N,
    "ThresholdedRelu": F, "Tile": FIB, "TopK": FI, "Transpose": FIB, "Trilu": FIB, "Unique": N,
    "Unsqueeze": FIB, "Upsample": F, "Where": FIB, "Xor": B,
}

# Operator additions after 10.1, from onnx-tensorrt docs/Changelog.md ("Added support for ...") with the types
# of the 10.15 GA docs/operators.md. Key: first TensorRT (major, minor) that has it.
DELTAS: dict[tuple[int, int], dict[str, tuple[str, ...] | None]] = {
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
KNOWN_RELEASES = sorted({(10, m) for m in range(0, 17)} | {(11, m) for m in range(0, 6)})
TABLE_LATEST = KNOWN_RELEASES[-1]
# "must be a constant" input restrictions: (op, input index) -> (first release without it, input name, the importer's
# message). Messages: onnxOpImporters.cpp 10.1 GA (Slice, Squeeze, Unsqueeze, CumSum), importerUtils.cpp reduceTensor
# 10.1 GA and 10.15 GA (Reduce*: still asserted in 10.15; 10.16/11.0 importerUtils were not available, the 10.15 GA
# operators.md row keeps "`axes` must be an initializer"). The importers of 11.0 take Squeeze/Unsqueeze axes and the
# CumSum axis as tensors (`convertToTensor`), as the Changelog entries below say.
CONST_INPUT_UNTIL: dict[tuple[str, int], tuple[tuple[int, int], str, str]] = {
    # Changelog 10.3: "Added support for tensor `axes` inputs for `Slice` nodes"
    ("Slice", 3): ((10, 3), "axes", "This version of TensorRT does not support dynamic axes."),
    ("Pad", 3): ((10, 4), "axes", "`axes` must be an initializer"),  # 10.4: "tensor `axes` for `Pad` operations"
    # 10.7: "Added dynamic axes support for `Squeeze` and `Unsqueeze` operations"
    ("Squeeze", 1): ((10, 7), "axes", "Squeeze axes input must be an initializer!"),
    ("Unsqueeze", 1): ((10, 7), "axes", "Axes input for unsqueeze operation should be a constant tensor."),
    # 10.8: "Added support for dynamic axes ... of `CumSum` operations"
    ("CumSum", 1): ((10, 8), "axis", "Axis input for CumSum must be an initializer!"),
    ("OneHot", 1): ((99, 0), "depth", "`depth` must be a build-time constant"),  # operators.md (still in 10.15)
    **{(op, 1): ((99, 0), "axes", "Axis input must be an initializer!") for op in REDUCE},
}
# Highest default-domain opset the parser documents / vendors (header of operators.md, ONNX submodule version in
# the Changelog). Newer opsets only log a warning in the parser, so this is a warning here too.
MAX_OPSET: list[tuple[tuple[int, int], int]] = [
    ((10, 0), 20), ((10, 6), 22), ((10, 11), 23),
    ((10, 15), 24),  # 10.15 GA operators.md: "supports operators in the inclusive range of opset 9 to opset 24"
    ((11, 5), 25),  # releases/tag/v11.5: "Added support for ONNX opset 25" (so 10.16 and 11.0-11.4 stay at 24)
]
# Block-wise DequantizeLinear (`block_size` > 0, opset 21+): the quantized types the parser takes per release.
# TensorRT's "Working with Quantized Types" (10.11 docs): symmetric quantization only, INT4 weight-only; block
# quantization of FP8/FP4 weights arrives with 10.13 (per the issue brief's reading of NVIDIA's notes; the latest
# IQuantizeLayer/IDequantizeLayer operator page lists block quantization for INT4, FP4, FP8 and INT8 scales).
BLOCK_DQ_TYPES: list[tuple[tuple[int, int], tuple[str, ...]]] = [((10, 0), ("INT4",)),
                                                                   ((10, 13), ("INT4", "FP8", "FP4"))]
# Block-wise INT4 (same page, "Quantization Schemes"): "INT4 quantization requires per-block scales. The supported
# block sizes are {64, 128}. The block dimension should be one of the last two dimensions." Blocks are weight-only:
# the quantized tensor and its scales are build-time constants (TensorRT "only supports INT4 for weight quantization").
BLOCK_DQ_INT4_SIZES = (64, 128)

# TopK's K: the importer passes K as a tensor (`setInput(1)`, opset >= 10) and checks no bound itself; TensorRT's
# NvInfer.h (v10.3.0, v10.16, v11.1), ITopKLayer::setK: "Currently only values up to 3840 are supported", setInput(1):
# "Values larger than 3840 will result in a runtime error". So K = 3840 is valid (operators.md's "less than 3840" is
# one stricter than the API it documents).
TOPK_MAX_K = 3840
# Loop: onnxOpImporters.cpp DEFINE_BUILTIN_OP_IMPORTER(Loop) (10.1 GA .. 11.0): a trip count that is INT64 weights with
# a value >= std::numeric_limits<int32_t>::max() is treated as "no trip count" (isMaxTripCount)
INT32_MAX = 2**31 - 1

# ONNX element type name -> the table's type token. Anything else TensorRT has no type for.
TYPE_TOKEN = {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "INT32": "INT32", "INT64": "INT64",
               "BOOL": "BOOL", "UINT8": "UINT8", "INT8": "INT8", "FLOAT8E4M3FN": "FP8", "INT4": "INT4",
               "FLOAT4E2M1": "FP4"}
# Which tensor the "Supported Types" column refers to, where it is not input 0.
TYPED_SLOT: dict[str, tuple[str, int]] = {
    "Constant": ("out", 0), "ConstantOfShape": ("out", 0), "RandomNormal": ("out", 0),
    "RandomUniform": ("out", 0), "Where": ("in", 1), "OneHot": ("in", 2), "If": ("out", 0),
}
CONTROL_FLOW = ("Loop", "If", "Scan")


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
    trt = discovery._import_trt()
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
    for since, ops in sorted(DELTAS.items()):
        if ver >= since:
            table.update(ops)
    return table


def max_opset(trt_version: str | tuple[int, ...] = "10.3") -> int:
    ver = parse_version(trt_version)
    return max(o for since, o in MAX_OPSET if ver >= since)

