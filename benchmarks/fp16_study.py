"""fp16 recipes for the supported architectures: accuracy under the old and new fp16 rows, and what each graph costs.

Recipes (``--recipes``):

* ``occ-full``: ``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)`` -- today's
  ``convert_fp16``.
* ``occ-block``: the same converter with an op block list keeping the usual "numerically sensitive" ops in
  float32 (BatchNormalization, Concat, Softmax, plus the converter's own default list) and the final Gemm.
* ``modelopt-autocast``: NVIDIA ModelOpt ``modelopt.onnx.autocast.convert_to_mixed_precision(keep_io_types=True)``
  with its default settings (needs ``nvidia-modelopt[onnx]``; skipped with a printed reason when it is not
  importable -- run ``--phase convert --recipes modelopt-autocast`` in an environment that has it, then
  ``--phase evaluate`` here, so every recipe is *measured* by one ONNX Runtime).
* ``recipe``: whatever ``mmexport.convert.fp16_recipe`` chooses (see that module).

Every model is judged two ways, each against the torch fp32 reference, on seeded random inputs (as
``verify_onnx_artifact``) and on labelled held-out synthetic images:

* ``ort``: ONNX Runtime on the CPU, as mmexport's check runs it. On an x86 CPU without fp16 kernels ONNX Runtime
  turns every fp16 node into float32 (``InsertedPrecisionFreeCast``): only the fp16 *weights* are measured, not
  fp16 arithmetic.
* ``emulated``: the same graph rewritten to float32 with every float16 tensor rounded to float16 (a
  Cast-to-fp16/Cast-to-fp32 pair after each node whose output is fp16; fp16 initializers keep their fp16 values);
  ops accumulate in float32. That is how a GPU runs fp16 with fp32 accumulation (TensorRT's usual fp16 tactics),
  up to summation order; tactics that accumulate in fp16 would be worse.

Graph cost: nodes whose output stays float32 (excluding Casts), Cast nodes (all are added: the fp32 export has
none), internal fp16<->fp32 boundaries (Casts not at the graph's input or output), file size, and ONNX Runtime CPU
latency at batch 1 (fp16 on a CPU is NOT representative of GPU speed: ONNX Runtime runs it as fp32 plus casts).

Models: ``stock`` (torchvision initialisation, seed 0) and ``trained`` (briefly trained on
``synthetic:target`` at 64 px; at 224 px the same weights run on 224 px images unless ``--finetune-images``).

    python benchmarks/fp16_study.py                                   # everything this environment can do
    /tmp/modelopt-venv/bin/python benchmarks/fp16_study.py --phase convert --recipes modelopt-autocast
    python benchmarks/fp16_study.py --phase evaluate                  # measure every graph present, write tables
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mmexport.runtime.compare import compare_outputs, random_images
from mmexport.runtime.tolerances import FP16, Tolerance

# the row before the scale-aware one (git history of mmexport/runtime/tolerances.py)
FP16_OLD = Tolerance("fp16-old", "fp16 artifact vs fp32 reference (fixed)", 5e-3, 5e-3, 0.995)
ROWS = {"old": FP16_OLD, "new": FP16}
ALL_RECIPES = ("occ-full", "occ-block", "modelopt-autocast", "recipe")
TARGET = "synthetic:target?n_train={n_train}&n_val=100&n_test={n_test}"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SENSITIVE_OPS = ["BatchNormalization", "Concat", "Softmax"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "executable": sys.executable}
    for name in ("torch", "onnx", "onnxruntime", "onnxconverter_common", "modelopt", "numpy"):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as such
            found[name] = "not importable"
    return found


def cases(args) -> list[tuple[str, int, str]]:
    out = []
    for arch in args.archs.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            if size != 64 and arch not in args.large_archs.split(","):
                continue
            for init in args.inits.split(","):
                out.append((arch, size, init))
    return out


def case_dir(work: Path, case: tuple[str, int, str]) -> Path:
    arch, size, init = case
    return work / f"{arch}-{size}-{init}"


# -- prepare: model, fp32 export, reference outputs --------------------------------------------------------------


def _train(arch: str, size: int, work: Path, args):
    """A briefly trained model (cached as a state dict): 64 px from scratch, larger sizes fine-tuned from it."""
    import torch

    from mmexport.torchside.backbones import get_backbone
    from mmexport.torchside.data import load_task
    from mmexport.torchside.train import seed_everything, train_plain

    cache = work / "weights" / f"{arch}-{size}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True), json.loads(cache.with_suffix(".json").read_text())
    seed_everything(0)
    model = get_backbone(arch).build(5)
    if size == 64:
        epochs, n_train = args.train_epochs, args.train_images
    else:
        state, facts = _train(arch, 64, work, args)
        if not args.finetune_images:  # the 64 px weights as they are (a CNN with global pooling runs at any size)
            return state, {**facts, "note": f"trained at 64 px, run at {size} px (no fine-tuning)"}
        model.load_state_dict(state)
        epochs, n_train = 1, args.finetune_images
    task = load_task(TARGET.format(n_train=n_train, n_test=args.data), image_size=size)
    start = time.perf_counter()
    result = train_plain(model, task, epochs=epochs, lr=1e-3, batch_size=32, seed=0, device=torch.device("cpu"),
                         stage=f"{arch} {size}px")
    facts = {"epochs": epochs, "n_train": n_train, "seconds": round(time.perf_counter() - start, 1),
             "val_accuracy": result.best_metrics["accuracy"], "val_macro_f1": result.best_metrics["macro_f1"]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, cache)
    cache.with_suffix(".json").write_text(json.dumps(facts, indent=2))
    log(f"trained {arch} {size}px: {facts}")
    return model.state_dict(), facts


def prepare(case: tuple[str, int, str], work: Path, args) -> None:
    import torch

    from mmexport.torchside.backbones import get_backbone
    from mmexport.torchside.data import load_task
    from mmexport.torchside.onnx_export import export_onnx
    from mmexport.runtime.modelinfo import ModelInfo
    from mmexport.runtime.preprocess import normalize

    directory = case_dir(work, case)
    if (directory / "reference.npz").is_file():
        return
    arch, size, init = case
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = get_backbone(arch).build(5)
    training = None
    if init == "trained":
        state, training = _train(arch, size, work, args)
        model.load_state_dict(state)
    model.eval()
    task = load_task(TARGET.format(n_train=args.train_images, n_test=args.data), image_size=size)
    info = ModelInfo(arch, task.classes, size, MEAN, STD)
    start = time.perf_counter()
    export_onnx(model, info, directory / "fp32.onnx", weights_sha256="0" * 64)
    export_seconds = time.perf_counter() - start
    random = normalize(random_images(args.random, size, seed=0), info.preprocessing)
    pixels, labels = task.pixels("test", limit=args.data, spread=True)
    data = normalize(pixels, info.preprocessing)
    outputs = {}
    with torch.inference_mode():
        for name, inputs in (("random", random), ("data", data)):
            outputs[name] = np.concatenate([model(torch.from_numpy(inputs[i:i + 16])).numpy()
                                            for i in range(0, len(inputs), 16)])
    half = {}
    if args.torch_half and size <= args.torch_half_max_size:  # the whole network in torch float16 on the CPU (fp32 accumulation): a cross-check
        half_model = copy.deepcopy(model).half()
        with torch.inference_mode():
            for name, inputs in (("random", random), ("data", data)):
                half[f"half_{name}"] = np.concatenate(
                    [half_model(torch.from_numpy(inputs[i:i + 16]).half()).float().numpy()
                     for i in range(0, len(inputs), 16)])
    np.savez_compressed(directory / "reference.npz", random=random, random_logits=outputs["random"], data=data,
                        data_logits=outputs["data"], labels=labels, **half)
    (directory / "case.json").write_text(json.dumps(
        {"arch": arch, "size": size, "init": init, "training": training, "export_seconds": round(export_seconds, 1),
         "classes": list(task.classes)}, indent=2))
    log(f"prepared {directory.name} (export {export_seconds:.1f} s)")


# -- convert --------------------------------------------------------------------------------------------------


def final_gemm(model) -> list[str]:
    """The weight-bearing node(s) that produce the graph's output (through shape-only ops)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    names, frontier = [], [o.name for o in model.graph.output]
    while frontier:
        node = producers.get(frontier.pop())
        if node is None:
            continue
        if node.op_type in ("Gemm", "MatMul", "Conv"):
            names.append(node.name)
        elif node.op_type in ("Cast", "Reshape", "Flatten", "Identity", "Squeeze", "Add"):
            frontier.extend(i for i in node.input[:1])
    return names


