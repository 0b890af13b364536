"""One reader for every JSON text mmexport did not just write itself: bounded, finite, one-line errors.

Metadata travels inside artifacts (ONNX ``metadata_props``, engine sidecars, Triton
``mmexport.json``, the run manifest), and anyone with write access to a file can put
anything there. Python's ``json`` accepts ``NaN``/``Infinity``, numbers of any size
(``1e400`` becomes ``inf``), and nesting deep enough to raise ``RecursionError``;
:func:`parse_json` refuses all three, and every failure is the caller's error class
with one line naming ``where``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from mmexport.errors import CheckpointError, MMExportError

MAX_DEPTH = 32  # deeper than any document mmexport writes (the manifest is ~6 levels)
MAX_CHARS = 64 * 1024 * 1024  # a metadata text larger than this is not metadata


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (a recursive walk would itself overflow on a hostile document)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def parse_json(text: str | bytes, where: str, *, error: type[MMExportError] = CheckpointError,
               max_depth: int = MAX_DEPTH) -> Any:
    """``text`` as JSON, or ``error("<where>: malformed JSON (<why>)")``.

    Refused: invalid JSON, ``NaN``/``Infinity`` and numbers that overflow a float,
    nesting deeper than ``max_depth``, and texts over :data:`MAX_CHARS`.
    """
    if len(text) > MAX_CHARS:
        raise error(f"{where}: malformed JSON (over {MAX_CHARS // (1024 * 1024)} MiB)")
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"{where}: malformed JSON (not UTF-8)") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise error(f"{where}: malformed JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        reason = " ".join(str(exc).split())[:200]
        raise error(f"{where}: malformed JSON ({reason})") from None
    if _depth(value) > max_depth:
        raise error(f"{where}: malformed JSON (nested deeper than {max_depth} levels)")
    return value


def parse_json_object(text: str | bytes, where: str, *, error: type[MMExportError] = CheckpointError) -> dict[str, Any]:
    """:func:`parse_json` that must give an object (a ``dict``)."""
    value = parse_json(text, where, error=error)
    if not isinstance(value, dict):
        raise error(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value




def read_json_object(path: str | os.PathLike[str], what: str, *, max_bytes: int = MAX_CHARS,
                     error: type[MMExportError] = CheckpointError, missing: str | None = None) -> dict[str, Any]:
    """The JSON object in file ``path`` (``what`` names it in errors), reading at most ``max_bytes``.

    One line each for a missing file (``missing``, if given, replaces the default message),
    an unreadable one, one over ``max_bytes`` (never read whole), and malformed JSON.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise error(missing or f"{path}: {what} not found") from None
    except OSError as exc:
        reason = exc.strerror or " ".join(str(exc).split())
        raise error(f"{path}: {what} cannot be read ({reason})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: {what} over {max_bytes // 2**20} MiB, refused unread")
    return parse_json_object(data, f"{path}: {what}", error=error)


__all__ = ["MAX_DEPTH", "parse_json", "parse_json_object", "read_json_object"]
