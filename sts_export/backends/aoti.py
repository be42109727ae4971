"""The AOTInductor backend: the `<graph>.pt2` packages of an export directory (torch tensors in and out), and
whether packages built elsewhere run here (`check_packages`; building them is `sts_export.export.aoti`).

KV caches stay torch tensors on the packages' device between steps (the graphs concatenate past + new, as
the torch backend's). Packages load lazily, each once. The Stage 1 custom ops of image-dependent N are
called back from the packages into their registered eager kernels, so `sts_export.pruning.loop` is imported
here. transformers is never imported on this path.
"""
from __future__ import annotations

import json
import platform
import zipfile
from pathlib import Path
from typing import Any

import torch

from sts_export.artifact.plan import Plan
from sts_export.backends.torch import TorchTensors
from sts_export.errors import StsError

_X86_ISA_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}  # torch.backends.cpu.get_cpu_capability() names


def _cpu_isa() -> str:
    return torch.backends.cpu.get_cpu_capability()


def _capability(device: str) -> str | None:
    if device != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def package_metadata(path: Path) -> dict[str, str]:
    """AOTInductor's own record of what a package was compiled for (AOTI_DEVICE_KEY, AOTI_COMPUTE_CAPABILITY,
    AOTI_MACHINE, AOTI_CPU_ISA), read from the package file."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("wrapper_metadata.json"))
            return json.loads(z.read(name))
    except (OSError, zipfile.BadZipFile, StopIteration, json.JSONDecodeError):
        raise StsError(f"{path} is not a readable AOTInductor package; copy it again or rebuild it") from None


def check_packages(export_dir: Path, manifest: dict[str, Any], device: str = "auto") -> str:
    """The device to run an export's packages on; one line when they were built by another torch, for another
    device, GPU generation or CPU. `device`: auto (the packages' own), cpu or cuda."""
    rec = manifest.get("aoti")
    if not isinstance(rec, dict) or not all("aoti" in g for g in manifest.get("graphs", {}).values()):
        raise StsError(f"{export_dir} holds no AOTInductor packages; build them with export.py --target aoti")
    rebuild = f"rebuild them on this machine: export.py --target aoti --aoti-device {{d}} --out {export_dir} --force"
    built = rec.get("device")
    if rec.get("torch_version") != torch.__version__:
        raise StsError(f"{export_dir}: the AOTInductor packages were built by torch {rec.get('torch_version')}, this is "
                       f"torch {torch.__version__} (packages run only under the torch that built them); "
                       + rebuild.format(d=built))
    want = built if device == "auto" else device
    if want != built:
        raise StsError(f"{export_dir}: the AOTInductor packages were built for {built}, not {want}; "
                       + rebuild.format(d=want))
    if built == "cuda":
        if not torch.cuda.is_available():
            raise StsError(f"{export_dir}: the AOTInductor packages were built for cuda and torch sees no GPU here; "
                           + rebuild.format(d="cpu"))
        cc = _capability("cuda")
        if rec.get("compute_capability") and cc != rec["compute_capability"]:
            raise StsError(f"{export_dir}: the AOTInductor packages were built for compute capability "
                           f"{rec['compute_capability']}, this GPU is {cc}; " + rebuild.format(d="cuda"))
    elif built != "cpu":
        raise StsError(f"{export_dir}: AOTInductor packages for device '{built}' cannot run here; " + rebuild.format(d="cpu"))
    if rec.get("machine") and rec["machine"] != platform.machine():
        raise StsError(f"{export_dir}: the AOTInductor packages were built on {rec['machine']}, this is "
                       f"{platform.machine()}; " + rebuild.format(d=built))
    isa, here = rec.get("cpu_isa"), _cpu_isa()
    if built == "cpu" and _X86_ISA_RANK.get(isa or "", 0) > _X86_ISA_RANK.get(here, 0):
        raise StsError(f"{export_dir}: the AOTInductor packages use {isa} instructions this CPU lacks ({here}); "
                       + rebuild.format(d="cpu"))
    return built



class AotiBackend(TorchTensors):
    """Runs the AOTInductor packages of an export directory on the device they were built for."""

    name = "aoti"

    def __init__(self, export_dir: Path, manifest: dict[str, Any], plan: Plan, device: str = "auto") -> None:
        import sts_export.pruning.loop  # noqa: F401 - registers sts::potential_energy_picks / divprune_picks

        self.dir, self.manifest, self.plan = Path(export_dir), manifest, plan
        self.device = torch.device(check_packages(self.dir, manifest, device))  # one line on a foreign package
        self.models: dict[str, Any] = {}

    def model(self, graph: str) -> Any:
        if graph not in self.models:
            path = self.dir / self.manifest["graphs"][graph]["aoti"]["package"]
            index = (self.device.index or 0) if self.device.type == "cuda" else -1
            self.models[graph] = torch._inductor.aoti_load_package(str(path), device_index=index)
        return self.models[graph]

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        inputs, outputs = self.plan.io(graph)
        with torch.inference_mode():
            outs = self.model(graph)(*[feeds[n] for n in inputs])
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        return dict(zip(outputs, outs))
