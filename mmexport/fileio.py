"""Atomic writes and hashing: a crash leaves the previous artifact or nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mmexport.errors import RunDirError

_CHUNK = 1 << 20

# Every temporary file or directory this process makes carries this token in its name
# (``.<name>.<token>-<random>.tmp``). A writer records its token before it makes any
# (in the run's lock file, or a staging run's manifest), so the next writer removes exactly
# the leftovers of a killed writer: a user's ``.notes.tmp`` carries no recorded token and
# is never touched. A forked child keeps its parent's token, so its temporaries are covered
# by the parent's record.
_WRITER_TOKEN = secrets.token_hex(8)
WRITER_TOKEN_PATTERN = re.compile(r"^[0-9a-f]{16}$")


def writer_token() -> str:
    """This process's temporary-file token (16 hex digits, unguessable)."""
    return _WRITER_TOKEN


def _temporary_prefix(name: str) -> str:
    return f".{name}.{_WRITER_TOKEN}-"


def make_temporary_file(directory: str | os.PathLike[str], for_name: str) -> Path:
    """Create an empty temporary file in ``directory`` for ``for_name``, named with this process's token."""
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(for_name), suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(tmp_name)


def make_temporary_directory(directory: str | os.PathLike[str], purpose: str) -> Path:
    """Create a temporary directory in ``directory`` (e.g. a build folder), named with this process's token."""
    return Path(tempfile.mkdtemp(prefix=_temporary_prefix(purpose), suffix=".tmp", dir=directory))


def is_temporary_of(name: str, tokens: Iterable[str]) -> bool:
    """Whether ``name`` (one path component) is a temporary that a writer with one of ``tokens`` made."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    return any(WRITER_TOKEN_PATTERN.match(token) and f".{token}-" in name[1:] for token in tokens)


def remove_temporaries(root: str | os.PathLike[str], tokens: Iterable[str]) -> list[str]:
    """Remove under ``root`` the temporaries of the writers ``tokens`` (and nothing else); returns their names.

    The one rule for what a writer may delete inside a run it did not just write: a regular
    file or a real directory whose name carries a recorded token. Symbolic links are never
    followed (nor removed), so nothing outside ``root`` is reached.
    """
    tokens = [t for t in tokens if isinstance(t, str) and WRITER_TOKEN_PATTERN.match(t)]
    root = Path(root)
    removed: list[str] = []
    if not tokens or root.is_symlink() or not root.is_dir():
        return removed
    for directory, subdirectories, files in os.walk(root, followlinks=False):
        for name in list(subdirectories) + files:
            if not is_temporary_of(name, tokens):
                continue
            path = Path(directory) / name
            try:
                mode = os.lstat(path).st_mode
                if stat.S_ISDIR(mode):
                    subdirectories.remove(name)  # not walked into: removed whole
                    shutil.rmtree(path)
                elif stat.S_ISREG(mode):
                    path.unlink()
                else:
                    continue  # a symbolic link or special file is not what a writer made
            except OSError:
                continue  # best effort: a leftover is untidy, not wrong
            removed.append(path.relative_to(root).as_posix())
    return removed


SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")  # what sha256_file returns; the manifest schema states the same pattern


def is_sha256_hex(value: object) -> bool:
    """Whether ``value`` is a sha256 as mmexport records one: 64 lowercase hex digits."""
    return isinstance(value, str) and SHA256_HEX.match(value) is not None


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
    on any exception it is removed and ``path`` is untouched. Its name carries this
    process's :func:`writer_token`, so only a writer that recorded the token removes it
    if this process is killed first.
    """
    target = Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise RunDirError(f"{directory}: output directory does not exist")
    if not os.access(directory, os.W_OK):
        raise RunDirError(f"{directory}: output directory is not writable")
    try:
        tmp = make_temporary_file(directory, target.name)
    except OSError as exc:  # e.g. a read-only file system, which os.access does not see for root
        raise RunDirError(f"{directory}: cannot write here ({exc.strerror or exc})") from None
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; published files follow the umask
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
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
