"""int8 for TensorRT: NVIDIA ModelOpt's ONNX quantizer vs ONNX Runtime's symmetric QDQ (mmexport ``target="tensorrt"``).

For each architecture a briefly trained model (the fp16 study's weights, ``benchmarks/fp16_study.py``; trained
here if absent) is exported to fp32 ONNX, calibrated on 256 training images of ``synthetic:target`` and judged
on held-out test images by mmexport's int8 row (top-1 agreement ≥ 99 %, macro-F1 drop ≤ 1 pt) against the torch
fp32 model. Tools (``--tools``):

* ``ort-trt``: ``mmexport.convert.precision.quantize_int8(target="tensorrt")`` -- ONNX Runtime ``quantize_static``,
  QDQ, int8 symmetric activations and per-channel weights, min/max calibration, every Conv/Gemm/Add/pool the
  quantizer supports; the plain graph (no accuracy-aware search).
* ``modelopt``: ``modelopt.onnx.quantization.quantize(quantize_mode="int8", calibration_data=...)`` with its
  defaults (entropy calibration, TensorRT-oriented Q/DQ placement) except ``high_precision_dtype="fp32"`` (the
  rest of the graph stays float32, as in ``ort-trt``) and ``calibration_eps=["cpu"]`` (no GPU here).
* ``modelopt-fp16``: the same with ModelOpt's default ``high_precision_dtype="fp16"`` (non-quantized ops in fp16).
* ``modelopt-max``: ``modelopt`` with ``calibration_method="max"`` (the calibrator ``ort-trt`` uses).

ModelOpt parts need ``nvidia-modelopt[onnx]`` (a throwaway virtualenv: it pins onnx 1.21 and onnxruntime-gpu
1.24); without it they are skipped with a printed reason. All graphs are *evaluated* by this environment's ONNX
Runtime (CPU), so every number comes from one runtime. Graph structure: Q/DQ counts, zero points, weight
granularity, and where Q/DQ sit (which inputs of which ops are quantized, which outputs are re-quantized).

    python benchmarks/int8_tools.py --phase prepare
    python benchmarks/int8_tools.py --phase convert --tools ort-trt
    /tmp/modelopt-venv/bin/python benchmarks/int8_tools.py --phase convert --tools modelopt,modelopt-fp16,modelopt-max
    python benchmarks/int8_tools.py --phase evaluate
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for entry in (str(ROOT), str(HERE)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from fp16_study import MEAN, STD, _train, log, versions

ALL_TOOLS = ("ort-trt", "ort-trt-aware", "ort-trt-inputs", "modelopt", "modelopt-fp16", "modelopt-max")
# ModelOpt's TensorRT-guided ONNX Runtime settings (modelopt.onnx.quantization.ort_utils.configure_ort), applied with
# ONNX Runtime alone: Q/DQ only on the inputs of quantized ops (no output quantization), Relu/Concat/Reshape not
# quantized themselves, biases float, activations symmetric; the classifier Gemm left float (ModelOpt's GEMV rule).
TRT_INPUT_OPS = ["Conv", "Add", "MaxPool", "AveragePool", "GlobalAveragePool", "BatchNormalization"]
TASK = "synthetic:target?n_train={n_train}&n_val=100&n_test={n_test}"


def case_dir(work: Path, arch: str, size: int) -> Path:
    return work / "int8" / f"{arch}-{size}"


def prepare(arch: str, size: int, work: Path, args) -> None:
    import torch

    from mmexport.torchside.backbones import get_backbone
    from mmexport.torchside.data import load_task
    from mmexport.torchside.onnx_export import export_onnx
    from mmexport.runtime.modelinfo import ModelInfo

    directory = case_dir(work, arch, size)
    if (directory / "heldout.npz").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    state, training = _train(arch, size, work, args)
    model = get_backbone(arch).build(5)
    model.load_state_dict(state)
    model.eval()
    task = load_task(TASK.format(n_train=args.train_images, n_test=args.heldout), image_size=size)
    info = ModelInfo(arch, task.classes, size, MEAN, STD)
    export_onnx(model, info, directory / "fp32.onnx", weights_sha256="0" * 64)
    calibration, _ = task.arrays("train", limit=args.calibration, spread=True)
    images, labels = task.arrays("test", limit=args.heldout)
    with torch.inference_mode():
        logits = np.concatenate([model(torch.from_numpy(images[i:i + 32])).numpy() for i in range(0, len(images), 32)])
    np.save(directory / "calibration.npy", np.ascontiguousarray(calibration, dtype=np.float32))
    np.savez_compressed(directory / "heldout.npz", images=images, labels=labels, logits=logits)
    (directory / "case.json").write_text(json.dumps({"arch": arch, "size": size, "training": training,
                                                     "calibration": len(calibration), "heldout": len(images)}, indent=2))
    log(f"prepared {directory.name}: fp32 accuracy on held-out {np.mean(logits.argmax(1) == labels):.3f}")


def _judge(directory: Path):
    """mmexport's accuracy-aware search judges on the run's held-out images; here the same held-out set."""
    from mmexport.runtime.compare import ReferenceSet, compare_sets
    from mmexport.runtime.tolerances import INT8

    held = np.load(directory / "heldout.npz")

    def judge(path: Path):
        outputs = _run(path, held["images"], None)
        return compare_sets({"data": ReferenceSet({"logits": held["logits"]}, held["labels"])},
                            {"data": {"logits": outputs}}, INT8, reference_name="torch fp32", candidate_name=str(path))

    return judge


def _run(model_or_path, images: np.ndarray, level, threads: int = 2) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = level
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + 32]})[0] for i in range(0, len(images), 32)]).astype(np.float32)


def _quantize_inputs_only(src: Path, dst: Path, calibration: np.ndarray) -> dict[str, Any]:
    """ONNX Runtime ``quantize_static`` with ModelOpt's TensorRT placement options (no ModelOpt needed)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(str(src))
    gemms = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             "OpTypesToExcludeOutputQuantization": sorted({n.op_type for n in model.graph.node}),
             "ForceQuantizeNoInputCheck": True, "DedicatedQDQPair": False}
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=TRT_INPUT_OPS,
                    nodes_to_exclude=gemms, calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
    return {"op_types_to_quantize": TRT_INPUT_OPS, "nodes_to_exclude": gemms, "calibration": "minmax",
            "extra_options": {k: v for k, v in extra.items() if k != "OpTypesToExcludeOutputQuantization"},
            "output_quantization": "none"}


