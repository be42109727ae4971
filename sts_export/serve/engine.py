"""The serving engine: one queue, one worker thread, one Pipeline; no HTTP.

Requests are prepared (image decoded and preprocessed, prompt tokenized, context checked) on the
caller's thread, so a bad one is refused (StsError) before it takes a place in the queue. The worker
takes the oldest request and, where the family's graphs take a batch (LLaVA-1.5: a fixed N), every
queued request whose prompt has the same token lengths, up to `max_batch`: the graphs take no
attention mask, so only prompts of equal lengths share one generation loop (as Triton's dynamic
batcher batches only equal shapes); other lengths wait for their turn. One `generate` call serves
the batch: prefill and decode steps run for all rows together, and each row ends at its own stop
token or `max_tokens`, or when its client is gone. Families with an image-dependent N (NeXT, Qwen)
run one request after another.

A caller gets its events (`Token`, `Done`, `Failed`) through the callback it passes to `submit`,
called on the worker thread: the HTTP layer forwards them to its event loop, a `Waiter` waits for
them on a plain thread (`Engine.complete`, the Triton binding).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import io
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from sts_export.artifact.manifest import read_manifest
from sts_export.errors import StsError
from sts_export.families import ImageInput
from sts_export.families.llava import pixel_input
from sts_export.pipeline import Pipeline
from sts_export.tokenizer import Prompt

log = logging.getLogger("sts_export.serve")

DEFAULT_MAX_TOKENS = 256  # a request without max_tokens gets this many (or what the context leaves)
MAX_IMAGE_BYTES = 20 * 2**20
# histogram buckets (seconds): TTFT from queue arrival; time per output token
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class QueueFull(Exception):
    """The queue holds `max_queue` waiting requests: answer at once (HTTP 429), never wait."""


@dataclass(frozen=True)
class Token:
    token_id: int
    text: str  # new text since the previous event ("" while a multi-byte character is incomplete)


@dataclass(frozen=True)
class Done:
    text: str  # the rest of the answer not sent in Token events yet
    content: str  # the whole answer
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens)
    usage: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    message: str  # one line


Event = Token | Done | Failed


@dataclass
class Request:
    """A validated request, ready for the queue."""

    image: ImageInput  # one image
    prompt: Prompt
    max_tokens: int

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens before pruning: text tokens and the image's N (newlines included)."""
        return len(self.prompt.prefix) + self.image.n_full + len(self.prompt.suffix)


