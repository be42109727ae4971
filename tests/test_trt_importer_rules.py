"""The static TensorRT check read against onnx-tensorrt's importer: one planted graph per rule that fails it and a
fixed graph that passes (tiny onnx.helper graphs, no export), and the Stage 1 Loop as the previous code wrote it
(cond omitted, body reading cond_in) failing the registration walk with the importer's message.

Rule sources are in sts_export/export/tensorrt/parser_walk.py, parser_rules.py and parser_tables.py."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.export import Dim

from sts_export.export.tensorrt.check import check_model
from sts_export.export.tensorrt.parser_walk import NOT_REGISTERED, registration_problems, toposort
from sts_export.pruning.loop import translation_table

FLOAT, INT64, BOOL, INT4 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL, TensorProto.INT4


def vi(name: str, elem: int = FLOAT, shape: list | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def model(nodes: list, inputs: list, outputs: list, inits: list = (), opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def problems(m: onnx.ModelProto, version: str = "10.3") -> list[str]:
    return check_model(m, trt_version=version).problems


def passes(m: onnx.ModelProto, version: str = "10.3") -> bool:
    rep = check_model(m, trt_version=version)
    assert rep.ok, rep.format()
    return True


def one(m: onnx.ModelProto, version: str = "10.3") -> str:
    lines = problems(m, version)
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# The registration walk
# ---------------------------------------------------------------------------------------------------------------

def test_node_input_must_be_registered() -> None:
    bad = model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")], [vi("x", shape=[2])], [vi("y")])
    line = one(bad)
    assert line.startswith("g:add(Add): Node input was not registered.") and "'ghost'" in line
    fixed = model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")], [vi("x", shape=[2])], [vi("y")],
                  [const("ghost", np.ones(2, np.float32))])
    assert passes(fixed)


def _loop(body_nodes: list, body_extra_inputs: list = (), trip: str = "trip", cond: str = "",
          body_outputs: tuple = ("cond_out", "r_out"), inits: list = (), outer_nodes: list = (),
          outs: tuple = ("r_final",)) -> onnx.ModelProto:
    """Loop(trip, cond, r0) carrying r [1, 4]; the body's inputs are (i, cond_in, r_in)."""
    body = helper.make_graph(
        body_nodes, "body",
        [vi("i", INT64, []), vi("cond_in", BOOL, []), vi("r_in", FLOAT, [1, 4])] + list(body_extra_inputs),
        [vi(body_outputs[0], BOOL, [])] + [vi(o, FLOAT, [1, 4]) for o in body_outputs[1:]])
    nodes = list(outer_nodes) + [helper.make_node("Loop", [trip, cond, "r0"], list(outs), body=body, name="loop")]
    return model(nodes, [vi("r0", FLOAT, [1, 4])], [vi(o, FLOAT, None) for o in outs],
                 [const("trip", np.array(3, np.int64)), const("one", np.ones((1, 4), np.float32))] + list(inits))


STEP = helper.make_node("Add", ["r_in", "one"], ["r_out"], name="step")


