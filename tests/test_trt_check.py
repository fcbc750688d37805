"""Static TensorRT-compatibility checker on small hand-built graphs."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from asyncfgd.exporter.trt_check import (
    check_trt_compat,
)


def _model(nodes, inputs, outputs, inits=(), opset=17, functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(f.domain, 1) for f in functions]
    return helper.make_model(graph, opset_imports=imports, functions=list(functions))


def _t(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _by_node(issues, name):
    return [i for i in issues if i.node == name]


def clean_model():
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w.conv")
    fc = numpy_helper.from_array(np.ones((5, 4), np.float32), "w.fc")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [
        helper.make_node("Conv", ["x", "w.conv"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ReduceMean", ["r", "axes"], ["p"], name="gap", keepdims=0),
        helper.make_node("Gemm", ["p", "w.fc"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, [_t("x", ["N", 3, 8, 8])], [_t("y", ["N", 5])], [w, fc, axes], opset=18)


def test_clean_graph_passes(tmp_path):
    model = clean_model()
    onnx.checker.check_model(model)
    assert check_trt_compat(model) == []
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert check_trt_compat(path) == []  # from a file too


def test_maxpool_indices_output_is_an_error():
    node = helper.make_node("MaxPool", ["x"], ["y", "idx"], name="pool1", kernel_shape=[2, 2])
    model = _model([node], [_t("x", ["N", 3, 8, 8])],
                   [_t("y", ["N", 3, 4, 4]), _t("idx", ["N", 3, 4, 4], TensorProto.INT64)])
    errors = [i for i in _by_node(check_trt_compat(model), "pool1") if i.severity == "error"]
    assert len(errors) == 1 and "Indices" in errors[0].message and errors[0].op_type == "MaxPool"


def test_maxpool_without_indices_passes():
    node = helper.make_node("MaxPool", ["x"], ["y"], name="pool1", kernel_shape=[2, 2])
    model = _model([node], [_t("x", ["N", 3, 8, 8])], [_t("y", ["N", 3, 4, 4])])
    assert check_trt_compat(model) == []


def test_nll_loss_is_an_error():
    node = helper.make_node("NegativeLogLikelihoodLoss", ["logp", "t"], ["loss"], name="nll")
    model = _model([node], [_t("logp", ["N", 10]), _t("t", ["N"], TensorProto.INT64)], [_t("loss", [])])
    issues = _by_node(check_trt_compat(model), "nll")
    assert [i.severity for i in issues] == ["error"] and "LogSoftmax" in issues[0].message
    assert "nll" in str(issues[0]) and "NegativeLogLikelihoodLoss" in str(issues[0])


def test_custom_domain_node_is_an_error():
    node = helper.make_node("FancyOp", ["x"], ["y"], name="fancy", domain="com.example")
    graph = helper.make_graph([node], "g", [_t("x", ["N", 4])], [_t("y", ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    issues = _by_node(check_trt_compat(model), "fancy")
    assert issues and issues[0].severity == "error" and "com.example" in issues[0].message


def test_local_function_is_checked_inside():
    body = [helper.make_node("SoftmaxCrossEntropyLoss", ["a", "b"], ["c"], name="inner_sce")]
    fn = helper.make_function("local", "MyLoss", ["a", "b"], ["c"], body,
                              [helper.make_opsetid("", 17)])
    call = helper.make_node("MyLoss", ["x", "t"], ["loss"], name="call", domain="local")
    model = _model([call], [_t("x", ["N", 4]), _t("t", ["N"], TensorProto.INT64)], [_t("loss", [])],
                   functions=[fn])
    issues = check_trt_compat(model)
    assert _by_node(issues, "inner_sce")[0].severity == "error"
    assert not _by_node(issues, "call")


def test_loop_node_is_flagged_and_its_body_checked():
    body = helper.make_graph(
        [helper.make_node("NegativeLogLikelihoodLoss", ["v_in", "v_in"], ["v_out"], name="body_nll")],
        "body", [_t("i", []), _t("cond", [], TensorProto.BOOL), _t("v_in", [4])],
        [_t("cond_out", [], TensorProto.BOOL), _t("v_out", [4])])
    loop = helper.make_node("Loop", ["trip", "", "v0"], ["v"], name="loop1", body=body)
    model = _model([loop], [_t("trip", [], TensorProto.INT64), _t("v0", [4])], [_t("v", [4])])
    issues = check_trt_compat(model)
    flagged = _by_node(issues, "loop1")
    assert flagged and flagged[0].op_type == "Loop" and flagged[0].severity == "warning"
    assert _by_node(issues, "body_nll")[0].severity == "error"


def test_sequence_ops_and_unknown_ops_are_errors():
    nodes = [helper.make_node("SequenceConstruct", ["x"], ["s"], name="seq"),
             helper.make_node("SequenceAt", ["s", "i"], ["y"], name="at")]
    model = _model(nodes, [_t("x", ["N", 4]), _t("i", [], TensorProto.INT64)], [_t("y", ["N", 4])])
    issues = check_trt_compat(model)
    assert {i.node for i in issues if i.severity == "error"} >= {"seq", "at"}


def test_dynamic_axes_int64_and_opset_warnings():
    node = helper.make_node("Identity", ["x"], ["y"], name="id")
    model = _model([node], [_t("x", ["N", "C", 4], TensorProto.INT64)], [_t("y", ["N", "C", 4], TensorProto.INT64)],
                   opset=21)
    msgs = [i.message for i in check_trt_compat(model)]
    assert all(i.severity == "warning" for i in check_trt_compat(model))
    assert any("opset 21" in m for m in msgs)
    assert any("axes [0, 1]" in m for m in msgs)
    assert any("INT64" in m for m in msgs)


def test_old_opset_and_non_constant_axes_are_errors():
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="rm")
    model = _model([node], [_t("x", ["N", 4]), _t("axes", [1], TensorProto.INT64)], [_t("y", ["N", 1])], opset=18)
    assert _by_node(check_trt_compat(model), "rm")[0].severity == "error"
    old = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_t("x", ["N"])], [_t("y", ["N"])], opset=8)
    assert [i.severity for i in check_trt_compat(old)] == ["error"]
