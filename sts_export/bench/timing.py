"""Measuring: repeat timing, per-graph-call timing, statistics, peak memory, and the machine the numbers come from.

Per graph call, `TimedBackend` (a thin wrapper around a backend's `run`) adds fine-grained times: CUDA events for
torch/TensorRT on a GPU, otherwise `synchronize()` + perf_counter (`timed_call`, the one host-clock timer here;
`time_repeats` times a function `repeats` times after `warmup` untimed calls with it). `stats_ms` turns samples in
seconds into median / IQR / percentiles in milliseconds.

Memory: `PeakMemory` records peak host RSS (Linux VmHWM, reset before each timed run; a 5 ms sampling thread
elsewhere) and peak GPU memory (torch.cuda.max_memory_allocated) between start() and stop(); `current_memory` is
the memory in use now (the baseline of the *_delta_bytes fields), `free_memory` what is left, `release_memory`
hands cached memory back between configurations.

System: `system_info` (hardware, software versions, command line), `load_average`, `cpu_model`, `gpu_info` and
`detect_device_profile` (the devices.yaml profile of the GPU in use).

Nothing here knows about options, configurations or reports (sts_export.bench.runner / .report).
"""
from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from sts_export.artifact.protocol import Wrapped

if TYPE_CHECKING:
    from sts_export.bench.devices import Device

STAT_KEYS = ("median", "iqr", "p25", "p75", "min", "max")


# ----------------------------------------------------------------------------------------------- statistics
def stats_ms(samples_s: Sequence[float]) -> dict[str, float | None]:
    """median, IQR (p75 - p25), p25, p75, min and max in milliseconds."""
    if not samples_s:
        return dict.fromkeys(STAT_KEYS)
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    p25, p50, p75 = np.percentile(a, [25, 50, 75])
    return {"median": float(p50), "iqr": float(p75 - p25), "p25": float(p25), "p75": float(p75),
            "min": float(a.min()), "max": float(a.max())}


