"""ONNX files without PyTorch: reading, metadata, graph facts, and the checked atomic write.

Shared by the exporter (torch side) and the precision transforms (fp16, int8), which
need only ``onnx`` and ONNX Runtime.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from mmexport.artifacts import ArtifactFacts
from mmexport.errors import CheckpointError, MMExportError
from mmexport.fileio import atomic_path, sha256_file, write_bytes_atomic
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner

ONNX_FORMAT = "mmexport-onnx/2"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SMOKE_BATCHES = (1, 3)  # every written file is run in ONNX Runtime at these batch sizes first
MAX_PROTO_BYTES = 2**31 - 1  # protobuf's single-message limit; larger models would need external data


def load_onnx(path: str | os.PathLike[str]):
    """``onnx.load`` (no external data) with one-line errors for a missing or unreadable file."""
    import onnx

    target = Path(path)
    if not target.is_file():
        raise CheckpointError(f"{target}: no such ONNX file")
    try:
        return onnx.load(str(target), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{target}: not a readable ONNX model ({detail})") from None


def set_metadata(model: Any, fields: dict[str, str]) -> None:
    """Replace ``model.metadata_props`` with ``fields`` (sorted: reproducible bytes)."""
    del model.metadata_props[:]
    for key in sorted(fields):
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = str(fields[key])


def get_metadata(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def graph_sha256(model: Any) -> str:
    """sha256 of the serialised graph (nodes, initializers, inputs, outputs): the file minus its metadata.

    Anyone can recompute it with plain ``onnx``:
    ``hashlib.sha256(onnx.load(path).graph.SerializeToString()).hexdigest()``. Writing metadata
    (:func:`stamp_metadata`) leaves it unchanged, so a verification record that names it can be
    embedded in the very file it verified.
    """
    import hashlib

    return hashlib.sha256(model.graph.SerializeToString()).hexdigest()


def stamp_metadata(path: str | os.PathLike[str], fields: dict[str, str]) -> str:
    """Set ``fields`` in the file's ``metadata_props`` (other keys kept), graph and weights untouched; atomic.

    Returns the graph's sha256 (:func:`graph_sha256`), checked to be the same before and after:
    the file that was verified and the file that now carries the record compute the same thing.
    """
    import onnx

    model = load_onnx(path)
    before = graph_sha256(model)
    bad = [k for k, v in fields.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise MMExportError(f"{Path(path).name}: metadata keys and values must be strings (offending: {bad[0]!r})")
    set_metadata(model, {**get_metadata(model), **fields})
    write_bytes_atomic(path, model.SerializeToString())
    after = graph_sha256(onnx.load(str(path), load_external_data=False))
    if after != before:  # cannot happen through set_metadata; a check that it did not
        raise MMExportError(f"{Path(path).name}: writing metadata changed the graph ({before[:12]}… -> {after[:12]}…)")
    return before


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The file's ``metadata_props`` as a dict."""
    return get_metadata(load_onnx(path))


def onnx_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """The :class:`ModelInfo` an mmexport ONNX file carries in its metadata."""
    return ModelInfo.from_metadata(read_onnx_metadata(path), str(path))


def _tensor_shape(value_info: Any) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for dim in value_info.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return dims


@dataclass(frozen=True, kw_only=True)
class OnnxFileFacts(ArtifactFacts):
    """One ONNX file as written and checked: its hash and size, opset, node counts and I/O signature."""

    format: str = "onnx"
    sha256: str
    size_bytes: int
    opset: int | None
    nodes: int
    op_counts: dict[str, int]
    initializers: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    dynamic_batch_checked: list[int]

    def file_fields(self) -> dict[str, Any]:
        """These fields by name, to build a maker's result (which extends this class) from them."""
        return {f.name: getattr(self, f.name) for f in fields(OnnxFileFacts) if f.name != "hint"}


def graph_facts(model: Any) -> dict[str, Any]:
    """Opset, node counts and the input/output signature of an ONNX model."""
    import onnx

    def signature(values):
        return [
            {
                "name": v.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": _tensor_shape(v),
            }
            for v in values
        ]

    ops = Counter(node.op_type for node in model.graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "opset": opset,
        "nodes": len(model.graph.node),
        "op_counts": dict(sorted(ops.items())),
        "initializers": len(model.graph.initializer),
        "inputs": signature(model.graph.input),
        "outputs": signature(model.graph.output),
    }


def _smoke_run(path: Path, num_classes: int, image_size: int) -> None:
    """Run the file in ONNX Runtime (CPU) at each of ``SMOKE_BATCHES``; any problem is an error."""
    rng = np.random.default_rng(0)
    with OnnxRuntimeRunner(path, name="export check", threads=1) as runner:
        for batch in SMOKE_BATCHES:
            images = rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
            outputs = runner.infer(images)
            logits = outputs.get(OUTPUT_NAME)
            if len(outputs) != 1 or logits is None or logits.shape != (batch, num_classes):
                shape = logits.shape if logits is not None else sorted(outputs)
                raise MMExportError(
                    f"exported model gives output {shape} for batch {batch}, expected {OUTPUT_NAME} ({batch}, {num_classes})"
                )
            if not np.isfinite(logits).all():
                raise MMExportError(f"exported model gives NaN/Inf logits for batch {batch}")


def write_onnx_checked(model: Any, path: str | os.PathLike[str], info: ModelInfo) -> OnnxFileFacts:
    """Serialise ``model`` to a temporary file beside ``path``, check it, then move it into place.

    The checks (``onnx.checker.check_model(full_check=True)`` and an ONNX Runtime run at
    batch sizes 1 and 3) run on the temporary file, so a model that fails them is never
    published; an interruption anywhere leaves the previous ``path`` or nothing.
    """
    import onnx

    size = model.ByteSize()
    if size > MAX_PROTO_BYTES:
        raise MMExportError(f"{Path(path).name}: model is {size / 2**30:.1f} GiB, over ONNX's 2 GiB single-file limit")
    data = model.SerializeToString()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise MMExportError(f"{Path(path).name}: exported graph fails the ONNX checker: {str(exc).splitlines()[0]}") from None
        _smoke_run(tmp, info.num_classes, info.image_size)
    # No "path" among the facts: callers often write through a temporary name (RunDir,
    # atomic_path), and a manifest must not record that name.
    target = Path(path)
    return OnnxFileFacts(size_bytes=target.stat().st_size, sha256=sha256_file(target),
                         dynamic_batch_checked=list(SMOKE_BATCHES), **graph_facts(model))


__all__ = [
    "INPUT_NAME", "MAX_PROTO_BYTES", "ONNX_FORMAT", "OUTPUT_NAME", "SMOKE_BATCHES", "OnnxFileFacts", "get_metadata",
    "graph_facts", "graph_sha256",
    "load_onnx", "onnx_model_info", "read_onnx_metadata", "set_metadata", "stamp_metadata", "write_onnx_checked",
]
