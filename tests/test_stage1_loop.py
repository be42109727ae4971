"""Stage 1 greedy as custom ops exported to an ONNX Loop (sts_export.pruning.loop): eager = selectors, prefix
property, dynamic-N export run in onnxruntime, static TensorRT check."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch.export import Dim

from sts_export.export.tensorrt.check import check_model
from sts_export.pruning.loop import first_k_ascending, translation_table
from sts_export.pruning.selection import anchor_index, divprune_select, potential_energy_select
from sts_export.pruning.selection import divprune_seed as _seed_batched

ort = pytest.importorskip("onnxruntime")

def divprune_seed(f: torch.Tensor) -> torch.Tensor:
    return _seed_batched(f[None])[0]


def pe_picks(f: torch.Tensor, first: torch.Tensor | int, k: int) -> torch.Tensor:
    """One image: the batched op at B = 1. [N, C], first -> [k] picks."""
    return torch.ops.sts.potential_energy_picks(f[None], torch.as_tensor(first).reshape(1), k)[0]


def dp_picks(f: torch.Tensor, first: torch.Tensor | int, k: int) -> torch.Tensor:
    return torch.ops.sts.divprune_picks(f[None], torch.as_tensor(first).reshape(1), k)[0]


def _feats(n: int, c: int, seed: int) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Eager
# ---------------------------------------------------------------------------------------------------------------

def test_custom_op_registration() -> None:
    f = torch.stack([_feats(10, 4, 0), _feats(10, 4, 1)])
    for op in (torch.ops.sts.potential_energy_picks, torch.ops.sts.divprune_picks):
        res = torch.library.opcheck(op.default, (f, torch.tensor([2, 7]), 5))  # schema, fake impl, dynamic shapes
        assert set(res.values()) == {"SUCCESS"}, res


def test_batch_rows_are_independent() -> None:
    """A batch of images picks, row by row, what each image picks alone, and what the batched selectors keep."""
    f = torch.stack([_feats(30, 8, s) for s in range(3)])
    for anchor in ("mean", "first"):
        first = anchor_index(f, anchor)
        picks = torch.ops.sts.potential_energy_picks(f, first, 11)
        assert picks.shape == (3, 11)
        for b in range(3):
            assert torch.equal(picks[b], pe_picks(f[b], first[b], 11))
        assert torch.equal(picks.sort(-1).values, potential_energy_select(f, 11, anchor))
    picks = torch.ops.sts.divprune_picks(f, torch.tensor([-1, -1, -1]), 11)
    assert torch.equal(picks.sort(-1).values, divprune_select(f, 11))
    assert torch.equal(picks[1], dp_picks(f[1], -1, 11))


@pytest.mark.parametrize("n,c", [(5, 3), (17, 8), (40, 16)])
def test_eager_picks_equal_selectors(n: int, c: int) -> None:
    for seed in range(6):
        f = _feats(n, c, seed)
        for k in sorted({1, 2, n // 3 or 1, n // 2, n}):
            for anchor in ("mean", "first"):
                first = anchor_index(f[None], anchor)[0]
                picks = pe_picks(f, first, k)
                assert picks.dtype == torch.int64 and picks.shape == (k,)
                assert int(picks[0]) == int(first) and len(set(picks.tolist())) == k
                assert torch.equal(picks.sort().values, potential_energy_select(f[None], k, anchor)[0])
            seed_dp = divprune_seed(f)
            picks = dp_picks(f, seed_dp, k)
            assert int(picks[0]) == int(seed_dp) and len(set(picks.tolist())) == k
            assert torch.equal(picks.sort().values, divprune_select(f[None], k)[0])
            assert torch.equal(dp_picks(f, torch.tensor(-1), k), picks)  # first < 0: the op's own seed


def test_eager_half_input_runs_float32() -> None:
    f = _feats(24, 8, 3).half()
    first = anchor_index(f[None].float(), "mean")[0]
    assert torch.equal(pe_picks(f, first, 7).sort().values, potential_energy_select(f[None], 7)[0])
    assert torch.equal(dp_picks(f, divprune_seed(f), 7).sort().values, divprune_select(f[None], 7)[0])


def _tie_inputs() -> list[tuple[torch.Tensor, int]]:
    line = torch.tensor([[-2.0], [-1.0], [0.0], [1.0], [2.0]])  # symmetric about index 2: every step ties
    return [(torch.zeros(6, 4), 0), (torch.zeros(6, 4), 3), (line, 2), (torch.cat([line, line]), 2)]


def test_exact_ties_go_to_lower_index() -> None:
    zeros = torch.zeros(6, 4)
    assert pe_picks(zeros, torch.tensor(0), 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert pe_picks(zeros, torch.tensor(3), 6).tolist() == [3, 0, 1, 2, 4, 5]
    line = torch.tensor([[-2.0], [-1.0], [0.0], [1.0], [2.0]])
    assert pe_picks(line, torch.tensor(2), 5).tolist() == [2, 0, 4, 1, 3]  # r(0) = r(4), then r(1) = r(3)
    assert divprune_seed(zeros).item() == 0 and dp_picks(zeros, torch.tensor(0), 6).tolist() == [0, 1, 2, 3, 4, 5]
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # two directions, each twice
    assert dp_picks(two, torch.tensor(0), 4).tolist() == [0, 1, 2, 3]
    for f, _ in _tie_inputs():  # and the selectors break every tie the same way
        k = f.shape[0] - 1
        for anchor in ("mean", "first"):
            assert torch.equal(pe_picks(f, anchor_index(f[None], anchor)[0], k).sort().values,
                               potential_energy_select(f[None], k, anchor)[0])
        assert torch.equal(dp_picks(f, divprune_seed(f), k).sort().values, divprune_select(f[None], k)[0])


@pytest.mark.parametrize("n", [3, 9])
def test_k_max_beyond_n_repeats_index_0(n: int) -> None:
    f = _feats(n, 4, n)
    for picks in (pe_picks(f, torch.tensor(n - 1), n + 4), dp_picks(f, divprune_seed(f), n + 4)):
        assert sorted(picks[:n].tolist()) == list(range(n))
        assert picks[n:].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("n,c", [(12, 4), (31, 8), (64, 6)])
def test_prefix_property(n: int, c: int) -> None:
    for seed in range(3):
        f = _feats(n, c, 100 + seed)
        first = anchor_index(f[None], "mean")[0]
        full_pe, full_dp = pe_picks(f, first, n), dp_picks(f, divprune_seed(f), n)
        for k in (1, 2, n // 4, n // 2, n - 1):
            assert torch.equal(full_pe[:k], pe_picks(f, first, k))
            assert torch.equal(full_dp[:k], dp_picks(f, divprune_seed(f), k))


def test_first_k_ascending_eager() -> None:
    picks = torch.tensor([7, 2, 9, 0, 5, 0, 0])  # the trailing zeros: k_max > N repeats
    for k in range(1, 5):
        assert first_k_ascending(picks[None], torch.tensor(k), 10).tolist() == [sorted(picks[:k].tolist())]
    two = torch.stack([picks, torch.tensor([3, 8, 1, 6, 4, 0, 0])])  # each row keeps its own first k
    assert first_k_ascending(two, 3, 10).tolist() == [[2, 7, 9], [1, 3, 8]]
    assert first_k_ascending(two, 7, 10).tolist() == [[0, 0, 0, 2, 5, 7, 9], [0, 0, 1, 3, 4, 6, 8]]


# ---------------------------------------------------------------------------------------------------------------
# Export: dynamic N, runtime k, one file
# ---------------------------------------------------------------------------------------------------------------

class _Stage1(torch.nn.Module):
    def __init__(self, k_max: int, method: str, anchor: str = "mean") -> None:
        super().__init__()
        self.k_max, self.method, self.anchor = k_max, method, anchor

    def forward(self, features: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # [B, N, C], [] -> [B, k]
        b = features.shape[0]
        if self.method == "sts":
            picks = torch.ops.sts.potential_energy_picks(features, anchor_index(features, self.anchor), self.k_max)
        elif self.method == "divprune":  # the seed computed inside the op (first = -1)
            picks = torch.ops.sts.divprune_picks(features, torch.full((b,), -1), self.k_max)
        else:  # the seed given from outside
            picks = torch.ops.sts.divprune_picks(features, _seed_batched(features), self.k_max)
        return first_k_ascending(picks, k, features.shape[1])


def _export(k_max: int, method: str, anchor: str = "mean") -> onnx.ModelProto:
    prog = torch.onnx.export(
        _Stage1(k_max, method, anchor).eval(), (_feats(20, 6, 0)[None].expand(2, -1, -1), torch.tensor(3)),
        dynamo=True, input_names=["features", "k"], output_names=["keep"],
        dynamic_shapes=({0: Dim("B", min=1, max=64), 1: Dim("N", min=2, max=4096)}, None),
        custom_translation_table=translation_table(), verbose=False)
    return prog.model_proto


def _count(g: onnx.GraphProto) -> int:
    return sum(1 + sum(_count(a.g) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH) for n in g.node)


K_MAX = 12


@pytest.fixture(scope="module")
def exported() -> dict[str, onnx.ModelProto]:
    return {m: _export(K_MAX, m) for m in ("sts", "divprune", "divprune-seeded")}


def _run(model: onnx.ModelProto, f: torch.Tensor, k: int) -> np.ndarray:
    """One image [N, C] -> [k]."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"features": f[None].numpy(), "k": np.array(k, dtype=np.int64)})[0][0]


