"""Field check for users who have TensorRT: `sts selftest`.

Builds the tiny models' engines for every family (tiny-llava, tiny-llava-gqa, tiny-llava-next, tiny-qwen2.5-vl,
tiny-qwen3-vl; STS at a budget that runs both stages; fp32 and fp16) on this machine's TensorRT and GPU with the
package's own export
and build (`export.onnx.export`, `engines.build_engines`: the static check, the memory estimate, the profiles, the
strongly typed build), runs each engine set and ONNX Runtime (CPU, the same portable graphs) on the same feeds, and
prints ONE report to paste into an issue: TensorRT version, GPU, compute capability, driver and CUDA, then per
family and dtype the build (ok, seconds) and the parity figures -- greedy tokens equal, Stage 1 picks (keep_pre)
and Stage 2 picks (keep_post) shared, first-token logits' max |difference| against the recipe's tolerance -- and a
verdict: PASS (fp32: tokens and picks identical, logits within tolerance; fp16: what a reduced-precision export
promises, docs/design.md: picks that differ at near-ties still agree to validation's floors, logits within tolerance
where the picks are the same), DIFFERS (it ran; some figure is off: the report shows which), FAIL (export, build or run failed: the reason follows the table). bf16 is left out: ONNX Runtime's CPU
provider has no bf16 kernels, so there is nothing here to compare a bf16 engine with.

The name says what it is: a self-test of this install (TensorRT, GPU, driver) with this package, the thing a bug
report needs first; `sts check` is the static check, which needs no TensorRT.

Exports need torch and transformers. A Jetson that has neither makes them elsewhere:
    host:    sts selftest --export-only --work tiny-exports
    device:  sts selftest --exports-dir tiny-exports
Engines are always built in copies under --work, never in a given export directory.

Exit status: 0 when every row is PASS, 1 when a row DIFFERS or FAILs, 2 when it cannot start (no TensorRT: one
line). On a stand-in of the TensorRT API (tests) the report's second line says so: those engines are ONNX Runtime.
"""
from __future__ import annotations

import gc
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sts_export.errors import StsError

FAMILIES = {  # family -> (method, budget): STS with both stages, the budgets test_export.py exports
    "tiny-llava": ("sts", 64), "tiny-llava-gqa": ("sts", 32), "tiny-llava-next": ("sts", 320),
    "tiny-qwen2.5-vl": ("sts", "20%"), "tiny-qwen3-vl": ("sts", "20%")}
DTYPES = ("fp32", "fp16")
PROMPT = "What is shown in this image?"
REPORT_START = "=== sts-export TensorRT self-test"
REPORT_END = "=== end of report"


@dataclass
class Row:
    family: str
    dtype: str
    build: str = "-"  # "ok 12.3 s" | "failed" | "-"
    tokens: str = "-"  # "16/16": equal greedy tokens before the first difference / generated
    keep_pre: str = "-"  # "64/64": Stage 1 picks both kept / kept
    keep_post: str = "-"  # "21/21" (Stage 2 picks, as vision-token ids), "none" without Stage 2
    logits: str = "-"  # "3.1e-06 (1e-04)": first-token logits' max |difference| (tolerance)
    verdict: str = "FAIL"
    note: str = ""  # why it failed, one line


