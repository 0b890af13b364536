"""Model files a run publishes: the unmerged merge and the plain (folded or fine-tuned) network.

Both are safetensors with string metadata, so a file alone says what it holds:
architecture, classes and the preprocessing an inference server must apply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from mmexport.torchside.backbones import get_backbone
from mmexport.torchside.checkpoints import load_safetensors_with_metadata, save_state_dict
from mmexport.errors import CheckpointError
from mmexport.jsonread import parse_json_object
from mmexport.torchside.merge import MergedModel
from mmexport.runtime.modelinfo import ModelInfo

MODEL_FORMAT = "mmexport-model/2"
METADATA_KEY = "mmexport"


def pack_metadata(fields: dict[str, str]) -> dict[str, str]:
    """One safetensors metadata entry holding canonical JSON.

    safetensors writes its metadata map in hash order, which differs between
    processes; with a single key the file bytes (and so its sha256) are
    reproducible, so a re-fold can be proven bit-identical.
    """
    return {METADATA_KEY: json.dumps(fields, sort_keys=True, separators=(",", ":"))}


def unpack_metadata(metadata: dict[str, str], source: str) -> dict[str, str]:
    if METADATA_KEY not in metadata:
        return dict(metadata)
    fields = parse_json_object(metadata[METADATA_KEY], f"{source}: mmexport metadata")
    return {str(k): str(v) for k, v in fields.items()}


def save_model(path: str | os.PathLike[str], model: nn.Module, info: ModelInfo, stage: str) -> None:
    """The plain torchvision network as safetensors, with its :class:`ModelInfo` and stage."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_state_dict(path, state, pack_metadata({"format": MODEL_FORMAT, "stage": stage, **info.to_metadata()}))


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the stock torchvision network from a model file (``strict=True``)."""
    tensors, metadata = load_safetensors_with_metadata(path)
    metadata = unpack_metadata(metadata, str(path))
    if metadata.get("format") != MODEL_FORMAT:
        found = metadata.get("format")
        if isinstance(found, str) and found.startswith("mmexport-model/"):
            raise CheckpointError(f"{path}: model file format {found} (mmexport {metadata.get('mmexport_version', '0.1')}) "
                                  f"is not readable by this version ({MODEL_FORMAT}); retrain the run")
        raise CheckpointError(f"{path}: not an mmexport model file (format {found!r})")
    info = ModelInfo.from_metadata(metadata, str(path))
    model = get_backbone(info.arch).build(info.num_classes)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {info.arch}: {str(exc).splitlines()[0]}") from None
    return model.eval(), info


def save_unmerged(path: str | os.PathLike[str], merged: MergedModel, info: ModelInfo) -> None:
    save_state_dict(path, merged.unmerged_state_dict(), pack_metadata({**merged.unmerged_metadata(), **info.to_metadata()}))


def load_unmerged(path: str | os.PathLike[str]) -> tuple[MergedModel, ModelInfo]:
    tensors, metadata = load_safetensors_with_metadata(path)
    metadata = unpack_metadata(metadata, str(path))
    info = ModelInfo.from_metadata(metadata, str(Path(path)))
    return MergedModel.from_unmerged_state_dict(tensors, metadata).eval(), info