def restore_float_outputs(model) -> list[str]:
    """Undo onnxconverter-common's fp16 graph outputs behind a blocked (float32) last node.

    With ``keep_io_types=True`` and the node that writes a graph output in the block list, the converter
    (1.16.0) still ends the graph with ``Cast(to=float16)`` and declares the output float16. The last Cast is
    turned into a float32 one and the output re-declared float32; returns the outputs fixed.
    """
    from onnx import TensorProto

    fixed = []
    producers = {out: node for node in model.graph.node for out in node.output}
    for value in model.graph.output:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        node = producers.get(value.name)
        if node is not None and node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = TensorProto.FLOAT
            value.type.tensor_type.elem_type = TensorProto.FLOAT
            fixed.append(value.name)
    return fixed


def convert(case: tuple[str, int, str], recipe: str, work: Path, args) -> None:
    import onnx

    directory = case_dir(work, case)
    src = directory / "fp32.onnx"
    dst = directory / f"{recipe}.onnx"
    if dst.is_file() and not args.force:
        return
    model = onnx.load(str(src))
    start = time.perf_counter()
    facts: dict[str, Any] = {"recipe": recipe, "env": versions()}
    if recipe in ("occ-full", "occ-block"):
        from onnxconverter_common import float16

        kwargs: dict[str, Any] = {"keep_io_types": True}
        if recipe == "occ-block":
            kwargs["op_block_list"] = list(float16.DEFAULT_OP_BLOCK_LIST) + SENSITIVE_OPS
            kwargs["node_block_list"] = final_gemm(model)
            facts["blocked"] = {"ops": SENSITIVE_OPS, "nodes": kwargs["node_block_list"]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted = float16.convert_float_to_float16(model, **kwargs)
        facts["clamped_warnings"] = sum(1 for w in caught if "truncated" in str(w.message))
        facts["raw_output_types"] = [o.type.tensor_type.elem_type for o in converted.graph.output]
        facts["outputs_restored_to_float"] = restore_float_outputs(converted)
    elif recipe == "modelopt-autocast":
        try:
            from modelopt.onnx.autocast import convert_to_mixed_precision
        except Exception as exc:  # noqa: BLE001 - any import failure means: not here
            log(f"SKIP modelopt-autocast for {directory.name}: modelopt is not importable in {sys.executable} "
                f"({type(exc).__name__}: {exc}); run this phase in an environment with nvidia-modelopt[onnx]")
            return
        converted = convert_to_mixed_precision(str(src), keep_io_types=True)
    elif recipe == "recipe":
        from mmexport.convert.fp16_recipe import convert_model

        converted, recipe_facts = convert_model(model)
        facts["recipe_facts"] = recipe_facts.as_dict()
    else:
        raise SystemExit(f"unknown recipe {recipe}")
    facts["seconds"] = round(time.perf_counter() - start, 2)
    onnx.save(converted, str(dst))
    dst.with_suffix(".json").write_text(json.dumps(facts, indent=2))
    log(f"converted {directory.name} with {recipe} in {facts['seconds']} s")


# -- evaluate -------------------------------------------------------------------------------------------------


def _types(model) -> dict[str, int]:
    from mmexport.convert.fp16_recipe import _elem_types

    return _elem_types(model)


def graph_cost(path: Path) -> dict[str, Any]:
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path))
    types = _types(model)
    io_names = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    inits = {i.name for i in model.graph.initializer}
    fp32_nodes: dict[str, int] = {}
    fp16_nodes = 0
    casts = internal = on_weights = 0
    for node in model.graph.node:
        if node.op_type == "Cast":
            casts += 1
            if node.input[0] in inits:
                on_weights += 1  # a constant cast: TensorRT folds it at build time, ONNX Runtime at load
            elif not (set(node.input) | set(node.output)) & io_names:
                internal += 1
            continue
        kind = types.get(node.output[0])
        if kind == TensorProto.FLOAT:
            fp32_nodes[node.op_type] = fp32_nodes.get(node.op_type, 0) + 1
        elif kind == TensorProto.FLOAT16:
            fp16_nodes += 1
    fp32_weights = sum(1 for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) > 1)
    return {"nodes": len(model.graph.node), "fp32_nodes": sum(fp32_nodes.values()), "fp32_by_op": fp32_nodes,
            "fp16_nodes": fp16_nodes, "casts": casts, "internal_casts": internal, "weight_casts": on_weights,
            "fp32_weight_tensors": fp32_weights,
            "bytes": path.stat().st_size,
            "output_types": [TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in model.graph.output]}


