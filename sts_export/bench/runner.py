"""Benchmark: per-phase latency, memory and analytic cost of pruned vs full models, on any backend.

For every (model, backend, method, budget) this times the one generation loop (`runtime.generate`, through
`Pipeline.generate`) and reports, per phase, the median and spread over `repeats` runs after `warmup` runs:

  vision   vision graph: CLIP encoder + Stage 1 selection + projector  (`Generation.timings["vision"]`)
  prefill  embed + segment1 + prune (Stage 2) + segment2 up to the first logits on the host
  ttft     vision + prefill (time to first token)
  decode   mean seconds per decode step of the same run

Per graph call, a thin wrapper around the backend's `run` adds fine-grained times, and memory is recorded per
timed run (sts_export.bench.timing: TimedBackend, PeakMemory). KV cache bytes come from the cache shapes the run
returned (exact); the *_delta_bytes fields are the rise over the memory in use when the run started. Stage 1 is
also timed on its own ("probe"): the same selection function, exported/compiled alone for the backend in use, on
features of the model's shape, so its share of the pruned TTFT can be read off.

Configurations of one backend run interleaved when their weights fit in memory together (all loaded, warm-ups and
repeats round-robin), so a change in machine load - other processes on a shared host, thermal throttling - hits
every configuration alike and the speedups stay fair; otherwise one after the other (--sequential).
Cost: sts_export.bench.cost (analytic FLOPs/bytes per phase, roofline for --roofline). `--cost-only` needs no weights.

Rows with budget `full` are run once per (model, backend) as method `none` (no pruning: the same graphs for every
method) and serve as the baseline of the speedups: speedup_ttft = ttft(full) / ttft(row), beside
flop_ratio_ttft = FLOPs(vision + prefill, full) / FLOPs(vision + prefill, row).

Here: which backends can run (backend_unavailable), Runner (one loaded configuration), measure_backend, run_bench,
and the interleaved loop scripts share (interleaved_generations). What is measured: options.py; the exports and
pipelines: exports.py; Stage 1 alone: probe.py; rows and ratios: rows.py; the table, JSON and plot: report.py.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import traceback
from typing import Any, Callable, Iterable

import numpy as np

from sts_export.bench.peers import PEERS, add_peer_ratios, load_peer, peer_schemes, peer_unavailable
from sts_export.bench.cost import DEFAULT_TEXT_TOKENS, DTYPE_BYTES
from sts_export.bench.devices import HOST, register_device
from sts_export.artifact.params import param_counts
from sts_export.bench.report import SCHEMA_VERSION
from sts_export.bench.timing import (PeakMemory, TimedBackend, cpu_model, current_memory, detect_device_profile, free_memory, gpu_info, load_average, measure_host, release_memory, stats_ms, system_info)
from sts_export.bench.exports import (_aoti_packages, _export_roots, _no_trt_export, _want_cuda, find_trt_export,
                                      load_pipeline)
from sts_export.bench.options import (PHASES, BenchOptions, Config, _unique, configs_for, configs_per_weights,
                                      default_image, prompt_ids, recipe_of)
from sts_export.bench.probe import stage1_probe
from sts_export.bench.rows import _export_weight_bytes, add_ratios, cost_fields, cost_row
from sts_export.errors import StsError
from sts_export.export.aoti import check_aoti_device
from sts_export.families.llava import load_image

def backend_unavailable(backend: str, opts: BenchOptions) -> str | None:
    """Why a backend cannot run here (None when it can)."""
    if backend in PEERS:
        return peer_unavailable(backend, opts, _want_cuda(opts))
    if backend == "ort" and importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)"
    if backend == "trt":
        from sts_export.backends.tensorrt.discovery import require_tensorrt

        try:
            require_tensorrt()
        except StsError as e:
            return str(e)
        import torch

        if not torch.cuda.is_available():
            return "TensorRT needs a CUDA GPU; torch sees none"
    if backend == "aoti":

        try:
            check_aoti_device("cuda" if _want_cuda(opts) else "cpu")
        except StsError as e:
            return str(e)
    if backend == "torch-compile" and not _want_cuda(opts):
        if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
            return "torch.compile on CPU needs a C++ compiler (g++/clang++) for inductor; none found"
    return None


def interleaved_generations(pipes: dict[str, Any], rounds: int, new_tokens: int,
                            warmup_tokens: int = 4) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pipelines of one model (label -> Pipeline) timed against each other in one process: one warm-up generation
    each (creates every session), then `rounds` rounds that run every pipeline once, in the order given, on the
    bench's image and pseudo-prompt (DEFAULT_TEXT_TOKENS text ids around the image).
    -> (label -> seconds [rounds, len(PHASES)], label -> the last round's greedy tokens [B, n])."""
    first = next(iter(pipes.values()))
    ids, img = prompt_ids(first, "", DEFAULT_TEXT_TOKENS), default_image(first.recipe)
    for p in pipes.values():
        p.generate(img, input_ids=ids, max_new_tokens=warmup_tokens)
    times: dict[str, list[list[float]]] = {k: [] for k in pipes}
    tokens: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for label, p in pipes.items():
            g = p.generate(img, input_ids=ids, max_new_tokens=new_tokens)
            times[label].append([g.timings[ph] for ph in PHASES])
            tokens[label] = g.tokens
    return {k: np.array(v) for k, v in times.items()}, tokens




