"""Memory: what an export or an engine build will need against what this machine has, and the
temporary directories a killed export leaves behind.

Estimates (bytes; all resident host memory, checked before any weights are loaded):

    export      base + weights at --dtype + the transient of exporting the largest graph
                (torch.onnx's program + optimiser + serialisation of that graph's weights)
    validation  torch reference: base + weights + working set, then the torch weights are freed and
                one ONNX Runtime session is alive at a time: base + the largest graph's session
                (the CPU provider keeps weights as float32: fp16 initialisers are upcast at load)
    engines     per graph, one at a time: the parser's copy of the ONNX weights + the serialised
                engine + TensorRT/CUDA's host baseline; on unified memory (Jetson) also the engine's
                device weights and the builder's workspace. TensorRT's default workspace pool limit is
                the device's whole memory (NvInfer.h, MemoryPoolType::kWORKSPACE: "defaults to max
                device memory"): GPU memory on a discrete GPU, outside this host estimate; on unified
                memory it is the host's memory, which no estimate can grant, so there the build sets a
                limit itself when --workspace-gb is absent (`check_engine_memory`) and says so

The constants are calibrated against `/usr/bin/time -v` runs on the development machine (see
docs/results.md). `STS_FAKE_AVAILABLE_MEMORY=12G` (or monkeypatching `available_memory`)
fakes what the machine has, for tests.

Temporary directories: an export writes into `<parent>/.<name>.tmp-XXXXXXXX` with an owner record
(`OWNER_FILE`: tool, pid, host, process start time). A later export into the same parent removes
such directories only when the record names this host and a process that no longer runs.
"""
from __future__ import annotations

import gc
import json
import warnings
import os
import re
import resource
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sts_export.artifact.params import graph_params, total_params
from sts_export.errors import StsError
from sts_export.pruning.budget import export_split

GB = 1e9  # reports use decimal GB, like /usr/bin/time's kbytes * 1e3 and `free -g`'s rough figures
GiB = 1024**3
MiB = 1024**2
FAKE_ENV = "STS_FAKE_AVAILABLE_MEMORY"
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "float32": 4, "float16": 2, "bfloat16": 2}

# ---- calibration (development machine, torch 2.13 CPU, onnxruntime 1.32; docs/results.md) ----
BASE_BYTES = 450 * MiB  # python + torch + onnx imported, the modules' own overhead
LOAD_TEMP_BYTES = 4  # per parameter of the largest tensor: random init draws float32, then casts
# torch.onnx transient, as a fraction of the largest graph's weight bytes. Measured: llava-1.5-7b fp16
# (random weights) export + validation peaked at 15.41 GB (estimate 16.0); a 2.0 B-parameter synthetic
# at 5.0 GB (estimate 5.0); in both the peak is within 0.1 GB of the weight-loading phase's.
EXPORT_GRAPH_FACTOR = 0.20
EXPORT_GRAPH_EXTRA = 64 * MiB
ORT_CPU_WEIGHT_BYTES = 4  # bytes per parameter in an ONNX Runtime CPU session (fp16 is upcast to fp32)
ORT_SESSION_FACTOR = 1.10  # ... times this (prepacked/aligned copies, activations of validation's prompts)
ORT_BASE_EXTRA = 400 * MiB  # the onnxruntime library and its arena, once a session was loaded
VALIDATION_TOKENS = 80  # text tokens + decode steps around the image in validation's prompts (upper bound)
# TensorRT: not measured here (no TensorRT/GPU on the development machine) -- documented assumptions
TRT_HOST_BASE = 1536 * MiB  # CUDA context + TensorRT libraries on the host side
# unified memory, no --workspace-gb: the build's own workspace limit is what the rest of the build leaves of the
# available memory, less this share of it kept free, and at least TRT_MIN_WORKSPACE (else the build is refused)
WORKSPACE_KEEP_FREE = 0.10
TRT_MIN_WORKSPACE = 1 * GiB


def fmt(n: float) -> str:
    return f"{n / GB:.1f} GB"


