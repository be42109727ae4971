"""The Stage 1 probe: the selection function alone, exported or compiled for the backend in use, timed on features
of the model's shape, so Stage 1's share of the pruned TTFT can be read off."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from sts_export.bench.timing import time_repeats
from sts_export.bench.exports import _cache_root, _want_cuda
from sts_export.bench.options import BenchOptions, Config
from sts_export.pruning.loop import keep_first_k


# ----------------------------------------------------------------------------------------------- Stage 1 probe
def _stage1_module(method: str, k: int, anchor: str) -> Any:
    """Stage 1 alone, as the vision graph runs it (`keep_first_k`: the greedy's ONNX Loop, K = K_max)."""
    import torch


    class Stage1(torch.nn.Module):
        def forward(self, x: torch.Tensor, cls_att: torch.Tensor) -> torch.Tensor:
            return keep_first_k(method, x, k, k, anchor, cls_att)  # cls_att is read by `cls` and anchor saliency only

    return Stage1().eval()


def _stage1_inputs(recipe: Any, method: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = recipe.num_image_tokens
    c = recipe.text.hidden_size if method == "divprune" else recipe.vision.hidden_size
    return rng.standard_normal((1, n, c)).astype(np.float32), rng.random((1, n)).astype(np.float32)


def stage1_probe(pipe: Any, cfg: Config, backend: str, opts: BenchOptions) -> tuple[list[float], str | None]:
    """Seconds per Stage 1 call alone (the same selection code, on this backend), or ([], why not)."""
    if cfg.budget == "full" or cfg.method in ("fastv", "none"):
        return [], None
    import torch

    recipe, anchor = pipe.recipe, pipe.anchor
    mod = _stage1_module(cfg.method, cfg.k_pre, anchor)
    x, cls_att = _stage1_inputs(recipe, cfg.method)
    warm, reps = max(opts.warmup, 1), max(opts.repeats, 10)
    if backend in ("torch", "torch-compile"):
        dev = torch.device("cuda" if _want_cuda(opts) else "cpu")
        xt, ct = torch.from_numpy(x).to(dev), torch.from_numpy(cls_att).to(dev)
        f = torch.compile(mod, dynamic=False) if backend == "torch-compile" else mod

        def run() -> None:
            with torch.inference_mode():
                f(xt, ct)

        return time_repeats(run, warm, reps, torch.cuda.synchronize if dev.type == "cuda" else None), None
    if backend == "ort":
        import onnxruntime as ort

        d = _cache_root() / "bench-exports" / "stage1"
        d.mkdir(parents=True, exist_ok=True)
        # "loop3": the batched Loop with its explicit cond; "-loop", "-loop2", "-unrolled" files hold earlier forms
        path = d / f"{cfg.method}-n{x.shape[1]}-c{x.shape[2]}-k{cfg.k_pre}-{anchor}-loop3.onnx"
        if not path.is_file():
            from sts_export.export.io import onnx_export  # the project's one torch.onnx.export call

            tmp = path.with_suffix(f".tmp{os.getpid()}")
            onnx_export(mod, (torch.from_numpy(x), torch.from_numpy(cls_att)), None, ["features", "cls_attention"],
                        ["keep_pre"], tmp, 18)
            os.replace(tmp, path)
        inner = getattr(pipe.backend, "inner", pipe.backend)
        sess = ort.InferenceSession(str(path), getattr(inner, "opts", None),
                                    providers=getattr(inner, "providers", ["CPUExecutionProvider"]))
        feeds = {i.name: {"features": x, "cls_attention": cls_att}[i.name] for i in sess.get_inputs()}
        return time_repeats(lambda: sess.run(None, feeds), warm, reps), None
    return [], f"Stage 1 probe not implemented for backend {backend} (its time is inside vision_ms)"


