"""Precision as a property of the ONNX graph (DESIGN §4): fp16 cast and int8 static QDQ.

TensorRT 10 deprecated and TensorRT 11 removed the builder's fp16/int8 flags and
implicit INT8 calibration, so the types must come from the graph (strong
typing, explicit Q/DQ). Both transforms start from the checked fp32 export,
keep its metadata (with ``precision`` updated and the facts of the transform
added), keep float32 ``image``/``logits`` I/O, are checked in ONNX Runtime on the
CPU before they are published, and are written atomically.

int8: two Q/DQ encodings (``target``), measured on this project's 2-core x86 CPU
(AVX-512 VNNI), trained resnet18 at 224 px, batch 1, ONNX Runtime 1.32, one
intra-op thread, interleaved runs (fp32: median 15.5 ms):

* ``target="onnxruntime"`` (default): uint8 asymmetric activations, int8
  symmetric per-channel weights (U8S8, ONNX Runtime's recommended x86 format).
  ONNX Runtime turns every Conv into ``QLinearConv`` (and Add, MaxPool, Gemm into
  their quantized forms; each ReLU is absorbed by its asymmetric range): 38
  nodes after optimisation, median 4.7 ms, 3.3x faster than fp32.
* ``target="tensorrt"``: int8 *symmetric* activations and weights (zero point 0,
  all TensorRT's explicit quantization accepts), biases left in float
  (TensorRT fuses them itself). The same file runs in ONNX Runtime for the
  verification, but slowly on x86: ONNX Runtime keeps 11 of the 20 Convs in
  float between DQ and Q and every ReLU as a float node (median 12.9 ms, 1.2x
  faster than fp32); with ``session.qdqisint8allowed=1`` all Convs become s8s8
  ``QLinearConv``, which ran ~4.5x *slower* than fp32 here. Activations
  ``QInt8`` without symmetry are no faster and not TensorRT-parsable.

No single encoding is both TensorRT-parsable and fast on ONNX Runtime's CPU, so
the target is explicit; the same calibration images and method serve both.
Both passed the int8 policy (top-1 agreement 100 %, macro-F1 unchanged) on the
held-out images of that model.

``quant_pre_process`` (symbolic shape inference + ONNX Runtime basic
optimisation) is not run: on the dynamo export it changed nothing (49 nodes
before and after, identical quantized graphs and latency), the exporter having
already folded BatchNorm and written full shape information.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmexport.errors import DataError, MissingDependencyError, MMExportError
from mmexport.export.onnx import (
    INPUT_NAME,
    get_metadata,
    load_onnx,
    set_metadata,
    write_onnx_checked,
)
from mmexport.fileio import sha256_file
from mmexport.modelfile import ModelInfo

DEFAULT_CALIBRATION_IMAGES = 256  # enough for stable min/max and histograms on a CNN; all images if fewer
CALIBRATION_BATCH = 8  # images per calibration run
CALIBRATION_CHUNK = 32  # images whose intermediate tensors are held at once (ONNX Runtime keeps them all otherwise)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT8_TARGETS = ("onnxruntime", "tensorrt")
CalibrationMethodName = Literal["minmax", "entropy", "percentile"]
Int8Target = Literal["onnxruntime", "tensorrt"]


def _source(src_path: str | os.PathLike[str]):
    """The fp32 source model, its metadata and :class:`ModelInfo`."""
    model = load_onnx(src_path)
    metadata = get_metadata(model)
    precision = metadata.get("precision", "fp32")
    if precision != "fp32":
        raise MMExportError(f"{src_path}: is already {precision}; convert from the fp32 export")
    info = ModelInfo.from_metadata(metadata, str(src_path))
    return model, metadata, info


def _doc(model: Any, precision: str) -> None:
    text = model.doc_string or ""
    model.doc_string = text.replace(", fp32,", f", {precision},", 1) if ", fp32," in text else text


def _check_float_io(model: Any, label: str) -> None:
    import onnx

    for value in list(model.graph.input) + list(model.graph.output):
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise MMExportError(f"{label}: {value.name} is not float32 after conversion")


# -- fp16 ---------------------------------------------------------------------------------------


def convert_fp16(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str]) -> dict[str, Any]:
    """float16 weights and compute, float32 ``image``/``logits`` (Cast nodes at the edges).

    Uses ``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)``.
    Weights below float16's range are clamped to ±1e-7 and above it to ±1e4 by the
    converter; how many were is recorded (``fp16_clamped_values``).
    """
    try:
        from onnxconverter_common import float16
        import onnxconverter_common
    except ImportError:
        raise MissingDependencyError("onnxconverter-common is not installed: pip install onnxconverter-common") from None
    model, metadata, info = _source(src_path)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    clamped = sum(1 for w in caught if "truncated" in str(w.message))
    _check_float_io(converted, str(dst_path))
    set_metadata(
        converted,
        {
            **metadata,
            "precision": "fp16",
            "source_onnx_sha256": sha256_file(src_path),
            "fp16_converter": f"onnxconverter-common {onnxconverter_common.__version__} (keep_io_types=True)",
            "fp16_clamped_values": str(clamped),
        },
    )
    _doc(converted, "fp16")
    facts = write_onnx_checked(converted, dst_path, info)
    return {
        "format": "onnx",
        "precision": "fp16",
        "source_sha256": metadata.get("weights_sha256"),
        "fp16_clamped_values": clamped,
        "convert_seconds": round(time.perf_counter() - start, 3),
        **facts,
    }


# -- int8 ---------------------------------------------------------------------------------------


def calibration_sha256(images: np.ndarray) -> str:
    """sha256 of a calibration set: its shape, then its float32 C-order bytes."""
    array = np.ascontiguousarray(images, dtype=np.float32)
    digest = hashlib.sha256(("float32" + repr(tuple(array.shape))).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _static_input_dims(model: Any) -> tuple[int | None, ...]:
    dims = []
    for dim in model.graph.input[0].type.tensor_type.shape.dim:
        dims.append(int(dim.dim_value) if dim.HasField("dim_value") else None)
    return tuple(dims)


def check_calibration_images(images: Any, info: ModelInfo, input_dims: tuple[int | None, ...] = ()) -> None:
    """Calibration images must be normalised floats shaped (N, 3, S, S), N >= 1; else a one-line :class:`DataError`."""
    if not isinstance(images, np.ndarray):
        raise DataError(f"calibration images must be a numpy array, got {type(images).__name__}")
    size = info.image_size
    expected = [3, size, size]
    for axis, dim in enumerate(input_dims[1:4]):
        if dim is not None:
            expected[axis] = dim
    if images.ndim != 4:
        raise DataError(f"calibration images must be N x {expected[0]} x {expected[1]} x {expected[2]} (NCHW), got shape {images.shape}")
    if images.shape[0] < 1:
        raise DataError("calibration needs at least 1 image, got 0")
    if images.shape[1] != expected[0]:
        raise DataError(f"calibration images have {images.shape[1]} channels, the model takes {expected[0]} ({info.channel_order})")
    if tuple(images.shape[2:]) != (expected[1], expected[2]):
        raise DataError(
            f"calibration images are {images.shape[2]} x {images.shape[3]}, the model takes {expected[1]} x {expected[2]}"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"calibration images must be normalised floats, got {images.dtype}")


def select_calibration(images: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` images as contiguous float32, evenly spaced over the set (a sorted set still spans all classes)."""
    if len(images) > limit:
        index = np.unique(np.linspace(0, len(images) - 1, num=limit).round().astype(np.int64))
        images = images[index]
    array = np.ascontiguousarray(images, dtype=np.float32)
    if not np.isfinite(array).all():
        raise DataError("calibration images contain NaN or Inf values")
    return array


