"""The runner protocol every backend implements, and the KV-cache protocol the generation loop drives.

Backends run a graph by name: `run(graph, feeds) -> outputs`, dicts keyed by DESIGN.md's IO names. Three array
helpers (`from_numpy`, `to_numpy`, `concat`) keep KV caches in the backend's own memory (torch tensors, ORT values,
TensorRT device buffers) between steps; `synchronize` (optional) waits for the device before a timer is read.

Optional: `kv_cache(graph, layers, batch, capacity) -> KVCache | None`, a backend's own KV cache for a segment
(ONNX Runtime: buffers preallocated to `capacity` entries, updated in place by the graph); None, or no such method,
and the loop uses `generate.ConcatCache` (past in, past + new out).
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


class KVCache(Protocol):
    """One segment's KV cache as the generation loop drives it."""

    length: int  # valid entries

    def feeds(self, new: int) -> dict[str, Any]: ...  # the cache's feeds for a call adding `new` entries
    def update(self, out: dict[str, Any], new: int) -> None: ...  # take that call's outputs back


class Wrapped:
    """Base of a backend that wraps another (`self.inner`) and changes only `run`: the array helpers go to it."""

    inner: Any

    def from_numpy(self, x: np.ndarray) -> Any:
        return self.inner.from_numpy(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.inner.to_numpy(x)

    def concat(self, xs: list[Any], axis: int) -> Any:
        return self.inner.concat(xs, axis)
