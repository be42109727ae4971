"""Qwen3-VL pipeline against transformers' own Qwen3VLForConditionalGeneration on the same weights (fp32, CPU, eager
attention): full-budget logits and greedy tokens at three image sizes; the ViT (resampled position table, DeepStack
taps) against transformers' vision model; Stage 1 on transformers' ViT features (2x2 means, raster order); the
prefix property of the K_max-step greedy, DeepStack planes included; Stage-1-only logits with the kept tokens, their
own 3-D ids and their own DeepStack embeddings (visual_pos_masks / deepstack_visual_embeds restricted to them);
Stage 2 against transformers' eager attention; cached decode against recompute; chunked prefill against one call;
`cls` refused (DESIGN.md "Verification per family").

Everything on the transformers side comes from transformers' own modules and processor: pixel_values and
image_grid_thw from Qwen2VLImageProcessorPil (what transformers builds for a Qwen3-VL checkpoint without
torchvision), V, the merger outputs and the DeepStack features from its ViT, 3-D ids from its get_rope_index, the
DeepStack adds from its `_deepstack_process` -- never from our host helpers.
"""
from __future__ import annotations

from functools import cached_property

import numpy as np
import pytest
import torch
from PIL import Image

from sts_export import Pipeline, StsError, load_recipe, split_budget
from sts_export.families import qwen3_vl as fam
from sts_export.pruning.budget import FASTV_LAYER
from tests.conftest import make_image
from tests.test_next import generate_logged
from tests.test_parity import PROMPT
from tests.test_qwen import Case, HfImage, case_runner, hf_decoder_forward

NAME = "tiny-qwen3-vl"
RECIPE = load_recipe(NAME)
IMG = RECIPE.image_token_id
TAPS = len(RECIPE.vision.deepstack_visual_indexes)
# (width, height) -> what smart_resize does with the tiny recipe's bounds (65536..262144 px, 32-px cells)
FULL_SIZES = {(448, 288): "same", (500, 350): "round", (640, 480): "shrink"}
STS = ("sts", "20%", (448, 288), 5)  # method, budget, (w, h), seed: K < K_max (the greedy runs K_max steps)
STS_S = ("sts-s", "10%", (500, 350), 3)
FASTV = ("fastv", "60%", (448, 288), 6)  # 4 decoder layers: FastV needs b > N/2; its layer 2 = the 2 taps


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ckpt(tiny_dir):
    return tiny_dir(NAME)


@pytest.fixture(scope="module")
def hf(ckpt) -> torch.nn.Module:
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def processor(ckpt):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(ckpt)


class HfImage3(HfImage):
    """One image on the transformers side (tests/test_qwen.py's, with Qwen3-VL's patch order and DeepStack)."""

    @cached_property
    def groups(self) -> torch.Tensor:
        """The last block's output per LLM token [N, 4, C]: no windows, processor order is raster order."""
        x = self.vit.last_hidden_state  # [Np, C]
        return x.reshape(-1, 4, x.shape[-1])

    @property
    def deep(self) -> torch.Tensor:
        """The DeepStack features of every token [T, N, Hd] (each tap's own merger)."""
        return torch.stack(list(self.vit.deepstack_features))


def hf_image(hf, processor, img: Image.Image) -> HfImage3:
    px = processor(img, return_tensors="pt")
    return HfImage3(hf, img, px["pixel_values"], px["image_grid_thw"])


class Case3(Case):
    def deep(self, keep: list[int]) -> torch.Tensor:
        """The kept tokens' own DeepStack features [T, K, Hd] (transformers' per-token mergers, rows of its output)."""
        return self.ref.deep[:, list(keep)]


@pytest.fixture(scope="module")
def case(hf, processor):
    return case_runner(NAME, hf, processor, hf_image, Case3)


def hf_lm_logits(hf: torch.nn.Module, emb: torch.Tensor, pos: torch.Tensor, start: int, deep: torch.Tensor | None,
                 **kw) -> tuple[torch.Tensor, object]:
    """transformers' language model on inputs_embeds with 3-D ids, DeepStack planes `deep` [T, K, Hd] at the K image
    positions from `start` (visual_pos_masks / deepstack_visual_embeds); last-position logits and its output."""
    extra = {}
    if deep is not None:
        visual = torch.zeros(1, emb.shape[1], dtype=torch.bool)
        visual[0, start:start + deep.shape[1]] = True
        extra = {"visual_pos_masks": visual, "deepstack_visual_embeds": list(deep)}
    with torch.no_grad():
        out = hf.model.language_model(inputs_embeds=emb, position_ids=pos, **extra, **kw)
        return hf.lm_head(out.last_hidden_state[:, -1]), out


# ---------------------------------------------------------------------------------------------------- 1. full