def test_loop_cond_in_is_registered_only_with_a_cond() -> None:
    reads_cond = [STEP, helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")]
    line = one(_loop(reads_cond))  # onnxscript's `for i in range(n)` body, no cond input
    assert line.startswith("g:loop/body/keep_going(Identity): " + NOT_REGISTERED)
    assert "'cond_in'" in line and "Loop 'loop'" in line and "`cond`" in line
    for version in ("10.16", "11.4"):
        assert any("cond_in" in p for p in problems(_loop(reads_cond), version))
    with_cond = _loop(reads_cond, cond="true", inits=[const("true", np.array(True))])
    assert passes(with_cond) and passes(with_cond, "11.4")
    count_only = [STEP, helper.make_node("Less", ["i", "trip"], ["cond_out"], name="more_steps")]  # what ships
    assert passes(_loop(count_only)) and passes(_loop(count_only), "10.16") and passes(_loop(count_only), "11.4")


def test_loop_iteration_input_needs_a_trip_count_below_int_max() -> None:
    reads_i = [STEP, helper.make_node("Less", ["i", "trip"], ["cond_out"], name="more_steps")]
    int_max = _loop(reads_i, trip="forever", cond="true",
                    inits=[const("forever", np.array(2**31 - 1, np.int64)), const("true", np.array(True))])
    line = one(int_max)
    assert line.startswith("g:loop/body/more_steps(Less): " + NOT_REGISTERED) and "'i'" in line and "INT_MAX" in line
    no_trip = _loop(reads_i, trip="", cond="true", inits=[const("true", np.array(True))])
    assert "no trip count" in one(no_trip)
    below = _loop(reads_i, trip="many", cond="true",
                  inits=[const("many", np.array(2**31 - 2, np.int64)), const("true", np.array(True))])
    assert passes(below)


def test_loop_body_names_do_not_outlive_the_loop() -> None:
    # NameScope: what the body registers is dropped when the Loop's import ends
    body = [STEP, helper.make_node("Less", ["i", "trip"], ["cond_out"], name="more_steps")]
    bad = _loop(body, outs=("r_final",))
    bad.graph.node.append(helper.make_node("Identity", ["r_out"], ["leak"], name="after"))
    bad.graph.output.append(vi("leak"))
    line = one(bad)
    assert line.startswith("g:after(Identity): " + NOT_REGISTERED) and "'r_out'" in line
    bad.graph.node[-1].input[0] = "r_final"  # the Loop's own output
    assert passes(bad)


def test_loop_body_output_must_be_registered() -> None:
    bad = _loop([STEP, helper.make_node("Less", ["i", "trip"], ["cond_out"], name="more_steps")],
                body_outputs=("cond_out", "r_typo"))
    line = one(bad)
    assert line.startswith("g:loop/body(Loop): body output 'r_typo' was not registered")
    fixed = _loop([STEP, helper.make_node("Less", ["i", "trip"], ["cond_out"], name="more_steps")])
    assert passes(fixed)


def test_outer_name_produced_later_is_an_edge_from_11_0() -> None:
    # 10.x toposort follows node.input() only; 11.0 adds the names a subgraph reads from outer scopes
    body = [helper.make_node("Add", ["r_in", "late"], ["r_out"], name="step"),
            helper.make_node("Less", ["i", "trip"], ["cond_out"], name="more_steps")]
    m = _loop(body)
    m.graph.node.append(helper.make_node("Identity", ["one"], ["late"], name="late_producer"))  # after the Loop
    line = one(m, "10.16")
    assert line.startswith("g:loop/body/step(Add): " + NOT_REGISTERED) and "'late'" in line
    assert passes(m, "11.0") and passes(m, "11.4")
    m.graph.node.insert(0, m.graph.node.pop())  # produced before the Loop: fine everywhere
    assert passes(m, "10.3") and passes(m, "10.16")


def test_toposort_rejects_duplicate_outputs_and_cycles() -> None:
    dup = model([helper.make_node("Relu", ["x"], ["y"], name="a"), helper.make_node("Neg", ["x"], ["y"], name="b")],
                [vi("x", shape=[2])], [vi("y")])
    line = one(dup)
    assert "Failed to sort the model topologically." in line and "Output name is not unique: 'y'" in line
    cycle = model([helper.make_node("Add", ["x", "b"], ["a"], name="n1"),
                   helper.make_node("Relu", ["a"], ["b"], name="n2")], [vi("x", shape=[2])], [vi("b")])
    assert "cycle" in one(cycle)
    ok = model([helper.make_node("Relu", ["x"], ["y1"], name="a"), helper.make_node("Neg", ["y1"], ["y"], name="b")],
               [vi("x", shape=[2])], [vi("y")])
    assert passes(ok)
    order, _ = toposort(list(reversed(ok.graph.node)), (10, 3))  # node order is the importer's, not the file's
    assert order == [1, 0]


def test_omitted_optional_outputs_count_as_names_before_10_6() -> None:
    # two Dropouts with their optional mask omitted: before 10.6 toposort registers "" twice
    m = model([helper.make_node("Dropout", ["x"], ["a", ""], name="d1"),
               helper.make_node("Dropout", ["a"], ["y", ""], name="d2")], [vi("x", shape=[2])], [vi("y")])
    assert "Output name is not unique: ''" in one(m, "10.3")
    assert passes(m, "10.6") and passes(m, "10.16")


def test_duplicate_tensor_name_in_one_scope_but_shadowing_is_fine() -> None:
    body = [STEP, helper.make_node("Less", ["i", "trip"], ["cond_out"], name="more_steps")]
    dup = _loop(body)
    dup.graph.node[0].attribute[0].g.initializer.append(const("r_in", np.zeros((1, 4), np.float32)))
    assert "ONNX graph has duplicate tensor name: r_in" in one(dup)
    shadow = _loop(body)  # a body initializer named like an outer one shadows it
    shadow.graph.node[0].attribute[0].g.initializer.append(const("one", np.ones((1, 4), np.float32)))
    assert passes(shadow)


def _if(cond_name: str, inits: list, inputs: list) -> onnx.ModelProto:
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"], name="t_relu")], "then", [], [vi("t")])
    else_g = helper.make_graph([helper.make_node("Add", ["x", "ghost"], ["e"], name="e_add")], "else", [], [vi("e")])
    return model([helper.make_node("If", [cond_name], ["y"], then_branch=then_g, else_branch=else_g, name="if")],
                 [vi("x", shape=[2])] + inputs, [vi("y")], inits)


def test_if_with_a_constant_condition_imports_only_its_branch() -> None:
    taken_then = _if("c", [const("c", np.array(True))], [])
    assert passes(taken_then)  # the else branch (reading an unregistered name) is never imported
    taken_else = _if("c", [const("c", np.array(False))], [])
    assert one(taken_else).startswith("g:if/else_branch/e_add(Add): " + NOT_REGISTERED)
    runtime = _if("c", [], [vi("c", BOOL, [])])  # both branches are imported
    assert "'ghost'" in one(runtime)


def test_if_branches_need_the_same_number_of_outputs() -> None:
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"], name="t1"),
                                helper.make_node("Neg", ["x"], ["t2"], name="t2")], "then", [], [vi("t"), vi("t2")])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="e1")], "else", [], [vi("e")])
    bad = model([helper.make_node("If", ["c"], ["y", "y2"], then_branch=then_g, else_branch=else_g, name="if")],
                [vi("x", shape=[2]), vi("c", BOOL, [])], [vi("y"), vi("y2")])
    assert any("then/else subgraphs should have the same number of outputs" in p for p in problems(bad))
    (else_g,) = [a.g for a in bad.graph.node[0].attribute if a.name == "else_branch"]  # make_node copied it
    else_g.node.append(helper.make_node("Relu", ["x"], ["e2"], name="e2"))
    else_g.output.append(vi("e2"))
    assert passes(bad)


