"""The DICOM pixel pipeline (mmexport.runtime.dicom): recorded in the block, exact on hand-computed pixels,
matching pydicom's own functions on every real pydicom-data file it accepts, one line for every refusal."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", minversion="3", reason="the DICOM pipeline needs pydicom >= 3 (mmexport[dicom])")

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mmexport.errors import CheckpointError, DataError, MissingDependencyError
from mmexport.runtime.dicom import DicomPixels
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.preprocess import (
    Preprocessing,
    open_image,
    preprocess_image,
    read_dicom,
    read_rgb,
)

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _table_tool():
    spec = importlib.util.spec_from_file_location("dicom_table", ROOT / "tools" / "dicom_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dicom_table"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


TABLE = _table_tool()


def prep_for(policy: DicomPixels, size: int = 8) -> Preprocessing:
    return Preprocessing.exact(size, MEAN, STD).with_dicom(policy)


def dicom_bytes(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", *, bits_stored: int | None = None,
                signed: bool = False, frames: int | None = None, sop_class: str = SECONDARY_CAPTURE,
                syntax: str = ExplicitVRLittleEndian, pixel_data: bytes | None = None, **attributes) -> bytes:
    """A DICOM Part 10 file written with pydicom: ``pixels`` (rows, cols[, 3]) or (frames, rows, cols[, 3])."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    if pixels is not None:
        colour = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
        shape = pixels.shape[1:] if frames else pixels.shape
        ds.Rows, ds.Columns = shape[0], shape[1]
        ds.SamplesPerPixel = 3 if colour else 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(signed)
        if colour:
            ds.PlanarConfiguration = 0
        if frames:
            ds.NumberOfFrames = frames
        ds.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def rgb(data, policy: DicomPixels) -> np.ndarray:
    return np.asarray(read_dicom(data, prep_for(policy)))


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 600, message
    return message


# -- the recorded policy and the block -------------------------------------------------------------


def test_policy_constructors_round_trip_and_describe():
    for policy in (DicomPixels.full_range(), DicomPixels.fixed_window(-600, 1500), DicomPixels.file_window(frame=2),
                   DicomPixels.fixed_window(40, 80, "sigmoid", frame=0)):
        assert DicomPixels.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    lung = DicomPixels.fixed_window(-600, 1500)
    assert (lung.voi, lung.window_center, lung.window_width, lung.window_function) == ("window", -600.0, 1500.0, "linear")
    assert "centre -600 width 1500" in lung.describe()


@pytest.mark.parametrize("change, fragment", [
    ({"voi": "auto"}, "voi 'auto'"),
    ({"voi": "window"}, "window_center must be a number"),
    ({"voi": "window", "window_center": 40, "window_width": 0.5, "window_function": "linear"}, "at least 1"),
    ({"voi": "window", "window_center": float("nan"), "window_width": 80, "window_function": "linear"}, "finite"),
    ({"voi": "window", "window_center": 40, "window_width": True, "window_function": "linear"}, "must be a number"),
    ({"voi": "window", "window_center": 40, "window_width": 80, "window_function": "gamma"}, "window_function 'gamma'"),
    ({"window_center": 40}, "must be null for voi 'none'"),
    ({"multiframe": "frame"}, "frame_index must be an integer"),
    ({"multiframe": "frame", "frame_index": -1}, "frame_index must be an integer"),
    ({"multiframe": "frame", "frame_index": 1.0}, "frame_index must be an integer"),
    ({"frame_index": 3}, "must be null for multiframe refuse"),
    ({"pipeline": "dicom-v9"}, "pipeline 'dicom-v9'"),
    ({"voi": 3}, "voi must be a string"),
    ({"extra": 1}, "unknown field(s) 'extra'"),
])
def test_malformed_policies_are_refused_in_one_line(change, fragment):
    data = {**DicomPixels.full_range().to_dict(), **change}
    with pytest.raises(CheckpointError, match=re.escape(fragment)) as excinfo:
        DicomPixels.from_dict(data)
    one_line(excinfo)


