"""Validation after export: ONNX Runtime vs the torch graphs, per graph on real inputs and end to end,
with one ONNX Runtime session alive at a time.

1. torch reference: the generation loop runs on the torch graphs (already in memory for the export)
   for batch 1 and 2. Every graph call's outputs are kept (KV caches only as shapes) and the feeds of
   each graph's first prefill and first decode call. For fp16/bf16 exports the reference computes in
   float32 on the export's own weights (`Fp32Compute`): the exact value the graphs approximate. torch's
   own float16 CPU kernels are the *less* exact side (ONNX Runtime accumulates in float32), so they are
   never the reference.
2. `release_torch=True` (the export's call): the torch weights are freed in place.
3. One graph at a time, in the order the loop first calls them: its ONNX Runtime session is loaded,
   compared with torch on the recorded feeds, then the loop runs again per batch with that graph live
   on ONNX Runtime, the graphs before it replaying their ONNX Runtime outputs and the graphs after it
   replaying torch's; the session is deleted before the next graph's is loaded. The graphs that select
   (vision, prune) run with their selection tensors exposed (`selection_probe`), and their picks are checked
   against the plain reference selectors (`pruning.reference`) on those very tensors: bit-identical, always.

End to end is therefore staged, not one free-running ONNX Runtime loop: decode steps are fed torch's
greedy tokens (teacher forcing). In the last stage every graph's outputs are ONNX Runtime's and the
tokens are argmaxes of ONNX Runtime's logits, so the tokens agree with torch's if and only if a
free-running ONNX Runtime generation's would (by induction over the steps); up to the first
disagreement they are the free-running tokens, after it the teacher-forced predictions. The cost is
one session load per graph (as before) and the same ONNX Runtime compute as one generation per batch.

What each dtype promises (and what fails the export):

* fp32: picks identical to the reference's, every float within the recipe's fp32 tolerance, greedy tokens
  identical.
* fp16 / bf16: (a) selection is exact on the graph's own tensors (Stage 1 picks = Algorithm 1 on the graph's
  own distances and anchor; Stage 2 / cls picks = the top-k of the graph's own scores); (b) every float within
  the dtype's tolerance of the float32 reference, on the tokens both kept where a graph's picks differ; (c) the
  kept sets agree with the float32 reference's to the stated degree (`AGREEMENT`: the share of the reference's
  tokens kept, and the set's objective, e.g. STS's potential energy, within a stated margin of the
  reference set's); (d) the first-token logits within the dtype's tolerance of the float32 reference run with
  the *same* kept tokens (the reference is re-run with the candidate's picks when they differ, reloading the
  weights if they were freed). Greedy tokens are reported, not required: fp16 rounding flips near-ties.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
import torch

from sts_export.export.compare import compare_generations, same_kept
from sts_export.export.precision import (PROBE, Fp32Compute, ProbeBackend, agreement, agreement_line, check_selection,
                                         compare_graph, forced_picks, selection_inputs, selection_probe)
from sts_export.artifact.memory import fmt, forget_onnx_rewriter_state, peak_rss, release_memory, rss
from sts_export.recipe import Recipe
from sts_export.backends.torch import TorchBackend
from sts_export.families import ImageInput, family_module
from sts_export.generate import Generation, generate
from sts_export.artifact.plan import Plan
from sts_export.tokenizer import Prompt, TextTokenizer, split_ids
from sts_export.artifact.manifest import read_manifest
from sts_export.backends.onnxruntime import OrtBackend

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
STAGED = ("staged: one ONNX Runtime session at a time; decode steps fed torch's tokens, so tokens agree iff "
          "a free-running ONNX Runtime loop's would (ort_tokens are free-running up to first_divergence)")
REFERENCE = {"fp32": "torch, float32",
             "low": "torch computing in float32 on the export's {dtype} weights (Fp32Compute): the exact value the "
                    "graphs approximate; torch's own {dtype} CPU kernels are less exact than ONNX Runtime's, which "
                    "accumulate in float32, so they are never the reference"}
def _phase(graph: str, feeds: dict[str, Any]) -> str:
    s = feeds.get("hidden", feeds.get("input_ids"))
    return "decode" if graph != "vision" and s is not None and s.ndim >= 2 and s.shape[1] == 1 else "prefill"


def _stub(x: np.ndarray) -> np.ndarray:
    """A zero-memory stand-in with x's shape and dtype (replayed KV caches are only passed back in)."""
    return np.broadcast_to(np.zeros((), dtype=x.dtype), x.shape)


