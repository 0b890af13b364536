"""A run's network as a MONAI Bundle (``mmexport fold RUN --to monai-bundle --out DIR --license FILE``).

The bundle follows the MONAI Bundle specification: ``LICENSE``, ``configs/metadata.json``
(every key the spec requires, ``network_data_format`` with input ``image`` and output
``pred``), ``configs/inference.json`` (the run's recorded preprocessing, the network as
``torchvision.models.<arch>(num_classes=K)``, an inference workflow ``monai.bundle.run``
executes), ``models/model.pt`` (state dict), ``models/model.ts`` (TorchScript, with the two
configs embedded as MONAI Deploy's ``MonaiBundleInferenceOperator`` reads them),
``models/model.onnx`` (the run's verified fp32 ONNX, copied and hash-checked) and
``docs/README.md`` (the run's model card).

The preprocessing is MONAI transforms where MONAI computes exactly what the run recorded
(channel-first, ``x / scale``, channel-wise ``(x − mean) / std``) and mmexport's own
:mod:`mmexport.runtime.preprocess` where it has no exact equivalent: decoding (DICOM
included), the ``rgb-v1`` colour rule, Pillow's antialiased bilinear resize and the centre
crop (:func:`recorded_pixels`, called from the config).

Nothing is published unchecked: the bundle is built in a hidden folder beside ``--out``;
``model.pt`` (loaded into the config's own ``network_def``, ``strict=True``), ``model.ts`` and
``model.onnx`` are each run on the run's stored reference and judged under the fp32 row;
MONAI's ``verify_net_in_out`` runs on the written configs; only then is the folder renamed
(or zipped) into place and recorded in the run's manifest -- as outputs when ``--out`` is
inside the run, under ``monai_bundles`` (path and the sha256 of every file) when outside.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmexport import __version__, artifacts
from mmexport.errors import (
    DataError,
    MissingDependencyError,
    MMExportError,
    RunDirError,
    VerificationError,
    one_line,
)
from mmexport.fileio import atomic_path, make_temporary_directory, sha256_file
from mmexport.progress import ProgressSink, sink
from mmexport.runs.lock import writes_run
from mmexport.runs.manifest import RunDir
from mmexport.runs.verify import check_onnx_file, describes_run
from mmexport.runtime.check import check_runner
from mmexport.runtime.compare import VerificationReport
from mmexport.runtime.modelinfo import ModelInfo
from mmexport.runtime.preprocess import (
    Preprocessing,
    check_pixel_budget,
    pil_pipeline,
    read_rgb,
)
from mmexport.runtime.report import NOT_FOR_CLINICAL_USE
from mmexport.runtime.tolerances import for_precision
from mmexport.torchside.backbones import get_backbone
from mmexport.torchside.modelfile import load_model
from mmexport.torchside.torch_runner import TorchRunner

MONAI_INSTALL = "pip install 'mmexport[monai]'"
BUNDLE_TARGET = "monai-bundle"
BUNDLE_KIND = "monai-bundle"  # the manifest kind of a bundle's files inside a run
MANIFEST_KEY = "monai_bundles"  # the manifest list of bundles written outside the run
BUNDLE_VERSION = "1.0.0"
# The schema MONAI's model zoo validates metadata.json against (its ``schema`` key); a copy of the
# published file is in tests/data/monai/ (see its README).
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
MEDMERGE_REFERENCE = ("I. Almakky, S. Gupta, A. Saeed, N. Saeed, M. Yaqub. MedMerge: Merging Models for Effective "
                      "Transfer Learning to Medical Imaging Tasks. arXiv:2403.11646, 2024. https://arxiv.org/abs/2403.11646")
NOT_RECORDED = "not recorded by the run"
# A string value starting with one of these is an expression, a reference or a macro to MONAI's ConfigParser
_CONFIG_SIGILS = ("$", "@", "%")

LICENSE_NAME = "LICENSE"
METADATA = "configs/metadata.json"
INFERENCE = "configs/inference.json"
MODEL_PT = "models/model.pt"
MODEL_TS = "models/model.ts"
MODEL_ONNX = "models/model.onnx"
README = "docs/README.md"
MODEL_FILES = (MODEL_PT, MODEL_TS, MODEL_ONNX)


def require_monai() -> Any:
    """The ``monai`` package, or one line naming the install command."""
    try:
        import monai
        import monai.bundle
    except ImportError:
        raise MissingDependencyError(f"--to {BUNDLE_TARGET} needs MONAI: {MONAI_INSTALL}") from None
    return monai


# -- what the bundle's config calls ----------------------------------------------------------------


def recorded_pixels(source: Any, block: Preprocessing | str) -> np.ndarray:
    """Steps 1-3 of the recorded preprocessing (decode, ``rgb-v1`` colour, Pillow's antialiased resize, centre crop)
    as uint8 H x W x 3: what MONAI has no exact equivalent of. ``source``: a path, encoded bytes (PNG, JPEG, ...,
    DICOM where the block has a DICOM pipeline) or uint8 pixels (H x W or H x W x 3/4, e.g. an in-memory image).
    The bundle's ``inference.json`` calls this first; MONAI transforms do the rest."""
    prep = block if isinstance(block, Preprocessing) else Preprocessing.from_json(block)
    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        image = read_rgb(source, prep)
    else:
        from PIL import Image

        pixels = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
        if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] in (1, 3, 4))):
            raise DataError(f"an in-memory image must be uint8 H x W or H x W x 3/4 pixels, got {pixels.dtype} "
                            f"{pixels.shape}")
        pixels = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
        check_pixel_budget(pixels.shape[1], pixels.shape[0], prep, "image array")
        image = Image.fromarray(np.ascontiguousarray(pixels))
    return np.asarray(pil_pipeline(image, prep), dtype=np.uint8)


