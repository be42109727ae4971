"""Stand-ins of the TensorRT Python API (`import tensorrt`) in its 10.3, 10.16 and 11 flavours, for tests.

No machine of this project has TensorRT, so the build (`export/tensorrt/build.py`, `engines.py`) and runtime
(`runtime.py`) code run in CI against these modules. They are not TensorRT: nothing here optimises a network or
runs one on a GPU. What they promise is to answer each call the project makes the way the real bindings do, read
from NVIDIA's own sources:

    NVIDIA/TensorRT v10.3.0 (c5b9de3), v10.16 (52399f5), v11.0 (771d8ef), v11.1 (82d1dca, also `main` when read):
        include/NvInfer.h, include/NvInferRuntime.h      enum values, return conventions, documented preconditions
        python/src/infer/pyCore.cpp, pyGraph.cpp          what the binding does with them (raises, returns None)
        python/docstrings/infer/pyCoreDoc.h, pyGraphDoc.h  the Python API documentation
        python/include/utils.h                             weights_to_numpy (what weight getters return)
        shared/utils/cacheUtils.cpp, tools/Polygraphy/polygraphy/backend/trt/{config,util}.py
    onnx/onnx-tensorrt 10.1-GA (96e7811): onnxOpImporters.cpp, what the parser makes of initializers and Conv

Where the sources leave a behaviour open the stand-in says what it assumes ("Assumed:"). Error messages the real
library logs are quoted from NVIDIA issue threads where one shows them, and carry "[stand-in]".

    NetworkDefinitionCreationFlag  10.3: EXPLICIT_BATCH=0, STRONGLY_TYPED=1; 10.16 adds PREFER_JIT_PYTHON_PLUGINS=2,
                                   PREFER_AOT_PYTHON_PLUGINS=3; 11.0/11.1 drop EXPLICIT_BATCH and renumber:
                                   STRONGLY_TYPED=0 (deprecated, ignored), PREFER_JIT=1, PREFER_AOT=2 (NvInfer.h).
                                   `create_network(flags)` records the members the bits name (`network_flags`).
    IOptimizationProfile           `set_shape` raises RuntimeError "Shape provided for {min,opt,max} is inconsistent
                                   with other shapes." when setDimensions returns false (pyCore.cpp); `bool(p)` is
                                   isValid(): every set input has min/opt/max of one rank, 0 <= min <= opt <= max.
    add_optimization_profile       -1 for a profile that is not valid (pyCoreDoc.h).
    build_serialized_network       None, with the reason logged as an error, when the network's inputs do not fit
                                   the profiles (NvInferRuntime.h: "a full validation is performed at engine build
                                   time"): a dynamic input a profile lacks, another rank, a fixed dim changed, a
                                   shape tensor without values; or when `fail_build` is set (an injected failure).
    create_timing_cache(blob)      None for a blob written by another TensorRT version (or damaged); b"" is a new
                                   cache (pyCoreDoc.h). Assumed from NVIDIA's callers: cacheUtils.cpp
                                   buildTimingCacheFromFile checks for nullptr, Polygraphy's config.py for None.
    set_timing_cache(cache, m)     TypeError for None (the binding takes `ITimingCache const&`); False for a cache
                                   made on another device unless ignore_mismatch (NvInfer.h).
    weights getters                numpy arrays for float32/float16, a `Weights` (dtype, size) for bf16 (utils.h);
                                   the parser gives a Conv's initializer kernel/bias to an IConvolutionLayer and
                                   every other initializer to an IConstantLayer (onnx-tensorrt, Conv importer).
    deserialize_cuda_engine        None for an engine of another TensorRT version (NvInferRuntime.h: "nullptr if it
                                   could not be deserialized").
    IExecutionContext              set_input_shape: False for a shape outside the active profile, another rank or a
                                   changed fixed dim, with TensorRT's "satisfyProfile" error logged (as quoted in
                                   NVIDIA/TensorRT-LLM#1332); get_tensor_shape: -1 for every dynamic dim not known
                                   yet (NvInferRuntime.h); set_tensor_address: False for a device pointer that is not
                                   256-byte aligned ("The pointer must have at least 256-byte alignment"; the return
                                   on that is assumed); execute_async_v3: False when dims that onnx-tensorrt named
                                   alike differ ("must be equal at runtime"; when it is checked is assumed), and on
                                   stream 0 it logs TensorRT's default-stream warning (quoted in
                                   pytorch/TensorRT#3190) and runs.

Execution (a plumbing test, not a TensorRT result). A serialized stand-in engine holds its ONNX file's path, IO and
profiles. Executing it runs that ONNX graph with ONNX Runtime (CPU) on the bytes at the bound input addresses and
writes the results to the bound output addresses; output shapes are read from that run once every input shape and
address is bound. So the runtime's profiles, shapes, addresses, dtypes and streams are exercised for real, while
every number it returns is ONNX Runtime's. A stand-in module carries `__stand_in__`, and the self-test's report says
so in its first line.
"""
from __future__ import annotations

import ctypes
import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx

STAND_IN = "stand-in TensorRT API (tests/trt_stand_ins.py): engines run as ONNX Runtime, not TensorRT"
ENGINE_MAGIC = b"STAND-IN TENSORRT ENGINE\n"
CACHE_MAGIC = b"STAND-IN TIMING CACHE\n"
DEFAULT_STREAM_WARNING = ("Using default stream in enqueueV3() may lead to performance issues due to additional calls "
                          "to cudaStreamSynchronize() by TensorRT to ensure correct synchronization. Please use "
                          "non-default stream instead.")
