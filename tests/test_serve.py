"""The servers for real: `sts serve` on 127.0.0.1 (free ports) called with the `openai` client, and the Triton path
with `tritonclient`; every answer equals the Python API's greedy answer.

The Triton test (marker `triton`) needs the [triton] extra, whose PyTriton pins numpy < 2: it runs in a virtual
environment of its own (.ci/run), and the main run deselects it (-m "not triton")."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest

from sts_export.pipeline import load_export_pipeline
from tests.conftest import make_image
from tests.test_export import exported

ROOT = Path(__file__).resolve().parent.parent
# prompts of three token lengths: the server batches equal lengths and runs the groups in turn
PROMPTS = ["What is shown in this image?", "What color is the car?", "Is there a dog in the image?",
           "Describe the image in detail.", "How many people are in the picture?", "Where is the train going?",
           "What is the woman holding?", "Which animal is larger?"]
# a server whose decode steps take 10 ms more (segment2 sleeps): long enough requests to fill its queue and to
# disconnect mid-stream; everything else is the real server
SLOW = ("import runpy, time\n"
        "from sts_export.backends.onnxruntime import OrtBackend\n"
        "run = OrtBackend.run\n"
        "def slow(self, graph, feeds):\n"
        "    if graph == 'segment2':\n"
        "        time.sleep(0.01)\n"
        "    return run(self, graph, feeds)\n"
        "OrtBackend.run = slow\n"
        "runpy.run_module('sts_export.cli', run_name='__main__')\n")


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def llava(tmp_root: Path) -> Path:
    return exported(tmp_root, "tiny-llava", "sts", 64)  # shared with test_export.py in one session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    make_image(seed=seed).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def messages(image: bytes | None, prompt: str, images: int = 1) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    if image is not None:
        parts += [{"type": "image_url", "image_url": {"url": data_uri(image)}}] * images
    return [{"role": "user", "content": parts}]


class Server:
    """A server subprocess on free ports; `url` is its OpenAI base URL (or Triton's HTTP address)."""

    def __init__(self, export_dir: Path, *args: str, code: str | None = None, triton: bool = False) -> None:
        self.port = free_port()
        cmd = [sys.executable, *(["-c", code] if code else ["-m", "sts_export.cli"]), "serve", str(export_dir),
               "--port", str(self.port), *args]
        if triton:
            cmd += ["--triton", "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.log = open(export_dir.parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.name = export_dir.name
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1"
        ready = f"/v2/models/{self.name}/ready" if triton else "/health"  # Triton is up before the model
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.output()}"
            try:
                with urllib.request.urlopen(self.base + ready, timeout=2) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        else:
            raise AssertionError(f"server not ready in 180 s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        """A sample of /metrics by its full name with labels, e.g. sts_requests_total{outcome="ok"} (0: absent)."""
        m = re.search(r"^" + re.escape(name) + r" (\S+)$", self.get("/metrics"), re.M)
        return float(m.group(1)) if m else 0.0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(llava: Path) -> Iterator[Server]:
    s = Server(llava, "--max-batch-requests", "16")
    yield s
    s.close()


def client(url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def api_answers(export_dir: Path, jobs: set[tuple[int, str, int]]) -> dict[tuple[int, str, int], tuple[str, int, str]]:
    """(image seed, prompt, max_tokens) -> the Python API's greedy (answer, completion tokens, finish reason)."""
    pipe = load_export_pipeline(export_dir)
    stops = set(pipe.plan.stop_token_ids)
    out = {}
    for seed, prompt, n in jobs:
        ids = pipe.generate(make_image(seed=seed), prompt, max_new_tokens=n).tokens[0].tolist()
        end = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
        out[(seed, prompt, n)] = (pipe.decode(ids[:end]), end or len(ids), "stop" if end else "length")
    return out


def ask(c: Any, name: str, seed: int, prompt: str, n: int, stream: bool) -> tuple[str, int, str, dict]:
    """One chat completion -> (content, completion tokens, finish reason, usage's sts extension)."""
    msgs = messages(png(seed), prompt)
    if not stream:
        r = c.chat.completions.create(model=name, messages=msgs, max_tokens=n, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason, r.usage.model_extra["sts"]
    text, chunks, finish, usage = [], 0, None, None
    for ch in c.chat.completions.create(model=name, messages=msgs, max_tokens=n, temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            text.append(choice.delta.content or "")
            chunks += choice.finish_reason is None
            finish = choice.finish_reason or finish
    # one chunk per token: the role chunk, then each token's (a stop token ends in the finish chunk)
    assert chunks - 1 == usage.completion_tokens - (finish == "stop")
    return "".join(text), usage.completion_tokens, finish, usage.model_extra["sts"]


def test_serve_command_errors_are_one_line(tmp_path: Path) -> None:
    """`sts serve` is a subcommand of `sts`; a path that is no export directory is one line, exit 2."""
    r = subprocess.run([sys.executable, "-m", "sts_export.cli", "serve", str(tmp_path / "missing")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "is not a directory" in r.stderr


def test_batched_rows_equal_single_generations(llava: Path) -> None:
    """One generation loop over rows with their own images and prompts (equal token lengths) gives each row the
    tokens of its own single generation; rows of unequal lengths are refused."""
    from sts_export import StsError
    from sts_export.families.llava import pixel_input

    pipe = load_export_pipeline(llava)
    prompts = [p for p in PROMPTS if len(pipe.encode(p).suffix) == len(pipe.encode(PROMPTS[1]).suffix)]
    assert len(prompts) >= 3
    images = [make_image(seed=s) for s in range(len(prompts))]
    single = [pipe.generate(img, p, max_new_tokens=10).tokens[0].tolist() for img, p in zip(images, prompts)]
    inp = pixel_input(np.concatenate([pipe.pixel_values(img) for img in images]), pipe.recipe)
    gen = pipe.generate_prepared(inp, [pipe.encode(p) for p in prompts], 10)
    assert gen.tokens.tolist() == single
    with pytest.raises(StsError, match="equal token lengths"):
        pipe.generate_prepared(pipe.prepare_image(images[:2]), [pipe.encode(PROMPTS[0]), pipe.encode(PROMPTS[1])], 2)


def test_engine_groups_by_prompt_length_without_http(llava: Path) -> None:
    """The engine alone: queued requests of equal prompt lengths share one loop (oldest first), each row ends at its
    own max_tokens, a cancelled queued request leaves the queue at once, a full queue refuses."""
    from sts_export.serve.engine import Done, Engine, QueueFull

    pipe = load_export_pipeline(llava)
    engine = Engine(pipe, max_queue=6, max_batch=8)
    lengths = {p: len(pipe.encode(p).suffix) for p in PROMPTS}
    a = [p for p in PROMPTS if lengths[p] == lengths[PROMPTS[1]]][:3]
    b = [p for p in PROMPTS if lengths[p] == lengths[PROMPTS[0]] != lengths[PROMPTS[1]]][:2]
    assert len(a) == 3 and len(b) == 2
    jobs = [(0, a[0], 4), (1, b[0], 6), (2, a[1], 7), (3, b[1], 3), (4, a[2], 5)]
    got: dict[int, Done] = {}
    tickets = [engine.submit(engine.prepare(make_image(seed=s), p, n), lambda ev, s=s: got.__setitem__(s, ev))
               for s, p, n in jobs]
    gone = engine.submit(engine.prepare(make_image(seed=9), a[0], 4), lambda ev: got.__setitem__(9, ev))
    with pytest.raises(QueueFull):
        engine.submit(engine.prepare(make_image(seed=9), a[0], 4), lambda ev: None)
    engine.cancel(gone)
    assert engine.queue_length == 5 and 'sts_requests_total{outcome="cancelled"} 1.0' in engine.metrics.text().decode()
    with engine.start(warmup=False):
        while len(got) < len(jobs):
            time.sleep(0.01)
    ref = api_answers(llava, {(s, p, n) for s, p, n in jobs})
    for s, p, n in jobs:
        assert (got[s].content, got[s].usage["completion_tokens"], got[s].finish_reason) == ref[(s, p, n)]
        assert got[s].usage["sts"]["batch"] == (3 if p in a else 2)
    assert 9 not in got and not any(t.cancelled for t in tickets)


def test_sixteen_clients_equal_the_api(server: Server, llava: Path) -> None:
    """16 clients x 3 requests, half streamed, prompts of three lengths and per-request max_tokens: every answer
    equals the Python API's, none lost, equal-length requests were batched, RSS steady."""
    jobs = [(c, r, (c * 3 + r) % 6, PROMPTS[(c + r) % len(PROMPTS)], 6 + (c + 2 * r) % 7, (c + r) % 2 == 0)
            for c in range(16) for r in range(3)]
    ref = api_answers(llava, {(seed, p, n) for _, _, seed, p, n, _ in jobs})
    ask(client(server.url), server.name, 99, PROMPTS[0], 8, False)  # the first request
    rss_first = server.rss()

    def run_client(c: int) -> list[tuple]:
        oc = client(server.url)
        return [(job, ask(oc, server.name, *job[2:])) for job in jobs if job[0] == c]

    with ThreadPoolExecutor(16) as pool:
        got = [x for rows in pool.map(run_client, range(16)) for x in rows]
    assert len(got) == 48
    for (c, r, seed, prompt, n, stream), (text, tokens, finish, sts) in got:
        assert (text, tokens, finish) == ref[(seed, prompt, n)], (c, r, stream)
        assert (sts["kept_stage1"], sts["kept_stage2"], sts["image_tokens"]) == (96, 32, 576)
    assert max(sts["batch"] for _, (_, _, _, sts) in got) > 1  # concurrent requests shared generation loops
    assert server.metric('sts_requests_total{outcome="ok"}') == 49
    rss_after = server.rss()
    print(f"server RSS after the first request {rss_first / 2**20:.0f} MB, after the load {rss_after / 2**20:.0f} MB")
    assert rss_after <= 1.10 * rss_first, (rss_after, rss_first)


def test_bad_requests_answer_400_and_the_server_serves_on(server: Server) -> None:
    from openai import BadRequestError

    c = client(server.url)
    good = png(1)
    long_prompt = " ".join(["describe the image in detail"] * 400)
    cases = {
        "no image": (dict(messages=messages(None, "What is this?")), "holds no image"),
        "two images": (dict(messages=messages(good, "What is this?", images=2)), "2 images"),
        "bad base64": (dict(messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]),
            "not valid base64"),
        "not an image": (dict(messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": data_uri(b"hello", "image/png")}}]}]),
            "not a readable image"),
        "web URL": (dict(messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]),
            "fetches nothing"),
        "prompt past the context": (dict(messages=messages(good, long_prompt)), "prompt too long"),
        "max_tokens past the context": (dict(messages=messages(good, "hi"), max_tokens=5000), "exceed max_context"),
        "unknown model": (dict(messages=messages(good, "hi"), model="gpt-4o"), "unknown model 'gpt-4o'"),
        "sampling": (dict(messages=messages(good, "hi"), temperature=0.8), "decodes greedily"),
        "top_p": (dict(messages=messages(good, "hi"), top_p=0.5), "'top_p' is not supported"),
        "system prompt": (dict(messages=[{"role": "system", "content": "be brief"}, *messages(good, "hi")]),
                          "one user message"),
    }
    for what, (kwargs, expect) in cases.items():
        with pytest.raises(BadRequestError) as e:
            c.chat.completions.create(**{"model": server.name, "max_tokens": 4, **kwargs})
        msg = e.value.body["message"]
        assert e.value.status_code == 400 and expect in msg and "\n" not in msg and "Traceback" not in msg, (what, msg)
    req = urllib.request.Request(server.url + "/chat/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as h:
        urllib.request.urlopen(req, timeout=10)
    assert h.value.code == 400 and "\n" not in json.loads(h.value.read())["error"]["message"]
    assert server.metric('sts_requests_total{outcome="bad_request"}') >= len(cases) + 1
    assert server.metric('sts_requests_total{outcome="error"}') == 0
    text, tokens, _, _ = ask(c, server.name, 1, PROMPTS[1], 5, False)  # still serving
    assert tokens >= 1 and server.proc.poll() is None
    models = json.loads(server.get("/v1/models"))["data"]
    assert [m["id"] for m in models] == [server.name]


def test_full_queue_refuses_at_once_and_a_gone_client_frees_its_slot(llava: Path) -> None:
    """One request at a time, two waiting: the fourth is refused with 429 at once; closing the streams cancels them
    (the engine stops generating for them) and the server answers the next request."""
    from openai import RateLimitError

    s = Server(llava, "--max-batch-requests", "1", "--max-queue", "2", code=SLOW)
    try:
        c = client(s.url)
        streams = []
        for _ in range(3):  # each would take ~ 3 s (300 tokens x 10 ms)
            streams.append(c.chat.completions.create(model=s.name, messages=messages(png(2), PROMPTS[0]),
                                                     max_tokens=300, stream=True))
        first = iter(streams[0])
        next(first), next(first)  # the first is generating
        deadline = time.time() + 10
        while json.loads(s.get("/health"))["queue"] < 2 and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.perf_counter()
        with pytest.raises(RateLimitError) as e:
            c.chat.completions.create(model=s.name, messages=messages(png(2), PROMPTS[0]), max_tokens=4)
        assert e.value.status_code == 429 and time.perf_counter() - t0 < 2.0
        assert "queue is full" in e.value.body["message"]
        def cancelled(n: int) -> float:
            deadline = time.time() + 10
            while s.metric('sts_requests_total{outcome="cancelled"}') < n and time.time() < deadline:
                time.sleep(0.05)
            return s.metric('sts_requests_total{outcome="cancelled"}')

        loops = s.metric("sts_batch_size_count")
        streams[2].close()  # the waiting clients disconnect: their requests leave the queue, never run
        streams[1].close()
        assert cancelled(2) == 2 and json.loads(s.get("/health"))["queue"] == 0
        tokens_before = s.metric("sts_time_per_output_token_seconds_count")
        streams[0].close()  # the running one: it leaves its loop at the next token
        assert cancelled(3) == 3 and json.loads(s.get("/health"))["running"] == 0
        # far short of its 300 tokens, and no loop ran for the two that waited
        assert s.metric("sts_time_per_output_token_seconds_count") - tokens_before < 100
        assert s.metric("sts_batch_size_count") == loops
        assert s.metric('sts_requests_total{outcome="ok"}') == 0
        assert ask(c, s.name, 2, PROMPTS[0], 3, True)[1] == 3  # a slot is free: served
    finally:
        s.close()


@pytest.mark.triton
def test_sixteen_clients_through_triton(llava: Path) -> None:
    """The same load through Triton Inference Server (PyTriton) and tritonclient: answers equal the API's."""
    try:
        import pytriton  # noqa: F401
        import tritonclient.http as httpclient
    except ImportError as e:
        pytest.fail(f"{e}: the Triton test runs where the [triton] extra is installed (its own venv, see .ci/run)")

    s = Server(llava, "--max-batch-requests", "16", "--batch-delay-ms", "2", triton=True)
    try:
        jobs = [(c, r, (c * 3 + r) % 6, PROMPTS[(c + r) % len(PROMPTS)], 6 + (c + 2 * r) % 7)
                for c in range(16) for r in range(3)]
        ref = api_answers(llava, {(seed, p, n) for _, _, seed, p, n in jobs})

        def infer(tc: Any, seed: int, prompt: str, n: int, image: bytes | None = None) -> dict[str, Any]:
            inputs = [httpclient.InferInput("image", [1, 1], "BYTES"), httpclient.InferInput("prompt", [1, 1], "BYTES"),
                      httpclient.InferInput("max_tokens", [1, 1], "INT32")]
            inputs[0].set_data_from_numpy(np.array([[image if image is not None else png(seed)]], dtype=object))
            inputs[1].set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
            inputs[2].set_data_from_numpy(np.array([[n]], dtype=np.int32))
            r = tc.infer(s.name, inputs)
            return {k: r.as_numpy(k)[0] for k in ("text", "finish_reason", "completion_tokens", "kept", "error")}

        tc = httpclient.InferenceServerClient(f"127.0.0.1:{s.port}")
        infer(tc, 99, PROMPTS[0], 8)
        rss_first = s.rss()

        def run_client(c: int) -> list[tuple]:
            own = httpclient.InferenceServerClient(f"127.0.0.1:{s.port}")
            try:
                return [(job, infer(own, *job[2:])) for job in jobs if job[0] == c]
            finally:
                own.close()

        with ThreadPoolExecutor(16) as pool:
            got = [x for rows in pool.map(run_client, range(16)) for x in rows]
        assert len(got) == 48
        for (c, r, seed, prompt, n), out in got:
            assert out["error"][0] == b"", out["error"]
            text, tokens, finish = ref[(seed, prompt, n)]
            assert (out["text"][0].decode(), int(out["completion_tokens"][0]), out["finish_reason"][0].decode()) == \
                (text, tokens, finish), (c, r)
            assert out["kept"].tolist() == [96, 32]
        rss_after = s.rss()
        print(f"Triton: engine RSS after the first request {rss_first / 2**20:.0f} MB, after the load "
              f"{rss_after / 2**20:.0f} MB")
        assert rss_after <= 1.10 * rss_first, (rss_after, rss_first)
        bad = infer(tc, 0, PROMPTS[0], 4, image=b"not an image")  # one row's error, the server serves on
        assert b"not a readable image" in bad["error"][0] and bad["text"][0] == b""
        assert infer(tc, 1, PROMPTS[1], 3)["error"][0] == b""
        tc.close()
    finally:
        s.close()


def test_qwen_requests_run_one_after_another(tmp_root: Path) -> None:
    """Qwen2.5-VL (image-dependent N): concurrent requests are served in turn, each equal to the API's answer."""
    d = exported(tmp_root, "tiny-qwen2.5-vl", "sts", "20%")
    s = Server(d)
    try:
        jobs = [(seed, PROMPTS[seed % 3], 6) for seed in range(6)]
        ref = api_answers(d, set(jobs))
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda j: ask(client(s.url), s.name, *j, stream=j[0] % 2 == 0), jobs))
        for job, (text, tokens, finish, sts) in zip(jobs, got):
            assert (text, tokens, finish) == ref[job] and sts["batch"] == 1
    finally:
        s.close()