@dataclass(eq=False)
class Ticket:
    """A submitted request: its events go to `on_event`; `cancel()` when its client is gone."""

    request: Request
    on_event: Callable[[Event], None]
    key: tuple
    submitted: float = field(default_factory=time.perf_counter)
    ids: list[int] = field(default_factory=list)
    sent: str = ""  # text sent in Token events
    first: float | None = None  # time of the first token
    last: float | None = None
    ended: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Waiter:
    """An `on_event` for a plain thread: `wait()` returns the request's Done event (StsError if it failed)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._last: Done | Failed | None = None

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, (Done, Failed)):
            self._last = ev
            self._done.set()

    def wait(self) -> Done:
        self._done.wait()
        if isinstance(self._last, Failed):
            raise StsError(self._last.message)
        assert self._last is not None
        return self._last


class Metrics:
    """Prometheus metrics of one engine, in a registry of its own (several engines may share a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, ...
        self.requests = Counter("sts_requests", "Requests by outcome: ok, bad_request, rejected (queue full), "
                                "cancelled (client gone), error", ["outcome"], registry=r)
        self.queue = Gauge("sts_queue_length", "Requests waiting in the queue", registry=r)
        self.running = Gauge("sts_running_requests", "Requests in the running generation loop", registry=r)
        self.ttft = Histogram("sts_time_to_first_token_seconds", "Queue arrival to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.per_token = Histogram("sts_time_per_output_token_seconds", "Time between a request's tokens",
                                   buckets=TOKEN_BUCKETS, registry=r)
        self.batch = Histogram("sts_batch_size", "Requests per generation loop", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=r)
        self.prompt_tokens = Counter("sts_prompt_tokens", "Prompt tokens (before pruning) of served requests", registry=r)
        self.completion_tokens = Counter("sts_completion_tokens", "Generated tokens", registry=r)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def steady_malloc() -> None:
    """glibc: allocations of 128 KiB and more from mmap, returned to the system when freed. By default glibc raises
    that threshold to the largest block freed so far (an image's buffers: MBs), and the freed buffers of every
    request then stay in the process: after a load of concurrent requests the server would keep ~30 % more memory
    than it needs (measured on the tiny export: +29 %, with this +10 %). No-op elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixing it also ends glibc's dynamic threshold)
    except OSError:
        pass


def decode_image(data: bytes) -> Image.Image:
    """Image file bytes (PNG, JPEG, WebP, ...) -> a loaded PIL image; anything else is a one-line StsError."""
    if not data:
        raise StsError("the image is empty (0 bytes); send a PNG, JPEG or WebP file")
    if len(data) > MAX_IMAGE_BYTES:
        raise StsError(f"the image is {len(data) / 2**20:.1f} MB; the server takes images up to "
                       f"{MAX_IMAGE_BYTES // 2**20} MB")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError:
        raise StsError("the image has too many pixels (a decompression bomb?); send a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise StsError(f"the data is not a readable image ({type(e).__name__}); send a PNG, JPEG or WebP file") from None
    if min(img.size) < 1:
        raise StsError(f"the image is empty ({img.size[0]}x{img.size[1]})")
    return img


def engine_batch_limit(pipe: Pipeline) -> int:
    """The largest batch the backend's graphs take: TensorRT engines were built for `sts export --max-batch`
    (manifest "tensorrt.max_batch", default 1); ONNX Runtime and AOTInductor graphs take any batch."""
    if pipe.backend.name != "tensorrt":
        return 1 << 30
    return int(read_manifest(Path(pipe.source), verify=False).get("tensorrt", {}).get("max_batch", 1))


class Engine:
    """Queue + batching + one generation loop at a time over one Pipeline (its backend is used by the worker
    thread only). `max_queue`: waiting requests before `submit` refuses; `max_batch`: rows of one loop
    (1 where the family takes one image per call); `batch_delay`: seconds the worker waits for more requests
    of the same prompt lengths before starting a loop that is not full (0: start at once)."""

    def __init__(self, pipe: Pipeline, *, max_queue: int = 64, max_batch: int = 8, batch_delay: float = 0.0) -> None:
        if pipe.tokenizer is None:
            raise StsError(f"{pipe.source} has no tokenizer.json; the server needs one to take text prompts")
        if max_queue < 1 or max_batch < 1 or batch_delay < 0:
            raise StsError("max_queue and max_batch must be at least 1, batch_delay at least 0")
        self.pipe = pipe
        self.batchable = not pipe.recipe.dynamic_tokens  # fixed N: the graphs take a batch of images
        self.max_queue, self.max_batch = max_queue, min(max_batch, engine_batch_limit(pipe)) if self.batchable else 1
        self.batch_delay = batch_delay
        self.metrics = Metrics()
        self.stops = np.asarray(pipe.plan.stop_token_ids, dtype=np.int64)
        self._queue: list[Ticket] = []
        self._running: list[Ticket] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, warmup: bool = True) -> "Engine":
        """Start the worker. `warmup` first runs a short generation at the largest batch: ONNX Runtime loads its
        sessions on first use and its memory arena grows to the largest shapes it has run, so the server's memory
        is at its working size before the first request (and a machine too small for `max_batch` fails here)."""
        if warmup:
            try:
                inp = self.pipe.prepare_image(Image.new("RGB", (336, 336), (128, 128, 128)))
                if self.max_batch > 1:
                    inp = pixel_input(np.repeat(inp.feeds["pixel_values"], self.max_batch, axis=0), self.pipe.recipe)
                self.pipe.generate_prepared(inp, self.pipe.encode("What is shown in this image?"), 2)
            except StsError as e:
                raise StsError(f"the warm-up generation (a 336x336 image) failed: {e}") from None
        self._thread = threading.Thread(target=self._loop, name="sts-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the worker after the running loop; queued requests fail."""
        with self._cond:
            self._stopping = True
            waiting, self._queue = self._queue, []
            self._cond.notify_all()
        for t in waiting:
            self._fail(t, "the server is shutting down")
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------ requests
    def prepare(self, image: bytes | Image.Image, prompt: str, max_tokens: int | None = None) -> Request:
        """Validate and preprocess one request (on the caller's thread); bad input is a one-line StsError."""
        img = image if isinstance(image, Image.Image) else decode_image(image)
        inp = self.pipe.prepare_image(img)
        pr = self.pipe.encode(prompt)
        k_pre, _ = self.pipe.plan.image_split(inp)
        room = self.pipe.recipe.max_context - (len(pr.prefix) + k_pre + len(pr.suffix))
        if max_tokens is None:
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, room))
        if max_tokens < 1:
            raise StsError(f"max_tokens must be at least 1, got {max_tokens}")
        self.pipe.check_context(inp, pr, max_tokens)
        return Request(inp, pr, max_tokens)

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Ticket:
        """Queue a prepared request; raises QueueFull at once when `max_queue` requests are waiting."""
        key = (len(request.prompt.prefix), len(request.prompt.suffix)) if self.batchable else (next(self._ids),)
        t = Ticket(request, on_event, key)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                self.metrics.requests.labels("rejected").inc()
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(t)
            self.metrics.queue.set(len(self._queue))
            self._cond.notify_all()
        return t

    def cancel(self, ticket: Ticket) -> None:
        """The client is gone: a queued request leaves the queue now, a running one ends at the next token."""
        ticket.cancel()
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self.metrics.queue.set(len(self._queue))
                ticket.ended = True
                self.metrics.requests.labels("cancelled").inc()

    def complete(self, image: bytes | Image.Image, prompt: str, max_tokens: int | None = None) -> Done:
        """Prepare, submit and wait (a plain thread's call): the Done event, or StsError for a failed request."""
        waiter = Waiter()
        self.submit(self.prepare(image, prompt, max_tokens), waiter)
        return waiter.wait()

    # ------------------------------------------------------------------ worker
    def _take(self) -> list[Ticket] | None:
        """The oldest request and the queued ones with its prompt lengths (up to max_batch); None: stopping."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            key = self._queue[0].key
            if self.batch_delay and self.max_batch > 1:
                deadline = time.perf_counter() + self.batch_delay
                while (sum(t.key == key for t in self._queue) < self.max_batch and not self._stopping
                       and (left := deadline - time.perf_counter()) > 0):
                    self._cond.wait(left)
                if self._stopping or not self._queue:
                    return None if self._stopping else []
                key = self._queue[0].key
            rows = [t for t in self._queue if t.key == key][:self.max_batch]
            self._queue = [t for t in self._queue if t not in rows]
            self._running = rows
            self.metrics.queue.set(len(self._queue))
            self.metrics.running.set(len(rows))
            return rows

    def _loop(self) -> None:
        while (rows := self._take()) is not None:
            if not rows:
                continue
            try:
                self._run(rows)
            except Exception as e:  # a backend failure or a bug: these requests fail, the worker serves on
                if not isinstance(e, StsError):
                    log.exception("generation failed")
                msg = str(e) if isinstance(e, StsError) else f"internal error ({type(e).__name__}: {e})"
                for t in rows:
                    self._fail(t, " ".join(msg.split()))
            finally:
                with self._cond:
                    self._running = []
                    self.metrics.running.set(0)

    def _run(self, rows: list[Ticket]) -> None:
        """One generation loop for `rows` (equal prompt lengths); each row's events as its tokens come."""
        self.metrics.batch.observe(len(rows))
        if len(rows) == 1:
            inp = rows[0].request.image
        else:  # fixed N: the rows' pixel_values stacked [B, 3, H, W]
            inp = pixel_input(np.concatenate([t.request.image.feeds["pixel_values"] for t in rows]), self.pipe.recipe)
        started = time.perf_counter()
        timings: dict[str, float] = {}

        def on_token(nxt: np.ndarray) -> np.ndarray:  # [B] -> [B] rows that have ended
            now = time.perf_counter()
            for t, tok in zip(rows, nxt.tolist()):
                if not t.ended:
                    self._token(t, int(tok), now, timings, started, len(rows))
            return np.array([t.ended for t in rows])

        self.pipe.generate_prepared(inp, [t.request.prompt for t in rows], max(t.request.max_tokens for t in rows),
                                    on_token, timings)
        for t in rows:  # every row ends in on_token; this is a guard
            if not t.ended:
                self._finish(t, "length", timings, started, len(rows))

    def _token(self, t: Ticket, tok: int, now: float, timings: dict[str, float], started: float, batch: int) -> None:
        if t.cancelled:
            t.ended = True
            self.metrics.requests.labels("cancelled").inc()
            return
        if t.first is None:
            t.first = now
            self.metrics.ttft.observe(now - t.submitted)
        else:
            self.metrics.per_token.observe(now - (t.last or now))
        t.last = now
        t.ids.append(tok)
        if tok in self.stops:
            self._finish(t, "stop", timings, started, batch)
            return
        text = self.pipe.decode(t.ids)
        delta = ""
        if not text.endswith("\ufffd") and text.startswith(t.sent):  # hold back an incomplete UTF-8 character
            delta, t.sent = text[len(t.sent):], text
        self._send(t, Token(tok, delta))
        if len(t.ids) >= t.request.max_tokens:
            self._finish(t, "length", timings, started, batch)

    def _finish(self, t: Ticket, reason: str, timings: dict[str, float], started: float, batch: int) -> None:
        t.ended = True
        content = self.pipe.decode(t.ids)
        rest = content[len(t.sent):] if content.startswith(t.sent) else ""
        n = len(t.ids)
        self.metrics.requests.labels("ok").inc()
        self.metrics.prompt_tokens.inc(t.request.prompt_tokens)
        self.metrics.completion_tokens.inc(n)
        self._send(t, Done(rest, content, reason, self._usage(t, timings, started, batch)))

    def _usage(self, t: Ticket, timings: dict[str, float], started: float, batch: int) -> dict[str, Any]:
        """OpenAI's usage, and as an extension (`sts`) the kept tokens K, K' and the stage timings (ms)."""
        req, plan = t.request, self.pipe.plan
        k, k2 = plan.image_split(req.image)  # this image's K (the whole span without Stage 1) and K'
        n = len(t.ids)
        ms = {"queue": started - t.submitted, "vision": timings.get("vision"), "prefill": timings.get("prefill"),
              "ttft": (t.first - t.submitted) if t.first is not None else None,
              "decode_per_token": ((t.last - t.first) / (n - 1)) if n > 1 and t.first and t.last else None}
        return {
            "prompt_tokens": req.prompt_tokens, "completion_tokens": n, "total_tokens": req.prompt_tokens + n,
            "sts": {"method": plan.method, "budget": plan.budget, "image_tokens": req.image.n_full,
                    "kept_stage1": k, "kept_stage2": k2 if plan.has_prune else None,
                    "batch": batch,
                    "timings_ms": {name: None if v is None else round(v * 1000, 3) for name, v in ms.items()}},
        }

    def _fail(self, t: Ticket, message: str) -> None:
        if t.ended:
            return
        t.ended = True
        self.metrics.requests.labels("error").inc()
        self._send(t, Failed(message))

    def _send(self, t: Ticket, ev: Event) -> None:
        try:
            t.on_event(ev)
        except Exception:  # a caller's callback must not stop the other rows
            log.exception("event callback failed")
