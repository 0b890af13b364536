"""ONNX node names mapped back to torch module names (mmexport.convert.node_names)."""

import onnx
from onnx import TensorProto, helper

from mmexport.convert.node_names import module_names, shown


def _graph():
    weight = helper.make_tensor("layer4.1.conv2.weight", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])
    conv = helper.make_node("Conv", ["x", "layer4.1.conv2.weight"], ["y"], name="node_Conv_330")
    # the dynamo exporter's record after BatchNorm fusion names the BatchNorm: the weight wins
    conv.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'layer4', 'layer4.1', 'layer4.1.bn2', 'bn']")
    relu = helper.make_node("Relu", ["y"], ["z"], name="node_relu_16")
    relu.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'layer4', 'layer4.1', 'layer4.1.relu', 'relu']")
    legacy = helper.make_node("Relu", ["z"], ["w"], name="/layer4/layer4.1/conv2/Relu")
    bare = helper.make_node("Identity", ["w"], ["out"], name="node_Identity_1")
    graph = helper.make_graph([conv, relu, legacy, bare], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 2, 2])], [weight])
    return helper.make_model(graph)


def test_each_source_of_a_module_name():
    names = module_names(_graph())
    assert names == {"node_Conv_330": "layer4.1.conv2", "node_relu_16": "layer4.1.relu",
                     "/layer4/layer4.1/conv2/Relu": "layer4.1.conv2"}
    assert module_names(_graph(), ["node_relu_16"]) == {"node_relu_16": "layer4.1.relu"}
    assert shown("node_Conv_330", names) == "layer4.1.conv2 (node_Conv_330)"
    assert shown("node_Identity_1", names) == "node_Identity_1"


def test_a_real_export_names_every_weight_bearing_layer(tmp_path):
    import torch
    import torchvision

    from mmexport.convert.precision import quantizable_nodes
    from mmexport.runtime.modelinfo import ModelInfo
    from mmexport.torchside.onnx_export import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, ModelInfo("resnet18", ("a", "b", "c"), 32, (0.5,) * 3, (0.25,) * 3), path, weights_sha256="5e" * 32)
    proto = onnx.load(path)
    nodes = quantizable_nodes(proto)
    names = module_names(proto, nodes)
    expected = {n for n, _ in model.named_modules() if isinstance(_, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(names) == set(nodes) and set(names.values()) == expected
