"""KNN consistency score (paper eqs. 8-10) against a loop-by-loop reference, and the per-layer report."""
from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from sts_export.show.diagnostics import (
    cls_attention_scores,
    consistency_per_layer,
    knn_consistency,
    knn_indices,
    write_report,
)


def reference_consistency(features: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Eqs. 8-10 written out with Python loops: cosine k-NN excluding self, population std."""
    rows = [list(map(float, f)) for f in features]
    n = len(rows)
    unit = []
    for f in rows:
        norm = math.sqrt(sum(v * v for v in f))
        unit.append([v / norm for v in f])
    local = []
    for i in range(n):
        sims = []
        for j in range(n):
            if j != i:
                sims.append((-sum(a * b for a, b in zip(unit[i], unit[j])), j))
        sims.sort()
        neighbours = [j for _, j in sims[:k]]
        local.append(statistics.pstdev([float(scores[j]) for j in neighbours]))
    return 1.0 - (sum(local) / n) / statistics.pstdev([float(s) for s in scores])


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (12, 2, 11), (30, 5, 4), (50, 16, 10), (64, 8, 20)])
def test_matches_loop_reference(n: int, c: int, k: int) -> None:
    rng = np.random.default_rng(n * 100 + k)
    feats = rng.normal(size=(n, c))  # [N, C]
    scores = rng.random(n)  # [N]
    assert knn_consistency(feats, scores, k) == pytest.approx(reference_consistency(feats, scores, k), abs=1e-12)


def test_cosine_and_self_exclusion() -> None:
    rng = np.random.default_rng(0)
    feats, scores = rng.normal(size=(40, 6)), rng.random(40)
    scaled = feats * rng.uniform(0.1, 10.0, size=(40, 1))  # cosine: per-token magnitude is irrelevant
    assert knn_consistency(scaled, scores, 5) == pytest.approx(knn_consistency(feats, scores, 5), abs=1e-12)
    nbrs = knn_indices(feats, 7)  # [40, 7]
    assert nbrs.shape == (40, 7)
    assert not (nbrs == np.arange(40)[:, None]).any()  # never its own neighbour
    assert all(len(set(row)) == 7 for row in nbrs.tolist())


def test_ties_go_to_lower_index() -> None:
    feats = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # 0,1,2,4 same direction
    np.testing.assert_array_equal(knn_indices(feats, 2), [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1]])


def test_constant_scores_within_clusters_give_one() -> None:
    rng = np.random.default_rng(1)
    clusters, size, c, k = 4, 25, 8, 10  # clusters larger than k: every neighbourhood stays in its cluster
    centres = np.eye(c)[:clusters] * 10.0  # orthogonal directions
    feats = np.concatenate([centres[i] + 0.1 * rng.normal(size=(size, c)) for i in range(clusters)])
    scores = np.repeat([0.1, 0.4, 0.2, 0.9], size)  # one score per cluster, nonzero global spread
    perm = rng.permutation(len(scores))  # order must not matter
    assert knn_consistency(feats[perm], scores[perm], k) == 1.0


def test_random_scores_are_near_the_null_value() -> None:
    # scores unrelated to features: C is ~0, up to the small-sample bias of ddof=0 stds over k values
    rng = np.random.default_rng(2)
    n = 400
    feats, scores = rng.normal(size=(n, 32)), rng.random(n)
    sigma = scores.std()
    for k in (5, 10, 20):
        c_score = knn_consistency(feats, scores, k)
        random_sets = np.argsort(rng.random((2000, n)), axis=1)[:, :k]  # [2000, k] random neighbourhoods
        null = 1.0 - scores[random_sets].std(axis=1).mean() / sigma
        assert abs(c_score - null) < 0.05, (k, c_score, null)
        assert -0.1 < c_score < 0.25
    # and clearly below a feature-aligned score
    low_dim = rng.normal(size=(n, 3))
    assert knn_consistency(low_dim, low_dim[:, 0], 10) > 0.5


def test_invalid_inputs() -> None:
    feats, scores = np.ones((5, 3)), np.arange(5.0)
    assert math.isnan(knn_consistency(np.random.default_rng(0).normal(size=(5, 3)), np.ones(5), 2))
    with pytest.raises(ValueError, match="k must be"):
        knn_consistency(feats, scores, 5)  # self excluded: at most N-1 neighbours
    with pytest.raises(ValueError, match="k must be"):
        knn_consistency(feats, scores, 0)
    with pytest.raises(ValueError, match="scores"):
        knn_consistency(feats, scores[:4], 2)
    with pytest.raises(ValueError, match="features"):
        knn_consistency(feats[None], scores, 2)


def test_cls_attention_scores() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 17, 17))  # [heads, 1+N, 1+N]
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    s = cls_attention_scores(attn)
    assert s.shape == (16,)
    np.testing.assert_allclose(s, attn[:, 0, 1:].mean(axis=0))
    np.testing.assert_allclose(cls_attention_scores(attn[None]), s)


@pytest.fixture()
def layer_result() -> dict:
    rng = np.random.default_rng(4)
    hidden = [rng.normal(size=(60, 12)) for _ in range(3)]  # 3 layers of [N, C]
    attn = [rng.random(60) for _ in range(3)]  # [N] each
    attn[2] = np.full(60, 0.5)  # a layer with no score spread: C undefined
    return {"hidden": hidden, "attn": attn, "result": consistency_per_layer(hidden, attn, ks=(2, 5), layers=[1, 12, 24])}


def test_consistency_per_layer_shapes(layer_result: dict) -> None:
    res = layer_result["result"]
    assert res["layers"] == [1, 12, 24] and res["ks"] == [2, 5] and res["num_tokens"] == 60
    assert set(res["consistency"]) == {"2", "5"}
    for k in (2, 5):
        curve = res["consistency"][str(k)]
        assert len(curve) == 3
        for h, a, value in zip(layer_result["hidden"][:2], layer_result["attn"][:2], curve[:2]):
            assert value == knn_consistency(h, a, k)
        assert math.isnan(curve[2])
    default = consistency_per_layer(layer_result["hidden"][:2], layer_result["attn"][:2])
    assert default["layers"] == [0, 1] and default["ks"] == [5, 10, 20]
    with pytest.raises(ValueError):
        consistency_per_layer(layer_result["hidden"], layer_result["attn"][:2])


def test_write_report(layer_result: dict, tmp_path) -> None:
    res = layer_result["result"]
    write_report(res, tmp_path / "c.json", None)
    data = json.loads((tmp_path / "c.json").read_text())  # standard JSON: NaN became null
    assert data["layers"] == [1, 12, 24]
    assert data["consistency"]["5"][:2] == pytest.approx(res["consistency"]["5"][:2])
    assert data["consistency"]["5"][2] is None
    pytest.importorskip("matplotlib")
    from PIL import Image

    write_report(res, tmp_path / "out" / "c2.json", tmp_path / "out" / "c.png")
    with Image.open(tmp_path / "out" / "c.png") as im:
        assert im.width > 300 and im.height > 200
