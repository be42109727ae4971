"""LLaVA-NeXT (anyres) pipeline against transformers' own LlavaNextForConditionalGeneration on the
same weights (fp32, CPU): full-budget logits and greedy tokens, Stage 1 on transformers' features in
transformers' packing order, Stage-1-only logits with the kept features spliced in, Stage 2 against
transformers' eager attention, cached decode against recompute (DESIGN.md "Verification per family").

Everything on the transformers side comes from transformers' modules and processor (pixel_values and
image_sizes from LlavaNextImageProcessorPil, V from its vision tower, the candidate order from its
pack_image_features), never from our token_index / packed_index.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pytest
import torch
from PIL import Image

from sts_export import Pipeline, load_recipe, split_budget
from sts_export.families import ImageInput
from sts_export.pruning.budget import FASTV_LAYER
from sts_export.tokenizer import Prompt
from tests.conftest import make_image
from tests.test_parity import PROMPT, hf_decoder_forward
from tests.test_selection import ref_algorithm1

NAME = "tiny-llava-next"
RECIPE = load_recipe(NAME)
G2 = (RECIPE.vision.image_size // RECIPE.vision.patch_size) ** 2  # 576 patches per crop
# (width, height) -> (rows, cols) of the anyres tile grid
FULL_SIZES = {(640, 480): (2, 2), (350, 700): (2, 1), (900, 280): (1, 3)}
# ratio budgets: K depends on the image, and is below the export's K_max (the greedy runs K_max steps)
STS = ("sts", "3%", (640, 480), 5)  # method, budget, (w, h), seed
STS_S = ("sts-s", "3%", (350, 700), 3)
FASTV = ("fastv", 2000, (640, 480), 5)


# ---------------------------------------------------------------------------------------------------- helpers

def generate_logged(pipe: Pipeline, image, max_new_tokens: int):
    """pipe.generate, also returning the logits behind every generated token [n, V] (prefill, then each
    cached decode step): read off the backend's segment2 outputs, since Generation keeps only the first.
    The tiny random model's greedy tokens hardly depend on the image, so tests compare these too."""
    backend, logged = pipe.backend, []
    run = backend.run

    def spy(graph: str, feeds: dict):
        out = run(graph, feeds)
        if graph == "segment2":
            logged.append(backend.to_numpy(out["logits"])[0].astype(np.float32).copy())
        return out

    backend.run = spy  # an instance attribute: the class's run is untouched
    try:
        gen = pipe.generate(image, PROMPT, max_new_tokens=max_new_tokens)
    finally:
        del backend.run
    assert len(logged) == gen.tokens.shape[1] and np.array_equal(logged[0], gen.first_logits[0])
    return gen, torch.from_numpy(np.stack(logged))


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ckpt(tiny_dir):
    return tiny_dir(NAME)


@pytest.fixture(scope="module")
def hf(ckpt) -> torch.nn.Module:
    """transformers' LlavaNextForConditionalGeneration (eager attention, fp32): one load per module."""
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def processor(ckpt):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil.from_pretrained(ckpt)