def _largest_divisor_at_most(total: int, bound: int) -> int:
    return max(d for d in range(1, max(1, min(total, bound)) + 1) if total % d == 0)


def _calibration_reader(images: np.ndarray, batch_size: int, progress: Callable[[int, int], None] | None):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Batches of ``images`` over a window set by ONNX Runtime's strided calibration."""

        def __init__(self) -> None:
            self.batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
            self.start, self.stop, self.position, self.done = 0, len(self.batches), 0, 0

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.stop = start_index, min(end_index, len(self.batches))
            self.position = self.start

        def get_next(self):
            if self.position >= self.stop:
                return None
            batch = self.batches[self.position]
            self.position += 1
            self.done += len(batch)
            if progress is not None:
                progress(self.done, len(images))
            return {INPUT_NAME: batch}

    return Reader()


@contextlib.contextmanager
def _quiet():
    """Silence ONNX Runtime's quantizer: it prints progress and logs advice on the root logger."""
    root = logging.getLogger()
    level = root.level
    # logging.warning() on a handler-less root logger would install a stderr handler for good.
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
        if guard is not None:
            root.removeHandler(guard)


def _quantizer_settings(target: str, per_channel: bool):
    from onnxruntime.quantization import QuantType

    if target == "tensorrt":
        activation = QuantType.QInt8
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
    else:
        activation = QuantType.QUInt8
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    return activation, QuantType.QInt8, extra


