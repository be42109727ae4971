"""The ONNX Runtime backend: the ONNX graphs of an export directory (numpy in, numpy out)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sts_export.errors import StsError


class OrtBackend:
    """Runs the ONNX graphs of an export directory with ONNX Runtime (numpy in, numpy out)."""

    name = "onnxruntime"

    def __init__(self, export_dir: Path, manifest: dict[str, Any], device: str = "auto", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.dir, self.manifest = export_dir, manifest
        avail = ort.get_available_providers()
        want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in avail
        if device == "cuda" and not want_cuda:
            raise StsError("the CUDA provider of onnxruntime is not available; pip install onnxruntime-gpu or use --device cpu")
        self.providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        self.opts = ort.SessionOptions()
        if threads:
            self.opts.intra_op_num_threads = threads
        self.opts.log_severity_level = 3
        self.sessions: dict[str, Any] = {}

    def session(self, graph: str) -> Any:
        if graph not in self.sessions:
            import onnxruntime as ort

            path = self.dir / self.manifest["graphs"][graph]["onnx"]
            self.sessions[graph] = ort.InferenceSession(str(path), self.opts, providers=self.providers)
        return self.sessions[graph]

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        sess = self.session(graph)
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, {i.name: np.asarray(feeds[i.name]) for i in sess.get_inputs()})
        return dict(zip(names, outs))

    def from_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def concat(self, xs: list[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(xs, axis=axis)
