"""TensorRT backend: runs the exported engines by graph name (TensorRT 10 `execute_async_v3`).

Device memory comes from torch (CUDA tensors, so runs compose with the torch pipeline and KV caches stay on the
GPU between calls) or, without torch, from cuda-python's `cudart` (`DeviceArray`). Either way `run()` returns
device buffers: feed them straight back (past_* <- present_*) and call `to_numpy` only on what the host needs.

Per call: the optimisation profile is chosen from the input shapes (prefill vs decode, see
`trt_build.profiles_for_graph`), `set_input_shape` fixes the dynamic dims, output shapes are read back with
`get_tensor_shape`, output buffers are allocated (256-byte aligned, as `setTensorAddress` requires), and the engine
is enqueued on a CUDA stream of its own: NvInferRuntime.h's enqueueV3 warns that the default stream "may lead to
performance issues due to additional cudaDeviceSynchronize() calls by TensorRT", so with torch the stream waits for
torch's current stream before the engine runs and torch's stream waits for it after (events, no host sync).
A refusal by TensorRT (`set_input_shape`, `set_tensor_address`, `execute_async_v3` returning False) is one StsError
line naming the graph, the tensor and what TensorRT logged.
Importable without TensorRT; `TrtBackend(...)` raises StsError with install instructions when it is missing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from sts_export.errors import StsError
from sts_export.backends.tensorrt.discovery import (_cudart, _enum_name, _torch_cuda, check_engine_compatible,
                                                    require_tensorrt, trt_logger)

Ranges = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

# TensorRT DataType name -> (numpy dtype name or None, torch dtype name)
_DTYPES = {"FLOAT": ("float32", "float32"), "HALF": ("float16", "float16"), "BF16": (None, "bfloat16"),
           "INT32": ("int32", "int32"), "INT64": ("int64", "int64"), "BOOL": ("bool", "bool"),
           "UINT8": ("uint8", "uint8"), "INT8": ("int8", "int8")}
_ALIGN = 256  # TensorRT: "The pointer must have at least 256-byte alignment"


def _contig(x: Any) -> np.ndarray:
    """C-contiguous numpy view/copy that keeps rank 0 (np.ascontiguousarray would make it rank 1)."""
    return np.require(np.asarray(x), requirements="C")


def select_profile(ranges: list[Ranges], shapes: dict[str, tuple[int, ...]],
                   values: list[Ranges] | None = None, feed_values: dict[str, np.ndarray] | None = None) -> int | None:
    """Index of the profile whose [min, max] contains every input shape (and shape-tensor value), closest to its
    opt shapes (ties: lowest index); None when no profile fits."""
    best, best_score = None, None
    for idx, prof in enumerate(ranges):
        score, fits = 0, True
        for name, shape in shapes.items():
            if name not in prof:
                continue
            lo, opt, hi = prof[name]
            if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                fits = False
                break
            score += sum(abs(s - o) for s, o in zip(shape, opt))
        if fits and values and feed_values:
            for name, v in feed_values.items():
                if name in values[idx]:
                    lo, _, hi = values[idx][name]
                    flat = np.asarray(v).reshape(-1)
                    if len(flat) != len(lo) or any(not a <= int(x) <= b for a, x, b in zip(lo, flat, hi)):
                        fits = False
        if fits and (best_score is None or score < best_score):
            best, best_score = idx, score
    return best


# ---------------------------------------------------------------------------------------------------------------
# Buffer allocators: torch (preferred) and cuda-python
# ---------------------------------------------------------------------------------------------------------------

class _TorchMemory:
    """Device buffers as torch CUDA tensors; the engine runs on a stream of its own (`exec_stream`), ordered after
    torch's current stream (`begin`) and before it (`end`), so torch's reads and writes need no host sync."""

    def __init__(self, torch: Any, device: int) -> None:
        self.torch, self.device = torch, torch.device("cuda", device)
        self.dummy = self._aligned_empty((_ALIGN,), torch.uint8)  # address for empty tensors
        self.exec_stream = torch.cuda.Stream(device=self.device)

    def dtype(self, trt_name: str) -> Any:
        return getattr(self.torch, _DTYPES[trt_name][1])

    def stream(self) -> int:
        return int(self.exec_stream.cuda_stream)

    def begin(self) -> None:
        """Before enqueueing: the engine's stream waits for what torch's stream queued (inputs being written)."""
        self.exec_stream.wait_stream(self.torch.cuda.current_stream(self.device))

    def end(self) -> None:
        """After enqueueing: torch's stream waits for the engine (its outputs), and so does any reuse of the input
        blocks torch's caching allocator frees on that stream."""
        self.torch.cuda.current_stream(self.device).wait_stream(self.exec_stream)

    def _aligned_empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """An uninitialised tensor whose address is a multiple of 256 bytes (the CUDA caching allocator's blocks
        already are; other allocators get an offset view into a slightly larger buffer)."""
        t = self.torch.empty(shape, dtype=dtype, device=self.device)
        if t.numel() == 0 or t.data_ptr() % _ALIGN == 0:
            return t
        nbytes = t.numel() * t.element_size()
        buf = self.torch.empty(nbytes + _ALIGN, dtype=self.torch.uint8, device=self.device)
        off = -buf.data_ptr() % _ALIGN
        return buf[off:off + nbytes].view(dtype).view(shape)

    def from_numpy(self, x: np.ndarray) -> Any:
        return self.torch.from_numpy(_contig(x)).to(self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        if not isinstance(x, self.torch.Tensor):
            return np.asarray(x)
        if x.dtype == self.torch.bfloat16:
            x = x.float()
        return x.detach().cpu().numpy()

    def concat(self, xs: list[Any], axis: int) -> Any:
        return self.torch.cat([x if isinstance(x, self.torch.Tensor) else self.from_numpy(x) for x in xs], dim=axis)

    def device_input(self, x: Any, trt_name: str) -> tuple[Any, int]:
        t = x if isinstance(x, self.torch.Tensor) else self.torch.from_numpy(_contig(x))
        t = t.to(device=self.device, dtype=self.dtype(trt_name)).contiguous()
        if t.numel() == 0:
            return t, self.dummy.data_ptr()
        if t.data_ptr() % _ALIGN:
            t = self._aligned_empty(tuple(t.shape), t.dtype).copy_(t)
        return t, t.data_ptr()

    def empty(self, shape: tuple[int, ...], trt_name: str) -> tuple[Any, int]:
        t = self._aligned_empty(shape, self.dtype(trt_name))
        return t, (t.data_ptr() if t.numel() else self.dummy.data_ptr())

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)