def test_scan_registers_its_state_and_scan_inputs() -> None:
    body = helper.make_graph([helper.make_node("Add", ["acc_in", "row"], ["acc_out"], name="acc"),
                              helper.make_node("Identity", ["acc_out"], ["scan_out"], name="emit")], "body",
                             [vi("acc_in", FLOAT, [4]), vi("row", FLOAT, [4])],
                             [vi("acc_out", FLOAT, [4]), vi("scan_out", FLOAT, [4])])
    m = model([helper.make_node("Scan", ["acc0", "xs"], ["acc", "ys"], body=body, num_scan_inputs=1, name="scan")],
              [vi("acc0", FLOAT, [4]), vi("xs", FLOAT, [3, 4])], [vi("acc"), vi("ys")], opset=17)
    assert passes(m)
    m.graph.node[0].attribute[0].g.node[0].input[1] = "ghost"  # make_node copied the body
    assert one(m).startswith("g:scan/body/acc(Add): " + NOT_REGISTERED)


def test_graph_output_must_be_produced() -> None:
    bad = model([helper.make_node("Relu", ["x"], ["y"], name="r")], [vi("x", shape=[2])], [vi("y"), vi("z")])
    assert "graph output 'z' is produced by no node" in one(bad)
    bad.graph.output.pop()
    assert passes(bad)


# ---------------------------------------------------------------------------------------------------------------
# Per-op preconditions
# ---------------------------------------------------------------------------------------------------------------

def _topk(k: int | None) -> onnx.ModelProto:
    inits = [] if k is None else [const("k", np.array([k], np.int64))]
    ins = [vi("x", shape=[1, 5000])] + ([vi("k", INT64, [1])] if k is None else [])
    return model([helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0, name="topk")], ins,
                 [vi("v"), vi("i", INT64)], inits)


def test_topk_k_up_to_3840_and_k_may_be_a_tensor() -> None:
    assert "K=3841 > 3840" in one(_topk(3841))
    assert passes(_topk(3840)) and passes(_topk(3840), "11.4")  # sorted=0 is taken (TensorRT always sorts)
    rep = check_model(_topk(None))  # K fed at runtime: the importer takes it (setInput(1))
    assert rep.ok and any("runtime tensor" in w for w in rep.warnings)


