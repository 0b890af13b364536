"""The fp16 recipe: a float16 network with a float32 classifier head.

``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)`` converts
the whole graph and ends it with ``Gemm (fp16) -> Cast -> logits``: the logits themselves
are rounded to float16 (an 11-bit significand: logits of 8-16 move by up to 4e-3, of
16-32 by up to 8e-3) before they are cast back to float32. On the trained networks of
``benchmarks/results/precision`` that last rounding was up to half of the whole fp16
error. This recipe converts the graph with the same converter and then gives the head
back its float32: the classifier ``Gemm`` (or ``MatMul``/``Add`` pair) that writes the
graph output reads its input through one ``Cast`` to float32, keeps its original
float32 weight and bias, and writes ``logits`` directly -- the graph still has exactly
two ``Cast`` nodes (the input's, and the one before the head), one float32 node, and
the float32 head weights cost ``num_classes x features x 2`` bytes more.

Everything else stays float16, BatchNormalization and Concat included: on every
supported architecture (resnet18, resnet50, densenet121; stock and trained, 64 and
224 px) the full fp16 body passes the fp16 policy row with a wide margin, measured
both in ONNX Runtime (CPU) and with float16 arithmetic emulated tensor by tensor
(``benchmarks/fp16_study.py``; the worst element used at most 0.34 of the bound).
Blocking BatchNormalization/Concat in densenet121 adds 660 fp16<->fp32 activation
Casts (and 121 float32 nodes) that TensorRT must run, for ~30 % less error that the
policy does not need; ModelOpt AutoCast with its defaults yields the full conversion's
graph for these networks.

:func:`fp16_emulation_graph` is the CPU check of fp16 *arithmetic* (ONNX Runtime's x86
CPU provider runs float16 graphs in float32; see there).

If the graph does not end in a recognisable head (a node other than Gemm/MatMul(+Add)
writes the output), the converter's plain result is kept and ``head_fp32`` is False.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

RECIPE = "fp16-body-fp32-head"
HEAD_OPS = ("Gemm", "MatMul")


def _producers(model: Any) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output}


def _initializers(model: Any) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def classifier_head(model: Any) -> list[str]:
    """Names of the float32 graph's head nodes: the Gemm (or MatMul, and the Add of its bias) writing an output.

    Only a head with constant weights counts (it is the classifier, not an activation
    product). Returns ``[]`` when an output is written by anything else.
    """
    producers = _producers(model)
    inits = _initializers(model)
    names: list[str] = []
    for output in model.graph.output:
        node = producers.get(output.name)
        if node is None:
            return []
        chain = []
        if node.op_type == "Add" and any(i in inits for i in node.input):
            chain.append(node)
            others = [i for i in node.input if i not in inits]
            node = producers.get(others[0]) if len(others) == 1 else None
        if node is None or node.op_type not in HEAD_OPS or len(node.input) < 2 or node.input[1] not in inits:
            return []
        chain.append(node)
        if not all(n.name for n in chain):
            return []
        names.extend(n.name for n in reversed(chain))
    return names


def fp16_block_list(model: Any) -> list[str]:
    """The nodes this recipe keeps in float32 (of the float32 source graph): the classifier head."""
    return classifier_head(model)


def _restore_head(converted: Any, source: Any, head: list[str]) -> bool:
    """Give the head nodes of ``converted`` (a full fp16 conversion of ``source``) back their float32 arithmetic.

    Works in place; returns False (``converted`` then half-edited: the caller keeps a copy) when the
    converted graph is not the expected ``... -> head (fp16) -> Cast -> output`` shape.
    """
    from onnx import TensorProto, helper

    if not head:
        return False
    graph = converted.graph
    nodes = list(graph.node)
    by_name = {node.name: node for node in nodes}
    if not all(name in by_name for name in head):
        return False
    source_inits = _initializers(source)
    inits = _initializers(converted)
    consumers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    head_nodes = [by_name[name] for name in head]
    head_ids = {id(n) for n in head_nodes}
    outputs = {value.name: value for value in graph.output}

    # 1. the head's constant inputs: float32 again (only where nothing outside the head reads them)
    for node in head_nodes:
        for name in node.input:
            if name in inits and inits[name].data_type == TensorProto.FLOAT16:
                if name not in source_inits or not all(id(r) in head_ids for r in consumers.get(name, [])):
                    return False
                inits[name].CopyFrom(source_inits[name])

    # 2. the head's first node reads its activation through one Cast to float32
    first = head_nodes[0]
    activations = [i for i, name in enumerate(first.input) if name and name not in inits]
    if len(activations) != 1:
        return False
    index = activations[0]
    name = first.input[index]
    cast = helper.make_node("Cast", [name], [f"{name}_fp32_head"], to=TensorProto.FLOAT,
                            name=f"{first.name}_input_cast_fp32")
    first.input[index] = cast.output[0]
    nodes.insert(nodes.index(first), cast)

    # 3. the last node writes the graph output itself (the converter's output Cast goes)
    last = head_nodes[-1]
    for out_index, name in enumerate(last.output):
        readers = consumers.get(name, [])
        if len(readers) != 1 or readers[0].op_type != "Cast" or readers[0].output[0] not in outputs:
            return False
        final = readers[0].output[0]
        nodes = [node for node in nodes if node is not readers[0]]
        last.output[out_index] = final
        outputs[final].type.tensor_type.elem_type = TensorProto.FLOAT
    # intermediate head tensors (MatMul -> Add) are float32 now: drop the converter's float16 value_info
    head_tensors = {t for n in head_nodes for t in list(n.input) + list(n.output)}
    kept = [value for value in graph.value_info if value.name not in head_tensors]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    del graph.node[:]
    graph.node.extend(nodes)
    return all(value.type.tensor_type.elem_type == TensorProto.FLOAT for value in graph.output)


@dataclass(frozen=True)
class Fp16Conversion:
    """What the fp16 conversion did: the recipe applied (``fp16-body-fp32-head``, or ``fp16-full`` when the
    head could not be restored), the converter, the nodes kept in float32 (names as in the source graph),
    how many weights the converter clamped to float16's range, and the Casts in the result."""

    recipe: str
    tool: str
    version: str
    keep_io_types: bool
    converter: str  # tool, version and options on one line
    fp32_nodes: list[str]
    head_fp32: bool
    clamped_values: int
    casts: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metadata_record(self) -> dict[str, Any]:
        """The part recorded in the file's ``fp16_recipe`` metadata entry."""
        return {k: getattr(self, k) for k in ("tool", "version", "recipe", "keep_io_types", "fp32_nodes", "casts")}


