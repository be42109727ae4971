"""The AOTInductor backend: the `<graph>.pt2` packages of an export directory (torch tensors in and out).

KV caches stay torch tensors on the packages' device between steps (the graphs concatenate past + new, as
the torch backend's). Packages load lazily, each once. The Stage 1 custom ops of image-dependent N are
called back from the packages into their registered eager kernels, so `sts_export.pruning.loop` is imported
here. transformers is never imported on this path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sts_export.backends.torch import TorchTensors
from sts_export.export.aoti import check_packages
from sts_export.artifact.plan import Plan


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