def convert(arch: str, size: int, tool: str, work: Path, args) -> None:
    directory = case_dir(work, arch, size)
    src, dst = directory / "fp32.onnx", directory / f"{tool}.onnx"
    if dst.is_file() and not args.force:
        return
    calibration = np.load(directory / "calibration.npy")
    facts: dict[str, Any] = {"tool": tool, "env": versions()}
    start = time.perf_counter()
    if tool in ("ort-trt", "ort-trt-aware"):
        from mmexport.convert.precision import quantize_int8

        judge = _judge(directory) if tool == "ort-trt-aware" else None
        result = quantize_int8(src, dst, calibration, target="tensorrt", method="minmax", judge=judge)
        record = result.as_record()
        facts["mmexport"] = {k: record[k] for k in ("int8_target", "per_channel", "calibration", "float_nodes",
                                                    "int8_search")}
    elif tool == "ort-trt-inputs":
        facts["options"] = _quantize_inputs_only(src, dst, calibration)
    else:
        try:
            from modelopt.onnx.quantization import quantize
        except Exception as exc:  # noqa: BLE001 - any import failure means: not here
            log(f"SKIP {tool} for {directory.name}: modelopt is not importable in {sys.executable} "
                f"({type(exc).__name__}: {exc}); run this phase in an environment with nvidia-modelopt[onnx]")
            return
        options: dict[str, Any] = {"high_precision_dtype": "fp16" if tool == "modelopt-fp16" else "fp32"}
        if tool == "modelopt-max":
            options["calibration_method"] = "max"
        facts["options"] = {**options, "calibration_eps": ["cpu"], "calibration_shapes": f"image:8x3x{size}x{size}"}
        quantize(str(src), quantize_mode="int8", calibration_data=calibration, calibration_eps=["cpu"],
                 calibration_shapes=f"image:8x3x{size}x{size}", output_path=str(dst), log_level="WARNING", **options)
    facts["seconds"] = round(time.perf_counter() - start, 1)
    dst.with_suffix(".json").write_text(json.dumps(facts, indent=2))
    log(f"quantized {directory.name} with {tool} in {facts['seconds']} s")


