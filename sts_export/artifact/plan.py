"""What an export configuration holds, for the generation loop and every backend: the Plan (method, budget, K, K',
prune layer, KV layout, the family's vision inputs) and the graphs' IO names (DESIGN.md's contract).

Torch-free: the ONNX Runtime and TensorRT runtimes read it on a device without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sts_export.families import ImageInput, family_module
from sts_export.pruning.budget import export_split, has_stage2, prune_layer_for, split_budget
from sts_export.recipe import Recipe
from sts_export.tokenizer import Prompt


def graph_io(name: str, layers: list[int] | None = None, vision_inputs: tuple[str, ...] = ("pixel_values",),
             dynamic: bool = False, deepstack: bool = False) -> tuple[list[str], list[str]]:
    """Input and output names of a graph (DESIGN.md); `layers` = global indices of a segment's layers.

    `vision_inputs` are the family's; `dynamic` (image-dependent N) adds the length-only inputs
    `k_pre` [K] / `k_post` [K'] that carry this image's K and K' as dimensions. `deepstack` (a family with
    DeepStack taps): the vision graph also returns `deepstack_embeds` [T,B,K,Hd], and segment1 takes it with
    `image_start` [] int64 (the planes' first sequence row).
    """
    if name == "vision":
        return list(vision_inputs), ["image_embeds", "keep_pre", *(["deepstack_embeds"] if deepstack else [])]
    if name == "embed":
        return ["input_ids"], ["inputs_embeds"]
    if name == "prune":
        lengths = ["k_pre", "k_post"] if dynamic else []
        return ["hidden", "position_ids", "image_start", *lengths], ["hidden_out", "position_ids_out", "keep_post"]
    if name in ("segment1", "segment2"):
        past = [f"past_{kv}_{i}" for i in layers or [] for kv in ("key", "value")]
        present = [f"present_{kv}_{i}" for i in layers or [] for kv in ("key", "value")]
        deep = ["deepstack_embeds", "image_start"] if deepstack and name == "segment1" else []
        return ["hidden", "position_ids", *deep, *past], ["hidden_out" if name == "segment1" else "logits", *present]
    raise ValueError(f"unknown graph {name}")


# dtype names -> torch dtype names, and -> the numpy dtype of hidden states / caches fed from the host
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
NP_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "float32"}  # numpy has no bfloat16


@dataclass(frozen=True)
class Plan:
    """What the generation loop needs to know about an export configuration."""

    method: str
    budget: int | str
    k_pre: int
    k_post: int
    prune_layer: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    has_prune: bool
    eos_token_id: int
    dtype: str = "float32"  # numpy dtype name of hidden states and KV caches
    recipe: Recipe | None = field(default=None, compare=False, repr=False)
    vision_inputs: tuple[str, ...] = ("pixel_values",)  # the vision graph's inputs (family's + k_pre)

    @classmethod
    def create(cls, recipe: Recipe, method: str, budget: int | str, dtype: str = "float32") -> "Plan":
        """k_pre/k_post are the export's K and K' (for image-dependent N: K_max and K'_max)."""

        k_pre, k_post = export_split(budget, recipe, method)
        t = recipe.text
        pruned = method not in ("none", "fastv") and budget != "full"
        vis = tuple(family_module(recipe.family).vision_inputs(pruned)) + (("k_pre",) if recipe.dynamic_tokens and pruned else ())
        return cls(method, budget, k_pre, k_post, prune_layer_for(method, recipe), t.num_layers, t.num_kv_heads,
                   t.head_dim, has_stage2(method, budget), recipe.eos_token_id, dtype, recipe, vis)

    @property
    def dynamic(self) -> bool:
        return self.recipe is not None and self.recipe.dynamic_tokens

    @property
    def deepstack(self) -> int:
        """DeepStack taps T of the model (0: none): vision returns deepstack_embeds, segment1 takes them."""
        return len(self.recipe.vision.deepstack_visual_indexes) if self.recipe is not None else 0

    @property
    def position_axes(self) -> int:
        """Rows of the decoder's position ids: 1 ([B, S]), or 3 for M-RoPE ([3, B, S]: t, h, w)."""
        return len(self.recipe.text.mrope_section) if self.recipe is not None and self.recipe.text.mrope_section else 1

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end a row's generation: eos and the recipe's extra stop ids."""
        extra = self.recipe.stop_token_ids if self.recipe is not None else ()
        return (self.eos_token_id, *(i for i in extra if i != self.eos_token_id))

    def prompt_positions(self, image: ImageInput, prompt: Prompt, keep_pre: np.ndarray) -> np.ndarray:
        """Position ids of the S1 prompt tokens entering the decoder (prefix, the K image tokens, suffix).

        1-D families: [B, S1] = 0..S1-1 (contiguous after Stage 1). A family with explicit ids (M-RoPE):
        its ids of the *unpruned* prompt (`position_ids`, [R, S_full]) at the kept tokens, so every kept
        token keeps its own and the suffix keeps its ids: [R, B, S1].
        """
        b, k = keep_pre.shape
        p, t = len(prompt.prefix), len(prompt.suffix)
        explicit = None
        if self.recipe is not None:

            explicit = getattr(family_module(self.recipe.family), "position_ids", None)
        if explicit is None:
            return np.tile(np.arange(p + k + t, dtype=np.int64), (b, 1))
        full = explicit(image, prompt, self.recipe)  # [R, P + N_full + T]
        cols = np.concatenate([np.arange(p), p + keep_pre[0], p + image.n_full + np.arange(t)])  # one image per call
        return np.ascontiguousarray(np.broadcast_to(full[:, None, cols], (full.shape[0], b, cols.shape[0])))

    def image_split(self, image: ImageInput) -> tuple[int, int]:
        """This image's (K, K'): the export's own for a fixed N; else from the budget and the image's N."""
        if not self.dynamic:
            return self.k_pre, self.k_post
        assert self.recipe is not None
        stage1 = self.method not in ("none", "fastv") and self.budget != "full"
        return tuple(split_budget(self.budget, self.recipe, self.method, n=image.n if stage1 else image.n_full))

    @property
    def segment_layers(self) -> dict[str, list[int]]:
        return {"segment1": list(range(self.prune_layer)), "segment2": list(range(self.prune_layer, self.num_layers))}

    def io(self, graph: str) -> tuple[list[str], list[str]]:
        return graph_io(graph, self.segment_layers.get(graph), self.vision_inputs, self.dynamic, self.deepstack > 0)
