"""The ONNX Runtime backend: the ONNX graphs of an export directory, run through I/O binding.

    form      the graphs it runs: "ort" (the export's ORT form of the decoder segments and of the vision graph:
              fused attention/rotary/norm kernels, `export/ort_form.py`), "portable" (the graphs
              TensorRT reads), "auto" (ORT form when the export has a current one and the provider runs it, else
              portable)
    inplace   ORT form only: KV caches preallocated to prompt + new tokens and updated in place (past and
              present bound to one OrtValue, GroupQueryAttention's shared buffer); False: the same graphs
              return past + new each call (the concatenating path, kept to check the in-place one against)
    resident  outputs stay OrtValues (on the GPU with CUDA) and are fed back as they are: hidden states and
              caches never leave the device between graphs and steps; the loop copies to the host only what it
              reads (logits, keep_pre, keep_post). False: every output comes back as numpy (host consumers:
              validation, quantization checks)
    cache     session start-up: the optimized graph ONNX Runtime builds at load is saved once beside the
              export (`ort_cache/`, keyed by the graph's sha256, ONNX Runtime's version and the providers) and
              loaded as it is afterwards, instead of re-optimizing each time

Same code path on CPU and CUDA (I/O binding throughout); on CPU "device" memory is host memory.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from sts_export.errors import StsError

CACHE_DIR = "ort_cache"
SPIN_MODES = {"run": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
              "0": {"session.intra_op.allow_spinning": "0"}, "1": {"session.intra_op.allow_spinning": "1"}}


def prefill_chunk(head_dim: int) -> int:
    """Tokens per prefill call of the ORT form on CPU (OrtBackend.prefill_chunk) for the decoder's head size.

    GroupQueryAttention's CPU kernel writes a chunk's [heads, chunk, T] scores before its softmax. With narrow heads
    (the -cpu recipes' 16) that score pass is the cost and 256 rows keep it in cache; with a real model's 128 the
    GEMMs are, and 512 rows re-read the weights half as often. `scripts/prefill_chunks.py`, llava-next at S = 2964:
    head 128 prefill 4869 ms at 512 vs 5196 at 256; head 16 7457 vs 7452; llava-1.5 (S = 612, head 16) 900 vs 846.
    """
    return 512 if head_dim >= 64 else 256


@functools.lru_cache(maxsize=1)
def gqa_takes_query_seqlens() -> bool:
    """Whether this onnxruntime's GroupQueryAttention has the `query_seqlens` input (1.32+) that the ORT form's
    segments feed (read off the registered operator schema)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        return any(op.name == "GroupQueryAttention" and op.domain == "com.microsoft" and
                   any(i.name == "query_seqlens" for i in op.inputs) for op in C.get_all_operator_schema())
    except (ImportError, AttributeError):
        return False


def _no_cuda_provider() -> str:
    """Why --device cuda cannot run here, and what to do (onnxruntime and onnxruntime-gpu share one package
    directory: installed together, whichever was installed last decides the providers)."""
    from importlib import metadata

    def installed(dist: str) -> bool:
        try:
            metadata.version(dist)
            return True
        except metadata.PackageNotFoundError:
            return False

    if installed("onnxruntime-gpu") and installed("onnxruntime"):
        return ("onnxruntime and onnxruntime-gpu are both installed and the CPU build won; "
                "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    return "the CUDA provider of onnxruntime is not available; pip install onnxruntime-gpu or use --device cpu"


class OrtCache:
    """One segment's KV cache for an ORT-form graph: OrtValues [B, kvh, C, dh] written in place by the graph
    (C = capacity), or (inplace=False) growing [B, kvh, P, dh] buffers replaced by each call's presents.

    GroupQueryAttention's lengths (`seqlens_k` [B], `total_sequence_length` []) are two host OrtValues of their
    own, rewritten in place before each call: with the in-place buffers every input but the hidden state and
    the position ids stays bound from one decode step to the next."""

    def __init__(self, be: "OrtBackend", layers: list[int], batch: int, capacity: int, inplace: bool) -> None:
        t = be.text
        dt = be.np_dtype
        n = capacity if inplace else 0
        # one buffer per name (on CPU an OrtValue wraps its numpy array: never share one array)
        self.kv = {f"past_{kv}_{i}": be.from_numpy(np.zeros((batch, t["num_kv_heads"], n, t["head_dim"]), dtype=dt))
                   for i in layers for kv in ("key", "value")}
        self.batch, self.capacity, self.inplace, self.length = batch, capacity, inplace, 0
        ov = be.ort.OrtValue.ortvalue_from_numpy
        # host memory on every provider (the CUDA kernel reads total_sequence_length on the host)
        self.lengths = {"seqlens_k": ov(np.zeros(batch, dtype=np.int32)),
                        "total_sequence_length": ov(np.zeros((), dtype=np.int32))} if be.resident else None
        self.prefill_chunk: int | None = None  # set by OrtBackend.kv_cache (generate.run_segment reads it)

    def feeds(self, new: int) -> dict[str, Any]:
        total = self.length + new
        if self.inplace and total > self.capacity:
            raise StsError(f"KV cache full: {total} entries asked of a cache preallocated to {self.capacity}")
        seqlens, tsl = np.full(self.batch, total - 1, dtype=np.int32), np.array(total, dtype=np.int32)
        if self.lengths is None:  # resident=False: host arrays, fed as they are
            return {**self.kv, "seqlens_k": seqlens, "total_sequence_length": tsl}
        self.lengths["seqlens_k"].update_inplace(seqlens)
        self.lengths["total_sequence_length"].update_inplace(tsl)
        return {**self.kv, **self.lengths}

    def update(self, out: dict[str, Any], new: int) -> None:
        if not self.inplace:  # in place: the presents are our own buffers, already written
            self.kv = {k: out[k.replace("past_", "present_")] for k in self.kv}
        self.length += new


class OrtBackend:
    """Runs the ONNX graphs of an export directory with ONNX Runtime (see the module docstring)."""

    name = "onnxruntime"

    def __init__(self, export_dir: Path, manifest: dict[str, Any], device: str = "auto", threads: int | None = None,
                 *, form: str = "auto", inplace: bool = True, resident: bool = True, cache: bool = False) -> None:
        import onnxruntime as ort

        self.ort = ort
        self.dir, self.manifest = Path(export_dir), manifest
        avail = ort.get_available_providers()
        want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in avail
        if device == "cuda" and not want_cuda:
            raise StsError(_no_cuda_provider())
        # fp32 exports keep float32 math on the GPU too: the CUDA provider's default TF32 matmuls/convolutions
        # (10-bit mantissa) would move fp32 logits by ~1e-3 (measured on an H200), past the fp32 tolerance
        cuda = ("CUDAExecutionProvider", {"use_tf32": "0"} if manifest.get("dtype", "fp32") == "fp32" else {})
        self.providers: list[Any] = ([cuda] if want_cuda else []) + ["CPUExecutionProvider"]
        self.device_type = "cuda" if want_cuda else "cpu"
        if want_cuda and hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from PyTorch or the nvidia-* wheels when present
            ort.preload_dlls()
        self.opts = ort.SessionOptions()
        if threads:
            self.opts.intra_op_num_threads = threads
        self.opts.log_severity_level = 3
        self.sessions: dict[str, Any] = {}
        # run(): per graph, its IOBinding, input names, (output name, the past it shares a buffer with), what is bound
        self._bindings: dict[str, tuple[Any, list[str], list[tuple[str, str | None]], dict[str, Any]]] = {}
        self.load_seconds: dict[str, float] = {}
        self._concat: dict[tuple[int, str, int, int], Any] = {}  # concat(): one session per signature
        self.resident, self.inplace, self.cache = resident, inplace, cache
        from sts_export.artifact.manifest import manifest_recipe

        t = manifest_recipe(manifest).text
        self.text = {"num_kv_heads": t.num_kv_heads, "head_dim": t.head_dim}
        # CPU: long prefills run in chunks (generate.run_segment); GroupQueryAttention's CPU kernel writes the whole
        # [heads, S, T] score matrix, which at S in the thousands outgrows the caches (STS_ORT_PREFILL_CHUNK=0: off)
        raw = os.environ.get("STS_ORT_PREFILL_CHUNK", "").strip() or str(prefill_chunk(t.head_dim))
        if not raw.isdigit():
            raise StsError(f"STS_ORT_PREFILL_CHUNK must be a whole number of tokens (0: no chunks), got '{raw}'")
        chunk = int(raw)
        # (chunks of a batch of several rows need GroupQueryAttention with query_seqlens: onnxruntime 1.32+)
        self.prefill_chunk = chunk if chunk > 0 and self.device_type == "cpu" and gqa_takes_query_seqlens() else None
        from sts_export.artifact.plan import NP_DTYPES

        self.np_dtype = np.dtype(NP_DTYPES[manifest.get("dtype", "fp32")])
        from sts_export.artifact.manifest import ort_form_is_current

        have = {g for g in manifest.get("ort_form", {}) if g in ("vision", "segment1", "segment2")}
        if form not in ("auto", "ort", "portable"):
            raise StsError(f"unknown graph form '{form}'; choose auto, ort or portable")
        if form == "ort" and not have & {"segment1", "segment2"}:
            raise StsError(f"{export_dir} has no ORT form of its decoder graphs; re-export it")
        if have and not ort_form_is_current(manifest):  # an older sts-export's layout: its portable graphs run
            if form == "ort":
                raise StsError(f"{export_dir} holds an older ORT form; write the current one with "
                               f"sts ort-form {export_dir}")
            have = set()
        kernel_rotary = manifest.get("ort_form", {}).get("cache", {}).get("rotary", "kernel") == "kernel"
        if have & {"segment1", "segment2"} and kernel_rotary and not gqa_takes_query_seqlens():
            # an older onnxruntime (1.31 and before) cannot load a form with rotary "kernel": its GroupQueryAttention
            # feeds query_seqlens, without which the kernel rotates a first prompt at 0..S-1 whatever the position
            # ids (gapped ids after Stage 2, M-RoPE's). A form exported there rotates with RotaryEmbedding ops.
            if form == "ort":
                raise StsError(f"this ORT form of the decoder needs onnxruntime 1.32 or newer (this is {ort.__version__}); "
                               "pip install -U onnxruntime, rewrite it with sts ort-form "
                               "DIR, or run the portable graphs (form 'portable')")
            have -= {"segment1", "segment2"}
        # the ORT form is float32 for the CPU provider (GroupQueryAttention has no float32 CUDA kernel: on CUDA an
        # fp32 export runs its portable graphs)
        runs_here = not want_cuda or manifest.get("dtype") != "fp32"
        self.form_graphs = have if form == "ort" or (form == "auto" and runs_here) else set()

    @property
    def form(self) -> str:
        """The decoder segments' form as they run: "ort" (fused kernels, the backend's cache) or "portable"."""
        return "ort" if self.form_graphs & {"segment1", "segment2"} else "portable"

    # ------------------------------------------------------------------ sessions
    def _entry(self, graph: str) -> dict[str, Any]:
        return self.manifest["ort_form"][graph] if graph in self.form_graphs else self.manifest["graphs"][graph]

    def _cached_model(self, graph: str, entry: dict[str, Any]) -> tuple[Path, bool] | None:
        """(path of the saved optimized graph, whether it exists yet), or None when no cache can be kept here."""
        if not self.cache or os.environ.get("STS_ORT_CACHE", "1") == "0":
            return None
        key = json.dumps([entry["sha256"], entry.get("external_data", {}).get("sha256"), self.ort.__version__,
                          self.providers, int(self.opts.graph_optimization_level)])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        d = self.dir / CACHE_DIR
        stem = Path(entry["onnx"]).stem
        path = d / f"{stem}.{digest}.onnx"
        if path.is_file():
            return path, True
        try:
            d.mkdir(exist_ok=True)
            from sts_export.artifact.memory import clean_stale_tmp

            clean_stale_tmp(d, progress=lambda _: None)  # what killed loads left (dead owner pid only)
            stale = re.compile(re.escape(stem) + r"\.([0-9a-f]{16})\.onnx(\.data)?$")
            for old in d.iterdir():  # another key's optimized copy of this graph (an older ORT, other providers)
                m = stale.match(old.name)
                if m and m.group(1) != digest:
                    old.unlink(missing_ok=True)
        except OSError:
            return None
        return (path, False) if os.access(d, os.W_OK) else None

    def _load_and_save(self, src: Path, dst: Path) -> Any:
        """A session of `src`, its optimized graph written to this process's own temporary directory and moved
        to `dst` (data file first, then the graph that names it) once complete. Processes that load one export
        at once each write their own copy; the same key gives the same bytes, and a reader only takes `dst`
        when its graph is there, so every rename leaves a complete pair."""
        import shutil

        from sts_export.artifact.memory import make_tmp_dir

        tmp = make_tmp_dir(dst)  # .<dst name>.tmp-XXXXXXXX beside it, with this process's owner record
        try:
            opts = self._options()
            opts.optimized_model_filepath = str(tmp / dst.name)
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            sess = self.ort.InferenceSession(str(src), opts, providers=self.providers)
            if (tmp / dst.name).is_file():
                if (tmp / (dst.name + ".data")).is_file():
                    os.replace(tmp / (dst.name + ".data"), dst.with_name(dst.name + ".data"))
                os.replace(tmp / dst.name, dst)  # complete: the next load takes it
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return sess

    def session(self, graph: str) -> Any:
        if graph not in self.sessions:
            import time

            ort = self.ort
            entry = self._entry(graph)
            src = self.dir / entry["onnx"]
            t0 = time.perf_counter()
            cached = self._cached_model(graph, entry)
            if cached is not None and cached[1]:  # already optimized for this ORT and these providers: load as is
                opts = self._options()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                sess = ort.InferenceSession(str(cached[0]), opts, providers=self.providers)
            elif cached is not None:
                sess = self._load_and_save(src, cached[0])
            else:
                sess = ort.InferenceSession(str(src), self._options(), providers=self.providers)
            self.load_seconds[graph] = time.perf_counter() - t0
            self.sessions[graph] = sess
        return self.sessions[graph]

    def _options(self) -> Any:
        o = self.ort.SessionOptions()
        o.intra_op_num_threads = self.opts.intra_op_num_threads
        o.log_severity_level = self.opts.log_severity_level
        o.graph_optimization_level = self.opts.graph_optimization_level
        # the export's sessions run one after another, each with its own intra-op pool. Within a run the workers
        # spin between kernels (a sleeping pool pays a wake-up per kernel); at the end of the run they stop, since
        # a pool still spinning (ONNX Runtime's default) takes the cores the next session's pool needs.
        # STS_ORT_SPIN: run (default), 0 (never spin), 1 (ONNX Runtime's default: spin on after the run)
        spin = os.environ.get("STS_ORT_SPIN", "run")
        if spin not in SPIN_MODES:
            raise StsError(f"STS_ORT_SPIN must be one of {', '.join(SPIN_MODES)}, got '{spin}'")
        for key, value in SPIN_MODES[spin].items():
            o.add_session_config_entry(key, value)
        return o

    # ------------------------------------------------------------------ run
    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        sess = self.session(graph)
        if graph not in self._bindings:  # one IOBinding per graph, reused: unchanged OrtValues stay bound
            shared = self.inplace and graph in self.form_graphs  # presents share their past's buffer
            outputs = [(n, n.replace("present_", "past_") if shared and n.startswith("present_") else None)
                       for n in (o.name for o in sess.get_outputs())]
            self._bindings[graph] = (sess.io_binding(), [i.name for i in sess.get_inputs()], outputs, {})
        io, inputs, outputs, bound = self._bindings[graph]
        for name in inputs:
            x = feeds[name]
            if isinstance(x, self.ort.OrtValue):
                if bound.get(name) is not x:  # e.g. an in-place KV buffer: bound once per generation
                    io.bind_ortvalue_input(name, x)
                    bound[name] = x
            else:  # host array (ONNX Runtime copies it where the kernel needs it)
                io.bind_cpu_input(name, np.ascontiguousarray(x))
                bound.pop(name, None)
        for n, past_name in outputs:
            past = feeds.get(past_name) if past_name else None
            if isinstance(past, self.ort.OrtValue):
                if bound.get(n) is not past:
                    io.bind_ortvalue_output(n, past)  # the same buffer: GroupQueryAttention writes in place
                    bound[n] = past
            else:
                io.bind_output(n, self.device_type)  # a new output each call
                bound.pop(n, None)
        sess.run_with_iobinding(io)
        # wrap only the new outputs: an output bound to our own buffer is that buffer (a decode step of a 32-layer
        # segment would otherwise wrap 64 cache views it never reads)
        got = io.get_outputs_as_ortvaluevector()
        outs = {n: bound[n] if n in bound else self.ort.OrtValue(got[i]) for i, (n, _) in enumerate(outputs)}
        if not self.resident:
            return {k: v.numpy() for k, v in outs.items()}
        return outs

    def kv_cache(self, graph: str, layers: list[int], batch: int, capacity: int) -> OrtCache | None:
        """The ORT form's cache (in place unless `inplace=False`); None for portable graphs (the loop concatenates)."""
        if graph not in self.form_graphs:
            return None
        cache = OrtCache(self, layers, batch, capacity, self.inplace)
        cache.prefill_chunk = self.prefill_chunk
        return cache

    def from_numpy(self, x: np.ndarray) -> Any:
        if not self.resident:
            return x
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), self.device_type, 0)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.numpy() if isinstance(x, self.ort.OrtValue) else np.asarray(x)

    def concat(self, xs: list[Any], axis: int) -> Any:
        """Prefill only (prefix embeds + image + suffix embeds), once per prompt. Resident: an ONNX Concat run
        where the pieces are (on the GPU with CUDA), so the image embeddings never visit the host."""
        if not self.resident:
            return np.concatenate([self.to_numpy(x) for x in xs], axis=axis)
        xs = [x if isinstance(x, self.ort.OrtValue) else self.from_numpy(x) for x in xs]
        key = (len(xs), xs[0].data_type(), len(xs[0].shape()), axis)
        if key not in self._concat:
            self._concat[key] = self._concat_session(*key)
        sess = self._concat[key]
        io = sess.io_binding()
        for i, x in enumerate(xs):
            io.bind_ortvalue_input(f"x{i}", x)
        io.bind_output("y", self.device_type)
        sess.run_with_iobinding(io)
        return self.ort.OrtValue(io.get_outputs_as_ortvaluevector()[0])

    def _concat_session(self, n: int, element_type: str, rank: int, axis: int) -> Any:
        """An in-memory one-node graph: y = Concat(x0..x{n-1}, axis) for tensors of this element type and rank."""
        from onnx import TensorProto, helper

        et = {"tensor(float)": TensorProto.FLOAT, "tensor(float16)": TensorProto.FLOAT16,
              "tensor(bfloat16)": TensorProto.BFLOAT16}[element_type]  # OrtValue.data_type()
        dims = [f"d{j}" for j in range(rank)]
        ins = [helper.make_tensor_value_info(f"x{i}", et, [f"{d}_{i}" if j == axis else d for j, d in enumerate(dims)])
               for i in range(n)]
        out = helper.make_tensor_value_info("y", et, [None] * rank)
        g = helper.make_graph([helper.make_node("Concat", [i.name for i in ins], ["y"], axis=axis)], "concat", ins, [out])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        return self.ort.InferenceSession(m.SerializeToString(), self._options(), providers=self.providers)
