"""A user's own checkpoint of every family exports with validation on, at default settings (`export.py --model DIR`),
and the export answers a square and a wide image.

The checkpoints are written the way users get them: transformers' config classes, `save_pretrained` of the
transformers model with its own random init, the family's own image processor `save_pretrained`, tokenizer files or
none, in a plain directory or the Hugging Face cache layout (`models--org--name/snapshots/<hash>/`, loaded by HF id
offline). Their configs are ones no other test uses: odd widths, other head counts and head sizes, other contexts.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sts_export.pipeline import load_export_pipeline
from tests.conftest import make_image

ROOT = Path(__file__).resolve().parent.parent
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # the published LLaVA-NeXT ones
WORDS = ("what is shown in this image describe the picture a cat dog car red blue green one two three yes no "
         "user assistant system you are helpful").split()


# The published config.json of two LLaVA-NeXT checkpoints (text and vision fields, as recalled; transformers'
# defaults fill what they omit: MistralConfig/LlamaConfig hidden 4096, 32 layers, 32 heads).
_CLIP_L336 = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
              "vocab_size": 32000}
_NEXT_TOP = {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
             "image_token_index": 32000, "image_grid_pinpoints": PINPOINTS, "projector_hidden_act": "gelu",
             "use_image_newline_parameter": True, "vision_feature_layer": -2,
             "vision_feature_select_strategy": "default", "vocab_size": 32064, "vision_config": _CLIP_L336}
PUBLISHED_NEXT = {
    "llava-hf/llava-v1.6-mistral-7b-hf": {**_NEXT_TOP, "text_config": {
        "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["MistralForCausalLM"],
        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
        "vocab_size": 32064}},
    "llava-hf/llava-v1.6-vicuna-13b-hf": {**_NEXT_TOP, "pad_token_id": 32001, "text_config": {
        "_name_or_path": "lmsys/vicuna-13b-v1.5", "architectures": ["LlamaForCausalLM"], "hidden_size": 5120,
        "intermediate_size": 13824, "max_position_embeddings": 4096, "model_type": "llama",
        "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 40, "pad_token_id": 0,
        "rms_norm_eps": 1e-05, "vocab_size": 32064}},
}


# ---------------------------------------------------------------------------------------------------- builders

def write_tokenizer(out: Path, vocab_size: int, specials: dict[str, int], bos: str | None = "<s>") -> None:
    """tokenizer.json + tokenizer_config.json as `PreTrainedTokenizerFast.save_pretrained` writes them: a word-level
    vocabulary of `vocab_size` ids with the special tokens at the config's own ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(specials)
    free = (i for i in range(vocab_size) if i not in set(specials.values()))
    for word in [*WORDS, *(f"w{i}" for i in range(vocab_size))]:
        i = next(free, None)
        if i is None:
            break
        vocab[word] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, specials[bos])])
    named = {k: v for k, v in (("bos_token", bos), ("unk_token", "<unk>")) if v in specials}
    PreTrainedTokenizerFast(tokenizer_object=tok, **named).save_pretrained(out)


def save_model(model_cls: type, config: object, out: Path, seed: int) -> None:
    """`save_pretrained` of the transformers model with its own random init (seeded)."""
    torch.manual_seed(seed)
    model_cls(config).eval().save_pretrained(out)


def clip_config(image_size: int, **kw: int) -> object:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, patch_size=14, projection_dim=16, hidden_act="quick_gelu", **kw)