def convert_model(model: Any, *, keep_head_fp32: bool = True) -> tuple[Any, Fp16Conversion]:
    """``model`` (float32 ModelProto) -> (mixed ModelProto, :class:`Fp16Conversion`). ``model`` is not modified."""
    import copy

    import onnx
    import onnxconverter_common
    from onnxconverter_common import float16

    source = copy.deepcopy(model)
    head = fp16_block_list(source) if keep_head_fp32 else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(copy.deepcopy(model), keep_io_types=True)
    clamped = sum(1 for w in caught if "truncated" in str(w.message))
    backup = copy.deepcopy(converted)
    restored = _restore_head(converted, source, head)
    if restored:
        try:
            onnx.checker.check_model(converted)
        except onnx.checker.ValidationError:
            restored = False
    if not restored:
        converted = backup
        head = []
    conversion = Fp16Conversion(
        recipe=RECIPE if restored else "fp16-full",
        tool="onnxconverter-common",
        version=onnxconverter_common.__version__,
        keep_io_types=True,
        converter=f"onnxconverter-common {onnxconverter_common.__version__} (keep_io_types=True)",
        fp32_nodes=list(head),
        head_fp32=restored,
        clamped_values=clamped,
        casts=sum(1 for node in converted.graph.node if node.op_type == "Cast"),
    )
    return converted, conversion


# -- checking fp16 arithmetic on a CPU ------------------------------------------------------------


def _elem_types(model: Any) -> dict[str, int]:
    """Tensor name -> ONNX element type (shape inference, initializers, and Cast targets)."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    found = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    found.update({init.name: init.data_type for init in graph.initializer})
    for node in graph.node:
        if node.op_type == "Cast":
            found[node.output[0]] = next(a.i for a in node.attribute if a.name == "to")
    return found


def fp16_emulation_graph(model: Any) -> Any:
    """A float32 graph that computes what ``model`` (fp16 or mixed) computes on a GPU, runnable on any CPU.

    ONNX Runtime's x86 CPU provider has no float16 kernels for Conv, BatchNormalization,
    Relu, Add, pooling or Gemm: it turns a float16 graph into float32 at load
    (``InsertedPrecisionFreeCast``), so a CPU check of an fp16 file measures only the
    float16 *weights* -- never float16 activations, their rounding or their overflow
    (a layer past ±65504 stays finite on the CPU and is Inf on the GPU). Here every
    float16 tensor of ``model`` is kept float32 but rounded to float16 where it is
    written (``Cast(to=float16) -> Cast(to=float)`` after the node), float16
    initializers keep their float16 values, and each op computes in float32 between
    the roundings: float16 storage with float32 accumulation, as TensorRT's and
    cuDNN's usual fp16 kernels compute (up to summation order; kernels that
    accumulate in float16 would be worse). Overflow becomes ±Inf as on the GPU.
    Run it with graph optimisation disabled so no rounding pair is fused away.
    For the CNN ops mmexport exports (ops whose output type follows their inputs
    or a ``Cast``).
    """
    import copy

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    types = _elem_types(model)
    out = copy.deepcopy(model)
    graph = out.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes = []
    for original in graph.node:
        node = copy.deepcopy(original)
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT16:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32)))
        rounded = []
        for index, name in enumerate(node.output):
            if types.get(name) == TensorProto.FLOAT16:
                node.output[index] = f"{name}__fp16_raw"
                rounded.append(name)
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT16:
                    attr.i = TensorProto.FLOAT  # the rounding pair below makes the value float16
        nodes.append(node)
        for name in rounded:
            nodes.append(helper.make_node("Cast", [f"{name}__fp16_raw"], [f"{name}__fp16"], to=TensorProto.FLOAT16,
                                          name=f"{name}__round_fp16"))
            nodes.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT,
                                          name=f"{name}__back_fp32"))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.checker.check_model(out)
    return out


__all__ = ["RECIPE", "classifier_head", "convert_model", "fp16_block_list", "fp16_emulation_graph"]
