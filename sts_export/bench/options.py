"""What a bench run measures: its options (BenchOptions), the backend names it takes, the configurations
(model x method x budget x weights) and the inputs (image, prompt ids)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from sts_export.bench.cost import DEFAULT_TEXT_TOKENS, DTYPE_BYTES
from sts_export.bench.devices import HOST, get_device
from sts_export.errors import StsError
from sts_export.pruning.budget import METHODS, check_method, parse_budget, split_budget
from sts_export.checkpoint import resolve
from sts_export.export.weights import check_weights
from sts_export.families import recipe_from_hf_config
from sts_export.recipe import available_recipes, load_recipe, with_max_pixels


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
    device: str = "auto"  # the accelerator: auto (cuda when torch sees one), cpu, cuda
    roofline: str | None = None  # roofline profile (devices.load_devices), or "host" (measured)
    roofline_file: str | None = None
    on_device: bool = False  # the --roofline profile is the hardware running the benchmark: report measured/bound
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
    accuracy_level: int | None = None  # MatMulNBits' accuracy_level for ort int8/int4 (None: the exporter's, 4)
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
        if self.device not in ("auto", "cpu", "cuda"):
            raise StsError(f"--device must be auto, cpu or cuda, got '{self.device}'")
        if self.text_tokens is not None and self.text_tokens < 2:
            raise StsError("--text-tokens must be >= 2 (BOS and at least one text token)")
        if self.threads is not None and self.threads < 1:
            raise StsError("--threads must be >= 1")

        self.weights = _unique(self.weights or [self.dtype])
        quant = [w for w in self.weights if w in ("int8", "int4")]
        for w in self.weights:  # one line for a bad --weights/--block-size/--accuracy-level; the latter two apply
            q = w in quant or not quant  # to the quantized entries (float ones beside them ignore them)
            check_weights(w, self.block_size if q else None, dtype=self.dtype,
                          accuracy_level=self.accuracy_level if w in quant or not quant else None)
        if self.roofline is not None and self.roofline != HOST:  # host: measured by run_bench
            get_device(self.roofline, self.roofline_file)  # unknown name -> one-line error listing the valid ones
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
    --roofline take TensorRT's, the one that runs on a GPU); torch runs float weights only."""

    out: list[Config] = []
    target = "trt" if backend == "trt" or backend == "analytic" and opts.roofline is not None else "onnx"
    for w in opts.weights:
        if w in ("int8", "int4") and backend in ("torch", "torch-compile"):
            notes.append(f"{backend}: --weights {w} skipped: the torch backend runs the float weights (quantized "
                         f"weights are an export's: use --backends ort or trt)")
            continue
        try:
            scheme = check_weights(w, opts.block_size if w in ("int8", "int4") else None, target=target, dtype=opts.dtype,
                                   accuracy_level=opts.accuracy_level if w in ("int8", "int4") and target == "onnx" else None)
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

    path = Path(model).expanduser()
    if path.is_dir():
        return with_max_pixels(recipe_from_hf_config(path))
    if model in available_recipes() or path.suffix in (".yaml", ".yml"):
        return with_max_pixels(load_recipe(model))

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