def test_block_version_2_carries_the_dicom_section_and_version_1_is_unchanged():
    plain = Preprocessing.center_crop(224, MEAN, STD)
    text = plain.to_json()
    assert json.loads(text)["format"] == "mmexport-preprocessing/1" and '"dicom"' not in text  # byte-identical to before
    assert Preprocessing.from_json(text) == plain and plain.dicom is None
    with_dicom = plain.with_dicom(DicomPixels.fixed_window(-600, 1500, frame=0))
    data = json.loads(with_dicom.to_json())
    assert data["format"] == "mmexport-preprocessing/2" and data["dicom"]["voi"] == "window"
    assert Preprocessing.from_json(with_dicom.to_json()) == with_dicom
    assert with_dicom.describe().startswith("DICOM (dicom-v1): modality LUT/rescale, VOI fixed window")
    info = ModelInfo("resnet18", ("a", "b"), 224, MEAN, STD, preprocessing=with_dicom)
    assert ModelInfo.from_metadata(info.to_metadata(), "model.onnx").preprocessing == with_dicom
    for bad, fragment in (({**data, "dicom": None}, "needs a dicom section"),
                          ({**data, "format": "mmexport-preprocessing/1"}, "unknown field(s) 'dicom'"),
                          ({**data, "dicom": {**data["dicom"], "voi": "auto"}}, "dicom: invalid DICOM pixel policy")):
        with pytest.raises(CheckpointError, match=re.escape(fragment)):
            Preprocessing.from_dict(bad)
    missing = {k: v for k, v in data.items() if k != "dicom"}
    with pytest.raises(CheckpointError, match="missing field"):
        Preprocessing.from_dict(missing)
    with pytest.raises(CheckpointError, match="dicom must be a DICOM pixel policy"):
        Preprocessing("exact", (8, 8), "none", None, MEAN, STD, dicom={"voi": "none"})


# -- hand-computed pixels on synthetic files -------------------------------------------------------


def test_rescale_and_full_range_by_hand():
    # 12 of 16 bits, slope 2, intercept -1000: stored 0..4095 -> -1000..7190, so v = 2s / 8190
    stored = np.array([[0, 4095, 2048, 1]], np.uint16)
    data = dicom_bytes(stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000)
    got = rgb(data, DicomPixels.full_range())
    np.testing.assert_array_equal(got[0, :, 0], [0, 255, 128, 0])  # 255*4096/8190 = 127.53 -> 128; 0.06 -> 0
    assert (got == got[..., :1]).all()  # grey replicated to R, G, B


def test_signed_full_range_by_hand():
    stored = np.array([[-32768, 32767, 0, -1]], np.int16)
    got = rgb(dicom_bytes(stored, signed=True), DicomPixels.full_range())
    np.testing.assert_array_equal(got[0, :, 0], [0, 255, 128, 127])  # 32768/65535*255 = 127.502; 32767/.. = 127.498


def test_fixed_ct_lung_window_by_hand():
    # CT: signed stored values, HU = s - 1024. Lung window centre -600 width 1500 (linear, PS3.3 C.11.2.1.2.1):
    # below -600.5 - 749.5 = -1350 -> 0; above -600.5 + 749.5 = 149 -> 1; else (HU + 600.5) / 1499 + 0.5
    hu = np.array([-2000, -1350, -600, 0, 149, 3000])
    data = dicom_bytes((hu + 1024).astype(np.int16)[None], signed=True, RescaleSlope=1, RescaleIntercept=-1024,
                       sop_class=CT_IMAGE, WindowCenter=40, WindowWidth=80)
    got = rgb(data, DicomPixels.fixed_window(-600, 1500))
    np.testing.assert_array_equal(got[0, :, 0], [0, 0, 128, 230, 255, 255])  # 0.50033 -> 127.58; 0.90060 -> 229.65
    exact = rgb(data, DicomPixels.fixed_window(-600, 1500, "linear_exact"))  # (HU + 600) / 1500 + 0.5
    np.testing.assert_array_equal(exact[0, :, 0], [0, 0, 128, 230, 255, 255])  # 0.5 -> 127.5 -> 128 (half to even)
    brain = rgb(data, DicomPixels.file_window())  # the file's own window: 40/80 -> [0.5 - 39.5, 0.5 + ... ]
    np.testing.assert_array_equal(brain[0, :, 0], [0, 0, 0, 0, 255, 255])  # HU 0: (0 - 39.5) / 79 + 0.5 = 0 -> 0


def test_monochrome1_is_inverted_after_the_file_window_by_hand():
    # window 100/51 (linear): low 99.5 - 25 = 74.5, high 124.5; s=100: (100 - 99.5)/50 + 0.5 = 0.51, inverted 0.49
    stored = np.array([[74, 125, 100, 0]], np.uint8)
    data = dicom_bytes(stored, "MONOCHROME1", WindowCenter=[100, 300], WindowWidth=[51, 20])  # the first window
    np.testing.assert_array_equal(rgb(data, DicomPixels.file_window())[0, :, 0], [255, 0, 125, 255])
    np.testing.assert_array_equal(rgb(data, DicomPixels.full_range())[0, :, 0], [255 - 74, 255 - 125, 155, 255])


