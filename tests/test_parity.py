"""The torch pipeline against transformers' own LLaVA on the same weights (fp32, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY, hf_llava, make_image
from sts_export import Pipeline, load_recipe

PROMPT = "What is shown in this image?"


def hf_inputs(pipe: Pipeline, n_image_tokens: int) -> tuple[torch.Tensor, int]:
    pr = pipe.encode(PROMPT)
    ids = np.concatenate([pr.prefix, [pipe.recipe.image_token_id] * n_image_tokens, pr.suffix])
    return torch.tensor(ids[None]), pr.image_start


def hf_features(hf: torch.nn.Module, pv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre-projector features [1,N,C], projected [1,N,Hd], CLS head-mean attention at the feature layer [1,N])."""
    out = hf.model.vision_tower(pv, output_hidden_states=True, output_attentions=True)
    fl = hf.config.vision_feature_layer
    feats = out.hidden_states[fl][:, 1:]
    att_layer = len(out.hidden_states) + fl - 1  # hidden_states[j] is the output of layer j-1
    cls = out.attentions[att_layer].mean(dim=1)[:, 0, 1:]
    return feats, hf.model.multi_modal_projector(feats), cls


@pytest.mark.parametrize("name", TINY)
def test_full_matches_transformers(name: str, tiny_dir) -> None:
    hf = hf_llava(tiny_dir(name))
    pipe = Pipeline.from_pretrained(name, budget="full", method="sts")
    img = make_image()
    gen = pipe.generate(img, PROMPT, max_new_tokens=8)
    ids, _ = hf_inputs(pipe, 576)
    pv = torch.from_numpy(pipe.pixel_values(img))
    with torch.no_grad():
        ref_logits = hf(input_ids=ids, pixel_values=pv).logits[:, -1]
        ref_tokens = hf.generate(input_ids=ids, pixel_values=pv, max_new_tokens=8, do_sample=False,
                                 eos_token_id=pipe.recipe.eos_token_id, pad_token_id=pipe.recipe.pad_token_id)
    diff = (torch.from_numpy(gen.first_logits) - ref_logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert gen.tokens[0].tolist() == ref_tokens[0, ids.shape[1]:].tolist()
    assert gen.tokens.shape[1] == 8  # no early EOS: the comparison really covers 8 tokens


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", ["sts-s", "divprune", "cls"])
def test_stage1_only_matches_transformers_spliced(name: str, method: str, tiny_dir) -> None:
    """Logits equal transformers run on the prompt with only the kept image features spliced in."""
    from tests.test_selection import ref_algorithm1, ref_divprune

    hf = hf_llava(tiny_dir(name))
    pipe = Pipeline.from_pretrained(name, budget=64, method=method)
    img = make_image(seed=3)
    gen = pipe.generate(img, PROMPT, max_new_tokens=1)
    pv = torch.from_numpy(pipe.pixel_values(img))
    with torch.no_grad():
        feats, proj, cls = hf_features(hf, pv)
    # the kept set from independent references on transformers' own features
    if method == "sts-s":
        ref_keep = ref_algorithm1(feats[0].numpy(), 64, "mean")
    elif method == "divprune":
        ref_keep = ref_divprune(proj[0].numpy(), 64)
    else:
        ref_keep = sorted(torch.sort(cls[0], descending=True, stable=True).indices[:64].tolist())
    assert gen.keep_pre[0].tolist() == ref_keep
    ids, start = hf_inputs(pipe, 64)
    with torch.no_grad():
        emb = hf.get_input_embeddings()(ids)
        emb[:, start:start + 64] = proj[:, ref_keep]
        ref = hf(inputs_embeds=emb).logits[:, -1]
    assert (torch.from_numpy(gen.first_logits) - ref).abs().max().item() <= 1e-4


def hf_decoder_forward(hf: torch.nn.Module, emb: torch.Tensor, prune_layer: int, keep_idx: list[int] | None) -> torch.Tensor:
    """Recompute from scratch with transformers' decoder layers: layers < prune_layer on everything,
    then keep `keep_idx` (sequence positions, position ids kept) for the rest. An explicit
    sequence-order causal mask is passed: transformers' mask builders misread gapped position ids."""
    lm = hf.model.language_model
    s = emb.shape[1]
    pos = torch.arange(s)[None]

    def run(h: torch.Tensor, pos: torch.Tensor, layers) -> torch.Tensor:
        n = h.shape[1]
        mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        pe = lm.rotary_emb(h, pos)
        for layer in layers:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            h = h[0] if isinstance(h, tuple) else h
        return h

    h = run(emb, pos, lm.layers[:prune_layer])
    if keep_idx is not None:
        h, pos = h[:, keep_idx], pos[:, keep_idx]
    h = run(h, pos, lm.layers[prune_layer:])
    return hf.lm_head(lm.norm(h[:, -1]))


@pytest.mark.parametrize("name", TINY)
def test_stage2_matches_transformers_attention(name: str, tiny_dir) -> None:
    """keep_post = top-K' of transformers' eager attention weights at prune_layer (head mean, last row)."""
    hf = hf_llava(tiny_dir(name))
    recipe = load_recipe(name)
    pipe = Pipeline.from_pretrained(name, budget=64, method="sts")
    k, kp, pl = pipe.plan.k_pre, pipe.plan.k_post, pipe.plan.prune_layer
    assert pl == recipe.pruning.prune_layer
    img = make_image(seed=5)
    gen = pipe.generate(img, PROMPT, max_new_tokens=1)
    pv = torch.from_numpy(pipe.pixel_values(img))
    ids, start = hf_inputs(pipe, k)
    with torch.no_grad():
        _, proj, _ = hf_features(hf, pv)
        emb = hf.get_input_embeddings()(ids)
        emb[:, start:start + k] = proj[:, gen.keep_pre[0]]
        out = hf.model.language_model(inputs_embeds=emb, output_attentions=True)
    rel = out.attentions[pl][0, :, -1].mean(0)[start:start + k]  # [K]
    ref = sorted(torch.sort(rel, descending=True, stable=True).indices[:kp].tolist())
    gap = torch.sort(rel, descending=True).values
    assert (gap[kp - 1] - gap[kp]).item() > 1e-6, "the K'-th and next score tie: the test would be vacuous"
    assert gen.keep_post[0].tolist() == ref
    # and the pruned forward's logits equal transformers' layers run on the kept tokens
    keep_idx = list(range(start)) + [start + i for i in ref] + list(range(start + k, emb.shape[1]))
    with torch.no_grad():
        ref_logits = hf_decoder_forward(hf, emb, pl, keep_idx)
    assert (torch.from_numpy(gen.first_logits) - ref_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name,method,budget", [("tiny-llava", "sts", 64), ("tiny-llava-gqa", "sts", 32),
                                                ("tiny-llava", "fastv", 300)])
