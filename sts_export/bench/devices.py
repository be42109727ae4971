"""Roofline profiles of accelerators (data/devices.yaml, vendor datasheets; `--roofline NAME`) or of this machine
(`--roofline host`, measured by timing.measure_host), and the roofline bound of a phase's FLOPs and bytes on one:
max(flops / peak, bytes / bandwidth). The FLOPs and bytes themselves are cost.py's."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from sts_export.errors import StsError
from sts_export.recipe import from_dict, read_yaml

DEVICES_PATH = Path(os.environ.get("STS_DEVICES", Path(__file__).resolve().parent / "data" / "devices.yaml"))


@dataclass(frozen=True)
class Device:
    """Peak figures of one accelerator (vendor datasheets; see data/devices.yaml)."""

    name: str
    title: str
    fp16_tflops: float  # dense FP16 tensor-core throughput (no 2:4 sparsity); also used for bf16
    fp32_tflops: float  # FP32 on CUDA cores (non-tensor)
    bandwidth_gbs: float  # peak DRAM bandwidth, GB/s (1e9 bytes/s)
    memory_gb: float  # device memory (shared with the CPU on Jetson)
    source: str  # vendor document title/URL the figures come from
    system_reserve_gb: float = 0.0  # what the OS keeps of memory_gb (Jetson: shared with Linux), for memory_fit


def load_devices(path: str | os.PathLike | None = None) -> dict[str, Device]:
    """Device profiles from data/devices.yaml (or `path`): {name: Device}. Unknown keys are errors."""
    path = Path(DEVICES_PATH if path is None else path)
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise StsError(f"{path.name}: expected a mapping of device name -> profile")
    devices: dict[str, Device] = {}
    for name, spec in data.items():
        where = f"{path.name}:{name}"
        if isinstance(spec, dict) and "name" in spec:
            raise StsError(f"{where}: 'name' comes from the mapping key, not a field")
        dev = from_dict(Device, {"name": str(name), **spec} if isinstance(spec, dict) else spec, where)
        for key in ("fp16_tflops", "fp32_tflops", "bandwidth_gbs", "memory_gb"):
            value = getattr(dev, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise StsError(f"{where}.{key} must be a positive number, got {value!r}")
        if not str(dev.source).strip():
            raise StsError(f"{where}.source must cite the vendor document")
        devices[str(name)] = dev
    return devices


HOST = "host"  # --roofline host: this machine, measured at the start of the run (timing.measure_host)
_MEASURED: dict[str, Device] = {}


def register_device(dev: Device) -> None:
    """Make a measured profile (`--roofline host`) known to get_device for the rest of the process."""
    _MEASURED[dev.name] = dev


def get_device(name: str, path: str | os.PathLike | None = None) -> Device:
    """One device profile by name; an unknown name is an error that lists the valid ones."""
    if name in _MEASURED:
        return _MEASURED[name]
    devices = load_devices(path)
    if name not in devices:
        raise StsError(f"unknown device '{name}'; choose one of {', '.join(devices)}, or {HOST} (this machine, "
                       "measured by the run)")
    return devices[name]


def roofline_terms(costs: Mapping[str, Any], device: Device | str) -> dict[str, dict[str, Any]]:
    """Per phase of `costs` (cost.PhaseCost: flops, fp32_flops, bytes, dtype): compute_ms, memory_ms, bound_ms = max
    of the two, and which one binds."""
    dev = device if isinstance(device, Device) else get_device(device)
    out: dict[str, dict[str, Any]] = {}
    for phase, c in costs.items():
        peak = dev.fp32_tflops if c.dtype == "fp32" else dev.fp16_tflops
        compute_s = (c.flops - c.fp32_flops) / (peak * 1e12) + c.fp32_flops / (dev.fp32_tflops * 1e12)
        memory_s = c.bytes / (dev.bandwidth_gbs * 1e9)
        out[phase] = {
            "compute_ms": compute_s * 1e3,
            "memory_ms": memory_s * 1e3,
            "bound_ms": max(compute_s, memory_s) * 1e3,
            "bound": "compute" if compute_s >= memory_s else "memory",
        }
    return out


def roofline(costs: Mapping[str, Any], device: Device | str) -> dict[str, float]:
    """Per-phase lower bound in ms: max(flops / peak, bytes / bandwidth) on `device` (a Device or a name)."""
    return {phase: t["bound_ms"] for phase, t in roofline_terms(costs, device).items()}