class Runner:
    """One loaded configuration: its pipeline wrapped for timing, its inputs, and the samples taken so far."""

    def __init__(self, model: str, recipe: Any, cfg: Config, backend: str, opts: BenchOptions, image: Any) -> None:
        self.model, self.cfg, self.backend, self.opts = model, cfg, backend, opts
        self.cuda = _want_cuda(opts)
        self.pipe = load_pipeline(model, recipe, cfg, backend, opts)
        self.recipe = self.pipe.recipe
        self.image = self.pipe.prepare_image(image)  # the family's vision-graph inputs
        self.weight_bytes = _export_weight_bytes(self.pipe.source) if backend in ("ort", "trt") else None
        self.ids = prompt_ids(self.pipe, opts.prompt, opts.text_tokens)
        events = self.cuda and backend in ("torch", "torch-compile", "trt", "aoti")
        self.timed = TimedBackend(self.pipe.backend, self.recipe.eos_token_id if opts.ignore_eos else None, events)
        self.pipe.backend = self.timed
        self.mem = PeakMemory(self.cuda and backend != "ort")
        self.samples: dict[str, list[float]] = {ph: [] for ph in PHASES}
        self.per_graph: dict[str, list[float]] = {}
        self.peak_rss = self.peak_gpu = 0
        self.delta_rss = self.delta_gpu = 0
        self.gen: Any = None

    def run(self, record: bool) -> None:
        """One generation; with record, its timings and peak memory are kept."""
        if record:
            rss0, gpu0 = current_memory(self.mem.cuda)
            self.mem.start()
        gen = self.pipe.generate(self.image, input_ids=self.ids, max_new_tokens=self.opts.max_new_tokens)
        calls = self.timed.take_calls()
        if not record:
            return
        rss, gpu = self.mem.stop()
        self.peak_rss, self.delta_rss = max(self.peak_rss, rss), max(self.delta_rss, rss - rss0)
        if gpu is not None:
            self.peak_gpu, self.delta_gpu = max(self.peak_gpu, gpu), max(self.delta_gpu, gpu - (gpu0 or 0))
        self.gen = gen
        for ph in PHASES:
            self.samples[ph].append(gen.timings[ph])
        totals: dict[str, float] = {}
        for label, secs in calls:
            totals[label] = totals.get(label, 0.0) + secs
        n_dec = max(gen.tokens.shape[1] - 1, 1)
        for label, secs in totals.items():  # per run; decode graphs per decode step
            self.per_graph.setdefault(label, []).append(secs / n_dec if label.endswith("_decode") else secs)

    def row(self) -> dict[str, Any]:
        """The row of this configuration from the samples recorded so far (runs the Stage 1 probe)."""
        opts, cfg, gen, plan = self.opts, self.cfg, self.gen, self.pipe.plan
        s1_samples, s1_note = stage1_probe(self.pipe, cfg, self.backend, opts) if opts.stage1_probe else ([], None)
        torch_backend = self.backend in ("torch", "torch-compile")
        dtype_bytes = DTYPE_BYTES[opts.dtype] if torch_backend else np.dtype(plan.dtype).itemsize
        per_entry = 2 * plan.num_kv_heads * plan.head_dim * dtype_bytes  # K and V of one token in one layer
        lengths = gen.cache_lengths  # entries per segment after prefill, read off the returned cache tensors
        batch = self.image.batch
        kv = batch * per_entry * (plan.prune_layer * lengths.get("segment1", 0)
                                  + (plan.num_layers - plan.prune_layer) * lengths.get("segment2", 0))
        text_tokens = int(len(self.ids) - 1)
        n_tok = int(gen.tokens.shape[1])
        row: dict[str, Any] = {
            "model": self.model, "recipe": self.recipe.name, "method": cfg.method, "budget": cfg.budget,
            "backend": self.backend, "dtype": opts.dtype, "device": _device_name(self.backend, self.cuda, self.pipe),
            "weights": cfg.weights(opts.dtype),
            **({"graph_form": _graph_form(self.timed.inner)} if self.backend == "ort" else {}),
            # K, K' this image got (read off the run; for image-dependent N the export's own are K_max, K'_max)
            "k_pre": int(gen.keep_pre.shape[1]),
            "k_post": int(gen.keep_post.shape[1]) if gen.keep_post is not None else int(gen.keep_pre.shape[1]),
            "prune_layer": plan.prune_layer, "text_tokens": text_tokens,
            "seq_len_stage1": gen.s1, "seq_len_stage2": gen.s2, "kv_cache_bytes": int(kv),
            "kv_cache_bytes_final": int(kv + batch * per_entry * plan.num_layers * max(n_tok - 1, 0)),
            "keep_pre_shape": list(gen.keep_pre.shape),
            "keep_post_shape": None if gen.keep_post is None else list(gen.keep_post.shape),
            "repeats": opts.repeats, "warmup": opts.warmup, "max_new_tokens": opts.max_new_tokens,
            "decode_steps": max(n_tok - 1, 0), "ignore_eos": opts.ignore_eos,
        }
        for ph in PHASES:
            for k, v in stats_ms(self.samples[ph]).items():
                row[f"{ph}_ms_{k}"] = v if ph != "decode" or n_tok >= 2 else None
        s1st = stats_ms(s1_samples)
        row["stage1_ms_median"], row["stage1_ms_iqr"] = s1st["median"], s1st["iqr"]
        row["stage1_share_ttft"] = s1st["median"] / row["ttft_ms_median"] if s1st["median"] is not None else None
        if s1_note:
            row["stage1_note"] = s1_note
        gpu = self.peak_gpu if self.mem.cuda else None
        row.update(peak_rss_bytes=int(self.peak_rss), peak_rss_delta_bytes=int(self.delta_rss), peak_gpu_bytes=gpu,
                   peak_gpu_delta_bytes=int(self.delta_gpu) if self.mem.cuda else None,
                   peak_mem_bytes=int(gpu if gpu is not None else self.peak_rss))
        row["graph_ms_median"] = {k: stats_ms(v)["median"] for k, v in self.per_graph.items()}
        row["samples_ms"] = {ph: [x * 1e3 for x in self.samples[ph]] for ph in PHASES}
        if s1_samples:
            row["samples_ms"]["stage1"] = [x * 1e3 for x in s1_samples]
        size = tuple(self.image.size) if self.recipe.image_processor.max_pixels else None  # Qwen: this image's N
        row.update(cost_fields(self.recipe, cfg.method, cfg.budget, opts.dtype, text_tokens,
                               max(n_tok - 2, 0) // 2, opts.roofline, opts.roofline_file, size,
                               scheme=cfg.scheme, new_tokens=opts.max_new_tokens))
        row["weight_bytes"] = self.weight_bytes if self.weight_bytes is not None else row["weight_bytes_analytic"]
        row["weight_bytes_source"] = "export files" if self.weight_bytes is not None else "analytic"
        if self.backend == "aoti":  # per graph: compile seconds and package bytes
            row["aoti_packages"] = _aoti_packages(self.pipe.source)
        if size is not None:
            row["image_size"], row["n_tokens"] = list(size), int(self.image.n)
        return row

    def close(self) -> None:
        self.pipe.backend = self.timed.inner
        self.pipe = self.timed = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------------------------- measuring a backend