_ALIGN = 256


# ---------------------------------------------------------------------------------------------------------------
# Enums
# ---------------------------------------------------------------------------------------------------------------

class _Enum:
    """A pybind11 enum member: `.name`, `int()`, equal to the member of the same enum and value."""

    def __init__(self, enum: str, name: str, value: int) -> None:
        self.enum, self.name, self.value = enum, name, value

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Enum) and (other.enum, other.value) == (self.enum, self.value)

    def __hash__(self) -> int:
        return hash((self.enum, self.value))


class _Flags:
    """An enum namespace holding only the members it was made with: touching a removed one is AttributeError."""

    def __init__(self, enum: str, members: dict[str, int] | tuple[str, ...]) -> None:
        values = members if isinstance(members, dict) else {n: i for i, n in enumerate(members)}
        self._members = {n: _Enum(enum, n, v) for n, v in values.items()}
        for n, e in self._members.items():
            setattr(self, n, e)

    def names_of_bits(self, bits: int) -> set[str]:
        """The members whose bit (1 << value) is set in `bits`; a bit no member has is named 'bit<n>'."""
        named = {e.value: n for n, e in self._members.items()}
        return {named.get(i, f"bit{i}") for i in range(int(bits).bit_length()) if bits >> i & 1}


# DataType members (names as the bindings spell them: trt.float16.name == "HALF"); the project reads only names.
_DT = {n: _Enum("DataType", n, v) for v, n in enumerate(
    ("FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64", "INT4"))}
_ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 3: "INT8", 2: "UINT8", 22: "INT4"}
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
       "INT8": np.int8, "UINT8": np.uint8}
