"""What a reduced-precision export promises, and that validation checks exactly that (export/validate.py,
export/precision.py):

* the reference is the export's weights computed in float32 (`Fp32Compute`), never torch's own fp16 kernels;
* selection is exact on the graph's own tensors (Algorithm 1 on the Loop's distances and anchor, top-k on the
  graph's scores), and a wrong pick is caught;
* where the graphs' picks differ from the reference's, outputs are compared on the tokens both kept, the kept sets
  must agree to the stated floors, and the first-token logits are compared with the reference re-run on the
  graphs' own picks.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sts_export.checkpoint import load_model, resolve
from sts_export.export.onnx import export
from sts_export.export.precision import (AGREEMENT, PROBE, Fp32Compute, check_selection, selection_probe,
                                         selection_tensors)
from sts_export.export.validate import validate_export
from sts_export.artifact.plan import Plan
from sts_export.graphs import build_graphs
from sts_export.pruning.reference import greedy_picks, potential_energy, topk_ascending


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llava sts b=64 at fp16, validated (the export's own call)."""
    root = tmp_path_factory.mktemp("precision")
    return export("tiny-llava", budget=64, method="sts", dtype="fp16", out=root / "tl16", progress=lambda s: None)


def _graphs(dtype: torch.dtype = torch.float16) -> tuple[dict, Plan, object]:
    src = resolve("tiny-llava")
    plan = Plan.create(src.recipe, "sts", 64, "float16" if dtype == torch.float16 else "float32")
    return build_graphs(load_model(src, dtype), "sts", 64, None), plan, src.recipe


def test_fp32_compute_mode_is_float32_on_half_weights() -> None:
    lin = torch.nn.Linear(8, 4).half()
    x = torch.randn(2, 8)
    with Fp32Compute():
        y = lin(x.half())
        z = torch.zeros(3, dtype=torch.float16)
    assert y.dtype == torch.float32 and z.dtype == torch.float32 and lin.weight.dtype == torch.float16
    want = x.half().float() @ lin.weight.float().t() + lin.bias.float()
    assert torch.equal(y, want)  # exactly the float32 product of the same (fp16-rounded) numbers


def test_fp16_report_names_its_reference_and_selection_is_exact(fp16_export: Path) -> None:
    rep = json.loads((fp16_export / "validation.json").read_text())
    assert rep["passed"], rep["summary"]
    assert rep["reference"].startswith("torch computing in float32 on the export's fp16 weights")
    assert set(rep["selection"]) == {"vision/batch1", "vision/batch2", "prune/batch1", "prune/batch2"}
    for key, sel in rep["selection"].items():
        assert sel["ok"] and sel["rows"], key
        if key.startswith("vision"):
            assert all(r["greedy_order_identical"] for r in sel["rows"])
    for b in ("batch1", "batch2"):
        ag = rep["end_to_end"][b]["agreement"]
        assert ag["ok"] and ag["floors"] == AGREEMENT and ag["objective"]["name"] == "potential_energy"


def test_probe_finds_the_selection_tensors(fp16_export: Path, tmp_path: Path) -> None:
    import onnx

    vis = selection_tensors(onnx.load(str(fp16_export / "vision.onnx"), load_external_data=False))
    assert set(vis) == {"stage1_distances", "stage1_initial", "stage1_order"}
    prune = selection_tensors(onnx.load(str(fp16_export / "prune.onnx"), load_external_data=False))
    assert set(prune) == {"topk_scores"}
    path, found = selection_probe(fp16_export / "vision.onnx", tmp_path)
    assert found == vis and path.parent == tmp_path
    emb = selection_probe(fp16_export / "embed.onnx", tmp_path)
    assert emb == (fp16_export / "embed.onnx", {})


