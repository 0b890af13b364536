"""Safe loading and saving of checkpoints.

Reading: safetensors, or ``torch.load(..., weights_only=True)`` passed
explicitly, with no fallback to unrestricted unpickling, ever: a checkpoint
that needs arbitrary objects to load is refused. ``torchvision:`` specs load
the stock torchvision weights (through the torch hub cache) the same way.

A source checkpoint is normalised (wrapper prefixes such as ``module.``
stripped, the classifier head dropped), validated key by key against the
architecture (missing, unexpected and wrongly shaped keys are named), checked
for NaN/Inf and converted to contiguous float32. What was done is recorded in
``SourceCheckpoint.info`` for the run manifest.

Writing: safetensors only, atomically (temporary file beside the target, then
``os.replace``).
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import safetensors
import safetensors.torch
import torch

from mmexport.torchside.backbones import BACKBONES, backbone_state_keys, get_backbone
from mmexport.errors import ArchitectureError, CheckpointError
from mmexport.fileio import atomic_path, sha256_file

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
TORCHVISION_SCHEME = "torchvision:"

# Keys under which training frameworks store the state dict inside a bigger
# checkpoint dict (Lightning and most repos: "state_dict"; timm, DeiT and many
# research repos: "model"). Tried in this order, at most twice (one nesting).
_WRAPPER_KEYS = ("state_dict", "model")
_MAX_UNWRAP = 2

# Pre-0.4 torchvision DenseNet checkpoints (still the ones torchvision hosts)
# name the dense-layer modules "norm.1", "conv.2", ...; torchvision renames
# them when it loads its own weights (torchvision.models.densenet
# ._load_state_dict). Same pattern, same rename.
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)

# Exceptions torch.load raises on a file that is not a loadable checkpoint:
# truncated zip ("PytorchStreamReader failed ...": RuntimeError), empty or cut
# legacy pickle (EOFError, UnpicklingError), garbage (KeyError, ValueError,
# struct.error, ...), weights_only refusals (UnpicklingError).
_TORCH_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    ValueError,
    KeyError,
    IndexError,
    struct.error,
    zipfile.BadZipFile,
    OSError,
)
_SAFETENSORS_ERRORS: tuple[type[BaseException], ...] = (safetensors.SafetensorError, OSError, ValueError)

_LIST_CAP = 5
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class SourceCheckpoint:
    """A validated source backbone: head dropped, float32 contiguous CPU tensors."""

    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any]


# --------------------------------------------------------------------------- helpers


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """One short line describing ``exc`` (libraries' messages can be paragraphs)."""
    text = _ANSI.sub("", str(exc)).strip()
    line = text.splitlines()[0].strip() if text else ""
    if len(line) > limit:
        line = line[: limit - 3].rstrip() + "..."
    name = type(exc).__name__
    return f"{name}: {line}" if line else name


def _names(keys: Iterable[str], cap: int = _LIST_CAP) -> str:
    """``a, b, c, d, e and 7 more`` (keys sorted, list capped)."""
    keys = sorted(keys)
    shown = ", ".join(keys[:cap])
    return f"{shown} and {len(keys) - cap} more" if len(keys) > cap else shown


def _shape(shape: Iterable[int]) -> str:
    return str(tuple(int(s) for s in shape))


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _check_file(path: Path) -> None:
    """The cheap checks that give a clear message before any library sees the file."""
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{path}: a symlink whose target does not exist (or a symlink loop)")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied (the file is not readable by this user)")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    accepted = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
    raise CheckpointError(
        f"{path}: unsupported checkpoint extension {suffix or '(none)'!r}; accepted: {accepted}"
    )


def _torch_load_error(where: str, exc: BaseException) -> CheckpointError:
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" (it references {found.group(1)})" if found else ""
        return CheckpointError(
            f"{where}: refused for safety: the file contains pickled code/objects that are not plain "
            f"tensors{what}; only state dicts load with torch.load(weights_only=True). "
            "Save model.state_dict() (or safetensors) where the file is trusted, and pass that"
        )
    return CheckpointError(f"{where}: corrupt, truncated or not a torch checkpoint ({_first_line(exc)})")


