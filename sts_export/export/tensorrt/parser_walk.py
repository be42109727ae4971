"""The registration walk: which names TensorRT's ONNX parser has registered when each node reads its inputs.

onnx-tensorrt keeps one flat name -> tensor map (`ImporterContext::tensors()`) and fails a node that reads a name not
in it. This module replays how the importer fills that map, release by release, and reports every read it would fail
with the importer's own message. Sources (onnx-tensorrt, commits in `parser_tables`; 10.1 GA, 10.15 GA, 10.16 and
11.0 read, 10.3 = 10.1 GA where no 10.2/10.3 Changelog entry touches the code):

* `ModelImporter.cpp` `importModel`: graph outputs are registered first as null placeholders ("reserve output
  names"), then `importInputs` registers every graph input (a null tensor when it is also an initializer), then
  `parseGraph` of the main graph.
* `ModelImporter.cpp` `parseGraph`: the graph's initializers are registered, the nodes sorted by `toposort` and
  imported in that order; `parseNode` fails an input name that is not registered ("Node input was not registered.",
  kINVALID_GRAPH) and registers the node's non-empty outputs after its importer ran.
* `toposort.hpp`: post-order DFS over `node.input()` edges only, in node order; a name produced twice fails ("Output
  name is not unique"), so does a cycle; both end in "Failed to sort the model topologically.". Before 10.6 empty
  (optional, omitted) output names take part in the uniqueness test (10.6 GA: "Empty output strings mean null
  outputs, do not register them"; Changelog 10.6 "Fixed handling of optional outputs"). From 11.0 the names a node's
  subgraphs read from outer scopes are dependency edges too (`collectSubgraphOuterScopeRefs`); up to 10.16 they are
  not, so a Loop/If/Scan whose body reads an outer name produced by a later node fails its read.
* `ImporterContext.cpp` `registerTensor` / `NameScope`: a subgraph runs in a name scope: names registered in it are
  dropped (outer ones restored) when it ends, an outer name may be shadowed, a name registered twice in the same
  scope (or twice at top level, unless the first was a null placeholder) throws "ONNX graph has duplicate tensor
  name: <name>".
* `onnxOpImporters.cpp` `DEFINE_BUILTIN_OP_IMPORTER(Loop)`: body input 0 (iteration number) is registered only when
  the node has a trip count that is not INT64 weights >= INT32_MAX (`isMaxTripCount`); body input 1 (`cond_in`) only
  when the node has a `cond`; every state input; after the body: `cond_out` is looked up only with a `cond`, every
  state and scan output always (`ctx->tensors().at(...)`, which throws on a missing name).
* `DEFINE_BUILTIN_OP_IMPORTER(If)`: a condition that is weights with one element imports only the branch it selects;
  otherwise both branches (`ConditionalHelpers.cpp importSubgraph`), each in its own name scope; branch outputs are
  looked up. `DEFINE_BUILTIN_OP_IMPORTER(Scan)`: every state and scan input is registered; every body output looked up.
* Model-local functions: modelled as a scope holding the function's formal inputs (the 10.x `LocalFunctionImporter`
  was not read line by line; sts-export's graphs hold none).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
import numpy as np
import onnx

from sts_export.export.tensorrt.parser_tables import INT32_MAX, parse_version
from sts_export.export.tensorrt.parser_values import UNKNOWN, Scope, attr, build_scope, node_name

NOT_REGISTERED = "Node input was not registered."  # ModelImporter.cpp parseNode (10.1 GA .. 11.0)
NOT_SORTED = "Failed to sort the model topologically."  # ModelImporter.cpp parseGraph
DUPLICATE = "ONNX graph has duplicate tensor name"  # ImporterContext.cpp registerTensor

WEIGHTS, TENSOR, NULL = "weights", "tensor", "null"


@dataclass
class Registry:
    """`ImporterContext::tensors()` with its name scopes: name -> kind (weights | tensor | null placeholder)."""

    names: dict[str, str] = field(default_factory=dict)
    scopes: list[dict[str, str | None]] = field(default_factory=list)  # per scope: name -> the kind it shadowed
    why_missing: dict[str, str] = field(default_factory=dict)  # body inputs the importer left unregistered -> why

    def has(self, name: str) -> bool:
        return name in self.names

    def kind(self, name: str) -> str | None:
        return self.names.get(name)

    def register(self, name: str, kind: str) -> str | None:
        """Register `name`; the importer's error text when it is a duplicate (registerTensor), else None."""
        before = self.names.get(name)
        if self.scopes:
            scope = self.scopes[-1]
            if name in scope:
                return f"{DUPLICATE}: {name}"
            scope[name] = before
        elif before is not None and before != NULL:
            return f"{DUPLICATE}: {name}"
        self.names[name] = kind
        self.why_missing.pop(name, None)
        return None

    def push(self) -> None:
        self.scopes.append({})

    def pop(self) -> None:
        for name, before in self.scopes.pop().items():
            if before is None:
                self.names.pop(name, None)
            else:
                self.names[name] = before


