"""Finding and loading weights: HF ids (local cache only), local directories, synthetic models.

safetensors only: pickled checkpoints (*.bin, *.pt) are refused, and no remote code runs.
"""
from __future__ import annotations

import difflib

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sts_export.errors import StsError
from sts_export.families import check_matches_config, family_module, recipe_from_hf_config
from sts_export.recipe import Recipe, available_recipes, is_recipe_file, load_recipe

# Checkpoint keys -> our parameter names, in two steps.
#  1. transformers' own key conversion, the one `from_pretrained` applies: the WeightRenaming list of
#     `transformers.conversion_mapping.get_model_conversion_mapping` for the checkpoint's model class
#     (built from its config.json on the meta device), run through
#     `transformers.core_model_loading.rename_source_key`. It turns every layout transformers reads --
#     the hub's llava-hf layout (language_model.model.*, vision_tower.vision_model.*,
#     multi_modal_projector.*), the v5 in-memory layout (model.language_model.*,
#     model.vision_tower.vision_model.*) and what save_pretrained writes (language_model.model.*,
#     vision_tower.embeddings.*) -- into the installed transformers' in-memory names ("canonical").
#  2. A small table per model_type maps canonical names onto ours. An entry ending in "." is a
#     prefix, any other an exact name.
_LLAVA_NAMES = (
    ("model.vision_tower.vision_model.", "vision."),  # canonical in older 5.x (CLIPVisionModel kept it)
    ("model.vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("lm_head.", "lm_head."),
    ("model.language_model.", ""),
)
OUR_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "llava": _LLAVA_NAMES,
    "llava_next": (("model.image_newline", "image_newline"), *_LLAVA_NAMES),
    # Qwen2.5-VL: the published layout (visual.*, model.layers.*) is canonicalised by transformers too
    "qwen2_5_vl": (("model.visual.", "vision."), ("lm_head.", "lm_head."), ("model.language_model.", "")),
    "qwen3_vl": (("model.visual.", "vision."), ("lm_head.", "lm_head."), ("model.language_model.", "")),
}
# Only where transformers lacks the conversion API (older 5.x): its llava renamings, by hand.
_FALLBACK_RENAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)
CACHE_DIR = Path(os.environ.get("STS_CACHE", Path.home() / ".cache" / "sts-export"))


def _swap(key: str, old: str, new: str) -> str | None:
    """`key` with prefix (or exact name) `old` replaced by `new`; None if it does not match."""
    if old == "" or old.endswith("."):
        return new + key[len(old):] if key.startswith(old) else None
    return new if key == old else None


def _names(model_type: str) -> tuple[tuple[str, str], ...]:
    if model_type not in OUR_NAMES:
        raise StsError(f"checkpoint model_type '{model_type}' is not supported; supported: {', '.join(OUR_NAMES)}")
    return OUR_NAMES[model_type]


def _fallback_canonical(key: str) -> str:
    for old, new in _FALLBACK_RENAMES:
        out = _swap(key, old, new)
        if out is not None:
            return out
    return key


@functools.lru_cache(maxsize=8)
def _canonicalizer(model_type: str, config_json: str) -> Callable[[str], str]:
    """transformers' checkpoint-key -> in-memory-key renaming for this model type and config."""
    config = json.loads(config_json)
    try:
        from transformers import AutoModelForImageTextToText
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        return _fallback_canonical
    try:
        cfg = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in config.items() if k != "model_type"})
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds on a bad config
        raise StsError(f"config.json of this {model_type} checkpoint is not valid for transformers: {e}") from None
    with torch.device("meta"):  # structure only: no memory, no init
        hf = AutoModelForImageTextToText.from_config(cfg)
    conversions = get_model_conversion_mapping(hf)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    prefix, in_memory = hf.base_model_prefix, dict.fromkeys(hf.state_dict(), True)
    del hf

    def canonical(key: str) -> str:
        new, converter = rename_source_key(key, renamings, converters, prefix, in_memory)
        if converter is not None:
            raise StsError(f"checkpoint key {key} needs a tensor conversion in transformers ({converter}); "
                           "not supported here")
        return new

    return canonical


def key_map(model_type: str = "llava", config: dict | None = None) -> Callable[[str], str | None]:
    """checkpoint key -> our parameter name (None: a weight we never use), for this model_type.

    `config` is the checkpoint's config.json (its sub-model types decide transformers' renamings);
    without it transformers' default config for the model_type is used.
    """
    names = _names(model_type)
    canonical = _canonicalizer(model_type, json.dumps(config or {}, sort_keys=True, default=str))

    def ours(key: str) -> str | None:
        key = canonical(key)
        for old, new in names:
            out = _swap(key, old, new)
            if out is not None:
                return out
        return None

    return ours


