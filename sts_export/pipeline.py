"""Pipeline: image + prompt in, answer out, with STS pruning, on any backend."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from PIL import Image

from sts_export.pruning.budget import check_method, parse_budget
from sts_export.errors import StsError
from sts_export.families import ImageInput, family_module
from sts_export.families.llava import pixel_input
from sts_export.recipe import ANCHORS, Recipe
from sts_export.artifact.protocol import Backend
from sts_export.backends.open import backend_name, open_export
from sts_export.artifact.plan import NP_DTYPES, TORCH_DTYPES, Plan
from sts_export.generate import Generation, generate
from sts_export.tokenizer import Prompt, TextTokenizer, check_prompt_fits, raw_prompt_note, split_ids

if TYPE_CHECKING:
    from sts_export.families.layers import Llava



class Pipeline:
    """Preprocess, run the graphs through a backend, decode greedily."""

    def __init__(self, recipe: Recipe, backend: Backend, plan: Plan, tokenizer: TextTokenizer | None,
                 anchor: str, source: str, model: "Llava | None" = None) -> None:
        self.recipe, self.backend, self.plan, self.tokenizer = recipe, backend, plan, tokenizer
        self.anchor, self.source, self.model = anchor, source, model
        self._said_raw = False  # the raw-prompt line (no tokenizer) is said once

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        budget: int | str = "full",
        method: str = "sts",
        backend: str = "torch",
        *,
        recipe: str | None = None,
        anchor: str | None = None,
        dtype: str = "fp32",
        device: str = "cpu",
        random_weights: bool = False,
        compile: bool = False,
        max_pixels: int | None = None,
    ) -> "Pipeline":
        """Load a model (recipe name, local checkpoint directory or cached HF id) and build its pruned torch graphs
        (backend "torch"; an export directory is opened with `Pipeline.from_export`).
        max_pixels (dynamic resolution, torch): cap the image area as an export's --max-pixels does (default:
        the recipe's own, as transformers' processor).
        """
        check_method(method)
        budget = parse_budget(budget)
        if backend_name(backend) != "torch":
            raise StsError(f"backend '{backend}' runs an export directory: open it with Pipeline.from_export(DIR, "
                           f"backend='{backend}'); from_pretrained builds the torch graphs of a checkpoint")
        import torch

        from sts_export.backends.torch import TorchBackend
        from sts_export.checkpoint import load_model, resolve
        from sts_export.graphs import build_graphs

        if dtype not in TORCH_DTYPES:
            raise StsError(f"unknown dtype '{dtype}'; choose one of {', '.join(TORCH_DTYPES)}")
        if anchor is not None and anchor not in ANCHORS:
            raise StsError(f"unknown anchor '{anchor}'; choose one of {', '.join(ANCHORS)}")
        src = resolve(str(path_or_id), recipe, random_weights)
        if max_pixels is not None:
            import dataclasses

            from sts_export.recipe import with_max_pixels

            src = dataclasses.replace(src, recipe=with_max_pixels(src.recipe, max_pixels))
        rec = src.recipe
        plan = Plan.create(rec, method, budget, NP_DTYPES[dtype])
        model = load_model(src, getattr(torch, TORCH_DTYPES[dtype])).to(device)
        anchor = anchor or rec.pruning.anchor
        graphs = build_graphs(model, method, budget, anchor)
        tok = None
        if src.path is not None and (src.path / "tokenizer.json").is_file():
            tok = TextTokenizer(src.path, rec)
        return cls(rec, TorchBackend(graphs, plan, device, compile), plan, tok, anchor, src.description, model)

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike, backend: str = "auto", device: str = "auto",
                    threads: int | None = None, form: str = "auto", inplace: bool = True) -> "Pipeline":
        """Open an export directory (ONNX graphs, TensorRT engines or AOTInductor packages; `backends.open`)."""
        return load_export_pipeline(export_dir, backend, device, threads, form, inplace)

    # ------------------------------------------------------------------ inputs
    def prepare_image(self, images: Image.Image | str | os.PathLike | Sequence) -> ImageInput:
        """Image(s) -> the vision graph's inputs, by the family's own preprocessing (= its HF processor)."""
        return family_module(self.recipe.family).prepare_image(images, self.recipe)

    def pixel_values(self, images: Image.Image | str | os.PathLike | Sequence) -> np.ndarray:
        """One image or a list -> pixel_values as the model's HF processor ([B,3,H,W] for LLaVA-1.5)."""
        return self.prepare_image(images).feeds["pixel_values"]

    def encode(self, prompt: str | None = None, input_ids: Sequence[int] | None = None) -> Prompt:
        """A prompt string (templated, tokenized) or raw ids holding one image token. Without a tokenizer and ids:
        the family's raw prompt from the config's own ids (`raw_prompt_ids`), said once in one line on stderr."""
        if input_ids is not None:
            return split_ids(np.asarray(input_ids), self.recipe)
        if self.tokenizer is None:
            ids = family_module(self.recipe.family).raw_prompt_ids(self.recipe)
            if not self._said_raw:
                unused = "the prompt text cannot be encoded and is not used; " if prompt else ""
                print(unused + raw_prompt_note(ids, self.recipe), file=sys.stderr)
                self._said_raw = True
            return split_ids(ids, self.recipe)
        return self.tokenizer.encode_prompt(prompt or "")

    # ------------------------------------------------------------------ run
    def generate(
        self,
        image: Image.Image | str | os.PathLike | Sequence | np.ndarray,
        prompt: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        max_new_tokens: int = 32,
        on_token: Callable[[np.ndarray], np.ndarray | None] | None = None,
    ) -> Generation:
        """Prefill + greedy decode. `image`: a path, PIL image(s), an ImageInput, or pixel_values [B,3,H,W] (LLaVA-1.5)."""
        if isinstance(image, ImageInput):
            inp = image
        elif isinstance(image, np.ndarray):
            if self.recipe.dynamic_tokens:
                raise StsError(f"family {self.recipe.family} needs an image (or its ImageInput), not bare pixel_values")
            inp = pixel_input(image.astype(np.float32), self.recipe)
        else:
            inp = self.prepare_image(image)
        return self.generate_prepared(inp, self.encode(prompt, input_ids), max_new_tokens, on_token)

    def generate_prepared(self, inp: ImageInput, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 32,
                          on_token: Callable[[np.ndarray], np.ndarray | None] | None = None,
                          timings: dict[str, float] | None = None) -> Generation:
        """Prefill + greedy decode of prepared inputs: one ImageInput (B images for fixed-N families) and one Prompt
        for every row or one per row, of equal token lengths (`sts_export.generate.generate`, which refuses a prompt
        that does not fit with its image and fills `timings`)."""
        if max_new_tokens < 0:
            raise StsError("max_new_tokens must be >= 0")
        sync = getattr(self.backend, "synchronize", None)
        return generate(self.backend, self.plan, inp, prompts, max_new_tokens, on_token, sync, timings)

    def check_context(self, inp: ImageInput, prompt: Prompt, max_new_tokens: int) -> None:
        """Refuse in one line a prompt that does not fit with this image (its K tokens entering the decoder) and
        `max_new_tokens` new ones (`tokenizer.check_prompt_fits`), before it is queued or run."""
        k_pre, _ = self.plan.image_split(inp)
        check_prompt_fits(self.recipe, prompt, k_pre, max_new_tokens)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        if self.tokenizer is None:
            return " ".join(str(int(i)) for i in ids)
        return self.tokenizer.decode(ids)


def load_export_pipeline(export_dir: str | os.PathLike, backend: str = "auto", device: str = "auto",
                         threads: int | None = None, form: str = "auto", inplace: bool = True) -> Pipeline:
    """A Pipeline over an export directory (`backends.open.open_export`: engines, else ONNX graphs, else AOTInductor
    packages, or the backend named); its tokenizer when the export has one. Same as `Pipeline.from_export`."""
    opened = open_export(export_dir, backend, device, threads, form, inplace)
    tok = TextTokenizer(Path(export_dir), opened.recipe) if (Path(export_dir) / "tokenizer.json").is_file() else None
    return Pipeline(opened.recipe, opened.backend, opened.plan, tok, opened.manifest["anchor"], str(export_dir))
