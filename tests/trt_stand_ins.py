"""Stand-ins of the TensorRT Python API (10.3 and 11) for tests: no TensorRT can be installed on this project's
machines, so the build and runtime code runs in CI against these (real TensorRT runs in test_trt_gpu.py)."""
from __future__ import annotations

import types

import onnx

from sts_export.backends.tensorrt import runtime as trt_runtime


class _Enum:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __int__(self) -> int:
        return {"STRONGLY_TYPED": 1}.get(self.name, 0)


# The float/int DataType members both APIs have (names as in the pybind bindings: trt.float32.name == "FLOAT").
_DT = {n: _Enum(n) for n in ("FLOAT", "HALF", "BF16", "INT32", "INT64", "BOOL", "INT8", "UINT8")}
_ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 3: "INT8", 2: "UINT8"}


class _Flags:
    """An enum namespace that has only the members it was made with: touching a removed one is AttributeError."""

    def __init__(self, *names: str) -> None:
        for n in names:
            setattr(self, n, _Enum(n))


class _FakeTensor:
    def __init__(self, name: str, dtype: _Enum, shape: tuple = (-1, 8), is_shape_tensor: bool = False) -> None:
        self.name, self.dtype, self.shape, self.is_shape_tensor = name, dtype, shape, is_shape_tensor


class _FakeLayer:
    """A TensorRT 10.3 ILayer: the weak-typing setters exist (and are recorded, so a test can prove none is used)."""

    def __init__(self, name: str, ins: list, outs: list, type_: str = "MATRIX_MULTIPLY", metadata: str = "") -> None:
        self.name, self.type, self.metadata, self.ins, self.outs = name, _Enum(type_), metadata, ins, outs
        self.num_inputs, self.num_outputs, self.precision, self.out_types = len(ins), len(outs), None, {}

    def get_input(self, i: int) -> _FakeTensor:
        return self.ins[i]

    def get_output(self, i: int) -> _FakeTensor:
        return self.outs[i]

    def set_output_type(self, i: int, dtype: _Enum) -> None:
        self.out_types[i] = dtype


class _FakeLayer11:
    """A TensorRT 11 ILayer: no `precision`, no `set_output_type` (removed with weak typing)."""

    __slots__ = ("name", "type", "metadata", "ins", "outs", "num_inputs", "num_outputs")

    def __init__(self, name: str, ins: list, outs: list, type_: str = "MATRIX_MULTIPLY", metadata: str = "") -> None:
        self.name, self.type, self.metadata, self.ins, self.outs = name, _Enum(type_), metadata, ins, outs
        self.num_inputs, self.num_outputs = len(ins), len(outs)

    def get_input(self, i: int) -> _FakeTensor:
        return self.ins[i]

    def get_output(self, i: int) -> _FakeTensor:
        return self.outs[i]


class _FakeNetwork:
    def __init__(self, layers: list, inputs: list, outputs: list = ()) -> None:
        self.layers, self.inputs, self.outputs = layers, inputs, list(outputs)

    num_layers = property(lambda self: len(self.layers))
    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_layer(self, i: int) -> _FakeLayer:
        return self.layers[i]

    def get_input(self, i: int) -> _FakeTensor:
        return self.inputs[i]

    def get_output(self, i: int) -> _FakeTensor:
        return self.outputs[i]


def network_from_onnx(path: str, api: str) -> _FakeNetwork:
    """What TensorRT's parser makes of an ONNX file, as far as build_engine reads it: one CONSTANT layer per float
    initializer (its dtype and shape), a MATRIX_MULTIPLY per MatMul, and the graph IO (dynamic dims are -1)."""
    m = onnx.load(path, load_external_data=False)
    layer = _FakeLayer if api == "10.3" else _FakeLayer11
    layers = [layer(f"const_{t.name}", [], [_FakeTensor(t.name, _DT[_ONNX_TO_TRT[t.data_type]], tuple(t.dims))],
                    "CONSTANT") for t in m.graph.initializer if t.data_type in _ONNX_TO_TRT]
    layers += [layer(n.name, [], [_FakeTensor(n.output[0], _DT["FLOAT"])]) for n in m.graph.node if n.op_type == "MatMul"]

    def io(v: onnx.ValueInfoProto) -> _FakeTensor:
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
        return _FakeTensor(v.name, _DT[_ONNX_TO_TRT[v.type.tensor_type.elem_type]], dims)

    return _FakeNetwork(layers, [io(v) for v in m.graph.input], [io(v) for v in m.graph.output])


