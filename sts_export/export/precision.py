"""What a reduced-precision (fp16/bf16) export promises, and the pieces validation checks it with
(docs/design.md, "What a reduced-precision export promises"):

    Fp32Compute          the reference: torch computing in float32 on the export's own low-precision weights
    selection_probe      a graph's selection tensors exposed as extra outputs (the Stage 1 Loop's distances, anchor
                         and greedy order; the first float TopK's scores)
    check_selection      the graph's picks against the plain reference selectors on those very tensors (exact)
    compare_graph        a graph's outputs on the reference's feeds, on the tokens both kept where picks differ
    agreement            the kept sets against the float32 reference's, to the AGREEMENT floors
    forced_picks         the torch graphs made to keep given tokens (the reference re-run on the graphs' picks)
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from sts_export.artifact.plan import Plan
from sts_export.export.compare import compare_array, overlap
from sts_export.families import ImageInput
from sts_export.generate import Generation
from sts_export.pruning.reference import greedy_picks, set_objective, topk_ascending

# Reduced precision: the least agreement of the kept sets with the float32 reference that passes. Measured with
# scripts/fp16_agreement.py (12 images each, fp16, ONNX Runtime CPU; docs/design.md): Stage 1 overlap >= 0.987 and
# objective margins <= 4e-5 on llava-1.5-7b-cpu and tiny-llava-next; Stage 2 overlap down to 0.70 on tiny-llava-next,
# whose random weights give near-flat relevance (ties everywhere). Floors: Stage 1 well above chance (K/N) and
# above the near-tie flips measured; Stage 2 above chance (K'/K = 1/3) but not above what flat relevance flips; the
# set's objective (STS: potential energy) at most 0.1 % worse than the reference set's.
AGREEMENT = {"keep_pre_overlap": 0.9, "keep_post_overlap": 0.5, "objective_margin": 1e-3}
LOW = (torch.float16, torch.bfloat16)


class Fp32Compute(TorchFunctionMode):
    """Every torch op computes in float32: float16/bfloat16 tensors (weights included, cast per op, so nothing is
    stored twice) enter as float32, and casts or factories that ask for a low-precision dtype get float32.
    The same weights, computed exactly: the reference for fp16/bf16 exports."""

    @staticmethod
    def _up(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dtype in LOW:
            return x.float()
        if isinstance(x, torch.dtype) and x in LOW:
            return torch.float32
        return x

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        args, kwargs = tree_map(self._up, (args, kwargs or {}))
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Selection on the graph's own tensors
# ---------------------------------------------------------------------------------------------------------------

PROBE = "probe:"  # prefix of the exposed selection tensors among a probed graph's outputs


def _elem_types(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """name -> (element type, rank) of every typed value of the main graph (after shape inference)."""
    g = onnx.shape_inference.infer_shapes(model).graph
    out = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.elem_type:
            out[vi.name] = (tt.elem_type, len(tt.shape.dim) if tt.HasField("shape") else -1)
    return out


def selection_tensors(model: onnx.ModelProto) -> dict[str, str]:
    """The tensors a graph selects on, by role -> name (main graph):

    stage1_distances [B,N,N] float32  the greedy Loop's distance matrix (the outer float tensor its body reads)
    stage1_initial   [B,K_max] int64  the Loop's initial picks state (every slot holds the anchor / seed)
    stage1_order     [B,K_max] int64  the Loop's final picks, in greedy order
    topk_scores      [B,M] float32    the scores the first float TopK ranks (Stage 2 relevance, cls attention)
    """
    types = _elem_types(model)
    fp32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    made = {o for n in model.graph.node for o in n.output}
    found: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type == "Loop" and "stage1_order" not in found:
            body = next(a.g for a in n.attribute if a.name == "body")
            inner = {i.name for i in body.input} | {o for bn in body.node for o in bn.output}
            reads = dict.fromkeys(x for bn in body.node for x in bn.input if x and x not in inner)
            dist = [x for x in reads if x in made and types.get(x) == (fp32, 3)]
            # the picks state: the one [B, K_max] int64 loop-carried value (the others: mask, scores)
            picks = [j for j, x in enumerate(n.input[2:]) if types.get(x) == (i64, 2)]
            if len(dist) == 1 and len(picks) == 1:
                found.update(stage1_distances=dist[0], stage1_initial=n.input[2 + picks[0]],
                             stage1_order=n.output[picks[0]])
        elif n.op_type == "TopK" and "topk_scores" not in found and types.get(n.input[0], (0, 0))[0] == fp32:
            found["topk_scores"] = n.input[0]
    return found


def selection_probe(path: Path, work: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the graph at `path` (weights included) whose selection tensors are extra outputs named
    PROBE + role, written under `work`; -> (its path, role -> tensor name). No selection: (path, {})."""
    model = onnx.load(str(path))
    found = selection_tensors(model)
    if not found:
        return path, {}
    types = _elem_types(model)
    for role, name in found.items():
        model.graph.node.append(onnx.helper.make_node("Identity", [name], [PROBE + role], name=f"validation_{role}"))
        model.graph.output.append(onnx.helper.make_tensor_value_info(PROBE + role, types[name][0], None))
    out = work / path.name
    onnx.save(model, str(out), save_as_external_data=model.ByteSize() > 1_900_000_000)
    return out, found