def _ck(res: Any) -> Any:
    """Unpack a cuda-python result tuple, raising on a CUDA error."""
    res = res if isinstance(res, tuple) else (res,)
    err = res[0]
    if int(getattr(err, "value", err)) != 0:
        raise StsError(f"CUDA error: {err}")
    return res[1] if len(res) == 2 else res[1:]


class DeviceArray:
    """A contiguous device buffer from cudart (used when torch is not available)."""

    def __init__(self, cudart: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.cudart, self.shape, self.dtype = cudart, tuple(int(s) for s in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = int(_ck(cudart.cudaMalloc(max(self.nbytes, _ALIGN))))

    def __del__(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if ptr:
            try:
                self.cudart.cudaFree(ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"


class _CudartMemory:
    def __init__(self, cudart: Any, device: int) -> None:
        self.cudart = cudart
        _ck(cudart.cudaSetDevice(device))
        self._stream = _ck(cudart.cudaStreamCreate())

    def dtype(self, trt_name: str) -> np.dtype:
        np_name = _DTYPES[trt_name][0]
        if np_name is None:
            raise StsError(f"engine IO of type {trt_name} needs torch (numpy has no such type); pip install torch")
        return np.dtype(np_name)

    def stream(self) -> int:
        return int(self._stream)

    def begin(self) -> None:
        """Nothing to order: every copy here is synchronous or on this same stream."""

    def end(self) -> None:
        """`to_numpy` synchronizes this stream before reading."""

    def from_numpy(self, x: np.ndarray) -> DeviceArray:
        x = _contig(x)
        d = DeviceArray(self.cudart, x.shape, x.dtype)
        if d.nbytes:
            _ck(self.cudart.cudaMemcpy(d.ptr, x.ctypes.data, d.nbytes,
                                       self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return d

    def to_numpy(self, x: Any) -> np.ndarray:
        if not isinstance(x, DeviceArray):
            return np.asarray(x)
        self.synchronize()
        out = np.empty(x.shape, x.dtype)
        if x.nbytes:
            _ck(self.cudart.cudaMemcpy(out.ctypes.data, x.ptr, x.nbytes,
                                       self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return out

    def concat(self, xs: list[Any], axis: int) -> DeviceArray:
        """Device-side concatenation: one strided 2D copy per part."""
        xs = [x if isinstance(x, DeviceArray) else self.from_numpy(x) for x in xs]
        ref = xs[0]
        axis = axis % len(ref.shape)
        shape = list(ref.shape)
        shape[axis] = sum(x.shape[axis] for x in xs)
        out = DeviceArray(self.cudart, tuple(shape), ref.dtype)
        outer = int(np.prod(ref.shape[:axis], dtype=np.int64))
        inner = int(np.prod(ref.shape[axis + 1:], dtype=np.int64)) * ref.dtype.itemsize
        dpitch, offset = shape[axis] * inner, 0
        for x in xs:
            if x.dtype != ref.dtype or x.shape[:axis] != ref.shape[:axis] or x.shape[axis + 1:] != ref.shape[axis + 1:]:
                raise StsError(f"concat: incompatible parts {ref} and {x} along axis {axis}")
            width = x.shape[axis] * inner
            if width and outer:
                _ck(self.cudart.cudaMemcpy2DAsync(out.ptr + offset, dpitch, x.ptr, width, width, outer,
                                                  self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream))
            offset += width
        return out

    def device_input(self, x: Any, trt_name: str) -> tuple[Any, int]:
        want = self.dtype(trt_name)
        if isinstance(x, DeviceArray) and x.dtype == want:
            return x, x.ptr
        host = self.to_numpy(x) if isinstance(x, DeviceArray) else np.asarray(x)
        d = self.from_numpy(host.astype(want, copy=False))
        return d, d.ptr

    def empty(self, shape: tuple[int, ...], trt_name: str) -> tuple[Any, int]:
        d = DeviceArray(self.cudart, shape, self.dtype(trt_name))
        return d, d.ptr

    def synchronize(self) -> None:
        _ck(self.cudart.cudaStreamSynchronize(self._stream))


# ---------------------------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------------------------

class _Engine:
    """One deserialized engine, its execution context and IO description."""

    def __init__(self, trt: Any, engine: Any, name: str) -> None:
        self.name, self.engine = name, engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise StsError(f"TensorRT could not create an execution context for '{name}' (out of GPU memory?)")
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.dtype: dict[str, str] = {}
        self.host: dict[str, bool] = {}
        for i in range(engine.num_io_tensors):
            t = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(t)
            self.dtype[t] = _enum_name(engine.get_tensor_dtype(t))
            self.host[t] = engine.get_tensor_location(t) == trt.TensorLocation.HOST
            if self.dtype[t] not in _DTYPES:
                raise StsError(f"engine '{name}': tensor '{t}' has type {self.dtype[t]}, which sts-export cannot feed")
        self.ranges: list[Ranges] = []
        self.values: list[Ranges] = []
        for p in range(engine.num_optimization_profiles):
            r: Ranges = {}
            v: Ranges = {}
            for t in self.inputs:
                lo, opt, hi = engine.get_tensor_profile_shape(t, p)
                r[t] = (tuple(lo), tuple(opt), tuple(hi))
                if engine.is_shape_inference_io(t):
                    v[t] = _profile_values(engine, t, p)
            self.ranges.append(r)
            self.values.append(v)
        self.active = 0  # a new context starts on profile 0
        self.keep: list[Any] = []  # host/device buffers that must live until the enqueued work has run


def _profile_values(engine: Any, name: str, profile: int) -> tuple[tuple[int, ...], ...]:
    # The binding declares (name, profile_index) but its C++ lambda takes (profile_index, name): try both orders.
    try:
        vals = engine.get_tensor_profile_values(profile, name)
    except TypeError:
        vals = engine.get_tensor_profile_values(name, profile)
    return tuple(tuple(int(x) for x in v) for v in vals)


class TrtBackend:
    """Runs `<graph>.engine` files of an export directory by graph name (DESIGN.md's IO names)."""

    name = "tensorrt"

    def __init__(self, export_dir: str | os.PathLike, *, graphs: list[str] | None = None, device: int = 0,
                 check_manifest: bool = True, verbose: bool = False) -> None:
        trt = require_tensorrt()
        self.trt, self.export_dir = trt, Path(export_dir)
        torch = _torch_cuda()
        if torch is not None:
            self.mem: Any = _TorchMemory(torch, device)
        else:
            cudart = _cudart()
            if cudart is None:
                raise StsError("the TensorRT backend needs a CUDA GPU visible to torch, or cuda-python "
                               "(`pip install cuda-python`) for device buffers")
            self.mem = _CudartMemory(cudart, device)
        if check_manifest:
            self._check_manifest()
        self.logger = trt_logger(trt, verbose)
        self.runtime = trt.Runtime(self.logger)
        paths = sorted(self.export_dir.glob("*.engine"))
        if graphs is not None:
            paths = [p for p in paths if p.stem in graphs]
            missing = sorted(set(graphs) - {p.stem for p in paths})
            if missing:
                raise StsError(f"no engine for graph(s) {', '.join(missing)} in {self.export_dir}")
        if not paths:
            raise StsError(f"no *.engine files in {self.export_dir}: export with --target trt first")
        self.engines: dict[str, _Engine] = {}
        for p in paths:
            since = len(self.logger.errors)
            engine = self.runtime.deserialize_cuda_engine(p.read_bytes())
            if engine is None:  # NvInferRuntime.h: "nullptr if it could not be deserialized"
                why = self.logger.why(since) or "built by another TensorRT version or for another GPU?"
                raise StsError(f"TensorRT could not load {p}: {why}; rebuild the engines on this machine "
                               f"(--target trt)")
            self.engines[p.stem] = _Engine(trt, engine, p.stem)

    def _check_manifest(self) -> None:
        path = self.export_dir / "manifest.json"
        if not path.exists():
            return
        manifest = json.loads(path.read_text())
        info = manifest.get("tensorrt") or manifest.get("trt")
        if isinstance(info, dict):
            check_engine_compatible(info)

    # -- the Backend interface ------------------------------------------------------------------------------
    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run engine `graph` on `feeds` (numpy arrays or device tensors); returns device outputs by name."""
        e = self.engines.get(graph)
        if e is None:
            raise StsError(f"no TensorRT engine '{graph}' (have: {', '.join(sorted(self.engines))})")
        missing = [n for n in e.inputs if n not in feeds]
        if missing:
            raise StsError(f"{graph}: missing input(s) {', '.join(missing)}")
        ctx, stream = e.context, self.mem.stream()
        bufs: dict[str, tuple[Any, int]] = {}
        host_vals: dict[str, np.ndarray] = {}
        for n in e.inputs:
            if e.host[n]:  # shape tensors live in host memory
                arr = _contig(self.to_numpy(feeds[n]).astype(_DTYPES[e.dtype[n]][0]))
                host_vals[n] = arr
                bufs[n] = (arr, arr.ctypes.data)
            else:
                bufs[n] = self.mem.device_input(feeds[n], e.dtype[n])
        shapes = {n: tuple(int(s) for s in _shape_of(bufs[n][0])) for n in e.inputs}
        prof = select_profile(e.ranges, shapes, e.values, host_vals)
        if prof is None:
            raise StsError(f"{graph}: input shapes {_fmt_shapes(shapes)} are outside every optimisation profile of "
                           f"the engine ({_fmt_ranges(e.ranges)}); rebuild with larger limits")
        self.mem.begin()  # the engine's stream waits for the inputs written above
        since = len(self.logger.errors)
        if prof != e.active:
            if not ctx.set_optimization_profile_async(prof, stream):
                raise StsError(f"{graph}: TensorRT refused to switch to optimisation profile {prof}{self._why(since)}")
            e.active = prof
        for n in e.inputs:
            if not ctx.set_input_shape(n, shapes[n]):
                lo, _, hi = e.ranges[prof][n]
                raise StsError(f"{graph}: TensorRT refused shape {list(shapes[n])} for input '{n}' (optimisation "
                               f"profile {prof} takes {list(lo)}..{list(hi)}){self._why(since)}")
        for n in e.inputs:
            self._bind(ctx, graph, n, bufs[n][1], since)
        outs: dict[str, Any] = {}
        for n in e.outputs:
            shape = tuple(int(s) for s in ctx.get_tensor_shape(n))
            if any(s < 0 for s in shape):
                raise StsError(f"{graph}: output '{n}' has a data-dependent shape {shape}, which the TensorRT "
                               f"backend does not support (STS graphs have fixed K/K')")
            if e.host[n]:
                arr = np.empty(shape, _DTYPES[e.dtype[n]][0])
                outs[n], ptr = arr, arr.ctypes.data
            else:
                outs[n], ptr = self.mem.empty(shape, e.dtype[n])
            self._bind(ctx, graph, n, ptr, since)
        if not ctx.execute_async_v3(stream):
            raise StsError(f"{graph}: TensorRT execution failed{self._why(since)}")
        self.mem.end()  # torch's stream (and anything reading the outputs) waits for the engine
        e.keep = [b[0] for b in bufs.values()]  # inputs converted here must outlive the enqueued work
        return outs

    def _why(self, since: int) -> str:
        why = self.logger.why(since)
        return f": {why}" if why else " (see the TensorRT log)"

    def _bind(self, ctx: Any, graph: str, name: str, ptr: int, since: int) -> None:
        """set_tensor_address, refusing in one line when TensorRT does (NvInferRuntime.h: false on error; "The
        pointer must have at least 256-byte alignment")."""
        if not ctx.set_tensor_address(name, ptr):
            raise StsError(f"{graph}: TensorRT refused address {ptr:#x} for tensor '{name}'{self._why(since)}")

    def from_numpy(self, x: np.ndarray) -> Any:
        """A device buffer holding `x`."""
        return self.mem.from_numpy(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        """Host copy (waits for the stream); bfloat16 becomes float32."""
        return self.mem.to_numpy(x)

    def concat(self, xs: list[Any], axis: int) -> Any:
        """Concatenate device buffers along `axis`, on the device."""
        return self.mem.concat(xs, axis)

    def synchronize(self) -> None:
        self.mem.synchronize()

    def io(self, graph: str) -> tuple[list[str], list[str]]:
        """(input names, output names) of an engine."""
        e = self.engines[graph]
        return list(e.inputs), list(e.outputs)


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def _fmt_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k}={list(v)}" for k, v in shapes.items())


def _fmt_ranges(ranges: list[Ranges]) -> str:
    parts = []
    for i, r in enumerate(ranges):
        dims = "; ".join(f"{k} {list(lo)}..{list(hi)}" for k, (lo, _, hi) in list(r.items())[:3])
        parts.append(f"profile {i}: {dims}{'; …' if len(r) > 3 else ''}")
    return " | ".join(parts)