def outer_refs(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph (and its nested subgraphs) reads but does not define (11.0 collectSubgraphOuterScopeRefs)."""
    local = {t.name for t in g.initializer} | {i.name for i in g.input}
    local |= {o for n in g.node for o in n.output if o}
    refs = {i for n in g.node for i in n.input if i and i not in local}
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                refs |= outer_refs(a.g)
    return refs


def is_max_trip_count(name: str, scope: Scope) -> bool:
    """The Loop importer's isMaxTripCount: the trip count is INT64 weights whose first value is >= INT32_MAX (then
    neither a kCOUNT trip limit nor the body's iteration input)."""
    t, val = scope.type(name), scope.const(name, strict=True)
    if t is None or t[0] != onnx.TensorProto.INT64 or val is None or val is UNKNOWN:
        return False
    return int(np.asarray(val).reshape(-1)[0]) >= INT32_MAX


def toposort(nodes: list[onnx.NodeProto], ver: tuple[int, int]) -> tuple[list[int] | None, str]:
    """The importer's node order (toposort.hpp): post-order DFS in node order; (None, why) when it fails."""
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if not o and ver >= (10, 6):  # 10.6 GA: "Empty output strings mean null outputs, do not register them"
                continue
            if o in producer:
                return None, f"Output name is not unique: {o!r}" + (" (an omitted optional output: before 10.6 "
                                                                      "the parser counts those too)" if not o else "")
            producer[o] = i
    deps = []
    for n in nodes:
        edges = list(n.input)
        if ver >= (11, 0):  # 11.0 ModelImporter.cpp parseGraph: subgraph outer-scope references are edges too
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    edges += sorted(outer_refs(a.g))
        deps.append([producer[e] for e in edges if e in producer])
    state = [0] * len(nodes)  # 0 unvisited, 1 active, 2 visited
    order: list[int] = []
    for root in range(len(nodes)):
        if state[root]:
            continue
        stack = [(root, 0)]
        state[root] = 1
        while stack:
            i, k = stack.pop()
            if k < len(deps[i]):
                stack.append((i, k + 1))
                j = deps[i][k]
                if state[j] == 1:
                    return None, f"the graph has a cycle through {node_name(nodes[j], j)!r}"
                if state[j] == 0:
                    state[j] = 1
                    stack.append((j, 0))
            else:
                state[i] = 2
                order.append(i)
    return order, ""


class Walk:
    """Replays the importer over a model; subclasses check each node in `visit` (called where the importer would call
    the node's importer, before its outputs are registered) and each graph in `visit_graph`."""

    def __init__(self, model: onnx.ModelProto, trt_version: str | tuple[int, ...], base_dir: str | None) -> None:
        self.model, self.base_dir = model, base_dir
        self.ver = parse_version(trt_version)
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.reg = Registry()
        self.aborted = False  # a failed toposort ends the importer's parse

    # -- hooks -------------------------------------------------------------------------------------------------
    def add(self, node: str, op: str, what: str, severity: str = "error") -> None:
        raise NotImplementedError

    def visit(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        """Check one node (op table, rules). Control-flow bodies are walked by the walk itself."""

    def visit_graph(self, g: onnx.GraphProto, scope: Scope, prefix: str) -> None:
        """Check one graph's tensors (types)."""

    # -- the walk ----------------------------------------------------------------------------------------------
    def run_walk(self) -> None:
        g = self.model.graph
        for o in g.output:  # importModel: "reserve output names"
            self.reg.register(o.name, NULL)
        inits = {t.name for t in g.initializer}
        for i in g.input:  # importInputs
            self.reg.register(i.name, NULL if i.name in inits else TENSOR)
        top = build_scope(g, None, self.base_dir, top=True)
        self.walk_graph(g, top, "")
        for o in g.output:  # importModel: outputs are marked after the parse
            if not self.aborted and self.reg.kind(o.name) == NULL and o.name not in inits:
                self.add("<model>", "output", f"graph output '{o.name}' is produced by no node, input or initializer: "
                                              f"the importer's placeholder for it stays null (importModel marks it as "
                                              f"a network output)")

    def walk_graph(self, g: onnx.GraphProto, scope: Scope, prefix: str) -> None:
        """parseGraph: initializers, then the nodes in the importer's order."""
        for t in g.initializer:
            dup = self.reg.register(t.name, WEIGHTS)
            if dup:
                self.add(prefix + t.name, "initializer", f"{dup} (ImporterContext.cpp registerTensor)")
        self.visit_graph(g, scope, prefix)
        order, why = toposort(list(g.node), self.ver)
        if order is None:
            self.add((prefix or "<graph>").rstrip("/"), "graph", f"{NOT_SORTED} ({why}; toposort.hpp, kINVALID_GRAPH)")
            self.aborted = True
            return
        for idx in order:
            node = g.node[idx]
            label = prefix + node_name(node, idx)
            for name in node.input:
                if name and not self.reg.has(name):
                    self.add(label, node.op_type, self.not_registered(name, node.op_type))
            self.visit(node, label, scope)
            self.walk_subgraphs(node, label, scope)
            for o in node.output:
                if not o:
                    continue
                is_weights = node.op_type == "Constant" or (
                    node.op_type == "Identity" and node.input and self.reg.kind(node.input[0]) == WEIGHTS)
                dup = self.reg.register(o, WEIGHTS if is_weights else TENSOR)
                if dup:
                    self.add(label, node.op_type, f"{dup} (ImporterContext.cpp registerTensor)")

    def not_registered(self, name: str, op: str) -> str:
        why = self.reg.why_missing.get(name)
        what = f"{NOT_REGISTERED} (input '{name}' of this {op} node; kINVALID_GRAPH, ModelImporter.cpp parseNode)"
        return f"{what}: {why}" if why else what

    # -- control flow ------------------------------------------------------------------------------------------
    def walk_subgraphs(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            fn = self.functions.get((node.domain, op))
            if fn is not None:
                self.walk_function(fn, node, label, scope)
            return
        if op == "Loop":
            self.walk_loop(node, label, scope)
        elif op == "If":
            self.walk_if(node, label, scope)
        elif op == "Scan":
            self.walk_scan(node, label, scope)
        else:
            fn = self.functions.get((node.domain, op))
            if fn is not None:
                self.walk_function(fn, node, label, scope)
                return
            for a in node.attribute:  # any other graph attribute: its own scope, nothing registered for it
                graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for k, sub in enumerate(graphs):
                    self.body(sub, [], [], scope, f"{label}/{a.name}{'' if len(graphs) == 1 else f'[{k}]'}/", op)

    def body(self, g: onnx.GraphProto, register: list[str], looked_up: list[str], scope: Scope, prefix: str,
             op: str, missing: dict[str, str] | None = None) -> Scope:
        """One NameScope: register `register`, parse `g`, then look up `looked_up` (`ctx->tensors().at`)."""
        self.reg.push()
        for name, why in (missing or {}).items():
            if not self.reg.has(name):
                self.reg.why_missing[name] = why
        for name in register:
            dup = self.reg.register(name, TENSOR)
            if dup:
                self.add(prefix.rstrip("/"), op, f"{dup} (ImporterContext.cpp registerTensor)")
        bscope = build_scope(g, scope, self.base_dir)
        self.walk_graph(g, bscope, prefix)
        for name in looked_up:
            if not self.reg.has(name):
                self.add(prefix.rstrip("/"), op, f"body output '{name}' was not registered: the {op} importer looks it "
                                                  f"up with ctx->tensors().at() after parsing the body (it throws: "
                                                  f"kINVALID_NODE 'Invalid Node')")
        for name in missing or {}:
            self.reg.why_missing.pop(name, None)
        self.reg.pop()
        return bscope

    def walk_loop(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        g = attr(node, "body")
        if g is None:
            return
        ins = [i.name for i in g.input]
        outs = [o.name for o in g.output]
        trip = node.input[0] if node.input else ""
        cond = node.input[1] if len(node.input) > 1 else ""
        register, missing = [], {}
        if trip and not is_max_trip_count(trip, scope):
            register += ins[:1]
        elif ins:
            missing[ins[0]] = (f"'{ins[0]}' is the iteration-number input of Loop '{label}', which onnx-tensorrt "
                               f"registers only when the Loop has a trip count below INT_MAX (onnxOpImporters.cpp "
                               f"Loop importer, isMaxTripCount); this Loop has "
                               f"{'an INT_MAX trip count' if trip else 'no trip count'}")
        if cond:
            register += ins[1:2]
        elif len(ins) > 1:
            missing[ins[1]] = (f"'{ins[1]}' is the condition input of Loop '{label}', which onnx-tensorrt registers "
                               f"only when the Loop node has a `cond` input (onnxOpImporters.cpp Loop importer: "
                               f"`if (inputs[1])`); give the Loop a constant-true `cond`, or a body that does not read "
                               f"'{ins[1]}'")
        n_state = max(0, len(node.input) - 2)
        if len(ins) < 2 + n_state:
            self.add(label, "Loop", f"the body has {len(ins)} inputs for {n_state} loop-carried values: the importer "
                                    f"registers body.input(i) for every state input i (out of range)")
        register += ins[2:2 + n_state]
        looked_up = (outs[:1] if cond else []) + outs[1:]
        self.body(g, register, looked_up, scope, f"{label}/body/", "Loop", missing)

    def walk_if(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        then_g, else_g = attr(node, "then_branch"), attr(node, "else_branch")
        if then_g is None or else_g is None:
            return
        cond = node.input[0] if node.input else ""
        branches = [("then_branch", then_g), ("else_branch", else_g)]
        val = scope.const(cond) if cond and self.reg.kind(cond) == WEIGHTS else None
        if val is not None and val is not UNKNOWN and np.asarray(val).size == 1:
            # If importer: "For constant conditions, parse only the selected subgraph"
            branches = [branches[0] if bool(np.asarray(val).reshape(-1)[0]) else branches[1]]
        for name, g in branches:
            self.body(g, [], [o.name for o in g.output], scope, f"{label}/{name}/", "If")

    def walk_scan(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        g = attr(node, "body")
        if g is None:
            return
        n_in = len(node.input)  # opset >= 9: no sequence_lens input
        self.body(g, [i.name for i in g.input][:n_in], [o.name for o in g.output], scope, f"{label}/body/", "Scan")

    def walk_function(self, fn: onnx.FunctionProto, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        g = onnx.helper.make_graph(list(fn.node), fn.name, [], [])
        self.body(g, list(fn.input), list(fn.output), scope, f"{label}/{fn.name}/", node.op_type)


class _Collect(Walk):
    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.lines: list[str] = []

    def add(self, node: str, op: str, what: str, severity: str = "error") -> None:
        if severity == "error":
            self.lines.append(f"{node}({op}): {what}")


def registration_problems(model_or_path: onnx.ModelProto | str | os.PathLike,
                          trt_version: str = "10.3") -> list[str]:
    """Only the registration walk (no operator table): one line per read the importer would fail. For graphs
    TensorRT never builds whole (ONNX Runtime's form) whose plain-ONNX parts must still parse."""
    if isinstance(model_or_path, onnx.ModelProto):
        model, base = model_or_path, None
    else:
        model, base = onnx.load(str(model_or_path), load_external_data=False), str(os.path.dirname(model_or_path))
    w = _Collect(model, trt_version, base)
    w.run_walk()
    return w.lines


__all__ = ["Registry", "Walk", "toposort", "outer_refs", "is_max_trip_count", "registration_problems", "NOT_REGISTERED", "NOT_SORTED",
           "DUPLICATE"]
