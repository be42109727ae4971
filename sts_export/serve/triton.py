"""Serve an export through Triton Inference Server with PyTriton: `sts serve EXPORT_DIR --triton`.

PyTriton's wheel ships `tritonserver`; it runs the Python callable bound here behind Triton's HTTP
(KServe v2), gRPC and metrics endpoints, with Triton's dynamic batcher and model instances. The
callable hands each row to the same Engine the OpenAI server uses, so Triton's batches of
requests become the engine's batches (grouped by prompt lengths) and answers equal the API's.

Model `<name>`, one row per request (max_batch_size > 0, so every tensor carries a batch axis):
  inputs   image [1] BYTES (an image file: PNG, JPEG, ...), prompt [1] BYTES (UTF-8),
           max_tokens [1] INT32 (optional; <= 0 or absent: the engine's default)
  outputs  text [1] BYTES, finish_reason [1] BYTES ("stop", "length", or "" on error),
           prompt_tokens [1] INT32, completion_tokens [1] INT32, kept [2] INT32 (K, K'; -1: no Stage 2),
           error [1] BYTES ("" or one line: a bad image, a prompt past the context, ...)
A bad row answers with its `error` output rather than failing the call: PyTriton fails every request
of a dynamic batch when its callable raises, and one client's bad image must not fail its neighbours.
"""
from __future__ import annotations

import os
import site
import sysconfig
from typing import Any, Callable

import numpy as np

from sts_export.errors import StsError
from sts_export.serve.engine import Done, Engine, QueueFull, Waiter

INPUTS = (("image", np.bytes_, (1,), False), ("prompt", np.bytes_, (1,), False), ("max_tokens", np.int32, (1,), True))
OUTPUTS = (("text", np.bytes_, (1,)), ("finish_reason", np.bytes_, (1,)), ("prompt_tokens", np.int32, (1,)),
           ("completion_tokens", np.int32, (1,)), ("kept", np.int32, (2,)), ("error", np.bytes_, (1,)))


def _row(result: Done | str) -> dict[str, np.ndarray]:
    """One row's outputs (no batch axis) from its Done event or its error line."""
    if isinstance(result, str):
        return {"text": np.array([b""]), "finish_reason": np.array([b""]), "prompt_tokens": np.array([0], np.int32),
                "completion_tokens": np.array([0], np.int32), "kept": np.array([-1, -1], np.int32),
                "error": np.array([result.encode()])}
    u, sts = result.usage, result.usage["sts"]
    k2 = -1 if sts["kept_stage2"] is None else sts["kept_stage2"]
    return {"text": np.array([result.content.encode()]), "finish_reason": np.array([result.finish_reason.encode()]),
            "prompt_tokens": np.array([u["prompt_tokens"]], np.int32),
            "completion_tokens": np.array([u["completion_tokens"]], np.int32),
            "kept": np.array([sts["kept_stage1"], k2], np.int32), "error": np.array([b""])}


def infer_function(engine: Engine) -> Callable[[list[Any]], list[dict[str, np.ndarray]]]:
    """PyTriton's callable: a list of Triton requests (each [rows, ...]) -> one dict of outputs per request.

    Every row goes to the engine before the callable waits, so the rows of one Triton batch share the
    engine's generation loops."""

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        results: list[list[Done | str]] = []
        waits: list[tuple[int, int, Waiter]] = []
        for i, req in enumerate(requests):
            rows = len(req["image"])
            results.append([""] * rows)
            limits = req.data.get("max_tokens")
            for r in range(rows):
                try:
                    prompt = bytes(req["prompt"][r][0]).decode("utf-8")
                    limit = int(limits[r][0]) if limits is not None and int(limits[r][0]) > 0 else None
                    waiter = Waiter()
                    engine.submit(engine.prepare(bytes(req["image"][r][0]), prompt, limit), waiter)
                    waits.append((i, r, waiter))
                except UnicodeDecodeError:
                    results[i][r] = "the prompt is not UTF-8 text"
                except (StsError, QueueFull) as e:
                    results[i][r] = str(e)
        for i, r, waiter in waits:
            try:
                results[i][r] = waiter.wait()
            except StsError as e:
                results[i][r] = str(e)
        return [{name: np.stack([_row(x)[name] for x in rows]) for name, *_ in OUTPUTS} for rows in results]

    return infer


def _stub_environment() -> None:
    """Make PyTriton's Python backend stub (a C++ program embedding libpython, started by tritonserver with this
    process's environment) run this interpreter with this interpreter's packages:
    - this interpreter's libpython first on LD_LIBRARY_PATH: the stub links libpython3.X.so by name, and a system
      copy of another patch release (pyenv or conda beside Debian's python3) fails on this standard library;
    - this interpreter's site-packages first on PYTHONPATH: the stub resolves its own prefix, so in a virtual
      environment it would import the base interpreter's packages (another numpy: BYTES tensors come out garbled).
    """
    def prepend(var: str, first: list[str]) -> None:
        rest = [p for p in os.environ.get(var, "").split(os.pathsep) if p and p not in first]
        os.environ[var] = os.pathsep.join([*first, *rest])

    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir:
        prepend("LD_LIBRARY_PATH", [libdir])
    prepend("PYTHONPATH", [p for p in site.getsitepackages() if os.path.isdir(p)])


def start_triton(engine: Engine, model: str, *, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, instances: int = 1, max_batch: int = 8,
                 batch_delay: float = 0.0, max_queue: int = 64, workspace: str | None = None) -> Any:
    """Start tritonserver with the engine bound as model `model`; returns PyTriton's Triton (call `.serve()` to
    block, `.stop()` to end). `instances` callables share the engine: while one waits for its batch, Triton
    hands the next batch to another, which queues it in the engine. `max_batch` and `batch_delay` are Triton's
    dynamic batcher's (max_batch_size, max_queue_delay), `max_queue` its queue size (more: rejected at once)."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise StsError("the Triton path needs PyTriton: pip install nvidia-pytriton (it needs numpy < 2; see "
                       "docs/serving.md)") from None
    if instances < 1:
        raise StsError("--instances must be at least 1")
    _stub_environment()
    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          metrics_port=metrics_port, exit_timeout_secs=5)
    triton = Triton(config=config, workspace=workspace)  # None: a temporary one of its own
    batcher = DynamicBatcher(max_queue_delay_microseconds=int(batch_delay * 1e6),
                             default_queue_policy=QueuePolicy(max_queue_size=max_queue))
    triton.bind(model_name=model, infer_func=[infer_function(engine) for _ in range(instances)],
                inputs=[Tensor(name=n, dtype=d, shape=s, optional=o) for n, d, s, o in INPUTS],
                outputs=[Tensor(name=n, dtype=d, shape=s) for n, d, s in OUTPUTS],
                config=ModelConfig(max_batch_size=max_batch, batcher=batcher), strict=True)
    triton.run()
    return triton
