"""`sts serve EXPORT_DIR`: serve an export over the OpenAI chat completions API (FastAPI + uvicorn), or with
`--triton` through Triton Inference Server (PyTriton); sts_export/serve/, docs/serving.md."""
from __future__ import annotations

from pathlib import Path

import click

from sts_export.cli.options import CONTEXT, ENVIRONMENT, runtime_options
from sts_export.errors import cli_errors
from sts_export.serve.server import serve


@click.command("serve", context_settings=CONTEXT, epilog=ENVIRONMENT)
@click.argument("export_dir", type=click.Path(path_type=Path))
@runtime_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="HTTP port (the OpenAI API; with --triton, Triton's HTTP/KServe port).")
@click.option("--model-name", default=None, help="The model id clients name [the export directory's name].")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1, 100000),
              help="Waiting requests before new ones are refused at once (HTTP 429).")
@click.option("--max-batch-requests", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Requests that share one generation loop, at most (LLaVA-1.5: equal prompt lengths; capped at "
                   "TensorRT engines' export --max-batch; other families run one at a time).")
@click.option("--batch-delay-ms", default=0.0, show_default=True, type=click.FloatRange(0, 10000),
              help="Wait this long for more requests of equal prompt length before a loop that is not full.")
@click.option("--triton", is_flag=True, help="Serve through Triton Inference Server (PyTriton) instead.")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535), help="--triton: gRPC port.")
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535),
              help="--triton: Prometheus metrics port.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 64),
              help="--triton: model instances (callables feeding the one engine).")
def main(export_dir: Path, backend: str, device: str, threads: int | None, host: str, port: int,
         model_name: str | None, max_queue: int, max_batch_requests: int, batch_delay_ms: float, triton: bool,
         grpc_port: int, metrics_port: int, instances: int) -> None:
    """Serve EXPORT_DIR (an `sts export` directory) over HTTP: OpenAI chat completions, /health, /metrics."""
    with cli_errors():
        serve(export_dir, host=host, port=port, backend=backend, device=device, threads=threads,
              model_name=model_name, max_queue=max_queue, max_batch=max_batch_requests,
              batch_delay=batch_delay_ms / 1000, triton=triton, grpc_port=grpc_port, metrics_port=metrics_port,
              instances=instances)