def llava_checkpoint(out: Path) -> Path:
    """LLaVA-1.5 with an odd CLIP (168 px: 144 patches, width 40, 5 heads) and a Llama whose head size is not
    hidden / heads (72 wide, 4 heads of 16, 2 KV heads), context 3000; no tokenizer files."""
    from transformers import CLIPImageProcessorPil, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(hidden_size=72, intermediate_size=100, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=3000,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    vision = clip_config(168, hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=299, vision_feature_layer=-2)
    save_model(LlavaForConditionalGeneration, cfg, out, 1)
    CLIPImageProcessorPil(size={"shortest_edge": 168}, crop_size={"height": 168, "width": 168}).save_pretrained(out)
    return out


def next_config(text_model: str = "mistral", context: int = 8192, window: int | None = None) -> object:
    """LLaVA-NeXT at the published crop (336 px, 24 x 24 patches, the published pinpoints: 2880 candidates) with a
    tiny CLIP (width 24, 3 heads) and a Mistral (llava-v1.6-mistral's layout: rope theta 1e6, no sliding window
    unless `window`) or a Llama/Vicuna text model (48 wide, 3 heads, 1 KV head), `context` positions."""
    from transformers import LlamaConfig, LlavaNextConfig, MistralConfig

    common = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=3,
                  num_key_value_heads=1, vocab_size=320, max_position_embeddings=context)
    if text_model == "mistral":
        rope = {"rope_type": "default", "rope_theta": 1e6}
        text = MistralConfig(**common, sliding_window=window, rope_parameters=rope)
    else:
        text = LlamaConfig(**common)
    vision = clip_config(336, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=317, image_grid_pinpoints=PINPOINTS)


def next_checkpoint(out: Path, text_model: str = "mistral", context: int = 8192, window: int | None = None,
                    tokenizer: bool = True) -> Path:
    """`next_config`'s model saved with its processor, and tokenizer files with the config's ids ([INST] marks)."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil

    save_model(LlavaNextForConditionalGeneration, next_config(text_model, context, window), out, 2)
    LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                               image_grid_pinpoints=PINPOINTS).save_pretrained(out)
    if tokenizer:
        write_tokenizer(out, 320, {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "<pad>": 318,
                                   "<image>": 317})
    return out


def qwen_config(tied: bool = True, context: int = 6000) -> object:
    """Qwen2.5-VL with tied embeddings (the 3B's layout), an odd ViT (width 48, 3 heads, one full-attention block of
    two) and decoder (80 wide, 5 heads, 1 KV head), `context` positions."""
    from transformers import Qwen2_5_VLConfig

    text = dict(hidden_size=80, intermediate_size=96, num_hidden_layers=4, num_attention_heads=5,
                num_key_value_heads=1, vocab_size=400, max_position_embeddings=context, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, tie_word_embeddings=tied,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=48, intermediate_size=56, num_heads=3, out_hidden_size=80, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=397, video_token_id=396,
                            vision_start_token_id=395, vision_end_token_id=394, tie_word_embeddings=tied)


def qwen_processor(max_tokens: int) -> object:
    """Qwen's image processor with a max_pixels of `max_tokens` LLM tokens (28 x 28 px each)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * max_tokens)