def test_cached_decode_equals_recompute(name: str, method: str, budget: int, tiny_dir) -> None:
    """KV caches hold S1 / S2 entries; greedy steps with the cache = recomputing the pruned forward each step."""
    hf = hf_llava(tiny_dir(name))
    pipe = Pipeline.from_pretrained(name, budget=budget, method=method)
    img = make_image(seed=7)
    steps = 6
    gen = pipe.generate(img, PROMPT, max_new_tokens=steps)
    plan = pipe.plan
    s1 = pipe.encode(PROMPT).image_start + plan.k_pre + len(pipe.encode(PROMPT).suffix)
    assert gen.s1 == s1 and gen.s2 == s1 - plan.k_pre + plan.k_post
    assert gen.cache_lengths == {"segment1": gen.s1, "segment2": gen.s2}
    assert gen.s2 < gen.s1
    assert gen.tokens.shape[1] == steps
    pv = torch.from_numpy(pipe.pixel_values(img))
    ids, start = hf_inputs(pipe, plan.k_pre)
    with torch.no_grad():
        _, proj, _ = hf_features(hf, pv)
        emb = hf.get_input_embeddings()(ids)
        emb[:, start:start + plan.k_pre] = proj[:, gen.keep_pre[0]]
        keep_idx = list(range(start)) + [start + int(i) for i in gen.keep_post[0]] + list(range(start + plan.k_pre, s1))
        tokens: list[int] = []
        for _ in range(steps):
            logits = hf_decoder_forward(hf, emb, plan.prune_layer, keep_idx)
            tokens.append(int(logits.argmax(-1)))
            emb = torch.cat([emb, hf.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
            keep_idx = keep_idx + [emb.shape[1] - 1]
    assert gen.tokens[0].tolist() == tokens


def test_batched_generation_equals_single(tiny_dir) -> None:
    pipe = Pipeline.from_pretrained("tiny-llava-gqa", budget=64, method="sts")
    imgs = [make_image(seed=11), make_image(w=300, h=600, seed=12)]
    both = pipe.generate(imgs, PROMPT, max_new_tokens=4)
    for i, im in enumerate(imgs):
        one = pipe.generate(im, PROMPT, max_new_tokens=4)
        assert both.keep_pre[i].tolist() == one.keep_pre[0].tolist()
        assert both.keep_post[i].tolist() == one.keep_post[0].tolist()
        assert np.abs(both.first_logits[i] - one.first_logits[0]).max() <= 1e-4
        assert both.tokens[i].tolist() == one.tokens[0].tolist()
