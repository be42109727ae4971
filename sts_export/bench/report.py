"""Reports of a benchmark result (the dict `run_bench` returns): the text table, the JSON file and the plot.

JSON: `SCHEMA_VERSION` is the version of the layout written by `write_json`; every row holds at least `ROW_KEYS`
(the schema's required keys; tests/test_bench.py checks them). `format_table` is the table `bench.py` prints
(columns follow what the rows hold: timings, roofline, measured/bound), followed by a speedup summary per pruned
row and the notes; `write_plot` draws latency (or analytic GFLOPs) vs budget and measured speedup vs FLOP ratio.

Nothing here measures or runs anything (sts_export.bench.timing / .runner).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sts_export.errors import StsError

SCHEMA_VERSION = 1  # of the JSON layout: result["schema_version"]
# fields every measured row holds (the JSON schema's required keys; tests/test_bench.py checks them)
ROW_KEYS = (
    "model", "method", "budget", "backend", "dtype", "device", "k_pre", "k_post", "prune_layer", "text_tokens",
    "seq_len_stage1", "seq_len_stage2", "kv_cache_bytes",
    "flops_vision", "flops_stage1", "flops_prefill", "flops_decode", "bytes_vision", "bytes_prefill", "bytes_decode",
    "vision_ms_median", "prefill_ms_median", "ttft_ms_median", "decode_ms_median",
    "vision_ms_iqr", "prefill_ms_iqr", "ttft_ms_iqr", "decode_ms_iqr", "stage1_ms_median", "stage1_share_ttft",
    "peak_rss_bytes", "peak_gpu_bytes", "peak_mem_bytes", "repeats", "warmup", "max_new_tokens",
    "speedup_ttft", "speedup_prefill", "flop_ratio_ttft", "flop_ratio_prefill", "speedup_over_flop_ratio",
)


# ----------------------------------------------------------------------------------------------- table
def _fmt(v: Any, spec: str = ".1f", scale: float = 1.0) -> str:
    if v is None or isinstance(v, float) and math.isnan(v):
        return "-"
    if isinstance(v, (int, float)):
        return format(v * scale, spec)
    return str(v)


# the prefill graphs in the order they run, as TimedBackend labels them, and how the breakdown names them
PREFILL_PARTS = (("embed_prefill", "embed"), ("segment1_prefill", "segment1"), ("prune_prefill", "Stage 2"),
                 ("segment2_prefill", "segment2"))


def ttft_parts(row: dict[str, Any]) -> list[tuple[str, float]] | None:
    """Where a row's TTFT goes, in ms (medians): vision (Stage 1 runs inside it; the probe times it alone), each
    prefill graph, and `host` = TTFT minus the graphs (preprocessing, feeds, copies). A peer: its vision and
    prefill. None for an analytic row."""
    if row.get("ttft_ms_median") is None:
        return None
    graphs = row.get("graph_ms_median") or {}
    if not graphs:  # transformers: vision inside its forward, the rest of the forward
        return [(k, row[f"{k}_ms_median"]) for k in ("vision", "prefill") if row.get(f"{k}_ms_median") is not None]
    parts = [("vision", graphs.get("vision", 0.0))]
    parts += [(name, graphs[key]) for key, name in PREFILL_PARTS if graphs.get(key) is not None]
    return parts + [("host", row["ttft_ms_median"] - sum(v for _, v in parts))]


def format_ttft_parts(row: dict[str, Any]) -> str | None:
    """One line: `<model> <backend> <weights> <method> b=<budget>: TTFT 6.4 ms = vision 4.4 (69%; Stage 1 1.1) + ...`."""
    parts = ttft_parts(row)
    if not parts:
        return None
    ttft = row["ttft_ms_median"]
    s1 = row.get("stage1_ms_median")
    cells = [f"{name} {v:.1f} ({100 * v / ttft:.0f}%" + (f"; Stage 1 {s1:.1f}" if name == "vision" and s1 else "") + ")"
             for name, v in parts]
    return (f"{row['model']} {row['backend']} {row.get('weights') or row['dtype']} {row['method']} b={row['budget']}: "
            f"TTFT {ttft:.1f} ms = " + " + ".join(cells))


def format_table(result: dict[str, Any]) -> str:
    """The result as a text table (one line per row), a speedup summary per pruned row, and the notes."""
    rows = result["rows"]
    if not rows:
        return "\n".join(["(no rows)"] + [f"note: {n}" for n in result.get("notes", [])])
    timed = any(r.get("ttft_ms_median") is not None for r in rows)
    roof = any("ttft_roofline_ms" in r for r in rows)
    cols: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("model", lambda r: r["model"]), ("backend", lambda r: r["backend"]),
        ("weights", lambda r: str(r.get("weights") or r["dtype"])),
        *([("form", lambda r: r.get("graph_form") or "-")] if any(r.get("graph_form") for r in rows) else []),
        ("method", lambda r: r["method"]),
        ("budget", lambda r: str(r["budget"])), ("K", lambda r: str(r["k_pre"])), ("K'", lambda r: str(r["k_post"])),
        ("S1", lambda r: str(r["seq_len_stage1"])), ("S2", lambda r: str(r["seq_len_stage2"])),
        ("KV MB", lambda r: _fmt(r["kv_cache_bytes"], ".2f", 1e-6)),
        ("W MB", lambda r: _fmt(r.get("weight_bytes"), ".0f", 1e-6)),
        ("GFLOP vis", lambda r: _fmt(r["flops_vision"], ".2f", 1e-9)),
        ("GFLOP pre", lambda r: _fmt(r["flops_prefill"], ".2f", 1e-9)),
    ]
    if timed:
        def med_iqr(ph: str) -> Callable[[dict[str, Any]], str]:
            return lambda r: (f"{_fmt(r[f'{ph}_ms_median'])}±{_fmt(r[f'{ph}_ms_iqr'])}"
                              if r.get(f"{ph}_ms_median") is not None else "-")

        cols += [
            ("vision ms", med_iqr("vision")), ("stage1 ms", lambda r: _fmt(r.get("stage1_ms_median"), ".2f")),
            ("prefill ms", med_iqr("prefill")), ("TTFT ms", med_iqr("ttft")),
            ("decode ms/tok", med_iqr("decode")),
            ("peak MB", lambda r: _fmt(r.get("peak_mem_bytes"), ".0f", 1e-6)),
            ("TTFT x", lambda r: _fmt(r.get("speedup_ttft"), ".2f")),
            ("FLOP x", lambda r: _fmt(r.get("flop_ratio_ttft"), ".2f")),
            ("x/FLOPx", lambda r: _fmt(r.get("speedup_over_flop_ratio"), ".2f")),
        ]
    else:
        cols += [("GFLOP dec", lambda r: _fmt(r["flops_decode"], ".3f", 1e-9)),
                 ("FLOP x", lambda r: _fmt(r.get("flop_ratio_ttft"), ".2f"))]
    peers = {r["backend"] for r in rows if r.get("peer")}
    if peers:  # read every row against the peers (bench.peers): their median / ours
        cols.append(("scope", lambda r: r.get("scope") or "full model"))
        for peer, short, phases in (("transformers", "HF", ("ttft", "prefill", "decode")),
                                    ("ort-genai", "GenAI", ("prefill", "decode"))):
            if peer in peers:
                cols += [(f"{ph[:3] if ph != 'ttft' else 'TTFT'} vs {short} x",
                          lambda r, k=f"speedup_{ph}_vs_{peer.replace('-', '_')}": _fmt(r.get(k), ".2f"))
                         for ph in phases]
    if roof:
        cols += [("bound TTFT ms", lambda r: _fmt(r.get("ttft_roofline_ms"), ".2f")),
                 ("bound dec ms", lambda r: _fmt(r.get("decode_roofline_ms"), ".3f"))]
        if any(r.get("ttft_measured_over_bound") is not None for r in rows):
            cols += [("TTFT meas/bound", lambda r: _fmt(r.get("ttft_measured_over_bound"), ".1f")),
                     ("dec meas/bound", lambda r: _fmt(r.get("decode_measured_over_bound"), ".2f"))]
    if any(r.get("fits") is not None for r in rows):  # memory fit on --roofline: weights + KV + activations + runtime
        cols += [("need GB", lambda r: _fmt(r.get("mem_need_bytes"), ".2f", 1e-9)),
                 (f"fits {rows[0].get('roofline_device') or ''}".strip(),
                  lambda r: "-" if r.get("fits") is None else ("yes" if r["fits"] else "NO"))]
    cells = [[name for name, _ in cols]] + [[f(r) for _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    left = [n for n, _ in cols].index("budget")  # labels up to the budget left-aligned, figures right-aligned
    lines = ["  ".join(c.rjust(w) if i > left else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = "\n".join(lines)
    summary = []
    for r in rows:
        if r.get("speedup_ttft") is not None and r["budget"] != "full":
            s1 = (f"; Stage 1 {r['stage1_ms_median']:.2f} ms = {100 * r['stage1_share_ttft']:.1f}% of TTFT"
                  if r.get("stage1_share_ttft") is not None else "")
            summary.append(f"{r['model']} {r['backend']} {r['method']} b={r['budget']}: TTFT speedup "
                           f"{r['speedup_ttft']:.2f}x vs FLOP ratio {r['flop_ratio_ttft']:.2f}x "
                           f"({r['speedup_over_flop_ratio']:.2f} of it); prefill {r['speedup_prefill']:.2f}x vs "
                           f"{r['flop_ratio_prefill']:.2f}x{s1}")
    for r in rows:  # ours against the peers
        vs = [f"{what} {r[k]:.2f}x {peer}" for k, what, peer in (
            ("speedup_ttft_vs_transformers", "TTFT", "transformers'"),
            ("speedup_decode_vs_transformers", "decode", "transformers'"),
            ("speedup_prefill_vs_ort_genai", "LLM prefill", "ORT GenAI's (decoder only)"),
            ("speedup_decode_vs_ort_genai", "decode", "ORT GenAI's")) if r.get(k) is not None]
        if vs:
            summary.append(f"{r['model']} {r['backend']} {r['method']} b={r['budget']} vs peers: {', '.join(vs)}")
    if summary:
        out += "\n\n" + "\n".join(summary)
    where = [line for r in rows if (line := format_ttft_parts(r))]
    if where:  # what pruning can buy: Stage 2 shortens segment2, Stage 1 segment1 and segment2, neither vision
        out += "\n\nwhere TTFT goes (medians, ms):\n" + "\n".join(where)
    if result.get("notes"):
        out += "\n\n" + "\n".join(f"note: {n}" for n in result["notes"])
    return out


# ----------------------------------------------------------------------------------------------- JSON
def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """The result as indented JSON (numpy scalars and paths converted), creating the parent directory."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    """json.dumps' fallback for what a result may hold besides JSON types: numpy scalars, paths."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------------- plot
def write_plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Left: TTFT median (p25..p75 bars) vs budget per method and backend (analytic GFLOPs with --cost-only).
    Right: measured TTFT speedup over full vs the analytic FLOP ratio, with y = x and y = 0.8x (with --cost-only:
    the FLOP ratio vs budget)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise StsError("--plot needs matplotlib (pip install matplotlib, or pip install -e '.[plot]')") from None
    rows = result["rows"]
    timed = [r for r in rows if r.get("ttft_ms_median") is not None]
    source = timed or rows
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    n_img = max((r["k_pre"] for r in rows if r["budget"] == "full"), default=576)

    def xval(r: dict[str, Any]) -> int:
        return n_img if r["budget"] == "full" else int(r["budget"])

    def yval(r: dict[str, Any]) -> float:
        return r["ttft_ms_median"] if timed else (r["flops_vision"] + r["flops_prefill"]) / 1e9

    budgets = set()
    groups = list(dict.fromkeys((r["model"], r["backend"]) for r in source))  # in order, once each
    for model, backend in groups:
        group = [r for r in source if r["model"] == model and r["backend"] == backend]
        full = next((r for r in group if r["budget"] == "full"), None)
        methods = list(dict.fromkeys(r["method"] for r in group if r["budget"] != "full"))
        tag = f"{backend}, {model}" if len(groups) > 1 else backend
        for method in methods or ["none"]:
            pts = ([full] if full else []) + sorted((r for r in group if r["method"] == method and r["budget"] != "full"),
                                                    key=xval, reverse=True)
            budgets.update(xval(r) for r in pts)
            ys = [yval(r) for r in pts]
            if timed:
                err = [[y - (r["ttft_ms_p25"] if r.get("ttft_ms_p25") is not None else y) for y, r in zip(ys, pts)],
                       [(r["ttft_ms_p75"] if r.get("ttft_ms_p75") is not None else y) - y for y, r in zip(ys, pts)]]
                ax1.errorbar([xval(r) for r in pts], ys, yerr=err, marker="o", capsize=3, label=f"{method} ({tag})")
            else:
                ax1.plot([xval(r) for r in pts], ys, marker="o", label=f"{method} ({tag})")
            if not timed and method != "none":
                fr = [r for r in pts if r.get("flop_ratio_ttft") is not None]
                ax2.plot([xval(r) for r in fr], [r["flop_ratio_ttft"] for r in fr], marker="o", label=f"{method} ({tag})")
    ax1.set_xscale("log", base=2)
    ticks = sorted(budgets)
    ax1.set_xticks(ticks, [("full" if t == n_img else str(t)) for t in ticks])
    ax1.minorticks_off()
    ax1.set_xlabel(f"budget b (average visual tokens per decoder layer; full = all {n_img})")
    ax1.set_ylabel("TTFT (ms), median with p25..p75" if timed else "analytic GFLOPs, vision + prefill")
    ax1.set_title("time to first token vs budget" if timed else "analytic cost vs budget")
    if source and max(yval(r) for r in source) > 20 * max(min(yval(r) for r in source), 1e-9):
        ax1.set_yscale("log")
    ax1.grid(True, alpha=0.3, which="both")
    if ax1.lines:
        ax1.legend(fontsize=7)
    if timed:
        pts = [r for r in timed if r.get("speedup_ttft") is not None and r["budget"] != "full"]
        hi = max([r["flop_ratio_ttft"] for r in pts] + [r["speedup_ttft"] for r in pts] + [2.0]) * 1.1
        ax2.plot([1, hi], [1, hi], "k--", lw=1, label="speedup = FLOP ratio")
        ax2.plot([1, hi], [0.8, 0.8 * hi], "k:", lw=1, label="0.8 x FLOP ratio")
        markers = dict(zip(dict.fromkeys(r["backend"] for r in pts), "os^Dv<>p"))
        for backend, method in dict.fromkeys((r["backend"], r["method"]) for r in pts):
            sel = [r for r in pts if r["backend"] == backend and r["method"] == method]
            ax2.scatter([r["flop_ratio_ttft"] for r in sel], [r["speedup_ttft"] for r in sel],
                        marker=markers[backend], label=f"{method} ({backend})")
            for r in sel:
                ax2.annotate(f"b={r['budget']}", (r["flop_ratio_ttft"], r["speedup_ttft"]), fontsize=7,
                             xytext=(4, -3), textcoords="offset points")
        ax2.set_xlabel("analytic FLOP ratio, full / pruned (vision + prefill)")
        ax2.set_ylabel("measured TTFT speedup over full (same run)")
        ax2.set_title("measured speedup vs FLOP ratio")
    else:
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(ticks, [("full" if t == n_img else str(t)) for t in ticks])
        ax2.minorticks_off()
        ax2.set_xlabel("budget b")
        ax2.set_ylabel("analytic FLOP ratio, full / pruned (vision + prefill)")
        ax2.set_title("analytic FLOP ratio vs budget (--cost-only: nothing measured)")
    ax2.grid(True, alpha=0.3)
    if ax2.lines or ax2.collections:
        ax2.legend(fontsize=7)
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(p), dpi=120)