@pytest.mark.parametrize("wh", list(FULL_SIZES), ids=lambda wh: f"{wh[0]}x{wh[1]}")
def test_full_matches_transformers(wh: tuple[int, int], hf, processor) -> None:
    """budget full: last-token logits within 1e-4 of transformers (its processor, its get_rope_index, mm_token_type_ids
    passed), 8 greedy tokens equal its generate, and so do the logits behind each."""
    pipe = Pipeline.from_pretrained(NAME, budget="full", method="none")
    ref = hf_image(hf, processor, make_image(*wh, seed=wh[0]))
    inp, pr = pipe.prepare_image(ref.img), pipe.encode(PROMPT)
    gen, step_logits = generate_logged(pipe, inp, 8)
    resized = (int(ref.grid[0, 2]) * 16, int(ref.grid[0, 1]) * 16)  # (w, h) after transformers' smart_resize
    assert (resized == wh) == (FULL_SIZES[wh] == "same")
    assert (resized[0] * resized[1] < wh[0] * wh[1] - 32 * 32) == (FULL_SIZES[wh] == "shrink")
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


def test_vit_matches_transformers(hf, processor) -> None:
    """Our ViT on the host inputs = transformers' Qwen3VLVisionModel: the last block's output, the merger output and
    every DeepStack tap's merger output (grids below and above the 24 x 24 position table); transformers' forward
    fed our host tensors as its precomputed kwargs gives its own output."""
    pipe = Pipeline.from_pretrained(NAME, budget="full", method="none")
    for wh in ((448, 288), (640, 480)):
        ref = hf_image(hf, processor, make_image(*wh, seed=2))
        feeds = {k: torch.from_numpy(x) for k, x in pipe.prepare_image(ref.img).feeds.items()}
        with torch.no_grad():
            groups = pipe.model.vision(*feeds.values())  # [1+T, N, 4C]
            v, _, tokens = fam.candidate_features(pipe.model, *feeds.values())
            emb, ds = fam.project(pipe.model, tokens), fam.deepstack(pipe.model, tokens)
            fed = hf.model.visual(ref.pixel_values, grid_thw=ref.grid, interp_indices=feeds["interp_indices"],
                                  interp_weights=feeds["interp_weights"],
                                  position_ids=torch.from_numpy(fam.vision_position_ids(tuple(ref.grid[0].tolist()))))
        n = ref.span.shape[0]
        assert groups.shape == (1 + TAPS, n, 4 * RECIPE.vision.hidden_size) and ds.shape == (TAPS, 1, n, 64)
        torch.testing.assert_close(groups[0].reshape(4 * n, -1), ref.vit.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[0], ref.v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(emb[0], ref.span, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ds[:, 0], ref.deep, atol=1e-5, rtol=1e-5)
        assert torch.equal(fed.pooler_output, ref.span)
        assert all(torch.equal(a, b) for a, b in zip(fed.deepstack_features, ref.vit.deepstack_features))


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
    """On the tiny model's own features: the first K of a K_max-step greedy = a run of exactly K steps, the K_max-step
    pick order starts with the K-step one, and image_embeds and deepstack_embeds follow keep_pre."""
    from sts_export.graphs import VisionGraph
    from sts_export.pruning.selection import anchor_index

    model = Pipeline.from_pretrained(NAME, budget="full", method="none").model
    image = fam.prepare_image(make_image(500, 400, seed=9), RECIPE)
    feeds = [torch.from_numpy(image.feeds[n]) for n in fam.vision_inputs(True)]
    k, k_max = 23, 90

    def vision(steps: int) -> tuple[torch.Tensor, ...]:
        graph = VisionGraph(model, method, "10%", steps)
        with torch.no_grad():
            return graph(*feeds, torch.zeros(k, dtype=torch.int64))

    emb_long, long_run, deep_long = vision(k_max)
    emb_short, short_run, deep_short = vision(k)
    assert long_run.shape == (1, k) and long_run[0].tolist() == short_run[0].tolist()
    assert torch.equal(emb_long, emb_short) and torch.equal(deep_long, deep_short)
    assert deep_long.shape == (TAPS, 1, k, RECIPE.text.hidden_size)
    with torch.no_grad():
        v, _, tokens = fam.candidate_features(model, *feeds)
        x = v if method == "sts-s" else fam.project(model, tokens)
        everything = fam.deepstack(model, tokens)  # [T, 1, N, Hd]
    assert torch.equal(deep_long, everything[:, :, long_run[0]])
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
    """sts-s logits = transformers' language model with only the kept tokens' merger outputs spliced in, each at its
    own 3-D ids from get_rope_index of the unpruned prompt, visual_pos_masks and deepstack_visual_embeds restricted to
    the kept tokens. The DeepStack planes matter: without them the logits move."""
    c = case(*STS_S, 1)
    keep = c.ref_keep
    assert c.gen.s1 == c.start + len(keep) + len(c.prompt.suffix) == c.gen.s2
    emb, pos = c.embeds(c.ref.project(keep)), c.kept_ids(keep)
    lh, lw = (int(x) // 2 for x in c.ref.grid[0, 1:])
    after = c.start + len(keep)  # the suffix keeps the unpruned layout's ids: it starts at start + max(rows, cols)
    assert pos[:, 0, after].tolist() == [c.start + max(lh, lw)] * 3 and max(lh, lw) != len(keep)
    ref, _ = hf_lm_logits(c.ref.hf, emb, pos, c.start, c.deep(keep))
    diff = (torch.from_numpy(c.gen.first_logits) - ref).abs().max().item()
    assert diff <= 1e-4, diff
    plain, _ = hf_lm_logits(c.ref.hf, emb, pos, c.start, None)
    assert (torch.from_numpy(c.gen.first_logits) - plain).abs().max().item() > 1e-2


# ---------------------------------------------------------------------------------------------------- 4. Stage 2

def test_stage2_matches_transformers_attention(case) -> None:
    """keep_post = top-K' of transformers' eager attention (M-RoPE, kept tokens' own ids, their DeepStack adds) at
    prune_layer; the pruned forward's logits = transformers' layers on the survivors with their ids."""
    c = case(*STS, 6)
    pl = c.pipe.plan.prune_layer
    assert pl == RECIPE.pruning.prune_layer == 3 > TAPS - 1
    keep = c.gen.keep_pre[0].tolist()
    k = len(keep)
    kp = split_budget(c.budget, RECIPE, "sts", n=c.inp.n).k_post
    assert c.gen.keep_post.shape == (1, kp) and kp < c.pipe.plan.k_post
    emb, pos, deep = c.embeds(c.ref.project(keep)), c.kept_ids(keep), c.deep(keep)
    _, out = hf_lm_logits(c.ref.hf, emb, pos, c.start, deep, output_attentions=True)
    rel = out.attentions[pl][0, :, -1].mean(0)[c.start:c.start + k]  # [K]
    ref = sorted(torch.sort(rel, descending=True, stable=True).indices[:kp].tolist())
    top = torch.sort(rel, descending=True).values
    assert (top[kp - 1] - top[kp]).item() > 1e-6, "the K'-th and next score tie: the test would be vacuous"
    assert c.gen.keep_post[0].tolist() == ref
    keep_idx = list(range(c.start)) + [c.start + i for i in ref] + list(range(c.start + k, emb.shape[1]))
    with torch.no_grad():
        ref_logits = hf_decoder_forward(c.ref.hf, emb, pos, pl, keep_idx, c.start, deep)
    diff = (torch.from_numpy(c.gen.first_logits) - ref_logits).abs().max().item()
    assert diff <= 1e-4, diff


# ---------------------------------------------------------------------------------------------------- 5. decode

@pytest.mark.parametrize("spec", [STS, FASTV], ids=lambda s: s[0])
def test_cached_decode_equals_recompute(spec, case) -> None:
    """KV caches hold S1 / S2 entries; 6 cached greedy steps (DeepStack rows added at prefill only) = recomputing the
    pruned forward from scratch with transformers' layers each step (decode step t at id max(prompt ids) + 1 + t)."""
    method, budget, wh, seed = spec
    steps = 6
    c = case(method, budget, wh, seed, steps)
    gen = c.gen
    keep = gen.keep_pre[0].tolist()
    k = len(keep)
    pl = FASTV_LAYER if method == "fastv" else RECIPE.pruning.prune_layer
    if method == "fastv":
        assert keep == list(range(c.inp.n))  # no Stage 1: transformers' whole span
    kp = split_budget(budget, RECIPE, method, n=c.inp.n).k_post
    assert gen.keep_post.shape == (1, kp)
    assert gen.s2 == gen.s1 - k + kp < gen.s1
    assert gen.cache_lengths == {"segment1": gen.s1, "segment2": gen.s2}
    emb, pos, deep = c.embeds(c.ref.project(keep)), c.kept_ids(keep), c.deep(keep)
    nxt = int(c.ref.rope_ids(c.prompt).max()) + 1  # transformers: cache_length + rope_delta
    keep_idx = list(range(c.start)) + [c.start + int(i) for i in gen.keep_post[0]] + list(range(c.start + k, gen.s1))
    tokens, logits = [], []
    with torch.no_grad():
        for t in range(steps):
            logits.append(hf_decoder_forward(c.ref.hf, emb, pos, pl, keep_idx, c.start, deep)[0])
            tokens.append(int(logits[-1].argmax(-1)))
            emb = torch.cat([emb, c.ref.hf.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
            pos = torch.cat([pos, torch.full((3, 1, 1), nxt + t)], dim=-1)
            keep_idx = keep_idx + [emb.shape[1] - 1]
    assert gen.tokens[0].tolist() == tokens
    diff = (c.step_logits - torch.stack(logits)).abs().max().item()
    assert diff <= 1e-4, diff


def test_chunked_prefill_equals_one_call(case, monkeypatch) -> None:
    """A cache that takes the prefill in chunks (as ONNX Runtime's CPU in-place cache does) gets each chunk's own
    DeepStack rows (chunks of 7 cut the image span; some hold none): the same logits and tokens as one call."""
    import sts_export.generate as g

    c = case(*STS, 6)
    make = g.segment_cache

    def chunked(*args, **kwargs):
        cache = make(*args, **kwargs)
        cache.prefill_chunk = 7
        return cache

    monkeypatch.setattr(g, "segment_cache", chunked)
    gen = c.pipe.generate(c.inp, PROMPT, max_new_tokens=6)
    end = c.start + c.gen.keep_pre.shape[1]  # the image rows are start..end-1 of the S1 prompt rows
    assert c.start % 7 and end // 7 > c.start // 7 + 1 and end // 7 < (c.gen.s1 - 1) // 7  # cut inside; a chunk without
    np.testing.assert_allclose(gen.first_logits, c.gen.first_logits, rtol=0, atol=1e-4)  # other summation order
    assert gen.tokens.tolist() == c.gen.tokens.tolist() and np.array_equal(gen.keep_post, c.gen.keep_post)


# ---------------------------------------------------------------------------------------------------- 6. graphs, errors

def test_graph_io() -> None:
    """vision returns deepstack_embeds; segment1 (and only it) takes deepstack_embeds and image_start; a family without
    DeepStack keeps its IO."""
    plan = Pipeline.from_pretrained(NAME, budget="20%", method="sts").plan
    assert plan.deepstack == TAPS
    assert plan.io("vision") == (["pixel_values", "rotary_pos", "interp_indices", "interp_weights", "k_pre"],
                                 ["image_embeds", "keep_pre", "deepstack_embeds"])
    ins, _ = plan.io("segment1")
    assert ins[:4] == ["hidden", "position_ids", "deepstack_embeds", "image_start"] and ins[4] == "past_key_0"
    assert "deepstack_embeds" not in plan.io("segment2")[0] and "deepstack_embeds" not in plan.io("prune")[0]
    from sts_export.artifact.plan import Plan

    q25 = Plan.create(load_recipe("tiny-qwen2.5-vl"), "sts", "20%")
    assert q25.deepstack == 0 and q25.io("vision")[1] == ["image_embeds", "keep_pre"]
    assert q25.io("segment1")[0][:3] == ["hidden", "position_ids", "past_key_0"]


@pytest.mark.parametrize("kwargs", [{"method": "cls", "budget": 30}, {"method": "sts", "budget": 30, "anchor": "saliency"}])
def test_cls_refused_in_one_line(kwargs) -> None:
    with pytest.raises(StsError, match=r"Qwen3-VL's ViT has no \[CLS\] token") as e:
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


def test_published_checkpoint_layout_loads(ckpt, tmp_path) -> None:
    """A config.json in the published Qwen/Qwen3-VL-*-Instruct form (text fields with rope_scaling and rope_theta,
    vision_config model_type "qwen3_vl") loads through transformers' own key conversion into the same weights and
    derives the recipe's architecture."""
    import json
    import shutil

    cfg = json.loads((ckpt / "config.json").read_text())
    rope = cfg["text_config"].pop("rope_parameters")
    cfg["text_config"].update(rope_theta=rope["rope_theta"], tie_word_embeddings=cfg["tie_word_embeddings"],
                              rope_scaling={k: rope[k] for k in ("rope_type", "mrope_section", "mrope_interleaved")})
    cfg["vision_config"] = {**{k: x for k, x in cfg["vision_config"].items() if k != "rope_parameters"},
                            "model_type": "qwen3_vl"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for f in ("model.safetensors", "preprocessor_config.json"):
        shutil.copy(ckpt / f, tmp_path)
    pub = Pipeline.from_pretrained(tmp_path, budget="full", method="none")
    ref = Pipeline.from_pretrained(NAME, budget="full", method="none")
    assert (pub.recipe.vision, pub.recipe.text) == (RECIPE.vision, RECIPE.text)
    assert pub.recipe.image_processor.max_pixels == RECIPE.image_processor.max_pixels
    ours, theirs = pub.model.state_dict(), ref.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(ours["lm_head.weight"], ours["embed_tokens.weight"])  # tied: the checkpoint has no lm_head

