"""Stage 1 in ONNX: the unrolled greedy vs the ONNX `Loop` form (sts_export.pruning.loop custom ops).

Per graph: node count (Loop bodies included), export seconds, onnxruntime median ms (warm-up, then --repeats
runs), whether the result equals the eager selector, and the static TensorRT check (trt 10.3) verdict.

* unrolled: `potential_energy_select` exported as is (a Python loop: ~12 nodes per greedy step), static K.
* Loop: `torch.ops.sts.potential_energy_picks` (translated to one ONNX Loop with a constant trip count K_max - 1)
  then `first_k_ascending(picks, k)` with k a runtime int64 input (run here at k = K_max and k = K_max // 3).

Both graphs take features [N, C] with N a dynamic axis.

Usage: python scripts/stage1_loop_vs_unrolled.py                  (N=2880, C=64: unrolled K=96, Loop K_max=96/480/960,
                                                                   then Loop at C=1024, K_max=960; CPU)
       python scripts/stage1_loop_vs_unrolled.py --unrolled 96 480 --loop 960 --wide-c 0
       python scripts/stage1_loop_vs_unrolled.py --n 576 --c 1024 --unrolled 96 --loop 96 --wide-c 0   (LLaVA-1.5-7B)
"""
import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.export import Dim

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sts_export.export.tensorrt.check import check_model  # noqa: E402
from sts_export.pruning.loop import first_k_ascending, translation_table  # noqa: E402
from sts_export.pruning.selection import anchor_index, divprune_select, potential_energy_select  # noqa: E402

warnings.simplefilter("ignore")


class Unrolled(torch.nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return potential_energy_select(features[None], self.k)[0]


class LoopForm(torch.nn.Module):
    def __init__(self, k_max: int, method: str = "sts") -> None:
        super().__init__()
        self.k_max, self.method = k_max, method

    def forward(self, features: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        f = features[None]  # [1, N, C]: the ops are batched
        if self.method == "sts":
            picks = torch.ops.sts.potential_energy_picks(f, anchor_index(f, "mean"), self.k_max)
        else:
            picks = torch.ops.sts.divprune_picks(f, torch.tensor([-1]), self.k_max)
        return first_k_ascending(picks, k, features.shape[0])[0]


def count_nodes(g: onnx.GraphProto) -> int:
    return sum(1 + sum(count_nodes(a.g) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH) for n in g.node)


def measure(label: str, module: torch.nn.Module, x: torch.Tensor, k: int | None, repeats: int, out_dir: Path,
            method: str = "sts") -> None:
    args = (x,) if k is None else (x, torch.tensor(k))
    dyn = ({0: Dim("N", min=2, max=8192)},) + (() if k is None else (None,))
    t = time.perf_counter()
    prog = torch.onnx.export(module.eval(), args, dynamo=True, input_names=["features", "k"][: len(args)],
                             output_names=["keep"], dynamic_shapes=dyn, verbose=False,
                             custom_translation_table=None if k is None else translation_table())
    t_exp = time.perf_counter() - t
    path = out_dir / f"{label.replace(' ', '_').replace('/', '_')}.onnx"
    prog.save(str(path))
    model = onnx.load(str(path))
    nodes = count_nodes(model.graph)
    rep = check_model(model, trt_version="10.3")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = potential_energy_select if method == "sts" else (lambda v, kk: divprune_select(v, kk))

    def feed(z: torch.Tensor, kk: int | None) -> dict:
        d = {"features": z.numpy()}
        if kk is not None:
            d["k"] = np.array(kk, dtype=np.int64)
        return d

    ks = [k] if k is None else sorted({k, max(1, k // 3)})
    k_ref = module.k if k is None else None
    same = True
    for seed in range(2):
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + seed))
        for kk in ks:
            out = sess.run(None, feed(z, kk))[0]
            same &= bool(np.array_equal(out, ref(z[None], kk if kk is not None else k_ref)[0].numpy()))
    f = feed(x, k)
    for _ in range(3):
        sess.run(None, f)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, f)
        ts.append(time.perf_counter() - t)
    trt = "OK" if rep.ok else f"{len(rep.problems)} problems"
    if rep.warnings:
        trt += f", {len(rep.warnings)} warnings"
    print(f"{label:<34} nodes {nodes:5d}  export {t_exp:6.1f} s  ORT median {statistics.median(ts) * 1e3:7.1f} ms "
          f"({repeats} runs)  equal-to-eager {same}  trt-check {trt}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2880)
    ap.add_argument("--c", type=int, default=64)
    ap.add_argument("--unrolled", type=int, nargs="*", default=[96], help="K for the unrolled form (slow beyond ~100)")
    ap.add_argument("--loop", type=int, nargs="*", default=[96, 480, 960], help="K_max for the Loop form")
    ap.add_argument("--wide-c", type=int, default=1024, help="also the Loop form at this C and the largest K_max "
                                                             "(0: skip)")
    ap.add_argument("--divprune", action="store_true", help="also DivPrune's Loop form at the largest K_max")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.get_num_threads()} torch threads",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        x = torch.randn(a.n, a.c)
        for k in a.unrolled:
            measure(f"unrolled N={a.n} C={a.c} K={k}", Unrolled(k), x, None, a.repeats, out)
        for k in a.loop:
            measure(f"Loop N={a.n} C={a.c} K_max={k}", LoopForm(k), x, k, a.repeats, out)
        if a.divprune and a.loop:
            measure(f"Loop divprune N={a.n} C={a.c} K_max={max(a.loop)}", LoopForm(max(a.loop), "divprune"), x,
                    max(a.loop), a.repeats, out, method="divprune")
        if a.wide_c and a.loop:
            xw = torch.randn(a.n, a.wide_c)
            measure(f"Loop N={a.n} C={a.wide_c} K_max={max(a.loop)}", LoopForm(max(a.loop)), xw, max(a.loop),
                    a.repeats, out)


if __name__ == "__main__":
    main()
