"""Per-operator preconditions of TensorRT's ONNX parser (onnx-tensorrt's importers, and the TensorRT API limits behind
them), as `rule_<Op>` methods of the static check (`check._Checker` mixes `Rules` in).

Every rule names its source in a comment: file and function of onnx-tensorrt (10.1 GA = 96e78110, the tree of
TensorRT 10.1/10.3 where no 10.2/10.3 Changelog entry changes the code; 10.15 GA; 10.16 = 6bde6596; 11.0 = 5ab48c5c,
read for 11.x), `docs/operators.md`, or TensorRT's `NvInfer.h`. A rule reports an error only where the parser or the
TensorRT API refuses the graph or computes something else; what it cannot prove is a warning. `Rules` expects of
its host: `add(node, op, what, severity)`, `ver` (major, minor), `model`, `base_dir` and `read_names` (every name a
node or a graph output reads).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from sts_export.export.tensorrt.parser_tables import BLOCK_DQ_INT4_SIZES, BLOCK_DQ_TYPES, TOPK_MAX_K, TYPE_TOKEN
from sts_export.export.tensorrt.parser_values import (MAX_READ, UNKNOWN, Scope, attr, build_scope, shape_change, type_dims, used_names)
from sts_export.export.tensorrt.parser_walk import is_max_trip_count


def _name(elem: int) -> str:
    return onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else str(elem)


class Rules:
    """The `rule_<Op>` checks; see the module docstring for what the host provides."""

    ver: tuple[int, int]
    model: onnx.ModelProto
    base_dir: str | None
    read_names: set[str]

    def add(self, node: str, op: str, what: str, severity: str = "error") -> None:
        raise NotImplementedError

    def _v(self) -> str:
        return f"{self.ver[0]}.{self.ver[1]}"

    def _rank(self, name: str, scope: Scope) -> int | None:
        t = scope.type(name) if name else None
        return len(t[1]) if t is not None and t[1] is not None else None

    # -- TopK ----------------------------------------------------------------------------------------------------
    def rule_TopK(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        # onnxOpImporters.cpp TopK (10.1 GA, 11.0): opset >= 10 passes K as a tensor (`layer->setInput(1, *kPtr)`),
        # so K may be computed at runtime (Changelog 8.6 EA: "TopK operators with dynamic K values"); the importer
        # checks no bound and ignores `sorted` (TensorRT's TopK always sorts, which sorted=0 allows). The bound is
        # TensorRT's, NvInfer.h ITopKLayer (v10.3.0, v10.16, v11.1): "Currently only values up to 3840 are supported",
        # setInput(1): "Values larger than 3840 will result in a runtime error".
        if len(node.input) < 2 and attr(node, "k") is not None:  # opset < 10: K is an attribute
            k = int(attr(node, "k"))
        else:
            name = node.input[1] if len(node.input) > 1 else ""
            val = scope.const(name) if name else None
            if val is None:
                self.add(label, "TopK", f"K ('{name}') is a runtime tensor: the importer passes it to ITopKLayer "
                                        f"(setInput(1)); values above {TOPK_MAX_K} fail at runtime", "warning")
                return
            if val is UNKNOWN:
                self.add(label, "TopK", f"K ('{name}') is constant but its value could not be read", "warning")
                return
            k = int(np.asarray(val).reshape(-1)[0])
        if k > TOPK_MAX_K:
            self.add(label, "TopK", f"K={k} > {TOPK_MAX_K}: TensorRT's TopK takes K up to {TOPK_MAX_K} (NvInfer.h "
                                    f"ITopKLayer: larger values fail)")

    # -- Loop (the registration of its body is the walk's: parser_walk.Walk.walk_loop) ---------------------------
    def rule_Loop(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        body = attr(node, "body")
        trip = node.input[0] if node.input else ""
        cond = node.input[1] if len(node.input) > 1 else ""
        n_state = max(0, len(node.input) - 2)
        trip_limit = bool(trip) and not is_max_trip_count(trip, scope)
        if not trip_limit and not cond:
            # Loop importer adds no kCOUNT limit (no trip count, or isMaxTripCount) and no kWHILE limit (no cond);
            # NvInfer.h ILoop::addTripLimit (v10.3.0 .. v11.1): "It is an error to not add at least one trip limiter."
            self.add(label, "Loop", "no trip limit: the Loop has neither a trip count below INT_MAX nor a `cond`, and "
                                    "TensorRT's ILoop needs at least one (\"It is an error to not add at least one "
                                    "trip limiter.\")")
        n_scan = (len(body.output) - 1 - n_state) if body is not None else 0
        if n_scan > 0 and not trip_limit:
            outs = list(node.output[n_state:])
            if self.ver >= (10, 11):
                # Loop importer 10.15 GA / 11.0 (Changelog 10.11: "Clarified limitations of scan outputs")
                self.add(label, "Loop", f"TensorRT cannot infer the shape of scan output {outs[0] if outs else '?'} "
                                        f"since no trip limit was set (kUNSUPPORTED_NODE): give the Loop a trip count")
            elif any(o and o in self.read_names for o in outs):
                # Loop importer 10.1 GA: DUMMY_SCAN_OUTPUT_LENGTH = 1024, "the scan outputs must not be used in the
                # rest of the model"
                self.add(label, "Loop", "scan outputs without a trip count get a dummy length of 1024 in TensorRT "
                                        f"{self._v()} (Loop importer: they must not be used), and this graph uses "
                                        "them: give the Loop a trip count")
        if body is not None:
            self._carried_shapes(node, body, label, scope, n_state)

    def _carried_shapes(self, node: onnx.NodeProto, body: onnx.GraphProto, label: str, scope: Scope,
                        n_state: int) -> None:
        """operators.md Loop (10.1 GA .. 10.15 GA): "The shape of Loop carried dependencies must be the same across
        all loop iterations" (an IRecurrenceLayer's two inputs must agree)."""
        bscope = build_scope(body, scope, self.base_dir)
        induced: list[list[int | str | None] | None] | None = None
        for i in range(n_state):
            init_name = node.input[2 + i]
            in_vi = body.input[2 + i] if 2 + i < len(body.input) else None
            out_vi = body.output[1 + i] if 1 + i < len(body.output) else None
            if in_vi is None or out_vi is None:
                continue
            shapes = {
                "initial": (scope.type(init_name) or (0, None))[1],
                "body input": (bscope.type(in_vi.name) or (0, None))[1],
                "after one iteration": (bscope.type(out_vi.name) or (0, None))[1],
            }
            verdict = shape_change(shapes)
            if verdict is not None and verdict[0] == "warning":
                # not provable from the body's own annotations: try induction (see `_carried_shapes_by_induction`)
                if induced is None:
                    induced = self._carried_shapes_by_induction(node, body, scope) or [None] * n_state
                if induced[i] is not None:
                    verdict = shape_change({**shapes, "after one iteration": induced[i]})
            if verdict is None:
                continue
            severity, why = verdict
            self.add(label, "Loop", f"loop-carried '{init_name}' {why}: TensorRT requires loop-carried values to "
                                    f"keep the same shape across iterations", severity)

    def _carried_shapes_by_induction(self, node: onnx.NodeProto, body: onnx.GraphProto,
                                     scope: Scope) -> list[list[int | str | None] | None] | None:
        """Shapes of the body's loop-carried outputs when every carried input has its initial shape; None on failure.

        ONNX's Loop shape inference clears the shapes of loop-carried inputs before it infers the body (they may
        change between iterations), so a body whose inputs are typed without shapes (what torch.onnx/onnxscript emit)
        never has inferable carried-output shapes. Induction recovers them: the body is inferred on its own with each
        carried input declared at its initial shape S (outer-scope values typed from the enclosing graph); a carried
        output inferred as S again keeps S in every iteration, anything else is reported as before.
        """
        n_carried = max(0, len(node.input) - 2)
        try:
            g = onnx.GraphProto()
            g.name = body.name or "body"
            g.node.extend(body.node)
            g.initializer.extend(body.initializer)
            for idx, vi in enumerate(body.input):
                if 2 <= idx < 2 + n_carried:
                    declared = type_dims(vi.type)
                    init = scope.type(node.input[idx])
                    elem = (init[0] if init and init[0] else 0) or (declared[0] if declared else 0)
                    dims = init[1] if init and init[1] is not None else (declared[1] if declared else None)
                    if not elem:
                        return None
                    g.input.append(onnx.helper.make_tensor_value_info(vi.name, elem, dims))
                else:
                    g.input.append(vi)
            defined = {v.name for v in body.input} | {t.name for t in body.initializer}
            defined |= {o for n in body.node for o in n.output}
            for name in sorted(used_names(body) - defined):  # outer-scope values the body reads
                t = scope.type(name)
                if t is None or not t[0]:
                    continue
                val = scope.const(name)
                if (isinstance(val, np.ndarray) and val.dtype != object and val.size <= MAX_READ
                        and onnx.helper.np_dtype_to_tensor_dtype(val.dtype) == t[0]):
                    g.initializer.append(numpy_helper.from_array(val, name))  # constants feed data propagation
                else:
                    g.input.append(onnx.helper.make_tensor_value_info(name, t[0], t[1]))
            g.output.extend(onnx.ValueInfoProto(name=o.name) for o in body.output)
            m = onnx.helper.make_model(g, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
            m.functions.extend(self.model.functions)
            out = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True).graph.output
        except Exception:  # noqa: BLE001 - best effort: the caller keeps its warning
            return None
        res: list[list[int | str | None] | None] = []
        for i in range(n_carried):
            d = type_dims(out[1 + i].type) if 1 + i < len(out) else None
            res.append(d[1] if d else None)
        return res

    # -- If, Squeeze, Range, Expand, Split, ScatterND ------------------------------------------------------------
    def rule_If(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        # onnxOpCheckers.cpp If (10.1 GA) / If importer: "then/else subgraphs should have the same number of outputs"
        then_g, else_g = attr(node, "then_branch"), attr(node, "else_branch")
        if then_g is not None and else_g is not None and len(then_g.output) != len(else_g.output):
            self.add(label, "If", f"then/else subgraphs should have the same number of outputs: then outputs = "
                                  f"{len(then_g.output)}, else outputs = {len(else_g.output)} (kUNSUPPORTED_NODE_ATTR)")

    def rule_Squeeze(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        # Squeeze importer (10.1 GA, 11.0): without axes the squeezed dims are read from the build-time shape
        has_axes = (len(node.input) > 1 and node.input[1]) or attr(node, "axes") is not None
        t = scope.type(node.input[0]) if node.input else None
        if not has_axes and t is not None and t[1] is not None and any(not isinstance(d, int) or d <= 0 for d in t[1]):
            self.add(label, "Squeeze", "Cannot infer squeeze dimensions from a dynamic shape! Please re-export your "
                                       "model with the Squeeze axes input set. (kUNSUPPORTED_NODE_DYNAMIC)")

    def rule_Range(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        # Range importer (10.1 GA): "For range operator types for start, limit, and delta must be identical" and
        # "only supports int32, int64, and float input types" (the type column carries the second)
        types = [(scope.type(i) or (0, None))[0] for i in node.input[:3] if i]
        if len(types) == 3 and all(types) and len(set(types)) > 1:
            self.add(label, "Range", "For range operator types for start, limit, and delta must be identical. ("
                                     + ", ".join(_name(t) for t in types) + ")")

    def rule_Expand(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        # Expand importer (10.1 GA): "The shape tensor is required to be 1D."
        r = self._rank(node.input[1], scope) if len(node.input) > 1 else None
        if r is not None and r != 1:
            self.add(label, "Expand", f"The shape tensor is required to be 1D. (it is {r}-D; kINVALID_VALUE)")

    def rule_Split(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        # Split importer (10.1 GA, 11.0), opset >= 18: "Either 'split' should be provided as an input or 'num_outputs'
        # should be provided as an attribute. But not both."
        if len(node.input) > 1 and node.input[1] and attr(node, "num_outputs") is not None:
            self.add(label, "Split", "Either 'split' should be provided as an input or 'num_outputs' should be "
                                     "provided as an attribute. But not both.")

    def rule_ScatterND(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        red = attr(node, "reduction")
        red = red.decode() if isinstance(red, bytes) else red
        if self.ver < (10, 9) and red is not None:
            # ScatterND importer 10.1 GA: ASSERT(!attrs.count("reduction")) (Changelog 10.9: "Fixed support for
            # opset 18+ ScatterND")
            self.add(label, "ScatterND", f"Attribute reduction is not supported. (reduction='{red}'; TensorRT "
                                         f"{self._v()} refuses the attribute itself, even 'none')")
        elif red not in (None, "none"):
            # ScatterND importer 11.0: mode == "none" else "ScatterND with reduction is not supported."
            self.add(label, "ScatterND", f"ScatterND with reduction is not supported. (reduction='{red}')")

    # -- quantization --------------------------------------------------------------------------------------------
    def rule_DequantizeLinear(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        # QuantDequantLinearHelper (onnxOpImporters.cpp 10.1 GA, 11.0)
        scale = scope.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if scale is not None and scale is not UNKNOWN and np.any(np.asarray(scale).astype(np.float64) <= 0):
            self.add(label, "DequantizeLinear", "Scale coefficients must all be positive (kINVALID_NODE)")
        if len(node.input) > 2 and node.input[2]:
            zp = scope.const(node.input[2])
            if zp is None:  # a tensor zero point is passed on as a tensor: not refused, not provably zero
                self.add(label, "DequantizeLinear", f"`x_zero_point` ('{node.input[2]}') is not a constant: TensorRT "
                                                    f"quantization is symmetric (zero point must be 0)", "warning")
            elif zp is not UNKNOWN and np.any(np.asarray(zp).astype(np.float64) != 0):
                self.add(label, "DequantizeLinear", "TensorRT only supports symmetric quantization. The zero point for "
                                                    "the QuantizeLinear/DequantizeLinear operator must be all zeros.")
        x_t = scope.type(node.input[0]) if node.input else None
        x_dims = x_t[1] if x_t is not None else None
        s_t = scope.type(node.input[1]) if len(node.input) > 1 else None
        s_dims = s_t[1] if s_t is not None else None
        if x_dims and s_dims is not None and all(isinstance(d, int) and d > 0 for d in x_dims + s_dims):
            rank, s_size = len(x_dims), int(np.prod(s_dims)) if s_dims else 1
            axis = attr(node, "axis", rank)  # the importer's default is the rank, then 0 (not ONNX's 1)
            axis = 0 if axis == rank else axis % rank
            if s_size != 1 and len(s_dims) == 1 and x_dims[axis] != s_size:
                self.add(label, "DequantizeLinear", f"The number of scales is not equal to the number of output "
                                                    f"channels. Number of output channels = {x_dims[axis]}, number of "
                                                    f"scales = {s_size}.")
            elif s_size != 1 and len(s_dims) == rank and sum(a // b == 1 for a, b in zip(x_dims, s_dims)) != rank - 1:
                self.add(label, "DequantizeLinear", "Only a single blocking dimension is allowed.")
            token = TYPE_TOKEN.get(_name(x_t[0]) if x_t[0] else "")
            if token == "INT4" and x_dims[-1] % 2:
                self.add(label, "DequantizeLinear", "Quantization to INT4 is not supported for tensors with an odd "
                                                    "last dimension.")
        block = attr(node, "block_size", 0)
        if block:
            self._block_dq_rules(node, label, scope, block, x_t)

    def _block_dq_rules(self, node: onnx.NodeProto, label: str, scope: Scope, block: int, x_t: Any) -> None:
        """Block-wise DequantizeLinear: TensorRT's "Working with Quantized Types" (10.11 docs, see parser_tables):
        INT4 (FP8/FP4 from 10.13) weight blocks of 64/128 along one of the last two dims, weights and scales
        constant."""
        tname = _name(x_t[0]) if x_t is not None and x_t[0] else None
        token = TYPE_TOKEN.get(tname or "", tname)
        allowed = max((since, types) for since, types in BLOCK_DQ_TYPES if self.ver >= since)[1]
        if token is not None and token not in allowed:
            self.add(label, "DequantizeLinear", f"block-wise (block_size={block}) {token} weights: TensorRT "
                                                f"{self._v()} dequantizes blocks of {', '.join(allowed)} only")
        for idx, what in ((0, "x"), (1, "x_scale")):
            if idx < len(node.input) and node.input[idx] and scope.const(node.input[idx], strict=True) is None:
                self.add(label, "DequantizeLinear", f"block-wise `{what}` ('{node.input[idx]}') is not an initializer: "
                                                    f"TensorRT dequantizes blocks of constant weights only")
        if token == "INT4" and block not in BLOCK_DQ_INT4_SIZES:
            self.add(label, "DequantizeLinear", f"INT4 block_size={block}: TensorRT takes INT4 blocks of "
                                                f"{' or '.join(map(str, BLOCK_DQ_INT4_SIZES))} only")
        rank = self._rank(node.input[0], scope) if node.input else None
        axis = attr(node, "axis", 1)
        if rank is not None and rank >= 2 and axis % rank < rank - 2:
            self.add(label, "DequantizeLinear", f"block axis {axis} of a {rank}-D tensor: TensorRT blocks one of the "
                                                f"last two dimensions only")

    # -- outputs the importer does not produce, attributes it refuses --------------------------------------------
    def _one_output(self, node: onnx.NodeProto, label: str, what: str) -> None:
        # ModelImporter.cpp parseNode (10.1 GA .. 11.0): "Node has more output tensors than TRT expected"
        extra = [o for o in node.output[1:] if o]
        if extra:
            self.add(label, node.op_type, f"Node has more output tensors than TRT expected, expected output size is "
                                          f"1, actual output size is {1 + len(extra)}. ({what})")

    def rule_MaxPool(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        self._one_output(node, label, "the `Indices` output is not produced by TensorRT's pooling (poolingHelper)")

    def rule_LayerNormalization(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        self._one_output(node, label, "only `Y`: Mean and InvStdDev are not produced (RETURN_FIRST_OUTPUT)")

    def rule_Resize(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        # Resize importer (10.1 GA, 11.0): modes nearest, linear and cubic; coordinate transformations align_corners,
        # tf_half_pixel_for_nn, pytorch_half_pixel, half_pixel, asymmetric; `antialias` is never read (so an
        # antialiased resize computes a plain one)
        mode = attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("nearest", "linear", "cubic"):
            self.add(label, "Resize", f"mode='{mode}' is not a mode TensorRT's Resize importer knows (nearest, "
                                      f"linear, cubic)")
        ctm = attr(node, "coordinate_transformation_mode", b"half_pixel")
        ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
        if ctm not in ("align_corners", "tf_half_pixel_for_nn", "pytorch_half_pixel", "half_pixel", "asymmetric"):
            self.add(label, "Resize", f"Unsupported coordinate transformation mode {ctm}")
        if attr(node, "antialias", 0):
            self.add(label, "Resize", "`antialias` is ignored by TensorRT's Resize importer: the engine would compute "
                                      "a resize without antialiasing")

    def rule_Dropout(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        # Dropout importer (10.1 GA): "This Version of TensorRT only supports the training_mode input as an
        # initializer." and "TensorRT does not support the Dropout operator in training mode."
        if len(node.input) > 2 and node.input[2]:
            val = scope.const(node.input[2], strict=True)
            if val is None:
                self.add(label, "Dropout", "This Version of TensorRT only supports the training_mode input as an "
                                           "initializer.")
            elif val is not UNKNOWN and bool(np.asarray(val).reshape(-1)[0]):
                self.add(label, "Dropout", "TensorRT does not support the Dropout operator in training mode.")

    def rule_Constant(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        for a in node.attribute:  # operators.md Constant: sparse_value / strings are not supported
            if a.name in ("sparse_value", "value_string", "value_strings"):
                self.add(label, "Constant", f"attribute `{a.name}` is not supported by TensorRT")

    # -- 10.14+ / 10.15+ rows: operators.md 10.15 GA -------------------------------------------------------------
    def rule_Attention(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        # 10.15 GA operators.md, Attention: "`Q`, `K`, `V` and `attn_mask` must be 4D. `past_key`, `past_value` and
        # `nonpad_kv_seqlen` inputs are unsupported. `present_key`, `present_value` and `qk_matmul_output` outputs
        # are unsupported. `qk_matmul_output_mode` and `softcap` attributes are unsupported."
        for idx, what in enumerate(("Q", "K", "V", "attn_mask")):
            if idx < len(node.input) and node.input[idx]:
                r = self._rank(node.input[idx], scope)
                if r is not None and r != 4:
                    self.add(label, "Attention", f"`{what}` is {r}-D: TensorRT {self._v()} takes 4-D Q, K, V and "
                                                 f"attn_mask only (fold the heads into dim 1)")
        for idx, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
            if idx < len(node.input) and node.input[idx]:
                self.add(label, "Attention", f"input `{what}` is not supported by TensorRT {self._v()}'s Attention "
                                             f"importer (concatenate the KV cache outside the node)")
        for idx, what in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
            if idx < len(node.output) and node.output[idx]:
                self.add(label, "Attention", f"output `{what}` is not supported by TensorRT {self._v()}'s Attention "
                                             f"importer")
        for a in ("qk_matmul_output_mode", "softcap"):
            if attr(node, a, 0):
                self.add(label, "Attention", f"attribute `{a}` is not supported by TensorRT {self._v()}")

    def rule_RotaryEmbedding(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        # 10.15 GA operators.md, RotaryEmbedding: "`position_ids` must be INT64"
        if len(node.input) > 3 and node.input[3]:
            t = scope.type(node.input[3])
            if t is not None and t[0] and t[0] != onnx.TensorProto.INT64:
                self.add(label, "RotaryEmbedding", f"`position_ids` is {onnx.TensorProto.DataType.Name(t[0])}: "
                                                   f"TensorRT takes INT64 position ids")

    def rule_TensorScatter(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        # 10.15 GA operators.md, TensorScatter: "`past_cache` and `update` must be 4D. `axis` must be -2."
        for idx, what in ((0, "past_cache"), (1, "update")):
            r = self._rank(node.input[idx], scope) if idx < len(node.input) else None
            if r is not None and r != 4:
                self.add(label, "TensorScatter", f"`{what}` is {r}-D: TensorRT takes 4-D past_cache and update only")
        axis = attr(node, "axis", -2)
        if axis != -2:
            self.add(label, "TensorScatter", f"axis={axis}: TensorRT supports axis=-2 only")