def test_loop_needs_a_trip_limit_and_scan_outputs_a_trip_count() -> None:
    cond_body = [STEP, helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")]
    while_loop = _loop(cond_body, trip="", cond="true", inits=[const("true", np.array(True))])
    assert passes(while_loop)  # a kWHILE limit
    no_limit = _loop([STEP, helper.make_node("Identity", ["r_in"], ["c_f"], name="c"),
                      helper.make_node("Cast", ["c_f"], ["cond_out"], to=BOOL, name="cc")], trip="")
    assert any("no trip limit" in p for p in problems(no_limit))
    # a scan output without a trip count: refused from 10.11, a dummy length of 1024 before (refused when used)
    scan = _loop(cond_body + [helper.make_node("Identity", ["r_out"], ["r_scan"], name="emit")], trip="", cond="true",
                 body_outputs=("cond_out", "r_out", "r_scan"), inits=[const("true", np.array(True))],
                 outs=("r_final", "r_all"))
    assert "TensorRT cannot infer the shape of scan output" in one(scan, "10.16")
    assert "dummy length of 1024" in one(scan, "10.3")
    scan.graph.output.pop()  # the scan output unused: 10.3 builds it
    assert passes(scan, "10.3") and not check_model(scan, trt_version="10.16").ok
    counted = _loop([STEP, helper.make_node("Less", ["i", "trip"], ["cond_out"], name="more_steps"),
                     helper.make_node("Identity", ["r_out"], ["r_scan"], name="emit")],
                    body_outputs=("cond_out", "r_out", "r_scan"), outs=("r_final", "r_all"))
    assert passes(counted, "10.16") and passes(counted, "11.4")


def test_loop_carried_shape_must_not_change() -> None:
    grows = [helper.make_node("Concat", ["r_in", "one"], ["r_out"], axis=0, name="grow"),
             helper.make_node("Less", ["i", "trip"], ["cond_out"], name="more_steps")]
    m = _loop(grows)
    m.graph.node[0].attribute[0].g.output[1].CopyFrom(vi("r_out", FLOAT, None))
    assert "changes" in one(m) and "shape" in one(m)
    assert passes(_loop([STEP, helper.make_node("Less", ["i", "trip"], ["cond_out"], name="more_steps")]))


@pytest.mark.parametrize("op,until,message", [
    ("Squeeze", "10.7", "Squeeze axes input must be an initializer!"),
    ("Unsqueeze", "10.7", "Axes input for unsqueeze operation should be a constant tensor."),
    ("CumSum", "10.8", "Axis input for CumSum must be an initializer!"),
    ("ReduceSum", None, "Axis input must be an initializer!"),
])
def test_axes_inputs_constant_until_the_release_that_lifted_it(op: str, until: str | None, message: str) -> None:
    x_shape = [4, 1] if op == "Squeeze" else [4, 3]
    nodes = [helper.make_node(op, ["x", "ax"], ["y"], name="n")]
    runtime = model(nodes, [vi("x", shape=x_shape), vi("ax", INT64, [1] if op != "CumSum" else [])], [vi("y")],
                    opset=18)
    assert message in one(runtime, "10.3")
    if until:
        assert passes(runtime, until) and passes(runtime, "11.4")
    else:
        assert message in one(runtime, "11.4")
    fixed = model(nodes, [vi("x", shape=x_shape)], [vi("y")],
                  [const("ax", np.array([1] if op != "CumSum" else 1, np.int64))], opset=18)
    assert passes(fixed, "10.3")


def test_slice_axes_tensor_from_10_3() -> None:
    m = model([helper.make_node("Slice", ["x", "s", "e", "ax"], ["y"], name="slice")],
              [vi("x", shape=[4, 4]), vi("ax", INT64, [1])], [vi("y")],
              [const("s", np.array([0], np.int64)), const("e", np.array([2], np.int64))])
    assert "This version of TensorRT does not support dynamic axes." in one(m, "10.2")
    assert passes(m, "10.3")


def test_squeeze_without_axes_needs_a_static_shape() -> None:
    dynamic = model([helper.make_node("Squeeze", ["x"], ["y"], name="sq")], [vi("x", shape=["B", 1])], [vi("y")])
    assert "Cannot infer squeeze dimensions from a dynamic shape!" in one(dynamic)
    static = model([helper.make_node("Squeeze", ["x"], ["y"], name="sq")], [vi("x", shape=[2, 1])], [vi("y")])
    assert passes(static)


def test_range_types() -> None:
    def rng(t_limit: int, t_rest: int) -> onnx.ModelProto:
        return model([helper.make_node("Range", ["a", "b", "c"], ["y"], name="range")],
                     [vi("a", t_rest, []), vi("b", t_limit, []), vi("c", t_rest, [])], [vi("y", t_rest)])
    assert "types for start, limit, and delta must be identical" in one(rng(TensorProto.INT32, INT64))
    assert "Range for FP32, INT32, INT64 only" in one(rng(TensorProto.FLOAT16, TensorProto.FLOAT16))
    assert passes(rng(INT64, INT64)) and passes(rng(FLOAT, FLOAT))


def test_expand_shape_is_1d_and_split_takes_one_way_of_sizing() -> None:
    expand = model([helper.make_node("Expand", ["x", "shp"], ["y"], name="ex")], [vi("x", shape=[1, 4])], [vi("y")],
                   [const("shp", np.array([[2, 4]], np.int64))])
    assert "The shape tensor is required to be 1D." in one(expand)
    expand.graph.initializer[0].CopyFrom(const("shp", np.array([2, 4], np.int64)))
    assert passes(expand)
    split = model([helper.make_node("Split", ["x", "sz"], ["a", "b"], axis=1, num_outputs=2, name="split")],
                  [vi("x", shape=[1, 4])], [vi("a"), vi("b")], [const("sz", np.array([2, 2], np.int64))], opset=18)
    assert "But not both." in one(split)
    del split.graph.node[0].attribute[:]
    split.graph.node[0].attribute.append(helper.make_attribute("axis", 1))
    assert passes(split)


def test_scatternd_reduction_attribute_per_release() -> None:
    def scatter(**attrs) -> onnx.ModelProto:
        return model([helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], name="sc", **attrs)],
                     [vi("x", shape=[4, 2])], [vi("y")],
                     [const("idx", np.array([[1]], np.int64)), const("upd", np.ones((1, 2), np.float32))], opset=18)
    assert "Attribute reduction is not supported." in one(scatter(reduction="none"), "10.3")
    assert passes(scatter(reduction="none"), "10.16") and passes(scatter(), "10.3")
    assert "ScatterND with reduction is not supported." in one(scatter(reduction="add"), "11.4")