def weight_bytes(recipe: Any, dtype: str) -> int:
    """Bytes of the weights one loaded configuration holds (vision layers used, projector, decoder, embeddings)."""
    p = param_counts(recipe)
    return (p["vision"] + p["projector"] + p["decoder"] + p["lm_head"] + p["embed"]) * DTYPE_BYTES[dtype]


def check_fits(recipe: Any, opts: BenchOptions) -> None:
    """Refuse a configuration whose weights alone exceed the free memory (rather than being OOM-killed)."""
    need = weight_bytes(recipe, opts.dtype)
    free, what = free_memory(_want_cuda(opts))
    if need > 0.9 * free:
        raise StsError(f"{recipe.name} at {opts.dtype} needs {need / 1e9:.1f} GB for its weights alone, but only "
                       f"{free / 1e9:.1f} GB of {what} is left; use --dtype fp16, a GPU, or the synthetic "
                       f"CPU-sized recipe llava-1.5-7b-cpu")


def interleave_fits(recipe: Any, n_configs: int, opts: BenchOptions) -> bool:
    """Whether every configuration of a backend can be loaded at once (weights x configs < half the memory)."""
    return weight_bytes(recipe, opts.dtype) * n_configs * 1.5 < 0.5 * free_memory(_want_cuda(opts))[0]


