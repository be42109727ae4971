"""Peers: other runtimes timed beside ours on the same weights, inputs and repeats, so that every speedup can be
read against them (bench.py --backends transformers,ort-genai,...).

  transformers  the family's own transformers class (LlavaForConditionalGeneration,
                LlavaNextForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                Qwen3VLForConditionalGeneration; sdpa attention) loaded from the checkpoint our rows use
                (--random-weights: the same seeded weights, which the synthetic checkpoint of the recipe holds,
                written once into the cache). One forward with the image and the prompt is its TTFT: vision is the
                time spent inside its `get_image_features` during that forward, prefill the rest. Decode: greedy,
                one forward per token on the KV cache that forward returned.
  ort-genai     onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder`) run on the recipe's
                text decoder: a LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM directory with the recipe's
                text dimensions and the checkpoint's language-model weights, built once per recipe, dtype and
                weights beside the exports. With --weights int8/int4 it is built once more per scheme (`-p int4
                --extra_options block_size=<ours> accuracy_level=<ours>`: the same block size and compute as our
                MatMulNBits), and our quantized rows are read against that row, our float rows against its float
                one. Timed on S random ids, S = our full prefill length (`Generator.append_tokens`, the first token
                included), then `generate_next_token` steps. It has no vision: its rows are marked scope "decoder
                only" and hold prefill and decode, no vision and no TTFT.

Both decode max_new_tokens tokens per run with EOS masked (as our rows with --keep-eos off), and time their phases
with sts_export.bench.timing's `timed_call` / `stats_ms`. Each peer is Runner-like (`run(record)`, `row()`,
`close()`), so it joins the round-robin of our configurations (runner.measure_backend) and machine-load changes hit
it alike. A peer that is not installed is skipped with one note (`peer_unavailable`); `.[peers]` installs them.
`add_peer_ratios` gives every one of our rows its speedup over each peer's phase (peer ms / our ms).
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sts_export.bench.cost import DTYPE_BYTES, kv_cache_bytes
from sts_export.bench.exports import _recipe_digest
from sts_export.bench.options import PHASES, prompt_ids
from sts_export.bench.rows import cost_fields
from sts_export.bench.timing import PeakMemory, current_memory, stats_ms, timed_call
from sts_export.errors import StsError
from sts_export.checkpoint import Source, _safetensors_files, ensure_synthetic, key_map, load_model, resolve
from sts_export.families import family_module
from sts_export.tokenizer import TextTokenizer, build_synthetic_tokenizer, split_ids

PEERS = ("transformers", "ort-genai")  # canonical names (options.BACKENDS maps the CLI's aliases onto them)
SCOPE = {"transformers": "full model", "ort-genai": "decoder only"}
HF_CLASSES = {"llava-1.5": "LlavaForConditionalGeneration", "llava-next": "LlavaNextForConditionalGeneration",
              "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration", "qwen3-vl": "Qwen3VLForConditionalGeneration"}
# the text decoder ort-genai's builder gets, per family: (architecture, model_type). Qwen3-VL's text model is a
# Qwen3 decoder (q/k RMSNorm, explicit head_dim) whose M-RoPE is plain RoPE on text ids: Qwen3ForCausalLM
DECODERS = {"llava-1.5": ("LlamaForCausalLM", "llama"), "llava-next": ("LlamaForCausalLM", "llama"),
            "qwen2.5-vl": ("Qwen2ForCausalLM", "qwen2"), "qwen3-vl": ("Qwen3ForCausalLM", "qwen3")}
# our rows' phases each peer is compared on: speedup_<phase>_vs_<peer> = peer median / our median
RATIO_PHASES = {"transformers": ("ttft", "prefill", "decode"), "ort-genai": ("prefill", "decode")}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def peer_schemes(peer: str, opts: Any) -> list[Any]:
    """The weights each peer runs, one row per entry: None (the dtype's float weights) for transformers; for
    ort-genai also every --weights int8/int4 as our ONNX Runtime rows quantize them (export.weights.Scheme)."""
    from sts_export.export.weights import check_weights

    out: list[Any] = [None]
    if peer == "ort-genai":
        out += [check_weights(w, opts.block_size, dtype=opts.dtype, accuracy_level=opts.accuracy_level)
                for w in opts.weights if w in ("int8", "int4")]
    return out


def peer_unavailable(peer: str, opts: Any, cuda: bool = False) -> str | None:
    """Why a peer cannot run here (None when it can): a one-line note."""
    if peer == "transformers":
        if importlib.util.find_spec("transformers") is None:
            return "transformers is not installed (pip install -e '.[peers]')"
        return None
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return "onnxruntime-genai is not installed (pip install -e '.[peers]')"
    if opts.dtype == "bf16" or opts.dtype == "fp16" and not cuda:
        return (f"onnxruntime-genai's model builder has no {opts.dtype} for the "
                f"{'CUDA' if cuda else 'CPU'} execution provider (CPU: fp32; CUDA: fp32, fp16)")
    return None


# ----------------------------------------------------------------------------------------------- inputs
class _Prompting:
    """What options.prompt_ids reads off a pipeline: the recipe, its tokenizer (or None) and `encode`."""

    def __init__(self, recipe: Any, tokenizer: Any) -> None:
        self.recipe, self.tokenizer = recipe, tokenizer

    def encode(self, prompt: str) -> Any:
        return self.tokenizer.encode_prompt(prompt)


def peer_source(model: str, recipe: Any, opts: Any) -> tuple[Path, bool]:
    """(checkpoint directory with the weights our rows run, whether it has the tokenizer our rows use).

    --random-weights: our rows draw the recipe's seeded weights (checkpoint.init_random_); the recipe's synthetic
    checkpoint holds exactly those (save_checkpoint draws them the same way), so it is generated once into the cache.
    Our rows tokenize --prompt only when the checkpoint they load has a tokenizer (never with --random-weights)."""

    src = resolve(model, None, opts.random_weights)
    if src.path is None:
        return ensure_synthetic(src.recipe), False
    return Path(src.path), (Path(src.path) / "tokenizer.json").is_file()


def peer_prompt(recipe: Any, opts: Any, path: Path | None, tokenized: bool) -> Any:
    """The prompt (prefix, suffix ids around the image token) our rows run, as a tokenizer.Prompt: --prompt through
    the checkpoint's tokenizer when `tokenized`, else options.prompt_ids' pseudo-prompt."""

    tok = TextTokenizer(path, recipe) if tokenized and path is not None else None
    return split_ids(prompt_ids(_Prompting(recipe, tok), opts.prompt, opts.text_tokens), recipe)


# ----------------------------------------------------------------------------------------------- rows
def _peer_row(peer: str, model: str, recipe: Any, opts: Any, device: str, text_tokens: int, n_full: int,
              samples: dict[str, list[float]], mem: tuple[int, int, int | None], image_size: Any,
              weights: str | None = None) -> dict[str, Any]:
    """A peer's row: the schema's keys (runner.cost_fields at budget full, no pruning) and its timings."""

    s1 = text_tokens + n_full
    n_tok = opts.max_new_tokens
    row: dict[str, Any] = {
        "model": model, "recipe": recipe.name, "method": "none", "budget": "full", "backend": peer,
        "scope": SCOPE[peer], "peer": True, "dtype": opts.dtype, "device": device, "weights": weights or opts.dtype,
        "k_pre": n_full, "k_post": n_full, "prune_layer": recipe.pruning.prune_layer, "text_tokens": text_tokens,
        "seq_len_stage1": s1, "seq_len_stage2": s1,
        "kv_cache_bytes": kv_cache_bytes(recipe, s1, s1, DTYPE_BYTES[opts.dtype]),
        "kv_cache_bytes_final": kv_cache_bytes(recipe, s1 + n_tok - 1, s1 + n_tok - 1, DTYPE_BYTES[opts.dtype]),
        "repeats": opts.repeats, "warmup": opts.warmup, "max_new_tokens": n_tok, "decode_steps": n_tok - 1,
        "ignore_eos": opts.ignore_eos,
    }
    for ph in PHASES:
        for k, v in stats_ms(samples.get(ph, [])).items():
            row[f"{ph}_ms_{k}"] = v if ph != "decode" or n_tok >= 2 else None
    row.update(stage1_ms_median=None, stage1_ms_iqr=None, stage1_share_ttft=None)
    peak_rss, delta_rss, peak_gpu = mem
    row.update(peak_rss_bytes=int(peak_rss), peak_rss_delta_bytes=int(delta_rss), peak_gpu_bytes=peak_gpu,
               peak_mem_bytes=int(peak_gpu if peak_gpu is not None else peak_rss), graph_ms_median={},
               samples_ms={ph: [x * 1e3 for x in v] for ph, v in samples.items()})
    row.update(cost_fields(recipe, "none", "full", opts.dtype, text_tokens, max(n_tok - 2, 0) // 2, opts.roofline,
                           opts.roofline_file, image_size, new_tokens=n_tok))
    row["weight_bytes"], row["weight_bytes_source"] = row["weight_bytes_analytic"], "analytic"
    return row


class _Memory:
    """Peak RSS / GPU memory over the recorded runs (timing.PeakMemory), as Runner keeps it."""

    def __init__(self, cuda: bool) -> None:
        self.mem = PeakMemory(cuda)
        self.peak_rss = self.delta_rss = 0
        self.peak_gpu: int | None = None
        self._start = (0, None)

    def start(self) -> None:
        self._start = current_memory(self.mem.cuda)
        self.mem.start()

    def stop(self) -> None:
        rss, gpu = self.mem.stop()
        self.peak_rss, self.delta_rss = max(self.peak_rss, rss), max(self.delta_rss, rss - self._start[0])
        if gpu is not None:
            self.peak_gpu = max(self.peak_gpu or 0, gpu)

    def value(self) -> tuple[int, int, int | None]:
        return self.peak_rss, self.delta_rss, self.peak_gpu


class _Peer:
    """What both peers share: one run = `generate()` (tokens, seconds per phase); recorded runs add samples and
    peak memory, warm-ups only the tokens (Runner's `run(record)` contract)."""

    samples: dict[str, list[float]]
    mem: _Memory
    tokens: np.ndarray | None

    def generate(self) -> tuple[np.ndarray, dict[str, float]]:
        raise NotImplementedError

    def run(self, record: bool) -> None:
        if record:
            self.mem.start()
        self.tokens, t = self.generate()
        if not record:
            return
        self.mem.stop()
        for ph, v in t.items():
            self.samples[ph].append(v)


# ----------------------------------------------------------------------------------------------- transformers
class TransformersPeer(_Peer):
    """transformers' own model of the family (sdpa) on our weights, image and prompt; Runner-like."""

    name = "transformers"

    def __init__(self, model: str, recipe: Any, opts: Any, image: Any, cuda: bool) -> None:
        import torch
        import transformers


        self.model, self.recipe, self.opts, self.cuda = model, recipe, opts, cuda
        path, tokenized = peer_source(model, recipe, opts)
        self.device = torch.device("cuda" if cuda else "cpu")
        cls = getattr(transformers, HF_CLASSES[recipe.family])
        self.hf = cls.from_pretrained(path, dtype=getattr(torch, TORCH_DTYPES[opts.dtype]),
                                      attn_implementation="sdpa").eval().to(self.device)
        self.image = family_module(recipe.family).prepare_image(image, recipe)  # = our rows' host preprocessing
        self.prompt = peer_prompt(recipe, opts, path, tokenized)
        self.inputs = hf_inputs(recipe, self.image, self.prompt, self.device)
        self._sync = torch.cuda.synchronize if cuda else None
        self._vision: list[float] = []
        features = self.hf.model.get_image_features  # its forward calls self.get_image_features: time it there

        def timed_features(*args: Any, **kwargs: Any) -> Any:
            if self._sync is not None:
                self._sync()
            out, secs = timed_call(lambda: features(*args, **kwargs), self._sync)
            self._vision.append(secs)
            return out

        self.hf.model.get_image_features = timed_features
        params = inspect.signature(self.hf.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # as its generate() prefills
        self.samples: dict[str, list[float]] = {"vision": [], "prefill": [], "ttft": [], "decode": []}
        self.mem = _Memory(cuda)
        self.tokens: np.ndarray | None = None
        self.first_logits: np.ndarray | None = None

    def _next(self, logits: Any) -> Any:
        last = logits[:, -1, :].float()
        if self.opts.ignore_eos:
            last[:, self.recipe.eos_token_id] = -float("inf")
        return last.argmax(-1, keepdim=True)

    def generate(self) -> tuple[np.ndarray, dict[str, float]]:
        """One run: (greedy tokens [1, max_new_tokens], seconds of vision, prefill, ttft, decode per token)."""
        import torch

        n_new = self.opts.max_new_tokens
        self._vision.clear()
        with torch.inference_mode():
            if self._sync is not None:
                self._sync()
            out, ttft = timed_call(lambda: self.hf(**self.inputs, use_cache=True, **self._keep), self._sync)
            cache = out.cache if "cache" in out else out.past_key_values  # the name moved in transformers 5.x
            self.first_logits = out.logits[:, -1, :].float().cpu().numpy()
            nxt = self._next(out.logits)

            def decode() -> list[Any]:
                toks, t = [nxt], nxt
                for _ in range(n_new - 1):
                    o = self.hf(input_ids=t, use_cache=True, **{self._cache_kw: cache})
                    t = self._next(o.logits)
                    toks.append(t)
                return toks

            toks, dec = timed_call(decode, self._sync)
        vision = sum(self._vision)
        tokens = torch.cat(toks, dim=1).cpu().numpy()
        return tokens, {"vision": vision, "prefill": ttft - vision, "ttft": ttft, "decode": dec / max(n_new - 1, 1)}

    def row(self) -> dict[str, Any]:
        size = tuple(self.image.size) if self.recipe.image_processor.max_pixels else None
        row = _peer_row(self.name, self.model, self.recipe, self.opts, self.device.type,
                        len(self.prompt.prefix) + len(self.prompt.suffix), self.image.n_full, self.samples,
                        self.mem.value(), size)
        row["attn_implementation"] = "sdpa"
        row["transformers_class"] = HF_CLASSES[self.recipe.family]
        if size is not None:
            row["image_size"], row["n_tokens"] = list(size), int(self.image.n)
        return row

    def close(self) -> None:
        self.hf = self.inputs = None


def hf_inputs(recipe: Any, image: Any, prompt: Any, device: Any) -> dict[str, Any]:
    """The transformers model's prefill inputs from our ImageInput and Prompt (the image token repeated once per
    image token it splices in, as its processor writes them)."""
    import torch

    ids = np.concatenate([prompt.prefix, np.full(image.n_full, recipe.image_token_id, np.int64), prompt.suffix])
    input_ids = torch.from_numpy(ids[None]).to(device)
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    px = torch.from_numpy(image.feeds["pixel_values"]).to(device)
    if recipe.family == "llava-next":  # [T, 3, H, W] tiles of one image; image_sizes (height, width)
        out.update(pixel_values=px[None], image_sizes=torch.tensor([[image.size[1], image.size[0]]], device=device))
    elif recipe.family in ("qwen2.5-vl", "qwen3-vl"):  # patches [Np, 1176 | 1536], grid_thw, M-RoPE's token types
        out.update(pixel_values=px, image_grid_thw=torch.tensor([list(image.grid)], device=device),
                   mm_token_type_ids=(input_ids == recipe.image_token_id).int())
    else:
        out["pixel_values"] = px
    return out


# ----------------------------------------------------------------------------------------------- ort-genai
def _weights_key(path: Path, random_weights: bool) -> str:
    """What the decoder's weights are, for the cache key: seeded random, or the checkpoint's files (name, size,
    mtime)."""
    if random_weights:
        return "rw"
    files = sorted(path.glob("*.safetensors"))
    desc = [str(path.resolve())] + [f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files]
    return hashlib.sha256("\n".join(desc).encode()).hexdigest()[:10]


def decoder_config(recipe: Any) -> dict[str, Any]:
    """The transformers config of the recipe's text decoder alone (LlamaForCausalLM / Qwen2ForCausalLM)."""
    arch, model_type = DECODERS[recipe.family]
    t = recipe.text
    cfg = {
        "architectures": [arch], "model_type": model_type, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
        "vocab_size": t.vocab_size, "max_position_embeddings": max(t.max_position_embeddings, recipe.max_context),
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": t.tie_word_embeddings, "bos_token_id": recipe.bos_token_id,
        "eos_token_id": recipe.eos_token_id, "pad_token_id": recipe.pad_token_id, "torch_dtype": "float32",
    }
    if model_type in ("llama", "qwen3"):
        cfg["attention_bias"] = t.attention_bias
    return cfg


def decoder_state(model: str, recipe: Any, opts: Any, path: Path) -> dict[str, Any]:
    """The language model's weights as LlamaForCausalLM / Qwen2ForCausalLM names (model.*, lm_head.weight), read
    from the checkpoint (float32) with our key map; --random-weights: the same seeded weights our rows draw."""
    import torch
    from safetensors import safe_open


    def hf_name(ours: str) -> str | None:
        if ours.startswith(("vision.", "projector.", "image_newline")):
            return None
        return ours if ours.startswith("lm_head.") else "model." + ours

    if opts.random_weights:
        m = load_model(Source(recipe, None))
        state = {hf_name(k): v.contiguous() for k, v in m.state_dict().items() if hf_name(k)}
        if recipe.text.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return state
    config = json.loads((path / "config.json").read_text())
    ours = key_map(config.get("model_type") or "llava", config)
    state: dict[str, Any] = {}
    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                name = ours(key)
                hf = hf_name(name) if name else None
                if hf:
                    state[hf] = sf.get_tensor(key).to(torch.float32).contiguous()
    return state


def builder_precision(opts: Any, scheme: Any) -> list[str]:
    """The builder's precision arguments: -p <dtype>, or -p int8|int4 with our scheme's block size and
    accuracy_level (its MatMulNBits options; symmetric RTN is its default, as ours)."""
    if scheme is None:
        return ["-p", opts.dtype]
    return ["-p", scheme.weights, "--extra_options", f"block_size={scheme.block_size}",
            f"accuracy_level={scheme.accuracy_level}"]


def build_genai_decoder(model: str, recipe: Any, opts: Any, root: Path, cuda: bool, scheme: Any = None) -> Path:
    """onnxruntime-genai's model builder on the recipe's text decoder, once: <root>/ort-genai/<recipe>-<digest>-
    <dtype>[-<scheme>]-<ep>-<weights>/ (genai_config.json, model.onnx); reused when it is there."""

    path, _ = (None, False) if opts.random_weights else peer_source(model, recipe, opts)
    ep = "cuda" if cuda else "cpu"
    quant = f"-{scheme.label}" if scheme is not None else ""
    out = root / "ort-genai" / (f"{recipe.name}-{_recipe_digest(recipe)}-{opts.dtype}{quant}-{ep}-"
                                f"{_weights_key(path, opts.random_weights) if path else 'rw'}")
    if (out / "genai_config.json").is_file() and (out / "model.onnx").is_file():
        opts.progress(f"  reusing ort-genai decoder {out}")
        return out
    from safetensors.torch import save_file


    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        hf_dir, onnx_dir = tmp / "hf", tmp / "onnx"
        hf_dir.mkdir()
        (hf_dir / "config.json").write_text(json.dumps(decoder_config(recipe), indent=2))
        save_file(decoder_state(model, recipe, opts, path), str(hf_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        tok_src = path if path is not None and (path / "tokenizer.json").is_file() else None
        if tok_src is not None:  # the builder loads a tokenizer (and copies it beside the model)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (tok_src / name).is_file():
                    shutil.copy(tok_src / name, hf_dir / name)
        else:
            build_synthetic_tokenizer(recipe, hf_dir)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_dir), "-i", str(hf_dir),
               "-o", str(onnx_dir), "-e", ep, "-c", str(tmp / "cache")] + builder_precision(opts, scheme)
        opts.progress(f"  building the ort-genai decoder ({' '.join(cmd[1:4])} ... "
                      f"{' '.join(builder_precision(opts, scheme))} -e {ep}) into {out}")
        proc, secs = timed_call(lambda: subprocess.run(cmd, capture_output=True, text=True,
                                                       env={**os.environ, "HF_HUB_OFFLINE": "1"}))
        if proc.returncode != 0 or not (onnx_dir / "genai_config.json").is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            raise StsError(f"onnxruntime-genai's model builder failed (exit {proc.returncode}): {tail[0]}")
        opts.progress(f"  built in {secs:.0f} s")
        try:
            os.replace(onnx_dir, out)
        except OSError:  # another process built it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class GenaiPeer(_Peer):
    """onnxruntime-genai on the recipe's text decoder, S ids = our full prefill length; Runner-like."""

    name = "ort-genai"

    def __init__(self, model: str, recipe: Any, opts: Any, image: Any, cuda: bool, root: Path,
                 scheme: Any = None) -> None:
        import onnxruntime_genai as og


        self.og, self.model, self.recipe, self.opts, self.cuda = og, model, recipe, opts, cuda
        self.weights = scheme.label if scheme is not None else None
        self.dir = build_genai_decoder(model, recipe, opts, root, cuda, scheme)
        path, tokenized = (None, False) if opts.random_weights else peer_source(model, recipe, opts)
        img = family_module(recipe.family).prepare_image(image, recipe)
        prompt = peer_prompt(recipe, opts, path, tokenized)  # only its length S1 is used: the ids are random
        self.text_tokens, self.n_full = len(prompt.prefix) + len(prompt.suffix), img.n_full
        self.size = tuple(img.size) if recipe.image_processor.max_pixels else None
        s = self.text_tokens + self.n_full  # our full prefill length S1
        r = recipe
        specials = {r.image_token_id, r.bos_token_id, r.eos_token_id, r.pad_token_id, r.vision_start_token_id,
                    r.vision_end_token_id}
        pool = np.array([i for i in range(5, min(r.text.vocab_size, 1024)) if i not in specials], dtype=np.int32)
        self.ids = np.concatenate([[r.bos_token_id], np.random.default_rng(0).choice(pool, s - 1)]).astype(np.int32)
        cfg = og.Config(str(self.dir))
        if not cuda:
            cfg.clear_providers()
        if opts.threads is not None:
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": opts.threads, "inter_op_num_threads": 1}}}}))
        self.og_model = og.Model(cfg)
        self.samples: dict[str, list[float]] = {"prefill": [], "decode": []}
        self.mem = _Memory(False)
        self.tokens: np.ndarray | None = None

    def generate(self) -> tuple[np.ndarray, dict[str, float]]:
        """One run: (greedy tokens [1, max_new_tokens], seconds of prefill and decode per token)."""
        og, n_new, s = self.og, self.opts.max_new_tokens, len(self.ids)
        params = og.GeneratorParams(self.og_model)
        # min_length = max_length: EOS is masked, every run decodes max_new_tokens tokens; the KV buffers are
        # allocated to that length (past/present share one buffer)
        params.set_search_options(max_length=s + n_new, min_length=s + n_new, do_sample=False)
        gen = og.Generator(self.og_model, params)
        toks: list[int] = []

        def prefill() -> None:
            gen.append_tokens(self.ids)  # the forward over S ids
            gen.generate_next_token()  # picks the first token from its logits (no forward)
            toks.append(int(gen.get_next_tokens()[0]))

        def decode() -> None:
            for _ in range(n_new - 1):  # a forward of the last token + the pick of the next, per step
                gen.generate_next_token()
                toks.append(int(gen.get_next_tokens()[0]))

        _, pre = timed_call(prefill)
        _, dec = timed_call(decode)
        gen = None  # frees its KV buffers before the next run
        return np.array([toks], dtype=np.int64), {"prefill": pre, "decode": dec / max(n_new - 1, 1)}

    def row(self) -> dict[str, Any]:
        row = _peer_row(self.name, self.model, self.recipe, self.opts, "cuda" if self.cuda else "cpu",
                        self.text_tokens, self.n_full, self.samples, self.mem.value(), self.size, self.weights)
        row["ort_genai_dir"], row["ignore_eos"] = str(self.dir), True  # min_length masks EOS: S1 + max_new_tokens
        row["weight_bytes"] = int(sum(f.stat().st_size for f in self.dir.glob("model.onnx*")))
        row["weight_bytes_source"] = "export files"
        return row

    def close(self) -> None:
        self.og_model = None


def load_peer(peer: str, model: str, recipe: Any, opts: Any, image: Any, cuda: bool, root: Path,
              scheme: Any = None) -> Any:
    """A loaded, Runner-like peer (`scheme`: quantized weights, ort-genai only; peer_schemes)."""
    if peer == "transformers":
        return TransformersPeer(model, recipe, opts, image, cuda)
    return GenaiPeer(model, recipe, opts, image, cuda, root, scheme)


# ----------------------------------------------------------------------------------------------- ratios
def add_peer_ratios(rows: list[dict[str, Any]]) -> None:
    """Every row of ours gets speedup_<phase>_vs_<peer> = the peer's median / ours (same model and dtype), for
    transformers' ttft, prefill and decode and ort-genai's (decoder-only) prefill and decode; None without it.
    ort-genai's row must also hold the same weights (int4-b32 against int4-b32, float against float); transformers
    runs float weights only, so our quantized rows are read against its float row (what a user would otherwise run)."""
    for row in rows:
        row.setdefault("scope", "full model")
        if row.get("peer"):
            continue
        for peer, phases in RATIO_PHASES.items():
            ref = next((r for r in rows if r.get("peer") and r["backend"] == peer and r["model"] == row["model"]
                        and r["dtype"] == row["dtype"]
                        and (peer == "transformers" or r.get("weights") == row.get("weights"))), None)
            if ref is None:
                continue
            for ph in phases:
                theirs, ours = ref.get(f"{ph}_ms_median"), row.get(f"{ph}_ms_median")
                row[f"speedup_{ph}_vs_{peer.replace('-', '_')}"] = theirs / ours if theirs and ours else None