def parse_bytes(text: str) -> int:
    """'12G', '12GB', '1.5GiB', '800M', '123456' -> bytes (K/M/G/T are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise StsError(f"{FAKE_ENV}={text!r}: expected a size such as 12G, 800M or a byte count")
    scale = {"": 1, "k": 1024, "m": MiB, "g": GiB, "t": 1024**4}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


# ---------------------------------------------------------------------------------------------------------
# What this machine has
# ---------------------------------------------------------------------------------------------------------

def _meminfo_available() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:  # Linux without psutil (a Jetson with the minimal pip set)
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) -> None


def _cgroup_available() -> int | None:
    """Headroom under this process's cgroup memory limit (v2, or v1), page cache counted as free."""
    best = None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    root = Path("/sys/fs/cgroup")
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":  # v2: walk from our cgroup up to the root
            d = root / parts[2].lstrip("/")
            while True:
                limit, used = _read_int(d / "memory.max"), _read_int(d / "memory.current")
                if limit is not None and used is not None:
                    free = limit - used + _stat_field(d / "memory.stat", "inactive_file")
                    best = free if best is None else min(best, free)
                if d == root or root not in d.parents:
                    break
                d = d.parent
        elif "memory" in parts[1].split(","):  # v1
            d = root / "memory"
            limit, used = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
            if limit is not None and used is not None and limit < 1 << 60:
                free = limit - used + _stat_field(d / "memory.stat", "total_inactive_file")
                best = free if best is None else min(best, free)
    return best


