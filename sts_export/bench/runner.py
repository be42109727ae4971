"""Benchmark: per-phase latency, memory and analytic cost of pruned vs full models, on any backend.

For every (model, backend, method, budget) this times the one generation loop (`runtime.generate`, through
`Pipeline.generate`) and reports, per phase, the median and spread over `repeats` runs after `warmup` runs:

  vision   vision graph: CLIP encoder + Stage 1 selection + projector  (`Generation.timings["vision"]`)
  prefill  embed + segment1 + prune (Stage 2) + segment2 up to the first logits on the host
  ttft     vision + prefill (time to first token)
  decode   mean seconds per decode step of the same run

Per graph call, a thin wrapper around the backend's `run` adds fine-grained times, and memory is recorded per
timed run (sts_export.bench.timing: TimedBackend, PeakMemory). KV cache bytes come from the cache shapes the run
returned (exact); the *_delta_bytes fields are the rise over the memory in use when the run started. Stage 1 is
also timed on its own ("probe"): the same selection function, exported/compiled alone for the backend in use, on
features of the model's shape, so its share of the pruned TTFT can be read off.

Configurations of one backend run interleaved when their weights fit in memory together (all loaded, warm-ups and
repeats round-robin), so a change in machine load - other processes on a shared host, thermal throttling - hits
every configuration alike and the speedups stay fair; otherwise one after the other (--sequential).
Cost: sts_export.bench.cost (analytic FLOPs/bytes per phase, roofline for --device). `--cost-only` needs no weights.

Rows with budget `full` are run once per (model, backend) as method `none` (no pruning: the same graphs for every
method) and serve as the baseline of the speedups: speedup_ttft = ttft(full) / ttft(row), beside
flop_ratio_ttft = FLOPs(vision + prefill, full) / FLOPs(vision + prefill, row).

Here: options (BenchOptions), configurations, export lookup, pipeline loading, the Stage 1 probe, Runner (one loaded
configuration), measure_backend / run_bench. The table, JSON and plot of the result: sts_export.bench.report.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from sts_export.bench.peers import PEERS, add_peer_ratios, load_peer, peer_unavailable
from sts_export.bench.cost import (DEFAULT_TEXT_TOKENS, DTYPE_BYTES, HOST, get_device, kv_cache_bytes, memory_fit, phase_costs, register_device, roofline_terms, sequence_lengths, token_grid, weight_bytes_by_part, with_weight_bytes)
from sts_export.artifact.params import param_counts
from sts_export.bench.report import SCHEMA_VERSION
from sts_export.bench.timing import (STAT_KEYS, PeakMemory, TimedBackend, cpu_model, current_memory,
                                     detect_device_profile, free_memory, gpu_info, load_average, measure_host,
                                     release_memory, stats_ms, system_info, time_repeats, timed_call)
from sts_export.errors import StsError
from sts_export.pruning.budget import METHODS, check_method, has_stage2, parse_budget, split_budget

BACKENDS = {  # CLI name -> canonical
    "torch": "torch", "eager": "torch", "torch-eager": "torch",
    "torch-compile": "torch-compile", "compile": "torch-compile", "torch.compile": "torch-compile",
    "ort": "ort", "onnxruntime": "ort",
    "trt": "trt", "tensorrt": "trt",
    "aoti": "aoti", "aotinductor": "aoti",  # AOTInductor packages (export.py --target aoti), built here
    # peers (sts_export.bench.peers): other runtimes on the same weights and inputs
    "transformers": "transformers", "hf": "transformers",
    "ort-genai": "ort-genai", "genai": "ort-genai", "onnxruntime-genai": "ort-genai",
}
# --ort-forms: the ort backend's decoder graphs and KV cache (backends/onnxruntime.py) -> (form, inplace)
ORT_FORMS = {"auto": ("auto", True),  # the ORT form, in place, when the export has it (what users run)
             "ort": ("ort", True),  # the ORT form, KV cache preallocated and updated in place
             "ort-concat": ("ort", False),  # the ORT form, each call returning past + new (the concatenating cache)
             "portable": ("portable", True)}  # the TensorRT-portable graphs (concatenating cache)
PHASES = ("vision", "prefill", "ttft", "decode")  # timed per run (Generation.timings)
DEFAULT_PROMPT = "What is shown in this image? Answer the question using a single word or phrase."


# ----------------------------------------------------------------------------------------------- options
@dataclass
class BenchOptions:
    """What to benchmark and how (bench.py's options); checked and normalised (canonical names, no repeats) on
    creation, so a bad value is one StsError before anything loads."""

    models: list[str]
    budgets: list[int | str]
    methods: list[str]
    backends: list[str] = field(default_factory=lambda: ["torch"])
    repeats: int = 5
    warmup: int = 1
    max_new_tokens: int = 8
    dtype: str = "fp32"
    accelerator: str = "auto"  # where to run: auto (cuda when torch sees one), cpu, cuda
    device: str | None = None  # roofline profile (cost.load_devices)
    devices_file: str | None = None
    on_device: bool = False  # the --device profile is the hardware running the benchmark: report measured/bound
    random_weights: bool = False
    prompt: str = DEFAULT_PROMPT
    text_tokens: int | None = None  # synthetic prompt of this many text tokens instead of tokenizing --prompt
    image: str | None = None
    exports: str | None = None  # where ORT/TRT exports are looked up and created (default: the sts-export cache)
    stage1_probe: bool = True
    ignore_eos: bool = True
    cost_only: bool = False
    interleave: bool | None = None  # None: when every configuration's weights fit in memory at once
    threads: int | None = None  # intra-op threads for torch and ONNX Runtime (None: their defaults)
    weights: list[str] = field(default_factory=list)  # int8 / int4 / the dtype (float); empty: the dtype
    block_size: int | None = None  # quantization block along K (None: the exporter's default, 128)
    ort_forms: list[str] = field(default_factory=list)  # ORT decoder-graph forms per configuration (ORT_FORMS)
    progress: Callable[[str], None] = lambda s: None

    def __post_init__(self) -> None:
        if not self.models:
            raise StsError("no model given; pass --model NAME (a recipe, a local checkpoint dir or a cached HF id)")
        self.budgets = _unique([parse_budget(b) for b in self.budgets])
        if not self.budgets:
            raise StsError("no budget given; pass --budgets, e.g. full,128,64,32")
        self.methods = _unique([check_method(m) for m in self.methods])
        if not self.methods:
            raise StsError(f"no method given; pass --methods from {', '.join(METHODS)}")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise StsError(f"unknown backend(s) {', '.join(bad)}; choose from torch, torch-compile, ort, trt, aoti, "
                           "transformers, ort-genai")
        self.backends = _unique([BACKENDS[b] for b in self.backends])
        if self.repeats < 1 or self.warmup < 0:
            raise StsError("--repeats must be >= 1 and --warmup >= 0")
        if self.max_new_tokens < 1:
            raise StsError("--max-new-tokens must be >= 1 (2 or more to time decode steps)")
        if self.dtype not in DTYPE_BYTES:
            raise StsError(f"unknown dtype '{self.dtype}'; choose fp32, fp16 or bf16")
        if self.accelerator not in ("auto", "cpu", "cuda"):
            raise StsError(f"--accelerator must be auto, cpu or cuda, got '{self.accelerator}'")
        if self.text_tokens is not None and self.text_tokens < 2:
            raise StsError("--text-tokens must be >= 2 (BOS and at least one text token)")
        if self.threads is not None and self.threads < 1:
            raise StsError("--threads must be >= 1")
        from sts_export.export.weights import check_weights

        self.weights = _unique(self.weights or [self.dtype])
        for w in self.weights:
            check_weights(w, self.block_size, dtype=self.dtype)  # one line for a bad --weights/--block-size
        if self.device is not None and self.device != HOST:  # host: measured by run_bench
            get_device(self.device, self.devices_file)  # unknown name -> one-line error listing the valid ones
        self.ort_forms = _unique(self.ort_forms or ["auto"])
        bad = [f for f in self.ort_forms if f not in ORT_FORMS]
        if bad:
            raise StsError(f"unknown --ort-forms {', '.join(bad)}; choose from {', '.join(ORT_FORMS)}")


def _unique(xs: Iterable[Any]) -> list[Any]:
    """xs without repeats, in first-seen order."""
    out: list[Any] = []
    for x in xs:
        if x not in out:
            out.append(x)
    return out


# ----------------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    model: str
    method: str
    budget: int | str
    k_pre: int
    k_post: int
    scheme: Any = None  # sts_export.export.quantize.Scheme of quantized weights; None: the dtype's float weights
    form: str = "auto"  # ort backend: the decoder graphs and KV cache it runs (ORT_FORMS)

    def weights(self, dtype: str) -> str:
        """The `weights` column: the scheme's label (int4-b128, int8-ch-qdq, ...) or the float dtype."""
        return self.scheme.label if self.scheme is not None else dtype


def configs_per_weights(configs: list[Config], opts: BenchOptions, backend: str, skipped: list[dict[str, Any]],
                 notes: list[str]) -> list[Config]:
    """Every configuration once per --weights entry (quantized for `backend`'s encoding: analytic rows with a
    --device take TensorRT's, the one that runs on a GPU); torch runs float weights only."""
    from sts_export.export.weights import check_weights

    out: list[Config] = []
    target = "trt" if backend == "trt" or backend == "analytic" and opts.device is not None else "onnx"
    for w in opts.weights:
        if w in ("int8", "int4") and backend in ("torch", "torch-compile"):
            notes.append(f"{backend}: --weights {w} skipped: the torch backend runs the float weights (quantized "
                         f"weights are an export's: use --backends ort or trt)")
            continue
        try:
            scheme = check_weights(w, opts.block_size, target=target, dtype=opts.dtype)
        except StsError as e:
            notes.append(f"{backend}: --weights {w} skipped: {e}")
            skipped.append({"backend": backend, "weights": w, "reason": str(e)})
            continue
        forms = opts.ort_forms if backend == "ort" else ["auto"]
        out += [dataclasses.replace(c, scheme=scheme, form=f) for f in forms for c in configs]
    return out


def configs_for(recipe: Any, model: str, methods: list[str], budgets: list[int | str],
                skipped: list[dict[str, Any]], backend: str = "*") -> list[Config]:
    """`full` once (method none) first, then every method x pruned budget; out-of-range ones are skipped."""
    out: list[Config] = []
    if "full" in budgets or "none" in methods:
        n = recipe.num_image_tokens
        out.append(Config(model, "none", "full", n, n))
    for method in methods:
        if method == "none":
            continue
        for budget in budgets:
            if budget == "full":
                continue
            try:
                k, k2 = split_budget(budget, recipe, method)
            except StsError as e:
                skipped.append({"model": model, "method": method, "budget": budget, "backend": backend,
                                "reason": str(e)})
                continue
            out.append(Config(model, method, budget, k, k2))
    return out


def recipe_of(model: str) -> Any:
    """The recipe of --model without loading weights (recipe name, local checkpoint dir, or error); for dynamic
    resolution (Qwen2.5-VL) with an export's default pixel cap, which every backend then runs at."""
    from sts_export.families import recipe_from_hf_config
    from sts_export.recipe import available_recipes, load_recipe, with_max_pixels

    path = Path(model).expanduser()
    if path.is_dir():
        return with_max_pixels(recipe_from_hf_config(path))
    if model in available_recipes() or path.suffix in (".yaml", ".yml"):
        return with_max_pixels(load_recipe(model))
    from sts_export.checkpoint import resolve

    return with_max_pixels(resolve(model).recipe)  # a cached HF id (reads config.json only)


# ----------------------------------------------------------------------------------------------- inputs
def bench_image(size: int = 500, seed: int = 0, aspect: float = 0.8) -> Any:
    """A deterministic smooth random photo-like image (blocks + noise): nearby patches are similar.

    size x (aspect * size) pixels; anyres families get a square one (aspect 1), whose 2x2 tiles keep
    every token after unpad: 5 x 576 = 2880 candidates, the paper's LLaVA-NeXT setting.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (8, 10, 3)).astype(np.uint8)
    img = Image.fromarray(blocks).resize((size, int(size * aspect)), Image.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (int(size * aspect), size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def default_image(recipe: Any) -> Any:
    """The bench's image when none is given: 500 x 400; anyres (LLaVA-NeXT) a square 500 x 500 (5 x 576
    candidates); dynamic resolution (Qwen2.5-VL) 640 x 480 (391 tokens after smart_resize)."""
    if recipe.image_processor.max_pixels:
        return bench_image(size=640, aspect=0.75)
    return bench_image(aspect=1.0 if recipe.dynamic_tokens else 0.8)


def prompt_ids(pipe: Any, prompt: str, text_tokens: int | None) -> np.ndarray:
    """Token ids with one image token: the tokenized --prompt (recipe template), or, with --text-tokens or when
    the model has no tokenizer, a fixed pseudo-prompt of that many text tokens (default cost.DEFAULT_TEXT_TOKENS)
    laid out like LLaVA's template: BOS + 4 tokens ("USER:") + image + the rest."""
    r = pipe.recipe
    if text_tokens is None and pipe.tokenizer is not None:
        pr = pipe.encode(prompt)
        return np.concatenate([pr.prefix, [r.image_token_id], pr.suffix]).astype(np.int64)
    t = text_tokens or DEFAULT_TEXT_TOKENS
    specials = {r.image_token_id, r.bos_token_id, r.eos_token_id, r.pad_token_id, r.vision_start_token_id,
                r.vision_end_token_id}
    pool = np.array([i for i in range(5, min(r.text.vocab_size, 1024)) if i not in specials], dtype=np.int64)
    text = np.random.default_rng(0).choice(pool, size=t - 1)
    p = min(4, t - 1)
    if r.vision_start_token_id >= 0 and p < t - 1:  # Qwen2.5-VL: the pad between <|vision_start|>, <|vision_end|>
        text[p - 1], text[p] = r.vision_start_token_id, r.vision_end_token_id
    return np.concatenate([[r.bos_token_id], text[:p], [r.image_token_id], text[p:]]).astype(np.int64)


