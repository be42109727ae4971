"""What the static TensorRT check knows about each tensor name: type, shape, build-time constant value.

`Scope` holds one graph's names (inputs, value_info, outputs, initializers, Constant outputs and the shape arithmetic
exporters emit around them, folded: `fold`), with outer-scope fallback for Loop/If/Scan bodies. Weights are read
lazily and only when small (`MAX_READ` elements: K, trip counts, axes), so multi-GB exports check in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper


UNKNOWN = object()  # a constant whose value could not be read (external data not found, or too big to bother)
MAX_READ = 4096  # elements: K, trip counts and axes are tiny; weights are never read


class Lazy:
    """An initializer whose value is read (from external data if need be) only when a check needs it."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: str | None) -> None:
        self.tensor, self.base_dir, self.value = tensor, base_dir, None

    def get(self) -> Any:
        if self.value is None:
            n = int(np.prod(list(self.tensor.dims), dtype=np.int64))
            self.value = read_tensor(self.tensor, self.base_dir) if n <= MAX_READ else UNKNOWN
        return self.value


@dataclass
class Scope:
    types: dict[str, tuple[int, list[int | str | None] | None]]  # name -> (elem_type, dims or None)
    consts: dict[str, Any]  # name -> np.ndarray | UNKNOWN (initializers, Constant outputs, folded)
    strict: set[str]  # names that are initializers or Constant outputs (the parser's "weights")
    producers: dict[str, tuple[str, str]]  # name -> (node label, op)
    graph_io: set[str]  # graph inputs and outputs of the top-level graph (UINT8 allowed there)
    parent: "Scope | None" = None

    def type(self, name: str) -> tuple[int, list[int | str | None] | None] | None:
        s: Scope | None = self
        while s is not None:
            if name in s.types:
                return s.types[name]
            s = s.parent
        return None

    def raw(self, name: str) -> Any:
        """Constant value, possibly partial (object array with None for runtime dims), or None."""
        s: Scope | None = self
        while s is not None:
            if name in s.consts:
                v = s.consts[name]
                return v.get() if isinstance(v, Lazy) else v
            if name in s.types:
                return None  # a non-constant tensor of this scope (shadows outer names)
            s = s.parent
        return None

    def is_weights(self, name: str) -> bool:
        """True for the parser's "weights": initializers (not graph inputs), Constant outputs, Identity of weights."""
        s: Scope | None = self
        while s is not None:
            if name in s.consts or name in s.types:
                return name in s.strict
            s = s.parent
        return False

    def const(self, name: str, strict: bool = False) -> Any:
        """Constant value (np.ndarray or UNKNOWN) or None when `name` is not a build-time constant."""
        s: Scope | None = self
        while s is not None:
            if name in s.consts:
                if strict and name not in s.strict:
                    return None
                v = s.consts[name]
                v = v.get() if isinstance(v, Lazy) else v
                return v if v is UNKNOWN or known(v) else None
            if name in s.types:
                return None
            s = s.parent
        return None


def type_dims(t: onnx.TypeProto) -> tuple[int, list[int | str | None] | None] | None:
    if not t.HasField("tensor_type"):
        return None
    tt = t.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, None
    return tt.elem_type, [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def read_tensor(t: onnx.TensorProto, base_dir: str | None) -> Any:
    try:
        if onnx.external_data_helper.uses_external_data(t):
            if base_dir is None:
                return UNKNOWN
            return numpy_helper.to_array(t, base_dir=base_dir)
        return numpy_helper.to_array(t)
    except Exception:  # noqa: BLE001 - unreadable value: still a constant, value unknown
        return UNKNOWN


def constant_node_value(node: onnx.NodeProto, base_dir: str | None) -> Any:
    for a in node.attribute:
        if a.name == "value":
            return read_tensor(a.t, base_dir)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
    return UNKNOWN


def known(v: Any) -> bool:
    """A fully known value (partial shape values are object arrays holding None for runtime dims)."""
    return v is not None and v is not UNKNOWN and not (v.dtype == object and any(x is None for x in v.flat))


def fold(node: onnx.NodeProto, vals: list[Any], in_dims: list[int | str | None] | None) -> Any:
    """Value of `node` when its inputs are (partially) constant: the shape arithmetic exporters emit for TopK K
    or loop trip counts, e.g. Gather(Shape(x), 1) on a static dim, or Cast(Constant). None when not constant."""
    op, x = node.op_type, (vals[0] if vals else None)
    if op == "Shape":
        if in_dims is None:
            return None
        dims = np.array([d if isinstance(d, int) else None for d in in_dims], dtype=object)
        return dims[attr(node, "start", 0): attr(node, "end", None)]
    if op == "Size":
        ok = in_dims is not None and all(isinstance(d, int) for d in in_dims)
        return np.array(int(np.prod(in_dims, dtype=np.int64)), dtype=np.int64) if ok else None
    if any(v is UNKNOWN for v in vals if v is not None):
        return UNKNOWN
    try:
        if op == "Identity":
            return x
        if op == "Cast":
            to = onnx.helper.tensor_dtype_to_np_dtype(attr(node, "to"))
            return x.astype(to) if known(x) else x
        if op == "Unsqueeze":
            axes = attr(node, "axes") if len(vals) < 2 else [int(a) for a in vals[1].reshape(-1)]
            out = x
            for a in sorted(int(a) % (x.ndim + len(axes)) for a in axes):
                out = np.expand_dims(out, a)
            return out
        if op == "Squeeze":
            axes = attr(node, "axes") if len(vals) < 2 else [int(a) for a in vals[1].reshape(-1)]
            return np.squeeze(x, axis=tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)
        if op == "Reshape":
            shape = [int(d) for d in vals[1].reshape(-1)]
            shape = [x.shape[i] if d == 0 and not attr(node, "allowzero", 0) else d for i, d in enumerate(shape)]
            return x.reshape(shape)
        if op == "Flatten":
            axis = attr(node, "axis", 1) % max(x.ndim, 1)
            return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
        if op == "Concat":
            return np.concatenate([np.atleast_1d(v) for v in vals], axis=attr(node, "axis", 0))
        if op == "Gather":
            idx = vals[1]
            return np.take(x, idx.astype(np.int64), axis=attr(node, "axis", 0)) if known(idx) else None
        if op == "Slice" and x.ndim == 1 and all(known(v) for v in vals[1:] if v is not None):
            starts, ends = int(vals[1].reshape(-1)[0]), int(vals[2].reshape(-1)[0])
            steps = int(vals[4].reshape(-1)[0]) if len(vals) > 4 and vals[4] is not None else 1
            return x[slice(starts, ends, steps)]
        if op in ("Add", "Sub", "Mul", "Div") and known(x) and known(vals[1]):
            a, b = x, vals[1]
            if op == "Div" and np.issubdtype(a.dtype, np.integer):
                return (np.trunc(a / b)).astype(np.result_type(a, b))
            return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, b)
    except Exception:  # noqa: BLE001 - anything unusual: treat as not foldable
        return None
    return None


