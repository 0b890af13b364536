"""Every pydicom test DICOM through the runtime's DICOM pipeline, against an independent reference.

The reference is built from pydicom's own functions only -- ``pixel_array`` (raw),
``apply_modality_lut`` -> ``apply_voi_lut`` -> inversion for MONOCHROME1 ->
``convert_color_space`` (``apply_color_lut`` for PALETTE COLOR) -- and scaled to 8 bits by
the rule the pipeline states (``rint(255 * v)``). A file the pipeline accepts must match
it within :data:`TOLERANCE` grey levels; a file it refuses must be refused in one line
(``DataError`` / ``MissingDependencyError``). ``tests/runtime/test_dicom.py`` runs this
on every file; this script prints the summary table of ``docs/dicom.md``:

    PYTHONPATH=. python tools/dicom_table.py            # the markdown table
    PYTHONPATH=. python tools/dicom_table.py --files    # one row per file
"""

from __future__ import annotations

import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOLERANCE = 1  # grey levels of 255: the reference converts YBR in uint8, the pipeline in float64
FRAME = 0  # multi-frame files are taken at their first frame (the `frame` policy), so they are compared too


def test_files() -> list[Path]:
    """pydicom's bundled test files and the pydicom-data store (what is on this machine: nothing is downloaded)."""
    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():  # a missing download is reported by pydicom as a warning; offline is fine
        warnings.simplefilter("ignore")
        found = get_testdata_files("*")
    return sorted({Path(p) for p in found if Path(p).is_file()}, key=lambda p: p.name)


def _frame_view(ds, index):
    """The reference's own reading of PS3.3 C.7.6.16: per-frame, then shared, functional groups override."""
    from pydicom import Dataset

    view = Dataset()
    view.file_meta = ds.file_meta
    for keyword in ("BitsStored", "PixelRepresentation", "PhotometricInterpretation", "ModalityLUTSequence",
                    "RescaleSlope", "RescaleIntercept", "VOILUTSequence", "WindowCenter", "WindowWidth",
                    "VOILUTFunction"):
        if keyword in ds:
            view[keyword] = ds[keyword]
    for name, position in (("SharedFunctionalGroupsSequence", 0), ("PerFrameFunctionalGroupsSequence", index)):
        groups = ds.get(name)
        if not groups or len(groups) <= position:
            continue
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if groups[position].get(macro):
                for element in groups[position][macro][0]:
                    if element.keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
                                           "VOILUTFunction"):
                        view[element.keyword] = element
    return view


def _pydicom_window_range(view):
    """The output range pydicom's apply_windowing maps a window to (its own rule, reproduced to undo it)."""
    if view.get("ModalityLUTSequence"):
        return 0.0, float(2 ** view.ModalityLUTSequence[0].LUTDescriptor[2] - 1)
    bits = int(view.BitsStored)
    low, high = (0, 2**bits - 1) if view.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if "RescaleSlope" in view and "RescaleIntercept" in view:
        low, high = (v * float(view.RescaleSlope) + float(view.RescaleIntercept) for v in (low, high))
    return float(low), float(high)


def reference(path: Path, voi: str, frame: int = FRAME) -> np.ndarray | None:
    """8-bit RGB by pydicom's functions; None when ``voi`` is ``file`` and the file has no window or VOI LUT."""
    import pydicom
    from pydicom.pixels import (
        apply_color_lut,
        apply_modality_lut,
        apply_voi_lut,
        convert_color_space,
        pixel_array,
    )

    ds = pydicom.dcmread(path)
    arr = pixel_array(ds, index=frame, raw=True)  # raw: the colour conversion is the reference's own step below
    pi = ds.PhotometricInterpretation
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        view = _frame_view(ds, frame)
        values = apply_modality_lut(arr, view).astype(np.float64)  # int16 - (-32768) would wrap
        if voi == "none":
            bits = int(ds.BitsStored)
            signed = int(ds.PixelRepresentation) == 1
            low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            if view.get("ModalityLUTSequence"):
                low, high = 0, 2 ** view.ModalityLUTSequence[0].LUTDescriptor[2] - 1
            elif "RescaleSlope" in view and "RescaleIntercept" in view:
                low, high = sorted(v * float(view.RescaleSlope) + float(view.RescaleIntercept) for v in (low, high))
            unit = (values - low) / (high - low)
        else:
            has_lut = bool(view.get("VOILUTSequence"))
            if not has_lut and ("WindowCenter" not in view or "WindowWidth" not in view):
                return None
            out = apply_voi_lut(values, view)  # prefers the VOI LUT, as the pipeline does
            if has_lut:
                unit = out / float(2 ** view.VOILUTSequence[0].LUTDescriptor[2] - 1)
            else:
                low, high = _pydicom_window_range(_frame_view(ds, frame))
                unit = (out - low) / (high - low)
        if pi == "MONOCHROME1":
            unit = 1.0 - unit
        grey = np.rint(np.clip(unit, 0, 1) * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)[..., :3]
        return np.rint(rgb / (255.0 if rgb.dtype == np.uint8 else 65535.0) * 255).astype(np.uint8)
    if pi in ("YBR_FULL", "YBR_FULL_422"):  # raw: 422 subsampling undone, colour space as stored
        arr = convert_color_space(arr, pi, "RGB")
    # RGB, and YBR_RCT/YBR_ICT: the JPEG 2000 decoder returns RGB (it undoes the component transform)
    return np.rint(arr / float(2 ** int(ds.BitsStored) - 1) * 255).astype(np.uint8)


