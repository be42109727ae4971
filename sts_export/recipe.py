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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


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
    pad_token_id: int = 32001
    bos_token_id: int = 1
    eos_token_id: int = 2
    pruning: PruningConfig = field(default_factory=PruningConfig)
    image_processor: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)
    prompt_template: str = LLAVA_TEMPLATE
    max_prompt_tokens: int = 1024  # text + image tokens in a prompt (TensorRT profiles use it)
    max_context: int = 2048  # prompt + generated tokens
    tolerance: Tolerance = field(default_factory=Tolerance)
    description: str = ""

    @property
    def num_image_tokens(self) -> int:
        """N: Stage 1 candidates per image; for anyres families the largest N any image can give
        (base crop + the most tiles a pinpoint holds; newline tokens are not candidates)."""
        crop = self.image_processor.crop_size
        tiles = max(((h // crop) * (w // crop) for h, w in self.image_processor.image_grid_pinpoints), default=0)
        return self.vision.num_patches * (1 + tiles)

    @property
    def max_image_span(self) -> int:
        """The most image tokens the decoder can see without pruning (anyres: candidates + one newline per grid row)."""
        crop, g = self.image_processor.crop_size, self.vision.image_size // self.vision.patch_size
        spans = [g * g * (1 + (h // crop) * (w // crop)) + (h // crop) * g for h, w in self.image_processor.image_grid_pinpoints]
        return max(spans, default=self.num_image_tokens)

    @property
    def dynamic_tokens(self) -> bool:
        """Whether N depends on the image (graphs then run K_max greedy steps and take K per image)."""
        return bool(self.image_processor.image_grid_pinpoints)

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
        if obj.hidden_size % obj.num_heads or obj.num_heads % obj.num_kv_heads:
            raise StsError(f"{where}: hidden_size/num_heads/num_kv_heads are inconsistent")
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
        if "{prompt}" not in obj.prompt_template or obj.prompt_template.count("<image>") != 1:
            raise StsError(f"{where}.prompt_template needs exactly one <image> and a {{prompt}} slot")


def available_recipes() -> list[str]:
    """Names of the recipes shipped in recipes/."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """Load a recipe by name (a file in recipes/) or from a path to a YAML file."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
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