# NvInfer.h, enum class NetworkDefinitionCreationFlag, as each release numbers it
NETWORK_FLAGS = {
    "10.3": {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
    "10.16": {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3},
    "11": {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2},
}


class ILogger:
    """pyCore.cpp: ILogger with its Severity values exported into the class scope (trt.ILogger.ERROR)."""

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (_Enum("Severity", n, v) for v, n in enumerate(
        ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")))

    def __init__(self) -> None:
        pass

    def log(self, severity: _Enum, msg: str) -> None:
        raise NotImplementedError("ILogger.log is pure virtual")


class Logger(ILogger):
    """trt.Logger (pyCore.cpp DefaultLogger): prints messages at or above `min_severity` to stdout."""

    def __init__(self, min_severity: _Enum = ILogger.WARNING) -> None:
        ILogger.__init__(self)
        self.min_severity = min_severity

    def log(self, severity: _Enum, msg: str) -> None:
        if int(severity) <= int(self.min_severity):
            print(f"[TRT] [{'FEWIV'[int(severity)]}] {msg}")


class Weights:
    """trt.Weights as a weight getter returns it for a type numpy lacks (bf16): `dtype` and `size` (element count)."""

    def __init__(self, dtype: _Enum, size: int) -> None:
        self.dtype, self.size = dtype, int(size)


def weights_of(tensor: onnx.TensorProto) -> Any:
    """What a weight getter returns for an initializer (utils.h weights_to_numpy): a 1-D numpy array for types numpy
    has (here without the values: the project reads dtype and size only), else a Weights."""
    name = _ONNX_TO_TRT.get(tensor.data_type, "FLOAT")
    n = int(np.prod(tensor.dims, dtype=np.int64))
    if name in _NP:
        return np.broadcast_to(np.zeros((), _NP[name]), (n,))
    return Weights(_DT[name], n)


# ---------------------------------------------------------------------------------------------------------------
# Network: tensors, layers (10.x with the weak-typing setters, 11 without), what the ONNX parser makes
# ---------------------------------------------------------------------------------------------------------------

class Tensor:
    """An ITensor; `dim_names` are the dimension names onnx-tensorrt gives network inputs from ONNX dim_params
    (ModelImporter.cpp, importInputs -> setDimensionNames). NvInfer.h, ITensor::setDimensionName: "Dimensions with
    the same non-empty name must be equal at runtime."
    """

    def __init__(self, name: str, dtype: _Enum, shape: tuple = (-1, 8), is_shape_tensor: bool = False,
                 dim_names: tuple = ()) -> None:
        self.name, self.dtype, self.shape, self.is_shape_tensor = name, dtype, tuple(shape), is_shape_tensor
        self.dim_names = tuple(dim_names) or (None,) * len(self.shape)


_LAYER_TYPES = {n: _Enum("LayerType", n, v) for v, n in enumerate(
    ("CONVOLUTION", "SCALE", "DECONVOLUTION", "CONSTANT", "MATRIX_MULTIPLY", "SHUFFLE"))}


def _layer_classes(weak_typing: bool) -> dict[str, type]:
    """ILayer and the subclasses that hold weights (pyGraph.cpp: IConstantLayer.weights, IConvolutionLayer and
    IDeconvolutionLayer .kernel/.bias, IScaleLayer .shift/.scale/.power). With `weak_typing` (10.x) a layer has
    `precision` and `set_output_type`; TensorRT 11 removed both ("TensorRT 10.x to 11.x Python API" migration guide),
    and __slots__ makes setting them an AttributeError."""

    class ILayer:
        __slots__ = ("name", "type", "metadata", "ins", "outs") + (("precision", "out_types") if weak_typing else ())

        def __init__(self, name: str, ins: list, outs: list, type_: str = "MATRIX_MULTIPLY", metadata: str = "",
                     **weights: Any) -> None:
            self.name, self.type, self.metadata, self.ins, self.outs = name, _LAYER_TYPES[type_], metadata, ins, outs
            if weak_typing:
                self.precision, self.out_types = None, {}
            for k, v in weights.items():
                setattr(self, k, v)

        num_inputs = property(lambda self: len(self.ins))
        num_outputs = property(lambda self: len(self.outs))

        def get_input(self, i: int) -> Tensor:
            return self.ins[i]

        def get_output(self, i: int) -> Tensor:
            return self.outs[i]

        if weak_typing:
            def set_output_type(self, i: int, dtype: _Enum) -> None:
                self.out_types[i] = dtype

    class IConstantLayer(ILayer):
        __slots__ = ("weights",)

    class IConvolutionLayer(ILayer):
        __slots__ = ("kernel", "bias")

    class IDeconvolutionLayer(ILayer):
        __slots__ = ("kernel", "bias")

    class IScaleLayer(ILayer):
        __slots__ = ("shift", "scale", "power")

    return {c.__name__: c for c in (ILayer, IConstantLayer, IConvolutionLayer, IDeconvolutionLayer, IScaleLayer)}


_LAYERS_10 = _layer_classes(weak_typing=True)
_LAYERS_11 = _layer_classes(weak_typing=False)


class Network:
    def __init__(self, layers: list, inputs: list, outputs: list = (), onnx_path: str | None = None) -> None:
        self.layers, self.inputs, self.outputs, self.onnx_path = layers, inputs, list(outputs), onnx_path

    num_layers = property(lambda self: len(self.layers))
    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_layer(self, i: int) -> Any:
        return self.layers[i]

    def get_input(self, i: int) -> Tensor:
        return self.inputs[i]

    def get_output(self, i: int) -> Tensor:
        return self.outputs[i]


def _io(v: onnx.ValueInfoProto) -> Tensor:
    """A network IO tensor: ONNX dims, -1 where symbolic. Assumed: a rank-0 integer input is a shape tensor
    (TensorRT decides from how the graph uses it; the project's rank-0 inputs, such as `image_start`, index slices)."""
    tt = v.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
    names = tuple(d.dim_param or None for d in tt.shape.dim)
    name = _ONNX_TO_TRT[tt.elem_type]
    return Tensor(v.name, _DT[name], dims, is_shape_tensor=not dims and name in ("INT32", "INT64"), dim_names=names)


def network_from_onnx(path: str, layers: dict[str, type]) -> Network:
    """What TensorRT's ONNX parser makes of a file, as far as the project reads it: an IConvolutionLayer holding
    the kernel and bias of each Conv whose kernel is an initializer (onnx-tensorrt 10.1-GA, Conv importer:
    addConvolutionNd with kernelWeights/bias_weights), an IConstantLayer per other initializer (its weights and
    output tensor), a MATRIX_MULTIPLY layer per MatMul, and the graph IO (symbolic dims are -1)."""
    m = onnx.load(path, load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    out: list = []
    in_conv: set[str] = set()
    for n in m.graph.node:
        if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1 and n.input[1] in inits:
            kernel = weights_of(inits[n.input[1]])
            has_bias = len(n.input) > 2 and n.input[2] in inits
            bias = weights_of(inits[n.input[2]]) if has_bias else np.zeros((0,), np.float32)  # empty: no bias
            in_conv.update(n.input[1:3])
            cls = layers["IConvolutionLayer" if n.op_type == "Conv" else "IDeconvolutionLayer"]
            out.append(cls(n.name, [], [Tensor(n.output[0], _DT["FLOAT"])],
                           "CONVOLUTION" if n.op_type == "Conv" else "DECONVOLUTION", kernel=kernel, bias=bias))
        elif n.op_type == "MatMul":
            out.append(layers["ILayer"](n.name, [], [Tensor(n.output[0], _DT["FLOAT"])]))
    out += [layers["IConstantLayer"](f"const_{t.name}", [], [Tensor(t.name, _DT[_ONNX_TO_TRT[t.data_type]], tuple(t.dims))],
                                     "CONSTANT", weights=weights_of(t))
            for t in m.graph.initializer if t.data_type in _ONNX_TO_TRT and t.name not in in_conv]
    return Network(out, [_io(v) for v in m.graph.input], [_io(v) for v in m.graph.output], onnx_path=str(path))


# ---------------------------------------------------------------------------------------------------------------
# Builder side: profiles, config, timing cache
# ---------------------------------------------------------------------------------------------------------------

class IOptimizationProfile:
    """pyCore.cpp opt_profile_set_shape calls setDimensions for MIN, OPT, MAX and raises RuntimeError when one
    returns false; NvInferRuntime.h: false "if an inconsistency was detected (e.g. the rank does not match another
    dimension that was previously set for the same input)" -- assumed: the rank is all set_shape checks, the rest
    (order, network dims) is for isValid() and the build. `bool(profile)` is isValid() (pyCore.cpp __bool__)."""

    def __init__(self, calls: list) -> None:
        self.calls, self.shapes, self.values = calls, {}, {}

    def set_shape(self, input: str, min: tuple, opt: tuple, max: tuple) -> None:  # noqa: A002 - the binding's names
        self.calls.append("profile.set_shape")
        dims = [tuple(int(x) for x in d) for d in (min, opt, max)]
        for sel, d in zip(("min", "opt", "max"), dims):
            if len(d) != len(dims[0]):
                raise RuntimeError(f"Shape provided for {sel} is inconsistent with other shapes.")
        self.shapes[input] = tuple(dims)

    def set_shape_input(self, input: str, min: tuple, opt: tuple, max: tuple) -> None:  # noqa: A002
        self.calls.append("profile.set_shape_input")
        vals = [tuple(int(x) for x in v) for v in (min, opt, max)]
        for sel, v in zip(("min", "opt", "max"), vals):
            if len(v) != len(vals[0]):
                raise RuntimeError(f"{sel} input provided for shape tensor is inconsistent with other inputs.")
        self.values[input] = tuple(vals)

    def get_shape(self, input: str) -> list:  # noqa: A002
        return list(self.shapes.get(input, ()))

    def __bool__(self) -> bool:
        """isValid(): for each input set, one rank and 0 <= min <= opt <= max (values: min <= opt <= max)."""
        for lo, opt, hi in self.shapes.values():
            if not len(lo) == len(opt) == len(hi) or not all(0 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
                return False
        return all(a <= b <= c for lo, opt, hi in self.values.values() for a, b, c in zip(lo, opt, hi))


class TimingCache:
    def __init__(self, version: str, device: str, entries: int = 0) -> None:
        self.version, self.device, self.entries = version, device, entries

    def serialize(self) -> bytes:
        return CACHE_MAGIC + json.dumps({"version": self.version, "device": self.device,
                                         "entries": self.entries}).encode()


class BuilderConfig:
    def __init__(self, fake: "StandInTrt", logger: ILogger) -> None:
        self.fake, self.calls, self.logger = fake, fake.calls, logger
        self.flags, self.cleared, self.profiles, self.pools = set(), set(), [], {}
        self.builder_optimization_level, self.progress_monitor, self.cache = None, None, None

    def set_flag(self, f: _Enum) -> None:
        self.calls.append(f"config.set_flag({f})")
        self.flags.add(str(f))

    def clear_flag(self, f: _Enum) -> None:
        self.calls.append(f"config.clear_flag({f})")
        self.cleared.add(str(f))

    def set_memory_pool_limit(self, pool: _Enum, pool_size: int) -> None:
        self.calls.append(f"config.set_memory_pool_limit({pool})")
        self.pools[str(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool: _Enum) -> int:
        """NvInfer.h MemoryPoolType::kWORKSPACE: "This defaults to max device memory"."""
        return self.pools.get(str(pool), self.fake.device_memory)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        """pyCoreDoc.h: "The index of the optimization profile (starting from 0) if the input is valid, or -1 if the
        input is not valid"."""
        self.calls.append("config.add_optimization_profile")
        if not profile:
            self.fake.log(self.logger, ILogger.ERROR, "4: [stand-in] Error Code 4: API Usage Error (Optimization profile is invalid: "
                                         "each dim needs 0 <= min <= opt <= max.)")
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    num_optimization_profiles = property(lambda self: len(self.profiles))

    def create_timing_cache(self, serialized_timing_cache: bytes) -> TimingCache | None:
        self.calls.append("config.create_timing_cache")
        blob = bytes(serialized_timing_cache)
        if not blob:
            return TimingCache(self.fake.__version__, self.fake.device)
        if not blob.startswith(CACHE_MAGIC):
            self.fake.log(self.logger, ILogger.ERROR, "1: [stand-in] Error Code 1: Serialization (Serialization assertion "
                                         "magicTagRead == kMAGIC_TAG failed.Magic tag does not match)")
            return None
        meta = json.loads(blob[len(CACHE_MAGIC):])
        if meta["version"] != self.fake.__version__:
            self.fake.log(self.logger, ILogger.ERROR, f"1: [stand-in] Error Code 1: Serialization (the timing cache was written by "
                                         f"TensorRT {meta['version']}, this is {self.fake.__version__})")
            return None
        return TimingCache(meta["version"], meta["device"], meta["entries"])

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        self.calls.append("config.set_timing_cache")
        if not isinstance(cache, TimingCache):  # pybind11: `ITimingCache const&` does not take None
            raise TypeError("set_timing_cache(): incompatible function arguments. The following argument types are "
                            "supported: (self, cache: tensorrt.ITimingCache, ignore_mismatch: bool) -> bool")
        if cache.device != self.fake.device and not ignore_mismatch:
            self.fake.log(self.logger, ILogger.ERROR, "[stand-in] the timing cache was made on a device with other properties")
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> TimingCache | None:
        self.calls.append("config.get_timing_cache")
        return self.cache


def _build_problems(network: Network, profiles: list[IOptimizationProfile]) -> list[str]:
    """What TensorRT's build-time validation of the network against the profiles reports (messages as NVIDIA issue
    threads show them: #1116 no profile, #532 missing dimensions, #939 rank and fixed dims, #4204 shape values)."""
    dynamic = [t for t in network.inputs if -1 in t.shape or t.is_shape_tensor]
    if dynamic and not profiles:
        return ["Network has dynamic or shape inputs, but no optimization profile has been defined."]
    out = []
    for k, p in enumerate(profiles):
        named: dict[str, tuple] = {}  # dim name -> its (min, opt, max): one range per name (NVIDIA/TensorRT#202)
        for t in network.inputs:
            for i, dn in enumerate(t.dim_names):
                if dn and t.name in p.shapes and len(p.shapes[t.name][0]) == len(t.shape):
                    r = tuple(s[i] for s in p.shapes[t.name])
                    if named.setdefault(dn, r) != r:
                        out.append(f"{dn}: Input dimensions with this name are inconsistent.")
        for t in network.inputs:
            if t.is_shape_tensor:
                vals = p.values.get(t.name)
                if vals is None:
                    out.append(f"{t.name}: optimization profile {k} is missing values for shape input.")
                elif len(vals[0]) != int(np.prod(t.shape, dtype=np.int64)):
                    out.append(f"{t.name}: profile {k} gives {len(vals[0])} values for a shape tensor of "
                               f"{int(np.prod(t.shape, dtype=np.int64))}.")
            if -1 in t.shape and t.name not in p.shapes:
                out.append(f"{t.name}: dynamic input is missing dimensions in profile {k}.")
            if t.name not in p.shapes:
                continue
            lo, opt, hi = p.shapes[t.name]
            if len(lo) != len(t.shape):
                out.append(f"{t.name}: number of dimensions is {len(t.shape)} but profile {k} has {len(lo)}.")
                continue
            for i, d in enumerate(t.shape):
                if d != -1 and not lo[i] == opt[i] == hi[i] == d:
                    out.append(f"{t.name}: for dimension number {i} in profile {k} does not match network definition "
                               f"(got min={lo[i]}, opt={opt[i]}, max={hi[i]}), expected min=opt=max={d}).")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Runtime side: engine, execution context (ONNX Runtime underneath)
# ---------------------------------------------------------------------------------------------------------------

def _read(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A copy of the array at address `ptr` (host memory standing in for device memory)."""
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0:
        return np.empty(shape, dtype)
    raw = (ctypes.c_char * (n * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


class Engine:
    """ICudaEngine of a stand-in build: IO from the network, profiles from the config."""

    def __init__(self, fake: "StandInTrt", meta: dict[str, Any], logger: ILogger) -> None:
        self.fake, self.meta, self.logger = fake, meta, logger
        self.io = {t["name"]: t for t in meta["inputs"] + meta["outputs"]}
        self.names = [t["name"] for t in meta["inputs"]] + [t["name"] for t in meta["outputs"]]
        self.n_in = len(meta["inputs"])
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(meta["profiles"])
        self._session: Any = None

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> _Enum:
        return self.fake.TensorIOMode.INPUT if self.names.index(name) < self.n_in else self.fake.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> _Enum:
        return _DT[self.io[name]["dtype"]]

    def get_tensor_location(self, name: str) -> _Enum:
        host = self.io[name].get("shape_tensor", False)
        return self.fake.TensorLocation.HOST if host else self.fake.TensorLocation.DEVICE

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.io[name]["shape"])

    def is_shape_inference_io(self, name: str) -> bool:
        return bool(self.io[name].get("shape_tensor", False))

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        shapes = self.meta["profiles"][profile_index]["shapes"]
        if name in shapes:
            return [tuple(s) for s in shapes[name]]
        return [self.get_tensor_shape(name)] * 3  # a fixed input: its own shape three times

    def get_tensor_profile_values(self, profile_index: int, name: str) -> list[tuple[int, ...]]:
        """The binding's lambda takes (profileIndex, tensorName) although it declares (name, profile_index)."""
        if not isinstance(profile_index, int) or not isinstance(name, str):
            raise TypeError("get_tensor_profile_values(): incompatible function arguments")
        return [tuple(v) for v in self.meta["profiles"][profile_index]["values"][name]]

    def create_execution_context(self) -> "ExecutionContext":
        return ExecutionContext(self)

    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            if not self.meta.get("onnx"):
                raise RuntimeError("this stand-in engine was built from a hand-made network: it cannot execute")
            self._session = ort.InferenceSession(self.meta["onnx"], providers=["CPUExecutionProvider"])
        return self._session


class ExecutionContext:
    """IExecutionContext (enqueueV3 API). A new context starts on profile 0 (NvInferRuntime.h)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.fake = engine, engine.fake
        self.log = lambda severity, msg: self.fake.log(engine.logger, severity, msg)
        self.profile, self.shapes, self.addresses = 0, {}, {}
        self.results: dict[str, np.ndarray] | None = None
        self.streams: list[int] = []

    def _ranges(self, name: str) -> list[tuple[int, ...]]:
        return self.engine.get_tensor_profile_shape(name, self.profile)

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        """True, or False for an index the engine lacks. Assumed: the input shapes must be set again after."""
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            return False
        self.profile, self.shapes, self.results = profile_index, {}, None
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        shape = tuple(int(s) for s in shape)
        io = self.engine.io.get(name)
        if io is None or self.engine.get_tensor_mode(name) != self.fake.TensorIOMode.INPUT:
            return False
        lo, _, hi = self._ranges(name)
        net = tuple(io["shape"])
        if len(shape) != len(net) or any(d != -1 and s != d for s, d in zip(shape, net)) or \
                not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            self.log(ILogger.ERROR, "3: [executionContext.cpp::setInputShape] Error Code 3: API Usage Error "
                                    "(Parameter check failed, condition: satisfyProfile Runtime dimension does "
                                    "not satisfy any optimization profile.)")
            return False
        self.shapes[name], self.results = shape, None
        return True

    def _named_dims_problem(self) -> str:
        """Dims with one name that differ between inputs (NvInfer.h: "must be equal at runtime"). Assumed: checked
        when the engine is enqueued (inputs are set one at a time, so earlier they may still hold the last call's)."""
        seen: dict[str, tuple[str, int]] = {}
        for name, shape in self.shapes.items():
            for dn, v in zip(self.engine.io[name]["dim_names"], shape):
                if dn and seen.setdefault(dn, (name, v))[1] != v:
                    return (f"{dn}: input dimensions with this name are inconsistent: {seen[dn][0]} has "
                            f"{seen[dn][1]}, {name} has {v}")
        return ""

    def _inputs_bound(self) -> bool:
        ins = self.engine.meta["inputs"]
        return all((t["name"] in self.shapes or -1 not in t["shape"]) and t["name"] in self.addresses for t in ins)

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        """NvInferRuntime.h: -1 for a runtime dim of an input whose shape is not set, and for an output's runtime
        dims until every input shape (and shape-tensor address) is bound. Then read from running the graph."""
        io = self.engine.io[name]
        if self.engine.get_tensor_mode(name) == self.fake.TensorIOMode.INPUT:
            return self.shapes.get(name, tuple(io["shape"]))
        if -1 not in io["shape"]:
            return tuple(io["shape"])
        if not self._inputs_bound():
            return tuple(io["shape"])
        return tuple(self._run()[name].shape)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine.io:
            return False
        if memory and not self.engine.is_shape_inference_io(name) and memory % _ALIGN:
            self.log(ILogger.ERROR, f"3: [stand-in] Error Code 3: API Usage Error (tensor {name}: the address "
                                         f"{memory:#x} is not {_ALIGN}-byte aligned)")
            return False
        if memory:
            self.addresses[name] = int(memory)
        else:
            self.addresses.pop(name, None)
        if self.engine.get_tensor_mode(name) == self.fake.TensorIOMode.INPUT:
            self.results = None
        return True

    def _feeds(self) -> dict[str, np.ndarray]:
        feeds = {}
        for t in self.engine.meta["inputs"]:
            shape = self.shapes.get(t["name"], tuple(t["shape"]))
            feeds[t["name"]] = _read(self.addresses[t["name"]], shape, _NP[t["dtype"]])
        return feeds

    def _run(self) -> dict[str, np.ndarray]:
        if self.results is None:
            sess = self.engine.session()
            outs = [t["name"] for t in self.engine.meta["outputs"]]
            got = sess.run(outs, self._feeds())
            self.results = {n: np.ascontiguousarray(np.asarray(v).astype(_NP[self.engine.io[n]["dtype"]], copy=False))
                            for n, v in zip(outs, got)}
        return self.results

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.fake.calls.append(f"context.execute_async_v3({stream_handle:#x})")
        self.streams.append(int(stream_handle))
        if int(stream_handle) == 0:
            self.log(ILogger.WARNING, DEFAULT_STREAM_WARNING)
        missing = [t["name"] for t in self.engine.meta["inputs"] + self.engine.meta["outputs"]
                   if t["name"] not in self.addresses]
        unset = [t["name"] for t in self.engine.meta["inputs"] if -1 in t["shape"] and t["name"] not in self.shapes]
        if missing or unset:
            self.log(ILogger.ERROR, f"3: [stand-in] Error Code 3: API Usage Error (no address for "
                                    f"{missing} / no shape for {unset})")
            return False
        named = self._named_dims_problem()
        if named:
            self.log(ILogger.ERROR, f"3: [stand-in] Error Code 3: API Usage Error ({named})")
            return False
        for name, vals in self.engine.meta["profiles"][self.profile]["values"].items():
            got = _read(self.addresses[name], tuple(self.engine.io[name]["shape"]), _NP[self.engine.io[name]["dtype"]])
            lo, _, hi = vals
            if not all(a <= int(v) <= b for a, v, b in zip(lo, got.reshape(-1), hi)):
                self.log(ILogger.ERROR, f"3: [stand-in] Error Code 3: API Usage Error (shape tensor {name} value "
                                             f"{got.reshape(-1).tolist()} is outside the profile's {lo}..{hi})")
                return False
        for name, arr in self._run().items():
            if name in self.fake.perturb:  # a test's injected difference (the self-test must see it)
                arr = (arr + np.asarray(self.fake.perturb[name], arr.dtype)).astype(arr.dtype)
            ctypes.memmove(self.addresses[name], arr.ctypes.data, arr.nbytes)
        self.results = None  # the next call reads its inputs again
        return True


# ---------------------------------------------------------------------------------------------------------------
# The module stand-ins
# ---------------------------------------------------------------------------------------------------------------

class StandInTrt:
    """A stand-in `tensorrt` module with the TensorRT 10.3 Python API: the weakly typed builder flags and layer
    precision setters still exist, next to strong typing. One instance per test: it records the calls made
    (`calls`), every message logged to any logger handed to it (`logs`: (severity name, message)), the network
    creation flags by name (`network_flags`)."""

    api = "10.3"
    __version__ = "10.3.0.30"
    __stand_in__ = STAND_IN
    float32, float16, bfloat16, int64 = _DT["FLOAT"], _DT["HALF"], _DT["BF16"], _DT["INT64"]
    BuilderFlag = _Flags("BuilderFlag", ("FP16", "BF16", "INT8", "FP8", "TF32", "OBEY_PRECISION_CONSTRAINTS",
                                         "PREFER_PRECISION_CONSTRAINTS", "VERSION_COMPATIBLE"))
    NetworkDefinitionCreationFlag = _Flags("NetworkDefinitionCreationFlag", NETWORK_FLAGS["10.3"])
    MemoryPoolType = _Flags("MemoryPoolType", ("WORKSPACE",))
    TensorIOMode = _Flags("TensorIOMode", ("NONE", "INPUT", "OUTPUT"))
    TensorLocation = _Flags("TensorLocation", ("DEVICE", "HOST"))
    ILogger, Logger, Weights, IOptimizationProfile = ILogger, Logger, Weights, IOptimizationProfile
    _layers = _LAYERS_10

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    def __init__(self, network: Network | None = None, parse_ok: bool = True) -> None:
        self.network, self.parse_ok, self.configs, self.calls = network, parse_ok, [], []
        self.logs: list[tuple[str, str]] = []
        self.network_flags: set[str] | None = None
        self.fail_build: str | None = None  # an error the next builds log before returning None
        self.perturb: dict[str, float] = {}  # output name -> a constant the execution adds to it
        self.device = "stand-in GPU"
        self.device_memory = 16 * 1024**3
        for cls_name, cls in self._layers.items():
            setattr(self, cls_name, cls)
        fake = self

        class Builder:
            def __init__(self, logger: ILogger) -> None:
                fake.calls.append("Builder")
                self.logger = logger

            def create_network(self, flags: int = 0) -> Network:
                fake.calls.append(f"builder.create_network({flags})")
                fake.flags = flags
                fake.network_flags = fake.NetworkDefinitionCreationFlag.names_of_bits(flags)
                return fake.network if fake.network is not None else Network([], [])

            def create_builder_config(self) -> BuilderConfig:
                fake.calls.append("builder.create_builder_config")
                fake.configs.append(BuilderConfig(fake, self.logger))
                return fake.configs[-1]

            def create_optimization_profile(self) -> IOptimizationProfile:
                fake.calls.append("builder.create_optimization_profile")
                return IOptimizationProfile(fake.calls)

            def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
                fake.calls.append("builder.build_serialized_network")
                problems = _build_problems(network, config.profiles) + ([fake.fail_build] if fake.fail_build else [])
                if problems:  # NvInfer.h: the IHostMemory, or nullptr; the reasons go to the logger
                    for msg in problems:
                        fake.log(self.logger, ILogger.ERROR, f"4: [stand-in] Error Code 4: API Usage Error ({msg})")
                    fake.log(self.logger, ILogger.ERROR, "2: [stand-in] Error Code 2: Internal Error (Assertion engine != nullptr "
                                            "failed.)")
                    return None
                mon = config.progress_monitor
                if mon is not None:
                    mon.phase_start("Building engine", None, 10)
                    for i in range(10):
                        if not mon.step_complete("Building engine", i):
                            return None
                    mon.phase_finish("Building engine")
                if config.cache is not None:
                    config.cache.entries += 1
                return fake.serialize_engine(network, config)

        class OnnxParser:
            def __init__(self, network: Network, logger: ILogger) -> None:
                fake.calls.append("OnnxParser")
                self.network = network
                self.num_errors = 0 if fake.parse_ok else 1

            def parse_from_file(self, path: str) -> bool:
                fake.calls.append("parser.parse_from_file")
                if fake.parse_ok and fake.network is None:  # parse the real file: weights, IO, MatMuls
                    parsed = network_from_onnx(path, fake._layers)
                    self.network.layers, self.network.inputs = parsed.layers, parsed.inputs
                    self.network.outputs, self.network.onnx_path = parsed.outputs, parsed.onnx_path
                return fake.parse_ok

            def get_error(self, i: int) -> object:
                return types.SimpleNamespace(node_name=lambda: "n7", node=lambda: 7, node_operator=lambda: "Unique",
                                             desc=lambda: "No importer registered for op: Unique")

        class Runtime:
            def __init__(self, logger: ILogger) -> None:
                fake.calls.append("Runtime")
                self.logger = logger

            def deserialize_cuda_engine(self, serialized_engine: bytes) -> Engine | None:
                fake.calls.append("runtime.deserialize_cuda_engine")
                blob = bytes(serialized_engine)
                if not blob.startswith(ENGINE_MAGIC):
                    fake.log(self.logger, ILogger.ERROR, "1: [stand-in] Error Code 1: Serialization (Serialization assertion "
                                            "magicTagRead == kMAGIC_TAG failed.Magic tag does not match)")
                    return None
                meta = json.loads(blob[len(ENGINE_MAGIC):])
                if meta["version"] != fake.__version__:
                    fake.log(self.logger, ILogger.ERROR, f"1: [stand-in] Error Code 1: Serialization (Serialization assertion "
                                            f"stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not "
                                            f"match: the engine is TensorRT {meta['version']}'s, this is "
                                            f"{fake.__version__})")
                    return None
                return Engine(fake, meta, self.logger)

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime

    def log(self, logger: ILogger, severity: _Enum, msg: str) -> None:
        """Log through the logger of the Builder/Runtime involved (as TensorRT does) and record it."""
        self.logs.append((severity.name, msg))
        logger.log(severity, msg)

    def errors(self) -> list[str]:
        return [m for s, m in self.logs if s in ("ERROR", "INTERNAL_ERROR")]

    def serialize_engine(self, network: Network, config: BuilderConfig) -> bytes:
        """The stand-in's plan file: what the runtime stand-in needs to describe and execute the engine."""
        def io(t: Tensor) -> dict[str, Any]:
            return {"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape), "shape_tensor": t.is_shape_tensor,
                    "dim_names": list(t.dim_names)}

        meta = {"version": self.__version__, "device": self.device, "onnx": network.onnx_path,
                "inputs": [io(t) for t in network.inputs], "outputs": [io(t) for t in network.outputs],
                "profiles": [{"shapes": {k: [list(s) for s in v] for k, v in p.shapes.items()},
                              "values": {k: [list(s) for s in v] for k, v in p.values.items()}}
                             for p in config.profiles]}
        return ENGINE_MAGIC + json.dumps(meta).encode()


class StandInTrt1016(StandInTrt):
    """TensorRT 10.16 (JetPack 7.2): the 10.3 API plus the Python-plugin network flags (NvInfer.h v10.16)."""

    api = "10.16"
    __version__ = "10.16.0"
    NetworkDefinitionCreationFlag = _Flags("NetworkDefinitionCreationFlag", NETWORK_FLAGS["10.16"])


class StandInTrt11(StandInTrt):
    """TensorRT 11 (headers of 11.0 and 11.1): weak typing removed (no BuilderFlag.FP16/BF16/INT8/FP8,
    OBEY/PREFER_PRECISION_CONSTRAINTS; no ILayer.precision / set_output_type: NVIDIA's "TensorRT 10.x to 11.x Python
    API" migration guide, "Removed Python APIs and Replacements"); NetworkDefinitionCreationFlag without
    EXPLICIT_BATCH and renumbered, STRONGLY_TYPED = 0 "retained for API compatibility but is ignored"."""

    api = "11"
    __version__ = "11.1.0"
    BuilderFlag = _Flags("BuilderFlag", ("TF32", "VERSION_COMPATIBLE"))
    NetworkDefinitionCreationFlag = _Flags("NetworkDefinitionCreationFlag", NETWORK_FLAGS["11"])
    _layers = _LAYERS_11


APIS = {"10.3": StandInTrt, "10.16": StandInTrt1016, "11": StandInTrt11}


# ---------------------------------------------------------------------------------------------------------------
# torch with the CPU standing in for the CUDA device (for runtime._TorchMemory)
# ---------------------------------------------------------------------------------------------------------------

class _Stream:
    def __init__(self, cuda: "CpuCuda", handle: int) -> None:
        self.cuda, self.cuda_stream = cuda, handle

    def wait_stream(self, other: "_Stream") -> None:
        self.cuda.waits.append((self.cuda_stream, other.cuda_stream))


class CpuCuda:
    """`torch.cuda` for the CPU: streams are handles (0 is the legacy default stream, as in CUDA) whose waits are
    recorded in `waits` as (waiting stream, awaited stream); synchronize does nothing (CPU work is synchronous)."""

    def __init__(self) -> None:
        self.waits: list[tuple[int, int]] = []
        self.default = _Stream(self, 0)
        self._next = 0x5000

    def is_available(self) -> bool:
        return True

    def Stream(self, device: Any = None) -> _Stream:  # noqa: N802 - torch's name
        self._next += 0x100
        return _Stream(self, self._next)

    def current_stream(self, device: Any = None) -> _Stream:
        return self.default

    def synchronize(self, device: Any = None) -> None:
        pass

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return (8, 7)

    def get_device_name(self, device: int = 0) -> str:
        return "stand-in GPU (the CPU)"


class CpuCudaTorch:
    """The `torch` module as runtime._TorchMemory uses it, with the CPU standing in for the CUDA device:
    `device("cuda", i)` is the CPU and `cuda` is a `CpuCuda`; everything else is torch. Plumbing only."""

    def __init__(self) -> None:
        import torch

        self._torch, self.cuda = torch, CpuCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def device(self, *args: Any, **kw: Any) -> Any:
        return self._torch.device("cpu")


def install(monkeypatch: Any, api: str = "11", device_info: bool = True) -> StandInTrt:
    """Make the build and runtime modules use a new stand-in of `api` (and torch on the CPU as their CUDA)."""
    from sts_export.backends.tensorrt import discovery as trt_discovery
    from sts_export.backends.tensorrt import runtime as trt_runtime

    fake = APIS[api]()
    torch_cpu = CpuCudaTorch()
    fake.torch = torch_cpu
    monkeypatch.setitem(trt_discovery._TRT_CACHE, "mod", fake)
    monkeypatch.setattr(trt_runtime, "_torch_cuda", lambda: torch_cpu)
    if device_info:
        monkeypatch.setattr(trt_discovery, "device_info", lambda *a, **k: {
            "trt_version": fake.__version__, "gpu": fake.device, "compute_capability": "8.7"})
    return fake


def engine_meta(path: str | Path) -> dict[str, Any]:
    """What a stand-in engine file holds."""
    blob = Path(path).read_bytes()
    assert blob.startswith(ENGINE_MAGIC), f"{path} is not a stand-in engine"
    return json.loads(blob[len(ENGINE_MAGIC):])