def qwen_checkpoint(out: Path, tied: bool = True, tokenizer: bool = False, max_tokens: int = 256) -> Path:
    """`qwen_config`'s model saved with its processor (at most `max_tokens` image tokens); no tokenizer files by
    default."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    save_model(Qwen2_5_VLForConditionalGeneration, qwen_config(tied), out, 3)
    qwen_processor(max_tokens).save_pretrained(out)
    if tokenizer:
        write_tokenizer(out, 400, {"<unk>": 3, "<|endoftext|>": 0, "<|im_end|>": 2, "<|image_pad|>": 397,
                                   "<|vision_start|>": 395, "<|vision_end|>": 394}, bos=None)
    return out


def to_hf_cache(src: Path, cache: Path, repo_id: str) -> Path:
    """Move a checkpoint directory into the Hugging Face cache layout: blobs by hash, a snapshot of symlinks to
    them, refs/main naming the snapshot. Returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.move(str(f), blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    src.rmdir()
    return snap


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=900)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def user_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints as users have them: LLaVA-1.5 in the HF cache (loaded by id); LLaVA-NeXT with a Vicuna (Llama) text
    model of context 8192 and with a Mistral one, both with tokenizer files; Qwen2.5-VL tied, without tokenizer files."""
    root = tmp_path_factory.mktemp("user")
    cache = root / "hf-cache"
    return {"llava": to_hf_cache(llava_checkpoint(root / "llava"), cache, "someone/llava-user").parent.parent,
            "next": next_checkpoint(root / "next-vicuna", "llama", context=8192),
            "next-mistral": next_checkpoint(root / "next-mistral"),
            "qwen": qwen_checkpoint(root / "qwen-tied")}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    sizes = {"square": (500, 500), "wide": (900, 300), "small": (120, 120)}
    out = {}
    for name, (w, h) in sizes.items():
        out[name] = root / f"{name}.png"
        make_image(w, h, seed=w + h).save(out[name])
    return out


# ---------------------------------------------------------------------------------------------------- the exports

@pytest.mark.parametrize("family", ["llava", "next", "qwen"])
def test_user_checkpoint_exports_and_answers(family: str, user_dirs, images, tmp_path: Path, capfd) -> None:
    """`export.py --model DIR` at default settings (sts, budget 64, fp32, validation on) passes validation, and the
    export answers a square and a wide image. LLaVA-1.5 (head size 16 of a 72-wide, 4-head Llama) comes from the HF
    cache by id (offline); the NeXT's 8192 context holds its largest image (2928 tokens); the checkpoints without
    tokenizer files (LLaVA-1.5, the tied Qwen2.5-VL) validate and run on their config's raw prompt, and say so in one
    line."""
    src = user_dirs[family]
    env = {}
    if family == "llava":  # the HF cache layout, loaded by HF id
        env["HF_HUB_CACHE"] = str(src.parent)
        model = "someone/llava-user"
    else:
        model = str(src)
    out = tmp_path / "export"
    r = run_cli("export.py", "--model", model, "--out", str(out), env=env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "validation: PASS" in r.stdout
    tokenizer = (out / "tokenizer.json").is_file()
    assert tokenizer == (family == "next")
    note = "no tokenizer.json: the prompt is the raw ids"
    assert (note in r.stdout) != tokenizer
    prompt = ["--prompt", "what is in this picture"] if tokenizer else []
    r = run_cli("-m", "sts_export.run", str(out), "--image", str(images["square"]), "--max-new-tokens", "6", *prompt)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), "no answer"
    assert "Stage 1 kept" in r.stderr
    assert sum(note in line for line in r.stderr.splitlines()) == (0 if tokenizer else 1)
    pipe = load_export_pipeline(out)  # the wide image through the Pipeline on the same export (ONNX Runtime)
    inp = pipe.prepare_image(images["wide"])
    gen = pipe.generate(inp, prompt[1] if prompt else None, max_new_tokens=6)
    assert gen.tokens.shape[1] >= 1 and pipe.decode(gen.tokens[0]).strip()
    assert gen.keep_pre.shape[1] < inp.n <= pipe.recipe.num_image_tokens  # pruned by Stage 1
    assert (note in capfd.readouterr().err) != tokenizer


# ---------------------------------------------------------------------------------------------------- limits

def config_dir(path: Path, config: object, processor: object | None = None) -> Path:
    """A checkpoint directory's config files only (what a recipe is derived from)."""
    config.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    return path


@pytest.mark.parametrize("text_model,context,window,limits", [
    ("llama", 8192, None, (2928 + 1024, 2928 + 2048)),  # NeXT/Vicuna with a long context: the image + 1024 text
    ("llama", 2048, None, (2048, 2048)),  # the model's context bounds both
    ("mistral", 32768, None, (3952, 4976)),  # llava-v1.6-mistral's context
    ("mistral", 32768, 4096, (3952, 4096)),  # a sliding window: the context stops at it (exact within it)
])
def test_next_limits_come_from_the_checkpoint(text_model: str, context: int, window: int | None,
                                              limits: tuple[int, int], tmp_path: Path) -> None:
    """A derived NeXT recipe: max_prompt_tokens = 2880 candidates + 48 newlines + 1024 text, max_context = that +
    1024 generated, both within the model's context (its sliding window, for a Mistral that has one)."""
    from sts_export.checkpoint import resolve

    r = resolve(str(config_dir(tmp_path, next_config(text_model, context, window)))).recipe
    assert r.max_image_span == 2880 + 48
    assert (r.max_prompt_tokens, r.max_context) == limits
    assert r.prompt_template == {"llama": "USER: <image>\n{prompt} ASSISTANT:",
                                 "mistral": "[INST] <image>\n{prompt} [/INST]"}[text_model]


