"""DICOM accuracy: the recorded DICOM pipeline reproduces the run's test accuracy; a naive conversion does not.

Writes a synthetic DICOM dataset (:func:`write_dicom_dataset`), trains a tiny merged ResNet-18
on it (``voi: none``, recorded in the run's preprocessing block), exports ONNX, then classifies
the test split's ``.dcm`` files

* through ``mmexport.runtime.load(model.onnx).predict(paths)`` and through
  ``mmexport predict RUN files... --json``: the accuracy must equal the manifest's test accuracy
  exactly (same files, same pixels);
* after the naive conversion many scripts do (:func:`naive_rgb`: the stored values scaled by
  their maximum to 8 bits; no rescale, no MONOCHROME1 inversion, YBR read as RGB), saved as
  PNG and classified by the same model: it scores lower.

    PYTHONPATH=. python benchmarks/dicom_accuracy.py          # ~1-3 min on 2 CPU cores

Writes benchmarks/results/dicom-accuracy.json. The writer is reused by
tests/torchside/test_dicom_data.py (the same proof, smaller).

The dataset: two classes, ``hyperdense`` (a lesion brighter than its background) and
``hypodense`` (darker), so what separates them is brightness -- exactly what a forgotten
MONOCHROME1 inversion flips. Each image is stored in one of six encodings, in turn:
CT 12-bit MONOCHROME2 (rescale -1024), CR 16-bit MONOCHROME1 (slope 2, intercept -100),
8-bit MONOCHROME2, 8-bit MONOCHROME1 (slope 0.5, intercept 10), 8-bit YBR_FULL colour, and
CT 12-bit signed MONOCHROME2. Each encoding stores the same display values ``u`` in [0, 1]
so that under ``voi: none`` every file decodes to ``round(255 u)``: the recorded pipeline
makes them one population.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = ("hyperdense", "hypodense")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
ENCODINGS = ("ct12", "cr16-mono1", "sc8", "sc8-mono1", "sc8-ybr", "ct12-signed")
RESULT = Path(__file__).resolve().parent / "results" / "dicom-accuracy.json"


def display_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Display values in [0, 1] (H, W): a blurred elliptical lesion brighter (label 0) or darker (1) than its background."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    cy, cx = rng.uniform(-0.25, 0.25, 2)
    ry, rx = rng.uniform(0.35, 0.6, 2)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    mask = 1.0 / (1.0 + np.exp((inside - 1.0) * 8.0))
    background = rng.uniform(0.4, 0.6)
    # some faint lesions, so that the test accuracy is not trivially 1 and its exact equality means something
    contrast = rng.uniform(0.005, 0.12) * (1 if label == 0 else -1)
    image = background + contrast * mask + rng.normal(0, 0.06, (size, size))
    return np.clip(image, 0.0, 1.0)


def _dataset(encoding: str, u: np.ndarray, index: int, study: str):
    """A Part 10 ``FileDataset`` storing ``u`` (display values) in ``encoding``."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = {"ct12": CT_IMAGE, "ct12-signed": CT_IMAGE, "cr16-mono1": CR_IMAGE}.get(encoding, SECONDARY_CAPTURE)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = f"Synthetic^{index:04d}"
    ds.PatientID = f"SYN{index:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.Modality = {"ct12": "CT", "ct12-signed": "CT", "cr16-mono1": "CR"}.get(encoding, "OT")
    ds.ConversionType = "SYN" if sop_class == SECONDARY_CAPTURE else None
    if ds.ConversionType is None:
        del ds.ConversionType
    ds.Rows, ds.Columns = u.shape
    ds.PixelRepresentation = 0
    if encoding == "sc8-ybr":
        rgb = np.repeat(np.rint(u * 255)[..., None], 3, axis=2)
        ybr = pydicom.pixels.convert_color_space(rgb.astype(np.uint8), "RGB", "YBR_FULL")
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = np.ascontiguousarray(ybr, dtype=np.uint8).tobytes()
        return ds
    ds.SamplesPerPixel = 1
    mono1 = encoding.endswith("mono1")
    shown = 1.0 - u if mono1 else u
    if encoding.startswith("sc8"):
        bits, stored = 8, np.rint(shown * 255).astype(np.uint8)
        slope, intercept = (0.5, 10.0) if mono1 else (1.0, 0.0)
    elif encoding == "cr16-mono1":
        bits, stored = 16, np.rint(shown * 65535).astype(np.uint16)
        slope, intercept = 2.0, -100.0
    elif encoding == "ct12":
        bits, stored = 12, np.rint(shown * 4095).astype(np.uint16)
        slope, intercept = 1.0, -1024.0
    else:  # ct12-signed: stored -2048..2047
        bits, stored = 12, (np.rint(shown * 4095) - 2048).astype(np.int16)
        slope, intercept = 1.0, 0.0
        ds.PixelRepresentation = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if encoding != "sc8":  # a window the file carries (ignored under voi: none): the middle half of its range
        low, high = (float(v) * slope + intercept for v in (np.min(stored), np.max(stored)))
        ds.WindowCenter, ds.WindowWidth = round((low + high) / 2, 1), round(max(1.0, (high - low) / 2), 1)
    ds.PixelData = stored.tobytes()
    return ds


