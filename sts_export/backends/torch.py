"""The torch backend: runs the graph modules of `sts_export.graphs` (eager, or torch.compile'd)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sts_export.artifact.plan import Plan


class TorchTensors:
    """The array helpers of a backend whose tensors are torch tensors on `self.device` (torch, AOTInductor)."""

    device: torch.device

    def from_numpy(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16

    def concat(self, xs: list[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(xs, dim=axis)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class TorchBackend(TorchTensors):
    """Runs the torch graph modules (eager, or torch.compile'd) on a device."""

    name = "torch"

    def __init__(self, graphs: dict[str, torch.nn.Module], plan: Plan, device: str = "cpu", compile: bool = False) -> None:
        self.plan, self.device = plan, torch.device(device)
        self.graphs = {k: (torch.compile(m, dynamic=True) if compile else m) for k, m in graphs.items()}

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        inputs, outputs = self.plan.io(graph)
        with torch.inference_mode():
            outs = self.graphs[graph](*[feeds[n] for n in inputs])
        outs = outs if isinstance(outs, tuple) else (outs,)
        return dict(zip(outputs, outs))