@pytest.mark.parametrize("context,max_tokens,derived,exported", [
    (6000, 160, (160 + 1024, 160 + 2048), (160 + 1024, 160 + 2048)),  # the model's own max_pixels (below the floor)
    (1000, 160, (1000, 1000), (1000, 1000)),
    (6000, 16384, (6000, 6000), (1280 + 1024, 1280 + 2048)),  # published max_pixels: capped at export
    (128000, 16384, (16384 + 1024, 16384 + 2048), (1280 + 1024, 1280 + 2048)),  # as the 7B/3B
])
def test_qwen_limits_come_from_the_checkpoint(context: int, max_tokens: int, derived: tuple[int, int],
                                              exported: tuple[int, int], tmp_path: Path) -> None:
    """A derived Qwen recipe: N at max_pixels + 1024 text (+ 1024 generated), within the context; the export's
    --max-pixels (default 1280 tokens) then lowers the image's share; a model's own max_pixels below the 200-token
    floor of --max-pixels is kept, not refused."""
    from sts_export.checkpoint import resolve
    from sts_export.recipe import with_max_pixels

    r = resolve(str(config_dir(tmp_path, qwen_config(context=context), qwen_processor(max_tokens)))).recipe
    assert (r.max_prompt_tokens, r.max_context) == derived
    e = with_max_pixels(r)
    assert (e.max_prompt_tokens, e.max_context) == exported
    assert e.max_context <= context


def test_named_recipes_follow_the_context_rule(tmp_path: Path) -> None:
    """Every named recipe holds its largest image with text room, within the model's context; the real models'
    recipes (and their -cpu stand-ins) have exactly the derived recipes' limits. llava-next-mistral-7b matches the
    published config.json of llava-hf/llava-v1.6-mistral-7b-hf (its text and vision fields, as recalled here)."""
    import json

    from sts_export.families import check_matches_config, recipe_from_hf_config
    from sts_export.recipe import available_recipes, fit_context, load_recipe

    for name in available_recipes():
        r = load_recipe(name)
        assert r.max_image_span < r.max_prompt_tokens <= r.max_context <= r.text.max_position_embeddings, name
        if not name.startswith("tiny-"):
            f = fit_context(r, r.text.max_position_embeddings)
            assert (r.max_prompt_tokens, r.max_context) == (f.max_prompt_tokens, f.max_context), name
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_NEXT["llava-hf/llava-v1.6-mistral-7b-hf"]))
    named = load_recipe("llava-next-mistral-7b")
    check_matches_config(named, tmp_path)  # raises on any vision/text difference
    derived = recipe_from_hf_config(tmp_path)
    assert derived.text == named.text and derived.prompt_template == named.prompt_template
    assert (derived.max_prompt_tokens, derived.max_context) == (named.max_prompt_tokens, named.max_context)


@pytest.mark.parametrize("repo,dims,limits", [
    ("llava-hf/llava-v1.6-mistral-7b-hf", (4096, 14336, 32, 32, 8), (3952, 4976)),
    ("llava-hf/llava-v1.6-vicuna-13b-hf", (5120, 13824, 40, 40, 40), (3952, 4096)),
])
def test_published_next_layouts_derive(repo: str, dims: tuple, limits: tuple[int, int], tmp_path: Path) -> None:
    """The published NeXT layouts besides Vicuna-7B (a Mistral-7B and a Vicuna-13B text model) derive a recipe:
    their dims (transformers' defaults where the config.json is silent), template and limits from their context."""
    import json

    from sts_export.checkpoint import key_map, resolve

    cfg = PUBLISHED_NEXT[repo]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = resolve(str(tmp_path)).recipe
    t = r.text
    assert (t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads) == dims
    assert t.head_dim == 128 and r.max_image_span == 2928 and (r.max_prompt_tokens, r.max_context) == limits
    assert r.prompt_template.startswith("[INST]" if "mistral" in repo else "USER:")
    ours = key_map("llava_next", cfg)  # transformers builds the model from this config (meta device)
    assert ours("language_model.model.layers.0.self_attn.q_proj.weight") == "layers.0.self_attn.q_proj.weight"


