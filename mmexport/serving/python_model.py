"""Triton Python-backend model: an mmexport artifact served through :mod:`mmexport.runtime`.

``mmexport fold RUN --to triton --backend python`` (:func:`mmexport.serving.triton.export_repository`)
copies this file into a model repository as ``<name>/<version>/model.py``, beside the
artifact it serves (``model.onnx``, or ``model.plan`` with its sidecar) and the version's
``mmexport.json``, which names that artifact. It imports nothing but
:mod:`mmexport.runtime`, numpy and Triton's ``triton_python_backend_utils`` (plus the
standard library), so the server's Python needs ``mmexport`` installed but not PyTorch.

Inputs (see the model's ``config.pbtxt``):

* ``image``: FP32, ``[-1, 3, S, S]``, already normalised with the model's recorded
  preprocessing (what ``mmexport.runtime.Predictor.preprocess`` produces);
* ``image_bytes`` (repositories exported with ``preprocess=True``): BYTES, ``[-1, 1]``,
  one encoded image (PNG, JPEG, ...) per row -- or a DICOM Part 10 file, recognised by
  content, when the block records a DICOM pixel pipeline. The server decodes and preprocesses
  it with the model's own recorded preprocessing block
  (:func:`mmexport.runtime.preprocess.preprocess_image`), exactly as evaluation did.

Both inputs are optional in such a repository; a request carries exactly one of them.

Output: ``logits``, FP32 ``[-1, K]``. The config wires it to ``labels.txt``, so Triton's
classification extension (``class_count`` / ``"parameters": {"classification": k}``)
returns ``"score:index:label"`` strings.

Before anything is loaded, every file the version's ``mmexport.json`` lists is hashed
against the sha256 it records, and the served artifact must be among them: a file
changed, missing or unrecorded fails ``initialize`` with one line in the server's log,
and Triton reports the model not ready (it never serves bytes other than the ones
that were verified).

Every request of a dynamic batch is validated and decoded on its own (a bad request
gets its own error response and does not fail its neighbours); the valid ones then run
as one batch through the predictor, which splits it by the artifact's batch limit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mmexport import runtime
from mmexport.errors import CheckpointError, one_line
from mmexport.serving.version_record import VERSION_RECORD, read_version_record, recorded_file_problems


IMAGE_INPUT = "image"
BYTES_INPUT = "image_bytes"
OUTPUT = "logits"
MAX_MESSAGE = 500  # characters of an error response (a hostile input must not echo back megabytes)


def _one_line(exc: BaseException) -> str:
    text = one_line(exc)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def _checked_record(version_dir: Path) -> dict:
    """The version's record (read once), after every file it records has its recorded sha256; else one line."""
    try:
        record = read_version_record(version_dir)
        problems = recorded_file_problems(version_dir, record)
    except CheckpointError as exc:
        problems = [str(exc)]
    if problems:
        raise CheckpointError(f"{problems[0]}; refusing to serve it"
                              + (f" ({len(problems) - 1} more problem(s))" if len(problems) > 1 else ""))
    return record


def _request_error(message: str):
    """An error the client caused: INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) where the backend has error codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    """The Python backend's model class (``initialize`` / ``execute`` / ``finalize``)."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = Path(__file__).resolve().parent if "__file__" in globals() else None
        if here is None or not (here / VERSION_RECORD).is_file():
            here = Path(args["model_repository"]) / str(args["model_version"])
        try:
            record = _checked_record(here)
        except CheckpointError as exc:
            # The Python backend appends the traceback to an exception's text in the server log; the
            # reason stands alone on one line first, and the model stays not ready.
            pb_utils.Logger.log_error(f"mmexport: {_one_line(exc)}")
            raise pb_utils.TritonModelException(_one_line(exc)) from None
        artifact = here / record["served_artifact"]
        device = "cpu"
        if str(args.get("model_instance_kind", "CPU")).upper() == "GPU":
            device = f"cuda:{int(args.get('model_instance_device_id', 0))}"
        parameters = {key: value.get("string_value", "") for key, value in (config.get("parameters") or {}).items()}
        threads = int(parameters["threads"]) if parameters.get("threads") else None
        max_batch = int(config.get("max_batch_size", 0)) or None
        self.predictor = runtime.load(artifact, device=device, threads=threads, batch_size=max_batch)
        self.names = {item["name"] for item in config.get("input", [])}
        self.accepts_bytes = BYTES_INPUT in self.names
        size = self.predictor.info.image_size
        # A model whose block records a DICOM pixel pipeline also takes DICOM Part 10 files as image_bytes.
        dicom = getattr(self.predictor.info.preprocessing, "dicom", None) is not None
        encoded = "encoded PNG/JPEG images or DICOM files" if dicom else "encoded PNG/JPEG images"
        self.expected = (
            f"send exactly one of {IMAGE_INPUT} (FP32, N x 3 x {size} x {size}, normalised)"
            + (f" or {BYTES_INPUT} (BYTES, N x 1 {encoded})" if self.accepts_bytes else "")
        )

    def _batch(self, request) -> np.ndarray:
        """One request's float32 N x 3 x S x S batch, or an exception naming what is wrong."""
        image = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT)
        encoded = pb_utils.get_input_tensor_by_name(request, BYTES_INPUT) if self.accepts_bytes else None
        if (image is None) == (encoded is None):
            raise ValueError(self.expected)
        if image is not None:
            array = image.as_numpy()
            if array.dtype != np.float32:
                raise ValueError(f"{IMAGE_INPUT} must be FP32, got {array.dtype}")
            if array.ndim == 0 or array.shape[0] == 0:
                raise ValueError(f"{IMAGE_INPUT} holds no image (shape {list(array.shape)})")
            return self.predictor.preprocess(array)  # checks the shape and that every value is finite
        items = encoded.as_numpy().reshape(-1)
        if items.size == 0:
            raise ValueError(f"{BYTES_INPUT} holds no image")
        if not all(isinstance(item, (bytes, np.bytes_)) for item in items):
            raise ValueError(f"{BYTES_INPUT} must hold encoded images as BYTES")
        items = [bytes(item) for item in items]
        return self.predictor.preprocess(items)  # decode + the recorded preprocessing, per image

    def execute(self, requests):
        responses = [None] * len(requests)
        accepted = []
        for index, request in enumerate(requests):
            try:
                accepted.append((index, self._batch(request)))
            except Exception as exc:  # the user's input: an error response for this request only
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=_request_error(_one_line(exc)))
        if accepted:
            try:
                logits = self.predictor.logits(np.concatenate([batch for _, batch in accepted]))
            except Exception as exc:
                for index, _ in accepted:
                    responses[index] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"inference failed: {_one_line(exc)}"))
            else:
                start = 0
                for index, batch in accepted:
                    part = np.ascontiguousarray(logits[start : start + len(batch)], dtype=np.float32)
                    start += len(batch)
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, part)])
        return responses

    def finalize(self):
        predictor = getattr(self, "predictor", None)
        if predictor is not None:
            predictor.close()
