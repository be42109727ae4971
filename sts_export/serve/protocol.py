"""OpenAI chat completions: the request as this server takes it, and the response objects it sends.

One user message holding text parts and exactly one `image_url` part whose URL is a `data:` URI
(base64); the server fetches nothing from the network. Decoding is greedy (`temperature` 0 or
omitted); every other sampling parameter is refused in one line unless it has its neutral value.
No HTTP here: `app.py` maps these objects and errors onto FastAPI.
"""
from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from sts_export.errors import StsError
from sts_export.serve.engine import Done, Token


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    """The fields this server reads; others a client sends (`user`, `metadata`, ...) are ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


# sampling and output options the graphs' greedy loop does not offer: refused unless neutral
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "top_p": (None, 1, 1.0), "n": (None, 1), "stop": (None, [], ""), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "best_of": (None, 1),
    "response_format": (None, {"type": "text"}), "top_k": (None, -1, 0), "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "audio": (None,), "modalities": (None, ["text"]),
}


@dataclass(frozen=True)
class Chat:
    """A chat request as the engine takes it."""

    image: bytes
    prompt: str
    max_tokens: int | None
    stream: bool
    include_usage: bool


def parse_chat(req: ChatRequest, model: str) -> Chat:
    """Check a chat request against what this server offers; anything else is a one-line StsError."""
    if req.model != model:
        raise StsError(f"unknown model '{req.model}'; this server serves '{model}' (GET /v1/models)")
    if req.temperature not in (None, 0):
        raise StsError(f"temperature {req.temperature} is not supported: this server decodes greedily; "
                       "set temperature to 0 or omit it")
    extra = req.model_extra or {}
    for name, neutral in NEUTRAL.items():
        if name in extra and extra[name] not in neutral:
            raise StsError(f"'{name}' is not supported (greedy decoding, one answer, plain text); omit it")
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise StsError("max_tokens and max_completion_tokens differ; send one of them")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if not req.messages:
        raise StsError("messages is empty; send one user message with an image and a question")
    roles = [m.role for m in req.messages]
    if roles != ["user"]:
        raise StsError(f"one user message is supported (got roles {roles}): the export answers one question about "
                       "one image, without a system prompt or earlier turns")
    content = req.messages[0].content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else list(content or [])
    texts, images = [], []
    for p in parts:
        if p.type == "text":
            texts.append(p.text or "")
        elif p.type == "image_url" and p.image_url is not None:
            images.append(p.image_url.url)
        else:
            raise StsError(f"content part type '{p.type}' is not supported; send text parts and one image_url part")
    if not images:
        raise StsError("the message holds no image; add one image_url part with a data: URI (data:image/png;base64,...)")
    if len(images) > 1:
        raise StsError(f"the message holds {len(images)} images; this server takes one image per request")
    opts = req.stream_options or {}
    return Chat(decode_data_uri(images[0]), "\n".join(texts), max_tokens, req.stream,
                bool(req.stream and opts.get("include_usage")))


def decode_data_uri(url: str) -> bytes:
    """`data:<media type>;base64,<payload>` -> the bytes; an http(s) URL or anything else is refused in one line."""
    if url.startswith(("http://", "https://")):
        raise StsError("image_url is a web address; the server fetches nothing from the network: send the image "
                       "inline as a data: URI (data:image/png;base64,...)")
    if not url.startswith("data:"):
        raise StsError("image_url must be a data: URI (data:image/png;base64,...)")
    head, sep, payload = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise StsError("image_url: only base64 data: URIs are taken (data:image/png;base64,...)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise StsError("image_url: the data: URI's payload is not valid base64") from None


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class Completion:
    """The response objects of one request: a whole completion or its stream chunks."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, done: Done) -> dict[str, Any]:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.content},
                             "finish_reason": done.finish_reason, "logprobs": None}],
                "usage": done.usage}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    def first(self) -> dict[str, Any]:
        return self.chunk({"role": "assistant", "content": ""})

    def token(self, ev: Token) -> dict[str, Any]:
        return self.chunk({"content": ev.text})

    def last(self, done: Done) -> dict[str, Any]:
        return self.chunk({"content": done.text} if done.text else {}, done.finish_reason)

    def usage(self, done: Done) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": done.usage}
