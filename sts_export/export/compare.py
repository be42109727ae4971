"""The one comparator: a candidate's outputs or generation against a reference's, one rule per field.

    compare_array(name, got, want, tol, dtype)     one output: integers identical; floats within tol (max abs)
    compare_generations(ref, got, tol, dtype)       two generations: kept sets, tokens, first-token logits

It serves every pair the project checks: torch -> ONNX Runtime (validation), portable graphs -> ORT form, float ->
weight-quantized graphs, ONNX Runtime -> TensorRT. Rules:

* integer outputs (kept indices, position ids) are identical, or they differ;
* a float output is within `tol` (max abs error); at reduced precision (`dtype` fp16/bf16) the tolerance is at
  least LOW_PRECISION_ULPS units in the last place of that dtype at the reference's magnitude, since a
  float16/bfloat16 result cannot be closer to the exact value than its own spacing there;
* kept sets (keep_pre [B, K], keep_post [B, K'] as indices into keep_pre) are compared as sets of the image's own
  token ids: identical, and the share of the reference's tokens the candidate kept too (`overlap`);
* one rule for "no Stage 2": both keep_post None is identical; one None is not;
* entries where both sides hold the same infinity (EOS masked to -inf in both logits) agree and are left out of the
  figures; any other non-finite value fails.
"""
from __future__ import annotations

from typing import Any

import numpy as np

LOW_PRECISION_ULPS = 8
MANTISSA_BITS = {"fp16": 10, "bf16": 7}  # explicit mantissa bits: one ulp at |x| in [2^e, 2^(e+1)) is 2^(e - bits)


def compare_array(name: str, got: np.ndarray, want: np.ndarray, tol: float, dtype: str = "fp32") -> dict[str, Any]:
    """One output: integers identical; floats max abs error <= tol (floored at LOW_PRECISION_ULPS ulps of `dtype`)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return {"output": name, "ok": False, "error": f"shape {list(got.shape)} vs {list(want.shape)}"}
    if np.issubdtype(want.dtype, np.integer) or np.issubdtype(got.dtype, np.integer) or want.dtype == bool:
        same = bool(np.array_equal(got, want))
        return {"output": name, "ok": same, "identical": same}
    a, b = _comparable(got, want)
    abs_err = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if a.size else 0.0
    row: dict[str, Any] = {"output": name, "ok": False, "max_abs": abs_err,
                           "max_rel": abs_err / max(scale, 1e-12) if a.size else 0.0, "tol": tol}
    bits = MANTISSA_BITS.get(dtype)
    if bits is not None and scale > 0:
        floor = LOW_PRECISION_ULPS * 2.0 ** (np.floor(np.log2(scale)) - bits)
        if floor > tol:
            row["tol"], row["tol_floor"] = float(floor), f"{LOW_PRECISION_ULPS} {dtype} ulps at max |ref| {scale:g}"
    row["ok"] = bool(np.isfinite(a).all() and abs_err <= row["tol"])
    return row


def _comparable(got: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays flattened as float64, without the entries where both hold the same infinity."""
    a, b = np.asarray(got, np.float64).reshape(-1), np.asarray(want, np.float64).reshape(-1)
    keep = ~(np.isinf(a) & (a == b))
    return a[keep], b[keep]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two arrays flattened (float64, shared infinities left out); 1.0 for two zero arrays, NaN where a
    side holds other non-finite values."""
    x, y = _comparable(a, b)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / den) if den > 0 else float(np.array_equal(x, y))


def kept_tokens(keep_pre: np.ndarray, keep_post: np.ndarray | None) -> np.ndarray:
    """The image token ids that reach the layers after Stage 2: keep_pre [B, K] at keep_post [B, K'] -> [B, K']."""
    return np.take_along_axis(keep_pre, keep_post, axis=1) if keep_post is not None else keep_pre


def overlap(got: np.ndarray, want: np.ndarray) -> float:
    """Share of the reference's kept tokens the candidate kept too (per row, then averaged; 1.0 = same sets)."""
    got, want = np.asarray(got).reshape(len(want), -1), np.asarray(want).reshape(len(want), -1)
    shares = [len(set(g.tolist()) & set(w.tolist())) / max(len(set(w.tolist())), 1) for g, w in zip(got, want)]
    return float(np.mean(shares)) if shares else 1.0


def same_kept(ref: Any, got: Any) -> tuple[bool, bool]:
    """(keep_pre identical, keep_post identical) of two generations; keep_post None on both sides is identical."""
    pre = bool(np.array_equal(ref.keep_pre, got.keep_pre))
    if ref.keep_post is None or got.keep_post is None:
        return pre, ref.keep_post is None and got.keep_post is None
    return pre, bool(np.array_equal(ref.keep_post, got.keep_post))


def first_divergence(ref: np.ndarray, got: np.ndarray) -> int | None:
    """The first step at which two token sequences [B, n] differ in any row (None: identical)."""
    n = min(ref.shape[1], got.shape[1])
    diff = np.nonzero((ref[:, :n] != got[:, :n]).any(axis=0))[0]
    if diff.size:
        return int(diff[0])
    return None if ref.shape[1] == got.shape[1] else n


def compare_generations(ref: Any, got: Any, tol: float, dtype: str = "fp32") -> dict[str, Any]:
    """Two generations (sts_export.generate.Generation) of the same image and prompt, field by field.

    -> keep_pre/keep_post identical and overlap (as sets of image token ids), tokens identical and the first step
    where they diverge, first-token logits (compare_array, plus cosine). The caller decides which fields gate."""
    pre, post = same_kept(ref, got)
    row: dict[str, Any] = {
        "keep_pre_identical": pre, "keep_post_identical": post,
        "keep_pre_overlap": overlap(got.keep_pre, ref.keep_pre),
        "tokens_identical": bool(np.array_equal(ref.tokens, got.tokens)),
        "first_divergence": first_divergence(ref.tokens, got.tokens),
        "first_logits": {**compare_array("logits", got.first_logits, ref.first_logits, tol, dtype),
                         "cosine": cosine(got.first_logits, ref.first_logits)},
    }
    if ref.keep_post is not None and got.keep_post is not None:
        row["keep_post_overlap"] = overlap(kept_tokens(got.keep_pre, got.keep_post), kept_tokens(ref.keep_pre, ref.keep_post))
    return row
