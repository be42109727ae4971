"""The one generation loop: prefill (vision, embed, segment1, prune, segment2), then greedy decode
with per-segment KV caches, on any backend (`sts_export.artifact.protocol.Backend`), driven by the export
configuration's Plan (`sts_export.artifact.plan`, which also names the graphs' inputs and outputs).

KV caches: one object per segment (`segment_cache`) gives each call its cache feeds and takes its
outputs back. A backend may offer its own (`kv_cache`: preallocated to prompt + new tokens and
updated in place, e.g. ONNX Runtime's ORT form); every other backend gets a ConcatCache (past in,
past + new out). The loop is the same for every method, budget, family and backend.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from sts_export.artifact.plan import Plan
from sts_export.artifact.protocol import Backend, KVCache
from sts_export.errors import StsError
from sts_export.families import ImageInput
from sts_export.families.llava import pixel_input
from sts_export.tokenizer import Prompt, check_prompt_fits


@dataclass
class Generation:
    """Result of one prefill + greedy decode."""

    tokens: np.ndarray  # [B, n] generated ids (rows padded with eos after they finish)
    keep_pre: np.ndarray  # [B, K] kept vision tokens (ascending)
    keep_post: np.ndarray | None  # [B, K'] indices into keep_pre (None without Stage 2)
    first_logits: np.ndarray  # [B, V] logits of the prefill's last position
    s1: int  # prompt length entering the decoder
    s2: int  # prompt length after Stage 2
    cache_lengths: dict[str, int] = field(default_factory=dict)  # per segment: KV entries after prefill
    timings: dict[str, float] = field(default_factory=dict)  # seconds: vision, prefill, ttft, decode (per token)


class ConcatCache:
    """A segment's KV cache as every backend can hold it: past in, past + new out (the graph concatenates;
    each call's presents are the next call's past). The fallback of `segment_cache`."""

    def __init__(self, backend: Backend, plan: Plan, layers: list[int], batch: int) -> None:
        empty = np.zeros((batch, plan.num_kv_heads, 0, plan.head_dim), dtype=plan.dtype)
        self.past = {f"past_{kv}_{i}": backend.from_numpy(empty) for i in layers for kv in ("key", "value")}
        self.length = 0

    def feeds(self, new: int) -> dict[str, Any]:
        return self.past

    def update(self, out: dict[str, Any], new: int) -> None:
        self.past = {k.replace("present_", "past_"): v for k, v in out.items() if k.startswith("present_")}
        self.length += new


def segment_cache(backend: Backend, plan: Plan, graph: str, batch: int, capacity: int) -> KVCache:
    """The KV cache of one segment for `capacity` entries: the backend's own (`kv_cache`, e.g. preallocated and
    updated in place) when it has one for this graph, else a ConcatCache. The loop drives both alike."""
    make = getattr(backend, "kv_cache", None)
    cache = make(graph, plan.segment_layers[graph], batch, capacity) if make is not None else None
    return cache if cache is not None else ConcatCache(backend, plan, plan.segment_layers[graph], batch)


def deepstack_feeds(backend: Backend, plan: Plan, batch: int, planes: Any = None, start: int = 0) -> dict[str, Any]:
    """segment1's DeepStack inputs: `planes` [T,B,K,Hd] to add at sequence rows start..start+K-1, or (None: a decode
    step, or a prefill chunk without image rows) one zero row at row 0, which adds nothing. {} without DeepStack."""
    if not plan.deepstack:
        return {}
    if planes is None:
        assert plan.recipe is not None
        planes = backend.from_numpy(np.zeros((plan.deepstack, batch, 1, plan.recipe.text.hidden_size), plan.dtype))
    return {"deepstack_embeds": planes, "image_start": backend.from_numpy(np.array(start, dtype=np.int64))}


def run_segment(backend: Backend, graph: str, hidden: Any, pos: Any, cache: KVCache, new: int,
                deep: dict[str, Any] | None = None) -> dict[str, Any]:
    """One segment call adding `new` entries to its cache (`deep`: segment1's DeepStack feeds, `deepstack_feeds`).
    A cache with a `prefill_chunk` (ONNX Runtime's CPU in-place cache) takes a longer prefill in chunks of that many
    tokens, each attending to the cache written by the ones before (causal, as one call), each given the DeepStack
    rows that fall in it: the same numbers, but each attention call's score matrix stays small enough for the CPU
    caches. -> the outputs of one call over all `new` tokens."""
    deep = deep or {}
    chunk = getattr(cache, "prefill_chunk", None)
    if not chunk or new <= chunk:
        out = backend.run(graph, {"hidden": hidden, "position_ids": pos, **deep, **cache.feeds(new)})
        cache.update(out, new)
        return out
    h, p = backend.to_numpy(hidden), backend.to_numpy(pos)  # [B, S, Hd], [B, S] | [3, B, S]
    planes = backend.to_numpy(deep["deepstack_embeds"]) if deep else None  # [T, B, K, Hd]
    start = int(backend.to_numpy(deep["image_start"]).reshape(-1)[0]) if deep else 0
    hiddens: list[Any] = []
    for a in range(0, new, chunk):
        n = min(chunk, new - a)
        chunk_deep = {}
        if planes is not None:  # the image rows inside [a, a + n), or one zero row
            lo, hi = max(a, start), min(a + n, start + planes.shape[2])
            rows = np.ascontiguousarray(planes[:, :, lo - start:hi - start]) if lo < hi else np.zeros_like(planes[:, :, :1])
            chunk_deep = {"deepstack_embeds": backend.from_numpy(rows),
                          "image_start": backend.from_numpy(np.array(lo - a if lo < hi else 0, dtype=np.int64))}
        out = backend.run(graph, {"hidden": backend.from_numpy(np.ascontiguousarray(h[:, a:a + n])),
                                  "position_ids": backend.from_numpy(np.ascontiguousarray(p[..., a:a + n])),
                                  **chunk_deep, **cache.feeds(n)})
        cache.update(out, n)
        if "hidden_out" in out:
            hiddens.append(out["hidden_out"])
    if hiddens:  # segment1: every token's hidden state; segment2's logits are the last token's, in the last chunk
        out = {**out, "hidden_out": backend.concat(hiddens, axis=1)}
    return out


def generate(
    backend: Backend,
    plan: Plan,
    image: ImageInput | np.ndarray,
    prompt: Prompt | Sequence[Prompt],
    max_new_tokens: int = 32,
    on_token: Callable[[np.ndarray], np.ndarray | None] | None = None,
    sync: Callable[[], None] | None = None,
    timings: dict[str, float] | None = None,
) -> Generation:
    """Prefill (vision, embed, segment1, prune, segment2) then greedy decode with per-segment KV caches.

    `image` is a family's ImageInput (or pixel_values [B,3,H,W] for fixed-N families). `prompt`: one Prompt
    for every row, or one per row; the graphs take no attention mask, so the rows' prompts must be of equal
    lengths (prefix and suffix). `on_token(next ids [B])` may return a [B] bool mask of rows to end now (a
    caller's own per-row limit, a client gone); the loop stops when every row has ended. `timings`: a dict
    the loop fills as the stages end (vision, prefill, ttft before the first on_token; decode at the end),
    the Generation's own.
    """
    sync = sync or (lambda: None)
    if isinstance(image, np.ndarray):
        assert plan.recipe is not None
        image = pixel_input(image, plan.recipe)
    b = image.batch
    prompts = [prompt] * b if isinstance(prompt, Prompt) else list(prompt)
    if len(prompts) != b or len({(len(p.prefix), len(p.suffix)) for p in prompts}) != 1:
        raise StsError(f"{len(prompts)} prompts for {b} image rows: pass one prompt, or one per row with equal "
                       "token lengths (the graphs take no attention mask)")
    prompt = prompts[0]  # lengths and positions: the same for every row
    prefix = np.stack([p.prefix for p in prompts])  # [B, P]
    suffix = np.stack([p.suffix for p in prompts])  # [B, T]
    k_pre, k_post = plan.image_split(image)  # K: the image tokens entering the decoder (its whole span without Stage 1)
    if plan.recipe is not None:
        check_prompt_fits(plan.recipe, prompt, k_pre, max_new_tokens)  # one line before any graph runs
    length = {"k_pre": np.zeros(k_pre, dtype=np.int64)}  # length-only input: its length is K
    t0 = time.perf_counter()
    vis = backend.run("vision", {n: backend.from_numpy(image.feeds[n] if n in image.feeds else length[n])
                                 for n in plan.vision_inputs})
    keep_pre = backend.to_numpy(vis["keep_pre"])  # [B, K]
    sync()
    t_vis = time.perf_counter()

    def embeds(ids: np.ndarray) -> Any:  # [B, n] -> [B, n, Hd]
        return backend.run("embed", {"input_ids": backend.from_numpy(ids)})["inputs_embeds"]

    pieces = [embeds(prefix)] if len(prompt.prefix) else []  # prefix ids + image + suffix ids
    pieces += [vis["image_embeds"]] + ([embeds(suffix)] if len(prompt.suffix) else [])
    hidden = backend.concat(pieces, axis=1)  # [B, S1, Hd]
    k_img = keep_pre.shape[1]  # image tokens entering the decoder (K; the whole span without Stage 1)
    s1 = len(prompt.prefix) + k_img + len(prompt.suffix)
    prompt_pos = plan.prompt_positions(image, prompt, keep_pre)  # [B, S1] or [3, B, S1]
    next_pos = int(prompt_pos.max()) + 1  # decode step t has id max(prompt ids) + 1 + t (1-D: S1 + t) on every axis
    pos = backend.from_numpy(prompt_pos)
    cache1 = segment_cache(backend, plan, "segment1", b, s1 + max_new_tokens)
    # DeepStack: the kept tokens' planes at their rows of the Stage-1 sequence (prefill only)
    deep = deepstack_feeds(backend, plan, b, vis["deepstack_embeds"], len(prompt.prefix)) if plan.deepstack else {}
    o1 = run_segment(backend, "segment1", hidden, pos, cache1, s1, deep)
    hidden, keep_post = o1["hidden_out"], None
    if plan.has_prune:
        feeds = {"hidden": hidden, "position_ids": pos,
                 "image_start": backend.from_numpy(np.array(len(prompt.prefix), dtype=np.int64))}
        if plan.dynamic:
            feeds["k_pre"] = backend.from_numpy(np.zeros(k_img, dtype=np.int64))
            feeds["k_post"] = backend.from_numpy(np.zeros(k_post, dtype=np.int64))
        pr = backend.run("prune", feeds)
        hidden, pos, keep_post = pr["hidden_out"], pr["position_ids_out"], backend.to_numpy(pr["keep_post"])
    s2 = s1 - k_img + keep_post.shape[1] if keep_post is not None else s1
    cache2 = segment_cache(backend, plan, "segment2", b, s2 + max_new_tokens)
    o2 = run_segment(backend, "segment2", hidden, pos, cache2, s2)
    logits = backend.to_numpy(o2["logits"]).astype(np.float32)  # [B, V]
    t_first = time.perf_counter()
    timings = {} if timings is None else timings
    timings.update(vision=t_vis - t0, prefill=t_first - t_vis, ttft=t_first - t0)
    # entries each segment's KV cache holds after prefill
    lengths = {name: c.length for name, c in (("segment1", cache1), ("segment2", cache2)) if plan.segment_layers[name]}

    tokens = np.zeros((b, 0), dtype=np.int64)
    done = np.zeros(b, dtype=bool)
    step_logits = logits
    stops = np.asarray(plan.stop_token_ids, dtype=np.int64)
    no_deep = deepstack_feeds(backend, plan, b)  # decode steps add no DeepStack rows
    for t in range(max_new_tokens):
        nxt = np.where(done, plan.eos_token_id, step_logits.argmax(-1)).astype(np.int64)  # [B]
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        ended = on_token(nxt) if on_token is not None else None
        done |= np.isin(nxt, stops) | (False if ended is None else np.asarray(ended, dtype=bool))
        if done.all() or t == max_new_tokens - 1:
            break
        h = backend.run("embed", {"input_ids": backend.from_numpy(nxt[:, None])})["inputs_embeds"]
        p = backend.from_numpy(np.full((*prompt_pos.shape[:-1], 1), next_pos + t, dtype=np.int64))  # [B,1] | [3,B,1]
        o1 = backend.run("segment1", {"hidden": h, "position_ids": p, **no_deep, **cache1.feeds(1)})
        cache1.update(o1, 1)
        o2 = backend.run("segment2", {"hidden": o1["hidden_out"], "position_ids": p, **cache2.feeds(1)})
        cache2.update(o2, 1)
        step_logits = backend.to_numpy(o2["logits"]).astype(np.float32, copy=False)
    t_end = time.perf_counter()
    timings["decode"] = (t_end - t_first) / max(tokens.shape[1] - 1, 1)  # per token
    return Generation(tokens=tokens, keep_pre=keep_pre, keep_post=keep_post, first_logits=logits,
                      s1=s1, s2=s2, cache_lengths=lengths, timings=timings)