def _dq(w: onnx.TensorProto, scale: np.ndarray, axis: int | None = None, zp: onnx.TensorProto | None = None,
        block: int | None = None) -> onnx.ModelProto:
    attrs = {k: v for k, v in (("axis", axis), ("block_size", block)) if v is not None}
    ins = ["w", "s"] + (["zp"] if zp is not None else [])
    inits = [w, const("s", scale)] + ([zp] if zp is not None else [])
    return model([helper.make_node("DequantizeLinear", ins, ["wd"], name="dq", **attrs),
                  helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")],
                 [vi("x", shape=[2, 4])], [vi("y")], inits, opset=21)


def test_dequantize_linear_importer_asserts() -> None:
    w8 = helper.make_tensor("w", TensorProto.INT8, [4, 6], [1] * 24)
    assert "Scale coefficients must all be positive" in one(_dq(w8, np.array([0.1, 0.0, 0.1, 0.1], np.float32), 0))
    assert "number of scales is not equal to the number of output channels" in one(
        _dq(w8, np.full(3, 0.1, np.float32), 0))
    assert passes(_dq(w8, np.full(4, 0.1, np.float32), 0))
    zp = helper.make_tensor("zp", TensorProto.INT8, [4], [1, 0, 0, 0])
    assert "symmetric" in one(_dq(w8, np.full(4, 0.1, np.float32), 0, zp))
    w4_odd = helper.make_tensor("w", INT4, [4, 129], [0] * (4 * 129))
    lines = problems(_dq(w4_odd, np.full((4, 2), 0.1, np.float32), 1, block=64))
    assert any("INT4 is not supported for tensors with an odd last dimension" in p for p in lines)
    w4 = helper.make_tensor("w", INT4, [4, 128], [0] * 512)
    assert passes(_dq(w4, np.full((4, 2), 0.1, np.float32), 1, block=64))


def test_outputs_the_importer_does_not_produce() -> None:
    ln = model([helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], name="ln")], [vi("x", shape=[2, 4])],
               [vi("y"), vi("mean")], [const("g", np.ones(4, np.float32))])
    assert "Node has more output tensors than TRT expected" in one(ln)
    ln.graph.node[0].output[1] = ""
    ln.graph.output.pop()
    assert passes(ln)


