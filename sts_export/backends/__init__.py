"""Backends run a graph by name: `run(graph, feeds) -> outputs`, dicts keyed by DESIGN.md's IO names.

    torch.py        our PyTorch modules (the reference; eager or torch.compile)
    onnxruntime.py  the ONNX graphs of an export directory (CPU or CUDA provider)
    tensorrt/       static parser check, engine build and the engine runtime

Three array helpers (`from_numpy`, `to_numpy`, `concat`) keep KV caches in the backend's own
memory (torch tensors, ORT values, TensorRT device buffers) between steps; `synchronize` (optional)
waits for the device before a timer is read. This module imports no backend library.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    name: str

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]: ...
    def from_numpy(self, x: np.ndarray) -> Any: ...
    def to_numpy(self, x: Any) -> np.ndarray: ...
    def concat(self, xs: list[Any], axis: int) -> Any: ...