def _stat_field(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == name and v.strip().isdigit():
                return int(v)
    except OSError:
        pass
    return 0


def _rlimit_available() -> int | None:
    """Headroom under RLIMIT_AS (address space, e.g. `prlimit --as`), or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        vm = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        vm = 0
    return max(soft - vm, 0)


def available_memory() -> tuple[int, str]:
    """(bytes this process may still use, where that figure comes from): the smallest of the host's
    available memory, the cgroup limit's headroom and RLIMIT_AS's headroom. STS_FAKE_AVAILABLE_MEMORY wins."""
    fake = os.environ.get(FAKE_ENV)
    if fake:
        return parse_bytes(fake), f"{FAKE_ENV}"
    found = [(v, what) for v, what in ((_meminfo_available(), "available host memory"),
                                       (_cgroup_available(), "cgroup memory limit headroom"),
                                       (_rlimit_available(), "RLIMIT_AS headroom (ulimit -v / prlimit --as)"))
             if v is not None]
    if not found:
        return 1 << 62, "unknown (no limit found)"
    return min(found)


def rss() -> int:
    """Resident set size of this process now."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """Largest resident set size of this process so far (what /usr/bin/time -v reports at exit)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def forget_onnx_rewriter_state() -> int:
    """onnxscript's module-level rewrite rules keep their last match: the last exported graph's ONNX IR,
    whose initialisers wrap the torch parameters, stays reachable (so those weights cannot be freed).
    Forget it (each match() sets these again); returns how many matchers were reset."""
    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:
        return 0
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some lazy torch modules warns about deprecations
        matchers = [obj for obj in gc.get_objects() if isinstance(obj, PatternMatcher)]
    for obj in matchers:
        for attr in ("_match", "_graph", "_current_node", "_tracer"):
            if obj.__dict__.get(attr) is not None:
                obj.__dict__[attr] = None
                n += 1
    return n


# ---------------------------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Estimate:
    """Peak resident bytes of a job, its parts (label -> bytes) and the phase that sets the peak."""

    what: str
    need: int
    parts: dict[str, int] = field(default_factory=dict)
    peak_phase: str = ""
    workspace_bytes: int | None = None  # engine builds: the workspace limit the build sets (None: TensorRT's default)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {fmt(v)}" for k, v in self.parts.items())
        return f"~{fmt(self.need)} at {self.peak_phase} ({parts})"


def export_estimate(recipe: Any, method: str, k_pre: int, dtype: str, validate: bool) -> Estimate:
    """Peak resident memory of `export()` (and its validation) for this configuration."""
    b = DTYPE_BYTES[dtype]
    sizes = graph_params(recipe, method)
    big = max(sizes, key=sizes.get)
    weights = total_params(recipe) * b
    t = recipe.text
    largest_tensor = t.vocab_size * t.hidden_size  # embed_tokens / lm_head
    load_tmp = largest_tensor * (LOAD_TEMP_BYTES + (b if b != LOAD_TEMP_BYTES else 0))
    graph_tmp = int(EXPORT_GRAPH_FACTOR * sizes[big] * b) + EXPORT_GRAPH_EXTRA
    phases = {"loading the weights": BASE_BYTES + weights + load_tmp,
              "exporting the largest graph": BASE_BYTES + weights + graph_tmp}
    parts = {"base": BASE_BYTES, f"weights {dtype}": weights, f"exporting {big}": graph_tmp}
    if validate:
        # KV caches of batch 2 over K + text + decode tokens, held by the loop, the recording and the traces
        kv = 2 * t.num_layers * t.num_kv_heads * t.head_dim * b * 2 * (k_pre + VALIDATION_TOKENS)
        session = int(ORT_SESSION_FACTOR * ORT_CPU_WEIGHT_BYTES * sizes[big]) + ORT_BASE_EXTRA
        phases["validation's torch reference"] = BASE_BYTES + weights + 3 * kv + 64 * MiB
        phases[f"validation's {big} ONNX Runtime session"] = BASE_BYTES + session + kv + 64 * MiB  # traces: no KV
        parts[f"validation: {big} ORT session (after torch weights are freed)"] = session
    phase = max(phases, key=phases.get)
    return Estimate("export" + (" + validation" if validate else ""), phases[phase], parts, phase)


def check_export_memory(recipe: Any, method: str, budget: int | str, dtype: str, validate: bool,
                        progress: Callable[[str], None] = print) -> Estimate:
    """Raise StsError (one line: needed, available, what to do) when the export will not fit; else report."""
    k_pre = export_split(budget, recipe, method)[0]
    est = export_estimate(recipe, method, k_pre, dtype, validate)
    have, source = available_memory()
    progress(f"memory: needs {est.describe()}; {fmt(have)} available ({source})")
    if est.need <= have:
        return est
    fixes = []
    if validate:
        alt = export_estimate(recipe, method, k_pre, dtype, False)
        if alt.need <= have and alt.need < est.need:
            fixes.append(f"--no-validate (needs {fmt(alt.need)})")
    for smaller in ("fp16",) if dtype == "fp32" else ():
        for v in (validate, False) if validate else (False,):
            alt = export_estimate(recipe, method, k_pre, smaller, v)
            if alt.need <= have:
                fixes.append(f"--dtype {smaller}{'' if v else ' --no-validate'} (needs {fmt(alt.need)})")
                break
    more = f"a machine with at least {fmt(est.need)} available"
    if fixes:
        hint = f"use {' or '.join(fixes)}, or {more}"
    else:
        why = []
        if validate:
            alt = export_estimate(recipe, method, k_pre, dtype, False).need
            why.append("--no-validate would not lower the peak" if alt >= est.need else
                       f"--no-validate would still need {fmt(alt)}")
        why += ["fp16 is the smallest --dtype"] if dtype == "fp16" else ["--dtype fp16 would still need more"]
        hint = f"use {more} ({'; '.join(why)})"
    raise StsError(f"not enough memory for this export: it needs {fmt(est.need)} ({est.what}, peak at "
                   f"{est.peak_phase}) but only {fmt(have)} is available ({source}); {hint}")


def engine_estimate(graph_bytes: dict[str, int], onnx_dtype: str, precision: str, workspace_bytes: int | None,
                    unified: bool) -> Estimate:
    """Peak host memory of building the engines one graph at a time (graph_bytes: ONNX weight bytes per graph).
    The workspace counts on unified memory only, and only when given (`check_engine_memory` picks it otherwise)."""
    ratio = DTYPE_BYTES[precision] / DTYPE_BYTES[onnx_dtype]  # engine weights vs ONNX weights
    big = max(graph_bytes, key=graph_bytes.get)
    onnx_w = graph_bytes[big]
    engine_w = int(onnx_w * min(ratio, 1.0))  # fp32 layers pinned in fp16 builds are the small selection ones
    parts = {f"parser's {big} weights": onnx_w, f"serialised {big}.engine": engine_w, "TensorRT/CUDA host": TRT_HOST_BASE}
    if unified:
        parts[f"{big} weights on the GPU (unified memory)"] = engine_w
        if workspace_bytes:
            parts["workspace (--workspace-gb)"] = workspace_bytes
    return Estimate("engine build", sum(parts.values()), parts, f"building {big}.engine",
                    workspace_bytes=workspace_bytes or None)


def is_unified_memory() -> bool:
    """True on Jetson (integrated GPU: device memory is host memory)."""
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        return "jetson" in Path("/proc/device-tree/model").read_text(errors="ignore").lower()
    except OSError:
        return False


def check_engine_memory(onnx_dir: Path, manifest: dict[str, Any], precision: str, workspace_bytes: int | None,
                        progress: Callable[[str], None] = print, unified: bool | None = None) -> Estimate:
    """Raise StsError (one line) when building the engines of `onnx_dir` will not fit in host memory; the Estimate's
    `workspace_bytes` is the workspace limit the build must set (None: TensorRT's default). Prints the estimate and
    the workspace decision, one line each.

    Without --workspace-gb: on a discrete GPU TensorRT's default stands (the device's total memory, which is GPU
    memory, not host memory); on unified memory that default is the whole shared memory, so the build limits the
    workspace to what the rest of the build leaves of the available memory (less WORKSPACE_KEEP_FREE of it), at
    least TRT_MIN_WORKSPACE."""
    sizes = {}
    for name, g in manifest["graphs"].items():
        files = [onnx_dir / g["onnx"]] + ([onnx_dir / g["external_data"]["file"]] if g.get("external_data") else [])
        sizes[name] = sum(f.stat().st_size for f in files if f.exists())
    unified = is_unified_memory() if unified is None else unified
    est = engine_estimate(sizes, manifest["dtype"], precision, workspace_bytes, unified)
    have, source = available_memory()
    if unified and not workspace_bytes:
        left = int(have - est.need - WORKSPACE_KEEP_FREE * have) // MiB * MiB
        ws = max(left, TRT_MIN_WORKSPACE)
        est.parts["workspace (limit set by the build)"] = ws
        est.need += ws
        est.workspace_bytes = ws
    progress(f"memory: engine build needs {est.describe()}; {fmt(have)} available ({source})")
    if est.need > have:
        hint = ("a smaller --workspace-gb (e.g. 1), swap on NVMe, or a device with more memory" if unified
                else "more host memory (or close other programs)")
        raise StsError(f"not enough memory to build the engines: {est.peak_phase} needs {fmt(est.need)} but only "
                       f"{fmt(have)} is available ({source}); use {hint}")
    if unified and not workspace_bytes:
        progress(f"workspace: the build limits TensorRT's workspace pool to {est.workspace_bytes / GiB:.1f} GiB, what "
                 f"the rest of the build leaves of the {fmt(have)} available less {WORKSPACE_KEEP_FREE:.0%} "
                 f"(TensorRT's default is the whole unified memory); --workspace-gb sets another limit")
    elif not workspace_bytes:
        progress("workspace: TensorRT's default pool limit, the GPU's total memory (GPU memory, outside this host "
                 "estimate); --workspace-gb sets a smaller one")
    return est


# ---------------------------------------------------------------------------------------------------------
# Temporary directories of exports (and engine builds)
# ---------------------------------------------------------------------------------------------------------

OWNER_FILE = ".sts-export-owner.json"
TOOL = "sts-export"
TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-[A-Za-z0-9_]{8}$")  # tempfile.mkdtemp(prefix=".<name>.tmp-")


def _start_time(pid: int) -> float | None:
    """Start time of process `pid` (seconds since boot, in clock ticks' resolution), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def owner_record() -> dict[str, Any]:
    return {"tool": TOOL, "pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
            "created": time.time()}


def write_owner(directory: Path) -> None:
    (directory / OWNER_FILE).write_text(json.dumps(owner_record()))


def _alive(pid: int, start: float | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    if start is not None:
        now = _start_time(pid)
        if now is not None and abs(now - start) > 1.0:
            return False  # the pid was reused by a later process
    return True


def owner_status(directory: Path, record: str = OWNER_FILE) -> tuple[str, dict[str, Any] | None]:
    """('dead' | 'alive' | 'foreign' | 'none', record): who owns a temporary directory (per its owner record)."""
    try:
        rec = json.loads((directory / record).read_text())
    except (OSError, ValueError):
        return "none", None
    if not isinstance(rec, dict) or rec.get("tool") != TOOL or not isinstance(rec.get("pid"), int):
        return "none", None
    if rec.get("host") != socket.gethostname():
        return "foreign", rec
    return ("alive" if _alive(rec["pid"], rec.get("start")) else "dead"), rec


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _looks_like_export(d: Path) -> bool:
    try:
        return any(f.name == "manifest.json" or ".onnx" in f.name for f in d.iterdir())
    except OSError:
        return False


def make_tmp_dir(out: Path) -> Path:
    """The temporary sibling directory an export writes into, with this process's owner record."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    write_owner(tmp)
    return tmp


def clean_stale_tmp(parent: Path, progress: Callable[[str], None] = print) -> list[Path]:
    """Remove `.<name>.tmp-XXXXXXXX` directories in `parent` whose owner record names a dead process of
    this host; say so. Anything else (other names, files, symlinks, live or foreign owners, no owner
    record) is left alone; directories of our pattern without a record get a hint, not a deletion."""
    removed: list[Path] = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed
    for d in entries:
        if not TMP_RE.match(d.name) or d.is_symlink() or not d.is_dir():
            continue
        status, rec = owner_status(d)
        if status == "dead":
            size = _du(d)
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
                progress(f"removed stale temporary directory {d} ({fmt(size)}) of an earlier export "
                         f"(pid {rec['pid']}, no longer running)")
        elif status == "none" and _looks_like_export(d):
            progress(f"note: {d} looks like an export's temporary directory but has no owner record (an older "
                     f"sts-export's, maybe still running); left alone -- `rm -rf {d}` if no export is running")
    return removed


ENGINE_TMP_RE = re.compile(r"^\.(?P<name>.+\.engine|timing\.cache)\.[A-Za-z0-9_]{8}\.tmp$")  # build._atomic_write
ENGINE_LOCK = ".sts-engine-build.json"


def claim_engine_dir(onnx_dir: Path, progress: Callable[[str], None] = print) -> Path:
    """Before an engine build: refuse if a live build of this host owns `onnx_dir`; when the previous
    build's record names a dead process, remove the partial files it left (`.<graph>.engine.XXXXXXXX.tmp`);
    then write this process's record (`ENGINE_LOCK`, removed by `release_engine_dir`). Returns its path."""
    lock = onnx_dir / ENGINE_LOCK
    status, rec = owner_status(onnx_dir, ENGINE_LOCK)
    if status == "alive" and rec["pid"] != os.getpid():
        raise StsError(f"another engine build (pid {rec['pid']}) is writing into {onnx_dir}; wait for it to finish")
    for f in sorted(onnx_dir.iterdir()):
        if not (ENGINE_TMP_RE.match(f.name) and f.is_file() and not f.is_symlink()):
            continue
        if status == "dead":
            size = f.stat().st_size
            f.unlink(missing_ok=True)
            progress(f"removed stale partial engine file {f} ({fmt(size)}) of an earlier build "
                     f"(pid {rec['pid']}, no longer running)")
        else:
            progress(f"note: {f} looks like a partial engine file of an earlier build with no record of its owner; "
                     f"left alone -- remove it if no build is running")
    lock.write_text(json.dumps(owner_record()))
    return lock


def release_engine_dir(lock: Path) -> None:
    lock.unlink(missing_ok=True)
