"""Atomic writes and hashing: a crash leaves the previous artifact or nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mmexport.errors import RunDirError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    The temporary file lives in the same directory so ``os.replace`` is atomic;
    on any exception it is removed and ``path`` is untouched.
    """
    target = Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise RunDirError(f"{directory}: output directory does not exist")
    if not os.access(directory, os.W_OK):
        raise RunDirError(f"{directory}: output directory is not writable")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:  # e.g. a read-only file system, which os.access does not see for root
        raise RunDirError(f"{directory}: cannot write here ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; published files follow the umask
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def compare_tree(root: Path, recorded: dict[str, str], skip: str) -> tuple[list[Path], list[str], list[str]]:
    """Every file (and symlink) under ``root`` against ``recorded`` (relative POSIX path -> sha256).

    Returns (intact: paths whose content has the recorded hash, altered: recorded names whose
    file differs or is not a plain file, unlisted: names not recorded), ``skip`` excluded.
    What deletes or replaces a directory asks this first, so it touches only what it provably made.
    """
    intact: list[Path] = []
    altered: list[str] = []
    unlisted: list[str] = []
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        relative = path.relative_to(root).as_posix()
        if relative == skip:
            continue
        if relative not in recorded:
            unlisted.append(relative)
        elif path.is_file() and sha256_file(path) == recorded[relative]:
            intact.append(path)
        else:
            altered.append(relative)
    return intact, altered, unlisted