class ProbeBackend:
    """One graph's ONNX Runtime session with its selection tensors exposed: run(graph, feeds) -> every output."""

    def __init__(self, path: Path, graph: str) -> None:
        import onnxruntime as ort

        o = ort.SessionOptions()
        o.log_severity_level = 3
        self.graph = graph
        self.session = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        self.names = [x.name for x in self.session.get_outputs()]

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        inputs = {i.name: np.ascontiguousarray(feeds[i.name]) for i in self.session.get_inputs()}
        return dict(zip(self.names, self.session.run(None, inputs)))


def check_selection(method: str, out: dict[str, np.ndarray], graph: str) -> dict[str, Any] | None:
    """The graph's picks against the plain reference selectors run on the graph's own tensors (bit-identical).

    vision: Stage 1's greedy order = `greedy_picks` on the Loop's own distances from its own anchor, and keep_pre =
    its first K ascending; cls: keep_pre = top-K of the graph's own scores. prune: keep_post = top-K' of the
    graph's own relevance. None when the graph selects nothing."""
    keep_name = "keep_pre" if graph == "vision" else "keep_post"
    keep = out.get(keep_name)
    rows: list[dict[str, Any]] = []
    if PROBE + "stage1_order" in out:
        d, init, order = (out[PROBE + r] for r in ("stage1_distances", "stage1_initial", "stage1_order"))
        for b in range(order.shape[0]):
            ref = greedy_picks(d[b], int(init[b, 0]), order.shape[1], minimise_sum=method != "divprune")
            same_order = bool(np.array_equal(ref, order[b]))
            same_keep = bool(np.array_equal(np.sort(ref[:keep.shape[1]]), keep[b]))
            rows.append({"row": b, "rule": "Algorithm 1 on the graph's own distances and anchor",
                         "greedy_order_identical": same_order, f"{keep_name}_identical": same_keep,
                         "ok": same_order and same_keep})
    elif PROBE + "topk_scores" in out and keep is not None:
        scores = out[PROBE + "topk_scores"]
        for b in range(scores.shape[0]):
            same = bool(np.array_equal(topk_ascending(scores[b], keep.shape[1]), keep[b]))
            rows.append({"row": b, "rule": "top-k of the graph's own scores, ties to the lower index",
                         f"{keep_name}_identical": same, "ok": same})
    if not rows:
        return None
    return {"graph": graph, "ok": all(r["ok"] for r in rows), "rows": rows}


# ---------------------------------------------------------------------------------------------------------------
# Per graph: candidate vs reference on the same feeds (rows of the tokens both kept where the picks differ)
# ---------------------------------------------------------------------------------------------------------------

