"""Build TensorRT engines from the exported ONNX graphs: one strongly typed build on TensorRT 10.3, 10.16 and 11.x.

Importable without TensorRT: `tensorrt` is imported inside the functions that need it.

io_spec convention (what `profiles_for_graph` reads; the exporter writes it into manifest.json):

    {"inputs":  [{"name": "hidden", "dtype": "float16", "shape": ["B", "S", 4096]}, ...],
     "outputs": [{"name": "present_key_0", "dtype": "float16", "shape": ["B", 8, "P+S", 128]}, ...]}

Input dims are ints (fixed) or one of these symbols:
    "B"                      batch                          1 .. max_batch   (opt: opt_batch, default 1)
    "S", "S1", "S2", "S…"    tokens of this call            prefill: min_prompt .. max_prompt (opt: opt_prompt);
                                                            decode: exactly 1
    "P", "past…"             KV entries already cached      prefill: 0;  decode: 0 .. max_context - 1
Output dims may be expressions ("P+S"); they are not read. Rank-0 integer inputs (`image_start`) also get a
value range 0 .. max_prompt (used only if TensorRT turns the input into a shape tensor).

A graph with a past ("P") input (`segment1`, `segment2`) gets two optimisation profiles: 0 = prefill
(S in 1..max_prompt, P = 0) and 1 = decode (S = 1, P in 0..max_context-1); every other graph gets one.
The runtime (`trt_runtime.TrtBackend`) picks the profile from the input shapes.

Precision. Every engine is built strongly typed (TensorRT 11 has no other mode; NVIDIA's "TensorRT 10.x to 11.x
Python API" migration guide lists BuilderFlag.FP16/BF16/INT8, OBEY_PRECISION_CONSTRAINTS and the per-layer
precision setters as removed): layer types follow the ONNX tensor types, so an engine's precision is the dtype of
the graph it was built from, and Stage 1/2 stay float32 through the casts the exporter put in the graph. No builder
precision flag is set and no layer is pinned. `network_precision` reads the precision back from TensorRT's own
parsed network (the dtype of its float constants, weighted by size) and `build_engine` refuses, before building,
a network whose precision differs from the one asked for. TF32 is switched off where the flag exists, so float32
means float32 (DESIGN.md: "All selection math in float32").

TensorRT API. Every call below exists, with the same meaning, in TensorRT 10.3, 10.16 and 11.x; the one that differs
is the network-creation flag (`_network_flags`): 10.x needs STRONGLY_TYPED, 11.0 deprecates it ("always enabled,
retained for API compatibility but ignored").
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from sts_export.errors import StsError

Shape = tuple[int, ...]
Profile = dict[str, Any]  # input name -> (min_shape, opt_shape, max_shape); optional "__values__": same, values

MIN_TRT = (10, 3)
VALUES_KEY = "__values__"
_TRT_CACHE: dict[str, Any] = {}
MAX_MAJOR = 11  # the newest TensorRT major whose API this module was written against
_INSTALL_HINT = (
    "TensorRT is not installed (Python package `tensorrt` is needed for --target trt): on a Jetson it ships with "
    "JetPack (6.1/6.2: TensorRT 10.3; 7.2: TensorRT 10.16; 7.2.2+: TensorRT 11.4.1+, python3-libnvinfer), on x86-64 "
    "with an NVIDIA driver run `pip install tensorrt` (TensorRT 11.x wheels); see README 'TensorRT and Jetson'; "
    "or export with --target onnx"
)


# ---------------------------------------------------------------------------------------------------------------
# TensorRT / CUDA discovery
# ---------------------------------------------------------------------------------------------------------------

def _import_trt() -> Any:
    if "mod" not in _TRT_CACHE:
        try:
            import tensorrt  # noqa: PLC0415 - lazy on purpose

            _TRT_CACHE["mod"] = tensorrt
        except (ImportError, OSError) as e:  # OSError: wheel present but libnvinfer missing
            _TRT_CACHE["mod"] = None
            _TRT_CACHE["error"] = f"{type(e).__name__}: {e}"
    return _TRT_CACHE["mod"]


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:4])


def trt_available() -> bool:
    """True when `import tensorrt` works (no GPU check)."""
    return _import_trt() is not None


def require_tensorrt(min_version: tuple[int, int] = MIN_TRT) -> Any:
    """The `tensorrt` module, or StsError with one line on how to get it (or a new enough one)."""
    trt = _import_trt()
    if trt is None:
        raise StsError(_INSTALL_HINT)
    if _version_tuple(trt.__version__)[:2] < tuple(min_version):
        raise StsError(f"TensorRT {trt.__version__} is too old: sts-export needs TensorRT >= "
                       f"{min_version[0]}.{min_version[1]} (`pip install -U tensorrt`, or JetPack 6.1+ on Jetson)")
    if _version_tuple(trt.__version__)[0] > MAX_MAJOR:
        raise StsError(f"TensorRT {trt.__version__} is newer than sts-export knows (10.3 to {MAX_MAJOR}.x): its "
                       f"Python API may differ; install TensorRT {MAX_MAJOR}.x (`pip install 'tensorrt<{MAX_MAJOR + 1}'`)")
    return trt


def _cudart() -> Any:
    """cuda-python's runtime module (new layout first), or None."""
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # noqa: PLC0415

        return cudart
    except ImportError:
        return None