def interleaved_generations(pipes: dict[str, Any], rounds: int, new_tokens: int,
                            warmup_tokens: int = 4) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pipelines of one model (label -> Pipeline) timed against each other in one process: one warm-up generation
    each (creates every session), then `rounds` rounds that run every pipeline once, in the order given, on the
    bench's image and pseudo-prompt (DEFAULT_TEXT_TOKENS text ids around the image).
    -> (label -> seconds [rounds, len(PHASES)], label -> the last round's greedy tokens [B, n])."""
    first = next(iter(pipes.values()))
    ids, img = prompt_ids(first, "", DEFAULT_TEXT_TOKENS), default_image(first.recipe)
    for p in pipes.values():
        p.generate(img, input_ids=ids, max_new_tokens=warmup_tokens)
    times: dict[str, list[list[float]]] = {k: [] for k in pipes}
    tokens: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for label, p in pipes.items():
            g = p.generate(img, input_ids=ids, max_new_tokens=new_tokens)
            times[label].append([g.timings[ph] for ph in PHASES])
            tokens[label] = g.tokens
    return {k: np.array(v) for k, v in times.items()}, tokens


# ----------------------------------------------------------------------------------------------- exports
def _cache_root() -> Path:
    from sts_export import checkpoint

    return Path(checkpoint.CACHE_DIR)


def _recipe_digest(recipe: Any) -> str:
    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _export_roots(opts: BenchOptions) -> list[Path]:
    """Where exports are looked up: --exports (or the cache's bench-exports, where new ones go) first, then
    ./exports."""
    root = Path(opts.exports) if opts.exports else _cache_root() / "bench-exports"
    return _unique([root, Path("exports")])


def _export_matches(d: Path, recipe: Any, cfg: Config, dtype: str, random_weights: bool, engines: bool,
                    aoti: str | None = None) -> bool:
    from sts_export.artifact.manifest import read_manifest

    if not (d / "manifest.json").is_file():
        return False
    try:
        m = read_manifest(d, verify=False)
    except StsError:
        return False
    same_recipe = json.loads(json.dumps(m.get("recipe"))) == json.loads(json.dumps(recipe.to_dict()))
    same_config = (m.get("k_pre"), m.get("k_post")) == (cfg.k_pre, cfg.k_post) and (
        cfg.budget == "full" and m.get("budget") == "full" or (m.get("method"), m.get("budget")) == (cfg.method, cfg.budget))
    has_engines = all("engine" in g for g in m.get("graphs", {}).values())
    if aoti is not None:  # AOTInductor packages for this device, built by this torch (else: ONNX graphs)
        import torch

        built = m.get("aoti") or {}
        if not (all("aoti" in g for g in m.get("graphs", {}).values()) and built.get("device") == aoti
                and built.get("torch_version") == torch.__version__):
            return False
    elif not all("onnx" in g for g in m.get("graphs", {}).values()):
        return False
    same_weights = (m.get("weights") or {}).get("label") == (cfg.scheme.label if cfg.scheme is not None else None)
    from sts_export.artifact.manifest import ort_form_is_current

    if aoti is None and not engines and "ort_form" in m and not ort_form_is_current(m):
        return False  # an older ORT form: export anew rather than time what users no longer get
    return (same_recipe and same_config and same_weights and m.get("dtype") == dtype
            and bool(m.get("model", {}).get("random_weights")) == random_weights and (has_engines or not engines))


def find_export(recipe: Any, cfg: Config, dtype: str, random_weights: bool, roots: list[Path],
                engines: bool = False, aoti: str | None = None) -> Path | None:
    """An existing export directory for this configuration under any of `roots` (one level deep)."""
    for root in roots:
        if not root.is_dir():
            continue
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if _export_matches(d, recipe, cfg, dtype, random_weights, engines, aoti):
                return d
    return None


def find_trt_export(recipe: Any, cfg: Config, opts: BenchOptions) -> Path | None:
    """An existing export with TensorRT engines for this configuration (engines are built by export.py, not here)."""
    return find_export(recipe, cfg, opts.dtype, opts.random_weights, _export_roots(opts), engines=True)


def _no_trt_export(what: str, opts: BenchOptions) -> str:
    return (f"no TensorRT export of {what} ({opts.dtype}) under {_export_roots(opts)[0]} or ./exports; build one with "
            "export.py --target trt and pass --exports DIR")


def ensure_onnx_export(model: str, recipe: Any, cfg: Config, opts: BenchOptions) -> Path:
    """Reuse a matching export (--exports, ./exports, the cache) or export one into --exports / the cache
    (validate=False: the export's correctness is the exporter's tests' business, not the benchmark's)."""
    from sts_export.export.onnx import export

    roots = _export_roots(opts)
    root = roots[0]
    found = find_export(recipe, cfg, opts.dtype, opts.random_weights, roots)
    if found is not None:
        opts.progress(f"  reusing export {found}")
        return found
    suffix = "-rw" if opts.random_weights else ""
    q = cfg.scheme
    suffix += f"-{q.label}" if q is not None else ""
    out = root / f"{recipe.name}-{_recipe_digest(recipe)}-{cfg.method}-b{cfg.budget}-{opts.dtype}{suffix}"
    opts.progress(f"  exporting {model} {cfg.method} b={cfg.budget} to {out} (once; reused later) ...")
    _, secs = timed_call(lambda: export(model, budget=cfg.budget, method=cfg.method, out=out, dtype=opts.dtype,
                                        random_weights=opts.random_weights, validate=False, force=True,
                                        weights=q.weights if q else None, block_size=q.block_size if q else None,
                                        progress=lambda s: None))
    opts.progress(f"  exported in {secs:.0f} s")
    return out


def ensure_aoti_export(model: str, recipe: Any, cfg: Config, opts: BenchOptions, device: str) -> Path:
    """Reuse a matching AOTInductor export (this device and torch) or compile one into --exports / the cache;
    packages already compiled for the same graph (embed, segments) come from the cache's .aoti-packages."""
    from sts_export.export.aoti import export_aoti

    roots = _export_roots(opts)
    found = find_export(recipe, cfg, opts.dtype, opts.random_weights, roots, aoti=device)
    if found is not None:
        opts.progress(f"  reusing AOTInductor export {found}")
        return found
    suffix = "-rw" if opts.random_weights else ""
    out = roots[0] / f"{recipe.name}-{_recipe_digest(recipe)}-{cfg.method}-b{cfg.budget}-{opts.dtype}-aoti-{device}{suffix}"
    opts.progress(f"  compiling AOTInductor packages of {model} {cfg.method} b={cfg.budget} to {out} (once) ...")
    _, secs = timed_call(lambda: export_aoti(model, budget=cfg.budget, method=cfg.method, out=out, dtype=opts.dtype,
                                             random_weights=opts.random_weights, force=True, device=device,
                                             cache=roots[0] / ".aoti-packages", progress=lambda s: None))
    opts.progress(f"  compiled in {secs:.0f} s")
    return out


def _aoti_packages(export_dir: str) -> dict[str, Any] | None:
    """Per graph: compile seconds, package bytes, cache hit (from an AOTInductor export's manifest)."""
    from sts_export.artifact.manifest import read_manifest

    try:
        m = read_manifest(Path(export_dir), verify=False)
    except StsError:
        return None
    return {g: {k: e["aoti"][k] for k in ("compile_s", "size_bytes", "cached")} for g, e in m["graphs"].items()}


# ----------------------------------------------------------------------------------------------- pipelines
def _want_cuda(opts: BenchOptions) -> bool:
    import torch

    if opts.accelerator == "cuda" and not torch.cuda.is_available():
        raise StsError("--accelerator cuda: torch sees no CUDA GPU; use --accelerator cpu")
    return opts.accelerator == "cuda" or opts.accelerator == "auto" and torch.cuda.is_available()


def backend_unavailable(backend: str, opts: BenchOptions) -> str | None:
    """Why a backend cannot run here (None when it can)."""
    if backend in PEERS:
        return peer_unavailable(backend, opts, _want_cuda(opts))
    if backend == "ort" and importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)"
    if backend == "trt":
        from sts_export.export.tensorrt.build import require_tensorrt

        try:
            require_tensorrt()
        except StsError as e:
            return str(e)
        import torch

        if not torch.cuda.is_available():
            return "TensorRT needs a CUDA GPU; torch sees none"
    if backend == "aoti":
        from sts_export.export.aoti import check_aoti_device

        try:
            check_aoti_device("cuda" if _want_cuda(opts) else "cpu")
        except StsError as e:
            return str(e)
    if backend == "torch-compile" and not _want_cuda(opts):
        if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
            return "torch.compile on CPU needs a C++ compiler (g++/clang++) for inductor; none found"
    return None


