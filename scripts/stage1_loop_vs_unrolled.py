"""Stage 1 in ONNX: unrolled Python loop vs ONNX Loop (torch while_loop). Prints nodes, export time, ORT time.

Usage: python scripts/stage1_loop_vs_unrolled.py   (N=576, C=1024, K=96 and 192; CPU)
"""
import time, math, sys, warnings, statistics
import torch, numpy as np, onnx, onnxruntime as ort
from torch._higher_order_ops import while_loop
from torch.export import Dim
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from sts_export.pruning.selection import potential_energy_select, pairwise_sq_dist, anchor_index, sorted_indices, EPS
warnings.simplefilter("ignore")

def pe_loop(v, k):
    v = v.float(); b, n, _ = v.shape
    d = pairwise_sq_dist(v); ar = torch.arange(n)
    pick = anchor_index(v, "mean")
    picked = ar[None, :] == pick[:, None]
    r = 1.0 / (torch.gather(d, 1, pick[:, None, None].expand(b, 1, n)).squeeze(1) + EPS)
    def cond(i, picked, r): return i < k
    def body(i, picked, r):
        p = torch.where(picked, torch.full_like(r, math.inf), r).argmin(dim=-1)
        picked = picked | (torch.arange(n)[None, :] == p[:, None])
        row = torch.gather(d, 1, p[:, None, None].expand(b, 1, n)).squeeze(1)
        return i + 1, picked.clone(), r + 1.0 / (row + EPS)
    _, picked, _ = while_loop(cond, body, (torch.tensor(1), picked, r))
    return sorted_indices(picked, k)

class M(torch.nn.Module):
    def __init__(self, k, loop): super().__init__(); self.k, self.loop = k, loop
    def forward(self, v): return pe_loop(v, self.k) if self.loop else potential_energy_select(v, self.k)

for K in (96, 192):
    x = torch.randn(1, 576, 1024)
    ref = potential_energy_select(x, K)
    for loop in (False, True):
        t = time.perf_counter()
        prog = torch.onnx.export(M(K, loop), (x,), dynamo=True, input_names=["v"], output_names=["keep"],
                                 dynamic_shapes=({0: Dim("B", min=1, max=64)},), verbose=False)
        t_exp = time.perf_counter() - t
        path = f"/tmp/pe_{K}_{loop}.onnx"; prog.save(path)
        m = onnx.load(path)
        nodes = len(m.graph.node) + sum(len(a.g.node) for n in m.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        xs = [torch.randn(1, 576, 1024) for _ in range(3)]
        same = all(np.array_equal(s.run(None, {"v": z.numpy()})[0], potential_energy_select(z, K).numpy()) for z in xs)
        for _ in range(3): s.run(None, {"v": x.numpy()})
        ts = []
        for _ in range(15):
            t = time.perf_counter(); s.run(None, {"v": x.numpy()}); ts.append(time.perf_counter() - t)
        print(f"K={K} {'Loop    ' if loop else 'unrolled'}: nodes {nodes:5d}  export {t_exp:6.1f} s  ORT median {statistics.median(ts)*1e3:6.2f} ms  equal-to-eager {same}", flush=True)