def emulated_fp16(model):
    """float32 graph computing what the mixed graph computes on a GPU with fp32 accumulation (see the docstring)."""
    from mmexport.convert.fp16_recipe import fp16_emulation_graph

    return fp16_emulation_graph(model)


def _session(model_or_path, threads: int, level=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = level
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run(session, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)])


def _judge(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for set_name, produced in outputs.items():
        stats = {row: compare_outputs(reference[set_name], produced, tol,
                                      labels if set_name == "data" else None) for row, tol in ROWS.items()}
        new = stats["new"]
        ref64 = reference[set_name].astype(np.float64)
        err = np.abs(produced.astype(np.float64) - ref64)
        spread = (ref64.max(axis=1) - ref64.min(axis=1))[:, None]
        budget_new = float(np.max(err / (FP16.atol + FP16.rtol * np.abs(ref64) + FP16.range_rtol * spread)))
        budget_old = float(np.max(err / (FP16_OLD.atol + FP16_OLD.rtol * np.abs(ref64))))
        result[set_name] = {
            "budget_old": budget_old, "budget_new": budget_new,  # max |error| / bound: 1.0 is the edge
            "max_abs": new.max_abs_error, "p99_abs": new.p99_abs_error, "min_cosine": new.min_cosine,
            "top1": new.top1_agreement, "max_logit_range": new.max_logit_range,
            "outside_old": stats["old"].elements_out_of_tolerance, "outside_new": new.elements_out_of_tolerance,
            "elements": int(produced.size), "pass_old": stats["old"].passed, "pass_new": new.passed,
            "failures_new": new.failures,
        }
    result["pass_old"] = all(v["pass_old"] for v in result.values())
    result["pass_new"] = all(v["pass_new"] for k, v in result.items() if isinstance(v, dict))
    return result


def latency(paths: dict[str, Path], image_size: int, args) -> dict[str, float]:
    """Median ms per batch-1 run in ONNX Runtime (CPU), models interleaved over rounds."""
    sessions = {name: _session(path, args.threads) for name, path in paths.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size), dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, {"image": x})
    for _ in range(args.latency_rounds):
        for name, session in sessions.items():
            stop = time.perf_counter() + args.latency_seconds
            while time.perf_counter() < stop:
                start = time.perf_counter()
                session.run(None, {"image": x})
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(values), 3) for name, values in times.items()}