def _common_slots(got_keep: np.ndarray, want_keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions, in each ascending kept list [K], of the tokens both lists hold -> (in got, in want)."""
    both = np.intersect1d(got_keep, want_keep)
    return np.searchsorted(got_keep, both), np.searchsorted(want_keep, both)


def compare_graph(graph: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray], feeds: dict[str, Any],
                  tol: float, dtype: str) -> list[dict[str, Any]]:
    """One graph's outputs on the same feeds. Where a selecting graph's picks differ (reduced precision), its
    kept-index output is reported with its overlap and every output that follows the picks is compared on the
    tokens both kept (row by row of the batch); the picks themselves are checked by `check_selection`."""
    key = {"vision": "keep_pre", "prune": "keep_post"}.get(graph)
    if key is None or key not in want or np.array_equal(got[key], want[key]) or dtype == "fp32":
        return [compare_array(n, got[n], w, tol, dtype) for n, w in want.items()]
    rows = [{"output": key, "ok": True, "identical": False, "overlap": overlap(got[key], want[key]),
             "note": "picks differ at reduced precision: see agreement; outputs compared on the tokens both kept"}]
    start = int(np.asarray(feeds.get("image_start", 0)))
    for name, w in want.items():
        if name == key:
            continue
        per_row: list[dict[str, Any]] = []
        for b in range(w.shape[1] if name == "position_ids_out" and w.ndim == 3 else w.shape[0]):
            gs, ws = _common_slots(got[key][b], want[key][b])
            if graph == "prune":  # hidden_out / position_ids_out: prefix, K' image slots, suffix
                n_out, k = w.shape[-1] if name == "position_ids_out" else w.shape[1], want[key].shape[1]
                gs = np.r_[np.arange(start), start + gs, np.arange(start + k, n_out)]
                ws = np.r_[np.arange(start), start + ws, np.arange(start + k, n_out)]
            if name == "position_ids_out" and w.ndim == 3:  # M-RoPE ids [3, B, S2]
                per_row.append(compare_array(name, np.take(got[name][:, b], gs, -1), np.take(w[:, b], ws, -1), tol, dtype))
            else:  # [B, S, ...] along the sequence axis (position_ids_out [B, S2])
                per_row.append(compare_array(name, np.take(got[name][b], gs, 0), np.take(w[b], ws, 0), tol, dtype))
        bad = [r for r in per_row if not r["ok"]]
        worst = bad[0] if bad else max(per_row, key=lambda r: r.get("max_abs", 0.0))
        rows.append({**worst, "on": "tokens both kept"})
    return rows


def selection_inputs(vision: torch.nn.Module, image: ImageInput, plan: Plan) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per batch row: (x [N, C], cls attention [N] | None), what the reference's Stage 1 selects on."""
    if not getattr(vision, "pruned", False):
        return []
    inputs = [torch.from_numpy(np.ascontiguousarray(image.feeds[n])) for n in plan.vision_inputs if n != "k_pre"]
    with torch.inference_mode():
        x, cls_att, _ = vision.selection_input(*inputs)
    x = x.float().numpy()
    att = cls_att.float().numpy() if cls_att is not None else None
    return [(x[b], None if att is None else att[b]) for b in range(x.shape[0])]


def agreement(method: str, ref: Generation, got: Generation, features: list[tuple[np.ndarray, np.ndarray | None]]
              ) -> dict[str, Any]:
    """How far a reduced-precision generation's kept sets are from the float32 reference's: overlaps (the share of
    the reference's tokens kept too) and, per image, the objective the method optimises for both sets (computed on
    the reference's features) with its relative margin (positive: the graph's set is worse)."""
    out: dict[str, Any] = {"keep_pre_overlap": overlap(got.keep_pre, ref.keep_pre)}
    if ref.keep_post is not None and got.keep_post is not None:
        out["keep_post_overlap"] = overlap(np.take_along_axis(got.keep_pre, got.keep_post, 1),
                                           np.take_along_axis(ref.keep_pre, ref.keep_post, 1))
    margins = []
    for b, (x, att) in enumerate(features):
        r = set_objective(method, x, ref.keep_pre[b], att)
        if r is None:
            break
        g = set_objective(method, x, got.keep_pre[b], att)
        name, higher = r[0], r[2]
        margin = (r[1] - g[1]) / abs(r[1]) if higher else (g[1] - r[1]) / abs(r[1])
        margins.append(margin)
        out.setdefault("objective", {"name": name, "reference": [], "graph": [], "margin": []})
        for k, v in (("reference", r[1]), ("graph", g[1]), ("margin", margin)):
            out["objective"][k].append(float(v))
    bad = [k for k in ("keep_pre_overlap", "keep_post_overlap") if out.get(k, 1.0) < AGREEMENT[k]]
    if margins and max(margins) > AGREEMENT["objective_margin"]:
        bad.append("objective")
    out["floors"], out["ok"], out["below"] = AGREEMENT, not bad, bad
    return out


@contextlib.contextmanager
def forced_picks(graphs: dict[str, torch.nn.Module], keep_pre: np.ndarray, keep_post: np.ndarray | None) -> Any:
    """The torch graphs keep exactly these tokens (Stage 1 and 2) instead of selecting, within the block."""
    vision, prune = graphs["vision"], graphs.get("prune")
    vision.forced_keep = torch.from_numpy(keep_pre)
    if prune is not None and keep_post is not None:
        prune.forced_keep = torch.from_numpy(keep_post)
    try:
        yield
    finally:
        vision.forced_keep = None
        if prune is not None:
            prune.forced_keep = None


def agreement_line(results: dict[str, Any]) -> str:
    """One line: how the reduced-precision graphs' kept sets agree with the float32 reference's."""
    parts = []
    for k, r in results["end_to_end"].items():
        a = r.get("agreement")
        if not a:
            continue
        bits = [f"Stage 1 kept {a['keep_pre_overlap']:.0%} of the reference's tokens"]
        if "keep_post_overlap" in a:
            bits.append(f"Stage 2 {a['keep_post_overlap']:.0%}")
        if "objective" in a:
            bits.append(f"{a['objective']['name'].replace('_', ' ')} {max(a['objective']['margin']):+.2%} vs the reference set")
        logits = r.get("first_logits_same_picks", r["first_logits"])
        bits.append(f"first-token logits max abs {logits.get('max_abs', float('nan')):.3g}"
                    + (" (reference with the graphs' picks)" if "first_logits_same_picks" in r else ""))
        parts.append(f"{k}: " + ", ".join(bits))
    sel = results.get("selection", {})
    exact = "selection exact on the graphs' own tensors" if sel and all(s["ok"] for s in sel.values()) else \
        "selection NOT exact on the graphs' own tensors" if sel else "no selection"
    return f"{exact}; against the float32 reference: " + "; ".join(parts)