@dataclass(eq=False)
class HfImage:
    """One image on the transformers side: its processor's tensors and its modules' features."""

    hf: torch.nn.Module
    img: Image.Image
    pixel_values: torch.Tensor  # [1, T, 3, 336, 336] (processor)
    image_sizes: torch.Tensor  # [1, 2] (height, width)

    @cached_property
    def crops(self) -> torch.Tensor:
        """hidden_states[vision_feature_layer] of the CLIP tower, CLS dropped: [T, 576, C] (pre-projector)."""
        with torch.no_grad():
            out = self.hf.model.vision_tower(self.pixel_values[0], output_hidden_states=True)
        return out.hidden_states[self.hf.config.vision_feature_layer][:, 1:]

    @cached_property
    def order(self) -> torch.Tensor:
        """Stage 1 candidate order from transformers: pack_image_features on index-valued features (t*576 + p),
        newline entries (a -1 sentinel) dropped -> [N] indices into the flattened T*576 tokens."""
        t = self.crops.shape[0]
        idx = torch.arange(t * G2, dtype=torch.float32).reshape(t, G2, 1)
        with torch.no_grad():
            packed, lens = self.hf.model.pack_image_features([idx], self.image_sizes, "default", torch.tensor([-1.0]))
        packed = packed[0][:, 0]
        assert int(lens[0]) == packed.shape[0]
        return packed[packed >= 0].long()

    @cached_property
    def v(self) -> torch.Tensor:
        """V [N, C]: transformers' features of base + every tile in its packed candidate order."""
        return self.crops.reshape(-1, self.crops.shape[-1])[self.order]

    @cached_property
    def span(self) -> torch.Tensor:
        """The image span exactly as transformers' forward splices it (projected, newlines): [N_full, Hd]."""
        with torch.no_grad():
            out = self.hf.model.get_image_features(self.pixel_values, self.image_sizes, return_dict=True)
        return out.pooler_output[0]

    def project(self, keep: list[int]) -> torch.Tensor:
        """transformers' projector on the kept candidates: [K, Hd]."""
        with torch.no_grad():
            return self.hf.model.multi_modal_projector(self.v[keep])


@dataclass(eq=False)
class Case:
    """One pipeline run (method, budget) on one image, with the transformers side of that image."""

    method: str
    budget: int | str
    pipe: Pipeline
    inp: ImageInput
    prompt: Prompt
    gen: object  # Generation
    step_logits: torch.Tensor  # [steps, V] logits behind each generated token
    ref: HfImage

    @cached_property
    def ref_keep(self) -> list[int]:
        """Plain Algorithm 1 (tests/test_selection.py) on transformers' V, with the K the pipeline used."""
        return ref_algorithm1(self.ref.v.numpy(), self.gen.keep_pre.shape[1], self.pipe.anchor)

    def embeds(self, span: torch.Tensor) -> torch.Tensor:
        """transformers' embeddings of prefix + [image]*len(span) + suffix, the span replaced: [1, S1, Hd]."""
        ids = np.concatenate([self.prompt.prefix, [RECIPE.image_token_id] * span.shape[0], self.prompt.suffix])
        with torch.no_grad():
            emb = self.ref.hf.get_input_embeddings()(torch.tensor(ids[None]))
        start = self.prompt.image_start
        emb[0, start:start + span.shape[0]] = span
        return emb


@pytest.fixture(scope="module")
def case(hf, processor):
    """case(method, budget, (w, h), seed, steps) -> Case, each built once per module."""
    pipes: dict = {}
    images: dict = {}
    runs: dict = {}

    def get(method: str, budget: int | str, wh: tuple[int, int], seed: int, steps: int) -> Case:
        key = (method, budget, wh, seed, steps)
        if key not in runs:
            if (method, budget) not in pipes:
                pipes[method, budget] = Pipeline.from_pretrained(NAME, budget=budget, method=method)
            pipe = pipes[method, budget]
            if (wh, seed) not in images:
                img = make_image(*wh, seed=seed)
                px = processor(img, return_tensors="pt")
                images[wh, seed] = HfImage(hf, img, px["pixel_values"], px["image_sizes"])
            ref = images[wh, seed]
            inp = pipe.prepare_image(ref.img)
            gen, step_logits = generate_logged(pipe, inp, steps)
            runs[key] = Case(method, budget, pipe, inp, pipe.encode(PROMPT), gen, step_logits, ref)
        return runs[key]

    return get


# ---------------------------------------------------------------------------------------------------- 1. full