def write_predictions(path: str, files: list[str], loader: Any, network: Any, inferer: Any, postprocessing: Any,
                      device: Any, classes: list[str]) -> list[int]:
    """The bundle's ``run`` step: each image through preprocessing (``loader``), the network, the postprocessing
    (softmax); writes ``path`` (CSV: file, class index, class name, one probability per class). Returns the indices."""
    import csv

    indices: list[int] = []
    rows = []
    with torch.no_grad():
        for file, batch in zip(files, loader):
            logits = inferer(batch["image"].to(device), network)
            probabilities = postprocessing({"pred": logits[0]})["pred"]
            index = int(torch.argmax(probabilities))
            indices.append(index)
            rows.append([file, index, classes[index], *(f"{float(p):.9g}" for p in probabilities)])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "class_index", "class", *classes])
        writer.writerows(rows)
    return indices


# -- the two configs -------------------------------------------------------------------------------


def _check_config_safe(info: ModelInfo) -> None:
    for index, name in enumerate(info.classes):
        if name.startswith(_CONFIG_SIGILS):
            raise MMExportError(f"class {index} ({name[:40]!r}) starts with {name[0]!r}, which MONAI's config parser "
                                "reads as an expression or reference; rename the class to export a MONAI Bundle")


def _value_range(prep: Preprocessing) -> list[float]:
    """The range of the network input: 8-bit pixels (0-255) after ``/ scale`` and ``(x − mean) / std``."""
    low = min((0.0 - m) / s for m, s in zip(prep.mean, prep.std))
    high = max((255.0 / prep.scale - m) / s for m, s in zip(prep.mean, prep.std))
    return [round(low, 6), round(high, 6)]