def _select_state_dict(obj: Any, where: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the name -> tensor mapping in a loaded checkpoint; also return the wrapper path."""
    trail: list[str] = []
    for _ in range(_MAX_UNWRAP + 1):
        if not isinstance(obj, Mapping):
            inside = f" under {'.'.join(trail)!r}" if trail else ""
            raise CheckpointError(
                f"{where}: expected a state dict (a mapping of names to tensors){inside}, "
                f"found {type(obj).__name__}"
            )
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            bad_keys = [k for k in obj if not isinstance(k, str)]
            if bad_keys:
                raise CheckpointError(f"{where}: state dict has non-string keys: {_names(map(repr, bad_keys))}")
            return dict(obj), ".".join(trail) or None
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None or len(trail) == _MAX_UNWRAP:
            break
        trail.append(wrapper)
        obj = obj[wrapper]
    inside = f" under {'.'.join(trail)!r}" if trail else ""
    if not obj:
        raise CheckpointError(f"{where}: the state dict{inside} is empty")
    non_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    raise CheckpointError(
        f"{where}: not a state dict: {len(non_tensors)} non-tensor entries{inside} "
        f"({_names(non_tensors)}) and no 'state_dict' or 'model' entry holding one"
    )


def _read(path: Path) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """Load ``path``; return (state dict, format, wrapper key path or None)."""
    _check_file(path)
    fmt = _format_of(path)
    if fmt == "safetensors":
        try:
            loaded = safetensors.torch.load_file(str(path), device="cpu")
        except _SAFETENSORS_ERRORS as exc:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_first_line(exc)})") from None
        if not loaded:
            raise CheckpointError(f"{path}: the safetensors file holds no tensors")
        return loaded, fmt, None
    try:
        # weights_only=True: tensors and plain containers only; never anything executable.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except _TORCH_LOAD_ERRORS as exc:
        raise _torch_load_error(str(path), exc) from None
    state, wrapper = _select_state_dict(obj, str(path))
    return state, fmt, wrapper


# --------------------------------------------------------------------------- public: reading


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file's name -> tensor mapping, safely.

    ``.safetensors`` via safetensors; ``.pt/.pth/.bin/.ckpt`` via
    ``torch.load(weights_only=True)``, unwrapping ``{"state_dict": ...}`` /
    ``{"model": ...}`` containers (up to two levels). Anything unreadable,
    unsafe or not a state dict raises a one-line ``CheckpointError``.
    """
    state, _, _ = _read(Path(path))
    return state


def load_safetensors_with_metadata(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata of a safetensors file (``{}`` when it has none)."""
    path = Path(path)
    _check_file(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except _SAFETENSORS_ERRORS as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_first_line(exc)})") from None
    return tensors, metadata


# --------------------------------------------------------------------------- public: sources


@functools.lru_cache(maxsize=None)
def _expected(arch: str) -> dict[str, torch.Size]:
    return backbone_state_keys(arch)


def _strip_prefix(
    state: dict[str, torch.Tensor], expected: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Strip the longest run of leading dotted segments shared by ALL keys
    (``module.``, ``model.``, ``backbone.``, ``module.model.``, ``_orig_mod.``, ...)
    if, and only if, that makes more keys match the architecture."""
    split = [key.split(".") for key in state]
    common: list[str] = []
    for parts in zip(*(s[:-1] for s in split)):  # keep at least the last segment of every key
        if len(set(parts)) != 1:
            break
        common.append(parts[0])

    def score(prefix: str) -> int:
        return sum(1 for key in state if key[len(prefix):] in expected)

    best, best_score = "", score("")
    for n in range(1, len(common) + 1):
        prefix = ".".join(common[:n]) + "."
        s = score(prefix)
        if s > best_score:
            best, best_score = prefix, s
    if not best:
        return state, None
    return {key[len(best):]: value for key, value in state.items()}, best


def _rename_legacy_densenet(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    renamed = 0
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _LEGACY_DENSENET_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
            renamed += 1
        out[key] = value
    return out, renamed


def _guess_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The registered architecture these (head-dropped) weights fit exactly, if any."""
    for name, backbone in BACKBONES.items():
        keys = {k: v for k, v in state.items() if not backbone.is_head_key(k)}
        expected = _expected(name)
        missing = set(expected) - set(keys)
        if all(k.endswith(".num_batches_tracked") for k in missing) and all(
            k in expected and tuple(v.shape) == tuple(expected[k]) for k, v in keys.items()
        ):
            return name
    return None


def _all_finite(tensor: torch.Tensor) -> bool:
    # aminmax propagates NaN and an Inf is the min or the max, so this is exact,
    # and several times faster on CPU than isfinite(tensor).all() (no bool copy).
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def fit_report(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> list[str]:
    """Missing, unexpected and wrongly shaped keys of ``state`` against ``expected`` shapes, by name."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys ({_names(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys ({_names(unexpected)})")
    if wrong:
        parts.append(
            "wrong shape: " + _names(f"{k} {_shape(state[k].shape)} vs expected {_shape(expected[k])}" for k in wrong)
        )
    return parts


def _resolve_torchvision(spec: str, arch: str) -> Any:
    from torchvision.models import get_weight  # lazy: imports every torchvision model module

    backbone = get_backbone(arch)
    name = spec[len(TORCHVISION_SCHEME):].strip()
    if name and "." not in name:
        name = f"{backbone.weights_enum}.{name}"  # shorthand: torchvision:IMAGENET1K_V1
    try:
        weights = get_weight(name)
    except (ValueError, KeyError):
        import torchvision.models

        members = [m.name for m in getattr(torchvision.models, backbone.weights_enum)] + ["DEFAULT"]
        choices = ", ".join(f"{backbone.weights_enum}.{m}" for m in members)
        raise CheckpointError(
            f"{spec}: unknown torchvision weights {name!r}; for {arch} use one of: {choices}"
        ) from None
    enum_name = type(weights).__name__
    if enum_name != backbone.weights_enum:
        owner = next((b.name for b in BACKBONES.values() if b.weights_enum == enum_name), None)
        owner_text = f"{owner} weights ({enum_name})" if owner else f"weights of {enum_name}"
        raise ArchitectureError(
            f"{spec}: these are {owner_text}, but the architecture is {arch} "
            f"(expects {backbone.weights_enum}.*)"
        )
    return weights


def _check_cached_hash(spec: str, cache_file: Path, url: str) -> str | None:
    """The sha256 of the cached weights file, which must start with the prefix its name carries.

    torchvision names its weights ``<name>-<sha256 prefix>.pth`` and torch.hub checks that
    prefix only while downloading (``check_hash``); a file already in the cache is loaded as
    it is. Checked here on every load, so a replaced or corrupted cache file is refused.
    """
    if not cache_file.is_file():
        return None
    try:
        digest = sha256_file(cache_file)
    except OSError as exc:
        raise CheckpointError(f"{spec}: cached weights file {cache_file} is unreadable ({_first_line(exc)})") from None
    match = torch.hub.HASH_REGEX.search(os.path.basename(urlparse(url).path))
    prefix = match.group(1) if match else ""
    if prefix and not digest.startswith(prefix):
        raise CheckpointError(
            f"{spec}: cached weights file {cache_file} does not match the hash in its name (sha256 {digest[:12]}…, "
            f"expected {prefix}…): it is not the file torchvision published; delete it to download again"
        )
    return digest


def _load_torchvision(spec: str, arch: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights = _resolve_torchvision(spec, arch)
    cache_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    was_cached = cache_file.is_file()
    digest = _check_cached_hash(spec, cache_file, weights.url)
    try:
        # torch.hub.load_state_dict_from_url defaults to unrestricted unpickling:
        # weights_only=True must be passed here too.
        obj = weights.get_state_dict(progress=False, check_hash=True, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as exc:
        raise _torch_load_error(f"{spec}: cached weights file {cache_file}", exc) from None
    except (OSError, RuntimeError, ValueError) as exc:  # URLError/HTTPError are OSErrors; bad hash is a RuntimeError
        if was_cached:
            raise CheckpointError(
                f"{spec}: cached weights file {cache_file} is unreadable ({_first_line(exc)}); "
                "delete it to download again, or pass a .pth file instead"
            ) from None
        raise CheckpointError(
            f"{spec}: could not download torchvision weights ({_first_line(exc)}); download them "
            f"where a network is available ({weights.url}) and pass the .pth file instead"
        ) from None
    state, _ = _select_state_dict(obj, spec)
    have_file = cache_file.is_file()
    if digest is None and have_file:  # downloaded just now (torch.hub checked the prefix while downloading)
        digest = _check_cached_hash(spec, cache_file, weights.url)
    info = {
        "format": "torchvision",
        "path": None,
        "sha256": digest,
        "size_bytes": cache_file.stat().st_size if have_file else None,
        "cache_file": str(cache_file) if have_file else None,
        "weights": f"{type(weights).__name__}.{weights.name}",
        "url": weights.url,
        "container_key": None,
    }
    return state, info


def load_source(spec: str, arch: str, *, label: str = "source") -> SourceCheckpoint:
    """Load, normalise and validate one source backbone for ``arch``.

    ``spec`` is a checkpoint file (see ``read_state_dict``) or
    ``torchvision:<EnumClass>.<MEMBER>`` / ``torchvision:<MEMBER>``.
    Raises ``CheckpointError`` (unreadable, unsafe, NaN/Inf, wrong dtypes) or
    ``ArchitectureError`` (keys or shapes that do not fit ``arch``), each with a
    one-line message starting with ``label``.
    """
    backbone = get_backbone(arch)
    expected = _expected(arch)

    if spec.startswith(TORCHVISION_SCHEME):
        try:
            state, info = _load_torchvision(spec, arch)
        except (CheckpointError, ArchitectureError) as exc:
            raise type(exc)(f"{label}: {exc}") from None
        where = f"{label} ({spec})"
    else:
        try:
            path = Path(spec).expanduser().resolve()
        except (RuntimeError, OSError) as exc:  # Python < 3.13 raises RuntimeError for a symlink loop
            reason = "a symlink loop" if "loop" in str(exc).lower() else _first_line(exc)
            raise CheckpointError(f"{label}: {spec}: cannot resolve the path ({reason})") from None
        try:
            state, fmt, wrapper = _read(path)
            sha, size = sha256_file(path), path.stat().st_size
        except CheckpointError as exc:
            raise CheckpointError(f"{label}: {exc}") from None
        except OSError as exc:  # hashing after a successful read: permissions changed, file removed
            raise CheckpointError(f"{label}: {path}: cannot read ({_first_line(exc)})") from None
        info = {
            "format": fmt,
            "path": str(path),
            "sha256": sha,
            "size_bytes": size,
            "weights": None,
            "container_key": wrapper,
        }
        where = f"{label} ({path})"

    state, renamed = _rename_legacy_densenet(state)
    state, stripped = _strip_prefix(state, expected)
    dropped = sorted(k for k in state if backbone.is_head_key(k))
    state = {k: v for k, v in state.items() if not backbone.is_head_key(k)}

    # Checkpoints saved before BatchNorm had a `num_batches_tracked` buffer
    # (torch < 0.4.1; torchvision still hosts such files, e.g. ResNet18
    # IMAGENET1K_V1) lack it. BatchNorm's own loader fills it with 0 for them;
    # do the same, but only beside a BN layer that is otherwise present.
    filled = sorted(
        k
        for k in expected
        if k.endswith(".num_batches_tracked")
        and k not in state
        and k[: -len("num_batches_tracked")] + "running_mean" in state
    )
    for key in filled:
        state[key] = torch.tensor(0, dtype=torch.long)

    problems = fit_report(state, expected)
    if problems:
        guess = _guess_arch(state)
        hint = f"; these weights fit {guess}" if guess and guess != arch else ""
        raise ArchitectureError(f"{where}: does not fit {arch}: {'; '.join(problems)}{hint}")

    # Dtypes: only BatchNorm's step counter is an integer; everything else is a weight.
    bad_dtype = []
    for key, tensor in state.items():
        want_int = key.endswith(".num_batches_tracked")
        is_float = tensor.is_floating_point()
        ok_int = not is_float and not tensor.is_complex() and tensor.dtype != torch.bool
        if (want_int and not ok_int) or (not want_int and not is_float) or tensor.layout != torch.strided:
            bad_dtype.append(f"{key} ({_dtype(tensor)})")
    if bad_dtype:
        raise CheckpointError(
            f"{where}: unexpected tensor types (weights must be dense floating point, "
            f"num_batches_tracked an integer): {_names(bad_dtype)}"
        )

    non_finite = [k for k, t in state.items() if t.is_floating_point() and not _all_finite(t)]
    if non_finite:
        raise CheckpointError(
            f"{where}: {len(non_finite)} tensors contain NaN or Inf: {_names(non_finite)}"
        )

    converted = sorted({_dtype(t) for t in state.values() if t.is_floating_point()} - {"float32"})
    clean: dict[str, torch.Tensor] = {}
    for key in expected:  # the architecture's own key order
        tensor = state[key].detach().to("cpu")
        tensor = tensor.to(torch.float32) if tensor.is_floating_point() else tensor.to(torch.long)
        clean[key] = tensor.contiguous()

    # Checked again after the cast: float64 values beyond float32's range (|x| > 3.4e38) are
    # finite in the file and Inf in the network.
    overflow = [k for k in expected if state[k].is_floating_point() and state[k].dtype != torch.float32
                and not _all_finite(clean[k])]
    if overflow:
        raise CheckpointError(
            f"{where}: {len(overflow)} tensors overflow float32 (values beyond ±3.4e38 become Inf when converted "
            f"from {', '.join(converted)}): {_names(overflow)}"
        )

    info = {
        "spec": spec,
        "label": label,
        **info,
        "stripped_prefix": stripped,
        "dropped_keys": dropped,
        "filled_keys": filled,
        "renamed_legacy_keys": renamed,
        "converted_from_dtypes": converted,
    }
    return SourceCheckpoint(state_dict=clean, info=info)


def check_compatible(a: SourceCheckpoint, b: SourceCheckpoint) -> None:
    """Both sources must have the same keys, shapes and dtypes (merging is per tensor)."""
    name_a, name_b = a.info.get("label", "source A"), b.info.get("label", "source B")
    only_a = set(a.state_dict) - set(b.state_dict)
    only_b = set(b.state_dict) - set(a.state_dict)
    differ = [
        k
        for k in set(a.state_dict) & set(b.state_dict)
        if a.state_dict[k].shape != b.state_dict[k].shape or a.state_dict[k].dtype != b.state_dict[k].dtype
    ]
    parts = []
    if only_a:
        parts.append(f"{len(only_a)} keys only in {name_a} ({_names(only_a)})")
    if only_b:
        parts.append(f"{len(only_b)} keys only in {name_b} ({_names(only_b)})")
    if differ:
        ta, tb = a.state_dict, b.state_dict
        pairs = (f"{k} {_shape(ta[k].shape)}/{_dtype(ta[k])} vs {_shape(tb[k].shape)}/{_dtype(tb[k])}" for k in differ)
        parts.append(f"different shape or dtype: {_names(pairs)}")
    if parts:
        raise ArchitectureError(f"{name_a} and {name_b} cannot be merged: {'; '.join(parts)}")


# --------------------------------------------------------------------------- public: writing


def save_state_dict(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` as safetensors, atomically: ``path`` ends up complete or untouched."""
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; offending keys: {_names(map(str, bad))}")
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and ptr in seen_storages:
            tensor = tensor.clone()  # safetensors refuses tensors that share storage
            ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel():
            seen_storages.add(ptr)
        prepared[key] = tensor
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(prepared, str(tmp), metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
