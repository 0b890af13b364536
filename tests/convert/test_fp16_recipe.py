"""The fp16 recipe (float16 body, float32 classifier head) on tiny hand-built graphs."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxconverter_common")
from onnx import TensorProto, helper, numpy_helper

from mmexport.convert.fp16_recipe import (
    RECIPE,
    classifier_head,
    convert_model,
    fp16_block_list,
)

CLASSES, FEATURES = 3, 8


def _tiny(head: str = "gemm", *, shared_weight: bool = False, tail: str | None = None, name_head: bool = True):
    """image (N,3,8,8) -> Conv -> Relu -> GlobalAveragePool -> Flatten -> head -> [tail] -> logits."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((FEATURES, 3, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(rng.standard_normal(FEATURES).astype(np.float32), "conv.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
    ]
    out = "logits" if tail is None else "pre"
    head_name = "fc" if name_head else ""
    if head == "gemm":
        inits += [numpy_helper.from_array(rng.standard_normal((CLASSES, FEATURES)).astype(np.float32) * 3, "fc.weight"),
                  numpy_helper.from_array(rng.standard_normal(CLASSES).astype(np.float32), "fc.bias")]
        nodes.append(helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], [out], name=head_name, transB=1))
    else:  # MatMul + Add
        inits += [numpy_helper.from_array(rng.standard_normal((FEATURES, CLASSES)).astype(np.float32) * 3, "fc.weight"),
                  numpy_helper.from_array(rng.standard_normal(CLASSES).astype(np.float32), "fc.bias")]
        nodes += [helper.make_node("MatMul", ["f", "fc.weight"], ["mm"], name="fc_matmul"),
                  helper.make_node("Add", ["mm", "fc.bias"], [out], name="fc_add")]
    if shared_weight:  # the head's bias is also read by the body
        nodes.append(helper.make_node("Mul", ["fc.bias", "fc.bias"], ["unused"], name="shared"))
    if tail == "softmax":
        nodes.append(helper.make_node("Softmax", ["pre"], ["logits"], name="softmax", axis=1))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _run(model, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


def _types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    found = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    found.update({i.name: i.data_type for i in inferred.graph.initializer})
    return found


def test_head_is_the_gemm_writing_the_output():
    model = _tiny()
    assert classifier_head(model) == ["fc"]
    assert fp16_block_list(model) == ["fc"]
    assert classifier_head(_tiny("matmul")) == ["fc_matmul", "fc_add"]


def test_no_head_when_something_else_writes_the_output():
    assert classifier_head(_tiny(tail="softmax")) == []
    assert classifier_head(_tiny(name_head=False)) == []


def test_fp16_body_fp32_head_structure():
    model = _tiny()
    converted, facts = convert_model(model)
    onnx.checker.check_model(converted)
    assert facts.recipe == RECIPE and facts.head_fp32 and facts.fp32_nodes == ["fc"]
    assert facts.converter.startswith("onnxconverter-common ")
    casts = [n for n in converted.graph.node if n.op_type == "Cast"]
    assert len(casts) == facts.casts == 2  # the input's, and the one before the head: as many as a full conversion
    types = _types(converted)
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert types["fc.weight"] == TensorProto.FLOAT and types["fc.bias"] == TensorProto.FLOAT
    assert types["conv.weight"] == TensorProto.FLOAT16
    assert types["r"] == TensorProto.FLOAT16  # the body computes in float16
    gemm = next(n for n in converted.graph.node if n.op_type == "Gemm")
    assert gemm.output[0] == "logits"
    # the source is untouched
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT}


def test_head_weights_are_the_original_float32_values():
    model = _tiny()
    converted, _ = convert_model(model)
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    restored = {i.name: numpy_helper.to_array(i) for i in converted.graph.initializer}
    np.testing.assert_array_equal(restored["fc.weight"], original["fc.weight"])
    np.testing.assert_array_equal(restored["fc.bias"], original["fc.bias"])


def test_logits_are_not_rounded_to_float16():
    model = _tiny()
    converted, _ = convert_model(model)
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    reference = _run(model, x)
    out = _run(converted, x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference, rtol=2e-2, atol=2e-2)
    # a float16-rounded logit would lie on float16's grid; the fp32 head's do not (all of them, in general)
    assert np.any(out.astype(np.float16).astype(np.float32) != out)


def test_matmul_add_head():
    model = _tiny("matmul")
    converted, facts = convert_model(model)
    onnx.checker.check_model(converted)
    assert facts.head_fp32 and facts.fp32_nodes == ["fc_matmul", "fc_add"]
    assert sum(n.op_type == "Cast" for n in converted.graph.node) == 2
    types = _types(converted)
    assert types["mm"] == TensorProto.FLOAT
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(converted, x), _run(model, x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["softmax", "shared", "disabled"])
def test_falls_back_to_the_full_conversion(kind):
    if kind == "softmax":
        model, options = _tiny(tail="softmax"), {}
    elif kind == "shared":
        model, options = _tiny(shared_weight=True), {}
    else:
        model, options = _tiny(), {"keep_head_fp32": False}
    converted, facts = convert_model(model, **options)
    onnx.checker.check_model(converted)
    assert facts.recipe == "fp16-full" and not facts.head_fp32 and facts.fp32_nodes == []
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert _run(converted, x).dtype == np.float32


# -- the float16 arithmetic check (emulation graph) ---------------------------------------------


def test_emulation_of_a_float32_graph_changes_nothing():
    from mmexport.convert.fp16_recipe import fp16_emulation_graph

    model = _tiny()
    emulated = fp16_emulation_graph(model)
    assert not any(n.op_type == "Cast" for n in emulated.graph.node)
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(emulated, x), _run(model, x))


def test_emulation_rounds_every_float16_tensor():
    from mmexport.convert.fp16_recipe import fp16_emulation_graph

    converted, _ = convert_model(_tiny(), keep_head_fp32=False)
    emulated = fp16_emulation_graph(converted)
    assert {i.data_type for i in emulated.graph.initializer} == {TensorProto.FLOAT}
    rounded = {n.input[0].removesuffix("__fp16_raw") for n in emulated.graph.node if n.name.endswith("__round_fp16")}
    assert {"c", "r", "p", "f"} <= rounded  # every float16 activation (and the head's output, tested below)
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = _run(emulated, x)
    np.testing.assert_array_equal(out, out.astype(np.float16).astype(np.float32))  # logits on float16's grid
    np.testing.assert_allclose(out, _run(_tiny(), x), rtol=2e-2, atol=2e-2)


def test_emulation_overflows_where_a_gpu_would():
    """Activations past ±65504 are Inf in float16; the emulation shows it (ONNX Runtime's x86 CPU runs fp16 as fp32)."""
    from mmexport.convert.fp16_recipe import fp16_emulation_graph

    model = _tiny()
    weight = next(i for i in model.graph.initializer if i.name == "conv.weight")
    weight.CopyFrom(numpy_helper.from_array(np.full((FEATURES, 3, 3, 3), 5000.0, np.float32), "conv.weight"))
    x = np.full((1, 3, 8, 8), 10.0, np.float32)  # conv output 27 x 5000 x 10 = 1.35e6
    assert np.isfinite(_run(model, x)).all()
    converted, _ = convert_model(model)
    assert not np.isfinite(_run(fp16_emulation_graph(converted), x)).all()