@pytest.mark.parametrize("method", ["sts", "divprune", "divprune-seeded"])
def test_export_runs_at_two_n(exported: dict, method: str) -> None:
    model = exported[method]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    eager = _Stage1(K_MAX, method)
    for n in (9, 33):  # 9 < k_max: the extra steps repeat index 0 in the graph too
        for b in (1, 3):  # a batch of images: each row its own greedy
            f = torch.stack([_feats(n, 6, 10 * n + seed) for seed in range(b)])
            for k in sorted({1, 5, min(n, K_MAX)}):
                out = sess.run(None, {"features": f.numpy(), "k": np.array(k, dtype=np.int64)})[0]
                ref = potential_energy_select(f, k) if method == "sts" else divprune_select(f, k)
                assert out.dtype == np.int64 and out.shape == (b, k)
                assert np.array_equal(out, eager(f, torch.tensor(k)).numpy())
                assert np.array_equal(out, ref.numpy())


def test_export_ties_go_to_lower_index(exported: dict) -> None:
    for f, _ in _tie_inputs():
        f = torch.cat([f, torch.zeros(f.shape[0], 6 - f.shape[1])], dim=1)  # pad to the exported C
        for k in (1, 3, f.shape[0] - 1):
            assert np.array_equal(_run(exported["sts"], f, k), _Stage1(K_MAX, "sts")(f[None], torch.tensor(k))[0].numpy())
            assert np.array_equal(_run(exported["divprune"], f, k),
                                  _Stage1(K_MAX, "divprune")(f[None], torch.tensor(k))[0].numpy())