def internal_name(key: str, model_type: str = "llava", config: dict | None = None) -> str | None:
    """Checkpoint key (any layout transformers reads) -> our parameter name, or None if not ours."""
    return key_map(model_type, config)(key)


def checkpoint_name(name: str, model_type: str = "llava") -> str:
    """Our parameter name -> the key `save_checkpoint` writes: transformers' v5 layout
    (model.language_model.*, model.vision_tower.vision_model.*), which every transformers 5.x loads."""
    for canon, ours in sorted(_names(model_type), key=lambda e: -len(e[1])):  # "" (decoder) last; stable
        out = _swap(name, ours, canon)
        if out is not None:
            return out
    raise StsError(f"parameter {name} has no checkpoint name for model_type '{model_type}'")


@dataclass(frozen=True)
class Source:
    """Where a model comes from: its recipe and a checkpoint directory (None = random weights)."""

    recipe: Recipe
    path: Path | None
    revision: str | None = None

    @property
    def description(self) -> str:
        if self.path is None:
            return f"{self.recipe.name} (random weights)"
        return str(self.path)


def _hf_snapshot(repo_id: str, revision: str) -> Path:
    """A snapshot of repo_id from the local HF cache, never the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise StsError(
            f"model '{repo_id}' is not in the local Hugging Face cache ({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}); "
            f"download it where there is internet (`hf download {repo_id}`) and copy the cache here, "
            "or pass a local directory with config.json and *.safetensors, or use --random-weights"
        ) from None


def resolve(model: str, recipe: str | None = None, random_weights: bool = False) -> Source:
    """Resolve --model (recipe name or YAML file, local dir or HF id) and --recipe into a Source."""
    named = load_recipe(recipe) if recipe else None
    path = Path(model).expanduser()
    if path.is_dir():
        rec = named or recipe_from_hf_config(path)
        if named:
            check_matches_config(named, path)
        return Source(rec, None if random_weights else path)
    if named is None and (model in available_recipes() or is_recipe_file(path)):
        named = load_recipe(path if is_recipe_file(path) else model)
        if named.synthetic:
            return Source(named, None if random_weights else ensure_synthetic(named))
        if random_weights:
            return Source(named, None)
        snap = _hf_snapshot(named.source, named.revision)
        check_matches_config(named, snap)
        return Source(named, snap, named.revision)
    if "/" in model and not path.exists() and not model.startswith((".", "/")):
        if random_weights:
            if named is None:
                raise StsError(f"--random-weights with HF id '{model}' needs --recipe for the architecture")
            return Source(named, None)
        snap = _hf_snapshot(model, "main")
        rec = named or recipe_from_hf_config(snap, name=model.split("/")[-1])
        if named:
            check_matches_config(named, snap)
        return Source(rec, snap, "main")
    names = available_recipes()
    close = difflib.get_close_matches(model, names, n=3, cutoff=0.5)
    known = f"closest: {', '.join(close)}" if close else f"the recipes: {', '.join(n for n in names if not n.startswith('tiny-'))}, tiny-*"
    raise StsError(
        f"unknown model '{model}': not a recipe ({known}) or recipe YAML file, a local checkpoint "
        "directory or an HF id (owner/name) in the local cache"
    )


def _safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles:
            raise StsError(
                f"{path} holds only pickled weights ({', '.join(pickles[:3])}); they are never loaded "
                "(arbitrary code); convert them to safetensors"
            )
        raise StsError(f"{path}: no *.safetensors weights found")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise StsError(f"{path}: shard(s) {', '.join(missing)} named in the index are missing; re-download")
        return [path / n for n in names]
    return files


def load_weights(model: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    """Fill `model` (possibly on the meta device) from the safetensors files in `path`."""
    params = dict(model.named_parameters())
    loaded: dict[str, torch.Tensor] = {}
    config = json.loads((path / "config.json").read_text())
    tied = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", False))
    ours = key_map(config.get("model_type") or "llava", config)
    for f in _safetensors_files(path):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    name = ours(key)
                    if name in params:
                        loaded[name] = sf.get_tensor(key).to(dtype)
        except StsError:
            raise
        except Exception as e:  # corrupted / truncated file
            raise StsError(f"{f}: cannot read safetensors file ({type(e).__name__}: {e}); re-download it") from None
    if "lm_head.weight" not in loaded and tied and "embed_tokens.weight" in loaded:
        loaded["lm_head.weight"] = loaded["embed_tokens.weight"]
    missing = sorted(set(params) - set(loaded))
    if missing:
        raise StsError(f"{path}: checkpoint lacks {len(missing)} weight(s), e.g. {', '.join(missing[:3])}")
    for name, p in params.items():
        if tuple(loaded[name].shape) != tuple(p.shape):
            raise StsError(f"{path}: weight {name} has shape {tuple(loaded[name].shape)}, expected {tuple(p.shape)}")
    model.load_state_dict(loaded, strict=True, assign=True)


def init_random_(model: torch.nn.Module, seed: int) -> None:
    """Seeded random init with O(1) activations: Linear ~ N(0, 1/fan_in), norms ~ 1, embeddings ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = torch.empty(p.shape, dtype=torch.float32)
            if (name.endswith(("norm.weight", "layrnorm.weight", "norm1.weight", "norm2.weight", "ln_q.weight"))
                    or "layer_norm" in name and name.endswith("weight")):  # CLIP, Llama, Qwen ViT / merger norms
                t.normal_(1.0, 0.05, generator=g)
            elif p.dim() == 1:
                t.normal_(0.0, 0.02 if name.endswith("bias") else 1.0, generator=g)
            elif "embed_tokens" in name or "position_embedding" in name or "pos_embed" in name:
                t.normal_(0.0, 1.0 if "embed_tokens" in name else 0.3, generator=g)
            else:
                fan_in = math.prod(p.shape[1:])
                t.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
            p.copy_(t.to(p.dtype))