def inference_config(info: ModelInfo) -> dict[str, Any]:
    """``configs/inference.json``: the recorded preprocessing, the network, and a workflow for ``monai.bundle.run``."""
    prep = info.preprocessing
    key = "@image_key"
    return {
        "imports": ["$import torch", "$import torchvision",
                    "$import mmexport.torchside.monai_bundle as mmexport_bundle"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "image_key": "image",
        "classes": list(info.classes),
        # the run's preprocessing block, as recorded (mmexport.runtime.preprocess.Preprocessing)
        "recorded_preprocessing": prep.to_json(),
        "input_files": [],
        "output_file": "$@bundle_root + '/eval/predictions.csv'",
        "network_def": f"$torchvision.models.{info.arch}(num_classes={info.num_classes})",
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            # decode, rgb-v1, Pillow's antialiased bilinear resize, centre crop: mmexport's own (no MONAI equivalent)
            {"_target_": "Lambdad", "keys": key,
             "func": "$lambda source: mmexport_bundle.recorded_pixels(source, @recorded_preprocessing)"},
            {"_target_": "EnsureChannelFirstd", "keys": key, "channel_dim": -1},
            {"_target_": "CastToTyped", "keys": key, "dtype": "$torch.float32"},
            {"_target_": "ScaleIntensityRanged", "keys": key, "a_min": 0.0, "a_max": prep.scale, "b_min": 0.0,
             "b_max": 1.0},
            {"_target_": "NormalizeIntensityd", "keys": key, "subtrahend": list(prep.mean), "divisor": list(prep.std),
             "channel_wise": True},
            {"_target_": "EnsureTyped", "keys": key, "dtype": "$torch.float32"},
        ]},
        "datalist": "$[{'image': f} for f in @input_files]",
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
        "checkpoint": "$torch.load(@bundle_root + '/models/model.pt', map_location='cpu', weights_only=True)",
        "initialize": ["$@network.load_state_dict(@checkpoint, strict=True)", "$@network.eval()"],
        "run": [("$mmexport_bundle.write_predictions(@output_file, @input_files, @dataloader, @network, @inferer, "
                 "@postprocessing, @device, @classes)")],
        "finalize": [],
    }


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for name in ("torchvision", "pillow", "pydicom"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def bundle_metadata(run: RunDir, info: ModelInfo, *, authors: str | None, copyright: str | None,
                    modality: str | None) -> dict[str, Any]:
    """``configs/metadata.json`` without its ``mmexport`` section (the file hashes and checks, added once verified)."""
    import monai

    manifest = run.manifest
    prep = info.preprocessing
    classes = list(info.classes)
    test = (manifest.get("training", {}).get("final", {}) or {}).get("test") or {}
    versions = _versions()
    required = {"torchvision": versions.get("torchvision", NOT_RECORDED), "mmexport": __version__,
                "pillow": versions.get("pillow", NOT_RECORDED)}
    if prep.dicom is not None:
        required["pydicom"] = versions.get("pydicom", NOT_RECORDED)
    data_input = manifest.get("inputs", {}).get("data") or {}
    data_spec = manifest.get("config", {}).get("data")
    method = manifest.get("training", {}).get("method") or manifest.get("config", {}).get("method") or "medmerge"
    size = [info.image_size, info.image_size]
    metrics = {f"test_{k}": test[k] for k in ("accuracy", "macro_f1") if isinstance(test.get(k), (int, float))}
    return {
        "schema": SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by mmexport {__version__} from run {manifest.get('run_id')}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__,
        "numpy_version": np.__version__,
        "required_packages_version": required,
        "name": f"{run.path.name} ({info.arch}, {method})",
        "task": f"{info.num_classes}-class image classification: {', '.join(classes)}"[:1000],
        "description": (f"A stock torchvision {info.arch} ({info.num_classes} classes) made by mmexport: two source "
                        f"backbones merged with {method} (learned per-kernel merge coefficients), folded into one "
                        "network and fine-tuned on the target task. The network outputs logits; the postprocessing "
                        "applies softmax (output 'pred'). Preprocessing: " + prep.describe() + "."),
        "authors": authors or f"{NOT_RECORDED} (mmexport run {manifest.get('run_id')})",
        "copyright": copyright or f"{NOT_RECORDED}: see LICENSE",
        "data_source": f"{data_spec or NOT_RECORDED} (sha256 {data_input.get('sha256') or NOT_RECORDED})",
        "data_type": "image files (" + ("DICOM, " if prep.dicom is not None else "") + "PNG, JPEG, BMP, TIFF, WEBP)",
        "image_classes": "three channel RGB, 8-bit pixels normalised: " + prep.describe(),
        "pred_classes": ", ".join(f"{i}: {c}" for i, c in enumerate(classes))[:2000],
        "eval_metrics": metrics,
        "intended_use": f"{NOT_FOR_CLINICAL_USE} Classifies images of the run's target task into its classes.",
        "references": [MEDMERGE_REFERENCE],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": modality or NOT_RECORDED, "num_channels": 3,
                "spatial_shape": size, "dtype": "float32", "value_range": _value_range(prep), "is_patch_data": False,
                "channel_def": {"0": "R", "1": "G", "2": "B"}}},
            "outputs": {"pred": {
                "type": "probabilities", "format": "classes", "num_channels": info.num_classes,
                "spatial_shape": [1, info.num_classes], "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": False, "channel_def": {str(i): c for i, c in enumerate(classes)}}},
        },
    }


