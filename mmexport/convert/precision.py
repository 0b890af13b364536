"""Precision as a property of the ONNX graph: fp16 cast and int8 static QDQ.

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
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmexport.config import check_int
from mmexport.convert.fp16_recipe import convert_model
from mmexport.convert.node_names import module_names, shown
from mmexport.convert.onnxfile import (
    INPUT_NAME,
    OnnxFileFacts,
    get_metadata,
    load_onnx,
    set_metadata,
    write_onnx_checked,
)
from mmexport.errors import DataError, MissingDependencyError, MMExportError
from mmexport.fileio import sha256_file
from mmexport.progress import ProgressSink, sink
from mmexport.runtime.compare import run_batched
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.runners.onnxruntime import OnnxRuntimeRunner
from mmexport.runtime.tolerances import TOP1_CONFIDENCE, samples_to_show

DEFAULT_CALIBRATION_IMAGES = 256  # enough for stable min/max and histograms on a CNN; all images if fewer
CALIBRATION_BATCH = 8  # images per calibration run
CALIBRATION_CHUNK = 32  # images whose intermediate tensors are held at once (ONNX Runtime keeps them all otherwise)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT8_TARGETS = ("onnxruntime", "tensorrt")
CalibrationMethodName = Literal["minmax", "entropy", "percentile"]
logger = logging.getLogger(__name__)
Int8Target = Literal["onnxruntime", "tensorrt"]


def _source(src_path: str | os.PathLike[str]):
    """The fp32 source model, its metadata and :class:`ModelInfo`."""
    model = load_onnx(src_path)
    metadata = get_metadata(model)
    info = ModelInfo.from_metadata(metadata, str(src_path))
    if info.precision != "fp32":
        raise MMExportError(f"{src_path}: is already {info.precision}; convert from the fp32 export")
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


@dataclass(frozen=True, kw_only=True)
class Fp16Export(OnnxFileFacts):
    """An fp16 ONNX file: the file's facts and what the conversion did."""

    precision: str = "fp16"
    source_sha256: str | None
    fp16_clamped_values: int
    fp16_recipe: str
    fp32_nodes: list[str]
    convert_seconds: float


def convert_fp16(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str]) -> Fp16Export:
    """float16 network, float32 classifier head, float32 ``image``/``logits``.

    Recipe (:mod:`mmexport.convert.fp16_recipe`; measurements in ``benchmarks/results/precision``):
    ``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)``, then the
    classifier Gemm that writes ``logits`` gets its float32 weights back and reads its input
    through one Cast: two Casts in all, as with the plain conversion, and the logits are
    not rounded to float16. Weights below float16's range are clamped to ±1e-7 and above it
    to ±1e4 by the converter; how many were is recorded (``fp16_clamped_values``). The
    recipe, the tool and its version and the nodes kept in float32 are recorded
    (``fp16_recipe``, JSON).
    """

    model, metadata, info = _source(src_path)
    start = time.perf_counter()
    try:
        converted, recipe = convert_model(model)
    except ImportError:
        raise MissingDependencyError("onnxconverter-common is not installed: pip install onnxconverter-common") from None
    _check_float_io(converted, str(dst_path))
    set_metadata(
        converted,
        {
            **metadata,
            "precision": "fp16",
            "source_onnx_sha256": sha256_file(src_path),
            "fp16_converter": recipe.converter,
            "fp16_clamped_values": str(recipe.clamped_values),
            "fp16_recipe": json.dumps(recipe.metadata_record(), sort_keys=True),
        },
    )
    _doc(converted, "fp16")
    written = write_onnx_checked(converted, dst_path, info)
    return Fp16Export(**written.file_fields(), source_sha256=metadata.get("weights_sha256"),
                      fp16_clamped_values=recipe.clamped_values, fp16_recipe=recipe.recipe,
                      fp32_nodes=list(recipe.fp32_nodes), convert_seconds=round(time.perf_counter() - start, 3))


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


def _calibration_reader(images: np.ndarray, batch_size: int, progress: ProgressSink):
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
            progress.advance(len(batch))
            return {INPUT_NAME: batch}

    return Reader()


