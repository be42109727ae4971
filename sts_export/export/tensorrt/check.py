"""Static TensorRT compatibility check of ONNX graphs (needs only `onnx` and numpy, no TensorRT, no GPU).

`check_model(path_or_model, trt_version="10.3")` replays TensorRT's ONNX parser (onnx-tensorrt) over a graph and
reports what it would refuse or compute differently, with the parser's own message where it has one:

* the registration walk (`parser_walk`): names registered as the importer registers them (graph outputs as
  placeholders, graph inputs, initializers, node outputs in the importer's topological order; Loop/If/Scan bodies in
  name scopes, a Loop's iteration input only with a trip count below INT_MAX and its `cond_in` only with a `cond`),
  and every read of a name not registered: "Node input was not registered.", naming the node, op and input;
* the operator table (`parser_tables`): op types the parser has no importer for in that release, custom-domain ops
  (plugins), tensor types TensorRT cannot hold, the per-op type column, inputs that must be build-time constants
  before the release that lifted it;
* the importers' own preconditions (`parser_rules`): TopK's K bound, Loop trip limits, scan outputs and carried
  shapes, Squeeze without axes, Range/Expand/Split/ScatterND/DequantizeLinear/Resize/Dropout asserts, outputs the
  importer does not produce.

Every rule names its source (file, function, release) where it is encoded; docs/tensorrt.md says what the check
verifies and what it cannot. Weights are never loaded (`load_external_data=False`), so multi-GB exports check in
seconds.

Versions: `parse_version` accepts "10.3", "10.16.1" or "11.4.1.2" (2 to 4 numbers) of TensorRT 10.x or 11.x and
refuses anything else (`VersionError`, a one-line StsError that is also a ValueError); `parse_versions("10.3,11.4")`
reads a comma-separated list; `default_version()` is the installed TensorRT's major.minor, else 10.3 (JetPack 6.1/6.2).
"""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import onnx

from sts_export.export.tensorrt.parser_rules import Rules
from sts_export.export.tensorrt.parser_tables import (CONST_INPUT_UNTIL, CONTROL_FLOW, KNOWN_RELEASES, OPS_10_1, SUPPORTED, TABLE_LATEST, TOPK_MAX_K, TYPE_TOKEN, TYPED_SLOT, VersionError, default_version, max_opset, op_table, parse_version, parse_versions, version_label)
from sts_export.export.tensorrt.parser_values import Scope, used_names
from sts_export.export.tensorrt.parser_walk import Walk

__all__ = ["check_model", "check_dir", "format_reports", "problems_of", "Report", "Issue", "VersionError",
           "SUPPORTED", "OPS_10_1", "TOPK_MAX_K", "default_version", "max_opset", "op_table", "parse_version",
           "parse_versions", "version_label"]

# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Issue:
    graph: str
    node: str
    op: str
    what: str
    severity: str = "error"  # "error" (TensorRT rejects or computes something else) | "warning"

    def line(self) -> str:
        return f"{self.graph}:{self.node}({self.op}): {self.what}"


