"""DICOM in through Triton (issue 19): ``image_bytes`` carries DICOM Part 10 files.

A model whose preprocessing block records a DICOM pixel pipeline (``mmexport-preprocessing/2``)
is exported with ``--backend python --preprocess`` and served by a real ``tritonserver``. No
training: a tiny ONNX (global average pool + a matmul) carries the block in its
``metadata_props`` and is exported as a standalone file (``allow_untracked``: it belongs to
no run). Real pydicom test files sent as ``image_bytes``, mixed with a PNG in one dynamic
batch, give the in-process ``runtime.load(...).predict`` logits; bad DICOMs each get their
own one-line HTTP 400 and the server keeps answering. One server launch, loopback only.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")

from mmexport import runtime
from mmexport.runtime.dicom import DicomPixels
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.preprocess import Preprocessing
from mmexport.serving.server import TritonServer
from mmexport.serving.triton import export_repository
from tests.runtime.test_dicom import MEAN, STD, dicom_bytes
from tests.runtime.test_hostile_runtime import tiny_onnx
from tests.serving.test_serve_hostile import TIMEOUT, _bytes_request, _infer
from tests.serving.test_triton import triton  # noqa: F401  (module fixture)

CLASSES = ("effusion", "nodule", "normal")
SIZE = 16
# CT, MR (MONOCHROME2 with rescale), CR MONOCHROME1 (inverted), YBR_FULL (converted to RGB): all uncompressed
GOOD = ("CT_small.dcm", "MR_small.dcm", "RG3_UNCR.dcm", "SC_ybr_full_uncompressed.dcm")


def _real(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available")
    return Path(path).read_bytes()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def dicom_model(path: Path) -> Path:
    """A tiny ONNX whose block records a DICOM pipeline (full range, multi-frame refused) after a centre crop."""
    prep = Preprocessing.center_crop(SIZE, MEAN, STD).with_dicom(DicomPixels.full_range())
    info = ModelInfo("resnet18", CLASSES, SIZE, MEAN, STD, preprocessing=prep)
    model = tiny_onnx(path, info.to_metadata(), size=SIZE, classes=len(CLASSES))
    with runtime.load(model) as predictor:
        assert predictor.info.preprocessing.to_dict()["format"] == "mmexport-preprocessing/2"
    return model


def _bad_dicoms() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, what the one-line error must say)."""
    image = np.zeros((4, 4), np.uint8)
    return {
        "SR without pixels": (_real("reportsi.dcm"), "a DICOM object with no image"),
        "truncated Pixel Data": (_real("MR_truncated.dcm"), "Pixel Data is truncated"),
        "says DICM, garbage after": (bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + bytes(40),
                                      "says DICM but does not parse"),  # a meta element claiming 65535 bytes
        "huge Rows x Columns, tiny file": (dicom_bytes(image, pixel_data=bytes(16), Rows=30000, Columns=30000),
                                           "refused before decoding"),
        "multi-frame under refuse": (_real("emri_small.dcm"), "a multi-frame DICOM (10 frames)"),
    }


def test_dicom_bytes_through_triton_match_the_runtime_and_bad_ones_are_refused(triton, tmp_path):  # noqa: F811
    model = dicom_model(tmp_path / "model.onnx")
    repo = tmp_path / "repo"
    export_repository(model, repo, backend="python", name="dicom", preprocess=True, allow_untracked=True)
    good = [_real(name) for name in GOOD]
    png = _png()
    with runtime.load(model) as predictor:
        expected = predictor.predict(good + [png]).logits
        # the four files really differ after the pipeline (not one grey image four times)
        assert len({tuple(np.round(row, 4)) for row in expected}) == len(expected)

    with TritonServer(repo, ready_timeout=120, installation=triton, log_file=tmp_path / "server.log") as server:
        assert server.model_ready("dicom")
        port = server.http_port

        # One request: the four DICOMs and a PNG together.
        status, answer = _infer(port, "dicom", *_bytes_request(good + [png]))
        assert status == 200, answer
        got = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

        # Concurrent one-image requests, which Triton's dynamic batcher may run as one batch, bad ones among them:
        # each good one gets its own logits, each bad one its own one-line 400.
        bad = _bad_dicoms()
        cases = [(f"good {name}", item, None) for name, item in zip(GOOD, good)] + [("good png", png, None)]
        cases += [(name, item, fragment) for name, (item, fragment) in bad.items()]
        started = time.monotonic()
        with ThreadPoolExecutor(len(cases)) as pool:
            answers = list(pool.map(lambda case: _infer(port, "dicom", *_bytes_request([case[1]])), cases))
        assert time.monotonic() - started < TIMEOUT
        for index, ((name, _, fragment), (status, answer)) in enumerate(zip(cases, answers)):
            if fragment is None:
                assert status == 200, (name, answer)
                row = np.asarray(answer["outputs"][0]["data"], np.float32)
                np.testing.assert_allclose(row, expected[index], rtol=0, atol=1e-4, err_msg=name)
            else:
                message = answer.get("error", "")
                assert status == 400 and fragment in message, (name, status, answer)
                assert "\n" not in message and len(message) <= 600, (name, message)
        assert server.is_running and server.model_ready("dicom")

        # Each bad one alone as well, and a valid request is still answered after them.
        for name, (item, fragment) in bad.items():
            status, answer = _infer(port, "dicom", *_bytes_request([item]))
            assert status == 400 and fragment in answer.get("error", ""), (name, status, answer)
        status, answer = _infer(port, "dicom", *_bytes_request([good[2]]))
        assert status == 200, answer
        np.testing.assert_allclose(np.asarray(answer["outputs"][0]["data"], np.float32), expected[2],
                                   rtol=0, atol=1e-4)

        # Both inputs at once: the model's message names DICOM files among what image_bytes takes.
        image = {"name": "image", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32",
                 "data": np.zeros((1, 3, SIZE, SIZE)).tolist()}
        both = {"inputs": [image, {"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES", "data": ["abc"]}]}
        status, answer = _infer(port, "dicom", json.dumps(both).encode())
        assert status == 400 and "encoded PNG/JPEG images or DICOM files" in answer.get("error", ""), answer
