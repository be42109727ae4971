"""The command line's option groups: every option is declared here once, with one meaning and one default, and the
commands subscribe to the groups they need (as Polygraphy's tools do to its argument groups).

    model       --model, --recipe, --random-weights, --max-pixels
    pruning     --method, --budget, --anchor
    precision   --dtype, --weights, --block-size, --quantize-vision, --accuracy-level
    inputs      --image, --prompt, --input-ids, --max-new-tokens
    runtime     --backend, --device, --threads
    tensorrt    --trt-version

`--device` is always the accelerator (auto, cpu, cuda); the bench's roofline profile is `--roofline`. Backends are
named one way everywhere (`sts_export.backends.open`): ort, trt, aoti, torch (onnxruntime, onnx, tensorrt also read).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from sts_export.backends.open import ALIASES, EXPORT_BACKENDS
from sts_export.errors import StsError
from sts_export.pruning.budget import METHODS
from sts_export.recipe import ANCHORS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
DTYPES = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
MAX_NEW_TOKENS = 32
ENVIRONMENT = """\b
Environment:
  STS_CACHE                  where synthetic checkpoints and the bench's exports go [~/.cache/sts-export]
  STS_RECIPES                the recipes directory [the package's recipes/]
  STS_DEVICES                the bench's roofline profiles (YAML) [sts_export/bench/data/devices.yaml]
  STS_ORT_SPIN               ONNX Runtime thread spinning: run (spin within a run), 0, 1 [run]
  STS_ORT_PREFILL_CHUNK      prefill tokens per ONNX Runtime call on CPU, 0 = one call [256; 512 for heads of 64+]
  STS_ORT_CACHE              0: do not save or reuse optimized ONNX Runtime sessions (<export>/ort_cache) [1]
  STS_FAKE_AVAILABLE_MEMORY  pretend this machine has that much free memory, e.g. 12G (tests)
  HF_HUB_CACHE, HF_HOME      where cached Hugging Face models are looked up (nothing is downloaded)"""


def group(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Several click options as one decorator, in the order given."""
    def apply(f: Any) -> Any:
        for o in reversed(options):
            f = o(f)
        return f
    return apply


def split_list(value: str | None) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'] (comma-separated option values)."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def choice_of(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """One line when `value` is not one of `allowed`."""
    if value not in allowed:
        raise StsError(f"{name} must be one of {', '.join(allowed)}, got '{value}'")
    return value


# ---- model
MODEL = click.option("--model", "--models", "model", default=None,
                     help="A recipe name (see recipes/) or recipe YAML file, a local checkpoint directory or an HF id "
                          "in the local cache; bench: several, comma-separated.")
RECIPE = click.option("--recipe", default=None, help="Recipe name or YAML path for the architecture and pruning "
                                                     "defaults [derived from the checkpoint's config.json].")
RANDOM_WEIGHTS = click.option("--random-weights", is_flag=True,
                              help="The recipe's full-size architecture with seeded random weights (no checkpoint).")
MAX_PIXELS = click.option("--max-pixels", type=int, default=None,
                          help="Dynamic-resolution models (Qwen2.5-VL): the largest image area served; N, K_max and "
                               "the TensorRT profiles follow [the recipe's, at most 1280*28*28 = 1003520].")
model_options = group(MODEL, RECIPE, RANDOM_WEIGHTS, MAX_PIXELS)

# ---- pruning
METHOD = click.option("--method", type=click.Choice(METHODS), default="sts", show_default=True,
                      help="Token pruning method.")
BUDGET = click.option("--budget", default="64", show_default=True,
                      help="Average visual tokens per decoder layer (a count), a share of the image's N ('20%'), "
                           "or 'full'.")
ANCHOR = click.option("--anchor", type=click.Choice(ANCHORS), default=None, help="Stage 1's first pick [the recipe's].")
pruning_options = group(METHOD, BUDGET, ANCHOR)

# ---- precision
DTYPE = click.option("--dtype", type=click.Choice(DTYPES), default=None,
                     help="Graph dtype = engine precision [fp32; fp16 for --target trt].")
WEIGHTS = click.option("--weights", default=None,
                       help="Weight-only quantization of the decoder and projector linears: int8, int4, or the float "
                            "dtype (no quantization) [the dtype]; bench: comma-separated, one configuration each.")
BLOCK_SIZE = click.option("--block-size", type=click.Choice(["32", "128"]), default=None,
                          help="K elements per quantization scale with --weights int8/int4 [128].")
QUANTIZE_VISION = click.option("--quantize-vision", is_flag=True, help="With --weights: the vision tower's linears too.")
ACCURACY_LEVEL = click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
                              help="ONNX Runtime's int8/int4 weights (MatMulNBits): the least precision the product may "
                                   "be computed in, 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 [4: the CPU's int8 kernels; "
                                   "CUDA ignores it].")
precision_options = group(DTYPE, WEIGHTS, BLOCK_SIZE, QUANTIZE_VISION, ACCURACY_LEVEL)


# ---- inputs
def image_option(required: bool = False) -> Callable[[Any], Any]:
    return click.option("--image", default=None, required=required, type=click.Path(dir_okay=False),
                        help="Image file (PNG, JPEG, ...)" + ("." if required else " [a deterministic synthetic image]."))


PROMPT = click.option("--prompt", default=None, help="Question about the image (the recipe's template is applied).")
INPUT_IDS = click.option("--input-ids", default=None,
                         help="Comma-separated token ids holding one image token (instead of --prompt; no tokenizer).")
MAX_NEW_TOKENS_OPTION = click.option("--max-new-tokens", default=MAX_NEW_TOKENS, show_default=True,
                                     type=click.IntRange(0, 4096), help="Tokens to generate.")


def input_options(image_required: bool = False) -> Callable[[Any], Any]:
    return group(image_option(image_required), PROMPT, INPUT_IDS, MAX_NEW_TOKENS_OPTION)


# ---- runtime
BACKEND = click.option("--backend", default="auto", show_default=True,
                       type=click.Choice(EXPORT_BACKENDS + tuple(ALIASES)),
                       help="What runs the export: auto (engines, else ONNX graphs, else AOTInductor packages), "
                            "ort (ONNX Runtime), trt (TensorRT), aoti (AOTInductor).")
DEVICE = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                      help="The accelerator: auto (CUDA when there is one), cpu or cuda.")
THREADS = click.option("--threads", default=None, type=int,
                       help="Intra-op threads for torch and ONNX Runtime [theirs: one per core].")
runtime_options = group(BACKEND, DEVICE, THREADS)

# ---- TensorRT
TRT_VERSION = click.option("--trt-version", default=None,
                           help="TensorRT version(s) the static check targets, comma-separated, e.g. 10.3,10.16,11.4 "
                                "[the installed one, else 10.3].")

# ---- outputs
OUT_DIR = click.option("--out", type=click.Path(path_type=Path), default=None, help="Output directory.")