@dataclass
class Row:
    file: str
    modality: str
    photometric: str
    syntax: str
    voi: str
    outcome: str  # "match", "refused", "MISMATCH", "ERROR"
    detail: str


def _describe(path: Path) -> tuple[str, str, str]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        return (str(ds.get("Modality", "") or "-"), str(ds.get("PhotometricInterpretation", "") or "-"),
                getattr(syntax, "name", "") or str(syntax or "-"))
    except Exception:  # noqa: BLE001 - a file pydicom cannot read is described as such
        return "-", "-", "-"


def check_file(path: Path, voi: str) -> Row:
    """Run ``path`` through the runtime (VOI ``voi``, frame 0) and compare with :func:`reference`."""
    from mmexport.errors import DataError, MissingDependencyError
    from mmexport.runtime.dicom import DicomPixels
    from mmexport.runtime.preprocess import Preprocessing, read_dicom

    policy = DicomPixels.full_range(frame=FRAME) if voi == "none" else DicomPixels.file_window(frame=FRAME)
    prep = Preprocessing.exact(64, (0.5,) * 3, (0.5,) * 3).with_dicom(policy)
    modality, photometric, syntax = _describe(path)
    row = Row(path.name, modality, photometric, syntax, voi, "", "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about many real files' quirks; the outcome is what counts
        try:
            got = np.asarray(read_dicom(path, prep, where=path.name))
        except (DataError, MissingDependencyError) as exc:
            message = str(exc)
            one_line = "\n" not in message and message.startswith(f"{path.name}: ")
            row.outcome = "refused" if one_line else "ERROR"
            row.detail = f"{type(exc).__name__}: {message.removeprefix(f'{path.name}: ')}"
            return row
        except Exception as exc:  # noqa: BLE001 - the test fails on these; the table shows them
            row.outcome, row.detail = "ERROR", f"{type(exc).__name__}: {exc}"
            return row
        expected = reference(path, voi)
    if expected is None:
        row.outcome, row.detail = "MISMATCH", "accepted, but the reference finds no window"
        return row
    if expected.shape != got.shape:
        row.outcome, row.detail = "MISMATCH", f"shape {got.shape} vs reference {expected.shape}"
        return row
    difference = int(np.abs(got.astype(np.int16) - expected.astype(np.int16)).max())
    row.outcome = "match" if difference <= TOLERANCE else "MISMATCH"
    row.detail = f"max |difference| {difference}"
    return row


def rows(files: list[Path] | None = None) -> list[Row]:
    """Policy ``none`` for every file; policy ``file`` for the files with a window or VOI LUT of their own."""
    import pydicom

    found = []
    for path in files if files is not None else test_files():
        found.append(check_file(path, "none"))
        if found[-1].outcome == "match":
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if "WindowCenter" in ds or "VOILUTSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
                found.append(check_file(path, "file"))
    return found


def _reason(detail: str) -> str:
    """A refusal's line without its file-specific numbers, to group by."""
    text = detail.split(" (", 1)[0]
    for marker in ("is truncated", "no image", "not a DICOM Part 10", "says DICM", "needs ", "Segmentation",
                   "unsupported", "no VOI window"):
        if marker in text:
            return text if len(text) < 140 else text[:137] + "..."
    return text[:140]


def markdown(found: list[Row]) -> str:
    groups: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    reasons: dict[str, list[str]] = defaultdict(list)
    for row in found:
        key = (row.modality, row.photometric)
        if row.outcome == "refused":
            groups[key]["refused"] += 1
            reasons[_reason(row.detail)].append(row.file)
        else:
            groups[key][f"{row.outcome} ({row.voi})"] += 1
    lines = ["| modality | photometric interpretation | accepted and matching | refused |", "| --- | --- | --- | --- |"]
    for (modality, photometric), counts in sorted(groups.items()):
        matched = ", ".join(f"{counts[k]} {k.split(' ')[1]}" for k in ("match (none)", "match (file)") if counts.get(k))
        other = ", ".join(f"{v} {k}" for k, v in counts.items() if not k.startswith(("match", "refused")))
        lines.append(f"| {modality} | {photometric} | {matched or '–'}{' · ' + other if other else ''} | "
                     f"{counts.get('refused', 0) or '–'} |")
    lines += ["", "| refused with | files |", "| --- | --- |"]
    for reason, names in sorted(reasons.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(f"`{n}`" for n in sorted(set(names))[:6]) + (" …" if len(set(names)) > 6 else "")
        lines.append(f"| {reason.replace('|', '/')} | {len(names)}: {shown} |")
    total = len({r.file for r in found})
    accepted = len({r.file for r in found if r.outcome == "match"})
    bad = [r for r in found if r.outcome not in ("match", "refused")]
    lines += ["", (f"{total} files: {accepted} accepted and matching the reference within ±{TOLERANCE}, "
                   f"{total - accepted - len({r.file for r in bad})} refused in one line, {len(bad)} other.")]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    found = rows()
    if "--files" in argv:
        for row in found:
            print(f"{row.file:45} {row.modality:6} {row.photometric:13} {row.voi:4} {row.outcome:8} {row.detail}")
    else:
        print(markdown(found))
    return 1 if any(r.outcome not in ("match", "refused") for r in found) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