def evaluate(case: tuple[str, int, str], work: Path, args) -> dict[str, Any] | None:
    import onnxruntime as ort

    directory = case_dir(work, case)
    if not (directory / "reference.npz").is_file():
        log(f"SKIP {directory.name}: not prepared")
        return None
    ref = np.load(directory / "reference.npz")
    reference = {"random": ref["random_logits"], "data": ref["data_logits"]}
    inputs = {"random": ref["random"], "data": ref["data"]}
    labels = ref["labels"]
    if case[1] > 64 and args.large_data and args.large_data < len(labels):  # 224 px on a shared 2-core CPU: fewer
        keep = np.linspace(0, len(labels) - 1, args.large_data).round().astype(int)
        reference["data"], inputs["data"], labels = reference["data"][keep], inputs["data"][keep], labels[keep]
    if case[1] > 64 and args.large_random and args.large_random < len(inputs["random"]):
        reference["random"], inputs["random"] = reference["random"][:args.large_random], inputs["random"][:args.large_random]
    meta = json.loads((directory / "case.json").read_text())
    acc = float(np.mean(reference["data"].argmax(1) == labels))
    result: dict[str, Any] = {"case": directory.name, **{k: meta[k] for k in ("arch", "size", "init", "training")},
                              "fp32_data_accuracy": acc, "n_random": len(inputs["random"]),
                              "n_data": len(labels), "recipes": {}}
    fp32 = {name: _run(_session(directory / "fp32.onnx", args.threads), x) for name, x in inputs.items()}
    result["fp32_ort"] = {k: float(np.abs(fp32[k] - reference[k]).max()) for k in fp32}
    if "half_random" in ref:
        half = {"random": ref["half_random"], "data": ref["half_data"]}
        result["torch_half"] = _judge(reference, half, labels)
    import onnx

    for recipe in args.recipes.split(","):
        path = directory / f"{recipe}.onnx"
        if not path.is_file():
            log(f"SKIP evaluating {recipe} for {directory.name}: {path.name} was not made (see the convert phase)")
            continue
        cached = directory / f"{recipe}.eval.json"
        if cached.is_file() and not args.reevaluate and cached.stat().st_mtime >= path.stat().st_mtime:
            result["recipes"][recipe] = json.loads(cached.read_text())
            result["recipes"][recipe]["graph"] = graph_cost(path)  # cheap; the cache may predate a column
            continue
        model = onnx.load(str(path))
        cost = graph_cost(path)
        conversion = json.loads(path.with_suffix(".json").read_text())
        session = _session(model, args.threads)
        produced = {name: _run(session, x) for name, x in inputs.items()}
        emu = _session(emulated_fp16(model), args.threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        emulated = {name: _run(emu, x) for name, x in inputs.items()}
        result["recipes"][recipe] = {"graph": cost, "ort": _judge(reference, produced, labels),
                                     "emulated": _judge(reference, emulated, labels),
                                     "converted_with": conversion["env"], "convert_seconds": conversion["seconds"],
                                     "blocked": conversion.get("blocked") or conversion.get("recipe_facts")}
        result["recipes"][recipe]["n"] = {"random": len(inputs["random"]), "data": len(labels)}
        cached.write_text(json.dumps(result["recipes"][recipe], indent=2, default=float))
        log(f"evaluated {directory.name} {recipe}: ort pass new={result['recipes'][recipe]['ort']['pass_new']} "
            f"emulated pass new={result['recipes'][recipe]['emulated']['pass_new']} "
            f"fp32 nodes {cost['fp32_nodes']} casts {cost['casts']}")
    if args.latency and case[2] == args.latency_init:
        paths = {"fp32": directory / "fp32.onnx"}
        paths.update({r: directory / f"{r}.onnx" for r in result["recipes"]})
        result["latency_ms"] = latency(paths, case[1], args)
        log(f"latency {directory.name}: {result['latency_ms']}")
    return result


# -- tables ---------------------------------------------------------------------------------------------------


def _pf(flag: bool) -> str:
    return "pass" if flag else "FAIL"


def tables(results: list[dict[str, Any]]) -> str:
    lines = ["### Accuracy: ONNX Runtime CPU (what `verify_onnx_artifact` measures) and emulated fp16 arithmetic", "",
             "max / p99 |error|, min cosine and top-1 agreement against torch fp32; random inputs (64) | held-out "
             "synthetic images. Verdicts: old row (5e-3 + 5e-3·|e|, top-1 ≥ 99.5 %) / new row "
             "(1e-3 + 1e-2·range, cosine ≥ 0.999, top-1 ≥ 99.5 %).", "",
             "| model | recipe | run | n random / data | random: max / p99 / min cos / top-1 | "
             "data: max / p99 / min cos / top-1 | worst error / new bound (random, data) | old | new |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def budget(j):
        values = [j[k].get("budget_new") for k in ("random", "data")]
        return "–" if None in values else f"{values[0]:.2f}, {values[1]:.2f}"


    def cell(s):
        return f"{s['max_abs']:.2e} / {s['p99_abs']:.2e} / {s['min_cosine']:.6f} / {s['top1']:.1%}"

    for r in results:
        label = f"{r['arch']} {r['size']}px {r['init']}"
        if r.get("torch_half"):
            j = r["torch_half"]
            lines.append(f"| {label} | (torch .half(), CPU) | torch | {r.get('n_random', '?')} / {r.get('n_data', '?')} | "
                         f"{cell(j['random'])} | {cell(j['data'])} | {budget(j)} | "
                         f"{_pf(j['pass_old'])} | {_pf(j['pass_new'])} |")
        for recipe, rr in r["recipes"].items():
            for run in ("ort", "emulated"):
                j = rr[run]
                n = rr.get("n", {})
                lines.append(f"| {label} | {recipe} | {run} | {n.get('random', '?')} / {n.get('data', '?')} | "
                             f"{cell(j['random'])} | {cell(j['data'])} | {budget(j)} | "
                             f"{_pf(j['pass_old'])} | {_pf(j['pass_new'])} |")
    lines += ["", "### Graph cost", "",
              "Cast nodes: all / on activations inside the graph (fp16↔fp32 boundaries TensorRT runs) / on weights "
              "(constant, folded at build time); the other Casts are the input's and output's.", "",
              "| model | recipe | nodes | nodes left in fp32 (by op) | Cast nodes: all / activation boundaries / on weights "
              "| fp32 weight tensors | file MB | converted with |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    seen = set()
    for r in results:
        for recipe, rr in r["recipes"].items():
            key = (r["arch"], r["size"], r["init"], recipe)
            if key in seen:
                continue
            seen.add(key)
            g = rr["graph"]
            ops = ", ".join(f"{k} {v}" for k, v in sorted(g["fp32_by_op"].items())) or "none"
            env = rr["converted_with"]
            tool = (f"modelopt {env.get('modelopt')}" if recipe == "modelopt-autocast"
                    else f"onnxconverter-common {env.get('onnxconverter_common')}")
            lines.append(f"| {r['arch']} {r['size']}px {r['init']} | {recipe} | {g['nodes']} | {g['fp32_nodes']} ({ops}) | "
                         f"{g['casts']} / {g['internal_casts']} / {g.get('weight_casts', '?')} | {g['fp32_weight_tensors']} | {g['bytes'] / 1e6:.1f} | "
                         f"{tool} |")
    lat = [r for r in results if r.get("latency_ms")]
    if lat:
        names = sorted({k for r in lat for k in r["latency_ms"]}, key=lambda n: (n != "fp32", n))
        lines += ["", "### ONNX Runtime CPU latency, batch 1, median ms (NOT representative of GPU fp16 speed)", "",
                  "| model | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        for r in lat:
            lines.append(f"| {r['arch']} {r['size']}px {r['init']} | " + " | ".join(
                f"{r['latency_ms'][n]:.2f}" if n in r["latency_ms"] else "–" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("prepare", "convert", "evaluate", "all"), default="all")
    parser.add_argument("--work", default="/tmp/mmexport-precision-study")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision"))
    parser.add_argument("--archs", default="resnet18,resnet50,densenet121")
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--large-archs", default="resnet18,densenet121", help="archs also run at sizes other than 64")
    parser.add_argument("--inits", default="stock,trained")
    parser.add_argument("--recipes", default="occ-full,occ-block,modelopt-autocast,recipe")
    parser.add_argument("--random", type=int, default=64, help="random inputs (mmexport's default)")
    parser.add_argument("--data", type=int, default=300, help="held-out synthetic test images")
    parser.add_argument("--large-random", type=int, default=32,
                        help="random inputs evaluated at sizes above 64 px (0: all --random)")
    parser.add_argument("--large-data", type=int, default=64,
                        help="held-out images evaluated at sizes above 64 px (0: all); random inputs stay --random")
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=1200)
    parser.add_argument("--finetune-images", type=int, default=0,
                        help="fine-tune the 64 px weights at larger sizes on this many images (0: use them as they are)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-half", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--torch-half-max-size", type=int, default=64, help="torch CPU fp16 is slow at 224 px")
    parser.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--latency-init", default="trained")
    parser.add_argument("--latency-seconds", type=float, default=1.0)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--force", action="store_true", help="re-convert graphs that exist")
    parser.add_argument("--reevaluate", action="store_true", help="ignore the per-graph evaluation cache")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"environment: {versions()}")
    all_cases = cases(args)
    if args.phase in ("prepare", "all"):
        for case in all_cases:
            prepare(case, work, args)
    if args.phase in ("convert", "all"):
        for case in all_cases:
            if (case_dir(work, case) / "fp32.onnx").is_file():
                for recipe in args.recipes.split(","):
                    convert(case, recipe, work, args)
    if args.phase in ("evaluate", "all"):
        results = [r for r in (evaluate(case, work, args) for case in all_cases) if r is not None]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = tables(results)
        payload = {"machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "platform": platform.platform()},
                   "evaluated_with": versions(), "args": vars(args), "seconds": round(time.perf_counter() - started, 1),
                   "results": results}
        (out / "fp16_study.json").write_text(json.dumps(payload, indent=2, default=float))
        (out / "fp16_tables.md").write_text(text + "\n")
        print(text)
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