def measure_backend(model: str, recipe: Any, configs: list[Config], backend: str, opts: BenchOptions, image: Any,
                    interleave: bool, peers: Iterable[str] = (),
                    peer_errors: list[tuple[str, BaseException, str]] | None = None) -> list[dict[str, Any]]:
    """Rows for every configuration of one backend, and of the `peers` (sts_export.bench.peers) measured with them.
    Interleaved: all loaded, warm-ups and repeats round-robin (so a change in machine load hits every configuration
    and peer alike); else one after the other. A peer that fails (to load or to run) is dropped and reported in
    `peer_errors` as (peer, exception, traceback); the other rows are kept."""
    cuda = _want_cuda(opts)
    check_fits(recipe, opts)
    loaders: list[tuple[str, str | None, Callable[[], Any]]] = [  # (label, peer or None, load)
        (f"{cfg.method} b={cfg.budget} (K={cfg.k_pre}, K'={cfg.k_post})" + (f" {cfg.form}" if cfg.form != "auto" else ""),
         None,
         lambda cfg=cfg: Runner(model, recipe, cfg, backend, opts, image)) for cfg in configs]
    loaders += [(f"peer {p}" + (f" {sch.label}" if sch is not None else ""), p,
                 lambda p=p, sch=sch: load_peer(p, model, recipe, opts, image, cuda, _export_roots(opts)[0], sch))
                for p in peers for sch in peer_schemes(p, opts)]

    def guarded(peer: str | None, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """(True, fn()); for a peer, (False, None) when fn raises (the error kept in peer_errors)."""
        if peer is None or peer_errors is None:
            return True, fn()
        try:
            return True, fn()
        except Exception as e:  # noqa: BLE001 - a failing peer must not lose our rows
            peer_errors.append((peer, e, traceback.format_exc()))
            opts.progress(f"  peer {peer} failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
            return False, None

    rows: list[dict[str, Any]] = []
    if interleave:
        runners: list[tuple[str | None, Any]] = []

        def run_all(record: bool) -> None:
            for peer, r in list(runners):
                if not guarded(peer, lambda: r.run(record=record))[0]:
                    runners.remove((peer, r))
                    r.close()

        try:
            for label, peer, fn in loaders:
                opts.progress(f"{model} | {backend} | loading {label}")
                ok, r = guarded(peer, fn)
                if ok:
                    runners.append((peer, r))
            for _ in range(opts.warmup):
                run_all(False)
            for i in range(opts.repeats):
                opts.progress(f"{model} | {backend} | round {i + 1}/{opts.repeats}")
                run_all(True)
            for _, r in runners:
                rows.append(r.row())
                _progress_row(opts, rows[-1])
        finally:
            for _, r in runners:
                r.close()
            runners.clear()
            release_memory(cuda)
        return rows
    for label, peer, fn in loaders:
        opts.progress(f"{model} | {backend} | {label} ...")
        ok, runner = guarded(peer, fn)
        if not ok:
            continue
        try:
            def measure() -> dict[str, Any]:
                for _ in range(opts.warmup):
                    runner.run(record=False)
                for _ in range(opts.repeats):
                    runner.run(record=True)
                return runner.row()

            ok, row = guarded(peer, measure)
            if ok:
                rows.append(row)
                _progress_row(opts, rows[-1])
        finally:
            runner.close()
            runner = None
            release_memory(cuda)
    return rows


def _progress_row(opts: BenchOptions, row: dict[str, Any]) -> None:
    def ms(ph: str) -> str:
        v = row[f"{ph}_ms_median"]
        return "-" if v is None else f"{v:.1f}"

    who = f"peer {row['backend']} {row['weights']} ({row['scope']})" if row.get("peer") else f"{row['method']} b={row['budget']}"
    opts.progress(f"  {who}: ttft {ms('ttft')} ms (vision {ms('vision')}, prefill {ms('prefill')}), decode "
                  f"{ms('decode')} ms/token")


def _graph_form(backend: Any) -> str:
    """The ORT backend's decoder graphs and cache as they ran: ort/in-place, ort/concat or portable/concat."""
    form = backend.form
    return f"{form}/{'in-place' if form == 'ort' and backend.inplace else 'concat'}"


def _device_name(backend: str, cuda: bool, pipe: Any) -> str:
    if backend == "ort":
        return getattr(getattr(pipe.backend, "inner", pipe.backend), "device_type", "cpu")
    return "cuda" if cuda else "cpu"


# ----------------------------------------------------------------------------------------------- driver
def _trt_configs(recipe: Any, configs: list[Config], opts: BenchOptions, skipped: list[dict[str, Any]],
                 notes: list[str]) -> list[Config]:
    """The configurations that have a TensorRT export (engines are built by export.py, not here)."""
    keep = []
    for cfg in configs:
        if find_trt_export(recipe, cfg, opts):
            keep.append(cfg)
            continue
        why = _no_trt_export(f"{cfg.method} b={cfg.budget}", opts)
        notes.append(f"trt {cfg.method} b={cfg.budget} skipped: {why}")
        skipped.append({"model": cfg.model, "method": cfg.method, "budget": cfg.budget, "backend": "trt", "reason": why})
    return keep


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """All configurations -> {"schema_version", "system", "options", "rows", "skipped", "notes"}."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    notes: list[str] = []
    if opts.threads is not None and not opts.cost_only:
        import torch

        torch.set_num_threads(opts.threads)
    system = system_info()
    system["load_average_start"] = load_average()
    image = opts.image
    if image is not None:

        image = load_image(image)
    on_device = None
    if opts.roofline == HOST:  # this machine, measured now: the roofline of every row is its own
        opts.progress("measuring this machine (--roofline host): memory read bandwidth and fp32 GEMM throughput ...")
        dev = measure_host(opts.threads)
        register_device(dev)
        system["host_profile"] = dataclasses.asdict(dev)
        opts.progress(f"  host: {dev.bandwidth_gbs:.1f} GB/s read, {dev.fp32_tflops * 1e3:.0f} GFLOP/s fp32")
        on_device = HOST if not opts.cost_only else None
    elif opts.roofline is not None and not opts.cost_only:
        if opts.on_device or detect_device_profile() == opts.roofline:
            on_device = opts.roofline
        else:
            notes.append(f"roofline for --roofline {opts.roofline}; measured/bound is reported only on that device "
                         f"(this machine: {', '.join(g['name'] for g in gpu_info()) or cpu_model()}; "
                         "pass --on-device if the profile describes it)")
    for model in opts.models:
        recipe = recipe_of(model)
        if opts.cost_only:
            for cfg in configs_per_weights(configs_for(recipe, model, opts.methods, opts.budgets, skipped, "analytic"),
                                    opts, "analytic", skipped, notes):
                rows.append(cost_row(model, recipe, cfg, opts, image))
            continue
        img = image if image is not None else default_image(recipe)
        peer_errors: list[tuple[str, BaseException, str]] = []
        pending: list[str] = []  # peers that can run: they join the round-robin of the first of our backends that runs
        for backend in opts.backends:
            why = backend_unavailable(backend, opts)
            if why:
                notes.append(f"backend {backend} skipped: {why}")
                skipped.append({"model": model, "backend": backend, "reason": why})
                opts.progress(f"skip {backend}: {why}")
                continue
            if backend in PEERS:
                pending.append(backend)
                continue
            configs = configs_per_weights(configs_for(recipe, model, opts.methods, opts.budgets, skipped, backend), opts,
                                   backend, skipped, notes)
            if backend == "trt":
                configs = _trt_configs(recipe, configs, opts, skipped, notes)
            if not configs:
                continue
            interleave = (opts.interleave if opts.interleave is not None
                          else interleave_fits(recipe, len(configs) + len(pending), opts))
            if interleave and len(configs) + len(pending) > 1:
                notes.append(f"{model} {backend}: configurations interleaved (all loaded; warm-ups and repeats "
                             "round-robin); peak RSS/GPU include every loaded configuration, *_delta_bytes do not")
            if pending:
                notes.append(f"{model}: peers {', '.join(pending)} measured with {backend}'s configurations "
                             f"({'in the same round-robin' if interleave else 'one after the other'})")
            try:
                rows += measure_backend(model, recipe, configs, backend, opts, img, interleave, pending, peer_errors)
                pending = []
            except StsError as e:
                if backend != "trt":  # a user-facing problem (missing weights, bad option): stop with one line
                    raise
                notes.append(f"backend trt skipped: {e}")
                skipped.append({"model": model, "backend": backend, "reason": str(e)})
            except Exception as e:  # noqa: BLE001 - a failing backend must not lose the other backends' rows
                why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                notes.append(f"backend {backend} FAILED on {model}: {why} (--json FILE keeps the traceback under 'failures')")
                failures.append({"model": model, "backend": backend, "error": why,
                                 "traceback": traceback.format_exc()})
                opts.progress(f"  {backend} failed: {why}")
        if pending:  # no backend of ours ran: the peers alone
            interleave = opts.interleave if opts.interleave is not None else interleave_fits(recipe, len(pending), opts)
            try:
                rows += measure_backend(model, recipe, [], "peers", opts, img, interleave, pending, peer_errors)
            except Exception as e:  # noqa: BLE001 - as for a backend of ours
                peer_errors.append((", ".join(pending), e, traceback.format_exc()))
        for peer, e, tb in peer_errors:
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            notes.append(f"peer {peer} FAILED on {model}: {why} (--json FILE keeps the traceback under 'failures')")
            failures.append({"model": model, "backend": peer, "error": why, "traceback": tb})
    add_ratios(rows, on_device)
    add_peer_ratios(rows)
    for s in skipped:
        if "method" in s and s.get("backend") in ("*", "analytic", opts.backends[0]):
            notes.append(f"{s['method']} b={s['budget']} skipped: {s['reason']}")
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k != "progress"}
    system["load_average_end"] = load_average()
    busy = max(system["load_average_start"] or [0])
    if not opts.cost_only and busy > (system["cpu_affinity"] or system["cpu_cores_logical"] or 1) + 0.5:
        notes.append(f"the machine was busy before the run (1/5/15-min load average {system['load_average_start']} "
                     f"on {system['cpu_affinity'] or system['cpu_cores_logical']} cores): other processes competed "
                     "for the CPU, so absolute timings are noisy; interleaving keeps the ratios fair")
    return {"schema_version": SCHEMA_VERSION, "system": system, "options": options, "rows": rows,
            "skipped": skipped, "failures": failures, "notes": _unique(notes)}