def test_sigmoid_window_from_the_file_by_hand():
    stored = np.array([[50, 55, 0]], np.uint8)
    data = dicom_bytes(stored, WindowCenter=50, WindowWidth=20, VOILUTFunction="SIGMOID")
    # 1 / (1 + exp(-4 (s - 50) / 20)): 0.5 -> 127.5 -> 128 (half to even); 0.7311 -> 186.4 -> 186; 4.5e-5 -> 0
    np.testing.assert_array_equal(rgb(data, DicomPixels.file_window())[0, :, 0], [128, 186, 0])


def test_file_policy_without_a_window_is_refused():
    data = dicom_bytes(np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match=re.escape("no VOI window or VOI LUT in the file")) as excinfo:
        rgb(data, DicomPixels.file_window())
    assert one_line(excinfo).startswith("DICOM bytes: ")


def test_ybr_full_and_16_bit_rgb_by_hand():
    ybr = np.array([[[128, 128, 128], [76, 85, 255], [255, 128, 128]]], np.uint8)
    # T.871: R = Y + 1.402 (Cr-128), G = Y - 0.344136 (Cb-128) - 0.714136 (Cr-128), B = Y + 1.772 (Cb-128)
    got = rgb(dicom_bytes(ybr, "YBR_FULL"), DicomPixels.full_range())
    np.testing.assert_array_equal(got[0], [[128, 128, 128], [254, 0, 0], [255, 255, 255]])
    wide = np.array([[[65535, 0, 32768]]], np.uint16)
    np.testing.assert_array_equal(rgb(dicom_bytes(wide, "RGB"), DicomPixels.full_range())[0, 0], [255, 0, 128])


def test_palette_color_by_hand():
    red, green, blue = [0, 65535, 0, 32768], [0, 0, 65535, 32768], [65535, 0, 0, 32768]
    words = {name: np.asarray(values, "<u2").tobytes() for name, values in
             (("Red", red), ("Green", green), ("Blue", blue))}
    data = dicom_bytes(np.array([[0, 1, 2, 3, 9]], np.uint8), "PALETTE COLOR",
                       RedPaletteColorLookupTableDescriptor=[4, 0, 16], GreenPaletteColorLookupTableDescriptor=[4, 0, 16],
                       BluePaletteColorLookupTableDescriptor=[4, 0, 16], RedPaletteColorLookupTableData=words["Red"],
                       GreenPaletteColorLookupTableData=words["Green"], BluePaletteColorLookupTableData=words["Blue"])
    got = rgb(data, DicomPixels.full_range())
    np.testing.assert_array_equal(got[0], [[0, 0, 255], [255, 0, 0], [0, 255, 0], [128, 128, 128], [128, 128, 128]])


def test_multiframe_policy_and_per_frame_rescale():
    frames = np.stack([np.full((2, 3), value, np.uint8) for value in (10, 20, 30)])
    data = dicom_bytes(frames, frames=3)
    with pytest.raises(DataError, match=re.escape("a multi-frame DICOM (3 frames)")) as excinfo:
        rgb(data, DicomPixels.full_range())
    one_line(excinfo)
    assert (rgb(data, DicomPixels.full_range(frame=1)) == 20).all()
    with pytest.raises(DataError, match=re.escape("has 3 frame(s)")):
        rgb(data, DicomPixels.full_range(frame=3))
    # enhanced multi-frame: shared and per-frame functional groups override the top level, per frame
    per_frame = []
    for slope in (1, 2):
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, 0, "US"
        group = Dataset()
        group.PixelValueTransformationSequence = [transform]
        per_frame.append(group)
    window = Dataset()
    window.WindowCenter, window.WindowWidth = 40.5, 80  # [0.5, 80.5] -> (x - 40) / 79 + 0.5 (linear)
    shared = Dataset()
    shared.FrameVOILUTSequence = [window]
    data = dicom_bytes(np.full((2, 2, 2), 20, np.uint8), frames=2, PerFrameFunctionalGroupsSequence=per_frame,
                       SharedFunctionalGroupsSequence=[shared], RescaleSlope=100, RescaleIntercept=0)
    first = rgb(data, DicomPixels.file_window(frame=0))[0, 0, 0]
    second = rgb(data, DicomPixels.file_window(frame=1))[0, 0, 0]
    assert (first, second) == (63, 128)  # 20 -> 0.24684 -> 62.94; 40 -> 0.5 -> 127.5 -> 128 (slope 100 ignored)