# -- structure ------------------------------------------------------------------------------------------------


def qdq_structure(path: Path) -> dict[str, Any]:
    """Q/DQ facts of a quantized graph: counts, zero points, weight granularity, placement per op type."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    constants = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def const(name: str):
        tensor = inits.get(name) or constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    q = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    zero_points, zp_types = [], set()
    for node in q + dq:
        if len(node.input) > 2 and node.input[2]:
            value = const(node.input[2])
            if value is not None:
                zero_points.append(value)
                zp_types.add(str(value.dtype))

    def weight_source(dq_node):
        """The initializer a DQ dequantizes (directly: stored int8; through a Q: stored float), else None."""
        if const(dq_node.input[0]) is not None:
            return "int8", const(dq_node.input[0])
        src = producers.get(dq_node.input[0])
        if src is not None and src.op_type == "QuantizeLinear" and const(src.input[0]) is not None:
            return "float", const(src.input[0])
        return None

    weight_dq = {n.output[0]: n for n in dq if weight_source(n) is not None}
    weights: dict[str, Any] = {"count": len(weight_dq), "per_channel": 0, "per_tensor": 0, "stored": set(),
                               "scale_dtypes": set()}
    for node in weight_dq.values():
        stored, _ = weight_source(node)
        weights["stored"].add(stored)
        scale = const(node.input[1])
        if scale is not None:
            weights["scale_dtypes"].add(str(scale.dtype))
        weights["per_channel" if scale is not None and scale.size > 1 else "per_tensor"] += 1
    weights["stored"] = sorted(weights["stored"])
    weights["scale_dtypes"] = sorted(weights["scale_dtypes"])
    bias_dq = sum(1 for n in dq if const(n.input[0]) is not None and const(n.input[0]).dtype == np.int32)

    placement: dict[str, dict[str, int]] = {}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant", "Cast"):
            continue
        entry = placement.setdefault(node.op_type, {"nodes": 0, "all_act_inputs_dq": 0, "some_act_inputs_dq": 0,
                                                    "no_act_inputs_dq": 0, "weight_dq": 0, "output_q": 0})
        entry["nodes"] += 1
        act_inputs = [i for i in node.input if i and const(i) is None and i not in weight_dq]
        fed = []
        for name in act_inputs:
            src = producers.get(name)
            while src is not None and src.op_type == "Cast":  # fp16 graphs: DQ -> Cast -> op
                src = producers.get(src.input[0])
            fed.append(src is not None and src.op_type == "DequantizeLinear")
        if act_inputs and all(fed):
            entry["all_act_inputs_dq"] += 1
        elif any(fed):
            entry["some_act_inputs_dq"] += 1
        else:
            entry["no_act_inputs_dq"] += 1
        if any(i in weight_dq for i in node.input):
            entry["weight_dq"] += 1
        outs = list(node.output)
        readers = [c for out in outs for c in consumers.get(out, [])]
        readers += [c for r in readers if r.op_type == "Cast" for c in consumers.get(r.output[0], [])]
        if any(c.op_type == "QuantizeLinear" for c in readers):
            entry["output_q"] += 1
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)}
    return {
        "nodes": len(graph.node), "quantize": len(q), "dequantize": len(dq),
        "zero_points_all_zero": bool(zero_points) and all(not np.any(z) for z in zero_points),
        "zero_point_dtypes": sorted(zp_types), "zero_point_tensors": len(zero_points),
        "weights": weights, "int32_bias_dq": bias_dq, "placement": placement,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "io_types": {k: onnx.TensorProto.DataType.Name(v) for k, v in types.items()},
        "casts": sum(1 for n in graph.node if n.op_type == "Cast"),
        "bytes": path.stat().st_size,
    }


def evaluate(arch: str, size: int, work: Path, args) -> dict[str, Any] | None:
    import onnxruntime as ort

    from mmexport.runtime.compare import compare_outputs
    from mmexport.runtime.tolerances import INT8

    directory = case_dir(work, arch, size)
    if not (directory / "heldout.npz").is_file():
        log(f"SKIP {directory.name}: not prepared")
        return None
    held = np.load(directory / "heldout.npz")
    images, labels, reference = held["images"], held["labels"], held["logits"]
    meta = json.loads((directory / "case.json").read_text())
    result: dict[str, Any] = {"case": directory.name, **meta,
                              "fp32_accuracy": float(np.mean(reference.argmax(1) == labels)), "tools": {}}
    for tool in args.tools.split(","):
        path = directory / f"{tool}.onnx"
        if not path.is_file():
            log(f"SKIP evaluating {tool} for {directory.name}: {path.name} was not made (see the convert phase)")
            continue
        import onnx
        from fp16_study import emulated_fp16

        runs = {
            "ort": _run(path, images, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, args.threads),
            "ort-noopt": _run(path, images, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, args.threads),
            "emulated": _run(emulated_fp16(onnx.load(str(path))), images, ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                             args.threads),
        }
        conversion = json.loads(path.with_suffix(".json").read_text())
        judged = {}
        for run, outputs in runs.items():
            stats = compare_outputs(reference, outputs, INT8, labels)
            judged[run] = {"top1_agreement": stats.top1_agreement, "reference_macro_f1": stats.reference_macro_f1,
                           "candidate_macro_f1": stats.candidate_macro_f1, "macro_f1_drop": stats.macro_f1_drop,
                           "candidate_accuracy": float(np.mean(outputs.argmax(1) == labels)), "passed": stats.passed,
                           "failures": stats.failures}
        result["tools"][tool] = {
            "runs": judged, "structure": qdq_structure(path), "converted_with": conversion["env"],
            "convert_seconds": conversion["seconds"], "options": conversion.get("options"),
            "float_nodes": (conversion.get("mmexport") or {}).get("float_nodes"),
        }
        log(f"evaluated {directory.name} {tool}: " + ", ".join(
            f"{run} top-1 {j['top1_agreement']:.3f} F1 drop {j['macro_f1_drop']:+.4f}" for run, j in judged.items()))
    return result


def tables(results: list[dict[str, Any]]) -> str:
    lines = ["### Accuracy on held-out synthetic images (int8 row: top-1 ≥ 99 %, macro-F1 drop ≤ 1 pt)", "",
             "Runs: `ort` = ONNX Runtime CPU, all optimisations (what mmexport's check runs); `ort-noopt` = no graph "
             "optimisation (Q/DQ executed as written: the arithmetic TensorRT implements); `emulated` = fp16 tensors "
             "rounded in a float32 graph (differs from `ort-noopt` only for graphs with fp16 parts).", "",
             "| model | tool | run | top-1 agreement | macro-F1 fp32 → int8 (drop) | accuracy int8 | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for tool, t in r["tools"].items():
            for run, j in t["runs"].items():
                lines.append(f"| {r['arch']} {r['size']}px (fp32 acc {r['fp32_accuracy']:.3f}, n={r['heldout']}) | {tool} | "
                             f"{run} | {j['top1_agreement']:.2%} | {j['reference_macro_f1']:.4f} → "
                             f"{j['candidate_macro_f1']:.4f} ({100 * j['macro_f1_drop']:+.2f} pt) | "
                             f"{j['candidate_accuracy']:.3f} | {'pass' if j['passed'] else 'FAIL'} |")
    lines += ["", "| model | tool | made with | seconds | nodes kept in float (accuracy-aware) |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        for tool, t in r["tools"].items():
            env = t["converted_with"]
            made = (f"modelopt {env['modelopt']}, onnxruntime {env['onnxruntime']}, onnx {env['onnx']}"
                    if tool.startswith("modelopt") else f"mmexport / onnxruntime {env['onnxruntime']}")
            kept = ("–" if tool != "ort-trt-aware" or t.get("float_nodes") is None
                    else (", ".join(t["float_nodes"]) or "none: the search found no passing set"))
            lines.append(f"| {r['arch']} {r['size']}px | {tool} | {made} | {t['convert_seconds']} | {kept} |")
    lines += ["", "### Graph structure", "",
              "| model | tool | Q / DQ | zero points | weights quantized | opset | Casts | MB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for tool, t in r["tools"].items():
            s = t["structure"]
            w = s["weights"]
            zp = (f"{s['zero_point_tensors']} ({', '.join(s['zero_point_dtypes'])}), "
                  f"{'all 0' if s['zero_points_all_zero'] else 'NOT all 0'}")
            lines.append(f"| {r['arch']} {r['size']}px | {tool} | {s['quantize']} / {s['dequantize']} | {zp} | "
                         f"{w['count']} ({w['per_channel']} per-channel, {w['per_tensor']} per-tensor; stored "
                         f"{'/'.join(w['stored'])}, scales {'/'.join(w['scale_dtypes'])}) | {s['opset']} | {s['casts']} | "
                         f"{s['bytes'] / 1e6:.1f} |")
    lines += ["", "### Q/DQ placement per op type",
              "", "nodes: act. inputs all from DQ / some / none; output feeds a Q", "",
              "| model | tool | " + " | ".join(["Conv", "Gemm", "Add", "Relu", "MaxPool", "AveragePool", "ReduceMean",
                                                  "Concat", "BatchNormalization"]) + " |",
              "| --- | --- |" + " --- |" * 9]
    for r in results:
        for tool, t in r["tools"].items():
            p = t["structure"]["placement"]
            cells = []
            for op in ["Conv", "Gemm", "Add", "Relu", "MaxPool", "AveragePool", "ReduceMean", "Concat",
                       "BatchNormalization"]:
                e = p.get(op)
                cells.append("–" if e is None else
                             f"{e['nodes']}: {e['all_act_inputs_dq']}/{e['some_act_inputs_dq']}/{e['no_act_inputs_dq']}; "
                             f"Q {e['output_q']}")
            lines.append(f"| {r['arch']} {r['size']}px | {tool} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("prepare", "convert", "evaluate", "all"), default="all")
    parser.add_argument("--work", default="/tmp/mmexport-precision-study")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision"))
    parser.add_argument("--archs", default="resnet18,densenet121")
    parser.add_argument("--sizes", default="64")
    parser.add_argument("--tools", default=",".join(ALL_TOOLS))
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=600)
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=1200)
    parser.add_argument("--finetune-images", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true")
    parser.set_defaults(data=300)  # the test split size fp16_study trains with (shared weights cache)
    args = parser.parse_args()
    work = Path(args.work)
    started = time.perf_counter()
    log(f"environment: {versions()}")
    pairs = [(a, int(s)) for a in args.archs.split(",") for s in args.sizes.split(",")]
    if args.phase in ("prepare", "all"):
        for arch, size in pairs:
            prepare(arch, size, work, args)
    if args.phase in ("convert", "all"):
        for arch, size in pairs:
            if (case_dir(work, arch, size) / "fp32.onnx").is_file():
                for tool in args.tools.split(","):
                    convert(arch, size, tool, work, args)
    if args.phase in ("evaluate", "all"):
        results = [r for r in (evaluate(a, s, work, args) for a, s in pairs) if r is not None]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = tables(results)
        payload = {"machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "platform": platform.platform()}, "evaluated_with": versions(), "args": vars(args),
                   "seconds": round(time.perf_counter() - started, 1), "results": results}
        (out / "int8_tools.json").write_text(json.dumps(payload, indent=2, default=str))
        (out / "int8_tables.md").write_text(text + "\n")
        print(text)
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