def _torch_cuda() -> Any:
    """torch when it is importable and sees a CUDA device, else None."""
    try:
        import torch  # noqa: PLC0415

        return torch if torch.cuda.is_available() else None
    except ImportError:
        return None


def device_info(device: int = 0) -> dict[str, Any]:
    """TensorRT version, GPU name and compute capability ("8.7") of `device`; None for what is not there."""
    trt = _import_trt()
    info: dict[str, Any] = {"trt_version": trt.__version__ if trt is not None else None, "gpu": None,
                            "compute_capability": None}
    torch = _torch_cuda()
    if torch is not None:
        major, minor = torch.cuda.get_device_capability(device)
        info.update(gpu=torch.cuda.get_device_name(device), compute_capability=f"{major}.{minor}")
        return info
    cudart = _cudart()
    if cudart is not None:
        try:
            err, prop = cudart.cudaGetDeviceProperties(device)
            if int(getattr(err, "value", err)) == 0:
                name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
                info.update(gpu=name.rstrip("\x00"), compute_capability=f"{prop.major}.{prop.minor}")
        except Exception:  # noqa: BLE001 - no driver / no device: leave None
            pass
    return info


def check_engine_compatible(manifest_trt: dict[str, Any], *, here: dict[str, Any] | None = None) -> None:
    """Raise StsError (one line) unless engines described by `manifest_trt` can run on this machine.

    `manifest_trt`: {"trt_version": "10.3.0.30", "compute_capability": "8.7", "gpu": ..., optional
    "hardware_compatibility_level": "AMPERE_PLUS"}. Engines need the same TensorRT release (major.minor.patch)
    and, unless built hardware-compatible, the same GPU compute capability.
    """
    here = device_info() if here is None else here
    built_v = str(manifest_trt.get("trt_version") or manifest_trt.get("version") or "")
    built_cc = str(manifest_trt.get("compute_capability") or "")
    if here.get("trt_version") is None:
        raise StsError(_INSTALL_HINT)
    if built_v and _version_tuple(built_v)[:3] != _version_tuple(here["trt_version"])[:3]:
        raise StsError(f"the engines were built with TensorRT {built_v} but this machine has TensorRT "
                       f"{here['trt_version']} (sts-export builds no version-compatible engines): rebuild them here "
                       f"(python export.py --onnx-dir DIR --target trt) or install TensorRT {built_v}")
    cc = here.get("compute_capability")
    if built_cc and cc is None:
        raise StsError("no CUDA GPU is visible, and TensorRT engines need one "
                       "(check the driver / CUDA_VISIBLE_DEVICES)")
    if built_cc and cc != built_cc:
        level = str(manifest_trt.get("hardware_compatibility_level") or "NONE").upper()
        if level.endswith("AMPERE_PLUS") and _version_tuple(cc)[0] >= 8:
            return
        raise StsError(f"the engines were built for GPU compute capability {built_cc} "
                       f"({manifest_trt.get('gpu', 'another GPU')}) but this GPU ({here.get('gpu')}) is {cc}: "
                       f"TensorRT engines are GPU-specific, rebuild them on this machine (--target trt)")


