"""The ONNX Runtime backend on CUDA (onnxruntime-gpu): the same exports and the same I/O-binding code path as on
CPU, with hidden states and KV caches resident on the GPU. Greedy tokens, Stage 1/Stage 2 picks and first logits
against torch, and what crosses to the host per step. Skipped without a GPU and onnxruntime's CUDA provider.

Both dtypes run their portable graphs on CUDA: fp32 in float32 (TF32 off) against torch fp32 on the CPU, the
suite's reference; fp16 against torch fp16 on CUDA."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sts_export import Pipeline
from sts_export.export.onnx import export
from sts_export.pipeline import load_export_pipeline
from tests.conftest import make_image

pytestmark = pytest.mark.gpu
ort = pytest.importorskip("onnxruntime")
if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("needs a CUDA GPU and onnxruntime-gpu", allow_module_level=True)

PROMPT = "What is shown in this image?"
NEW = 12
CASES = [  # (tiny model, method, budget, dtype): Stage 1 at fp32 for NeXT, whose tiny model's potential energies
    # hold fp16 near-ties (torch fp16 on CUDA already picks differently from torch fp32), and NeXT's fp16 graphs
    # without Stage 1
    ("tiny-llava", "sts", 64, "fp32"),
    ("tiny-llava", "none", "full", "fp32"),
    ("tiny-llava-gqa", "sts", 32, "fp16"),
    ("tiny-llava-next", "sts", 320, "fp32"),
    ("tiny-llava-next", "none", "full", "fp16"),
    ("tiny-qwen2.5-vl", "sts", "20%", "fp16"),
]


class HostCopies:
    """Wraps an OrtBackend's to_numpy/run: records every array copied to the host and every output's device."""

    def __init__(self, be: Any) -> None:
        self.copied, self.devices = [], set()
        to_numpy, run = be.to_numpy, be.run

        def counted_to_numpy(x: Any) -> np.ndarray:
            a = to_numpy(x)
            self.copied.append(a.shape)
            return a

        def counted_run(graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
            out = run(graph, feeds)
            self.devices |= {(graph, v.device_name().lower()) for v in out.values() if isinstance(v, ort.OrtValue)}
            return out

        be.to_numpy, be.run = counted_to_numpy, counted_run


@pytest.mark.parametrize("name,method,budget,dtype", CASES)
def test_ort_cuda_resident_equals_torch(tmp_path: Path, name: str, method: str, budget: int | str, dtype: str) -> None:
    d = export(name, budget=budget, method=method, dtype=dtype, out=tmp_path / "e", validate=False,
               progress=lambda s: None)
    img = make_image(seed=21)
    ref = Pipeline.from_pretrained(name, budget=budget, method=method, dtype=dtype,
                                   device="cpu" if dtype == "fp32" else "cuda")
    a = ref.generate(img, PROMPT, max_new_tokens=NEW)
    pipe = load_export_pipeline(d, backend="onnxruntime", device="cuda")
    be = pipe.backend
    assert be.device_type == "cuda" and be.form == "portable"  # the ORT form is for the CPU provider
    rec = HostCopies(be)
    b = pipe.generate(img, PROMPT, max_new_tokens=NEW)
    assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in be.sessions.values())
    # every output ONNX Runtime handed back stayed on the GPU
    assert rec.devices and {dev for _, dev in rec.devices} == {"cuda"}, sorted(rec.devices)
    # what came to the host: the logits row [B, V] of the prefill and of each step, and the picks keep_pre [B, K]
    # / keep_post [B, K'] (positions are computed on the host); never a hidden state or a KV cache
    vocab = ref.recipe.text.vocab_size
    assert all(len(s) == 2 for s in rec.copied), rec.copied
    assert sum(1 for s in rec.copied if s[-1] == vocab) == NEW and len(rec.copied) <= NEW + 2, rec.copied
    assert b.keep_pre.tolist() == a.keep_pre.tolist()
    if a.keep_post is not None:
        assert b.keep_post.tolist() == a.keep_post.tolist()
    assert (b.s1, b.s2) == (a.s1, a.s2)
    tol = ref.recipe.tolerance.fp32 if dtype == "fp32" else ref.recipe.tolerance.fp16
    assert np.abs(a.first_logits - b.first_logits).max() <= tol
    assert b.tokens.tolist() == a.tokens.tolist()
    # the same export on the CPU provider: the same tokens (one code path, two devices)
    c = load_export_pipeline(d, backend="onnxruntime", device="cpu").generate(img, PROMPT, max_new_tokens=NEW)
    assert c.tokens.tolist() == b.tokens.tolist() and c.keep_pre.tolist() == b.keep_pre.tolist()