# -- the checks ------------------------------------------------------------------------------------


def _network_from_config(inference: Path, state: dict[str, torch.Tensor], arch: str) -> torch.nn.Module:
    """The config's own ``network_def`` with ``state`` loaded ``strict=True``: the state dict fits exactly that."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(inference))
    network = parser.get_parsed_content("network_def")
    if type(network) is not type(get_backbone(arch).build(2)):
        raise VerificationError(f"{INFERENCE}: network_def builds {type(network).__name__}, not torchvision's {arch}")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise VerificationError(f"{MODEL_PT}: does not load into network_def: {one_line(exc)[:300]}") from None
    return network.eval()


def _torch_check(module: torch.nn.Module, reference, label: str, size: int) -> VerificationReport:
    with TorchRunner(module, name=f"torch fp32 ({label})", image_size=size) as runner:
        return check_runner(runner, reference, for_precision("fp32"))


def _net_in_out(staging: Path) -> str:
    """MONAI's own ``verify_net_in_out`` on the written configs (fake input of the metadata's shape)."""
    import logging

    from monai.bundle import verify_net_in_out

    logger = logging.getLogger("monai.bundle.scripts")  # its input summary goes to the terminal at INFO
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        verify_net_in_out(net_id="network_def", meta_file=str(staging / METADATA), config_file=str(staging / INFERENCE),
                          device="cpu")
    except Exception as exc:  # noqa: BLE001 - MONAI raises ValueError/KeyError/RuntimeError; one line either way
        raise VerificationError(f"MONAI verify_net_in_out failed: {one_line(exc)[:300]}") from None
    finally:
        logger.setLevel(level)
    return "passed"


# -- the export ------------------------------------------------------------------------------------


@dataclass
class BundleResult:
    """A published bundle: where, what it holds, what was checked, and how the run records it."""
    path: Path
    run: Path
    zipped: bool
    inside_run: bool
    files: dict[str, str]  # bundle-relative name -> sha256 (for a zip: of the files inside it)
    reports: dict[str, VerificationReport] = field(default_factory=dict)  # bundle model file -> its check
    net_in_out: str = ""
    sha256: str | None = None  # the zip's own
    recorded_as: list[str] = field(default_factory=list)  # manifest outputs (inside) or the monai_bundles path


def _check_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise RunDirError(f"{out}: exists; a bundle is never written over anything: choose another --out "
                          "or remove it first")
    parent = out.parent
    if not parent.is_dir():
        raise RunDirError(f"{out}: its parent {parent} is not an existing directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"{out}: its parent {parent} is not writable")


def _read_license(license_file: str | os.PathLike[str] | None) -> bytes:
    if license_file is None or not str(license_file).strip():
        raise MMExportError(f"--to {BUNDLE_TARGET} needs --license FILE: the MONAI Bundle specification requires a "
                            "LICENSE in every bundle")
    path = Path(license_file).expanduser()
    if not path.is_file():
        raise MMExportError(f"{path}: --license must be a readable file (the bundle's LICENSE)")
    text = path.read_bytes()
    if not text.strip():
        raise MMExportError(f"{path}: the license file is empty")
    return text


def _inside(out: Path, run: Path) -> str | None:
    """``out`` relative to the run (POSIX), or None when it is outside."""
    try:
        return out.relative_to(run.resolve()).as_posix()
    except ValueError:
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _zip(staging: Path, target: Path, root: str) -> None:
    """``staging`` as a zip whose entries sit under ``root/`` (what MONAI's loaders and Deploy expect), fixed times."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            entry = zipfile.ZipInfo(f"{root}/{path.relative_to(staging).as_posix()}", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            archive.writestr(entry, path.read_bytes())


def _build(run: RunDir, staging: Path, info: ModelInfo, license_text: bytes, *, authors: str | None,
           copyright: str | None, modality: str | None, progress: ProgressSink, label: str) -> tuple[dict, str]:
    """Write every file of the bundle into ``staging`` and check each model file; returns (reports, MONAI's check).
    ``label``: the bundle as the run's verification records name it (run-relative inside the run, else its path)."""
    from mmexport.runs.model_card import render_model_card

    model_name, onnx_name = artifacts.filename("model"), artifacts.onnx_artifact("fp32").filename
    folded, _ = load_model(run.checked_file(model_name))
    onnx_entry = run.manifest["outputs"].get(onnx_name)
    if onnx_entry is None:
        raise MMExportError(f"{run.path}: has no {onnx_name}; export it first (mmexport fold {run.path} --to onnx)")
    if onnx_entry.get("verified") is not True:
        raise VerificationError(f"{run.path / onnx_name}: the manifest does not record it as verified; a bundle is "
                                "made only from a verified ONNX")
    onnx_source = run.checked_file(onnx_name)
    reference = run.reference()

    (staging / LICENSE_NAME).write_bytes(license_text)
    inference = inference_config(info)
    _write_json(staging / INFERENCE, inference)
    metadata = bundle_metadata(run, info, authors=authors, copyright=copyright, modality=modality)
    _write_json(staging / METADATA, metadata)  # without the checks for now: verify_net_in_out reads it
    (staging / "models").mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in folded.state_dict().items()}
    torch.save(state, staging / MODEL_PT)
    progress.message("writing models/model.ts (TorchScript, configs embedded for MONAI Deploy)")
    from monai.data import save_net_with_metadata

    extra = {"inference.json": (staging / INFERENCE).read_bytes()}
    save_net_with_metadata(torch.jit.script(folded.eval()), str(staging / MODEL_TS), include_config_vals=False,
                           meta_values=metadata, more_extra_files=extra)
    shutil.copyfile(onnx_source, staging / MODEL_ONNX)
    if sha256_file(staging / MODEL_ONNX) != onnx_entry["sha256"]:
        raise RunDirError(f"{onnx_source}: changed while it was copied (sha256 differs from the manifest's)")
    card = render_model_card(run.manifest, run.path)
    (staging / "docs").mkdir()
    (staging / README).write_text(card, encoding="utf-8")

    progress.message("checking models/model.pt, model.ts and model.onnx on the run's reference (fp32 row)")
    loaded = torch.load(staging / MODEL_PT, map_location="cpu", weights_only=True)
    reports = {
        MODEL_PT: _torch_check(_network_from_config(staging / INFERENCE, loaded, info.arch), reference, MODEL_PT,
                               info.image_size),
        MODEL_TS: _torch_check(torch.jit.load(str(staging / MODEL_TS), map_location="cpu"), reference, MODEL_TS,
                               info.image_size),
        MODEL_ONNX: check_onnx_file(staging / MODEL_ONNX, reference, "fp32", MODEL_ONNX,
                                    describes=functools.partial(describes_run, run, onnx_name, recorded=info)),
    }
    failed = [f"{name}: " + "; ".join(report.failures()) for name, report in reports.items() if not report.passed]
    for name, report in reports.items():
        run.manifest["verification"].append({"artifact": f"{label}/{name}", "command": f"fold --to {BUNDLE_TARGET}",
                                             **report.as_dict()})
    if failed:
        run.save()  # the failed checks are history; nothing is published
        raise VerificationError("MONAI bundle: verification failed, nothing published: " + " | ".join(failed),
                                next(r for r in reports.values() if not r.passed))
    net_in_out = _net_in_out(staging)
    metadata["mmexport"] = {
        "run": str(run.path), "run_id": run.manifest.get("run_id"),
        "sources": {k: (run.manifest.get("inputs", {}).get(k) or {}).get("sha256") for k in ("source_a", "source_b")},
        "run_files": {name: run.manifest["outputs"][name]["sha256"]
                      for name in (model_name, onnx_name, artifacts.filename("reference"))},
        "files": {name: sha256_file(staging / name) for name in (*MODEL_FILES, LICENSE_NAME, INFERENCE, README)},
        "verification": {name: {"passed": report.passed, "tolerance": "fp32",
                                "input_sets": [s.name for s in report.input_sets]} for name, report in reports.items()},
        "monai_verify_net_in_out": net_in_out,
        "preprocessing": "steps 1-3 by mmexport.runtime.preprocess (recorded_pixels), 4-5 by MONAI transforms; "
                         "equal to mmexport.runtime's tensor",
        "note": "models/model.ts embeds this file without this 'mmexport' section (it holds the model files' hashes)",
    }
    _write_json(staging / METADATA, metadata)
    return reports, net_in_out


