"""Starting a server over one export directory: its Pipeline, one Engine, then uvicorn (the OpenAI API, `app.py`)
or Triton Inference Server (`triton.py`). `sts serve` (sts_export/cli/serve.py) is its command line."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

from sts_export.errors import StsError
from sts_export.pipeline import load_export_pipeline
from sts_export.serve.engine import Engine, steady_malloc


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve(export_dir: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, backend: str = "auto",
          device: str = "auto", threads: int | None = None, model_name: str | None = None, max_queue: int = 64,
          max_batch: int = 8, batch_delay: float = 0.0, triton: bool = False, grpc_port: int = 8001,
          metrics_port: int = 8002, instances: int = 1) -> None:
    """Serve `export_dir` until interrupted. `max_batch`: requests per generation loop (fixed-N families; capped at
    TensorRT engines' build batch), `batch_delay`: seconds to wait for more requests of equal prompt lengths before
    a loop that is not full. `triton`: through Triton Inference Server (HTTP on `port`, gRPC, metrics ports,
    `instances` callables), whose dynamic batcher then forms the batches and holds the queue."""
    export_dir = Path(export_dir)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    steady_malloc()
    if not export_dir.is_dir():
        raise StsError(f"{export_dir} is not a directory; pass an export directory (sts export --out)")
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise StsError(f"the server needs {', '.join(missing)}: pip install 'sts-export[serve]'")
    name = model_name or export_dir.resolve().name
    pipe = load_export_pipeline(export_dir, backend, device, threads)
    engine = Engine(pipe, max_queue=max_queue if not triton else max(max_queue, max_batch * instances),
                    max_batch=max_batch, batch_delay=0.0 if triton else batch_delay)
    say(f"loading {export_dir} ({pipe.backend.name}, {pipe.recipe.family}, {pipe.plan.method} b={pipe.plan.budget}; "
        f"batches of up to {engine.max_batch})")
    with engine:
        if triton:
            from sts_export.serve.triton import start_triton  # PyTriton: the [triton] extra

            server = start_triton(engine, name, host=host, http_port=port, grpc_port=grpc_port,
                                  metrics_port=metrics_port, instances=instances, max_batch=max_batch,
                                  batch_delay=batch_delay, max_queue=max_queue)
            say(f"Triton serves model '{name}' at http://{host}:{port} (gRPC {grpc_port}, metrics {metrics_port})")
            try:
                server.serve()
            finally:
                server.stop()
        else:
            import uvicorn  # FastAPI + uvicorn: the [serve] extra

            from sts_export.serve.app import create_app

            say(f"serving '{name}' at http://{host}:{port}/v1 (OpenAI chat completions)")
            uvicorn.run(create_app(engine, name), host=host, port=port, log_level="warning",
                        timeout_graceful_shutdown=5)
