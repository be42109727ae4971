"""Checkpoint key layouts: every layout transformers reads loads into our modules, by transformers'
own key conversion (sts_export.checkpoint.key_map); tiny models are built and saved by transformers.

Also: synthetic checkpoints load back into transformers, and the export prints no torchvision noise.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sts_export import StsError
from sts_export.checkpoint import internal_name, key_map, load_weights
from sts_export.families.layers import Llava

try:  # the family refactor moves it; take it from wherever it is
    from sts_export.families import recipe_from_hf_config
except ImportError:  # pragma: no cover
    from sts_export.recipe import recipe_from_hf_config

PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def _configs(tie: bool = False):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tie)
    return dict(vision_config=vision, text_config=text, image_token_id=127, vision_feature_layer=-2,
                tie_word_embeddings=tie)


def _random_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct random values in every tensor, so a misplaced weight cannot pass as equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def hf_tiny(family: str, tie: bool = False) -> torch.nn.Module:
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    if family == "llava":
        return _random_(LlavaForConditionalGeneration(LlavaConfig(**_configs(tie))), 0)
    cfg = LlavaNextConfig(**_configs(tie), image_grid_pinpoints=PINPOINTS)
    return _random_(LlavaNextForConditionalGeneration(cfg), 1)


def in_memory_name(name: str) -> str:
    """Our parameter name -> transformers' in-memory (state_dict) name, written out independently."""
    for ours, theirs in (("vision.", "model.vision_tower."), ("projector.", "model.multi_modal_projector."),
                         ("lm_head.", "lm_head.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return "model.image_newline" if name == "image_newline" else "model.language_model." + name


def _hub_name(key: str) -> str:
    """transformers in-memory key -> the hub's llava-hf (pre-v5) key."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."), ("model.image_newline", "image_newline")):
        if key.startswith(new):
            return old + key[len(new):]
    raise AssertionError(key)


def _v5_name(key: str) -> str:
    """transformers in-memory key -> the v5 layout of transformers < 5.23 (vision_model. kept)."""
    return key.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)


LAYOUTS = ("save_pretrained", "save_pretrained_sharded", "hub_llava_hf", "v5_vision_model", "in_memory")


def write_layout(model: torch.nn.Module, layout: str, out: Path) -> Path:
    """`model` saved in one of LAYOUTS to `out` (config.json from transformers' save_pretrained)."""
    if layout.startswith("save_pretrained"):
        model.save_pretrained(out, max_shard_size="40KB" if layout.endswith("sharded") else "5GB")
        return out
    model.config.save_pretrained(out)
    rename = {"hub_llava_hf": _hub_name, "v5_vision_model": _v5_name, "in_memory": lambda k: k}[layout]
    state = {rename(k): t.contiguous() for k, t in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def saved_keys(path: Path) -> list[str]:
    keys = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            keys += list(sf.keys())
    return keys


@pytest.fixture(scope="module")
def hf_llava_tiny() -> torch.nn.Module:
    return hf_tiny("llava")


@pytest.fixture(scope="module")
def hf_next_tiny() -> torch.nn.Module:
    return hf_tiny("llava_next")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_llava_layouts_load_into_ours(layout, hf_llava_tiny, tmp_path) -> None:
    """Every layout loads through load_weights into our Llava, equal to transformers' own tensors."""
    from transformers import LlavaForConditionalGeneration

    d = write_layout(hf_llava_tiny, layout, tmp_path / layout)
    if layout == "save_pretrained_sharded":
        assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 1
    # a layout transformers itself reads, completely
    back, info = LlavaForConditionalGeneration.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    recipe = recipe_from_hf_config(d)
    ours = Llava(recipe)
    load_weights(ours, d, torch.float32)
    expected = hf_llava_tiny.state_dict()
    names = [n for n, _ in ours.named_parameters()]
    assert len(names) > 20 and any(n.startswith("vision.") for n in names)
    for name, p in ours.named_parameters():
        assert torch.equal(p, expected[in_memory_name(name)]), name
        assert torch.equal(p, back.state_dict()[in_memory_name(name)]), name


def test_llava_tied_embeddings(tmp_path) -> None:
    """save_pretrained drops lm_head when it is tied; ours takes embed_tokens as transformers does."""
    hf = hf_tiny("llava", tie=True)
    d = write_layout(hf, "save_pretrained", tmp_path / "tied")
    assert not any("lm_head" in k for k in saved_keys(d))
    ours = Llava(recipe_from_hf_config(d))
    load_weights(ours, d, torch.float32)
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)
    assert torch.equal(ours.embed_tokens.weight, hf.model.language_model.embed_tokens.weight)


def test_unused_keys_skipped_and_missing_is_one_line(hf_llava_tiny, tmp_path) -> None:
    d = write_layout(hf_llava_tiny, "save_pretrained", tmp_path / "sp")
    keys = saved_keys(d)
    cfg = json.loads((d / "config.json").read_text())
    ours = key_map("llava", cfg)
    params = {n for n, _ in Llava(recipe_from_hf_config(d)).named_parameters()}
    unused = {ours(k) for k in keys} - params
    # post_layernorm and the CLIP layer past the feature layer: mapped, never used, not an error
    assert unused == {n for n in unused if "post_layernorm" in n or n.startswith("vision.encoder.layers.2.")}
    assert unused
    state = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            state.update({k: sf.get_tensor(k) for k in sf.keys() if "projector" not in k})
    for f in d.glob("*.safetensors"):
        f.unlink()
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(StsError, match=r"lacks 4 weight\(s\), e\.g\. projector\.") as e:
        load_weights(Llava(recipe_from_hf_config(d)), d, torch.float32)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("layout", ("save_pretrained", "hub_llava_hf", "v5_vision_model", "in_memory"))
def test_llava_next_names(layout, hf_llava_tiny, hf_next_tiny, tmp_path) -> None:
    """NeXT: image_newline plus exactly LLaVA's vision/projector/decoder names, with the right tensors."""
    dn = write_layout(hf_next_tiny, layout, tmp_path / "next")
    dl = write_layout(hf_llava_tiny, layout, tmp_path / "llava")
    cfg_n = json.loads((dn / "config.json").read_text())
    assert cfg_n["model_type"] == "llava_next"
    next_map = key_map("llava_next", cfg_n)
    llava_map = key_map("llava", json.loads((dl / "config.json").read_text()))
    next_names = {next_map(k): k for k in saved_keys(dn)}
    llava_names = {llava_map(k) for k in saved_keys(dl)}
    assert None not in next_names and None not in llava_names
    assert "image_newline" in next_names
    assert set(next_names) - {"image_newline"} == llava_names
    assert {n for n, _ in Llava(recipe_from_hf_config(dl)).named_parameters()} <= set(next_names)
    expected = hf_next_tiny.state_dict()
    for f in dn.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                assert torch.equal(sf.get_tensor(key), expected[in_memory_name(next_map(key))]), key
    # a LLaVA-1.5 map does not take NeXT's newline; NeXT's map without a config (transformers' defaults) does
    assert internal_name("image_newline", "llava") is None
    assert internal_name("image_newline", "llava_next") == "image_newline"


def test_unsupported_model_type() -> None:
    with pytest.raises(StsError, match="model_type 'qwen9_vl' is not supported"):
        internal_name("model.language_model.norm.weight", "qwen9_vl")


def test_synthetic_checkpoint_loads_into_transformers(tiny_dir) -> None:
    """Our synthetic writer's layout is one transformers reads completely, with our weights."""
    from transformers import LlavaForConditionalGeneration

    from sts_export.checkpoint import load_model, resolve

    d = tiny_dir("tiny-llava")
    hf, info = LlavaForConditionalGeneration.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = load_model(resolve("tiny-llava"))
    state = hf.state_dict()
    for name, p in ours.named_parameters():
        assert torch.equal(p, state[in_memory_name(name)]), name


def test_export_graph_prints_no_torchvision_lines(tiny_dir, tmp_path, capfd) -> None:
    """torch.onnx logs four 'torchvision is not installed' lines per export; export_graph drops only those."""
    from sts_export.checkpoint import load_model, resolve
    from sts_export.export.io import export_graph
    from sts_export.artifact.plan import Plan
    from sts_export.graphs import build_graphs

    src = resolve("tiny-llava")
    net = load_model(src)
    plan = Plan.create(src.recipe, "sts", 64)
    graph = build_graphs(net, "sts", 64)["embed"]
    seen: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda r: seen.append(r.getMessage())
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    registry_log.addHandler(handler)
    try:
        export_graph(graph, "embed", plan, src.recipe, torch.float32, tmp_path / "embed.onnx", 18)
        assert (tmp_path / "embed.onnx").is_file()
        assert not [m for m in seen if "torchvision" in m]
        # the filter lives only for the export call: the logger is untouched afterwards
        registry_log.warning("torchvision is not installed. Skipping test::op")
        assert seen[-1] == "torchvision is not installed. Skipping test::op"
    finally:
        registry_log.removeHandler(handler)
    out, err = capfd.readouterr()
    assert "torchvision" not in out + err.replace("torchvision is not installed. Skipping test::op", "")


@pytest.mark.parametrize("layout", ("save_pretrained", "hub_llava_hf", "v5_vision_model"))
def test_fallback_without_transformers_conversion_api(layout, hf_llava_tiny, tmp_path, monkeypatch) -> None:
    """A transformers 5.x without conversion_mapping: the hand-written llava renamings give the same names."""
    import sys

    import sts_export.checkpoint as ck

    d = write_layout(hf_llava_tiny, layout, tmp_path / layout)
    cfg = json.loads((d / "config.json").read_text())
    keys = saved_keys(d)
    with_api = [ck.key_map("llava", cfg)(k) for k in keys]
    ck._canonicalizer.cache_clear()
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", None)  # import now raises ImportError
    try:
        assert [ck.key_map("llava", cfg)(k) for k in keys] == with_api
    finally:
        ck._canonicalizer.cache_clear()
