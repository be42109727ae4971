#!/usr/bin/env python
"""Throughput and TTFT of `sts serve` under concurrent clients, batching on and off.

    python scripts/serve_bench.py EXPORT_DIR [--clients 1,4,16] [--max-batch-requests 1,16] [--requests 2]
                                  [--max-tokens 32] [--prompts equal|mixed]

For each --max-batch-requests it starts one server (1: one request at a time), then for each client count runs
that many clients at once, each sending --requests streamed chat completions back to back (distinct images; `equal`: one
prompt, so every queued request may share a loop; `mixed`: three prompt lengths, grouped by the server). Client
side: TTFT = request sent to its first token chunk; tokens/s = completion tokens of all requests / wall time.
Prints one Markdown row per (max batch requests, clients). Only one server runs at a time.
"""
from __future__ import annotations

import argparse
import base64
import io
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = {"equal": ["What is shown in this image?"],
           "mixed": ["What is shown in this image?", "What color is the car?", "Is there a dog in the image?"]}


def image_uri(seed: int) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (8, 10, 3)).astype(np.uint8)).resize((640, 480), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(export_dir: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sts_export.cli", "serve", export_dir, "--port", str(port),
                             "--max-batch-requests", str(max_batch), "--max-queue", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode})")
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return proc, base + "/v1"
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start in 10 min")


def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int, prompts: list[str],
              uris: list[str]) -> dict[str, float]:
    from openai import OpenAI

    ttfts: list[float] = []
    tokens: list[int] = []
    batches: list[int] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        oc = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        for r in range(requests):
            i = c * requests + r
            msgs = [{"role": "user", "content": [{"type": "text", "text": prompts[i % len(prompts)]},
                                                 {"type": "image_url", "image_url": {"url": uris[i % len(uris)]}}]}]
            t0, first, usage = time.perf_counter(), None, None
            seen = 0
            for ch in oc.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}):
                if ch.usage is not None:
                    usage = ch.usage
                if ch.choices:
                    seen += 1
                    if seen == 2 and first is None:  # the role chunk comes before generation; then the first token
                        first = time.perf_counter() - t0
            with lock:
                ttfts.append(first if first is not None else float("nan"))
                tokens.append(usage.completion_tokens)
                batches.append(usage.model_extra["sts"]["batch"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(tokens), "tokens": sum(tokens), "wall": wall, "tok_s": sum(tokens) / wall,
            "ttft_p50": float(np.percentile(ttfts, 50)), "ttft_p95": float(np.percentile(ttfts, 95)),
            "batch": float(np.mean(batches))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--max-batch-requests", default="1,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", choices=sorted(PROMPTS), default="equal")
    a = ap.parse_args()
    levels = [int(c) for c in a.clients.split(",")]
    uris = [image_uri(s) for s in range(max(levels) * a.requests)]
    model = Path(a.export_dir).resolve().name
    print("| max batch requests | clients | requests | tokens | wall s | tokens/s | TTFT p50 s | TTFT p95 s | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mb in [int(x) for x in a.max_batch_requests.split(",")]:
        proc, url = start_server(a.export_dir, mb)
        try:
            run_level(url, model, 1, 1, 4, PROMPTS[a.prompts], uris)  # a first request
            for n in levels:
                r = run_level(url, model, n, a.requests, a.max_tokens, PROMPTS[a.prompts], uris)
                print(f"| {mb} | {n} | {r['requests']} | {r['tokens']} | {r['wall']:.1f} | {r['tok_s']:.1f} | "
                      f"{r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | {r['batch']:.1f} |", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