# -- the bounded reader's dispatch, the predictor, bytes and datasets ------------------------------


def test_paths_bytes_and_datasets_give_the_same_pixels_through_every_entry(tmp_path):
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("CT_small.dcm"))
    renamed = tmp_path / "slice.tif"  # the content decides, not the name
    renamed.write_bytes(path.read_bytes())
    prep = prep_for(DicomPixels.fixed_window(40, 400), size=16)
    expected = preprocess_image(str(path), prep)
    assert expected.shape == (3, 16, 16)
    for source in (renamed, path.read_bytes(), pydicom.dcmread(path)):
        np.testing.assert_array_equal(preprocess_image(source, prep), expected)
    with open_image(path.read_bytes(), prep) as image:
        assert image.mode == "RGB" and image.size == (128, 128)
    with pytest.raises(DataError) as excinfo:
        read_rgb(path.read_bytes(), Preprocessing.exact(16, MEAN, STD))
    assert "a DICOM file, but this model was not trained with a recorded DICOM pipeline" in one_line(excinfo)
    with pytest.raises(DataError, match="not trained with a recorded DICOM pipeline"):
        preprocess_image(pydicom.dcmread(path), Preprocessing.exact(16, MEAN, STD))


def test_the_predictor_takes_dicom_bytes_paths_and_datasets(tmp_path):
    """Triton's image_bytes input goes through Predictor.preprocess: DICOM bytes work there as they do here."""
    from pydicom.data import get_testdata_file

    from mmexport import runtime
    from tests.runtime.test_hostile_runtime import tiny_onnx

    prep = prep_for(DicomPixels.full_range(), size=8)
    info = ModelInfo("resnet18", ("amber", "blue", "green"), 8, MEAN, STD, preprocessing=prep)
    model = tiny_onnx(tmp_path / "model.onnx", info.to_metadata())
    path = Path(get_testdata_file("RG1_UNCR.dcm"))  # CR MONOCHROME1, 1955 x 1841
    with runtime.load(model) as predictor:
        assert predictor.info.preprocessing == prep
        batch = predictor.preprocess([path.read_bytes(), str(path), pydicom.dcmread(path)])
        np.testing.assert_array_equal(batch[0], preprocess_image(str(path), prep))
        np.testing.assert_array_equal(batch[0], batch[1])
        np.testing.assert_array_equal(batch[0], batch[2])
        prediction = predictor.predict(path.read_bytes())
        assert prediction.labels[0] in info.classes
        with pytest.raises(DataError, match="no image"):
            predictor.predict(Path(get_testdata_file("reportsi.dcm")).read_bytes())


# -- bad input: one line each ----------------------------------------------------------------------


def _bad_inputs():
    from pydicom.data import get_testdata_file

    def real(name):
        return Path(get_testdata_file(name)).read_bytes()

    from pydicom.encaps import encapsulate

    image = np.zeros((4, 4), np.uint8)
    return [
        ("SR", real("reportsi.dcm"), DataError, "a DICOM object with no image (SR, Basic Text SR Storage)"),
        ("RTSTRUCT", dicom_bytes(None, sop_class="1.2.840.10008.5.1.4.1.1.481.3", Modality="RTSTRUCT"), DataError,
         "no image (RTSTRUCT, RT Structure Set Storage)"),
        ("SEG", real("liver_1frame.dcm"), DataError, "a Segmentation object (SEG"),
        ("no Pixel Data", dicom_bytes(None, Rows=4, Columns=4, BitsAllocated=8, PhotometricInterpretation="MONOCHROME2"),
         DataError, "it has no Pixel Data"),
        ("truncated", dicom_bytes(image, pixel_data=bytes(10)), DataError, "Pixel Data is truncated (10 of 16 bytes)"),
        ("real truncated", real("MR_truncated.dcm"), DataError, "Pixel Data is truncated"),
        ("over budget", dicom_bytes(image, pixel_data=bytes(16), Rows=10000, Columns=10000), DataError,
         "refused before decoding"),
        ("frames over budget", dicom_bytes(np.zeros((1, 4, 4), np.uint8), frames=1, pixel_data=bytes(16),
                                           Rows=1000, Columns=1000, NumberOfFrames=100), DataError,
         "100 frames of 1000x1000 px (100.0 Mpx) are over the decoding budget"),
        ("bytes over budget", dicom_bytes(np.zeros((4, 4), np.uint32), pixel_data=bytes(64), Rows=8000,
                                          Columns=8000), DataError, "Pixel Data of 256.0 MB as decoded"),
        ("unsupported syntax", dicom_bytes(image, syntax="1.2.840.10008.1.2.4.92",
                                                      pixel_data=encapsulate([bytes(16)])), DataError,
         "unsupported transfer syntax JPEG 2000 Part 2"),
        ("unsupported photometric", dicom_bytes(np.zeros((4, 4, 3), np.uint8), "YBR_PARTIAL_420"), DataError,
         "unsupported photometric interpretation 'YBR_PARTIAL_420'"),
        ("missing decoder", real("JPEG-LL.dcm"), MissingDependencyError,
         "decoding JPEG Lossless, Non-Hierarchical, First-Order Prediction"),
        ("says DICM", bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + bytes(40), DataError,
         "says DICM but does not parse"),
        ("dual personality", _dual_personality(), DataError, "says DICM but does not parse"),
        ("bad frames", real("badVR.dcm"), DataError, "NumberOfFrames '1A' is not an integer"),
        ("slope 0", dicom_bytes(image, RescaleSlope=0, RescaleIntercept=5), DataError, "Rescale Slope 0"),
        ("not Part 10", b"\x00" * 200, DataError, "not a DICOM Part 10 file"),
    ]


