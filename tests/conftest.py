"""Shared fixtures: tiny synthetic models (generated offline) and transformers' own LLaVA on the same weights."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = ["tiny-llava", "tiny-llava-gqa"]  # MHA with prune_layer = L/2; grouped KV with prune_layer != L//2


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep generated synthetic models out of the user's cache unless STS_CACHE is set (the CLI subprocesses too:
    they then load the very checkpoint files the in-process exports did, so sibling exports' graphs match)."""
    if "STS_CACHE" not in os.environ:
        import sts_export.checkpoint as ck

        ck.CACHE_DIR = tmp_path_factory.mktemp("sts-cache")
        os.environ["STS_CACHE"] = str(ck.CACHE_DIR)


@pytest.fixture(scope="session")
def tiny_dir() -> "callable":
    from sts_export.checkpoint import ensure_synthetic
    from sts_export.recipe import load_recipe

    return lambda name: ensure_synthetic(load_recipe(name))


_HF: dict[str, torch.nn.Module] = {}


def hf_llava(path: Path) -> torch.nn.Module:
    """transformers' LlavaForConditionalGeneration on the checkpoint (eager attention, fp32)."""
    from transformers import LlavaForConditionalGeneration

    key = str(path)
    if key not in _HF:
        _HF[key] = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    return _HF[key]


def make_image(w: int = 500, h: int = 400, seed: int = 0) -> Image.Image:
    """A smooth random image (blocks + noise) so nearby patches are similar, as in photos."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (8, 10, 3)).astype(np.uint8)
    img = Image.fromarray(blocks).resize((w, h), Image.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))
