"""ONNX export of the folded network and of the two comparison models, and its verification.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), not
the TorchScript exporter (``dynamo=False``). Measured here (torch 2.14.1,
onnxruntime 1.32, trained resnet18 at 224 px): both give 49 nodes (BatchNorm
folded into Conv), match torch to 3e-5 and run equally fast in ONNX Runtime
(median 15.34 vs 15.31 ms, one thread); on a freshly initialised network the
TorchScript exporter leaves 16 stray ``Identity`` nodes (65 vs 49). The
deciding facts: the TorchScript exporter warns that it is deprecated in torch
2.14 and is slated for removal, while the dynamo exporter is the default, gives
byte-for-byte reproducible files (two exports, one sha256) and states the
dynamic batch dimension through ``torch.export.Dim``. The choice is recorded in
each file's metadata (``exporter``).

Opset 18 (``DEFAULT_OPSET``): the opset torch 2.14's ONNX function library is
written against (``TORCHLIB_OPSET``), so no version conversion runs; ONNX
Runtime >= 1.14 and TensorRT >= 8.6 parse it, and nothing a CNN classifier uses
changed in opsets 19-23.

Graph slimming: not applied, by measurement (resnet18, 224 px, batch 1, ONNX
Runtime 1.32 on this project's 2-core CPU, one intra-op thread, interleaved
runs). ``onnxslim`` 0.1.98 leaves the dynamo graph at 49 nodes (44 784 754 ->
44 707 490 bytes, outputs bit-identical) and gains nothing at run time (median
15.33 ms unslimmed vs 15.28 ms slimmed); ``quant_pre_process`` changes nothing
either. ONNX Runtime's offline optimisation (``optimized_model_filepath``) gives
25 nodes, but hardware-specific ones (NCHWc layout ops, fused Conv+Add+Relu):
not portable, not TensorRT-parsable, and ONNX Runtime applies the same fusions
itself at load in ~0.1 s.

Comparison models for the benchmark (resnet18, 5 classes, 224 px; ONNX Runtime
1.32, 2 intra-op threads, batch 1, interleaved, p10 of 150 runs each):

=========  ========  =====  ==========================  =========  ========
model      file      nodes  after ONNX Runtime's         load       latency
                            optimisation (level all)
=========  ========  =====  ==========================  =========  ========
folded     44.8 MB   49     25 nodes                    0.07 s     7.7 ms
unmerged   95.6 MB   568    the same 25 nodes           0.32 s     7.7 ms
dual       89.6 MB   100    52 nodes                    0.11 s     15.5 ms
=========  ========  =====  ==========================  =========  ========

The unmerged graph carries both sources' backbones and the merge logits, and
every one of the 60 blends ``σ(λ)·A + (1−σ(λ))·B`` as ``Sigmoid`` plus torch's
``lerp`` decomposition (``Less``/``Where``/``Sub``/``Mul``/``Add``), with
BatchNorm as separate nodes (the exporter's own constant folding, which would
fold the small blends only, is told to leave them). All of it reads only
initializers, so ONNX Runtime constant-folds it at session creation: its
optimised graph has no ``Sigmoid``, ``Where`` or ``BatchNormalization`` left and
is node-for-node the folded model's (outputs within 1e-7). In ONNX Runtime the
unmerged model therefore costs what the folded one costs per batch; its price
is twice the file, twice the memory while loading and a slower session start.
A benchmark that wants the in-graph blend's cost must feed the weights as graph
inputs rather than initializers. The dual backbone costs twice the folded
network per batch.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mmexport import __version__
from mmexport.config import check_int
from mmexport.convert.onnxfile import (
    INPUT_NAME,
    ONNX_FORMAT,
    OUTPUT_NAME,
    OnnxFileFacts,
    get_metadata,
    graph_facts,
    load_onnx,
    onnx_model_info,
    read_onnx_metadata,
    set_metadata,
    write_onnx_checked,
)
from mmexport.errors import ArchitectureError, MMExportError
from mmexport.runs.provenance import PROVENANCE_KEYS, VERIFICATION_KEY
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.torchside.backbones import get_backbone
from mmexport.torchside.merge import MergedModel

DEFAULT_OPSET = 18
BATCH_DIM = "batch"
EXPORTER = "torch.onnx.export(dynamo=True)"
EXPORT_BATCH = 2  # traced with batch >= 2 so that batch 1 is never baked into the graph
# folded: a merge's fold (MedMerge or average); finetuned/probed: a single-source baseline's network (no merge);
# unmerged, dual, single: the benchmark's comparison models
ModelKind = Literal["folded", "finetuned", "probed", "unmerged", "dual", "single"]
_KIND_WHAT = {"folded": "MedMerge folded", "finetuned": "fine-tuned (no merge)", "probed": "linear-probed (no merge)",
              "unmerged": "MedMerge unmerged (blend in the graph)", "dual": "dual-backbone",
              "single": "stock (untrained) torchvision"}

# Keys this module writes; ``extra_metadata`` may not override them (nor forge the provenance).
RESERVED_KEYS = frozenset(
    set(ModelInfo("resnet18", ("a", "b"), 16, (0, 0, 0), (1, 1, 1), weights_sha256="x").to_metadata())
    | {"format", "model_kind", "exporter", "torch_version", "onnx_opset", "input_name", "output_name", "granularity",
       "num_sources"} | set(PROVENANCE_KEYS) | {VERIFICATION_KEY}
)


class DualBackbone(nn.Module):
    """Two plain networks side by side; the output is the mean of their logits.

    The naive alternative to merging (an ensemble of the two fine-tuned sources):
    twice the weights and twice the compute of the folded network.
    """

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (self.first(image) + self.second(image)) * 0.5


# -- metadata -------------------------------------------------------------------------------


def _base_metadata(info: ModelInfo, kind: str, weights_sha256: str, opset: int) -> dict[str, str]:
    return {
        **info.with_precision("fp32").to_metadata(),
        "weights_sha256": weights_sha256,
        "format": ONNX_FORMAT,
        "model_kind": kind,
        "exporter": EXPORTER,
        "torch_version": torch.__version__,
        "onnx_opset": str(opset),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
    }


def _merge_extra(metadata: dict[str, str], extra: dict[str, str] | None) -> dict[str, str]:
    if not extra:
        return metadata
    clashes = sorted(set(extra) & RESERVED_KEYS)
    if clashes:
        raise MMExportError(f"extra metadata may not override {', '.join(clashes)}")
    bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise MMExportError(f"extra metadata keys and values must be strings (offending: {', '.join(map(str, bad))})")
    return {**metadata, **extra}


def _doc_string(info: ModelInfo, kind: str, precision: str, description: str | None = None) -> str:
    size = info.image_size
    what = description if description is not None else f"{_KIND_WHAT[kind]} {info.arch}"
    return (
        f"{what}, {precision}, {info.num_classes} classes ({', '.join(info.classes)}). "
        f"Input '{INPUT_NAME}': float32 N x 3 x {size} x {size}. Preprocessing (metadata key 'preprocessing'): "
        f"{info.preprocessing.describe()}. "
        f"Output '{OUTPUT_NAME}': float32 N x {info.num_classes} logits. Made by mmexport {__version__}."
    )


# -- export -----------------------------------------------------------------------------------


def _check_weights_sha(weights_sha256: str) -> None:
    if not isinstance(weights_sha256, str) or not weights_sha256.strip() or "\n" in weights_sha256:
        raise MMExportError("weights_sha256 must be the sha256 of the weights the model was built from")


def _check_opset(opset: int) -> None:
    check_int(opset, f"opset (recommended {DEFAULT_OPSET})", low=13, high=23)


def _check_plain(model: nn.Module, info: ModelInfo, label: str) -> None:
    """``model`` must be the stock torchvision network that ``info`` describes."""
    if isinstance(model, MergedModel):
        raise MMExportError(f"{label}: this is the unmerged model; fold it first or use export_unmerged_onnx")
    if not isinstance(model, nn.Module):
        raise MMExportError(f"{label}: expected a torch nn.Module, got {type(model).__name__}")
    from mmexport.torchside.checkpoints import fit_report

    with torch.device("meta"):
        expected = {k: v.shape for k, v in get_backbone(info.arch).build(info.num_classes).state_dict().items()}
    problems = fit_report(model.state_dict(), expected)
    if problems:
        raise ArchitectureError(f"{label}: not a {info.arch} with {info.num_classes} classes ({'; '.join(problems)})")


def _trace_to_onnx(module: nn.Module, info: ModelInfo, opset: int, *, keep_blend: bool = False):
    """torch.export -> ONNX ``ModelProto`` with a dynamic batch dimension, on the CPU in eval mode.

    ``keep_blend``: the unmerged model. The exporter's optimiser would constant-fold the
    small blends (those under onnxscript's 8192-element folding limit) and keep the large
    ones; for a faithful comparison model every ``Sigmoid``/``Softmax`` over merge logits
    is kept, so the whole blend stays in the graph.
    """
    module = copy.deepcopy(module).cpu().eval()
    for param in module.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(EXPORT_BATCH, 3, info.image_size, info.image_size, generator=generator)
    batch = torch.export.Dim(BATCH_DIM, min=1)
    captured = io.StringIO()
    try:
        # The exporter reports its steps on stdout and warns freely; neither belongs in the CLI's output.
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                None,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                optimize=not keep_blend,
                verbose=False,
            )
            if keep_blend:
                import onnxscript.optimizer

                onnxscript.optimizer.optimize_ir(
                    program.model, should_fold=lambda node: False if node.op_type in ("Sigmoid", "Softmax") else None
                )
            model = program.model_proto
    except MMExportError:
        raise
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MMExportError(f"ONNX export of {info.arch} failed: {detail}") from exc
    names_in = [v.name for v in model.graph.input]
    names_out = [v.name for v in model.graph.output]
    if names_in != [INPUT_NAME] or names_out != [OUTPUT_NAME]:
        raise MMExportError(f"exported graph has inputs {names_in} and outputs {names_out}, expected ['image'] and ['logits']")
    return model


@dataclass(frozen=True, kw_only=True)
class OnnxExport(OnnxFileFacts):
    """An fp32 ONNX export: the file's facts, what kind of network it holds, and how it was exported."""

    model_kind: str
    precision: str = "fp32"
    exporter: str
    torch_version: str
    export_seconds: float


def _export(
    module: nn.Module, info: ModelInfo, path: str | os.PathLike[str], *, kind: ModelKind, opset: int,
    weights_sha256: str, extra_metadata: dict[str, str] | None, kind_metadata: dict[str, str] | None = None,
    provenance: dict[str, str] | None = None,
) -> OnnxExport:
    _check_opset(opset)
    _check_weights_sha(weights_sha256)
    provenance = dict(provenance or {})
    if provenance and provenance.get("model_kind", kind) != kind:
        raise MMExportError(f"the provenance says model_kind {provenance.get('model_kind')!r}, the export {kind!r}")
    metadata = _merge_extra({**_base_metadata(info, kind, weights_sha256, opset), **(kind_metadata or {})}, extra_metadata)
    metadata.update(provenance)
    start = time.perf_counter()
    model = _trace_to_onnx(module, info, opset, keep_blend=(kind == "unmerged"))
    model.producer_name = "mmexport"
    model.producer_version = __version__
    model.doc_string = _doc_string(info, kind, "fp32", provenance.get("model_description"))
    set_metadata(model, metadata)
    written = write_onnx_checked(model, path, info)
    return OnnxExport(**written.file_fields(), model_kind=kind, exporter=EXPORTER, torch_version=torch.__version__,
                      export_seconds=round(time.perf_counter() - start, 3))


def export_onnx(
    model: nn.Module,
    info: ModelInfo,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    weights_sha256: str,
    extra_metadata: dict[str, str] | None = None,
    kind: ModelKind = "folded",
    provenance: dict[str, str] | None = None,
) -> OnnxExport:
    """Export the plain (folded or fine-tuned) torchvision network to one self-contained fp32 ONNX file.

    Input ``image`` float32 (N, 3, S, S), output ``logits`` float32 (N, K), N dynamic.
    ``weights_sha256`` is the sha256 of the model file the network was loaded from; it
    is written into the metadata with the :class:`ModelInfo`, the preprocessing, the
    precision (``fp32``) and the exporter. The file is checked (``check_model`` with
    ``full_check``, an ONNX Runtime run at batch 1 and 3) before it replaces ``path``.
    Returns the :class:`OnnxExport` facts: opset, exporter, node counts, size, sha256, and
    the input/output names, dtypes and shapes. ``provenance``: the run's fields
    (:func:`mmexport.runs.provenance.artifact_provenance`: method, model kind and description,
    run id, input hashes, metrics); its ``model_kind`` must be ``kind``, its description
    opens the file's ``doc_string``.
    """
    _check_plain(model, info, "export_onnx")
    return _export(model, info, path, kind=kind, opset=opset, weights_sha256=weights_sha256,
                   extra_metadata=extra_metadata, provenance=provenance)


def export_unmerged_onnx(
    merged: MergedModel,
    info: ModelInfo,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    weights_sha256: str,
    extra_metadata: dict[str, str] | None = None,
) -> OnnxExport:
    """Export the unmerged MedMerge model (both sources, the merge logits and the blend in the graph).

    A comparison model for the benchmark, not a deployment artifact; ``weights_sha256``
    is the unmerged checkpoint's sha256.
    """
    if not isinstance(merged, MergedModel):
        raise MMExportError(f"export_unmerged_onnx needs a MergedModel, got {type(merged).__name__}")
    if merged.arch != info.arch or merged.num_classes != info.num_classes:
        raise ArchitectureError(
            f"unmerged model is {merged.arch} with {merged.num_classes} classes; the model info says "
            f"{info.arch} with {info.num_classes}"
        )
    kind_metadata = {
        "granularity": merged.granularity,
        "num_sources": str(merged.num_sources),
    }
    return _export(merged, info, path, kind="unmerged", opset=opset, weights_sha256=weights_sha256,
                   extra_metadata=extra_metadata, kind_metadata=kind_metadata)


def export_dual_onnx(
    dual: DualBackbone | tuple[nn.Module, nn.Module],
    info: ModelInfo,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    weights_sha256: str,
    extra_metadata: dict[str, str] | None = None,
) -> OnnxExport:
    """Export two plain networks run side by side, logits averaged (the ensemble baseline).

    ``weights_sha256`` identifies both weight files, e.g. ``"<sha A>+<sha B>"``.
    """
    if isinstance(dual, tuple):
        dual = DualBackbone(*dual)
    if not isinstance(dual, DualBackbone):
        raise MMExportError(f"export_dual_onnx needs a DualBackbone, got {type(dual).__name__}")
    _check_plain(dual.first, info, "dual backbone (first)")
    _check_plain(dual.second, info, "dual backbone (second)")
    return _export(dual, info, path, kind="dual", opset=opset, weights_sha256=weights_sha256,
                   extra_metadata=extra_metadata)


__all__ = [
    "DEFAULT_OPSET", "DualBackbone", "EXPORTER", "OnnxExport", "INPUT_NAME", "ONNX_FORMAT", "OUTPUT_NAME", "export_dual_onnx",
    "export_onnx", "export_unmerged_onnx", "get_metadata", "graph_facts", "load_onnx", "onnx_model_info",
    "read_onnx_metadata", "set_metadata", "write_onnx_checked",
]