def test_next_context_2048_refuses_what_does_not_fit(tmp_path: Path, images) -> None:
    """A NeXT whose context is 2048: where the decoder would see a square image's whole span (2880 + 48 tokens,
    no pruning) the prompt is refused in one line naming the 2048 limit; a small image's span fits and answers;
    with STS pruning the decoder sees K of the square image's tokens, which fit."""
    from sts_export import Pipeline, StsError

    d = next_checkpoint(tmp_path / "ckpt", "llama", context=2048)
    full = Pipeline.from_pretrained(str(d), budget="full", method="none")
    with pytest.raises(StsError) as e:
        full.generate(images["square"], "what is in this picture", max_new_tokens=4)
    msg = one_line(e)
    assert "2928 image" in msg and "the model's context of 2048 tokens" in msg
    gen = full.generate(images["small"], "what is in this picture", max_new_tokens=4)
    assert gen.tokens.shape[1] >= 1 and gen.keep_pre.shape[1] == 576 + 576 + 24 and gen.s1 <= 2048
    pruned = Pipeline.from_pretrained(str(d), budget=64)  # the export's defaults: sts, budget 64
    gen = pruned.generate(images["square"], "what is in this picture", max_new_tokens=4)
    assert gen.tokens.shape[1] >= 1 and gen.s1 < 300


# ---------------------------------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("window", [None, 4096])
def test_next_mistral_matches_transformers(window: int | None, tmp_path: Path) -> None:
    """LLaVA-NeXT with a Mistral text model (rope theta 1e6, grouped KV, [INST] template; a sliding window of 4096
    or none) against transformers' LlavaNextForConditionalGeneration on the same weights: full-budget last-token
    logits within 1e-4 and 8 greedy tokens equal its generate. Our decoder has no sliding window: the recipe's
    context stops at the window, where it changes nothing."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil

    from sts_export import Pipeline

    d = next_checkpoint(tmp_path / "ckpt", "mistral", context=8192, window=window)
    pipe = Pipeline.from_pretrained(str(d), budget="full", method="none")
    assert pipe.recipe.max_context == (4096 if window else 3952 + 1024)
    hf = LlavaNextForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    img = make_image(640, 480, seed=4)
    prompt = "what is in this picture"
    gen = pipe.generate(img, prompt, max_new_tokens=8)
    inp, pr = pipe.prepare_image(img), pipe.encode(prompt)
    assert pr.prefix.tolist()[:2] == [1, 3]  # <s> [INST]
    px = LlavaNextImageProcessorPil.from_pretrained(d)(img, return_tensors="pt")
    ids = torch.tensor(np.concatenate([pr.prefix, [317] * inp.n_full, pr.suffix])[None])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=px["pixel_values"], image_sizes=px["image_sizes"],
                          max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=318, output_logits=True,
                          return_dict_in_generate=True)
    diff = (torch.from_numpy(gen.first_logits) - out.logits[0]).abs().max().item()
    assert diff <= 1e-4, diff
    assert gen.tokens[0].tolist() == out.sequences[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["next-mistral", "qwen"])
def test_hf_cache_layout_loads_by_id(family: str, user_dirs, tmp_path: Path, monkeypatch) -> None:
    """A checkpoint in the HF cache layout (models--org--name/snapshots/<hash>/ of symlinks into blobs/), loaded by
    its HF id offline, gives the recipe and the weights of the same checkpoint as a plain directory (LLaVA-1.5's
    export test loads it this way too)."""
    import huggingface_hub.constants as hub

    from sts_export.checkpoint import load_model, resolve

    src = user_dirs[family]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    to_hf_cache(copy, tmp_path / "hf-cache", f"someone/{family}-user")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    by_id, by_dir = resolve(f"someone/{family}-user"), resolve(str(src))
    assert by_id.path is not None and "snapshots" in str(by_id.path)
    assert (by_id.recipe.vision, by_id.recipe.text) == (by_dir.recipe.vision, by_dir.recipe.text)
    a, b = load_model(by_id).state_dict(), load_model(by_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qwen_tied_embeddings_load(user_dirs) -> None:
    """Qwen2.5-VL-3B's layout: tied embeddings, no lm_head in the checkpoint; lm_head is embed_tokens."""
    from safetensors import safe_open

    from sts_export.checkpoint import load_model, resolve

    src = user_dirs["qwen"]
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        assert not any("lm_head" in k for k in f.keys())
    src_ = resolve(str(src))
    assert src_.recipe.text.tie_word_embeddings
    m = load_model(src_)
    assert torch.equal(m.lm_head.weight, m.embed_tokens.weight)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-llava-next", "tiny-qwen2.5-vl", "qwen2.5-vl-7b",
                                  "llava-next-mistral-7b"])