# ---------------------------------------------------------------------------------------------------------------
# Optimisation profiles
# ---------------------------------------------------------------------------------------------------------------

_TOKEN_KINDS = ("T", "N", "K", "Kp")  # image-dependent N: crops, token index, this image's K and K'
_TOKEN_ALIASES = {"tokens": "N"}  # Qwen2.5-VL's LLM-token axis (not named N: sympy reads that as its N())


def _dim_kind(d: int | str) -> str:
    """fixed, batch, past, seq, a token kind (T, N, K, Kp), or c*kind for an axis c times one (Qwen's 4*tokens
    patches: 4 per LLM token); unknown otherwise."""
    if isinstance(d, int):
        return "fixed"
    s = str(d).strip()
    if s in ("B", "batch") or s.lower().startswith("batch"):
        return "batch"
    if s == "P" or s.lower().startswith("past"):
        return "past"
    if s.startswith("S") or s.lower().startswith("seq"):
        return "seq"
    if s in _TOKEN_KINDS or s in _TOKEN_ALIASES:
        return _TOKEN_ALIASES.get(s, s)
    scaled = re.fullmatch(r"(\d+)\s*\*\s*(\w+)", s)
    if scaled and _dim_kind(scaled.group(2)) in _TOKEN_KINDS:
        return f"{int(scaled.group(1))}*{_dim_kind(scaled.group(2))}"
    return "unknown"


