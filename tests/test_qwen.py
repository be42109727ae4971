"""Qwen2.5-VL pipeline against transformers' own Qwen2_5_VLForConditionalGeneration on the same weights (fp32,
CPU, eager attention): full-budget logits and greedy tokens at three image sizes, Stage 1 on transformers' ViT
features (2x2 means, raster order), the prefix property of the K_max-step greedy, Stage-1-only logits with
the kept features and their own 3-D ids spliced in, Stage 2 against transformers' eager attention with
M-RoPE, cached decode against recompute, `cls` refused (DESIGN.md "Verification per family").

Everything on the transformers side comes from transformers' own modules and processor: pixel_values and
image_grid_thw from Qwen2VLImageProcessorPil, V from its ViT (window order undone with its own
get_vision_window_index), 3-D ids from its get_rope_index -- never from our host helpers.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pytest
import torch
from PIL import Image

from sts_export import Pipeline, StsError, load_recipe, split_budget
from sts_export.families import ImageInput
from sts_export.pruning.budget import FASTV_LAYER
from sts_export.tokenizer import Prompt
from tests.conftest import make_image
from tests.test_next import generate_logged
from tests.test_parity import PROMPT
from tests.test_selection import ref_algorithm1

NAME = "tiny-qwen2.5-vl"
RECIPE = load_recipe(NAME)
IMG = RECIPE.image_token_id
# (width, height) -> what smart_resize does with the tiny recipe's bounds (max_pixels 200704 = 256 tokens)
FULL_SIZES = {(448, 280): "same", (300, 200): "round", (640, 480): "shrink"}
STS = ("sts", "20%", (448, 280), 5)  # method, budget, (w, h), seed: K < K_max (the greedy runs K_max steps)
STS_S = ("sts-s", "10%", (300, 200), 3)
FASTV = ("fastv", "60%", (448, 280), 6)  # 4 decoder layers: FastV needs b > N/2


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ckpt(tiny_dir):
    return tiny_dir(NAME)


@pytest.fixture(scope="module")
def hf(ckpt) -> torch.nn.Module:
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def processor(ckpt):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(ckpt)


@dataclass(eq=False)
class HfImage:
    """One image on the transformers side: its processor's tensors and its ViT's outputs."""

    hf: torch.nn.Module
    img: Image.Image
    pixel_values: torch.Tensor  # [Np, 1176] (processor)
    grid: torch.Tensor  # [1, 3] image_grid_thw

    @cached_property
    def vit(self):
        with torch.no_grad():
            return self.hf.model.visual(self.pixel_values, grid_thw=self.grid)

    @cached_property
    def groups(self) -> torch.Tensor:
        """The pre-merger ViT output per LLM token [N, 4, C] in raster order (transformers' window order undone
        with transformers' own window index)."""
        from transformers.vision_utils import get_vision_window_index

        vis = self.hf.model.visual
        win, _ = get_vision_window_index(self.grid, vis.spatial_merge_size, vis.window_size, vis.patch_size)
        x = self.vit.last_hidden_state  # [Np, C] window order
        unit = vis.spatial_merge_size**2
        return x.reshape(-1, unit, x.shape[-1])[torch.argsort(win)]

    @cached_property
    def v(self) -> torch.Tensor:
        """Stage 1 features V [N, C]: each merge unit's mean."""
        return self.groups.mean(dim=1)

    @property
    def span(self) -> torch.Tensor:
        """The merger output of every token, raster order [N, Hd] (what transformers splices in)."""
        return self.vit.pooler_output

    def project(self, keep) -> torch.Tensor:
        """transformers' PatchMerger on the kept tokens' own four patches: [K, Hd]."""
        g = self.groups[list(keep)]
        with torch.no_grad():
            return self.hf.model.visual.merger(g.reshape(-1, g.shape[-1]))

    def rope_ids(self, prompt: Prompt) -> torch.Tensor:
        """transformers' get_rope_index of the unpruned prompt: [3, 1, S_full]."""
        n, img = self.span.shape[0], self.hf.config.image_token_id
        ids = torch.tensor(np.concatenate([prompt.prefix, [img] * n, prompt.suffix])[None])
        pos, _ = self.hf.model.get_rope_index(ids, mm_token_type_ids=(ids == img).int(), image_grid_thw=self.grid)
        return pos


def hf_image(hf, processor, img: Image.Image) -> HfImage:
    px = processor(img, return_tensors="pt")
    return HfImage(hf, img, px["pixel_values"], px["image_grid_thw"])


@dataclass(eq=False)
class Case:
    """One pipeline run (method, budget) on one image, with the transformers side of that image."""

    method: str
    budget: int | str
    pipe: Pipeline
    inp: ImageInput
    prompt: Prompt
    gen: object  # Generation
    step_logits: torch.Tensor  # [steps, V]
    ref: HfImage

    @cached_property
    def ref_keep(self) -> list[int]:
        """Plain Algorithm 1 (tests/test_selection.py) on transformers' V, with the K the pipeline used."""
        return ref_algorithm1(self.ref.v.numpy(), self.gen.keep_pre.shape[1], self.pipe.anchor)

    @property
    def start(self) -> int:
        return self.prompt.image_start

    def embeds(self, span: torch.Tensor) -> torch.Tensor:
        """transformers' embeddings of prefix + [image]*len(span) + suffix with the span replaced: [1, S1, Hd]."""
        ids = np.concatenate([self.prompt.prefix, [self.pipe.recipe.image_token_id] * span.shape[0], self.prompt.suffix])
        with torch.no_grad():
            emb = self.ref.hf.get_input_embeddings()(torch.tensor(ids[None]))
        emb[0, self.start:self.start + span.shape[0]] = span
        return emb

    def kept_ids(self, keep: list[int]) -> torch.Tensor:
        """transformers' 3-D ids of the unpruned prompt at prefix + the kept image tokens + suffix: [3, 1, S1]."""
        full = self.ref.rope_ids(self.prompt)
        n, p = self.ref.span.shape[0], self.start
        cols = list(range(p)) + [p + int(i) for i in keep] + list(range(p + n, full.shape[-1]))
        return full[:, :, cols]


def case_runner(name: str, hf: torch.nn.Module, processor, make_ref=None, case_cls: type = Case):
    """get(method, budget, (w, h), seed, steps) -> a cached Case of recipe `name` (one Pipeline per method and budget),
    its transformers side from `make_ref(hf, processor, image)` (default: this module's hf_image)."""
    make_ref = make_ref or hf_image
    pipes: dict = {}
    runs: dict = {}

    def get(method: str, budget: int | str, wh: tuple[int, int], seed: int, steps: int) -> Case:
        key = (method, budget, wh, seed, steps)
        if key not in runs:
            if (method, budget) not in pipes:
                pipes[method, budget] = Pipeline.from_pretrained(name, budget=budget, method=method)
            pipe = pipes[method, budget]
            ref = make_ref(hf, processor, make_image(*wh, seed=seed))
            inp = pipe.prepare_image(ref.img)
            gen, step_logits = generate_logged(pipe, inp, steps)
            runs[key] = case_cls(method, budget, pipe, inp, pipe.encode(PROMPT), gen, step_logits, ref)
        return runs[key]

    return get


@pytest.fixture(scope="module")
def case(hf, processor):
    return case_runner(NAME, hf, processor)


def hf_decoder_forward(hf: torch.nn.Module, emb: torch.Tensor, pos: torch.Tensor, prune_layer: int,
                       keep_idx: list[int] | None, start: int = 0, deep: torch.Tensor | None = None) -> torch.Tensor:
    """Recompute with transformers' decoder layers and its M-RoPE: layers < prune_layer on all of `emb`
    with 3-D ids `pos` [3, 1, S], then the sequence slots `keep_idx` (ids kept) for the rest. An explicit
    sequence-order causal mask (3-row ids make transformers build none from positions anyway). Qwen3-VL:
    plane t of `deep` [T, K, Hd] added at the K image positions from `start` after layer t, by transformers'
    own `_deepstack_process` (T <= prune_layer)."""
    lm = hf.model.language_model

    def run(h: torch.Tensor, p: torch.Tensor, first: int, last: int) -> torch.Tensor:
        n = h.shape[1]
        mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        pe = lm.rotary_emb(h, p)
        for i in range(first, last):
            h = lm.layers[i](h, attention_mask=mask, position_ids=None, position_embeddings=pe)
            h = h[0] if isinstance(h, tuple) else h
            if deep is not None and i < deep.shape[0]:
                visual = torch.zeros(1, n, dtype=torch.bool)
                visual[0, start:start + deep.shape[1]] = True
                h = lm._deepstack_process(h, visual, deep[i])
        return h

    h = run(emb, pos, 0, prune_layer)
    if keep_idx is not None:
        h, pos = h[:, keep_idx], pos[:, :, keep_idx]
    h = run(h, pos, prune_layer, len(lm.layers))
    return hf.lm_head(lm.norm(h[:, -1]))


# ---------------------------------------------------------------------------------------------------- 1. full

@pytest.mark.parametrize("wh", list(FULL_SIZES), ids=lambda wh: f"{wh[0]}x{wh[1]}")
def test_full_matches_transformers(wh: tuple[int, int], hf, processor) -> None:
    """budget full: last-token logits within 1e-4 of transformers (its processor, its get_rope_index), 8 greedy
    tokens equal its generate, and so do the logits behind each (decode ids max + 1 + t on all axes)."""
    pipe = Pipeline.from_pretrained(NAME, budget="full", method="none")
    ref = hf_image(hf, processor, make_image(*wh, seed=wh[0]))
    inp, pr = pipe.prepare_image(ref.img), pipe.encode(PROMPT)
    gen, step_logits = generate_logged(pipe, inp, 8)
    resized = (int(ref.grid[0, 2]) * 14, int(ref.grid[0, 1]) * 14)  # (w, h) after transformers' smart_resize
    assert (resized == wh) == (FULL_SIZES[wh] == "same")
    assert (resized[0] * resized[1] < wh[0] * wh[1] - 28 * 28) == (FULL_SIZES[wh] == "shrink")
    assert inp.n == ref.span.shape[0] and np.array_equal(inp.feeds["pixel_values"], ref.pixel_values.numpy())
    ids = torch.tensor(np.concatenate([pr.prefix, [IMG] * inp.n_full, pr.suffix])[None])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=ref.pixel_values,
                          image_grid_thw=ref.grid, mm_token_type_ids=(ids == IMG).int(), max_new_tokens=8,
                          do_sample=False, eos_token_id=RECIPE.eos_token_id, pad_token_id=RECIPE.pad_token_id,
                          output_logits=True, return_dict_in_generate=True)
    diff = (torch.from_numpy(gen.first_logits) - out.logits[0]).abs().max().item()
    assert diff <= 1e-4, diff
    assert gen.tokens[0].tolist() == out.sequences[0, ids.shape[1]:].tolist()
    assert gen.tokens.shape[1] == 8
    diff = (step_logits - torch.cat(out.logits)).abs().max().item()
    assert diff <= 1e-4, diff
    assert gen.keep_pre[0].tolist() == list(range(inp.n)) and gen.s1 == gen.s2 == ids.shape[1]