def test_check_selection_catches_a_wrong_pick() -> None:
    rng = np.random.default_rng(3)
    v = rng.normal(size=(1, 40, 6)).astype(np.float32)
    sq = (v * v).sum(-1)
    d = np.maximum(sq[:, :, None] + sq[:, None, :] - 2 * v @ v.transpose(0, 2, 1), 0).astype(np.float32)
    order = greedy_picks(d[0], 5, 12)[None]
    out = {PROBE + "stage1_distances": d, PROBE + "stage1_initial": np.full((1, 12), 5),
           PROBE + "stage1_order": order, "keep_pre": np.sort(order[:, :10], axis=1)}
    assert check_selection("sts", out, "vision")["ok"]
    swapped = order.copy()
    swapped[0, [3, 4]] = swapped[0, [4, 3]]  # the same set, another greedy order: still a wrong graph
    assert not check_selection("sts", {**out, PROBE + "stage1_order": swapped}, "vision")["ok"]
    other = out["keep_pre"].copy()
    other[0, -1] = int(np.setdiff1d(np.arange(40), order[0])[0])
    assert not check_selection("sts", {**out, "keep_pre": np.sort(other, 1)}, "vision")["ok"]
    scores = rng.random((1, 30)).astype(np.float32)
    keep = topk_ascending(scores[0], 7)[None]
    assert check_selection("sts", {PROBE + "topk_scores": scores, "keep_post": keep}, "prune")["ok"]
    assert not check_selection("sts", {PROBE + "topk_scores": -scores, "keep_post": keep}, "prune")["ok"]


def test_greedy_reference_is_algorithm1() -> None:
    """`greedy_picks` (float32, the graph's op order) against a float64 loop written from the paper's Eq. 4-5."""
    rng = np.random.default_rng(7)
    v = (rng.normal(size=(6, 5)) * 3)[rng.integers(0, 6, 90)] + rng.normal(size=(90, 5))
    d64 = ((v[:, None] - v[None]) ** 2).sum(-1)
    picks, r = [int(((v - v.mean(0)) ** 2).sum(-1).argmin())], np.zeros(90)
    while len(picks) < 20:
        r += 1.0 / (d64[picks[-1]] + 1e-6)
        picks.append(min((i for i in range(90) if i not in picks), key=lambda i: (r[i], i)))
    sq = (v * v).sum(-1)
    d32 = np.maximum(sq[:, None] + sq[None] - 2 * v @ v.T, 0).astype(np.float32)
    assert greedy_picks(d32, picks[0], 20).tolist() == picks
    assert potential_energy(v, picks) < potential_energy(v, list(range(20)))  # the greedy set is better spread


def _perturbed(keep: torch.Tensor, n: int, swaps: int) -> torch.Tensor:
    """keep [B, K] with its last `swaps` tokens replaced by tokens it does not hold (ascending again)."""
    out = keep.numpy().copy()
    for b in range(out.shape[0]):
        out[b, -swaps:] = np.setdiff1d(np.arange(n), out[b])[:swaps]
        out[b] = np.sort(out[b])
    return torch.from_numpy(out)


@pytest.mark.parametrize("swaps,passes", [(2, True), (40, False)])
def test_differing_picks_compared_on_common_tokens_and_same_picks_reference(
        fp16_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swaps: int, passes: bool) -> None:
    """The reference made to keep other tokens than the graphs (as fp16 near-ties do): the kept-index rows report
    the overlap, floats are compared on the tokens both kept, and the logits against the reference re-run with the
    graphs' picks. Two swapped tokens pass; a reference that keeps mostly other tokens fails the floor."""
    import sts_export.graphs as graphs_module

    graphs, plan, recipe = _graphs()
    n, k = recipe.num_image_tokens, plan.k_pre
    select = graphs_module.keep_first_k
    monkeypatch.setattr(graphs_module, "keep_first_k", lambda *a, **kw: _perturbed(select(*a, **kw), n, swaps))
    d = tmp_path / "copy"
    shutil.copytree(fp16_export, d)
    rep = validate_export(d, graphs, plan, recipe, torch.float16, new_tokens=4)
    row = rep["graphs"]["vision/prefill"]
    assert row[0]["output"] == "keep_pre" and not row[0]["identical"]
    assert row[0]["overlap"] == pytest.approx((k - swaps) / k)
    assert row[1]["output"] == "image_embeds" and row[1]["on"] == "tokens both kept" and row[1]["ok"]
    assert all(s["ok"] for s in rep["selection"].values())  # the graphs themselves select exactly
    for b in ("batch1", "batch2"):
        e2e = rep["end_to_end"][b]
        assert not e2e["keep_pre_identical"] and e2e["agreement"]["keep_pre_overlap"] == pytest.approx((k - swaps) / k)
        assert e2e["first_logits_same_picks"]["ok"], e2e  # same picks: the numerics agree
    assert rep["passed"] is passes, rep["summary"]
    if not passes:
        assert "keep_pre_overlap" in rep["summary"]
        assert "keep_pre_overlap" in rep["end_to_end"]["batch1"]["agreement"]["below"]