def load_pipeline(model: str, recipe: Any, cfg: Config, backend: str, opts: BenchOptions) -> Any:
    from sts_export.pipeline import Pipeline

    cuda = _want_cuda(opts)
    if backend in ("torch", "torch-compile"):  # dynamic resolution: the same pixel cap as the exports (recipe_of)
        return Pipeline.from_pretrained(model, budget=cfg.budget, method=cfg.method, backend="torch", dtype=opts.dtype,
                                        device="cuda" if cuda else "cpu", random_weights=opts.random_weights,
                                        compile=backend == "torch-compile",
                                        max_pixels=recipe.image_processor.max_pixels or None)
    if opts.dtype == "bf16":
        raise StsError("ONNX exports are fp32 or fp16; run the ort/trt backends with --dtype fp32 or fp16")
    from sts_export.pipeline import load_export_pipeline

    if backend == "aoti":
        dev = "cuda" if cuda else "cpu"
        return load_export_pipeline(ensure_aoti_export(model, recipe, cfg, opts, dev), backend="aoti", device=dev)
    if backend == "ort":
        d = ensure_onnx_export(model, recipe, cfg, opts)
        form, inplace = ORT_FORMS[cfg.form]
        return load_export_pipeline(d, backend="onnxruntime", device="cuda" if cuda else "cpu", threads=opts.threads,
                                    form=form, inplace=inplace)
    # trt: engines come from export.py --target trt; the benchmark does not build them
    d = find_trt_export(recipe, cfg, opts)
    if d is None:
        raise StsError(_no_trt_export(f"{model} {cfg.method} b={cfg.budget}", opts))
    return load_export_pipeline(d, backend="tensorrt")