def quantize_int8(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    calibration_images: np.ndarray,
    *,
    per_channel: bool = True,
    method: CalibrationMethodName = "minmax",
    target: Int8Target = "onnxruntime",
    max_images: int = DEFAULT_CALIBRATION_IMAGES,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Static int8 QDQ quantization of the fp32 export, calibrated on target images.

    ``calibration_images``: float32 N x 3 x S x S, normalised like the model's input
    (e.g. ``TaskData.arrays("train")[0]``); at most ``max_images`` (default 256) are
    used, evenly spaced over the set, all of them if fewer. ``method``: ``minmax``,
    ``entropy`` or ``percentile`` (ONNX Runtime's calibrators). ``target``: see the
    module docstring (``onnxruntime``: U8S8, fast on the CPU; ``tensorrt``: symmetric
    S8S8 with zero points 0). Weights are int8 symmetric, per output channel unless
    ``per_channel=False``. ``progress(done, total)`` is called as calibration advances.

    Bad calibration data raises :class:`DataError` before anything is written.
    """
    if method not in CALIBRATION_METHODS:
        raise MMExportError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if target not in INT8_TARGETS:
        raise MMExportError(f"unknown int8 target {target!r}; choose one of {', '.join(INT8_TARGETS)}")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise MMExportError(f"max_images must be a positive integer, got {max_images!r}")
    model, metadata, info = _source(src_path)
    check_calibration_images(calibration_images, info, _static_input_dims(model))
    images = select_calibration(calibration_images, max_images)  # only what is used is converted and hashed

    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime") from None

    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    activation_type, weight_type, extra = _quantizer_settings(target, per_channel)
    batches = -(-len(images) // CALIBRATION_BATCH)
    # ONNX Runtime's calibrators keep every intermediate tensor of every image they are
    # given in memory (~20 MB per 224 px image for resnet18); feeding them a window at a
    # time (their "strided" mode, which needs a window size dividing the batch count)
    # bounds that to CALIBRATION_CHUNK images.
    stride = _largest_divisor_at_most(batches, max(1, CALIBRATION_CHUNK // CALIBRATION_BATCH))
    extra = {**extra, "CalibStridedMinMax": stride}
    reader = _calibration_reader(images, CALIBRATION_BATCH, progress)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmexport-quant-") as workdir:
        quantized_path = Path(workdir) / "quantized.onnx"
        try:
            with _quiet():
                quantize_static(
                    model,
                    str(quantized_path),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    reduce_range=False,
                    activation_type=activation_type,
                    weight_type=weight_type,
                    calibrate_method=calibrate_method,
                    calibration_providers=["CPUExecutionProvider"],
                    extra_options=extra,
                )
        except MMExportError:
            raise
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MMExportError(f"int8 quantization of {src_path} failed: {detail}") from exc
        quantized = onnx.load(str(quantized_path))
    ops = {node.op_type for node in quantized.graph.node}
    if not {"QuantizeLinear", "DequantizeLinear"} <= ops:
        raise MMExportError(f"int8 quantization of {src_path} inserted no QuantizeLinear/DequantizeLinear nodes")
    _check_float_io(quantized, str(dst_path))

    calibration = {
        "count": len(images),
        "method": method,
        "sha256": calibration_sha256(images),
    }
    quantized.producer_name = model.producer_name
    quantized.producer_version = model.producer_version
    quantized.doc_string = model.doc_string
    _doc(quantized, "int8")
    set_metadata(
        quantized,
        {
            **metadata,
            "precision": "int8",
            "source_onnx_sha256": sha256_file(src_path),
            "quant_format": "QDQ",
            "int8_target": target,
            "activation_type": "int8 symmetric" if target == "tensorrt" else "uint8 asymmetric",
            "weight_type": "int8 symmetric " + ("per-channel" if per_channel else "per-tensor"),
            "calibration_count": str(calibration["count"]),
            "calibration_method": method,
            "calibration_sha256": calibration["sha256"],
        },
    )
    facts = write_onnx_checked(quantized, dst_path, info)
    return {
        "format": "onnx",
        "precision": "int8",
        "int8_target": target,
        "per_channel": per_channel,
        "calibration": calibration,
        "quantize_seconds": round(time.perf_counter() - start, 3),
        **facts,
    }