# ---------------------------------------------------------------------------------------------------- 2. Stage 1

@pytest.mark.parametrize("spec", [STS, STS_S], ids=lambda s: s[0])
def test_stage1_matches_algorithm1_on_transformers_features(spec, case) -> None:
    """keep_pre = plain Algorithm 1 on transformers' ViT features (2x2 means, raster order), same per-image K."""
    method, budget, wh, seed = spec
    c = case(method, budget, wh, seed, 6 if method == "sts" else 1)
    k = c.gen.keep_pre.shape[1]
    assert c.ref.v.shape[0] == c.inp.n
    assert k == split_budget(budget, RECIPE, method, n=c.inp.n).k_pre
    assert k < c.pipe.plan.k_pre  # the graph ran K_max > K greedy steps and kept the first K
    assert c.gen.keep_pre.dtype == np.int64
    assert c.gen.keep_pre[0].tolist() == c.ref_keep


@pytest.mark.parametrize("method", ["sts-s", "divprune"])
def test_greedy_prefix_consistent(method: str) -> None:
    """On the tiny Qwen's own features: the first K of a K_max-step greedy = a run of exactly K steps, and the
    K_max-step pick order starts with the K-step one (image_embeds follow keep_pre)."""
    from sts_export.graphs import VisionGraph
    from sts_export.pruning.selection import anchor_index

    from sts_export.families import qwen2_5_vl as fam

    model = Pipeline.from_pretrained(NAME, budget="full", method="none").model
    image = fam.prepare_image(make_image(500, 400, seed=9), RECIPE)
    feeds = [torch.from_numpy(image.feeds[n]) for n in fam.vision_inputs(True)]
    k, k_max = 23, 90

    def vision(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        graph = VisionGraph(model, method, "10%", steps)
        with torch.no_grad():
            return graph(*feeds, torch.zeros(k, dtype=torch.int64))

    emb_long, long_run = vision(k_max)
    emb_short, short_run = vision(k)
    assert long_run.shape == (1, k) and long_run[0].tolist() == short_run[0].tolist()
    assert torch.equal(emb_long, emb_short)
    with torch.no_grad():
        v, _, groups = fam.candidate_features(model, *feeds)
        x = v if method == "sts-s" else fam.project(model, groups)
    if method == "sts-s":
        op, first = torch.ops.sts.potential_energy_picks, anchor_index(x, "mean")
    else:
        op, first = torch.ops.sts.divprune_picks, torch.tensor([-1])
    picks_long, picks_short = op(x, first, k_max)[0], op(x, first, k)[0]  # x [1, N, C]
    assert picks_long[:k].tolist() == picks_short.tolist()
    assert sorted(picks_short.tolist()) == long_run[0].tolist()
    assert len(set(picks_long.tolist())) == k_max  # no token picked twice


# ---------------------------------------------------------------------------------------------------- 3. sts-s

def test_sts_s_matches_transformers_spliced(case) -> None:
    """sts-s logits = transformers run with only the kept tokens' merger outputs spliced in, each at its own
    3-D ids from transformers' get_rope_index of the unpruned prompt (text after the image keeps its ids)."""
    c = case(*STS_S, 1)
    keep = c.ref_keep
    assert c.gen.s1 == c.start + len(keep) + len(c.prompt.suffix) == c.gen.s2
    emb, pos = c.embeds(c.ref.project(keep)), c.kept_ids(keep)
    assert int(pos.max()) + 1 > pos.shape[-1]  # gapped: the ids really are the unpruned layout's
    with torch.no_grad():
        ref = c.ref.hf(inputs_embeds=emb, position_ids=pos).logits[:, -1]
    diff = (torch.from_numpy(c.gen.first_logits) - ref).abs().max().item()
    assert diff <= 1e-4, diff


# ---------------------------------------------------------------------------------------------------- 4. Stage 2

def test_stage2_matches_transformers_attention(case) -> None:
    """keep_post = top-K' of transformers' eager attention (M-RoPE, kept tokens' own ids) at prune_layer; the
    pruned forward's logits = transformers' layers on the survivors with their ids."""
    c = case(*STS, 6)
    pl = c.pipe.plan.prune_layer
    assert pl == RECIPE.pruning.prune_layer == 3
    keep = c.gen.keep_pre[0].tolist()
    k = len(keep)
    kp = split_budget(c.budget, RECIPE, "sts", n=c.inp.n).k_post
    assert c.gen.keep_post.shape == (1, kp) and kp < c.pipe.plan.k_post
    emb, pos = c.embeds(c.ref.project(keep)), c.kept_ids(keep)
    with torch.no_grad():
        out = c.ref.hf.model.language_model(inputs_embeds=emb, position_ids=pos, output_attentions=True)
    rel = out.attentions[pl][0, :, -1].mean(0)[c.start:c.start + k]  # [K]
    ref = sorted(torch.sort(rel, descending=True, stable=True).indices[:kp].tolist())
    top = torch.sort(rel, descending=True).values
    assert (top[kp - 1] - top[kp]).item() > 1e-6, "the K'-th and next score tie: the test would be vacuous"
    assert c.gen.keep_post[0].tolist() == ref
    keep_idx = list(range(c.start)) + [c.start + i for i in ref] + list(range(c.start + k, emb.shape[1]))
    with torch.no_grad():
        ref_logits = hf_decoder_forward(c.ref.hf, emb, pos, pl, keep_idx)
    diff = (torch.from_numpy(c.gen.first_logits) - ref_logits).abs().max().item()
    assert diff <= 1e-4, diff


# ---------------------------------------------------------------------------------------------------- 5. decode

@pytest.mark.parametrize("spec", [STS, FASTV], ids=lambda s: s[0])
def test_cached_decode_equals_recompute(spec, case) -> None:
    """KV caches hold S1 / S2 entries; 6 cached greedy steps = recomputing the pruned forward from scratch with
    transformers' layers each step (decode step t at id max(prompt ids) + 1 + t on all three axes)."""
    method, budget, wh, seed = spec
    steps = 6
    c = case(method, budget, wh, seed, steps)
    gen = c.gen
    keep = gen.keep_pre[0].tolist()
    k = len(keep)
    pl = FASTV_LAYER if method == "fastv" else RECIPE.pruning.prune_layer
    if method == "fastv":
        assert keep == list(range(c.inp.n))  # no Stage 1: transformers' whole span
        span = c.ref.span
    else:
        span = c.ref.project(keep)
    kp = split_budget(budget, RECIPE, method, n=c.inp.n).k_post
    assert gen.keep_post.shape == (1, kp)
    assert gen.s2 == gen.s1 - k + kp < gen.s1
    assert gen.cache_lengths == {"segment1": gen.s1, "segment2": gen.s2}
    emb, pos = c.embeds(span), c.kept_ids(keep)
    nxt = int(c.ref.rope_ids(c.prompt).max()) + 1  # transformers: cache_length + rope_delta
    keep_idx = list(range(c.start)) + [c.start + int(i) for i in gen.keep_post[0]] + list(range(c.start + k, gen.s1))
    tokens, logits = [], []
    with torch.no_grad():
        for t in range(steps):
            logits.append(hf_decoder_forward(c.ref.hf, emb, pos, pl, keep_idx)[0])
            tokens.append(int(logits[-1].argmax(-1)))
            emb = torch.cat([emb, c.ref.hf.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
            pos = torch.cat([pos, torch.full((3, 1, 1), nxt + t)], dim=-1)
            keep_idx = keep_idx + [emb.shape[1] - 1]
    assert gen.tokens[0].tolist() == tokens
    diff = (c.step_logits - torch.stack(logits)).abs().max().item()
    assert diff <= 1e-4, diff


# ---------------------------------------------------------------------------------------------------- 6. errors

@pytest.mark.parametrize("kwargs", [{"method": "cls", "budget": 30}, {"method": "sts", "budget": 30, "anchor": "saliency"}])
def test_cls_refused_in_one_line(kwargs) -> None:
    with pytest.raises(StsError, match=r"no \[CLS\] token") as e:
        Pipeline.from_pretrained(NAME, **kwargs)
    assert "\n" not in str(e.value)


def test_raw_ids_need_vision_start() -> None:
    """Raw --input-ids: <|vision_start|>, one <|image_pad|>, <|vision_end|>; the pad is expanded to N."""
    pipe = Pipeline.from_pretrained(NAME, budget="20%", method="sts")
    img = make_image(300, 200, seed=1)
    vs, ve = RECIPE.vision_start_token_id, RECIPE.vision_end_token_id
    gen = pipe.generate(img, input_ids=[1, 20, vs, IMG, ve, 21, 22], max_new_tokens=2)
    assert gen.s1 == 3 + gen.keep_pre.shape[1] + 3
    with pytest.raises(StsError, match="vision_start"):
        pipe.generate(img, input_ids=[1, 20, IMG, ve, 21], max_new_tokens=1)


# ---------------------------------------------------------------------------------------------------- 7. export cap, cost

def test_max_pixels_cap() -> None:
    """Exports cap the image area (default 1280 * 28 * 28): N, K_max and the profiles' lengths follow."""
    from sts_export.pruning.budget import export_split
    from sts_export.recipe import with_max_pixels

    r7 = load_recipe("qwen2.5-vl-7b")
    assert r7.num_image_tokens == 16384
    capped = with_max_pixels(r7)
    assert capped.image_processor.max_pixels == 1003520 and capped.num_image_tokens == 1280
    assert capped.max_prompt_tokens == r7.max_prompt_tokens - (16384 - 1280)
    assert export_split("20%", capped, "sts").k_pre < 3840 > export_split("60%", capped, "fastv").k_post
    assert with_max_pixels(RECIPE) == RECIPE  # already below the default
    assert with_max_pixels(r7, 401408).num_image_tokens == 512
    for bad in (1000, r7.image_processor.max_pixels + 1):
        with pytest.raises(StsError, match="--max-pixels must be"):
            with_max_pixels(r7, bad)
    with pytest.raises(StsError, match="dynamic-resolution"):
        with_max_pixels(load_recipe("tiny-llava"), 401408)


def test_cost_model_qwen_7b() -> None:
    """bench --cost-only for the 7B at 640 x 480: N = 391 (17 x 23), the paper's ratio budgets per image, the
    ViT on 4N patches (windowed blocks as the graph runs them: 30 windows padded to 64 patches), the PatchMerger on
    the kept tokens only."""
    from sts_export.bench.cost import cost_summary, phase_costs, token_grid, vit_attention_flops
    from sts_export.artifact.params import param_counts

    r7 = load_recipe("qwen2.5-vl-7b")
    assert token_grid(r7, (640, 480)) == (17, 23)
    p = param_counts(r7)
    assert 670e6 < p["vision"] + p["projector"] < 680e6  # the ViT with its merger: 675M
    full = cost_summary(r7, "full", "none", image_size=(640, 480))
    s20 = cost_summary(r7, "20%", "sts", image_size=(640, 480))
    s10 = cost_summary(r7, "10%", "sts", image_size=(640, 480))
    assert (full["k_pre"], s20["k_pre"], s20["k_post"], s10["k_pre"], s10["k_post"]) == (391, 117, 39, 59, 20)
    assert full["kv_cache_bytes"] > s20["kv_cache_bytes"] > s10["kv_cache_bytes"]
    c_full = phase_costs(r7, "full", "none", image_size=(640, 480))
    c_sts = phase_costs(r7, "20%", "sts", image_size=(640, 480))
    assert c_full["vision"].detail["encoder"] == c_sts["vision"].detail["encoder"]  # the ViT sees every patch
    assert c_sts["vision"].detail["projector"] == pytest.approx(c_full["vision"].detail["projector"] * 117 / 391)
    # 17 x 23 tokens = 5 x 6 windows of 4 x 4 tokens; 4 full blocks over Np = 1564 patches, 28 windowed ones
    graph = 4 * 1280 * (4 * 1564**2 + 28 * 30 * 64**2)
    assert vit_attention_flops(r7, (17, 23)) == pytest.approx(graph)
    assert vit_attention_flops(r7, (17, 23), windowed=True) < graph < 4 * 1280 * 32 * 1564**2


def test_show_kept_cells(case) -> None:
    """--show-kept's picture for Qwen: the kept LLM tokens as their 28-px cells on the original image."""
    from sts_export.show.pictures import draw_kept_boxes, token_status

    c = case(*STS, 6)
    boxes = c.inp.boxes
    assert boxes.shape == (c.inp.n, 4) and c.inp.size == c.ref.img.size
    status = token_status(c.inp.n, c.gen.keep_pre[0], c.gen.keep_post[0])
    assert (status > 0).sum() == c.gen.keep_pre.shape[1]
    img = draw_kept_boxes(c.ref.img, boxes, c.gen.keep_pre[0], c.gen.keep_post[0], title="sts 20%")
    assert img.width >= c.ref.img.width and img.height > c.ref.img.height


def test_published_checkpoint_layout_loads(ckpt, tmp_path) -> None:
    """A checkpoint in the published Qwen/Qwen2.5-VL-*-Instruct layout (flat text fields, `rope_scaling` mrope,
    keys visual.* / model.layers.*) loads through transformers' own key conversion into the same weights, and
    its config.json derives the recipe's architecture."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / "model.safetensors"))
    save_file({k.replace("model.visual.", "visual.").replace("model.language_model.", "model."): v
               for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    cfg = json.loads((ckpt / "config.json").read_text())
    text, vision = cfg.pop("text_config"), cfg.pop("vision_config")
    rope = text.pop("rope_parameters")
    flat = {**cfg, **{k: x for k, x in text.items() if k != "model_type"}, "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
            "vision_config": {k: x for k, x in vision.items() if k not in ("model_type", "rope_parameters")}}
    (tmp_path / "config.json").write_text(json.dumps(flat))
    shutil.copy(ckpt / "preprocessor_config.json", tmp_path)
    pub = Pipeline.from_pretrained(tmp_path, budget="full", method="none")
    ref = Pipeline.from_pretrained(NAME, budget="full", method="none")
    assert (pub.recipe.vision, pub.recipe.text) == (RECIPE.vision, RECIPE.text)
    assert pub.recipe.image_processor.max_pixels == RECIPE.image_processor.max_pixels
    ours, theirs = pub.model.state_dict(), ref.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