@pytest.mark.parametrize("wh", list(FULL_SIZES), ids=lambda wh: f"{wh[0]}x{wh[1]}")
def test_full_matches_transformers(wh: tuple[int, int], hf, processor) -> None:
    """budget full (no pruning): last-token logits within 1e-4 of transformers, 8 greedy tokens equal its generate
    (and so do the logits behind each of them)."""
    pipe = Pipeline.from_pretrained(NAME, budget="full", method="none")
    img = make_image(*wh, seed=wh[0])
    gen, step_logits = generate_logged(pipe, img, 8)
    inp, pr = pipe.prepare_image(img), pipe.encode(PROMPT)
    px = processor(img, return_tensors="pt")
    rows, cols = FULL_SIZES[wh]
    assert px["pixel_values"].shape[1] == 1 + rows * cols
    ids = torch.tensor(np.concatenate([pr.prefix, [RECIPE.image_token_id] * inp.n_full, pr.suffix])[None])
    with torch.no_grad():  # transformers checks that N_full image tokens match its packed features
        out = hf.generate(input_ids=ids, pixel_values=px["pixel_values"], image_sizes=px["image_sizes"],
                          max_new_tokens=8, do_sample=False, eos_token_id=RECIPE.eos_token_id,
                          pad_token_id=RECIPE.pad_token_id, output_logits=True, return_dict_in_generate=True)
    ref_logits = out.logits[0]  # [1, V]: the prefill's last position
    diff = (torch.from_numpy(gen.first_logits) - ref_logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert gen.tokens[0].tolist() == out.sequences[0, ids.shape[1]:].tolist()
    assert gen.tokens.shape[1] == 8  # no early EOS: the comparison really covers 8 tokens
    diff = (step_logits - torch.cat(out.logits)).abs().max().item()  # cached decode vs transformers' cache
    assert diff <= 1e-4, diff
    assert gen.keep_pre.shape[1] == inp.n_full and gen.s1 == gen.s2 == ids.shape[1]
    assert gen.keep_post is None


# ---------------------------------------------------------------------------------------------------- 2. Stage 1

@pytest.mark.parametrize("spec", [STS, STS_S], ids=lambda s: s[0])
def test_stage1_matches_algorithm1_on_transformers_features(spec, case) -> None:
    """keep_pre = plain Algorithm 1 on transformers' V (base + every tile, packed candidate order), same K."""
    method, budget, wh, seed = spec
    c = case(method, budget, wh, seed, 6 if method == "sts" else 1)
    n = c.inp.n
    assert c.ref.v.shape[0] == n  # our candidate count = transformers' non-newline packed tokens
    k = c.gen.keep_pre.shape[1]
    assert k == split_budget(budget, RECIPE, method, n=n).k_pre  # the per-image K of the budget
    assert k < c.pipe.plan.k_pre  # the graph ran K_max > K greedy steps and kept the first K
    assert c.gen.keep_pre.dtype == np.int64
    assert c.gen.keep_pre[0].tolist() == c.ref_keep


class _GivenFeatures:
    """A family (DESIGN.md's family contract) whose tower returns the given candidate features V [1, N, C]."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def candidate_features(self, model, *inputs, cls_attention: bool = False):
        return self.x, None

    def project(self, model, feats: torch.Tensor) -> torch.Tensor:
        return feats


@pytest.mark.parametrize("n,k,k_max", [(40, 5, 40), (300, 37, 64), (2304, 83, 104), (600, 128, 700)])
@pytest.mark.parametrize("method", ["sts-s", "divprune"])
def test_greedy_prefix_consistent(method: str, n: int, k: int, k_max: int) -> None:
    """The vision graph's greedy (K_max steps, first K kept) = a run of exactly K steps, for several N, K."""
    from sts_export.graphs import VisionGraph
    from sts_export.pruning.selection import anchor_index, divprune_select, potential_energy_select

    model = Pipeline.from_pretrained(NAME, budget=STS_S[1], method=method).model
    assert model.recipe.dynamic_tokens
    g = np.random.default_rng(n + k)
    centers = g.normal(size=(8, 16)) * 3  # clustered, as vision tokens are: picks are well separated
    x = torch.tensor((centers[g.integers(0, 8, n)] + g.normal(size=(n, 16)))[None], dtype=torch.float32)

    def vision(steps: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        graph = VisionGraph(model, method, STS_S[1], steps)  # an export whose greedy runs `steps` steps
        graph.family = _GivenFeatures(x)
        with torch.no_grad():  # inputs: the (ignored) tower inputs, then the length-only k_pre [K]
            return graph(torch.zeros(1), torch.zeros(keep, dtype=torch.int64))

    emb, long_run = vision(k_max, k)  # first k of k_max steps
    _, short_run = vision(k, k)  # exactly k steps
    ref = potential_energy_select(x, k) if method == "sts-s" else divprune_select(x, k)  # unrolled k steps
    assert long_run.shape == (1, k) and long_run.dtype == torch.int64
    assert long_run[0].tolist() == short_run[0].tolist() == ref[0].tolist()
    assert torch.equal(emb, x[:, long_run[0]])  # image_embeds are the kept tokens, in keep_pre order
    # and the greedy orders themselves (the export's custom ops): a k_max-step run starts with the k-step run
    if method == "sts-s":
        op, first = torch.ops.sts.potential_energy_picks, anchor_index(x, "mean")
    else:
        op, first = torch.ops.sts.divprune_picks, torch.tensor([-1])  # -1: DivPrune's own seed
    picks_long, picks_short = op(x, first, k_max)[0], op(x, first, k)[0]  # x [1, N, C]
    assert picks_long[:k].tolist() == picks_short.tolist()
    assert len(set(picks_long[:min(n, k_max)].tolist())) == min(n, k_max)  # no token picked twice


# ---------------------------------------------------------------------------------------------------- 3. sts-s

def test_sts_s_matches_transformers_spliced(case) -> None:
    """sts-s logits = transformers' decoder on the prompt with only the kept image features (no newlines) spliced in."""
    c = case(*STS_S, 1)
    k = len(c.ref_keep)
    assert c.gen.s1 == c.prompt.image_start + k + len(c.prompt.suffix) == c.gen.s2
    emb = c.embeds(c.ref.project(c.ref_keep))  # transformers' projector on transformers' kept features
    with torch.no_grad():
        ref = c.ref.hf(inputs_embeds=emb).logits[:, -1]
    diff = (torch.from_numpy(c.gen.first_logits) - ref).abs().max().item()
    assert diff <= 1e-4, diff


# ---------------------------------------------------------------------------------------------------- 4. Stage 2

def test_stage2_matches_transformers_attention(case) -> None:
    """keep_post = top-K' of transformers' eager attention at prune_layer (last query row, head mean, K image positions)."""
    c = case(*STS, 6)
    pl = c.pipe.plan.prune_layer
    assert pl == RECIPE.pruning.prune_layer == 3
    k = c.gen.keep_pre.shape[1]
    kp = split_budget(c.budget, RECIPE, "sts", n=c.inp.n).k_post
    assert c.gen.keep_post.shape == (1, kp) and kp < c.pipe.plan.k_post  # the first K' of a K'_max TopK
    start = c.prompt.image_start
    emb = c.embeds(c.ref.project(c.gen.keep_pre[0].tolist()))  # the S1 sequence, transformers' features of our picks
    with torch.no_grad():
        out = c.ref.hf.model.language_model(inputs_embeds=emb, output_attentions=True)
    rel = out.attentions[pl][0, :, -1].mean(0)[start:start + k]  # [K]
    ref = sorted(torch.sort(rel, descending=True, stable=True).indices[:kp].tolist())  # ties -> lower index
    top = torch.sort(rel, descending=True).values
    assert (top[kp - 1] - top[kp]).item() > 1e-6, "the K'-th and next score tie: the test would be vacuous"
    assert c.gen.keep_post[0].tolist() == ref
    # and the pruned forward's logits equal transformers' layers run on the kept tokens (position ids kept)
    keep_idx = list(range(start)) + [start + i for i in ref] + list(range(start + k, emb.shape[1]))
    with torch.no_grad():
        ref_logits = hf_decoder_forward(c.ref.hf, emb, pl, keep_idx)
    diff = (torch.from_numpy(c.gen.first_logits) - ref_logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_fastv_stage2_over_the_whole_span(case) -> None:
    """fastv: no Stage 1, so the decoder sees transformers' packed span (newlines included) and Stage 2 at
    layer 2 ranks every position of it; keep_post = top-K' of transformers' eager attention there. K' is
    in the thousands, so neighbouring scores sit ~1e-7 apart: only entries within 1e-8 of the K'-th score (some
    100x the fp32 noise of two implementations, scores ~3e-4) may swap."""
    c = case(*FASTV, 6)
    k = c.gen.keep_pre.shape[1]
    kp = split_budget(c.budget, RECIPE, "fastv", n=c.inp.n_full).k_post
    assert k == c.inp.n_full and c.gen.keep_post.shape == (1, kp) and kp < k
    start = c.prompt.image_start
    with torch.no_grad():
        out = c.ref.hf.model.language_model(inputs_embeds=c.embeds(c.ref.span), output_attentions=True)
    rel = out.attentions[FASTV_LAYER][0, :, -1].mean(0)[start:start + k]  # [N_full]
    kth = torch.sort(rel, descending=True).values[kp - 1].item()
    kept = torch.zeros(k, dtype=torch.bool)
    kept[torch.from_numpy(c.gen.keep_post[0])] = True
    assert c.gen.keep_post[0].tolist() == sorted(set(c.gen.keep_post[0].tolist()))  # ascending, distinct
    assert rel[kept].min().item() >= kth - 1e-8 and rel[~kept].max().item() <= kth + 1e-8
    ref = set(torch.sort(rel, descending=True, stable=True).indices[:kp].tolist())
    assert all(abs(rel[i].item() - kth) <= 1e-8 for i in ref ^ set(c.gen.keep_post[0].tolist()))
    newline = (c.ref.span == c.ref.hf.model.image_newline).all(-1)  # [N_full] transformers' newline slots
    assert newline.sum().item() == k - c.inp.n > 0  # one per row of the unpadded grid
    assert (kept & newline).any()  # newline slots are Stage 2 candidates too (FastV / DART)


# ---------------------------------------------------------------------------------------------------- 5. decode

@pytest.mark.parametrize("spec", [STS, FASTV], ids=lambda s: s[0])
def test_cached_decode_equals_recompute(spec, case) -> None:
    """KV caches hold S1 / S2 entries; 6 greedy steps with the cache = recomputing the pruned forward each step
    (tokens, and the logits behind each within 1e-4: the tiny model's tokens alone barely notice a wrong cache)."""
    method, budget, wh, seed = spec
    steps = 6
    c = case(method, budget, wh, seed, steps)
    gen, pr = c.gen, c.prompt
    start, t = pr.image_start, len(pr.suffix)
    k_img = gen.keep_pre.shape[1]
    if method == "fastv":  # no Stage 1: the whole span as transformers packs it, newlines are candidates too
        assert k_img == c.inp.n_full
        span = c.ref.span
        pl = FASTV_LAYER
    else:
        assert k_img == split_budget(budget, RECIPE, method, n=c.inp.n).k_pre
        span = c.ref.project(gen.keep_pre[0].tolist())
        pl = RECIPE.pruning.prune_layer
    assert span.shape[0] == k_img
    kp = split_budget(budget, RECIPE, method, n=c.inp.n_full if method == "fastv" else c.inp.n).k_post
    assert gen.keep_post.shape == (1, kp)
    assert gen.s1 == start + k_img + t and gen.s2 == gen.s1 - k_img + kp < gen.s1
    assert gen.cache_lengths == {"segment1": gen.s1, "segment2": gen.s2}
    assert gen.tokens.shape[1] == steps
    emb = c.embeds(span)
    keep_idx = list(range(start)) + [start + int(i) for i in gen.keep_post[0]] + list(range(start + k_img, gen.s1))
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    with torch.no_grad():
        for _ in range(steps):
            logits.append(hf_decoder_forward(c.ref.hf, emb, pl, keep_idx)[0])
            tokens.append(int(logits[-1].argmax(-1)))
            emb = torch.cat([emb, c.ref.hf.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
            keep_idx = keep_idx + [emb.shape[1] - 1]  # decode token t: sequence slot S1 + t, position id S1 + t
    assert gen.tokens[0].tolist() == tokens
    diff = (c.step_logits - torch.stack(logits)).abs().max().item()
    assert diff <= 1e-4, diff