def test_resize_modes_and_dropout_training() -> None:
    def resize(**attrs) -> onnx.ModelProto:
        return model([helper.make_node("Resize", ["x", "", "sc"], ["y"], name="rs", **attrs)],
                     [vi("x", shape=[1, 1, 2, 2])], [vi("y")], [const("sc", np.array([1, 1, 2, 2], np.float32))],
                     opset=18)
    assert passes(resize(mode="cubic"))  # the importer knows cubic (the old table said nearest/linear only)
    assert "antialias" in one(resize(mode="linear", antialias=1))
    assert "Unsupported coordinate transformation mode tf_crop_and_resize" in one(
        resize(coordinate_transformation_mode="tf_crop_and_resize"))
    drop = model([helper.make_node("Dropout", ["x", "", "train"], ["y"], name="dr")], [vi("x", shape=[2])], [vi("y")],
                 [const("train", np.array(True))], opset=17)
    assert "training mode" in one(drop)
    drop.graph.initializer[0].CopyFrom(const("train", np.array(False)))
    assert passes(drop)


def test_relaxed_to_what_the_importer_takes() -> None:
    nz = model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [vi("x", INT64, [4])], [vi("y", INT64)])
    assert passes(nz)  # the importer lists INT64 (operators.md said FP32, FP16)
    nz.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8  # a network input, but not in NonZero's list
    assert "NonZero for FP32" in one(nz)
    dbl = model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], [vi("x", shape=[2])], [vi("y")],
                [const("w", np.ones(2, np.float64))])
    rep = check_model(dbl)  # convertDtype maps DOUBLE to kFLOAT: computed as float32, with a warning
    assert rep.ok and any("DOUBLE" in w for w in rep.warnings)
    dbl.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT32  # a type TensorRT has none for
    assert "UINT32" in problems(dbl)[0]
    old = model([helper.make_node("Relu", ["x"], ["y"], name="r")], [vi("x", shape=[2])], [vi("y")], opset=6)
    rep = check_model(old)  # importModel only warns below opset 7
    assert rep.ok and any("opset 6" in w for w in rep.warnings)


# ---------------------------------------------------------------------------------------------------------------
# The Stage 1 Loop as exported (sts_export.pruning.loop), and as the previous code wrote it
# ---------------------------------------------------------------------------------------------------------------

class _Greedy(torch.nn.Module):
    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, 6] picks
        return torch.ops.sts.potential_energy_picks(features, torch.zeros(features.shape[0], dtype=torch.int64), 6)


def legacy_stage1_loop(m: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The Stage 1 Loop as the onnxscript `for` loop wrote it before: no `cond`, the body's `cond_out` =
    Identity(cond_in). Returns (a copy of `m` rewritten so, the Loop node's name)."""
    legacy = onnx.ModelProto()
    legacy.CopyFrom(m)
    (loop,) = [n for n in legacy.graph.node if n.op_type == "Loop"]
    assert loop.input[1] == ""  # what ships: no cond
    body = loop.attribute[0].g
    cond_in, cond_out = body.input[1].name, body.output[0].name
    (producer,) = [n for n in body.node if cond_out in n.output]
    assert cond_in not in producer.input  # what ships: cond_in never read
    body.node.remove(producer)
    body.node.append(helper.make_node("Identity", [cond_in], [cond_out], name="legacy_cond"))
    return legacy, loop.name


@pytest.fixture(scope="module")
def stage1() -> onnx.ModelProto:
    f = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(0))
    # (an output named like a name inside the translation, e.g. "picks", makes torch.onnx write it twice: the walk
    # then fails the graph's toposort, "Output name is not unique")
    return torch.onnx.export(_Greedy().eval(), (f,), dynamo=True, input_names=["features"], output_names=["keep"],
                             dynamic_shapes=({0: Dim("B", max=8), 1: Dim("N", min=2, max=4096)},),
                             custom_translation_table=translation_table(), verbose=False).model_proto


def test_exported_stage1_loop_passes_every_version(stage1: onnx.ModelProto) -> None:
    for version in ("10.3", "10.16", "11.4"):
        assert registration_problems(stage1, version) == []
        rep = check_model(stage1, trt_version=version)
        assert rep.ok and rep.warnings == [], rep.format()


def test_previous_stage1_loop_fails_the_walk(stage1: onnx.ModelProto) -> None:
    legacy, loop_name = legacy_stage1_loop(stage1)
    for version in ("10.3", "10.16", "11.4"):
        (line,) = problems(legacy, version)
        assert line.startswith(f"{legacy.graph.name}:{loop_name}/body/legacy_cond(Identity): {NOT_REGISTERED}"), line
        assert "'cond_in'" in line and f"Loop '{loop_name}'" in line
        assert registration_problems(legacy, version) == [line.split(":", 1)[1]]
