"""Recipes: plain YAML files loaded into frozen dataclasses.

A recipe names a model (its source and architecture dims), its pruning defaults and its prompt
template. Unknown keys are errors, so a typo never silently becomes a default.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sts_export.errors import StsError

RECIPE_DIR = Path(os.environ.get("STS_RECIPES", Path(__file__).resolve().parent.parent / "recipes"))
LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
ANCHORS = ("mean", "first", "saliency")  # Stage 1 first pick
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower (LLaVA-1.5: ViT-L/14 at 336 px)."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    feature_layer: int = -2  # index into hidden_states (embeddings + one per layer)
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Qwen2.5-VL's ViT (neutral defaults for CLIP): 3-D patches, 2x2 merger, windowed attention
    temporal_patch_size: int = 1
    spatial_merge_size: int = 1
    window_size: int = 0  # px; 0 = no windowed attention
    fullatt_block_indexes: tuple[int, ...] = ()
    out_hidden_size: int = 0  # merger output width; 0 = no merger
    rope_theta: float = 10000.0  # the ViT's 2-D rotary base
    # Qwen3-VL's ViT (neutral defaults elsewhere): a learned square position table resampled to each image's grid,
    # and DeepStack taps (ViT blocks whose merged outputs are added to the decoder after layers 0, 1, ...)
    num_position_embeddings: int = 0  # entries of the learned position table (a square: 2304 = 48 x 48); 0 = none
    deepstack_visual_indexes: tuple[int, ...] = ()  # ViT blocks tapped for DeepStack, in decoder-layer order

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_used(self) -> int:
        """Encoder layers that run to produce hidden_states[feature_layer]."""
        n = self.feature_layer if self.feature_layer >= 0 else self.num_layers + 1 + self.feature_layer
        return n


@dataclass(frozen=True)
class TextConfig:
    """Llama/Vicuna decoder."""

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    vocab_size: int = 32064
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    mrope_section: tuple[int, ...] = ()  # Qwen2.5-VL M-RoPE (t, h, w) sections of head_dim/2; () = 1-D RoPE
    attention_bias: bool = False  # q/k/v projections with bias (Qwen2)
    tie_word_embeddings: bool = False
    # Qwen3 (neutral defaults elsewhere)
    head_dim: int = 0  # per-head width; 0 = hidden_size // num_heads (Qwen3-VL-4B: 128, not 2560 / 32)
    qk_norm: bool = False  # RMSNorm of each head's q and k before RoPE
    mrope_interleaved: bool = False  # M-RoPE slots t, h, w interleaved (Qwen3-VL) instead of contiguous sections

    def __post_init__(self) -> None:
        if not self.head_dim and self.num_heads:  # derived once, so every reader sees one number
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)


@dataclass(frozen=True)
class PruningConfig:
    prune_layer: int = 16
    post_ratio: float = 1.0 / 3.0
    anchor: str = "mean"


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What the model's own HF image processor does (CLIPImageProcessor semantics)."""

    shortest_edge: int = 336
    crop_size: int = 336
    do_pad: bool = False  # pad to square with the mean colour first (LlavaImageProcessor)
    # LLaVA-NeXT anyres: candidate (height, width) resolutions; empty for single-crop families
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # Qwen2.5-VL smart_resize bounds (pixels); 0 = not a dynamic-resolution family
    min_pixels: int = 0
    max_pixels: int = 0
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD


@dataclass(frozen=True)
class Tolerance:
    """Max abs diff allowed between a backend's floats and the torch reference, per dtype."""

    fp32: float = 1e-4
    fp16: float = 5e-2
    bf16: float = 1e-1


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str  # HF id, or "synthetic" for generated random-weight models
    family: str = "llava-1.5"
    synthetic: bool = False
    seed: int = 0
    revision: str = "main"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_act: str = "gelu"
    image_token_id: int = 32000
    vision_start_token_id: int = -1  # Qwen2.5-VL: <|vision_start|> / <|vision_end|> around the image pads
    vision_end_token_id: int = -1
    image_token: str = "<image>"  # the tokenizer's text of image_token_id (the template's <image> slot)
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end generation besides eos_token_id
    pad_token_id: int = 32001
    bos_token_id: int = 1
    eos_token_id: int = 2
    pruning: PruningConfig = field(default_factory=PruningConfig)
    image_processor: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)
    prompt_template: str = LLAVA_TEMPLATE
    max_prompt_tokens: int = 1024  # text + image tokens of a prompt the decoder sees (graph axes, TensorRT profiles)
    max_context: int = 2048  # prompt + generated tokens; at most the model's context (text.max_position_embeddings)
    tolerance: Tolerance = field(default_factory=Tolerance)
    description: str = ""

    @property
    def num_image_tokens(self) -> int:
        """N: Stage 1 candidates per image; for anyres families the largest N any image can give
        (base crop + the most tiles a pinpoint holds; newline tokens are not candidates)."""
        p = self.image_processor
        if p.max_pixels:  # dynamic resolution: one LLM token per merged (merge x patch)^2 cell
            cell = self.vision.patch_size * self.vision.spatial_merge_size
            return p.max_pixels // (cell * cell)
        tiles = max(((h // p.crop_size) * (w // p.crop_size) for h, w in p.image_grid_pinpoints), default=0)
        return self.vision.num_patches * (1 + tiles)

    @property
    def max_image_span(self) -> int:
        """The most image tokens the decoder can see without pruning (anyres: candidates + one newline per grid row)."""
        if self.image_processor.max_pixels:
            return self.num_image_tokens
        crop, g = self.image_processor.crop_size, self.vision.image_size // self.vision.patch_size
        spans = [g * g * (1 + (h // crop) * (w // crop)) + (h // crop) * g for h, w in self.image_processor.image_grid_pinpoints]
        return max(spans, default=self.num_image_tokens)

    @property
    def dynamic_tokens(self) -> bool:
        """Whether N depends on the image (graphs then run K_max greedy steps and take K per image)."""
        return bool(self.image_processor.image_grid_pinpoints) or self.image_processor.max_pixels > 0

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build a (nested) frozen dataclass from a mapping, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise StsError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise StsError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        ftype = fields[name].type
        sub = _NESTED.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        if sub is not None:
            kwargs[name] = from_dict(sub, value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # missing required keys
        raise StsError(f"{where}: {e}") from None
    _check(obj, where)
    return obj


_NESTED: dict[str, type] = {
    "VisionConfig": VisionConfig,
    "TextConfig": TextConfig,
    "PruningConfig": PruningConfig,
    "ImageProcessorConfig": ImageProcessorConfig,
    "Tolerance": Tolerance,
}


def _check(obj: Any, where: str) -> None:
    if isinstance(obj, TextConfig):
        derived_uneven = obj.hidden_size % obj.num_heads and obj.head_dim == obj.hidden_size // obj.num_heads
        if obj.num_heads % obj.num_kv_heads or derived_uneven:
            raise StsError(f"{where}: hidden_size/num_heads/num_kv_heads/head_dim are inconsistent")
        if obj.mrope_section and 2 * sum(obj.mrope_section) != obj.head_dim:
            raise StsError(f"{where}.mrope_section {list(obj.mrope_section)} must sum to head_dim / 2 = {obj.head_dim // 2}")
    if isinstance(obj, VisionConfig) and obj.image_size % obj.patch_size:
        raise StsError(f"{where}: image_size must be a multiple of patch_size")
    if isinstance(obj, PruningConfig):
        if obj.anchor not in ANCHORS:
            raise StsError(f"{where}.anchor: '{obj.anchor}' is not one of mean, first, saliency")
        if not 0.0 < obj.post_ratio <= 1.0:
            raise StsError(f"{where}.post_ratio must be in (0, 1], got {obj.post_ratio}")
    if isinstance(obj, Recipe):
        if not 1 <= obj.pruning.prune_layer < obj.text.num_layers:
            raise StsError(
                f"{where}.pruning.prune_layer must be in [1, {obj.text.num_layers - 1}], "
                f"got {obj.pruning.prune_layer}"
            )
        taps = len(obj.vision.deepstack_visual_indexes)
        if taps and obj.pruning.prune_layer < taps:  # Stage 2 would drop tokens a later DeepStack add still needs
            raise StsError(f"{where}.pruning.prune_layer {obj.pruning.prune_layer} is at or below decoder layer {taps - 1}, "
                           f"the last that receives DeepStack features; use a prune_layer of at least {taps}")
        if taps > obj.text.num_layers or any(not 0 <= i < obj.vision.num_layers for i in obj.vision.deepstack_visual_indexes):
            raise StsError(f"{where}.vision.deepstack_visual_indexes {list(obj.vision.deepstack_visual_indexes)} must name "
                           f"at most {obj.text.num_layers} of the {obj.vision.num_layers} ViT blocks")
        if "{prompt}" not in obj.prompt_template or obj.prompt_template.count("<image>") != 1:
            raise StsError(f"{where}.prompt_template needs exactly one <image> and a {{prompt}} slot")
        if not 1 <= obj.max_prompt_tokens <= obj.max_context <= obj.text.max_position_embeddings:
            raise StsError(f"{where}: need 1 <= max_prompt_tokens ({obj.max_prompt_tokens}) <= max_context "
                           f"({obj.max_context}) <= text.max_position_embeddings ({obj.text.max_position_embeddings}, "
                           "the model's context)")


PROMPT_TEXT_TOKENS = 1024  # a derived recipe's prompt: the largest image's tokens plus this many text tokens ...
NEW_TOKENS = 1024  # ... and its context that prompt plus this many generated tokens, both within the model's context


def fit_context(recipe: Recipe, context: int) -> Recipe:
    """The recipe with the limits of a model whose context is `context` tokens: max_prompt_tokens = the largest
    image's span (`max_image_span`: NeXT's 2880 candidates + newlines, Qwen's N at max_pixels) + PROMPT_TEXT_TOKENS,
    max_context = that + NEW_TOKENS, each at most `context` (a prompt that does not fit is refused per image:
    `tokenizer.check_prompt_fits`)."""
    prompt = min(recipe.max_image_span + PROMPT_TEXT_TOKENS, context)
    return recipe.replace(max_prompt_tokens=prompt, max_context=min(prompt + NEW_TOKENS, context))


DEFAULT_EXPORT_MAX_PIXELS = 1280 * 28 * 28  # an export's default pixel cap for dynamic resolution: N <= 1280 at 28 px


def with_max_pixels(recipe: Recipe, max_pixels: int | None = None, default: int | None = DEFAULT_EXPORT_MAX_PIXELS) -> Recipe:
    """The recipe with a dynamic-resolution model's `max_pixels` lowered (smart_resize then keeps every
    image within it, so N, K_max and the TensorRT profiles shrink with it); None: min(the recipe's,
    `default`). max_prompt_tokens / max_context shrink by the image tokens no image can have any more (their text
    allowance stays; where the model's context was the limit, it stays the limit while the largest image plus
    PROMPT_TEXT_TOKENS exceed it). A fixed-resolution recipe refuses a value."""
    p = recipe.image_processor
    if not p.max_pixels:
        if max_pixels is not None:
            raise StsError(f"--max-pixels applies to dynamic-resolution models (Qwen2.5-VL), not {recipe.family}")
        return recipe
    cap = max_pixels if max_pixels is not None else min(p.max_pixels, default or p.max_pixels)
    if cap == p.max_pixels:  # the model's own bound (also one below the 200-cell floor: prepare_image guards it)
        return recipe
    cell = (recipe.vision.patch_size * recipe.vision.spatial_merge_size) ** 2
    # below 200 cells a 200:1 strip could give more than max_pixels / cell tokens (a model's own lower bound stays)
    lo = min(max(p.min_pixels, 200 * cell), p.max_pixels)
    if isinstance(cap, bool) or not isinstance(cap, int) or not lo <= cap <= p.max_pixels:
        raise StsError(f"--max-pixels must be an integer in {lo}..{p.max_pixels} for {recipe.name} (the model's own "
                       f"max_pixels is the top; below {lo} some images would exceed it), got {max_pixels}")
    capped = recipe.replace(image_processor=dataclasses.replace(p, max_pixels=cap))
    text = recipe.max_prompt_tokens - recipe.max_image_span  # text tokens beside the largest image
    new = recipe.max_context - recipe.max_prompt_tokens  # generated tokens beyond the longest prompt
    if text >= 0:  # the image's tokens no image can have any more go; text and generation allowances stay
        prompt, context = capped.max_image_span + text, capped.max_image_span + text + new
    else:  # the model's context was the limit: fit_context's allowances, within it
        prompt = min(recipe.max_prompt_tokens, capped.max_image_span + PROMPT_TEXT_TOKENS)
        context = min(recipe.max_context, prompt + max(new, NEW_TOKENS))
    return capped.replace(max_prompt_tokens=prompt, max_context=context)


def available_recipes() -> list[str]:
    """Names of the recipes shipped in recipes/."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def is_recipe_file(path: str | os.PathLike) -> bool:
    """Whether `path` names an existing recipe YAML file (rather than a recipe name)."""
    p = Path(path).expanduser()
    return p.suffix in (".yaml", ".yml") and p.is_file()


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """Load a recipe by name (a file in recipes/) or from a path to a YAML file."""
    path = Path(name_or_path).expanduser()
    if not is_recipe_file(path):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise StsError(
                f"unknown recipe '{name_or_path}'; available: {', '.join(available_recipes())} "
                "(or pass a path to a recipe YAML file)"
            )
    return from_dict(Recipe, read_yaml(path), path.name)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a missing or malformed file is a one-line StsError."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise StsError(f"{path} not found") from None
    except yaml.YAMLError as e:
        raise StsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