def test_raw_prompt_from_the_config_ids(name: str) -> None:
    """Without a tokenizer, each family's raw prompt holds one image slot as its raw input ids do (LLaVA: BOS and one
    image token; Qwen: <|vision_start|>, one <|image_pad|>, <|vision_end|>), text ids that are no special id, and
    its positions compute (Qwen's M-RoPE ids need the vision start before the image)."""
    from sts_export.families import family_module
    from sts_export.recipe import load_recipe
    from sts_export.tokenizer import split_ids, text_ids

    r = load_recipe(name)
    fam = family_module(r.family)
    ids = fam.raw_prompt_ids(r)
    pr = split_ids(ids, r)
    text = [i for i in ids.tolist() if i in text_ids(r)]
    assert len(text) == 5 and all(0 <= i < r.text.vocab_size for i in ids.tolist())
    if r.vision_start_token_id >= 0:
        assert pr.prefix[-1] == r.vision_start_token_id and pr.suffix[0] == r.vision_end_token_id
        if name.startswith("tiny"):
            inp = fam.prepare_image(make_image(300, 200), r)
            assert fam.position_ids(inp, pr, r).shape == (3, len(ids) - 1 + inp.n_full)
    else:
        assert ids[0] == r.bos_token_id and len(pr.prefix) == 3 and len(pr.suffix) == 3


def _next_dict(**changes: object) -> dict:
    cfg = next_config("llama").to_dict()
    for key, value in changes.items():
        part, _, field = key.rpartition(".")
        (cfg[part] if part else cfg)[field] = value
    return cfg


@pytest.mark.parametrize("cfg,msg", [
    (_next_dict(**{"text_config.attention_bias": True}), "attention_bias"),
    (_next_dict(**{"text_config.mlp_bias": True}), "mlp_bias"),
    (_next_dict(**{"text_config.hidden_act": "gelu"}), "hidden_act 'gelu'"),
    (_next_dict(**{"text_config.model_type": "gemma"}), "text model 'gemma' is not supported"),
    (_next_dict(**{"text_config.rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "only default RoPE"),
    (_next_dict(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
    (_next_dict(multimodal_projector_bias=False), "projector without bias"),
])
def test_unsupported_variants_refused_before_any_work(cfg: dict, msg: str, tmp_path: Path) -> None:
    """What our modules would not compute exactly is one line at the start of the export, before any weight loads."""
    import json

    from click.testing import CliRunner

    import export as export_cli

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(export_cli.main, ["--model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert res.exit_code != 0 and msg in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("error: ")


@pytest.mark.parametrize("change,msg", [
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}, "mrope_section"),
])
def test_qwen_unsupported_variants_refused(change: dict, msg: str, tmp_path: Path) -> None:
    import json

    from sts_export import StsError
    from sts_export.checkpoint import resolve

    cfg = qwen_config().to_dict()
    cfg["text_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StsError) as e:
        resolve(str(tmp_path))
    assert msg in one_line(e)
