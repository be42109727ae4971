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
(S in 1..max_prompt, P = 0) and 1 = decode (S = 1, P in 0..max_context-1); every other graph gets one. A segment's
"K" (Qwen3-VL's segment1: `deepstack_embeds` [T, B, K, Hd], the image rows its DeepStack planes cover) spans
1..K_max at prefill and is 1 at decode (the loop feeds one zero row).
The runtime (`backends.tensorrt.runtime.TrtBackend`) picks the profile from the input shapes.

Precision. Every engine is built strongly typed (TensorRT 11 has no other mode; NVIDIA's "TensorRT 10.x to 11.x
Python API" migration guide lists BuilderFlag.FP16/BF16/INT8, OBEY_PRECISION_CONSTRAINTS and the per-layer
precision setters as removed): layer types follow the ONNX tensor types, so an engine's precision is the dtype of
the graph it was built from, and Stage 1/2 stay float32 through the casts the exporter put in the graph. No builder
precision flag is set and no layer is pinned. `network_precision` reads the precision back from TensorRT's own
parsed network (the dtype of every float weight it holds: constants and the layer weights of convolutions and scale
layers, weighted by size) and `build_engine` refuses, before building, a network whose precision differs from the
one asked for. TF32 is switched off where the flag exists, so float32 means float32 (DESIGN.md: "All selection math
in float32").

TensorRT API. Every call below exists, with the same meaning, in TensorRT 10.3, 10.16 and 11.x; the one that differs
is the network-creation flag (`_network_flags`): 10.x needs STRONGLY_TYPED, 11.0 deprecates it ("always enabled,
retained for API compatibility but ignored") and renumbers the enum. Failures are read the way the bindings report
them (NvInfer.h / NvInferRuntime.h and python/src/infer/pyCore.cpp of NVIDIA/TensorRT 10.3 and 11.1): a serialized
timing cache TensorRT cannot read gives None, a failed build None, an invalid profile a RuntimeError from `set_shape`
or -1 from `add_optimization_profile`; the reason is in TensorRT's log, which `trt_logger` keeps so each failure is
one StsError line naming the graph and the reason.
"""
from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from sts_export.backends.tensorrt import discovery
from sts_export.backends.tensorrt.discovery import _enum_name, _stderr, trt_logger
from sts_export.errors import StsError

Shape = tuple[int, ...]
Profile = dict[str, Any]  # input name -> (min_shape, opt_shape, max_shape); optional "__values__": same, values

VALUES_KEY = "__values__"
# ---------------------------------------------------------------------------------------------------------------
# Optimisation profiles
# ---------------------------------------------------------------------------------------------------------------

_TOKEN_KINDS = ("T", "N", "K", "Kp", "W")  # image-dependent N: crops, token index, this image's K and K', windows
_TOKEN_ALIASES = {"tokens": "N", "windows": "W"}  # Qwen2.5-VL's LLM-token axis (not "N": sympy reads that as N())


def _dim_kind(d: int | str) -> str:
    """fixed, batch, past, seq, a token kind (T, N, K, Kp, W), or c*kind for an axis c times one (Qwen's 4*tokens
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
    token_limits: the largest T (crops), N (token index), K and Kp (K') of an image-dependent-N export, and W (the
    windows of Qwen2.5-VL's windowed ViT blocks); each spans 1..its limit, tuned at the limit.
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
    # a segment's K (DeepStack planes, segment1 of Qwen3-VL): this prefill's image rows, one zero row at decode
    decode_rows = {"K": (1, 1, 1)} if "K" in tokens else {}
    ranges = {  # kind -> (min, opt, max) per phase
        "prefill": {"batch": (1, opt_b, max_batch), "seq": (min_prompt, opt_s, max_prompt), "past": (0, 0, 0), **tokens},
        "decode": {"batch": (1, opt_b, max_batch), "seq": (1, 1, 1), "past": (0, opt_p, max_context - 1), **tokens,
                   **decode_rows},
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


# The ILayer subclasses that hold weights and the attributes that return them, in the TensorRT 10.3 and 11.1 Python
# API (python/src/infer/pyGraph.cpp; pyGraphDoc.h documents no other `Weights` attribute). onnx-tensorrt makes an
# IConstantLayer of an initializer used as a tensor (a MatMul's weight), but passes a Conv's initializer kernel and
# bias to addConvolutionNd as layer weights (onnxOpImporters.cpp, Conv; 10.1-GA), so counting constants alone misses
# them. A getter returns a numpy array for float32/float16 weights and a `trt.Weights` (dtype, size) for types numpy
# lacks, bf16 among them (python/include/utils.h, weights_to_numpy).
_WEIGHT_ATTRS = {"CONSTANT": ("IConstantLayer", ("weights",)),
                 "CONVOLUTION": ("IConvolutionLayer", ("kernel", "bias")),
                 "DECONVOLUTION": ("IDeconvolutionLayer", ("kernel", "bias")),
                 "SCALE": ("IScaleLayer", ("shift", "scale", "power"))}
_FLOAT_NAMES = {**TRT_FLOAT_DTYPES, "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _layer_weights(trt: Any, layer: Any) -> list[Any]:
    """The weights a layer holds (numpy arrays or trt.Weights); [] for layers without weights. `get_layer` returns
    the ILayer base: its subclass's attributes are reached by setting `__class__`, as Polygraphy does
    (backend/trt/util.py)."""
    kind = _WEIGHT_ATTRS.get(_enum_name(layer.type))
    if kind is None:
        return []
    cls, attrs = kind
    layer.__class__ = getattr(trt, cls)
    return [w for w in (getattr(layer, a, None) for a in attrs) if w is not None]


def network_precision(network: Any, trt: Any) -> tuple[str | None, dict[str, int], dict[str, str]]:
    """(precision, float weight elements per dtype, IO tensor dtypes) of a parsed TensorRT network.

    In a strongly typed network the tensor types are the ONNX types, so the precision is the dtype that holds most
    of the float weights (constants, convolution kernels/biases, scale layers; Stage 1/2 keep a few small fp32
    ones) -- the same rule as `export.onnx.graph_dtype` on the ONNX file. None when the network holds no float
    weight (then the float IO dtype decides)."""
    counts: dict[str, int] = {}
    for i in range(network.num_layers):
        for w in _layer_weights(trt, network.get_layer(i)):
            name = _FLOAT_NAMES.get(_enum_name(getattr(w, "dtype", "")))
            if name and int(getattr(w, "size", 0)):
                counts[name] = counts.get(name, 0) + int(w.size)
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
                   f"`sts check {onnx_path.parent}` lists every incompatibility")


def _dims(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def profile_problem(t: Any, lo: Shape, opt: Shape, hi: Shape) -> str:
    """Why (min, opt, max) cannot be the optimisation-profile shapes of network input `t`, or ''. The conditions of
    IOptimizationProfile::setDimensions (NvInferRuntime.h, 10.3 and 11.1): one rank for min, opt, max and the
    input; 0 <= min <= opt <= max in every dim; a dim the network fixes (not -1) equals it in all three."""
    net = _dims(t)
    if not len(lo) == len(opt) == len(hi) == len(net):
        return f"has rank {len(net)} but the profile gives ranks {len(lo)}/{len(opt)}/{len(hi)}"
    for i, (d, a, b, c) in enumerate(zip(net, lo, opt, hi)):
        if not 0 <= a <= b <= c:
            return f"dim {i} needs 0 <= min <= opt <= max, got {a}/{b}/{c}"
        if d != -1 and not a == b == c == d:
            return f"dim {i} is fixed at {d} in the network, the profile gives {a}/{b}/{c}"
    return ""


def values_problem(t: Any, lo: Shape, opt: Shape, hi: Shape) -> str:
    """Why (min, opt, max) cannot be the values of shape tensor `t`, or '' (IOptimizationProfile::setShapeValuesV2:
    one value per element of the tensor, the same count each time, min <= opt <= max)."""
    n = _volume(_dims(t))
    if not len(lo) == len(opt) == len(hi) == n:
        return f"holds {n} value(s) but the profile gives {len(lo)}/{len(opt)}/{len(hi)}"
    bad = [i for i, (a, b, c) in enumerate(zip(lo, opt, hi)) if not a <= b <= c]
    return f"value {bad[0]} needs min <= opt <= max, got {lo[bad[0]]}/{opt[bad[0]]}/{hi[bad[0]]}" if bad else ""


def _add_profiles(trt: Any, builder: Any, config: Any, network: Any, profiles: list[Profile], name: str,
                  logger: Any) -> None:
    """Check every profile against the network's inputs (one line naming the graph, profile, input and why), then
    hand them to TensorRT, turning its refusals (RuntimeError from `set_shape`/`set_shape_input`, -1 from
    `add_optimization_profile`) into the same kind of line."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t.name for t in inputs if -1 in _dims(t) or t.is_shape_tensor]
    if not profiles:
        if dynamic:
            raise StsError(f"{name}: inputs {', '.join(dynamic)} are dynamic, so at least one optimisation profile "
                           f"is needed (see trt_build.profiles_for_graph)")
        return
    for k, prof in enumerate(profiles):
        for t in inputs:
            if t.is_shape_tensor:
                vals = prof.get(VALUES_KEY, {}).get(t.name)
                if vals is None:
                    raise StsError(f"{name}: TensorRT made input '{t.name}' a shape tensor; optimisation profile {k} "
                                   f"needs its value range under '{VALUES_KEY}'")
                why = values_problem(t, *(tuple(int(x) for x in v) for v in vals))
                if why:
                    raise StsError(f"{name}: optimisation profile {k} cannot take shape tensor '{t.name}': it {why}")
            if -1 in _dims(t) and t.name not in prof:
                raise StsError(f"{name}: optimisation profile {k} has no shapes for dynamic input '{t.name}' "
                               f"(network shape {list(_dims(t))})")
            if t.name in prof:
                why = profile_problem(t, *(tuple(int(x) for x in s) for s in prof[t.name]))
                if why:
                    raise StsError(f"{name}: optimisation profile {k} does not fit input '{t.name}' (network shape "
                                   f"{list(_dims(t))}): it {why}")
    for k, prof in enumerate(profiles):
        p = builder.create_optimization_profile()
        try:
            for t in inputs:
                if t.is_shape_tensor:
                    p.set_shape_input(t.name, *[tuple(int(x) for x in v) for v in prof[VALUES_KEY][t.name]])
                if -1 in _dims(t):
                    p.set_shape(t.name, *(tuple(int(x) for x in s) for s in prof[t.name]))
        except RuntimeError as e:  # the binding raises when setDimensions/setShapeValuesV2 return false
            raise StsError(f"{name}: TensorRT rejected optimisation profile {k}: {e}") from None
        since = len(logger.errors)
        if config.add_optimization_profile(p) < 0:
            why = logger.why(since) or "TensorRT found it invalid"
            raise StsError(f"{name}: TensorRT rejected optimisation profile {k}: {why}")


def _load_timing_cache(config: Any, path: Path | None, log: Callable[[str], None]) -> Any:
    """Attach the timing cache at `path` (or a new one) to `config`. A cache TensorRT cannot use starts a new one with
    a one-line note, and the build then rewrites the file: `create_timing_cache` gives None for a serialized cache it
    cannot read (another TensorRT's, as in an export directory copied from an x86 host to a Jetson; NVIDIA's
    shared/utils/cacheUtils.cpp and Polygraphy's backend/trt/config.py check for exactly that), and
    `set_timing_cache` returns False for one made on a GPU with other device properties."""
    blob = path.read_bytes() if path is not None and path.exists() else b""
    cache = config.create_timing_cache(blob) if blob else None
    if blob and cache is None:
        log(f"timing cache {path} was written by another TensorRT version (or is damaged); starting a new one, "
            f"which replaces it after the build")
    elif cache is not None and not config.set_timing_cache(cache, False):
        log(f"timing cache {path} was made on a GPU with other properties; starting a new one, which replaces it "
            f"after the build")
        cache = None
    elif cache is not None:
        log(f"timing cache: loaded {path} ({len(blob) / 1e6:.1f} MB)")
        return cache
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise StsError("TensorRT could not create an empty timing cache (see its log above)")
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
    trt = discovery.require_tensorrt()
    log = progress or _stderr
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    cache_path = Path(timing_cache_path) if timing_cache_path else None
    if not onnx_path.exists():
        raise StsError(f"ONNX file not found: {onnx_path}")
    t0 = time.monotonic()

    logger = trt_logger(trt, verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    log(f"parsing {onnx_path.name}")
    parser = _parse_onnx(trt, network, logger, onnx_path)  # owns the weights: keep it alive until the build
    got, counts, io = network_precision(network, trt)
    if precision is not None and got is not None and got != precision:
        raise StsError(f"{onnx_path.name} is a {got} graph, so its strongly typed engine would be {got}, not "
                       f"{precision}: re-export the ONNX graphs with --dtype {precision}")
    log(f"strongly typed network: {got or 'no float'} weights"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))} elements)" if counts else ""))

    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        log(f"workspace pool limit: {workspace_bytes / 1024**3:.2f} GiB")
    else:  # NvInfer.h, MemoryPoolType::kWORKSPACE: "This defaults to max device memory."
        log("workspace pool: TensorRT's default limit, the device's total memory (--workspace-gb sets one)")
    if hasattr(trt.BuilderFlag, "TF32"):  # float32 layers really run in float32
        config.clear_flag(trt.BuilderFlag.TF32)
    _add_profiles(trt, builder, config, network, profiles or [], onnx_path.stem, logger)
    _load_timing_cache(config, cache_path, log)
    monitor = None
    if hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
        monitor = _make_monitor(trt, log)
        config.progress_monitor = monitor
    else:
        log("building (no progress monitor in this TensorRT)")

    since = len(logger.errors)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:  # NvInfer.h buildSerializedNetwork: nullptr on failure, the reason in the log
        why = logger.why(since) or "TensorRT logged no error; rerun with verbose=True"
        raise StsError(f"TensorRT failed to build {onnx_path.name}: {why}")
    build_s = time.monotonic() - t0
    del parser
    if cache_path is not None:
        _atomic_write(cache_path, config.get_timing_cache().serialize())
    log(f"writing {engine_path}")
    size = _atomic_write(engine_path, serialized)
    del monitor
    dev = discovery.device_info()
    return {
        "engine": str(engine_path), "onnx": str(onnx_path), "trt_version": trt.__version__,
        "gpu": dev["gpu"], "compute_capability": dev["compute_capability"], "precision": got,
        "strongly_typed": True, "float_weights": counts, "io_dtypes": io,
        "profiles": [{k: [list(s) for s in v] for k, v in p.items() if k != VALUES_KEY} for p in profiles or []],
        "opt_level": int(opt_level), "workspace_bytes": workspace_bytes,
        "timing_cache": str(cache_path) if cache_path else None, "build_seconds": round(build_s, 2),
        "size_bytes": size,
    }