def _loop(model: onnx.ModelProto) -> onnx.NodeProto:
    (loop,) = [n for n in model.graph.node if n.op_type == "Loop"]
    return loop


def test_graph_is_one_loop_with_constant_trip_count(exported: dict) -> None:
    bigger = _export(3 * K_MAX, "sts")
    assert _count(bigger.graph) == _count(exported["sts"].graph) < 80
    for method, model in exported.items():
        ops = [n.op_type for n in model.graph.node]
        assert "Sort" not in ops and _count(model.graph) < 80, method
        loop = _loop(model)
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        assert int(inits[loop.input[0]]) == K_MAX - 1
        assert not loop.input[1] or bool(inits[loop.input[1]])  # no cond or a constant true one
    assert int({t.name: onnx.numpy_helper.to_array(t) for t in bigger.graph.initializer}[_loop(bigger).input[0]]) \
        == 3 * K_MAX - 1


def test_static_tensorrt_check(exported: dict) -> None:
    for method, model in exported.items():
        rep = check_model(model, trt_version="10.3", name=method)
        assert rep.ok, rep.format()
        assert rep.warnings == [], rep.format()  # loop-carried shapes proved constant (no inference warnings)
        assert rep.op_counts["Loop"] == 1 and rep.op_counts.get("TopK") == 1


def test_static_check_takes_runtime_trip_count(exported: dict) -> None:
    # onnx-tensorrt's Loop importer turns any trip count into a kCOUNT limit (and registers the iteration input the
    # body reads): a runtime trip count parses
    m = onnx.ModelProto()
    m.CopyFrom(exported["sts"])
    loop = _loop(m)
    loop.input[0] = "steps"
    m.graph.input.append(onnx.helper.make_tensor_value_info("steps", onnx.TensorProto.INT64, []))
    rep = check_model(m, trt_version="10.3")
    assert rep.ok, rep.format()
