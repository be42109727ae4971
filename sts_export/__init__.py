"""sts-export: LLaVA-family VLMs to ONNX/TensorRT with STS visual-token pruning inside the graphs."""
from .budget import split_budget
from .errors import StsError
from .pipeline import Pipeline
from .recipe import load_recipe
from .selection import select_tokens

__version__ = "0.1.0"
__all__ = ["load_recipe", "split_budget", "select_tokens", "Pipeline", "StsError", "__version__"]
