"""Loading paths and bad input: each a one-line StsError, never a traceback from deep inside."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from sts_export import Pipeline, StsError
from sts_export.checkpoint import load_model, resolve
from sts_export.families.llava import load_image, preprocess_image
from sts_export.recipe import load_recipe
from tests.conftest import make_image


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_unknown_model_method_backend() -> None:
    with pytest.raises(StsError, match="unknown model 'nonexistent-model'") as e:
        Pipeline.from_pretrained("nonexistent-model")
    one_line(e)
    with pytest.raises(StsError, match="unknown method 'magic'"):
        Pipeline.from_pretrained("tiny-llava", method="magic")
    with pytest.raises(StsError, match="unknown backend"):
        Pipeline.from_pretrained("tiny-llava", backend="tpu")
    with pytest.raises(StsError, match="out of range"):
        Pipeline.from_pretrained("tiny-llava", budget=10_000)


def test_hf_id_not_cached_says_how_to_provide(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(StsError, match="not in the local Hugging Face cache.*download") as e:
        resolve("llava-1.5-7b")
    one_line(e)
    with pytest.raises(StsError, match="not in the local Hugging Face cache"):
        resolve("someone/some-llava")


def test_missing_or_pickled_weights(tiny_dir, tmp_path) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(tiny_dir("tiny-llava") / "config.json", d)
    with pytest.raises(StsError, match="no \\*.safetensors"):
        Pipeline.from_pretrained(str(d))
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(StsError, match="pickled weights.*never loaded") as e:
        Pipeline.from_pretrained(str(d))
    one_line(e)
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(StsError, match="cannot read safetensors"):
        Pipeline.from_pretrained(str(d))
    with pytest.raises(StsError, match="no config.json"):
        Pipeline.from_pretrained(str(tmp_path))


def test_incomplete_checkpoint(tiny_dir, tmp_path) -> None:
    src = tiny_dir("tiny-llava")
    d = tmp_path / "partial"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if "layers.1." not in k}
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(StsError, match="lacks .* weight"):
        Pipeline.from_pretrained(str(d))


def test_legacy_key_layout_and_local_dir_defaults(tiny_dir, tmp_path) -> None:
    """Hub llava-hf checkpoints use the pre-v5 layout (language_model.model.*): same weights load."""
    src = tiny_dir("tiny-llava-gqa")
    d = tmp_path / "legacy"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, d)
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        state = {}
        for k in f.keys():
            new = (k.replace("model.language_model.", "language_model.model.")
                   .replace("model.vision_tower.", "vision_tower.")
                   .replace("model.multi_modal_projector.", "multi_modal_projector.")
                   .replace("lm_head.", "language_model.lm_head."))
            state[new] = f.get_tensor(k)
    save_file(state, str(d / "model.safetensors"))
    a = load_model(resolve(str(src), recipe="tiny-llava-gqa"))
    b = load_model(resolve(str(d)))
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    # a directory without a named recipe gets family defaults
    rec = resolve(str(d)).recipe
    assert rec.pruning.prune_layer == rec.text.num_layers // 2 == 2
    assert abs(rec.pruning.post_ratio - 1 / 3) < 1e-12 and rec.text.num_kv_heads == 2


def test_recipe_mismatch(tiny_dir) -> None:
    with pytest.raises(StsError, match="does not match recipe 'tiny-llava'"):
        resolve(str(tiny_dir("tiny-llava-gqa")), recipe="tiny-llava")


def test_random_weights_offline() -> None:
    src = resolve("llava-1.5-7b", random_weights=True)
    assert src.path is None and src.recipe.text.num_layers == 32
    a = load_model(resolve("tiny-llava", random_weights=True), seed=3)
    b = load_model(resolve("tiny-llava", random_weights=True), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_not_an_image(tmp_path) -> None:
    bad = tmp_path / "photo.jpg"
    bad.write_text("this is text, not a JPEG")
    with pytest.raises(StsError, match="not a readable image") as e:
        load_image(bad)
    one_line(e)
    with pytest.raises(StsError, match="does not exist"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16"])
def test_image_modes_converted_like_hf(mode: str, tmp_path) -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    base = make_image(320, 240, seed=4)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L")).astype("<u2") * 257)
    else:
        img = base.convert(mode)
    if mode in ("RGBA", "LA"):
        a = np.asarray(img).copy()
        a[..., -1] = np.linspace(0, 255, a.shape[1]).astype(np.uint8)[None]
        img = Image.fromarray(a, mode=mode)
    path = tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    img.save(path)
    ours = preprocess_image(load_image(path), load_recipe("tiny-llava").image_processor)
    assert ours.shape == (3, 336, 336)
    if mode == "I;16":  # HF has no 16-bit path; we scale to 8 bits, equal to the 8-bit grayscale
        ref_img = base.convert("L")
    else:
        ref_img = Image.open(path)
    hf = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3)
    ref = hf(ref_img, return_tensors="np")["pixel_values"][0]
    assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-llava-gqa"])
@pytest.mark.parametrize("size", [(500, 400), (300, 600), (336, 336), (64, 900)])
def test_preprocessing_equals_hf_processor(name: str, size: tuple[int, int]) -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    cfg = load_recipe(name).image_processor
    cls = LlavaImageProcessorPil if cfg.do_pad else CLIPImageProcessorPil
    hf = cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3, do_pad=cfg.do_pad)
    img = make_image(*size, seed=sum(size))
    ref = hf(img, return_tensors="np")["pixel_values"][0]
    assert np.abs(preprocess_image(img, cfg) - ref).max() == 0.0


def test_prompt_errors(tiny_dir) -> None:
    pipe = Pipeline.from_pretrained("tiny-llava", budget=64)
    img = make_image()
    with pytest.raises(StsError, match="prompt is empty"):
        pipe.generate(img, "   ")
    with pytest.raises(StsError, match="prompt too long"):
        pipe.generate(img, "What is shown in this image? " * 200)
    with pytest.raises(StsError, match="exactly one image token"):
        pipe.generate(img, input_ids=[1, 2, 3])
    with pytest.raises(StsError, match=r"pixel_values must be \[B, 3, 336, 336\]"):
        pipe.generate(np.zeros((1, 3, 224, 224), np.float32), "hi")
    out = pipe.generate(img, input_ids=[1, 4, 20, 21], max_new_tokens=2)  # raw ids work without a template
    assert out.tokens.shape == (1, 2)


def test_config_json_validation(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(StsError, match="model_type 'qwen2_vl' is not supported; supported: llava, llava_next"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(StsError, match="not valid JSON"):
        resolve(str(tmp_path))