class _FromQuantizer(logging.Filter):
    """Diverts the records ONNX Runtime's quantizer logs on the *root* logger to this module's logger (DEBUG)."""
    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname and "quantization" in record.pathname:
            logger.debug("onnxruntime.quantization: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _quiet():
    """Keep ONNX Runtime's quantizer out of the user's output without touching anyone else's logging.

    The quantizer prints progress on stdout and logs advice through ``logging.info``/
    ``logging.warning`` on the root logger. Its records are filtered (by origin) and
    re-logged at DEBUG under ``mmexport.convert.precision``; the root logger's level
    and handlers stay as they are. One guard: ``logging.warning()`` on a root logger
    without handlers would install a stderr handler for good, so a ``NullHandler``
    sits there for the duration when (and only when) the root has none.
    """
    root = logging.getLogger()
    diverter = _FromQuantizer()
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    root.addFilter(diverter)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(diverter)
        if guard is not None:
            root.removeHandler(guard)


# The ops whose *inputs* TensorRT runs in int8 (ModelOpt's placement for TensorRT): Q/DQ only in front of
# them, no output quantization, the classifier left in float. Measured (benchmarks/results/precision):
# fewer Q/DQ nodes (resnet18 29/49 instead of 49/70) and +1.2 / +0.5 pt top-1 agreement over a Q/DQ pair
# after every tensor, without ModelOpt as a dependency.
TENSORRT_INPUT_OPS = ["Conv", "Add", "MaxPool", "AveragePool", "GlobalAveragePool", "BatchNormalization"]


def _quantizer_settings(target: str, per_channel: bool):
    from onnxruntime.quantization import QuantType

    if target == "tensorrt":
        activation = QuantType.QInt8
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                 "ForceQuantizeNoInputCheck": True, "DedicatedQDQPair": False}
    else:
        activation = QuantType.QUInt8
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    return activation, QuantType.QInt8, extra