# ----------------------------------------------------------------------------------------------- timing
def timed_call(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> tuple[Any, float]:
    """(fn(), seconds from the call to its end), `sync()` (e.g. a device synchronize) included before the clock
    stops."""
    t0 = time.perf_counter()
    out = fn()
    if sync is not None:
        sync()
    return out, time.perf_counter() - t0


def time_repeats(fn: Callable[[], Any], warmup: int, repeats: int,
                 sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each of `repeats` timed calls of fn (with `sync`, see timed_call) after `warmup` untimed ones."""
    for _ in range(warmup):
        timed_call(fn, sync)
    return [timed_call(fn, sync)[1] for _ in range(repeats)]


class TimedBackend(Wrapped):
    """Wraps a backend: times every `run(graph, feeds)` (CUDA events or synchronize + perf_counter) and, with
    ignore_eos, masks the EOS logit so every run decodes exactly max_new_tokens tokens (fixed work per run).

    Everything else (from_numpy, to_numpy, concat, synchronize, attributes) goes to the wrapped backend, so
    `runtime.generate` drives it unchanged.
    """

    def __init__(self, inner: Any, eos_token_id: int | None, cuda_events: bool) -> None:
        self.inner, self.eos, self.cuda_events = inner, eos_token_id, cuda_events
        self.name = getattr(inner, "name", "backend")
        self._sync = getattr(inner, "synchronize", None)
        self.calls: list[tuple[str, Any]] = []  # (graph, seconds | (start_event, end_event))

    def __getattr__(self, item: str) -> Any:  # plan, graphs, providers, ...
        return getattr(self.inner, item)

    def synchronize(self) -> None:
        if self._sync is not None:
            self._sync()

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        if self.cuda_events:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.inner.run(graph, feeds)
            end.record()
            self.calls.append((graph, (start, end)))
        else:
            out, secs = timed_call(lambda: self.inner.run(graph, feeds), self.synchronize)
            self.calls.append((graph, secs))
        if self.eos is not None and graph == "segment2":
            logits = np.array(self.inner.to_numpy(out["logits"]), dtype=np.float32)  # a copy, on the host
            logits[:, self.eos] = -np.inf
            out = dict(out, logits=logits)
        return out

    def to_numpy(self, x: Any) -> np.ndarray:
        return x if isinstance(x, np.ndarray) else self.inner.to_numpy(x)

    def take_calls(self) -> list[tuple[str, float]]:
        """This run's graph calls as (label, seconds), labels `vision`, `embed_prefill`, `segment1_decode`, ..."""
        if self.cuda_events:
            import torch

            torch.cuda.synchronize()
        out: list[tuple[str, float]] = []
        phase, prefilled = "prefill", False
        for graph, t in self.calls:
            secs = t[0].elapsed_time(t[1]) / 1e3 if isinstance(t, tuple) else t
            if graph == "embed" and prefilled:  # the first decode step (a chunked prefill calls segment2 repeatedly)
                phase = "decode"
            label = graph if graph == "vision" else f"{graph}_{phase}"
            out.append((label, secs))
            prefilled |= graph == "segment2"
        self.calls = []
        return out


# ----------------------------------------------------------------------------------------------- memory
def _read_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Peak host RSS (Linux VmHWM reset through /proc/self/clear_refs, else a 5 ms sampling thread) and peak
    GPU memory (torch's allocator) between `start()` and `stop()`."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._peak = 0
        self._hwm = False

    def start(self) -> None:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self._hwm = _read_status_kb("VmHWM") is not None
        except OSError:
            self._hwm = False
        if not self._hwm:
            import psutil

            proc = psutil.Process()
            self._peak = proc.memory_info().rss
            self._stop.clear()

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def stop(self) -> tuple[int, int | None]:
        """(peak RSS bytes, peak GPU bytes or None)."""
        if self._hwm:
            rss = _read_status_kb("VmHWM") or 0
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            import psutil

            rss = max(self._peak, psutil.Process().memory_info().rss)
        gpu = None
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            gpu = int(torch.cuda.max_memory_allocated())
        return int(rss), gpu


def current_memory(cuda: bool) -> tuple[int, int | None]:
    """(host RSS bytes, GPU bytes allocated by torch or None) in use now."""
    import psutil

    rss = int(psutil.Process().memory_info().rss)
    if not cuda:
        return rss, None
    import torch

    torch.cuda.synchronize()
    return rss, int(torch.cuda.memory_allocated())


def release_memory(cuda: bool) -> None:
    """Collect garbage and, with cuda, hand torch's cached GPU blocks back."""
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def free_memory(cuda: bool) -> tuple[int, str]:
    """(bytes, what they are): free GPU memory with cuda, else available host memory."""
    import psutil

    if cuda:
        import torch

        return int(torch.cuda.mem_get_info()[0]), "free GPU memory"
    return int(psutil.virtual_memory().available), "available host memory"


# ----------------------------------------------------------------------------------------------- system info
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def gpu_info() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                    "memory_bytes": int(p.total_memory), "multiprocessors": p.multi_processor_count})
    return out


def system_info() -> dict[str, Any]:
    """Hardware and software the numbers were taken on."""
    import psutil
    import torch

    from sts_export import __version__

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": int(psutil.virtual_memory().total),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpu_info(),
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "versions": {
            "sts_export": __version__,
            "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
            "onnx": _version("onnx"),
            "numpy": np.__version__,
            "transformers": _version("transformers"),
            "tensorrt": _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt_cu12"),
            "matplotlib": _version("matplotlib"),
            "psutil": psutil.__version__,
        },
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    return info


def detect_device_profile() -> str | None:
    """The devices.yaml profile matching the GPU in use, if any (for measured/bound)."""
    gpus = gpu_info()
    if not gpus:
        return None
    name = gpus[0]["name"].lower()
    mem_gb = gpus[0]["memory_bytes"] / 1e9
    if "h100" in name and ("sxm" in name or "hbm3" in name):
        return "h100-sxm"
    if "a100" in name and "sxm" in name and mem_gb > 60:
        return "a100-sxm-80gb"
    if "4090" in name:
        return "rtx-4090"
    if "orin" in name:
        if mem_gb > 40:
            return "jetson-agx-orin-64gb"
        return None  # Orin Nano: the power mode (15 W vs MAXN SUPER) is not visible from here; pass --on-device
    return None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------- host profile
HOST_GEMV = (8192, 16384)  # [1, K] x [K, N] fp32: a 512 MiB weight, far above any CPU cache
HOST_GEMM = (512, 4096, 4096)  # [M, K] x [K, N] fp32


def measure_host(threads: int | None = None, repeats: int = 10) -> Device:
    """This machine as a roofline profile (`--roofline host`, devices.Device named "host"), measured now:

    bandwidth_gbs  the best of `repeats` runs of two readers that stream a 512 MiB fp32 weight once: ONNX
                   Runtime's CPU MatMul as a GEMV [1, 8192] x [8192, 16384] (the kernel a decode step runs) and
                   torch's sum over the same bytes; bytes / fastest run.
    fp32_tflops    the best of `repeats` fp32 GEMMs [512, 4096] x [4096, 4096] (ONNX Runtime and torch).
    fp16_tflops    the fp32 figure (CPU kernels run fp16 no faster than fp32 here).
    memory_gb      MemTotal.
    Both libraries run with `threads` intra-op threads (None: theirs). The best run is taken because the bound is
    a lower bound: a faster reader would only lower it."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from sts_export.bench.devices import HOST, Device  # noqa: F811 - the class, at run time

    def session(m: int, k: int, n: int, w: np.ndarray) -> Any:
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(w, "w")])
        o = ort.SessionOptions()
        if threads is not None:
            o.intra_op_num_threads = threads
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        return ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])

    def best(fn: Callable[[], Any]) -> float:
        return min(time_repeats(fn, 2, repeats))

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        bandwidth = _host_bandwidth(session, best)
        tflops = _host_tflops(session, best)
    finally:
        torch.set_num_threads(old_threads)
    import psutil

    mem = int(psutil.virtual_memory().total)
    return Device(name=HOST, title=f"{cpu_model()} ({threads or 'default'} threads), measured",
                  fp16_tflops=tflops, fp32_tflops=tflops, bandwidth_gbs=bandwidth, memory_gb=mem / 1e9,
                  source="measured by bench.py at the start of this run (timing.measure_host: best of "
                         f"{repeats} GEMV/sum reads of 512 MiB, best of {repeats} fp32 GEMMs "
                         f"{HOST_GEMM[0]}x{HOST_GEMM[1]}x{HOST_GEMM[2]})")


def _host_bandwidth(session: Callable[..., Any], best: Callable[[Callable[[], Any]], float]) -> float:
    """GB/s: a 512 MiB fp32 weight over the fastest of ONNX Runtime's GEMV and torch's sum (measure_host)."""
    import torch

    k, n = HOST_GEMV
    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    s = session(1, k, n, w)
    x = np.ones((1, k), np.float32)
    t_ort = best(lambda: s.run(None, {"x": x}))
    wt = torch.from_numpy(w)
    t_sum = best(lambda: wt.sum())
    return w.nbytes / min(t_ort, t_sum) / 1e9


def _host_tflops(session: Callable[..., Any], best: Callable[[Callable[[], Any]], float]) -> float:
    """fp32 TFLOP/s: the fastest of ONNX Runtime's and torch's GEMM HOST_GEMM (measure_host)."""
    import torch

    m, k, n = HOST_GEMM
    w = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    a = np.random.default_rng(2).standard_normal((m, k), dtype=np.float32)
    s = session(m, k, n, w)
    at, wt = torch.from_numpy(a), torch.from_numpy(w)
    t = min(best(lambda: s.run(None, {"x": a})), best(lambda: at @ wt))
    return 2.0 * m * k * n / t / 1e12
