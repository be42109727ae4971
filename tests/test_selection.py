"""Stage 1 against plain, separately written reference implementations (loop by loop, numpy)."""
import numpy as np
import pytest
import torch

from sts_export import StsError, select_tokens


def ref_algorithm1(v: np.ndarray, k: int, anchor: str, cls_att: np.ndarray | None = None) -> list[int]:
    """Paper Algorithm 1 + DESIGN.md: greedy potential-energy selection, written as plainly as possible."""
    n = v.shape[0]
    v = v.astype(np.float64)
    if anchor == "mean":
        mu = v.mean(axis=0)
        first = min(range(n), key=lambda i: (float(((v[i] - mu) ** 2).sum()), i))
    elif anchor == "first":
        first = 0
    else:
        first = max(range(n), key=lambda i: (float(cls_att[i]), -i))
    selected = [first]
    r = [0.0] * n
    while len(selected) < k:
        last = selected[-1]
        for i in range(n):
            d = max(float(v[i] @ v[i] + v[last] @ v[last] - 2 * v[i] @ v[last]), 0.0)
            r[i] += 1.0 / (d + 1e-6)
        candidates = [i for i in range(n) if i not in selected]
        selected.append(min(candidates, key=lambda i: (r[i], i)))
    return sorted(selected)


def ref_divprune(x: np.ndarray, k: int) -> list[int]:
    """DivPrune: max-min cosine distance, seeded with the token farthest from its nearest neighbour."""
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - x @ x.T
    n = len(x)
    nn = [min(d[i, j] for j in range(n) if j != i) for i in range(n)]
    selected = [max(range(n), key=lambda i: (nn[i], -i))]
    while len(selected) < k:
        rest = [i for i in range(n) if i not in selected]
        selected.append(max(rest, key=lambda i: (min(d[i, j] for j in selected), -i)))
    return sorted(selected)


@pytest.mark.parametrize("n,c,k", [(16, 4, 5), (64, 8, 20), (144, 32, 48), (576, 16, 12)])
@pytest.mark.parametrize("anchor", ["mean", "first", "saliency"])
def test_sts_matches_algorithm1(n: int, c: int, k: int, anchor: str) -> None:
    g = np.random.default_rng(n * 31 + c)
    # clustered features (as vision tokens are): the greedy choice is well separated from ties
    centers = g.normal(size=(6, c)) * 3
    feats = centers[g.integers(0, 6, n)] + g.normal(size=(n, c))
    cls = g.random(n)
    keep = select_tokens("sts", torch.tensor(feats[None], dtype=torch.float32), k, anchor=anchor,
                         cls_attention=torch.tensor(cls[None]))
    assert keep.dtype == torch.int64 and keep.shape == (1, k)
    assert keep[0].tolist() == ref_algorithm1(feats.astype(np.float32), k, anchor, cls)


def test_sts_batched_equals_per_item() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 100, 16, generator=g)
    keep = select_tokens("sts", feats, 30)
    for b in range(3):
        assert keep[b].tolist() == ref_algorithm1(feats[b].numpy(), 30, "mean")
        assert keep[b].tolist() == sorted(keep[b].tolist())


def test_sts_fp16_input_selects_in_fp32() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 80, 24, generator=g).half()
    keep = select_tokens("sts-s", feats, 20)
    assert keep[0].tolist() == ref_algorithm1(feats[0].float().numpy(), 20, "mean")


def test_ties_go_to_lower_index() -> None:
    # 4 copies of the same 5 points: every pick has exact ties; the lowest index must win
    base = np.random.default_rng(2).normal(size=(5, 3))
    feats = np.concatenate([base] * 4)
    keep = select_tokens("sts", torch.tensor(feats[None], dtype=torch.float32), 5, anchor="first")
    assert keep[0].tolist() == ref_algorithm1(feats, 5, "first")
    assert all(i < 5 for i in keep[0].tolist())  # one copy of each point, the first copies


@pytest.mark.parametrize("n,c,k", [(30, 6, 8), (200, 16, 40)])
def test_divprune_matches_reference(n: int, c: int, k: int) -> None:
    feats = np.random.default_rng(n).normal(size=(n, c)).astype(np.float32)
    keep = select_tokens("divprune", torch.tensor(feats[None]), k)
    assert keep[0].tolist() == ref_divprune(feats, k)


def test_cls_topk_and_none() -> None:
    att = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.05, 0.3]])
    assert select_tokens("cls", torch.zeros(1, 6, 2), 3, cls_attention=att)[0].tolist() == [1, 3, 5]
    assert select_tokens("none", torch.zeros(2, 6, 2), 6).tolist() == [list(range(6))] * 2


def test_bad_arguments() -> None:
    with pytest.raises(StsError, match="unknown method"):
        select_tokens("random", torch.zeros(1, 8, 2), 3)
    with pytest.raises(StsError, match="k must be in 1..8"):
        select_tokens("sts", torch.zeros(1, 8, 2), 9)
    with pytest.raises(StsError, match=r"\[B, N, C\]"):
        select_tokens("sts", torch.zeros(8, 2), 3)
    with pytest.raises(StsError, match="unknown anchor"):
        select_tokens("sts", torch.zeros(1, 8, 2), 3, anchor="middle")
    with pytest.raises(StsError, match="cls_attention"):
        select_tokens("cls", torch.zeros(1, 8, 2), 3)