def _image(seed: int = 0, w: int = 500, h: int = 400) -> Any:
    """A smooth random picture (blocks + noise: nearby patches alike, as in photos), the same on every machine."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = Image.fromarray(rng.integers(0, 256, (8, 10, 3)).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    arr = np.asarray(blocks).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _first_line(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace").splitlines()[0].strip()
    except (OSError, IndexError):
        return ""


def platform_info() -> dict[str, str]:
    """What a TensorRT bug report needs about this machine; 'unknown' for what cannot be read."""
    from sts_export.backends.tensorrt import discovery

    trt = discovery._import_trt()
    dev = discovery.device_info()
    info = {"tensorrt": str(getattr(trt, "__version__", "not installed")), "gpu": str(dev.get("gpu") or "none visible"),
            "compute": str(dev.get("compute_capability") or "unknown"), "driver": "unknown", "cuda": "unknown",
            "memory": "unknown"}
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d[\d.]*)", _first_line("/proc/driver/nvidia/version"))
    if m:
        info["driver"] = m.group(1)
    torch = discovery._torch_cuda()
    if torch is not None:
        cuda = getattr(getattr(torch, "version", None), "cuda", None)
        info["cuda"] = f"{cuda} (torch)" if cuda else "unknown"
        try:
            info["memory"] = f"{torch.cuda.get_device_properties(0).total_memory / 1024**3:.1f} GiB"
        except Exception:  # noqa: BLE001 - stand-ins and odd builds: leave unknown
            pass
    cudart = discovery._cudart()
    if cudart is not None:
        try:
            err, v = cudart.cudaRuntimeGetVersion()
            if int(getattr(err, "value", err)) == 0 and info["cuda"] == "unknown":
                info["cuda"] = f"{v // 1000}.{v % 1000 // 10} (cudart)"
            err, v = cudart.cudaDriverGetVersion()
            if int(getattr(err, "value", err)) == 0:
                info["driver"] += f", CUDA driver API {v // 1000}.{v % 1000 // 10}"
        except Exception:  # noqa: BLE001 - no driver: leave what we have
            pass
    l4t = re.match(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", _first_line("/etc/nv_tegra_release"))
    info["l4t"] = f"R{l4t.group(1)}.{l4t.group(2)}" if l4t else ""
    return info


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("onnxruntime", "onnx", "torch"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} -")
    return " | ".join(parts)


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, StsError) else f"{type(e).__name__}: {e}"
    text = " ".join(text.split())
    return text if len(text) <= 400 else text[:397] + "..."


def _shared(got: np.ndarray, want: np.ndarray) -> str:
    """'64/64': tokens both kept / kept (as sets of image token ids, batch row 0)."""
    a, b = set(np.asarray(got).reshape(-1).tolist()), set(np.asarray(want).reshape(-1).tolist())
    return f"{len(a & b)}/{len(b)}"


def compare(ref: Any, got: Any, tol: float, dtype: str = "fp32") -> tuple[dict[str, str], bool]:
    """Figures of one TensorRT generation against ONNX Runtime's (batch 1), through the project's comparator, and
    whether they agree as the export promises: fp32, identical tokens and picks and logits within tolerance; fp16,
    the picks may differ at near-ties (neither side computes exactly) but agree to validation's AGREEMENT floors,
    and the logits are held to the tolerance where the picks are the same."""
    from sts_export.export.compare import compare_generations, kept_tokens
    from sts_export.export.precision import AGREEMENT

    row = compare_generations(ref, got, tol, dtype)
    n = ref.tokens.shape[1]
    div = row["first_divergence"]
    fig = {"tokens": f"{n if div is None else div}/{n}", "keep_pre": _shared(got.keep_pre, ref.keep_pre),
           "keep_post": "none" if ref.keep_post is None else _shared(kept_tokens(got.keep_pre, got.keep_post),
                                                                     kept_tokens(ref.keep_pre, ref.keep_post)),
           "logits": f"{row['first_logits'].get('max_abs', float('nan')):.1e} ({row['first_logits']['tol']:.0e})"}
    same = row["keep_pre_identical"] and row["keep_post_identical"]
    if dtype == "fp32" or same:
        ok = same and row["first_logits"]["ok"] and (row["tokens_identical"] or dtype != "fp32")
    else:
        ok = (row["keep_pre_overlap"] >= AGREEMENT["keep_pre_overlap"]
              and row.get("keep_post_overlap", 1.0) >= AGREEMENT["keep_post_overlap"])
    return fig, bool(ok)


def _export(family: str, dtype: str, out: Path, log: Callable[[str], None]) -> Path:
    try:
        from sts_export.export.onnx import export
    except ImportError as e:
        raise StsError(f"cannot export here ({e}): make the exports on a host with torch (--export-only --work DIR) "
                       f"and pass --exports-dir DIR") from None
    method, budget = FAMILIES[family]
    return export(family, budget=budget, method=method, dtype=dtype, out=out, validate=False, target="trt",
                  progress=log)


def run_one(family: str, dtype: str, src: Path | None, work: Path, max_new_tokens: int,
            log: Callable[[str], None]) -> Row:
    """Export (or copy `src`), build the engines, run them and ONNX Runtime on the same feeds; one report row."""
    from sts_export.export.tensorrt.engines import build_engines
    from sts_export.artifact.manifest import manifest_recipe, read_manifest
    from sts_export.pipeline import Pipeline

    row = Row(family, dtype)
    d = work / f"{family}-{dtype}"
    try:
        if src is not None:
            shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.engine", "timing.cache"), dirs_exist_ok=True)
        elif not (d / "manifest.json").is_file():
            _export(family, dtype, d, log)
    except Exception as e:  # noqa: BLE001 - one row per failure, the report goes on
        row.build, row.note = "no export", f"export: {_one_line(e)}"
        return row
    t0 = time.perf_counter()
    try:
        build_engines(d, max_batch=1, progress=log)
    except Exception as e:  # noqa: BLE001
        row.build, row.note = "failed", _one_line(e)
        return row
    row.build = f"ok {time.perf_counter() - t0:.1f} s"
    ort_pipe = trt_pipe = None
    try:
        tol = float(getattr(manifest_recipe(read_manifest(d)).tolerance, dtype))
        img = _image()
        ort_pipe = Pipeline.from_export(d, backend="ort", device="cpu", form="portable")
        ref = ort_pipe.generate(img, PROMPT, max_new_tokens=max_new_tokens)
        trt_pipe = Pipeline.from_export(d, backend="trt")
        got = trt_pipe.generate(img, PROMPT, max_new_tokens=max_new_tokens)
        fig, ok = compare(ref, got, tol, dtype)
        row.tokens, row.keep_pre, row.keep_post, row.logits = fig["tokens"], fig["keep_pre"], fig["keep_post"], fig["logits"]
        row.verdict, row.note = ("PASS", "") if ok else ("DIFFERS", "")
    except Exception as e:  # noqa: BLE001
        row.verdict, row.note = "FAIL", f"run: {_one_line(e)}"
    finally:
        del ort_pipe, trt_pipe
        gc.collect()
    return row


def report(rows: list[Row], info: dict[str, str], stand_in: str | None) -> str:
    """The one block a user pastes into an issue."""
    from sts_export import __version__

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"{REPORT_START} (sts-export {__version__}, {when}) ==="]
    if stand_in:
        lines.append(f"STAND-IN, not a TensorRT result: {stand_in}")
    l4t = f" | L4T {info['l4t']}" if info.get("l4t") else ""
    lines.append(f"TensorRT {info['tensorrt']} | GPU {info['gpu']} (compute {info['compute']}, {info['memory']}) | "
                 f"driver {info['driver']} | CUDA {info['cuda']}{l4t}")
    lines.append(f"{_versions()} | Python {platform.python_version()} | {platform.system()} {platform.machine()} | "
                 f"reference: ONNX Runtime CPU, portable graphs")
    head = ("family", "dtype", "build", "tokens", "keep_pre", "keep_post", "logits max|d| (tol)", "verdict")
    table = [head] + [(r.family, r.dtype, r.build, r.tokens, r.keep_pre, r.keep_post, r.logits, r.verdict) for r in rows]
    widths = [max(len(str(t[i])) for t in table) for i in range(len(head))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(t, widths)).rstrip() for t in table]
    counts = {v: sum(r.verdict == v for r in rows) for v in ("PASS", "DIFFERS", "FAIL")}
    lines.append(f"summary: {counts['PASS']} PASS, {counts['DIFFERS']} DIFFERS, {counts['FAIL']} FAIL")
    lines += [f"{r.family} {r.dtype}: {r.note}" for r in rows if r.note]
    lines.append(REPORT_END)
    return "\n".join(lines)


def _given(exports: tuple[str, ...]) -> dict[tuple[str, str], Path]:
    out = {}
    for item in exports:
        m = re.fullmatch(r"([\w.\-]+):(fp32|fp16)=(.+)", item)
        if not m or m.group(1) not in FAMILIES:
            raise StsError(f"--use-export '{item}': expected FAMILY:DTYPE=DIR with FAMILY one of {', '.join(FAMILIES)} "
                           f"and DTYPE fp32 or fp16")
        if not (Path(m.group(3)) / "manifest.json").is_file():
            raise StsError(f"--use-export '{item}': {m.group(3)} is not an export directory (no manifest.json)")
        out[m.group(1), m.group(2)] = Path(m.group(3))
    return out


def _split(text: str, allowed: tuple[str, ...] | dict, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise StsError(f"--{what} {text!r}: choose from {', '.join(allowed)}")
    return items


def selftest(families: str, dtypes: str, work: Path | None, exports: tuple[str, ...], exports_dir: Path | None,
             export_only: bool, max_new_tokens: int, report_file: Path | None) -> int:
    """Build the tiny models' TensorRT engines here and compare them with ONNX Runtime; print one report (stdout) and
    return the exit status (0: every row PASS, 1: a row DIFFERS or FAILs). `sts selftest` is its command."""
    from sts_export.backends.tensorrt import discovery

    combos = [(f, d) for f in _split(families, FAMILIES, "families") for d in _split(dtypes, DTYPES, "dtypes")]
    given = _given(exports)
    if exports_dir is not None:
        given.update({(f, d): exports_dir / f"{f}-{d}" for f, d in combos
                      if (exports_dir / f"{f}-{d}" / "manifest.json").is_file() and (f, d) not in given})
        if not given:
            raise StsError(f"--exports-dir {exports_dir} holds no FAMILY-DTYPE export (make them with --export-only)")
    if exports or exports_dir is not None:
        combos = list(given)
    if export_only and work is None:
        raise StsError("--export-only needs --work DIR (where the exports go, to copy to the device)")
    trt = None if export_only else discovery.require_tensorrt()  # one line when TensorRT is missing
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="sts-trt-selftest-")) if own else work
    work.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(f"[selftest] {s}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        if export_only:
            for f, d in combos:
                out = work / f"{f}-{d}"
                if not (out / "manifest.json").is_file():
                    log(f"exporting {f} {d} -> {out}")
                    _export(f, d, out, log)
            print(f"exports in {work}: copy it to the device and run "
                  f"`sts selftest --exports-dir {work.name}`")
            return 0
        rows = []
        for f, d in combos:
            log(f"{f} {d}: export, build, run")
            rows.append(run_one(f, d, given.get((f, d)), work, max_new_tokens, log))
        text = report(rows, platform_info(), getattr(trt, "__stand_in__", None))
        print(text)
        if report_file is not None:
            report_file.write_text(text + "\n")
        return 0 if all(r.verdict == "PASS" for r in rows) else 1
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
