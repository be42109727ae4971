"""Finding TensorRT and the GPU on this machine, and whether engines built elsewhere can run here: shared by the
engine runtime (`runtime.py`) and the engine build (`sts_export.export.tensorrt.build`).

Importable without TensorRT, torch or cuda-python: each is imported inside the function that needs it.
"""
from __future__ import annotations

import re
import sys
from typing import Any

from sts_export.errors import StsError

MIN_TRT = (10, 3)
_TRT_CACHE: dict[str, Any] = {}
MAX_MAJOR = 11  # the newest TensorRT major whose API this module was written against
_INSTALL_HINT = (
    "TensorRT is not installed (Python package `tensorrt` is needed for --target trt): on a Jetson it ships with "
    "JetPack (6.1/6.2: TensorRT 10.3; 7.2: TensorRT 10.16; 7.2.2+: TensorRT 11.4.1+, python3-libnvinfer), on x86-64 "
    "with an NVIDIA driver run `pip install tensorrt` (TensorRT 11.x wheels); see docs/jetson.md; "
    "or export with --target onnx"
)


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


def _stderr(msg: str) -> None:
    print(f"[trt] {msg}", file=sys.stderr, flush=True)


def trt_logger(trt: Any, verbose: bool = False) -> Any:
    """A `trt.ILogger` that prints what TensorRT's own `trt.Logger` would (WARNING and worse; everything with
    `verbose`) to stderr and keeps the error messages, so a failed call can say why in one line (`why`).
    Subclassing ILogger is how the Python API takes a custom logger (pyCore.cpp's PyLogger trampoline; Polygraphy's
    backend/trt/util.py does the same)."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.shown = int(trt.ILogger.VERBOSE if verbose else trt.ILogger.WARNING)

        def log(self, severity: Any, msg: str) -> None:  # called by TensorRT, maybe from its threads
            text = " ".join(str(msg).split())
            if int(severity) <= int(trt.ILogger.ERROR):
                self.errors.append(text)
            if int(severity) <= self.shown:
                print(f"[TensorRT] {_enum_name(severity)}: {text}", file=sys.stderr, flush=True)

        def why(self, since: int = 0) -> str:
            """TensorRT's first error message after `since` (TensorRT logs the cause first, then the failed
            assertion it led to), with how many followed; '' when it logged none."""
            errs = self.errors[since:]
            if not errs:
                return ""
            first = errs[0] if len(errs[0]) <= 300 else errs[0][:297] + "..."
            return first + (f" (+{len(errs) - 1} more TensorRT error{'s' * (len(errs) > 2)})" if len(errs) > 1 else "")

    return _Logger()



def _enum_name(v: Any) -> str:
    return getattr(v, "name", str(v).rsplit(".", 1)[-1])