def profiles_for_graph(graph_name: str, io_spec: dict[str, Any], *, max_batch: int, max_prompt: int,
                       max_context: int, min_prompt: int = 1, opt_batch: int = 1, opt_prompt: int | None = None,
                       opt_context: int | None = None, token_limits: dict[str, int] | None = None) -> list[Profile]:
    """Optimisation profiles for one graph from its io_spec (see the module docstring for the dim symbols).

    min_prompt: smallest prefill length (e.g. k_pre + 1 for `prune`, whose S1 holds the K image tokens);
    opt_*: the shapes TensorRT tunes for (default batch 1, max_prompt, max_context // 2).
    token_limits: the largest T (crops), N (token index), K and Kp (K') of an image-dependent-N export;
    each spans 1..its limit, tuned at the limit.
    """
    if not (max_batch >= 1 and 1 <= min_prompt <= max_prompt and max_context > 1):
        raise StsError(f"{graph_name}: bad profile limits (max_batch={max_batch}, min_prompt={min_prompt}, "
                       f"max_prompt={max_prompt}, max_context={max_context})")
    opt_b = max(1, min(opt_batch, max_batch))
    opt_s = max(min_prompt, min(opt_prompt or max_prompt, max_prompt))
    opt_p = max(0, min(opt_context if opt_context is not None else max_context // 2, max_context - 1))
    inputs = io_spec.get("inputs", [])
    kinds = {inp["name"]: [_dim_kind(d) for d in inp["shape"]] for inp in inputs}
    limits = token_limits or {}
    scaled = {k for ks in kinds.values() for k in ks if "*" in k}
    for inp in inputs:
        for d, k in zip(inp["shape"], kinds[inp["name"]]):
            if k.split("*")[-1] in _TOKEN_KINDS and k.split("*")[-1] not in limits:
                raise StsError(f"{graph_name}: input '{inp['name']}' has dim '{d}' but no limit for it was given")
            if k == "unknown":
                raise StsError(f"{graph_name}: input '{inp['name']}' has symbolic dim '{d}' that has no profile "
                               f"rule (use an int, B, S…, or P)")
    has_past = any("past" in ks for ks in kinds.values())
    tokens = {k: (1, v, v) for k, v in limits.items()}
    for k in scaled:  # c*N: c times the token range (Qwen: 4 patches per LLM token)
        c, base = k.split("*")
        tokens[k] = tuple(int(c) * x for x in tokens[base])
    ranges = {  # kind -> (min, opt, max) per phase
        "prefill": {"batch": (1, opt_b, max_batch), "seq": (min_prompt, opt_s, max_prompt), "past": (0, 0, 0), **tokens},
        "decode": {"batch": (1, opt_b, max_batch), "seq": (1, 1, 1), "past": (0, opt_p, max_context - 1), **tokens},
    }
    profiles = []
    for phase in (("prefill", "decode") if has_past else ("prefill",)):
        prof: Profile = {}
        for inp in inputs:
            lo, opt, hi = [], [], []
            for d, k in zip(inp["shape"], kinds[inp["name"]]):
                r = (d, d, d) if k == "fixed" else ranges[phase][k]
                lo.append(r[0])
                opt.append(r[1])
                hi.append(r[2])
            prof[inp["name"]] = (tuple(lo), tuple(opt), tuple(hi))
            if not inp["shape"] and str(inp.get("dtype", "")).startswith(("int", "uint")):
                prof.setdefault(VALUES_KEY, {})[inp["name"]] = ((0,), (min(32, max_prompt),), (max_prompt,))
        profiles.append(prof)
    return profiles


# ---------------------------------------------------------------------------------------------------------------
# Engine build
# ---------------------------------------------------------------------------------------------------------------

def _stderr(msg: str) -> None:
    print(f"[trt] {msg}", file=sys.stderr, flush=True)


def _make_monitor(trt: Any, log: Callable[[str], None]) -> Any:
    """An IProgressMonitor (TensorRT >= 10.0) that logs top-level phases, their children and 10% steps."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._depth: dict[str, int] = {}
            self._steps: dict[str, int] = {}
            self._shown: dict[str, int] = {}
            self._t0: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name], self._steps[phase_name] = depth, max(1, num_steps)
                self._shown[phase_name], self._t0[phase_name] = 0, time.monotonic()
            if depth <= 1:
                log(f"{'  ' * depth}{phase_name} ({num_steps} step{'s' * (num_steps != 1)})")

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                depth, n = self._depth.get(phase_name, 9), self._steps.get(phase_name, 1)
                pct = int(100 * (step + 1) / n) // 10 * 10
                show = depth == 0 and n >= 10 and pct > self._shown.get(phase_name, 0)
                if show:
                    self._shown[phase_name] = pct
            if show:
                log(f"{phase_name}: {pct}%")
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                depth = self._depth.pop(phase_name, 9)
                dt = time.monotonic() - self._t0.pop(phase_name, time.monotonic())
            if depth <= 1:
                log(f"{'  ' * depth}{phase_name} done ({dt:.1f}s)")

    return _Monitor()


def _atomic_write(path: Path, data: Any) -> int:
    """Write bytes-like `data` to a temp file next to `path`, fsync, then os.replace. Returns the size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


# TensorRT DataType name -> the project's dtype name (the float types an engine can be "in").
TRT_FLOAT_DTYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}
PRECISIONS = ("fp32", "fp16", "bf16")


def _enum_name(v: Any) -> str:
    return getattr(v, "name", str(v).rsplit(".", 1)[-1])


_NODE_META_KEYS = ("namespace", "pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy",
                   "pkg.torch.onnx.stack_trace")


def onnx_nodes_matching(onnx_path: str | os.PathLike, pattern: str) -> set[str]:
    """Names of ONNX nodes (subgraphs included) whose name or torch-exporter metadata matches `pattern`.

    Loads the graph without weights. Empty when `onnx` is not installed.
    """
    try:
        import onnx  # noqa: PLC0415 - optional on a bare Jetson build box
    except ImportError:
        return set()
    rx = re.compile(pattern)
    found: set[str] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            texts = [node.name] + [p.value for p in node.metadata_props if p.key in _NODE_META_KEYS]
            if node.name and any(rx.search(t) for t in texts):
                found.add(node.name)
            for a in node.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(g)

    walk(onnx.load(str(onnx_path), load_external_data=False).graph)
    return found


def _volume(shape: Any) -> int:
    n = 1
    for d in tuple(shape):
        n *= max(int(d), 1)
    return n


def network_precision(network: Any) -> tuple[str | None, dict[str, int], dict[str, str]]:
    """(precision, float-constant elements per dtype, IO tensor dtypes) of a parsed TensorRT network.

    In a strongly typed network the tensor types are the ONNX types, so the precision is the dtype that holds most
    of the float constants (the weights; Stage 1/2 keep a few small fp32 ones) — the same rule as
    `export.onnx.graph_dtype` on the ONNX file. None when the network has no float constant (then the float IO
    dtype decides)."""
    counts: dict[str, int] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if _enum_name(layer.type) != "CONSTANT":
            continue
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            name = TRT_FLOAT_DTYPES.get(_enum_name(t.dtype)) if t is not None else None
            if name:
                counts[name] = counts.get(name, 0) + _volume(t.shape)
    io: dict[str, str] = {}
    for get, n in ((network.get_input, network.num_inputs), (network.get_output, network.num_outputs)):
        for i in range(n):
            t = get(i)
            io[t.name] = _enum_name(t.dtype)
    if counts:
        return max(counts, key=lambda k: counts[k]), counts, io
    floats = [TRT_FLOAT_DTYPES[d] for d in io.values() if d in TRT_FLOAT_DTYPES]
    return (max(set(floats), key=floats.count) if floats else None), counts, io


def _network_flags(trt: Any) -> int:
    """The one API difference the build path has: TensorRT 10.x builds strongly typed only when the network is
    created with NetworkDefinitionCreationFlag.STRONGLY_TYPED; TensorRT 11.0 deprecated that flag (strong typing is
    always on; the flag is "retained for API compatibility but is ignored"). Set it wherever it still exists."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _parse_onnx(trt: Any, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return parser
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        try:
            errors.append(f"{e.node_name() or '#' + str(e.node())}({e.node_operator()}): {e.desc()}")
        except Exception:  # noqa: BLE001 - older bindings: fall back to the error's str
            errors.append(str(e))
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    raise StsError(f"TensorRT could not parse {onnx_path.name}: {errors[0] if errors else 'unknown error'}{more}; "
                   f"`python -m sts_export.backends.tensorrt.check {onnx_path.parent}` lists every incompatibility")


def _add_profiles(trt: Any, builder: Any, config: Any, network: Any, profiles: list[Profile], name: str) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t.name for t in inputs if -1 in tuple(t.shape) or t.is_shape_tensor]
    if not profiles:
        if dynamic:
            raise StsError(f"{name}: inputs {', '.join(dynamic)} are dynamic, so at least one optimisation profile "
                           f"is needed (see trt_build.profiles_for_graph)")
        return
    for k, prof in enumerate(profiles):
        p = builder.create_optimization_profile()
        for t in inputs:
            if t.is_shape_tensor:
                vals = prof.get(VALUES_KEY, {}).get(t.name)
                if vals is None:
                    raise StsError(f"{name}: TensorRT made input '{t.name}' a shape tensor; profile {k} needs its "
                                   f"value range under '{VALUES_KEY}'")
                p.set_shape_input(t.name, *[tuple(int(x) for x in v) for v in vals])
            if -1 not in tuple(t.shape):
                continue  # fixed shape: nothing to set
            if t.name not in prof:
                raise StsError(f"{name}: optimisation profile {k} has no shapes for dynamic input '{t.name}'")
            lo, opt, hi = (tuple(int(x) for x in s) for s in prof[t.name])
            p.set_shape(t.name, lo, opt, hi)
        if config.add_optimization_profile(p) < 0:
            raise StsError(f"{name}: TensorRT rejected optimisation profile {k} (each dim needs min <= opt <= max "
                           f"and must match the fixed dims of the ONNX inputs)")


def _load_timing_cache(config: Any, path: Path | None, log: Callable[[str], None]) -> Any:
    blob = path.read_bytes() if path is not None and path.exists() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, False):  # built by another TensorRT / GPU: start a fresh one
        log(f"timing cache {path} does not match this TensorRT/GPU; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    elif blob:
        log(f"timing cache: loaded {path} ({len(blob) / 1e6:.1f} MB)")
    return cache


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str | None = None,
                 profiles: list[Profile] | None = None, timing_cache_path: str | os.PathLike | None = None,
                 opt_level: int = 3, workspace_bytes: int | None = None,
                 progress: Callable[[str], None] | None = None, verbose: bool = False) -> dict[str, Any]:
    """Parse `onnx_path`, build a strongly typed serialized engine and write it atomically to `engine_path`.

    precision: what the engine must be ("fp32" | "fp16" | "bf16"), checked against the precision TensorRT's parsed
    network has (`network_precision`) before anything is built; None: whatever the graph is. profiles: from
    `profiles_for_graph`. timing_cache_path: loaded when present and rewritten after the build (share one file
    across graphs and builds). Returns the info for manifest.json (precision read from the network).
    """
    if precision is not None and precision not in PRECISIONS:
        raise StsError(f"unknown TensorRT precision '{precision}'; choose fp16, bf16 or fp32")
    if not 0 <= opt_level <= 5:
        raise StsError(f"builder optimisation level must be 0..5 (got {opt_level})")
    trt = require_tensorrt()
    log = progress or _stderr
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    cache_path = Path(timing_cache_path) if timing_cache_path else None
    if not onnx_path.exists():
        raise StsError(f"ONNX file not found: {onnx_path}")
    t0 = time.monotonic()

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    log(f"parsing {onnx_path.name}")
    parser = _parse_onnx(trt, network, logger, onnx_path)  # owns the weights: keep it alive until the build
    got, counts, io = network_precision(network)
    if precision is not None and got is not None and got != precision:
        raise StsError(f"{onnx_path.name} is a {got} graph, so its strongly typed engine would be {got}, not "
                       f"{precision}: re-export the ONNX graphs with --dtype {precision}")
    log(f"strongly typed network: {got or 'no float'} weights"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))} elements)" if counts else ""))

    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if hasattr(trt.BuilderFlag, "TF32"):  # float32 layers really run in float32
        config.clear_flag(trt.BuilderFlag.TF32)
    _add_profiles(trt, builder, config, network, profiles or [], onnx_path.stem)
    _load_timing_cache(config, cache_path, log)
    monitor = None
    if hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
        monitor = _make_monitor(trt, log)
        config.progress_monitor = monitor
    else:
        log("building (no progress monitor in this TensorRT)")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StsError(f"TensorRT failed to build {onnx_path.name} (its log above says why); a larger workspace "
                       f"may help")
    build_s = time.monotonic() - t0
    del parser
    if cache_path is not None:
        _atomic_write(cache_path, config.get_timing_cache().serialize())
    log(f"writing {engine_path}")
    size = _atomic_write(engine_path, serialized)
    del monitor
    dev = device_info()
    return {
        "engine": str(engine_path), "onnx": str(onnx_path), "trt_version": trt.__version__,
        "gpu": dev["gpu"], "compute_capability": dev["compute_capability"], "precision": got,
        "strongly_typed": True, "float_constants": counts, "io_dtypes": io,
        "profiles": [{k: [list(s) for s in v] for k, v in p.items() if k != VALUES_KEY} for p in profiles or []],
        "opt_level": int(opt_level), "workspace_bytes": workspace_bytes,
        "timing_cache": str(cache_path) if cache_path else None, "build_seconds": round(build_s, 2),
        "size_bytes": size,
    }