FOLDABLE = ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Concat", "Shape", "Size", "Gather",
             "Slice", "Add", "Sub", "Mul", "Div")


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def shape_change(shapes: dict[str, list[int | str | None] | None]) -> tuple[str, str] | None:
    """(severity, why) when a loop-carried value's shape is not provably constant; None when it is."""
    known = {k: v for k, v in shapes.items() if v is not None}
    ref_key = "initial" if "initial" in known else next(iter(known), None)
    if ref_key is None or "after one iteration" not in known:
        return ("warning", "has no inferable shape after an iteration, so its shape could not be checked")
    ref = known[ref_key]
    for k, dims in known.items():
        if k == ref_key:
            continue
        if len(dims) != len(ref):
            return ("error", f"changes rank ({ref_key} {fmt(ref)}, {k} {fmt(dims)})")
        for a, b in zip(ref, dims):
            if isinstance(a, int) and a > 0 and isinstance(b, int) and b > 0 and a != b:
                return ("error", f"changes shape ({ref_key} {fmt(ref)}, {k} {fmt(dims)})")
            if isinstance(a, int) and a > 0 and isinstance(b, str):
                return ("error", f"changes shape ({ref_key} {fmt(ref)}, {k} {fmt(dims)})")
            if isinstance(a, int) and a > 0 and b is None and k == "after one iteration":
                return ("warning", f"may change shape ({ref_key} {fmt(ref)}, {k} {fmt(dims)})")
    return None


def used_names(g: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of `g` or of its nested subgraphs."""
    names: set[str] = set()
    for n in g.node:
        names.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= used_names(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    names |= used_names(sub)
    return names


def fmt(dims: list[int | str | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"



def node_name(node: onnx.NodeProto, idx: int) -> str:
    """The importer's name for a node (importerUtils.cpp getNodeName): its name, else "node_of_<first output>"."""
    if node.name:
        return node.name
    return f"node_of_{node.output[0]}" if node.output else f"#{idx}"


def build_scope(g: onnx.GraphProto, parent: Scope | None, base_dir: str | None, top: bool = False) -> Scope:
    """Types, constants and producers of one graph's names (initializers, Constant outputs and folded shape math)."""
    types: dict[str, Any] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        d = type_dims(vi.type)
        if d is not None and vi.name:
            types[vi.name] = d
    consts: dict[str, Any] = {}
    strict: set[str] = set()
    input_names = {i.name for i in g.input}
    for init in g.initializer:
        types.setdefault(init.name, (init.data_type, list(init.dims)))
        if init.name not in input_names:  # an initializer that is also a graph input can be overridden
            consts[init.name] = Lazy(init, base_dir)
            strict.add(init.name)
    producers: dict[str, tuple[str, str]] = {}
    io = (input_names | {o.name for o in g.output}) if top else set()
    s = Scope(types, consts, strict, producers, io, parent)
    for idx, node in enumerate(g.node):
        for o in node.output:
            if o:
                producers[o] = (node_name(node, idx), node.op_type)
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            for o in node.output:
                consts[o] = constant_node_value(node, base_dir)
                strict.add(o)
        elif node.op_type in FOLDABLE and node.input and node.output[0]:
            vals = [s.raw(i) if i else None for i in node.input]
            in_dims = (s.type(node.input[0]) or (0, None))[1]
            if node.op_type in ("Shape", "Size") or all(v is not None for v, i in zip(vals, node.input) if i):
                val = fold(node, vals, in_dims)
                if val is not None and val is not UNKNOWN:
                    val = np.asarray(val)
                    if val.dtype == object and known(val):
                        val = val.astype(np.int64)
                if val is not None:
                    consts[node.output[0]] = val
                # Identity of weights is weights (importerUtils.cpp identity(): "if (input.is_weights()) return input")
                if node.op_type == "Identity" and s.is_weights(node.input[0]):
                    strict.add(node.output[0])
    return s