def _dual_personality() -> bytes:
    from tests.runtime.test_hostile_runtime import _dual_personality as dual

    return dual()


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("name, data, error, fragment", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_dicom_input_is_one_line(name, data, error, fragment):
    read = read_dicom if name == "not Part 10" else preprocess_image  # the reader sends only DICM files here
    with pytest.raises(error) as excinfo:
        read(data, prep_for(DicomPixels.full_range()))
    message = one_line(excinfo)
    assert message.startswith("DICOM bytes: "), message
    assert fragment in message, message


def test_missing_decoders_and_pydicom_are_named(monkeypatch):
    from pydicom.data import get_testdata_file
    from pydicom.pixels.decoders.base import Decoder

    data = Path(get_testdata_file("MR_small_jp2klossless.dcm")).read_bytes()
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: self.is_native))
    with pytest.raises(MissingDependencyError) as excinfo:
        preprocess_image(data, prep_for(DicomPixels.full_range()))
    assert "JPEG 2000 Image Compression (Lossless Only)" in one_line(excinfo)
    assert "pylibjpeg and pylibjpeg-openjpeg: pip install 'mmexport[dicom]'" in one_line(excinfo)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=re.escape("DICOM input needs pydicom: pip install 'mmexport[dicom]'")):
        preprocess_image(data, prep_for(DicomPixels.full_range()))


# -- every real test file: matches pydicom's functions, or is refused in one line -----------------

FILES = TABLE.test_files()


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_pydicom_test_file_matches_the_reference_or_is_refused_in_one_line(path):
    for row in TABLE.rows([path]):
        assert row.outcome in ("match", "refused"), f"{row.file} ({row.voi}): {row.outcome}: {row.detail}"


def test_the_real_files_cover_the_cases_the_issue_names():
    names = {p.name for p in FILES}
    for needed in ("RG1_UNCR.dcm", "US1_J2KR.dcm", "US1_J2KI.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "OBXXXX1A.dcm",
                   "emri_small.dcm", "CT_small.dcm", "vlut_04.dcm", "mlut_18.dcm"):
        assert needed in names, f"{needed} is not in pydicom's test files here"


# -- torch-free ------------------------------------------------------------------------------------


def test_the_dicom_pipeline_imports_no_torch():
    from pydicom.data import get_testdata_file

    script = textwrap.dedent(f"""
        import importlib.abc, sys

        class BlockTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "torchvision"):
                    raise ImportError(name + " is blocked")
                return None

        sys.meta_path.insert(0, BlockTorch())
        from mmexport.runtime.dicom import DicomPixels
        from mmexport.runtime.preprocess import Preprocessing, preprocess_image
        prep = Preprocessing.exact(8, (0.5,) * 3, (0.5,) * 3).with_dicom(DicomPixels.full_range())
        print(preprocess_image({str(get_testdata_file("CT_small.dcm"))!r}, prep).shape)
        assert not any(name.split(".")[0] in ("torch", "torchvision") for name in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(3, 8, 8)"
