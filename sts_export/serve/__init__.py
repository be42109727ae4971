"""Serving an export directory: `sts serve EXPORT_DIR` (sts_export/cli/serve.py; docs/serving.md).

    engine.py    the queue and batching engine over one Pipeline (no HTTP; testable alone)
    protocol.py  OpenAI chat completions: request checks, response and stream objects
    app.py       the FastAPI routes (thin)
    triton.py    the same engine behind Triton Inference Server (PyTriton)
    server.py    start one: the Pipeline, the Engine, then uvicorn or Triton

FastAPI, uvicorn and prometheus-client come with `pip install sts-export[serve]`, PyTriton with `[triton]`.
"""