@dataclass
class Report:
    """Result of `check_model`: `.ok`, `.problems` (one line each), `.warnings`, `.format()`."""

    graph: str
    trt_version: str
    issues: list[Issue] = field(default_factory=list)
    num_nodes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(i.severity == "error" for i in self.issues)

    @property
    def problems(self) -> list[str]:
        return [i.line() for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[str]:
        return [i.line() for i in self.issues if i.severity == "warning"]

    def format(self, width: int = 120) -> str:
        """A text table: one row per issue (errors first), under a one-line verdict."""
        n_err = len(self.problems)
        verdict = "OK" if self.ok else f"{n_err} problem{'s' * (n_err != 1)}"
        head = f"{self.graph}: {verdict} ({self.num_nodes} nodes, TensorRT {self.trt_version} ONNX parser table)"
        rows = sorted(self.issues, key=lambda i: i.severity != "error")
        if not rows:
            return head
        cells = [(("E" if i.severity == "error" else "W"), i.node, i.op, i.what) for i in rows]
        w_node = min(max(len(c[1]) for c in cells + [("", "node", "", "")]), 48)
        w_op = min(max(len(c[2]) for c in cells + [("", "", "op", "")]), 20)
        w_what = max(30, width - w_node - w_op - 6)
        lines = [head, f"  {'':1} {'node':<{w_node}} {'op':<{w_op}} what", "  " + "-" * (w_node + w_op + w_what + 3)]
        pad = " " * (w_node + w_op + 5)
        for sev, node, op, what in cells:
            node = node if len(node) <= w_node else "…" + node[-(w_node - 1):]
            wrapped = textwrap.wrap(what, w_what) or [""]
            lines.append(f"  {sev} {node:<{w_node}} {op[:w_op]:<{w_op}} {wrapped[0]}")
            lines.extend(pad + more for more in wrapped[1:])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def format_reports(reports: dict[str, Report]) -> str:
    """All reports of `check_dir`, one table per graph."""
    return "\n\n".join(r.format() for r in reports.values())


# ---------------------------------------------------------------------------------------------------------------
# The checker: the importer's walk (parser_walk) with the table and rules at each node
# ---------------------------------------------------------------------------------------------------------------

class _Checker(Walk, Rules):
    def __init__(self, model: onnx.ModelProto, graph_name: str, trt_version: str, base_dir: str | None) -> None:
        super().__init__(model, trt_version, base_dir)
        self.graph_name = graph_name
        self.table = op_table(self.ver)
        self.report = Report(graph_name, trt_version)
        self.flagged_tensors: set[str] = set()
        self.read_names = used_names(model.graph) | {o.name for o in model.graph.output}

    def add(self, node: str, op: str, what: str, severity: str = "error") -> None:
        self.report.issues.append(Issue(self.graph_name, node, op, what, severity))

    # -- tensors ----------------------------------------------------------------------------------------------
    def visit_graph(self, g: onnx.GraphProto, scope: Scope, prefix: str) -> None:
        """Tensor types TensorRT cannot hold (ModelImporter.cpp importInput / convertDtype; UINT8 only as network
        input/output: parseNode, 10.1 GA .. 11.0)."""
        graph_inputs = {i.name for i in g.input}
        for name, (elem, _) in scope.types.items():
            if not elem or name in self.flagged_tensors:
                continue
            what = self.dtype_problem(elem, name, scope)
            if what is None:
                continue
            severity = "warning" if what.startswith("tensor '" + name + "' is DOUBLE") else "error"
            self.flagged_tensors.add(name)
            if name in scope.producers:
                node, op = scope.producers[name]
                node = prefix + node
            elif name in graph_inputs:
                node, op = prefix + name, "input"
            else:
                node, op = prefix + name, "initializer"
            self.add(node, op, what, severity)

    def dtype_problem(self, elem: int, name: str, scope: Scope) -> str | None:
        tname = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else str(elem)
        token = TYPE_TOKEN.get(tname)
        if tname == "DOUBLE":  # importerUtils.cpp convertDtype: DOUBLE -> kFLOAT; WeightsContext::convertDouble clamps
            return (f"tensor '{name}' is DOUBLE: TensorRT computes it as float32 (the parser maps DOUBLE to kFLOAT and "
                    f"clamps DOUBLE weights at +-FLT_MAX); export it as float32")
        if token is None or (token == "FP4" and self.ver < (10, 8)):
            return f"tensor '{name}' is {tname}: TensorRT {self._v()} has no such type"
        if token == "UINT8" and scope.parent is None and name not in scope.graph_io and name in scope.producers:
            return f"tensor '{name}' is UINT8: TensorRT takes UINT8 only as a network input/output"
        return None

    # -- nodes ------------------------------------------------------------------------------------------------
    def visit(self, node: onnx.NodeProto, label: str, scope: Scope) -> None:
        op = node.op_type
        self.report.num_nodes += 1
        self.report.op_counts[op] = self.report.op_counts.get(op, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            if (node.domain, op) not in self.functions:  # ModelImporter.cpp parseNode: FallbackPluginImporter
                self.add(label, op, f"custom op (domain '{node.domain}'): TensorRT needs a plugin registered for "
                                    f"'{op}'; none ships with TensorRT's ONNX parser")
            return
        if op not in self.table:
            if (node.domain, op) not in self.functions:
                self.add(label, op, f"op '{op}' is not in the TensorRT {self._v()} ONNX parser's support table "
                                    f"(no importer; it would need a plugin)")
            return
        types = self.table[op]
        if types is None:
            self.add(label, op, f"op '{op}' is listed as unsupported by the TensorRT {self._v()} ONNX parser")
            return
        self.check_op_dtype(node, label, scope, types)
        rule = getattr(self, f"rule_{op}", None)
        if rule is not None:
            rule(node, label, scope)
        for (rop, idx), (until, what, message) in CONST_INPUT_UNTIL.items():
            if rop == op and self.ver < until:
                self.need_const_input(node, label, scope, idx, what, message)

    def check_op_dtype(self, node: onnx.NodeProto, label: str, scope: Scope, types: tuple[str, ...]) -> None:
        if node.op_type in CONTROL_FLOW and node.op_type != "If":
            return
        kind, idx = TYPED_SLOT.get(node.op_type, ("in", 0))
        names = node.input if kind == "in" else node.output
        if idx >= len(names) or not names[idx]:
            return
        t = scope.type(names[idx])
        if t is None or not t[0]:
            return
        tname = onnx.TensorProto.DataType.Name(t[0]) if t[0] in onnx.TensorProto.DataType.values() else "?"
        token = TYPE_TOKEN.get(tname)
        if token is None or names[idx] in self.flagged_tensors:
            return  # reported once as an impossible tensor type
        if token not in types:
            self.add(label, node.op_type, f"{'input' if kind == 'in' else 'output'} '{names[idx]}' is {tname}; the "
                                          f"TensorRT {self._v()} parser table lists {node.op_type} for "
                                          f"{', '.join(types)} only")

    def need_const_input(self, node: onnx.NodeProto, label: str, scope: Scope, idx: int, what: str,
                         message: str) -> None:
        if idx < len(node.input) and node.input[idx] and not scope.is_weights(node.input[idx]):
            self.add(label, node.op_type, f"{message} (`{what}` '{node.input[idx]}' must be an initializer or "
                                          f"Constant for the TensorRT {self._v()} parser)")

    def run(self) -> Report:
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                if imp.version < 7:  # importModel: "Models using older opsets are not guaranteed to work"
                    self.add("<model>", "opset", f"opset {imp.version} < 7: TensorRT supports ONNX graphs from opset 7 "
                                                 f"(the parser warns that older opsets are not guaranteed to work)",
                             "warning")
                elif imp.version > max_opset(self.ver):
                    self.add("<model>", "opset", f"opset {imp.version} is newer than the {max_opset(self.ver)} "
                                                 f"TensorRT {self._v()} documents (the parser only warns)", "warning")
        if self.ver > TABLE_LATEST:
            self.add("<model>", "table", f"the encoded table ends at TensorRT {TABLE_LATEST[0]}.{TABLE_LATEST[1]}; "
                                         f"{self._v()} may support more", "warning")
        elif self.ver not in KNOWN_RELEASES:
            known = max(r for r in KNOWN_RELEASES if r <= self.ver)
            self.add("<model>", "table", f"TensorRT {self._v()} is not a release the table has a row for; checked "
                                         f"with the {known[0]}.{known[1]} table", "warning")
        self.run_walk()
        return self.report


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------

def _load(model_or_path: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, str, str | None]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, (model_or_path.graph.name or "model"), None
    path = Path(model_or_path)
    model = onnx.load(str(path), load_external_data=False)
    return model, path.stem, str(path.parent)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape/type inference without weights; the model unchanged when inference fails (e.g. > 2 GB inline)."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best-effort; declared types are still checked
        return model


def check_model(model_or_path: onnx.ModelProto | str | os.PathLike, *, trt_version: str = "10.3",
                name: str | None = None) -> Report:
    """Check one ONNX model (a path or a ModelProto; weights are not loaded) against TensorRT's ONNX parser."""
    model, stem, base_dir = _load(model_or_path)
    return _Checker(_infer(model), name or stem, trt_version, base_dir).run()


def check_dir(onnx_dir: str | os.PathLike, *, trt_version: str = "10.3") -> dict[str, Report]:
    """`check_model` on every `*.onnx` of a directory, keyed by graph name (the file stem); an export's ORT form
    (`*.ort.onnx`: ONNX Runtime's fused kernels, never built by TensorRT) is not TensorRT's and is left out."""
    paths = sorted(p for p in Path(onnx_dir).glob("*.onnx") if not p.name.endswith(".ort.onnx"))
    return {p.stem: check_model(p, trt_version=trt_version) for p in paths}


def problems_of(reports: Iterable[Report]) -> list[str]:
    """Every problem line of several reports (for a single error message)."""
    return [line for r in reports for line in r.problems]