def _is_stub(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.size > 1 and not any(x.strides)


def _traced(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: _stub(v) if k.startswith("present_") else v for k, v in out.items() if not k.startswith(PROBE)}


class RecordingBackend(TorchBackend):
    """A torch backend that keeps every call's outputs per graph (`trace`, KV caches as shapes only),
    the order graphs are first called in, and the feeds + outputs of each graph's first prefill and decode."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.calls: dict[str, dict[str, Any]] = {}  # "graph/phase" -> feeds (numpy)
        self.outputs: dict[str, dict[str, np.ndarray]] = {}  # "graph/phase" -> outputs (numpy)
        self.trace: dict[str, list[dict[str, np.ndarray]]] = {}
        self.order: list[str] = []

    def new_trace(self) -> dict[str, list[dict[str, np.ndarray]]]:
        self.trace = {}
        return self.trace

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        out = super().run(graph, feeds)
        host = {k: self.to_numpy(v) for k, v in out.items()}
        key = f"{graph}/{_phase(graph, feeds)}"
        if key not in self.calls:
            self.calls[key] = {k: self.to_numpy(v).copy() for k, v in feeds.items()}
            self.outputs[key] = {k: v.copy() for k, v in host.items()}
        if graph not in self.order:
            self.order.append(graph)
        self.trace.setdefault(graph, []).append(_traced(host))
        return out


def cast_feeds(feeds: dict[str, Any], dtypes: dict[str, str]) -> dict[str, Any]:
    """Float host arrays cast to the graph's input dtypes (the float32 reference's hidden states into fp16 graphs)."""
    out = {}
    for k, v in feeds.items():
        want = dtypes.get(k)
        if want is not None and isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.dtype != np.dtype(want):
            v = v.astype(want)
        out[k] = v
    return out


class StagedBackend:
    """numpy backend for one stage: `live` runs on `backend`; every other graph replays `replay[graph]`
    (its outputs of the same generation, call by call). The live graph's outputs are traced, and its first
    call's outputs kept whole (`first`, selection probes included)."""

    name = "staged"

    def __init__(self, live: str, backend: Any, replay: dict[str, list[dict[str, np.ndarray]]],
                 dtypes: dict[str, str]) -> None:
        self.live, self.backend, self.replay, self.dtypes = live, backend, replay, dtypes
        self.count: dict[str, int] = {}
        self.trace: list[dict[str, np.ndarray]] = []
        self.first: dict[str, np.ndarray] | None = None

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        i = self.count[graph] = self.count.get(graph, -1) + 1
        if graph == self.live:
            if any(_is_stub(v) for v in feeds.values()):
                raise RuntimeError(f"validation: a replayed KV cache reached live graph {graph}")
            out = self.backend.run(graph, cast_feeds(feeds, self.dtypes))
            if self.first is None:
                self.first = dict(out)
            self.trace.append(_traced(out))
            return out
        calls = self.replay.get(graph, [])
        if i >= len(calls):
            raise RuntimeError(f"validation: the loop called {graph} more often than when it was recorded")
        return dict(calls[i])

    def from_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def concat(self, xs: list[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(xs, axis=axis)


def sample_inputs(export_dir: Path, recipe: Recipe, batch: int = 1) -> tuple[ImageInput, Prompt]:
    """A deterministic synthetic image (a batch of rotations of it; image-dependent-N families take one
    image per call, so batch 2 gives the rotated image alone: another aspect ratio, another N) and a
    prompt (tokenized when the export has a tokenizer, else the family's raw prompt). The image is 480 x 360,
    halved until its unpruned span leaves room for the prompt within max_prompt_tokens (a model with a short
    context: every budget's validation, `full` included, then has an image it can take)."""
    family = family_module(recipe.family)
    if (export_dir / "tokenizer.json").is_file():
        prompt = TextTokenizer(export_dir, recipe).encode_prompt("What is shown in this image?")
    else:
        prompt = split_ids(family.raw_prompt_ids(recipe), recipe)
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    room = recipe.max_prompt_tokens - len(prompt.prefix) - len(prompt.suffix)
    w, h = 480, 360
    while True:
        img = base.resize((w, h), Image.BILINEAR)
        images = [img.rotate(90 * i, expand=True) for i in range(batch)]
        pv = family.prepare_image(images[-1:] if recipe.dynamic_tokens else images, recipe)
        if pv.n_full <= room or min(w, h) < 32:
            return pv, prompt
        w, h = w // 2, h // 2


def run_loop(backend: Any, plan: Plan, image: Any, prompt: Prompt, new_tokens: int) -> Generation:
    """The validation's only call of the generation loop (torch reference and every stage)."""
    return generate(backend, plan, image, prompt, new_tokens)


def release_weights(modules: dict[str, torch.nn.Module]) -> None:
    """Free every parameter's and buffer's storage of `modules` in place (they are unusable afterwards).

    onnxscript's module-level rewrite rules keep their last match, i.e. the last exported graph's ONNX
    IR, whose initialisers wrap our parameters (and numpy views of them): that is dropped first, then
    each storage is resized to 0, so the memory goes even where something else still holds a tensor."""
    forget_onnx_rewriter_state()
    with torch.no_grad():
        for m in modules.values():
            for t in [*m.parameters(), *m.buffers()]:
                if t.device.type == "meta":
                    continue
                try:
                    t.untyped_storage().resize_(0)
                except RuntimeError:  # storage shared with a numpy array still alive somewhere
                    t.data = torch.empty(0, dtype=t.dtype)
    release_memory()


def _io_dtypes(manifest: dict[str, Any], graph: str) -> dict[str, str]:
    return {i["name"]: i["dtype"] for i in manifest["graphs"][graph]["inputs"]}


def validate_export(export_dir: Path, graphs: dict[str, torch.nn.Module], plan: Plan, recipe: Recipe,
                    dtype: torch.dtype, new_tokens: int = 8, *, release_torch: bool = False,
                    reload: Callable[[], dict[str, torch.nn.Module]] | None = None,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compare ORT with torch: each graph on the feeds of a real prefill/decode, then greedy tokens end to end.

    One ONNX Runtime session is alive at a time (see the module docstring). `release_torch=True` frees
    the torch weights of `graphs` once the torch reference is recorded (the export's call: its peak
    then stays the export's own); the modules are unusable afterwards. `reload` rebuilds them, for the
    reduced-precision check that re-runs the reference with the graphs' own picks when they differ.
    """

    say = progress or (lambda s: None)
    t_all = time.perf_counter()
    peak_before = peak_rss()  # the export's own peak, when called by export()
    dname = DTYPE_NAMES[dtype]
    low = dname != "fp32"
    tol = getattr(recipe.tolerance, dname)
    mode = Fp32Compute if low else contextlib.nullcontext
    manifest = read_manifest(export_dir)
    torch_be = RecordingBackend(graphs, plan)
    inputs = {batch: sample_inputs(export_dir, recipe, batch) for batch in (1, 2)}
    refs: dict[int, Generation] = {}
    torch_traces: dict[int, dict[str, list]] = {}
    features: dict[int, list] = {}
    t = time.perf_counter()
    with mode():
        for batch, (pv, prompt) in inputs.items():
            torch_traces[batch] = torch_be.new_trace()
            refs[batch] = run_loop(torch_be, plan, pv, prompt, new_tokens)
            features[batch] = selection_inputs(graphs["vision"], pv, plan) if low else []
    seconds: dict[str, float] = {"torch_reference": round(time.perf_counter() - t, 2)}
    memory: dict[str, int] = {"rss_torch_reference": rss()}
    say(f"validation: torch reference ({REFERENCE['fp32'] if not low else 'float32 compute on the ' + dname + ' weights'}"
        f", batch 1 and 2, {new_tokens} tokens) {seconds['torch_reference']:.1f} s, RSS {fmt(memory['rss_torch_reference'])}")
    del torch_be.graphs
    if release_torch:
        release_weights(graphs)
        memory["rss_torch_released"] = rss()
        say(f"validation: torch weights freed, RSS {fmt(memory['rss_torch_released'])}")

    loop_graphs = [g for g in torch_be.order if g in manifest["graphs"]]  # in the order the loop first calls them
    order = loop_graphs + [g for g in manifest["graphs"] if g not in loop_graphs]
    results: dict[str, Any] = {"graphs": {}, "selection": {}, "end_to_end": {}}
    ort_traces: dict[int, dict[str, list]] = {b: {} for b in inputs}
    final: dict[int, Generation] = {}
    ok = True
    work = Path(tempfile.mkdtemp(prefix=".validation-", dir=export_dir))
    try:
        for i, g in enumerate(order, 1):
            t = time.perf_counter()
            probe, found = selection_probe(export_dir / manifest["graphs"][g]["onnx"], work) \
                if g in ("vision", "prune") else (None, {})
            be: Any = ProbeBackend(probe, g) if found else \
                OrtBackend(export_dir, manifest, device="cpu", form="portable", resident=False)
            dtypes = _io_dtypes(manifest, g)
            for key, feeds in torch_be.calls.items():
                if key.split("/")[0] != g:
                    continue
                got_out = be.run(g, cast_feeds(feeds, dtypes))
                rows = compare_graph(g, got_out, torch_be.outputs[key], feeds, tol, dname)
                results["graphs"][key] = rows
                ok &= all(r["ok"] for r in rows)
                del got_out
            session_rss = rss()
            if g in loop_graphs:
                for batch, (pv, prompt) in inputs.items():
                    # graphs staged before g replay their ONNX Runtime outputs, the ones after it torch's
                    replay = {h: ort_traces[batch].get(h, calls) for h, calls in torch_traces[batch].items()}
                    staged = StagedBackend(g, be, replay, dtypes)
                    gen = run_loop(staged, plan, pv, prompt, refs[batch].tokens.shape[1])
                    ort_traces[batch][g] = staged.trace
                    if found:  # the picks of the staged run, against the reference selectors on its own tensors
                        sel = check_selection(plan.method, staged.first, g)
                        if sel is not None:
                            results["selection"][f"{g}/batch{batch}"] = sel
                            ok &= sel["ok"]
                    if g == loop_graphs[-1]:
                        final[batch] = gen
                    del staged
            del be
            release_memory()
            seconds[g] = round(time.perf_counter() - t, 2)
            memory[f"rss_{g}_session"] = session_rss
            say(f"validation [{i}/{len(order)}] {g}: ONNX Runtime session alone, RSS {fmt(session_rss)}, {seconds[g]:.1f} s")
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)

    same_picks: dict[int, Generation] = {}
    if low and any(b in final and not all(same_kept(refs[b], final[b])) for b in inputs):
        t = time.perf_counter()
        same_picks = _reference_with_picks(graphs if not release_torch else None, reload, plan, inputs, final, new_tokens)
        seconds["reference_with_graph_picks"] = round(time.perf_counter() - t, 2)
        say(f"validation: the kept sets differ from the float32 reference's; reference re-run with the graphs' picks "
            f"{seconds['reference_with_graph_picks']:.1f} s")
    for batch, ref in refs.items():
        got = final.get(batch)
        if got is None:  # the last stage did not run (no graph of the loop in the manifest)
            results["end_to_end"][f"batch{batch}"] = {"ok": False, "error": "no end-to-end stage ran"}
            ok = False
            continue
        e2e = {**compare_generations(ref, got, tol, dname),
               "torch_tokens": ref.tokens.tolist(), "ort_tokens": got.tokens.tolist(), "s1": ref.s1, "s2": ref.s2}
        if not low:
            e2e_ok = e2e["keep_pre_identical"] and e2e["keep_post_identical"] and e2e["first_logits"]["ok"] and \
                e2e["tokens_identical"]
        else:
            agree = agreement(plan.method, ref, got, features[batch])
            e2e["agreement"] = agree
            if batch in same_picks:  # logits against the float32 reference that kept the graph's tokens
                e2e["first_logits_same_picks"] = compare_generations(same_picks[batch], got, tol, dname)["first_logits"]
            logits = e2e.get("first_logits_same_picks", e2e["first_logits"])
            # greedy tokens may legitimately diverge on near-ties at reduced precision: reported, not required
            e2e_ok = agree["ok"] and logits["ok"]
        results["end_to_end"][f"batch{batch}"] = {**e2e, "ok": e2e_ok}
        ok &= e2e_ok
    if "ort_form" in manifest:  # the decoder graphs users run on ONNX Runtime: free-running, in place, vs torch
        t = time.perf_counter()
        results["ort_form"] = validate_ort_form(export_dir, manifest, plan, inputs, refs, tol, dname)
        ok &= all(r["ok"] for r in results["ort_form"].values())
        seconds["ort_form"] = round(time.perf_counter() - t, 2)
        say(f"validation: ORT form (fused kernels, in-place KV cache) end to end {seconds['ort_form']:.1f} s")
    bad = [f"{k}:{r['output']}" for k, rows in results["graphs"].items() for r in rows if not r["ok"]]
    bad += [f"selection:{k}" for k, r in results["selection"].items() if not r["ok"]]
    bad += [f"end_to_end:{k}" + (f" (agreement below the floor: {', '.join(r['agreement']['below'])})"
                                 if not r.get("agreement", {}).get("ok", True) else "")
            for k, r in results["end_to_end"].items() if not r["ok"]]
    bad += [f"ort_form:{k}" for k, r in results.get("ort_form", {}).items() if not r["ok"]]
    results["passed"] = bool(ok)
    results["summary"] = "all outputs within tolerance" if ok else "mismatch in " + ", ".join(bad[:6])
    results["dtype"], results["tolerance"] = str(dtype).replace("torch.", ""), tol
    results["reference"] = REFERENCE["fp32"] if not low else REFERENCE["low"].format(dtype=dname)
    seconds["total"] = round(time.perf_counter() - t_all, 2)
    memory["peak_rss_before"], memory["peak_rss"] = peak_before, peak_rss()
    results["end_to_end_mode"] = STAGED
    results["seconds"], results["memory_bytes"] = seconds, memory
    raised = "did not raise it" if memory["peak_rss"] <= peak_before else f"raised it to {fmt(memory['peak_rss'])}"
    say(f"validation: done in {seconds['total']:.1f} s; process peak RSS before validation {fmt(peak_before)}, "
        f"validation {raised}")
    if low:
        say("validation: " + agreement_line(results))
    return results


def _reference_with_picks(graphs: dict[str, torch.nn.Module] | None, reload: Callable[[], dict] | None, plan: Plan,
                          inputs: dict[int, tuple[ImageInput, Prompt]], final: dict[int, Generation],
                          new_tokens: int) -> dict[int, Generation]:
    """The float32 reference re-run with each batch's picks forced to the graphs' (weights reloaded when freed)."""
    if graphs is None:
        if reload is None:
            return {}
        graphs = reload()
    out: dict[int, Generation] = {}
    be = TorchBackend(graphs, plan)
    try:
        with Fp32Compute():
            for batch, (pv, prompt) in inputs.items():
                got = final[batch]
                with forced_picks(graphs, got.keep_pre, got.keep_post):
                    out[batch] = run_loop(be, plan, pv, prompt, new_tokens)
    finally:
        if reload is not None:
            release_weights(graphs)
    return out


def validate_ort_form(export_dir: Path, manifest: dict[str, Any], plan: Plan, inputs: dict[int, tuple[ImageInput, Prompt]],
                      refs: dict[int, Generation], tol: float, dtype: str) -> dict[str, Any]:
    """The ORT form (ORT-form segments, portable vision/embed/prune) free-running per batch, KV cache in place:
    greedy tokens, keep_pre, keep_post and first-token logits against the torch reference. All of the export's
    ONNX Runtime sessions are alive at once here (as when users run it)."""

    be = OrtBackend(export_dir, manifest, device="cpu", form="ort")
    out: dict[str, Any] = {}
    for batch, (pv, prompt) in inputs.items():
        ref = refs[batch]
        got = run_loop(be, plan, pv, prompt, ref.tokens.shape[1])
        row = {**compare_generations(ref, got, tol, dtype), "ort_tokens": got.tokens.tolist()}
        row["ok"] = row["keep_pre_identical"] and row["keep_post_identical"] and row["first_logits"]["ok"] and (
            row["tokens_identical"] or dtype != "fp32")
        out[f"batch{batch}"] = row
    del be
    release_memory()
    return out