def tie_embeddings_(model: torch.nn.Module, recipe: Recipe) -> None:
    """Recipes with tied embeddings: lm_head holds a copy of embed_tokens (random weights, synthetic checkpoints)."""
    if recipe.text.tie_word_embeddings:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.embed_tokens.weight)


def synthetic_dir(recipe: Recipe) -> Path:
    digest = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return CACHE_DIR / "synthetic" / f"{recipe.name}-{digest}"


def save_checkpoint(recipe: Recipe, out: Path, seed: int | None = None) -> None:
    """Write a complete transformers-layout checkpoint of the recipe's family with seeded random weights to `out`."""
    from sts_export.families.layers import ClipLayer

    from sts_export.families.layers import ClipVision

    family = family_module(recipe.family)
    model = family.build(recipe)
    init_random_(model, recipe.seed if seed is None else seed)
    tie_embeddings_(model, recipe)
    config = family.hf_config(recipe)
    model_type = config["model_type"]
    state = {checkpoint_name(name, model_type): t.contiguous() for name, t in model.state_dict().items()
             if not (recipe.text.tie_word_embeddings and name == "lm_head.weight")}  # tied: transformers omits it
    if isinstance(getattr(model, "vision", None), ClipVision):
        # CLIP layers after the feature layer and post_layernorm: present in real checkpoints, unused by LLaVA
        extra = torch.nn.ModuleList(ClipLayer(recipe.vision) for _ in range(recipe.vision.num_layers - recipe.vision.layers_used))
        init_random_(extra, (recipe.seed if seed is None else seed) + 1)
        base = checkpoint_name("vision.", model_type)
        for name, t in extra.state_dict().items():
            i, rest = name.split(".", 1)
            state[f"{base}encoder.layers.{int(i) + recipe.vision.layers_used}.{rest}"] = t.contiguous()
        state[base + "post_layernorm.weight"] = torch.ones(recipe.vision.hidden_size)
        state[base + "post_layernorm.bias"] = torch.zeros(recipe.vision.hidden_size)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if hasattr(family, "preprocessor_config"):
        (out / "preprocessor_config.json").write_text(json.dumps(family.preprocessor_config(recipe), indent=2))
        return
    p = recipe.image_processor
    anyres = {"image_grid_pinpoints": [list(x) for x in p.image_grid_pinpoints]} if p.image_grid_pinpoints else {}
    kind = "LlavaNextImageProcessor" if anyres else "LlavaImageProcessor" if p.do_pad else "CLIPImageProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": kind, **anyres,
        "do_resize": True, "size": {"shortest_edge": p.shortest_edge}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": p.crop_size, "width": p.crop_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": list(p.image_mean), "image_std": list(p.image_std), "do_pad": p.do_pad,
    }, indent=2))


def ensure_synthetic(recipe: Recipe) -> Path:
    """The synthetic model's checkpoint + tokenizer, generated once into the cache (atomically)."""
    from sts_export.tokenizer import build_synthetic_tokenizer

    final = synthetic_dir(recipe)
    if (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.name}-", dir=final.parent))
    try:
        save_checkpoint(recipe, tmp)
        build_synthetic_tokenizer(recipe, tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_model(source: Source, dtype: torch.dtype = torch.float32, seed: int | None = None) -> "torch.nn.Module":
    """Build the family's modules and fill them from the source (random weights when source.path is None)."""
    with torch.device("meta"):
        model = family_module(source.recipe.family).build(source.recipe)
    if source.path is None:
        model = model.to(dtype).to_empty(device="cpu")
        init_random_(model, source.recipe.seed if seed is None else seed)
        tie_embeddings_(model, source.recipe)
    else:
        load_weights(model, source.path, dtype)
    return model.eval().requires_grad_(False)