class _Quantizer:
    """ONNX Runtime's static QDQ quantizer, calibrated once and re-run with different float nodes.

    With ONNX Runtime's calibration cache (``calibration_cache_path``, ONNX Runtime
    >= 1.24) the tensor ranges are computed once and every later quantization only
    rewrites the graph; older versions re-calibrate each time (same result, slower).
    """

    def __init__(self, model: Any, images: np.ndarray, *, method: str, target: str, per_channel: bool,
                 workdir: Path, progress: ProgressSink) -> None:
        import inspect

        import onnx
        from onnxruntime.quantization import CalibrationMethod, quantize_static

        self.model = model
        # quantize_static rewrites a ModelProto it is given (external data); it gets a file, the proto stays intact
        self.source = workdir / "source.onnx"
        onnx.save(model, str(self.source))
        self.images = images
        self.method = method
        self.per_channel = per_channel
        self.progress = progress
        self.workdir = workdir
        self.calibrate_method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[method]
        self.activation_type, self.weight_type, extra = _quantizer_settings(target, per_channel)
        self.op_types: list[str] | None = None
        self.always_float: list[str] = []
        if target == "tensorrt":
            self.op_types = list(TENSORRT_INPUT_OPS)
            self.always_float = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
            extra = {**extra, "OpTypesToExcludeOutputQuantization": sorted({n.op_type for n in model.graph.node})}
        if method == "minmax":
            # ONNX Runtime's calibrators keep every intermediate tensor of every image they
            # are given (~20 MB per 224 px image for resnet18); its strided min/max mode
            # (a window that divides the batch count) bounds that to CALIBRATION_CHUNK images.
            batches = -(-len(images) // CALIBRATION_BATCH)
            extra = {**extra, "CalibStridedMinMax": _largest_divisor_at_most(batches, max(1, CALIBRATION_CHUNK // CALIBRATION_BATCH))}
        # The histogram calibrators (entropy, percentile) stack every batch's activations into one
        # array, so all batches must be the same size: a batch that divides the image count.
        self.batch = CALIBRATION_BATCH if method == "minmax" else _largest_divisor_at_most(len(images), CALIBRATION_BATCH)
        self.extra = extra
        self.cache = workdir / "calibration.json" if "calibration_cache_path" in inspect.signature(quantize_static).parameters else None
        self.runs = 0

    def quantize(self, out_path: Path, *, exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> Any:
        """Quantize into ``out_path`` (keeping ``exclude`` in float, or quantizing ``only``); returns the ModelProto."""
        import onnx
        from onnxruntime.quantization import QuantFormat, quantize_static

        calibrated = self.cache is not None and self.cache.is_file()
        reader = None
        if not calibrated:
            reader = _calibration_reader(self.images, self.batch, self.progress)
            self.progress.start(f"calibrating int8 ({self.method}) on {len(self.images)} images", len(self.images))
        options: dict[str, Any] = {}
        if self.cache is not None:
            options["calibration_cache_path"] = str(self.cache)
        try:
            with _quiet():
                quantize_static(
                    str(self.source), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=self.per_channel,
                    reduce_range=False, activation_type=self.activation_type, weight_type=self.weight_type,
                    nodes_to_exclude=(list(exclude) + self.always_float) or None,
                    nodes_to_quantize=list(only) if only is not None else None, op_types_to_quantize=self.op_types,
                    calibrate_method=self.calibrate_method, calibration_providers=["CPUExecutionProvider"],
                    extra_options=self.extra, **options,
                )
        except MMExportError:
            raise
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MMExportError(f"int8 quantization failed: {detail}") from exc
        finally:
            if reader is not None:
                self.progress.finish()
        self.runs += 1
        return onnx.load(str(out_path))


def quantizable_nodes(model: Any) -> list[str]:
    """The weight-bearing nodes (Conv, Gemm, MatMul), input to output."""
    return [node.name for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul") and node.name]


def _outputs(path: Path, images: np.ndarray) -> np.ndarray:

    with OnnxRuntimeRunner(path, name="int8 sensitivity") as runner:
        return next(iter(run_batched(runner, images, 16).values()))


def _relative_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute logit error relative to the mean logit range (scale-free, as the fp16 policy row)."""
    spread = float(np.mean(reference.max(axis=1) - reference.min(axis=1))) or 1.0
    return float(np.mean(np.abs(candidate - reference))) / spread


@dataclass
class Int8Search:
    """How an accuracy-aware int8 artifact was found: the float nodes and what each attempt measured.

    ``modules``: ONNX node name -> the torch module it came from (``layer4.1.conv2``,
    :mod:`mmexport.convert.node_names`), for every weight-bearing node; reports name both.
    """
    float_nodes: list[str] = field(default_factory=list)
    sensitivity: list[tuple[str, float]] = field(default_factory=list)  # node, relative error when only it is int8
    attempts: list[dict[str, Any]] = field(default_factory=list)  # float node count -> passed, top-1 (N, bound), F1 drop
    passed: bool = False
    modules: dict[str, str] = field(default_factory=dict)
    unjudgeable: str | None = None  # why the search did not run: the judged set is too small for any graph to pass

    @property
    def float_modules(self) -> list[str]:
        """The float nodes as torch module names (the node name where none is known)."""
        return [self.modules.get(n, n) for n in self.float_nodes]

    def as_dict(self) -> dict[str, Any]:
        return {"float_nodes": self.float_nodes, "float_modules": self.float_modules,
                "sensitivity": [[n, round(e, 6), self.modules.get(n, n)] for n, e in self.sensitivity],
                "attempts": self.attempts, "passed": self.passed, "unjudgeable": self.unjudgeable}


@dataclass(frozen=True)
class Calibration:
    """The calibration set an int8 file was made with: how many images, the calibrator, and their sha256."""

    count: int
    method: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Int8Export(OnnxFileFacts):
    """An int8 QDQ ONNX file: the file's facts, the calibration, and the nodes the accuracy-aware search kept in float."""

    precision: str = "int8"
    int8_target: str
    per_channel: bool
    calibration: Calibration
    float_nodes: list[str]
    int8_search: Int8Search | None
    quantize_seconds: float
    float_modules: list[str] = field(default_factory=list)  # float_nodes as torch module names (layer4.1.conv2)

    def float_layers(self) -> list[str]:
        """Each float node as a user reads it: ``layer4.1.conv2 (node_Conv_330)``."""
        return [shown(node, dict(zip(self.float_nodes, self.float_modules))) for node in self.float_nodes]


def quantize_int8(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    calibration_images: np.ndarray,
    *,
    per_channel: bool = True,
    method: CalibrationMethodName = "minmax",
    target: Int8Target = "onnxruntime",
    max_images: int = DEFAULT_CALIBRATION_IMAGES,
    progress: ProgressSink | None = None,
    judge: Callable[[Path], Any] | None = None,
    max_float_fraction: float = 0.5,
) -> Int8Export:
    """Static int8 QDQ quantization of the fp32 export, calibrated on target images; accuracy-aware with ``judge``.

    ``calibration_images``: float32 N x 3 x S x S, normalised like the model's input
    (labels are not needed: any images of the model's size and preprocessing); at most
    ``max_images`` (default 256) are used, evenly spaced over the set. ``method``:
    ``minmax``, ``entropy`` or ``percentile`` (ONNX Runtime's calibrators). ``target``:
    see the module docstring (``onnxruntime``: U8S8, fast on the CPU; ``tensorrt``:
    symmetric S8S8 with zero points 0). Weights are int8 symmetric, per output channel
    unless ``per_channel=False``. Calibration reports its images through ``progress``.

    ``judge(path) -> report`` (``.passed``, ``.stats()``): the int8 policy on labelled
    held-out data. When the fully quantized graph fails it, the weight-bearing nodes are
    ranked by *sensitivity* -- the logit error (relative to the logit range) on the
    calibration images when only that node is int8 -- and the most sensitive are kept in
    float, 1, 2, 4, ... of them and then bisected, until the policy holds or
    ``max_float_fraction`` of the nodes are float. The nodes kept, the ranking and every
    attempt go into the file's metadata (``int8_recipe``) and the returned facts. With
    no passing candidate the last one is written and the caller's check refuses it.

    Bad calibration data raises :class:`DataError` before anything is written.
    """
    if method not in CALIBRATION_METHODS:
        raise MMExportError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if target not in INT8_TARGETS:
        raise MMExportError(f"unknown int8 target {target!r}; choose one of {', '.join(INT8_TARGETS)}")
    check_int(max_images, "max_images")
    if not 0.0 <= max_float_fraction <= 1.0:
        raise MMExportError(f"max_float_fraction must be in [0, 1], got {max_float_fraction}")
    model, metadata, info = _source(src_path)
    check_calibration_images(calibration_images, info, _static_input_dims(model))
    images = select_calibration(calibration_images, max_images)  # only what is used is converted and hashed
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime") from None

    progress = sink(progress)
    start = time.perf_counter()
    search = Int8Search(modules=module_names(model, quantizable_nodes(model)))
    with tempfile.TemporaryDirectory(prefix="mmexport-quant-") as workdir:
        work = Path(workdir)
        quantizer = _Quantizer(model, images, method=method, target=target, per_channel=per_channel, workdir=work,
                               progress=progress)
        candidate = work / "int8.onnx"
        quantized = quantizer.quantize(candidate)
        if judge is not None:
            quantized = _search_float_nodes(quantizer, work, candidate, quantized, judge, search, max_float_fraction,
                                            src_path, progress)
    ops = {node.op_type for node in quantized.graph.node}
    if not {"QuantizeLinear", "DequantizeLinear"} <= ops:
        raise MMExportError(f"int8 quantization of {src_path} inserted no QuantizeLinear/DequantizeLinear nodes")
    _check_float_io(quantized, str(dst_path))

    calibration = Calibration(count=len(images), method=method, sha256=calibration_sha256(images))
    quantized.producer_name = model.producer_name
    quantized.producer_version = model.producer_version
    quantized.doc_string = model.doc_string
    _doc(quantized, "int8")
    recipe = {"tool": f"onnxruntime.quantization.quantize_static {_ort_version()}", "format": "QDQ", "target": target,
              "calibration": method, "per_channel": per_channel, "accuracy_aware": judge is not None,
              "float_nodes": search.float_nodes, "float_modules": search.float_modules, "quantizations": quantizer.runs}
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
            "calibration_count": str(calibration.count),
            "calibration_method": method,
            "calibration_sha256": calibration.sha256,
            "int8_recipe": json.dumps(recipe, sort_keys=True),
        },
    )
    written = write_onnx_checked(quantized, dst_path, info)
    return Int8Export(
        **written.file_fields(), int8_target=target, per_channel=per_channel, calibration=calibration,
        float_nodes=list(search.float_nodes), float_modules=search.float_modules,
        int8_search=search if judge is not None else None,
        hint=None if judge is None or search.passed else (
            f"{search.unjudgeable}: judge on a larger held-out set (--data) or publish it with --allow-unverified"
            if search.unjudgeable else
            f"the accuracy-aware search kept up to {int(len(quantizable_nodes(model)) * max_float_fraction)} of "
            f"{len(quantizable_nodes(model))} layers in float and int8 still fails; raise --int8-max-float (a fraction, "
            "at most 1), judge on more held-out images (each flip needs more of them for the bound to clear the floor) "
            "or deploy fp16"),
        quantize_seconds=round(time.perf_counter() - start, 3),
    )


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _too_few_to_judge(report: Any) -> str | None:
    """Why no int8 graph can pass ``report``'s policy on its labelled images (too few of them), or None."""
    tolerance = getattr(report, "tolerance", None)
    if tolerance is None or not 0.0 < tolerance.min_top1_agreement < 1.0:
        return None
    needed = samples_to_show(tolerance.min_top1_agreement)
    for name, stats in report.stats().items():
        if getattr(stats, "top1_rule", "") == "bound" and getattr(stats, "n_samples", needed) < needed:
            return (f"{name} holds {stats.n_samples} labelled images, too few to show top-1 agreement "
                    f"≥ {tolerance.min_top1_agreement:.0%} at {TOP1_CONFIDENCE:.0%} confidence (needs ≥ {needed})")
    return None


def _search_float_nodes(quantizer: _Quantizer, work: Path, candidate: Path, quantized: Any, judge: Callable[[Path], Any],
                        search: Int8Search, max_float_fraction: float, src_path: Any, progress: ProgressSink) -> Any:
    """Keep the most sensitive nodes in float until ``judge`` passes (see :func:`quantize_int8`)."""
    import shutil

    judge_report: list[Any] = [None]

    def attempt(floats: list[str]) -> tuple[bool, Path, Any]:
        path = work / f"int8-{len(floats)}.onnx"
        proto = quantizer.quantize(path, exclude=floats) if floats else quantized
        if not floats:
            shutil.copyfile(candidate, path)
        report = judge(path)
        judge_report[0] = report
        stats = next(iter(report.stats().values()), None)
        search.attempts.append({
            "float_nodes": len(floats), "passed": bool(report.passed),
            "n_samples": getattr(stats, "n_samples", None),
            "top1_agreement": None if stats is None else round(stats.top1_agreement, 6),
            "top1_lower_bound": (None if getattr(stats, "top1_lower_bound", None) is None
                                 else round(stats.top1_lower_bound, 6)),
            "macro_f1_drop": None if stats is None or stats.macro_f1_drop is None else round(stats.macro_f1_drop, 6),
        })
        return bool(report.passed), path, proto

    ok, path, proto = attempt([])
    if ok:
        search.passed = True
        return proto
    too_few = _too_few_to_judge(judge_report[0])
    if too_few is not None:  # no choice of float layers changes N: searching would only repeat the verdict
        search.unjudgeable = too_few
        progress.message(f"int8 accuracy-aware search skipped: {too_few}")
        return proto
    nodes = [n for n in quantizable_nodes(quantizer.model) if n not in quantizer.always_float]
    budget = int(len(nodes) * max_float_fraction)
    if budget < 1:
        return proto
    progress.message(f"int8 fails the policy fully quantized: ranking {len(nodes)} layers by sensitivity")
    sample = quantizer.images[: min(64, len(quantizer.images))]
    reference = _outputs(quantizer.source, sample)
    progress.start("measuring per-layer int8 sensitivity", len(nodes))
    try:
        for node in nodes:
            only = work / "only.onnx"
            quantizer.quantize(only, only=[node])
            search.sensitivity.append((node, _relative_error(_outputs(only, sample), reference)))
            progress.advance()
    finally:
        progress.finish()
    ranked = [name for name, _ in sorted(search.sensitivity, key=lambda item: -item[1])]
    best: tuple[list[str], Path, Any] | None = None
    low, count = 0, 1
    last = (path, proto)
    while count <= budget:  # 1, 2, 4, ... float nodes until the policy holds
        progress.message(f"int8 with the {count} most sensitive layer(s) in float: "
                         + ", ".join(search.modules.get(n, n) for n in ranked[:count]))
        ok, path, proto = attempt(ranked[:count])
        last = (path, proto)
        if ok:
            best = (ranked[:count], path, proto)
            break
        low = count
        count = count * 2 if count * 2 <= budget or count == budget else budget
    if best is None:
        return last[1]
    high = len(best[0])
    while high - low > 1:  # bisect between the last failing and the first passing count
        middle = (low + high) // 2
        ok, path, proto = attempt(ranked[:middle])
        if ok:
            high, best = middle, (ranked[:middle], path, proto)
        else:
            low = middle
    search.float_nodes, search.passed = list(best[0]), True
    return best[2]