# ----------------------------------------------------------------------------------------------- Stage 1 probe
def _stage1_module(method: str, k: int, anchor: str) -> Any:
    """Stage 1 alone, as the vision graph runs it (`keep_first_k`: the greedy's ONNX Loop, K = K_max)."""
    import torch

    from sts_export.pruning.loop import keep_first_k

    class Stage1(torch.nn.Module):
        def forward(self, x: torch.Tensor, cls_att: torch.Tensor) -> torch.Tensor:
            return keep_first_k(method, x, k, k, anchor, cls_att)  # cls_att is read by `cls` and anchor saliency only

    return Stage1().eval()


def _stage1_inputs(recipe: Any, method: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = recipe.num_image_tokens
    c = recipe.text.hidden_size if method == "divprune" else recipe.vision.hidden_size
    return rng.standard_normal((1, n, c)).astype(np.float32), rng.random((1, n)).astype(np.float32)


def stage1_probe(pipe: Any, cfg: Config, backend: str, opts: BenchOptions) -> tuple[list[float], str | None]:
    """Seconds per Stage 1 call alone (the same selection code, on this backend), or ([], why not)."""
    if cfg.budget == "full" or cfg.method in ("fastv", "none"):
        return [], None
    import torch

    recipe, anchor = pipe.recipe, pipe.anchor
    mod = _stage1_module(cfg.method, cfg.k_pre, anchor)
    x, cls_att = _stage1_inputs(recipe, cfg.method)
    warm, reps = max(opts.warmup, 1), max(opts.repeats, 10)
    if backend in ("torch", "torch-compile"):
        dev = torch.device("cuda" if _want_cuda(opts) else "cpu")
        xt, ct = torch.from_numpy(x).to(dev), torch.from_numpy(cls_att).to(dev)
        f = torch.compile(mod, dynamic=False) if backend == "torch-compile" else mod

        def run() -> None:
            with torch.inference_mode():
                f(xt, ct)

        return time_repeats(run, warm, reps, torch.cuda.synchronize if dev.type == "cuda" else None), None
    if backend == "ort":
        import onnxruntime as ort

        d = _cache_root() / "bench-exports" / "stage1"
        d.mkdir(parents=True, exist_ok=True)
        # "loop2": the batched Loop (GatherND rows); files named "-loop" / "-unrolled" hold earlier forms
        path = d / f"{cfg.method}-n{x.shape[1]}-c{x.shape[2]}-k{cfg.k_pre}-{anchor}-loop2.onnx"
        if not path.is_file():
            import warnings

            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                from sts_export.pruning.loop import translation_table

                prog = torch.onnx.export(mod, (torch.from_numpy(x), torch.from_numpy(cls_att)), dynamo=True,
                                         custom_translation_table=translation_table(),
                                         input_names=["features", "cls_attention"], output_names=["keep_pre"],
                                         opset_version=18, optimize=True, verbose=False)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            prog.save(str(tmp))
            os.replace(tmp, path)
        inner = getattr(pipe.backend, "inner", pipe.backend)
        sess = ort.InferenceSession(str(path), getattr(inner, "opts", None),
                                    providers=getattr(inner, "providers", ["CPUExecutionProvider"]))
        feeds = {i.name: {"features": x, "cls_attention": cls_att}[i.name] for i in sess.get_inputs()}
        return time_repeats(lambda: sess.run(None, feeds), warm, reps), None
    return [], f"Stage 1 probe not implemented for backend {backend} (its time is inside vision_ms)"


# ----------------------------------------------------------------------------------------------- rows
def cost_fields(recipe: Any, method: str, budget: int | str, dtype: str, text_tokens: int, decode_context: int,
                device: str | None, devices_file: str | None, image_size: tuple[int, int] | None = None,
                scheme: Any = None, new_tokens: int = 0) -> dict[str, Any]:
    """A row's analytic fields: flops_/bytes_ per phase (cost.phase_costs) and, with a device, the roofline.
    `image_size` (width, height): the image of dynamic-resolution recipes (Qwen2.5-VL), whose N it sets.
    `scheme` (quantized weights): the weight traffic at its bytes; every row gets the analytic weight bytes and the
    memory it needs resident after `new_tokens` decode steps (cost.memory_fit), with a device whether it fits."""
    costs = phase_costs(recipe, budget, method, dtype=dtype, prompt_tokens=text_tokens, decode_context=decode_context,
                        image_size=image_size)
    out: dict[str, Any] = {}
    for ph, c in costs.items():
        out[f"flops_{ph}"] = c.flops
        out[f"bytes_{ph}"] = c.bytes
    out["flops_stage1"] = costs["vision"].detail.get("stage1", 0.0)
    out["flops_stage2"] = costs["prefill"].detail.get("stage2", 0.0)
    q = scheme
    parts = weight_bytes_by_part(recipe, dtype, q.weights if q else None, q.block_size if q else None,
                                 q.encoding if q else "matmulnbits", bool(q and q.quantize_vision))
    if q is not None:
        costs = with_weight_bytes(costs, parts, has_stage2(method, budget))
        for ph, c in costs.items():
            out[f"bytes_{ph}"] = c.bytes
    out["weight_bytes_analytic"] = float(sum(parts.values()))
    dev = get_device(device, devices_file) if device is not None else None
    seq = sequence_lengths(recipe, budget, method, text_tokens, image_size)
    out.update(memory_fit(recipe, seq, dtype, parts, new_tokens, dev))
    if device is not None:
        terms = roofline_terms(costs, dev)
        out["roofline_device"] = device
        for ph, t in terms.items():
            out[f"{ph}_roofline_ms"] = t["bound_ms"]
            out[f"{ph}_bound"] = t["bound"]
        out["ttft_roofline_ms"] = terms["vision"]["bound_ms"] + terms["prefill"]["bound_ms"]
    return out


def _blank_timing() -> dict[str, Any]:
    """The measured fields of a row, all empty (--cost-only rows)."""
    row: dict[str, Any] = {}
    for ph in PHASES:
        for s in STAT_KEYS:
            row[f"{ph}_ms_{s}"] = None
    row.update(stage1_ms_median=None, stage1_ms_iqr=None, stage1_share_ttft=None, peak_rss_bytes=None,
               peak_gpu_bytes=None, peak_mem_bytes=None, graph_ms_median={}, samples_ms={})
    return row


def _export_weight_bytes(export_dir: str) -> int | None:
    """Bytes of an export's ONNX graphs (weights included: `.onnx` + `.onnx.data`), from its manifest."""
    from sts_export.artifact.manifest import read_manifest

    d = Path(export_dir)
    try:
        m = read_manifest(d, verify=False)
    except StsError:
        return None
    files = [g["onnx"] for g in m["graphs"].values()] + [g["external_data"]["file"] for g in m["graphs"].values()
                                                          if "external_data" in g]
    return int(sum((d / f).stat().st_size for f in files))


class Runner:
    """One loaded configuration: its pipeline wrapped for timing, its inputs, and the samples taken so far."""

    def __init__(self, model: str, recipe: Any, cfg: Config, backend: str, opts: BenchOptions, image: Any) -> None:
        self.model, self.cfg, self.backend, self.opts = model, cfg, backend, opts
        self.cuda = _want_cuda(opts)
        self.pipe = load_pipeline(model, recipe, cfg, backend, opts)
        self.recipe = self.pipe.recipe
        self.image = self.pipe.prepare_image(image)  # the family's vision-graph inputs
        self.weight_bytes = _export_weight_bytes(self.pipe.source) if backend in ("ort", "trt") else None
        self.ids = prompt_ids(self.pipe, opts.prompt, opts.text_tokens)
        events = self.cuda and backend in ("torch", "torch-compile", "trt", "aoti")
        self.timed = TimedBackend(self.pipe.backend, self.recipe.eos_token_id if opts.ignore_eos else None, events)
        self.pipe.backend = self.timed
        self.mem = PeakMemory(self.cuda and backend != "ort")
        self.samples: dict[str, list[float]] = {ph: [] for ph in PHASES}
        self.per_graph: dict[str, list[float]] = {}
        self.peak_rss = self.peak_gpu = 0
        self.delta_rss = self.delta_gpu = 0
        self.gen: Any = None

    def run(self, record: bool) -> None:
        """One generation; with record, its timings and peak memory are kept."""
        if record:
            rss0, gpu0 = current_memory(self.mem.cuda)
            self.mem.start()
        gen = self.pipe.generate(self.image, input_ids=self.ids, max_new_tokens=self.opts.max_new_tokens)
        calls = self.timed.take_calls()
        if not record:
            return
        rss, gpu = self.mem.stop()
        self.peak_rss, self.delta_rss = max(self.peak_rss, rss), max(self.delta_rss, rss - rss0)
        if gpu is not None:
            self.peak_gpu, self.delta_gpu = max(self.peak_gpu, gpu), max(self.delta_gpu, gpu - (gpu0 or 0))
        self.gen = gen
        for ph in PHASES:
            self.samples[ph].append(gen.timings[ph])
        totals: dict[str, float] = {}
        for label, secs in calls:
            totals[label] = totals.get(label, 0.0) + secs
        n_dec = max(gen.tokens.shape[1] - 1, 1)
        for label, secs in totals.items():  # per run; decode graphs per decode step
            self.per_graph.setdefault(label, []).append(secs / n_dec if label.endswith("_decode") else secs)

    def row(self) -> dict[str, Any]:
        """The row of this configuration from the samples recorded so far (runs the Stage 1 probe)."""
        opts, cfg, gen, plan = self.opts, self.cfg, self.gen, self.pipe.plan
        s1_samples, s1_note = stage1_probe(self.pipe, cfg, self.backend, opts) if opts.stage1_probe else ([], None)
        torch_backend = self.backend in ("torch", "torch-compile")
        dtype_bytes = DTYPE_BYTES[opts.dtype] if torch_backend else np.dtype(plan.dtype).itemsize
        per_entry = 2 * plan.num_kv_heads * plan.head_dim * dtype_bytes  # K and V of one token in one layer
        lengths = gen.cache_lengths  # entries per segment after prefill, read off the returned cache tensors
        batch = self.image.batch
        kv = batch * per_entry * (plan.prune_layer * lengths.get("segment1", 0)
                                  + (plan.num_layers - plan.prune_layer) * lengths.get("segment2", 0))
        text_tokens = int(len(self.ids) - 1)
        n_tok = int(gen.tokens.shape[1])
        row: dict[str, Any] = {
            "model": self.model, "recipe": self.recipe.name, "method": cfg.method, "budget": cfg.budget,
            "backend": self.backend, "dtype": opts.dtype, "device": _device_name(self.backend, self.cuda, self.pipe),
            "weights": cfg.weights(opts.dtype),
            **({"graph_form": _graph_form(self.timed.inner)} if self.backend == "ort" else {}),
            # K, K' this image got (read off the run; for image-dependent N the export's own are K_max, K'_max)
            "k_pre": int(gen.keep_pre.shape[1]),
            "k_post": int(gen.keep_post.shape[1]) if gen.keep_post is not None else int(gen.keep_pre.shape[1]),
            "prune_layer": plan.prune_layer, "text_tokens": text_tokens,
            "seq_len_stage1": gen.s1, "seq_len_stage2": gen.s2, "kv_cache_bytes": int(kv),
            "kv_cache_bytes_final": int(kv + batch * per_entry * plan.num_layers * max(n_tok - 1, 0)),
            "keep_pre_shape": list(gen.keep_pre.shape),
            "keep_post_shape": None if gen.keep_post is None else list(gen.keep_post.shape),
            "repeats": opts.repeats, "warmup": opts.warmup, "max_new_tokens": opts.max_new_tokens,
            "decode_steps": max(n_tok - 1, 0), "ignore_eos": opts.ignore_eos,
        }
        for ph in PHASES:
            for k, v in stats_ms(self.samples[ph]).items():
                row[f"{ph}_ms_{k}"] = v if ph != "decode" or n_tok >= 2 else None
        s1st = stats_ms(s1_samples)
        row["stage1_ms_median"], row["stage1_ms_iqr"] = s1st["median"], s1st["iqr"]
        row["stage1_share_ttft"] = s1st["median"] / row["ttft_ms_median"] if s1st["median"] is not None else None
        if s1_note:
            row["stage1_note"] = s1_note
        gpu = self.peak_gpu if self.mem.cuda else None
        row.update(peak_rss_bytes=int(self.peak_rss), peak_rss_delta_bytes=int(self.delta_rss), peak_gpu_bytes=gpu,
                   peak_gpu_delta_bytes=int(self.delta_gpu) if self.mem.cuda else None,
                   peak_mem_bytes=int(gpu if gpu is not None else self.peak_rss))
        row["graph_ms_median"] = {k: stats_ms(v)["median"] for k, v in self.per_graph.items()}
        row["samples_ms"] = {ph: [x * 1e3 for x in self.samples[ph]] for ph in PHASES}
        if s1_samples:
            row["samples_ms"]["stage1"] = [x * 1e3 for x in s1_samples]
        size = tuple(self.image.size) if self.recipe.image_processor.max_pixels else None  # Qwen: this image's N
        row.update(cost_fields(self.recipe, cfg.method, cfg.budget, opts.dtype, text_tokens,
                               max(n_tok - 2, 0) // 2, opts.device, opts.devices_file, size,
                               scheme=cfg.scheme, new_tokens=opts.max_new_tokens))
        row["weight_bytes"] = self.weight_bytes if self.weight_bytes is not None else row["weight_bytes_analytic"]
        row["weight_bytes_source"] = "export files" if self.weight_bytes is not None else "analytic"
        if self.backend == "aoti":  # per graph: compile seconds and package bytes
            row["aoti_packages"] = _aoti_packages(self.pipe.source)
        if size is not None:
            row["image_size"], row["n_tokens"] = list(size), int(self.image.n)
        return row

    def close(self) -> None:
        self.pipe.backend = self.timed.inner
        self.pipe = self.timed = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------------------------- measuring a backend
def weight_bytes(recipe: Any, dtype: str) -> int:
    """Bytes of the weights one loaded configuration holds (vision layers used, projector, decoder, embeddings)."""
    p = param_counts(recipe)
    return (p["vision"] + p["projector"] + p["decoder"] + p["lm_head"] + p["embed"]) * DTYPE_BYTES[dtype]


def check_fits(recipe: Any, opts: BenchOptions) -> None:
    """Refuse a configuration whose weights alone exceed the free memory (rather than being OOM-killed)."""
    need = weight_bytes(recipe, opts.dtype)
    free, what = free_memory(_want_cuda(opts))
    if need > 0.9 * free:
        raise StsError(f"{recipe.name} at {opts.dtype} needs {need / 1e9:.1f} GB for its weights alone, but only "
                       f"{free / 1e9:.1f} GB of {what} is left; use --dtype fp16, a GPU, or the synthetic "
                       f"CPU-sized recipe llava-1.5-7b-cpu")


def interleave_fits(recipe: Any, n_configs: int, opts: BenchOptions) -> bool:
    """Whether every configuration of a backend can be loaded at once (weights x configs < half the memory)."""
    return weight_bytes(recipe, opts.dtype) * n_configs * 1.5 < 0.5 * free_memory(_want_cuda(opts))[0]


def measure_backend(model: str, recipe: Any, configs: list[Config], backend: str, opts: BenchOptions, image: Any,
                    interleave: bool, peers: Iterable[str] = (),
                    peer_errors: list[tuple[str, BaseException, str]] | None = None) -> list[dict[str, Any]]:
    """Rows for every configuration of one backend, and of the `peers` (sts_export.bench.peers) measured with them.
    Interleaved: all loaded, warm-ups and repeats round-robin (so a change in machine load hits every configuration
    and peer alike); else one after the other. A peer that fails (to load or to run) is dropped and reported in
    `peer_errors` as (peer, exception, traceback); the other rows are kept."""
    cuda = _want_cuda(opts)
    check_fits(recipe, opts)
    loaders: list[tuple[str, str | None, Callable[[], Any]]] = [  # (label, peer or None, load)
        (f"{cfg.method} b={cfg.budget} (K={cfg.k_pre}, K'={cfg.k_post})" + (f" {cfg.form}" if cfg.form != "auto" else ""),
         None,
         lambda cfg=cfg: Runner(model, recipe, cfg, backend, opts, image)) for cfg in configs]
    loaders += [(f"peer {p}", p, lambda p=p: load_peer(p, model, recipe, opts, image, cuda, _export_roots(opts)[0]))
                for p in peers]

    def guarded(peer: str | None, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """(True, fn()); for a peer, (False, None) when fn raises (the error kept in peer_errors)."""
        if peer is None or peer_errors is None:
            return True, fn()
        try:
            return True, fn()
        except Exception as e:  # noqa: BLE001 - a failing peer must not lose our rows
            peer_errors.append((peer, e, traceback.format_exc()))
            opts.progress(f"  peer {peer} failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
            return False, None

    rows: list[dict[str, Any]] = []
    if interleave:
        runners: list[tuple[str | None, Any]] = []

        def run_all(record: bool) -> None:
            for peer, r in list(runners):
                if not guarded(peer, lambda: r.run(record=record))[0]:
                    runners.remove((peer, r))
                    r.close()

        try:
            for label, peer, fn in loaders:
                opts.progress(f"{model} | {backend} | loading {label}")
                ok, r = guarded(peer, fn)
                if ok:
                    runners.append((peer, r))
            for _ in range(opts.warmup):
                run_all(False)
            for i in range(opts.repeats):
                opts.progress(f"{model} | {backend} | round {i + 1}/{opts.repeats}")
                run_all(True)
            for _, r in runners:
                rows.append(r.row())
                _progress_row(opts, rows[-1])
        finally:
            for _, r in runners:
                r.close()
            runners.clear()
            release_memory(cuda)
        return rows
    for label, peer, fn in loaders:
        opts.progress(f"{model} | {backend} | {label} ...")
        ok, runner = guarded(peer, fn)
        if not ok:
            continue
        try:
            def measure() -> dict[str, Any]:
                for _ in range(opts.warmup):
                    runner.run(record=False)
                for _ in range(opts.repeats):
                    runner.run(record=True)
                return runner.row()

            ok, row = guarded(peer, measure)
            if ok:
                rows.append(row)
                _progress_row(opts, rows[-1])
        finally:
            runner.close()
            runner = None
            release_memory(cuda)
    return rows


def _progress_row(opts: BenchOptions, row: dict[str, Any]) -> None:
    def ms(ph: str) -> str:
        v = row[f"{ph}_ms_median"]
        return "-" if v is None else f"{v:.1f}"

    who = f"peer {row['backend']} ({row['scope']})" if row.get("peer") else f"{row['method']} b={row['budget']}"
    opts.progress(f"  {who}: ttft {ms('ttft')} ms (vision {ms('vision')}, prefill {ms('prefill')}), decode "
                  f"{ms('decode')} ms/token")


def _graph_form(backend: Any) -> str:
    """The ORT backend's decoder graphs and cache as they ran: ort/in-place, ort/concat or portable/concat."""
    form = backend.form
    return f"{form}/{'in-place' if form == 'ort' and backend.inplace else 'concat'}"


def _device_name(backend: str, cuda: bool, pipe: Any) -> str:
    if backend == "ort":
        return getattr(getattr(pipe.backend, "inner", pipe.backend), "device_type", "cpu")
    return "cuda" if cuda else "cpu"


def cost_image_size(recipe: Any, image: Any) -> tuple[int, int] | None:
    """(width, height) of the bench image where it sets N (dynamic resolution: Qwen2.5-VL), else None."""
    if not recipe.image_processor.max_pixels:
        return None
    return tuple((image if image is not None else default_image(recipe)).size)


def cost_row(model: str, recipe: Any, cfg: Config, opts: BenchOptions, image: Any = None) -> dict[str, Any]:
    """An analytic-only row (--cost-only): no weights, no timings."""
    t = opts.text_tokens or None
    size = cost_image_size(recipe, image)
    seq = sequence_lengths(recipe, cfg.budget, cfg.method, t, size)
    row: dict[str, Any] = {
        "model": model, "recipe": recipe.name, "method": cfg.method, "budget": cfg.budget, "backend": "analytic",
        "dtype": opts.dtype, "device": None, "k_pre": seq.k_pre, "k_post": seq.k_post,
        "prune_layer": seq.prune_layer, "text_tokens": seq.text_tokens, "seq_len_stage1": seq.s1,
        "seq_len_stage2": seq.s2,
        "kv_cache_bytes": kv_cache_bytes(recipe, seq.s1, seq.s2, DTYPE_BYTES[opts.dtype], prune_layer=seq.prune_layer),
        "repeats": 0, "warmup": 0, "max_new_tokens": opts.max_new_tokens,
    }
    row.update(_blank_timing())
    row.update(cost_fields(recipe, cfg.method, cfg.budget, opts.dtype, seq.text_tokens,
                           max(opts.max_new_tokens - 2, 0) // 2, opts.device, opts.devices_file, size,
                           scheme=cfg.scheme, new_tokens=opts.max_new_tokens))
    row["weights"] = cfg.weights(opts.dtype)
    row["weight_bytes"], row["weight_bytes_source"] = row["weight_bytes_analytic"], "analytic"
    if size is not None:
        rows, cols = token_grid(recipe, size)
        row["image_size"], row["n_tokens"] = list(size), rows * cols
    return row


def add_ratios(rows: list[dict[str, Any]], on_device: str | None) -> None:
    """Speedups over the `full` row of the same model/backend, beside the analytic FLOP ratios; measured/bound."""
    for row in rows:
        base = next((r for r in rows if r["budget"] == "full" and r["model"] == row["model"]
                     and r["backend"] == row["backend"] and r["dtype"] == row["dtype"]
                     and r.get("weights") == row.get("weights") and r.get("graph_form") == row.get("graph_form")),
                    None)
        row.update(speedup_ttft=None, speedup_prefill=None, flop_ratio_ttft=None, flop_ratio_prefill=None,
                   speedup_over_flop_ratio=None)
        if base is not None:
            row["flop_ratio_ttft"] = (base["flops_vision"] + base["flops_prefill"]) / (row["flops_vision"] + row["flops_prefill"])
            row["flop_ratio_prefill"] = base["flops_prefill"] / row["flops_prefill"]
            if row["ttft_ms_median"] and base["ttft_ms_median"]:
                row["speedup_ttft"] = base["ttft_ms_median"] / row["ttft_ms_median"]
                row["speedup_prefill"] = base["prefill_ms_median"] / row["prefill_ms_median"]
                row["speedup_over_flop_ratio"] = row["speedup_ttft"] / row["flop_ratio_ttft"]
        if on_device and "ttft_roofline_ms" in row and row.get("ttft_ms_median") is not None:
            for ph in PHASES:
                bound, meas = row.get(f"{ph}_roofline_ms"), row.get(f"{ph}_ms_median")
                row[f"{ph}_measured_over_bound"] = meas / bound if bound and meas is not None else None
        if row.get("ttft_ms_median"):
            for ph, fl in (("vision", row["flops_vision"]), ("prefill", row["flops_prefill"])):
                ms = row.get(f"{ph}_ms_median")
                row[f"{ph}_gflops_per_s"] = fl / (ms * 1e6) if ms else None


# ----------------------------------------------------------------------------------------------- driver
def _trt_configs(recipe: Any, configs: list[Config], opts: BenchOptions, skipped: list[dict[str, Any]],
                 notes: list[str]) -> list[Config]:
    """The configurations that have a TensorRT export (engines are built by export.py, not here)."""
    keep = []
    for cfg in configs:
        if find_trt_export(recipe, cfg, opts):
            keep.append(cfg)
            continue
        why = _no_trt_export(f"{cfg.method} b={cfg.budget}", opts)
        notes.append(f"trt {cfg.method} b={cfg.budget} skipped: {why}")
        skipped.append({"model": cfg.model, "method": cfg.method, "budget": cfg.budget, "backend": "trt", "reason": why})
    return keep


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """All configurations -> {"schema_version", "system", "options", "rows", "skipped", "notes"}."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    notes: list[str] = []
    if opts.threads is not None and not opts.cost_only:
        import torch

        torch.set_num_threads(opts.threads)
    system = system_info()
    system["load_average_start"] = load_average()
    image = opts.image
    if image is not None:
        from sts_export.families.llava import load_image

        image = load_image(image)
    on_device = None
    if opts.device == HOST:  # this machine, measured now: the roofline of every row is its own
        opts.progress("measuring this machine (--device host): memory read bandwidth and fp32 GEMM throughput ...")
        dev = measure_host(opts.threads)
        register_device(dev)
        system["host_profile"] = dataclasses.asdict(dev)
        opts.progress(f"  host: {dev.bandwidth_gbs:.1f} GB/s read, {dev.fp32_tflops * 1e3:.0f} GFLOP/s fp32")
        on_device = HOST if not opts.cost_only else None
    elif opts.device is not None and not opts.cost_only:
        if opts.on_device or detect_device_profile() == opts.device:
            on_device = opts.device
        else:
            notes.append(f"roofline for --device {opts.device}; measured/bound is reported only on that device "
                         f"(this machine: {', '.join(g['name'] for g in gpu_info()) or cpu_model()}; "
                         "pass --on-device if the profile describes it)")
    for model in opts.models:
        recipe = recipe_of(model)
        if opts.cost_only:
            for cfg in configs_per_weights(configs_for(recipe, model, opts.methods, opts.budgets, skipped, "analytic"),
                                    opts, "analytic", skipped, notes):
                rows.append(cost_row(model, recipe, cfg, opts, image))
            continue
        img = image if image is not None else default_image(recipe)
        peer_errors: list[tuple[str, BaseException, str]] = []
        pending: list[str] = []  # peers that can run: they join the round-robin of the first of our backends that runs
        for backend in opts.backends:
            why = backend_unavailable(backend, opts)
            if why:
                notes.append(f"backend {backend} skipped: {why}")
                skipped.append({"model": model, "backend": backend, "reason": why})
                opts.progress(f"skip {backend}: {why}")
                continue
            if backend in PEERS:
                pending.append(backend)
                continue
            configs = configs_per_weights(configs_for(recipe, model, opts.methods, opts.budgets, skipped, backend), opts,
                                   backend, skipped, notes)
            if backend == "trt":
                configs = _trt_configs(recipe, configs, opts, skipped, notes)
            if not configs:
                continue
            interleave = (opts.interleave if opts.interleave is not None
                          else interleave_fits(recipe, len(configs) + len(pending), opts))
            if interleave and len(configs) + len(pending) > 1:
                notes.append(f"{model} {backend}: configurations interleaved (all loaded; warm-ups and repeats "
                             "round-robin); peak RSS/GPU include every loaded configuration, *_delta_bytes do not")
            if pending:
                notes.append(f"{model}: peers {', '.join(pending)} measured with {backend}'s configurations "
                             f"({'in the same round-robin' if interleave else 'one after the other'})")
            try:
                rows += measure_backend(model, recipe, configs, backend, opts, img, interleave, pending, peer_errors)
                pending = []
            except StsError as e:
                if backend != "trt":  # a user-facing problem (missing weights, bad option): stop with one line
                    raise
                notes.append(f"backend trt skipped: {e}")
                skipped.append({"model": model, "backend": backend, "reason": str(e)})
            except Exception as e:  # noqa: BLE001 - a failing backend must not lose the other backends' rows
                why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                notes.append(f"backend {backend} FAILED on {model}: {why} (--json FILE keeps the traceback under 'failures')")
                failures.append({"model": model, "backend": backend, "error": why,
                                 "traceback": traceback.format_exc()})
                opts.progress(f"  {backend} failed: {why}")
        if pending:  # no backend of ours ran: the peers alone
            interleave = opts.interleave if opts.interleave is not None else interleave_fits(recipe, len(pending), opts)
            try:
                rows += measure_backend(model, recipe, [], "peers", opts, img, interleave, pending, peer_errors)
            except Exception as e:  # noqa: BLE001 - as for a backend of ours
                peer_errors.append((", ".join(pending), e, traceback.format_exc()))
        for peer, e, tb in peer_errors:
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            notes.append(f"peer {peer} FAILED on {model}: {why} (--json FILE keeps the traceback under 'failures')")
            failures.append({"model": model, "backend": peer, "error": why, "traceback": tb})
    add_ratios(rows, on_device)
    add_peer_ratios(rows)
    for s in skipped:
        if "method" in s and s.get("backend") in ("*", "analytic", opts.backends[0]):
            notes.append(f"{s['method']} b={s['budget']} skipped: {s['reason']}")
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k != "progress"}
    system["load_average_end"] = load_average()
    busy = max(system["load_average_start"] or [0])
    if not opts.cost_only and busy > (system["cpu_affinity"] or system["cpu_cores_logical"] or 1) + 0.5:
        notes.append(f"the machine was busy before the run (1/5/15-min load average {system['load_average_start']} "
                     f"on {system['cpu_affinity'] or system['cpu_cores_logical']} cores): other processes competed "
                     "for the CPU, so absolute timings are noisy; interleaving keeps the ratios fair")
    return {"schema_version": SCHEMA_VERSION, "system": system, "options": options, "rows": rows,
            "skipped": skipped, "failures": failures, "notes": _unique(notes)}