@writes_run("fold --to monai-bundle")
def export_monai_bundle(
    run_path: str | os.PathLike[str], out: str | os.PathLike[str], license_file: str | os.PathLike[str] | None, *,
    authors: str | None = None, copyright: str | None = None, modality: str | None = None,
    progress: ProgressSink | None = None,
) -> BundleResult:
    """Write the run's final network as a verified MONAI Bundle at ``out`` (a folder, or a zip when it ends in
    ``.zip``) and record it in the run's manifest. Raises :class:`MMExportError` (one line) and leaves nothing
    at ``out`` on any failure."""
    require_monai()
    license_text = _read_license(license_file)
    progress = sink(progress)
    run = RunDir.open(run_path)
    _, info = load_model(run.checked_file(artifacts.filename("model")))
    _check_config_safe(info)
    target = Path(out).expanduser().absolute()
    _check_out(target)
    relative = _inside(target.parent.resolve() / target.name, run.path)
    if relative is not None:
        run.file(relative)  # a name inside the run, refused otherwise
    zipped = target.suffix.lower() == ".zip"
    staging = make_temporary_directory(target.parent, target.name)
    try:
        reports, net_in_out = _build(run, staging, info, license_text, authors=authors, copyright=copyright,
                                     modality=modality, progress=progress, label=relative or str(target))
        files = {p.relative_to(staging).as_posix(): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        result = BundleResult(target, run.path, zipped, relative is not None, files, reports, net_in_out)
        if zipped:
            _publish_zip(run, staging, target, relative, result)
        else:
            _publish_folder(run, staging, target, relative, result)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _record_external(run: RunDir, result: BundleResult, recorded_files: dict[str, str], folder: Path) -> None:
    run.manifest.setdefault(MANIFEST_KEY, []).append({
        "path": str(folder), "bundle": str(result.path), "format": "zip" if result.zipped else "folder",
        "files": recorded_files, "bundle_files": result.files,
        "verified": all(r.passed for r in result.reports.values()), "created": _now(),
    })
    run.save()
    result.recorded_as = [f"{MANIFEST_KEY}: {result.path}"]


def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _details(result: BundleResult) -> dict[str, Any]:
    return {"source": artifacts.filename("model"), "verified": all(r.passed for r in result.reports.values()),
            "format": BUNDLE_TARGET}


def _publish_zip(run: RunDir, staging: Path, target: Path, relative: str | None, result: BundleResult) -> None:
    root = target.name[: -len(".zip")] or "bundle"
    if relative is not None:
        run.write_output(relative, lambda tmp: _zip(staging, tmp, root), BUNDLE_KIND,
                         **_details(result), bundle_files=result.files)
        result.sha256 = run.manifest["outputs"][relative]["sha256"]
        result.recorded_as = [relative]
        return
    with atomic_path(target) as tmp:
        _zip(staging, tmp, root)
        result.sha256 = sha256_file(tmp)
    _record_external(run, result, {target.name: result.sha256}, target.parent)


def _publish_folder(run: RunDir, staging: Path, target: Path, relative: str | None, result: BundleResult) -> None:
    os.chmod(staging, 0o755 & ~_umask())
    if relative is not None:
        names = [f"{relative}/{name}" for name in result.files]
        for name, inner in zip(names, result.files):  # recorded before the rename; the next writer settles a kill
            run.stage(name, staging / inner, BUNDLE_KIND, _details(result))
        os.rename(staging, target)
        for name in names:
            run.settle_pending(name, renamed=True)
        result.recorded_as = names
        return
    os.rename(staging, target)
    _record_external(run, result, dict(result.files), target)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


__all__ = [
    "BUNDLE_KIND", "BUNDLE_TARGET", "MANIFEST_KEY", "MEDMERGE_REFERENCE", "MONAI_INSTALL", "SCHEMA_URL", "BundleResult",
    "bundle_metadata", "export_monai_bundle", "inference_config", "recorded_pixels", "require_monai",
    "write_predictions",
]