class _FakeConfig:
    def __init__(self, calls: list, api: str) -> None:
        self.calls, self.api = calls, api
        self.flags, self.cleared, self.profiles, self.pools = set(), set(), [], {}
        self.builder_optimization_level, self.progress_monitor, self.cache = None, None, None

    def set_flag(self, f: _Enum) -> None:
        self.calls.append(f"config.set_flag({f})")
        self.flags.add(str(f))

    def clear_flag(self, f: _Enum) -> None:
        self.calls.append(f"config.clear_flag({f})")
        self.cleared.add(str(f))

    def set_memory_pool_limit(self, pool: object, size: int) -> None:
        self.calls.append(f"config.set_memory_pool_limit({pool})")
        self.pools[str(pool)] = size

    def add_optimization_profile(self, p: dict) -> int:
        self.calls.append("config.add_optimization_profile")
        self.profiles.append(p)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob: bytes) -> types.SimpleNamespace:
        self.calls.append("config.create_timing_cache")
        return types.SimpleNamespace(blob=blob, serialize=lambda: b"CACHE" + blob[-3:])

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        self.calls.append("config.set_timing_cache")
        self.cache = cache
        return True

    def get_timing_cache(self) -> object:
        self.calls.append("config.get_timing_cache")
        return self.cache


def _profile_recorder(calls: list) -> object:
    class P(dict):
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            calls.append("profile.set_shape")
            self[name] = (lo, opt, hi)

        def set_shape_input(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            calls.append("profile.set_shape_input")
            self["values:" + name] = (lo, opt, hi)

    return P()


class _FakeTrt:
    """A stand-in `tensorrt` module with the TensorRT 10.3 Python API (names as in its pybind bindings): the
    weakly typed builder flags and layer precision setters still exist, next to strong typing."""

    api = "10.3"
    __version__ = "10.3.0.30"
    float32, float16, bfloat16, int64 = _DT["FLOAT"], _DT["HALF"], _DT["BF16"], _DT["INT64"]
    BuilderFlag = _Flags("FP16", "BF16", "INT8", "FP8", "TF32", "OBEY_PRECISION_CONSTRAINTS",
                         "PREFER_PRECISION_CONSTRAINTS", "VERSION_COMPATIBLE")
    NetworkDefinitionCreationFlag = _Flags("STRONGLY_TYPED")
    MemoryPoolType = _Flags("WORKSPACE")

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level: int) -> None:
            self.level = level

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    def __init__(self, network: _FakeNetwork | None = None, parse_ok: bool = True) -> None:
        self.network, self.parse_ok, self.configs, self.calls = network, parse_ok, [], []
        fake = self

        class Builder:
            def __init__(self, logger: object) -> None:
                fake.calls.append("Builder")

            def create_network(self, flags: int) -> _FakeNetwork:
                fake.calls.append(f"builder.create_network({flags})")
                fake.flags = flags
                return fake.network if fake.network is not None else _FakeNetwork([], [])

            def create_builder_config(self) -> _FakeConfig:
                fake.calls.append("builder.create_builder_config")
                fake.configs.append(_FakeConfig(fake.calls, fake.api))
                return fake.configs[-1]

            def create_optimization_profile(self) -> dict:
                fake.calls.append("builder.create_optimization_profile")
                return _profile_recorder(fake.calls)

            def build_serialized_network(self, network: object, config: _FakeConfig) -> bytes:
                fake.calls.append("builder.build_serialized_network")
                mon = config.progress_monitor
                mon.phase_start("Building engine", None, 10)
                for i in range(10):
                    assert mon.step_complete("Building engine", i)
                mon.phase_finish("Building engine")
                return b"ENGINE-BYTES"

        class OnnxParser:
            def __init__(self, network: _FakeNetwork, logger: object) -> None:
                fake.calls.append("OnnxParser")
                self.network = network
                self.num_errors = 0 if fake.parse_ok else 1

            def parse_from_file(self, path: str) -> bool:
                fake.calls.append("parser.parse_from_file")
                if fake.parse_ok and fake.network is None:  # parse the real file: constants, IO, MatMuls
                    parsed = network_from_onnx(path, fake.api)
                    self.network.layers, self.network.inputs = parsed.layers, parsed.inputs
                    self.network.outputs = parsed.outputs
                return fake.parse_ok

            def get_error(self, i: int) -> object:
                return types.SimpleNamespace(node_name=lambda: "n7", node=lambda: 7, node_operator=lambda: "Unique",
                                             desc=lambda: "No importer registered for op: Unique")

        self.Builder, self.OnnxParser = Builder, OnnxParser


class _FakeTrt11(_FakeTrt):
    """The same stand-in with TensorRT 11's API: weak typing removed (no BuilderFlag.FP16/BF16/INT8/FP8,
    OBEY/PREFER_PRECISION_CONSTRAINTS; no ILayer.precision / set_output_type), STRONGLY_TYPED kept but ignored
    (NVIDIA's "TensorRT 10.x to 11.x Python API" migration guide, "Removed Python APIs and Replacements")."""

    api = "11"
    __version__ = "11.4.1.2"
    BuilderFlag = _Flags("TF32", "VERSION_COMPATIBLE")
    NetworkDefinitionCreationFlag = _Flags("STRONGLY_TYPED")


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
