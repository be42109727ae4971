"""Finding and loading weights: HF ids (local cache only), local directories, synthetic models.

safetensors only: pickled checkpoints (*.bin, *.pt) are refused, and no remote code runs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sts_export.errors import StsError
from sts_export.recipe import Recipe, available_recipes, check_matches_config, load_recipe, recipe_from_hf_config

# transformers' legacy llava-hf layout -> its v5 layout -> our module names
LEGACY_PREFIXES = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]
PREFIXES = [
    ("model.vision_tower.vision_model.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("model.language_model.", ""),
    ("lm_head.", "lm_head."),
]
CACHE_DIR = Path(os.environ.get("STS_CACHE", Path.home() / ".cache" / "sts-export"))


def internal_name(key: str) -> str | None:
    """Checkpoint key (legacy or transformers-5 layout) -> our parameter name, or None if not ours."""
    for old, new in LEGACY_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    for old, new in PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return None


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
    """Resolve --model (recipe name, local dir or HF id) and --recipe into a Source."""
    named = load_recipe(recipe) if recipe else None
    path = Path(model).expanduser()
    if path.is_dir():
        rec = named or recipe_from_hf_config(path)
        if named:
            check_matches_config(named, path)
        return Source(rec, None if random_weights else path)
    if named is None and model in available_recipes():
        named = load_recipe(model)
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
    raise StsError(
        f"unknown model '{model}': not a recipe ({', '.join(available_recipes())}), a local checkpoint "
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
    tied = json.loads((path / "config.json").read_text()).get("tie_word_embeddings", False)
    for f in _safetensors_files(path):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    name = internal_name(key)
                    if name in params:
                        loaded[name] = sf.get_tensor(key).to(dtype)
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
            if name.endswith("norm.weight") or "layer_norm" in name and name.endswith("weight") or name.endswith("layrnorm.weight"):
                t.normal_(1.0, 0.05, generator=g)
            elif p.dim() == 1:
                t.normal_(0.0, 0.02 if name.endswith("bias") else 1.0, generator=g)
            elif "embed_tokens" in name or "position_embedding" in name:
                t.normal_(0.0, 1.0 if "embed_tokens" in name else 0.3, generator=g)
            else:
                fan_in = math.prod(p.shape[1:])
                t.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
            p.copy_(t.to(p.dtype))


def synthetic_dir(recipe: Recipe) -> Path:
    digest = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return CACHE_DIR / "synthetic" / f"{recipe.name}-{digest}"


def hf_config(recipe: Recipe) -> dict:
    """A transformers LlavaConfig dict for the recipe's architecture."""
    v, t = recipe.vision, recipe.text
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_id": recipe.image_token_id,
        "pad_token_id": recipe.pad_token_id,
        "projector_hidden_act": recipe.projector_act,
        "vision_feature_layer": v.feature_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            "projection_dim": v.hidden_size,
        },
        "text_config": {
            "model_type": "llama", "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta, "bos_token_id": recipe.bos_token_id, "eos_token_id": recipe.eos_token_id,
            "pad_token_id": recipe.pad_token_id, "tie_word_embeddings": False, "hidden_act": "silu",
        },
    }


def save_checkpoint(recipe: Recipe, out: Path, seed: int | None = None) -> None:
    """Write a complete transformers-layout LLaVA checkpoint with seeded random weights to `out`."""
    from sts_export.families.layers import ClipLayer, Llava

    model = Llava(recipe)
    init_random_(model, recipe.seed if seed is None else seed)
    state = {}
    for name, t in model.state_dict().items():
        for old, new in PREFIXES:
            if name.startswith(new) and (new or not name.startswith(("vision.", "projector.", "lm_head."))):
                state[old + name[len(new):]] = t.contiguous()
                break
    # layers after the feature layer and post_layernorm: present in real checkpoints, unused by LLaVA
    extra = torch.nn.ModuleList(ClipLayer(recipe.vision) for _ in range(recipe.vision.num_layers - recipe.vision.layers_used))
    init_random_(extra, (recipe.seed if seed is None else seed) + 1)
    base = "model.vision_tower.vision_model."
    for name, t in extra.state_dict().items():
        i, rest = name.split(".", 1)
        state[f"{base}encoder.layers.{int(i) + recipe.vision.layers_used}.{rest}"] = t.contiguous()
    state[base + "post_layernorm.weight"] = torch.ones(recipe.vision.hidden_size)
    state[base + "post_layernorm.bias"] = torch.zeros(recipe.vision.hidden_size)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(recipe), indent=2))
    p = recipe.image_processor
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaImageProcessor" if p.do_pad else "CLIPImageProcessor",
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
    """Build our Llava modules and fill them from the source (random weights when source.path is None)."""
    from sts_export.families.layers import Llava

    with torch.device("meta"):
        model = Llava(source.recipe)
    if source.path is None:
        model = model.to(dtype).to_empty(device="cpu")
        init_random_(model, source.recipe.seed if seed is None else seed)
    else:
        load_weights(model, source.path, dtype)
    return model.eval().requires_grad_(False)