def write_dicom_dataset(root: Path, per_class: int = 48, size: int = 48, seed: int = 0) -> Path:
    """``root/<class>/<n>.dcm`` (a class-folder tree), ``per_class`` images of each class, encodings in turn."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    study = generate_uid()
    index = 0
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            encoding = ENCODINGS[(n + label) % len(ENCODINGS)]
            ds = _dataset(encoding, display_image(rng, label, size), index, study)
            ds.save_as(folder / f"{n:03d}-{encoding}.dcm", enforce_file_format=True)
            index += 1
    return root


def naive_rgb(path: str | Path) -> np.ndarray:
    """The naive conversion: stored values / their maximum -> 8 bits; no rescale, no inversion, YBR taken as RGB."""
    import pydicom
    from pydicom.pixels import pixel_array

    raw = pixel_array(pydicom.dcmread(path), raw=True).astype(np.float64)
    top = raw.max()
    scaled = np.clip(raw / top * 255 if top > 0 else raw, 0, 255).round().astype(np.uint8)
    return scaled if scaled.ndim == 3 else np.repeat(scaled[..., None], 3, axis=2)


def write_naive_pngs(files: list[str], out: Path) -> list[str]:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file in files:
        target = out / (Path(file).parent.name + "-" + Path(file).stem + ".png")
        Image.fromarray(naive_rgb(file)).save(target)
        written.append(str(target))
    return written


def accuracy(labels: list[str], truth: list[str]) -> float:
    return float(np.mean([a == b for a, b in zip(labels, truth)]))


def train_run(data: Path, out: Path, sources: tuple[str, str], *, image_size: int = 32, epochs: tuple[int, int] = (2, 3),
              seed: int = 0) -> Path:
    from mmexport.config import TrainConfig
    from mmexport.torchside.operations import export_onnx_run
    from mmexport.torchside.train import train

    run = train(TrainConfig(arch="resnet18", source_a=sources[0], source_b=sources[1],
                            data=f"{data}?val=0.25&test=0.25", out=str(out), merge_epochs=epochs[0],
                            finetune_epochs=epochs[1], batch_size=16, device="cpu", verify_samples=8,
                            image_size=image_size, augmentation="none", seed=seed))
    export_onnx_run(run, "fp32")
    return Path(run)


def split_files(data: Path, image_size: int) -> tuple[list[str], list[str]]:
    """The test split's files and their classes, as the run's dataset loader splits them."""
    from mmexport.torchside.data import load_task

    task = load_task(f"{data}?val=0.25&test=0.25", image_size=image_size)
    samples = task.dataset("test").samples
    return [path for path, _ in samples], [task.classes[label] for _, label in samples]


def measure(run: Path, data: Path, image_size: int, work: Path, *, cli: bool = True) -> dict:
    """Accuracy of the run's model.onnx on the test split: the manifest's, runtime, CLI and naive."""
    from mmexport import runtime
    manifest = json.loads((run / "manifest.json").read_text())
    recorded = manifest["training"]["final"]["test"]["accuracy"]
    files, truth = split_files(data, image_size)
    model = runtime.load(run / "model.onnx")
    runtime_labels = model.predict(files).labels
    result = {"test_images": len(files), "manifest_test_accuracy": recorded,
              "runtime_accuracy": accuracy(runtime_labels, truth)}
    work.mkdir(parents=True, exist_ok=True)
    if cli:
        out = work / "predictions.json"
        done = subprocess.run([sys.executable, "-m", "mmexport", "predict", str(run), *files, "--json", str(out)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"mmexport predict failed: {done.stderr.strip()[-400:]}")
        rows = json.loads(out.read_text())["results"]
        result["cli_accuracy"] = accuracy([row["label"] for row in rows], truth)
    naive = write_naive_pngs(files, work / "naive")
    naive_labels = model.predict(naive).labels
    result["naive_accuracy"] = accuracy(naive_labels, truth)
    by_encoding: dict[str, list[tuple[bool, bool]]] = {}
    for file, label, want, naive_label in zip(files, runtime_labels, truth, naive_labels):
        encoding = Path(file).stem.split("-", 1)[1]
        by_encoding.setdefault(encoding, []).append((label == want, naive_label == want))
    result["by_encoding"] = {e: {"images": len(v), "recorded": float(np.mean([a for a, _ in v])),
                                 "naive": float(np.mean([b for _, b in v]))} for e, v in sorted(by_encoding.items())}
    result["preprocessing"] = manifest["model"]["preprocessing"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmexport-dicom-accuracy"))
    parser.add_argument("--per-class", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    import shutil

    from mmexport.torchside.checkpoints import save_state_dict

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.conftest import backbone_state

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    sources = []
    for name, seed in (("a", 1), ("b", 2)):
        path = args.work / f"{name}.safetensors"
        save_state_dict(path, backbone_state("resnet18", seed))
        sources.append(str(path))
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        data = write_dicom_dataset(args.work / f"data-{seed}", per_class=args.per_class, seed=seed)
        run = train_run(data, args.work / f"run-{seed}", tuple(sources), image_size=args.image_size, seed=seed)
        row = {"seed": seed, **measure(run, data, args.image_size, args.work / f"measure-{seed}"),
               "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(f"seed {seed}: manifest test accuracy {row['manifest_test_accuracy']:.4f}, runtime {row['runtime_accuracy']:.4f}, "
              f"mmexport predict {row['cli_accuracy']:.4f}, naive conversion {row['naive_accuracy']:.4f} "
              f"({row['test_images']} test images, {row['seconds']} s)")
        for encoding, cell in row["by_encoding"].items():
            print(f"    {encoding:12s} {cell['images']:3d} images: recorded {cell['recorded']:.3f}  naive {cell['naive']:.3f}")
    result = {"benchmark": "benchmarks/dicom_accuracy.py", "dataset": {"classes": list(CLASSES), "per_class": args.per_class,
              "encodings": list(ENCODINGS), "stored_size": 48, "split": "val=0.25&test=0.25"},
              "training": {"arch": "resnet18", "sources": "random-init (tests/conftest.py backbone_state)",
                           "epochs": [2, 3], "image_size": args.image_size, "dicom_voi": "none (default)"},
              "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
