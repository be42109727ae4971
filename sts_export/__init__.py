"""sts-export: LLaVA-family VLMs to ONNX/TensorRT with STS visual-token pruning inside the graphs.

Names are imported lazily, so torch-free paths (the Jetson engine build) never import torch.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_recipe", "split_budget", "select_tokens", "Pipeline", "StsError", "__version__"]
_WHERE = {"load_recipe": "recipe", "split_budget": "pruning.budget", "select_tokens": "pruning.selection",
          "Pipeline": "pipeline", "StsError": "errors"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'sts_export' has no attribute {name!r}")
