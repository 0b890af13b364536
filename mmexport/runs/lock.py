"""One writer at a time per run: an exclusive ``flock`` on a lock file beside the run directory.

Every command that changes a run (fold, export, verify -- which appends its results --,
bench when it makes comparison models, train when it replaces a run) holds the lock
for as long as it writes; a second writer waits up to ``wait`` seconds (default 0: it
stops at once) and then stops with one line naming the holder. The wait is a parameter,
never ambient state: ``writing(run, command, wait=...)``, or the ``lock_wait`` keyword that
every function decorated with :func:`writes_run` accepts (the CLI hands ``mmexport
--lock-wait SECONDS`` down so). The lock file lives *beside* the run (``.RUN.lock``), so
it survives the run directory being replaced, and only while a writer needs it: a holder
that finishes removes it (with the lock still held), so a finished command leaves nothing
beside the run (one that failed leaves it, see below). A waiter that had opened the
removed file finds, once it gets the lock, that the name no longer leads to the file it
holds, and starts again on the name (the standard "re-check the inode after locking"
protocol): two writers never hold locks on two different files of one name. Within one
process the lock is re-entrant
(a command that calls another writer keeps the lock it has). Readers (inspect, the
runtime) need no lock: every manifest write is an atomic replace, so a reader sees the
old or the new manifest, never a mix.

The lock file is opened without following a symbolic link and used only if it is a
regular file with one link, owned by this user or the run's owner: a link planted at
``.RUN.lock`` cannot make a writer truncate someone else's file. It records the holder's
temporary-file token (:func:`mmexport.fileio.writer_token`) before the holder makes any
temporary file; the next holder removes exactly that writer's leftovers (a killed writer's
temporaries), never files that merely look temporary. So a lock file that stays beside a run
is the mark of a writer that failed or was killed: its record names the temporaries the next
writer removes (and the file with them, when it finishes).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmexport.errors import RunDirError
from mmexport.fileio import WRITER_TOKEN_PATTERN, remove_temporaries, writer_token
from mmexport.jsonread import parse_json_object

_HELD: dict[str, list[int]] = {}  # lock path -> [fd, depth] of the locks this process holds
POLL_SECONDS = 0.1


def lock_path(run_path: str | os.PathLike[str]) -> Path:
    run = Path(run_path).expanduser().absolute()
    return run.parent / f".{run.name}.lock"


DEFAULT_WAIT = 0.0  # seconds a writer waits for another one when no wait is given: none, it stops at once


def check_wait(wait: float | None) -> float:
    """``wait`` as seconds to wait for another writer (``None``: :data:`DEFAULT_WAIT`); refused unless finite and >= 0."""
    if wait is None:
        return DEFAULT_WAIT
    try:
        value = float(wait)
    except (TypeError, ValueError):
        raise RunDirError(f"the lock wait must be a number of seconds, got {wait!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise RunDirError(f"the lock wait must be a finite number of seconds >= 0, got {wait!r}")
    return value


_RECORD_BYTES = 4096  # a holder record is ~150 bytes; a larger lock file is not ours to read whole


def _record(fd: int) -> dict[str, Any]:
    """The lock file's holder record (``{}`` when empty or not a record mmexport wrote)."""
    try:
        text = os.pread(fd, _RECORD_BYTES, 0)
        return parse_json_object(text, "lock file", error=RunDirError) if text.strip() else {}
    except (OSError, RunDirError):
        return {}


def _holder(fd: int) -> str:
    info = _record(fd)
    if not info:
        return "another mmexport command"
    shown = [str(info.get(key, "?"))[:80].encode("ascii", "backslashreplace").decode() for key in ("command", "pid", "since")]
    return "{} (pid {}, since {})".format(*(s if s.isprintable() else repr(s) for s in shown))


class _Removed(Exception):
    """The lock file was removed (by a holder that finished) between opening it and checking it: open it again."""


def _same_file(fd: int, path: Path) -> bool:
    """``path`` (not followed) still names the file open as ``fd``."""
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _open_lock(path: Path, run: Path) -> int:
    """Open (creating it if missing) the lock file, refusing anything but a plain file of this user or the run's owner.

    ``O_NOFOLLOW``: a symbolic link at ``path`` is refused, not followed (the writer would
    truncate its target). One link only: a hard link to another file is the same attack.
    The owner may be this user or the run directory's owner, so several users sharing a
    group-writable run share its lock, while a file planted by a third user is refused.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunDirError(f"{path}: the run's lock file is a symbolic link; refusing to follow it "
                              "(remove the link and retry)") from None
        raise RunDirError(f"{path}: cannot create the run's lock file ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RunDirError(f"{path}: the run's lock file is not a regular file; refusing to use it (remove it and retry)")
        if info.st_nlink == 0:  # a finishing holder removed it after we opened it
            raise _Removed
        if info.st_nlink != 1:
            raise RunDirError(f"{path}: the run's lock file has {info.st_nlink} hard links (another file's name); "
                              "refusing to write it (remove it and retry)")
        owners = {os.geteuid()}
        with contextlib.suppress(OSError):
            owners.add((run if run.is_dir() else run.parent).stat().st_uid)
        if info.st_uid not in owners:
            raise RunDirError(f"{path}: the run's lock file belongs to user {info.st_uid}, neither you nor the run's owner; "
                              "refusing to use it (remove it and retry)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_held_here(run_path: str | os.PathLike[str]) -> bool:
    return str(lock_path(run_path)) in _HELD


@contextlib.contextmanager
def writing(run_path: str | os.PathLike[str], command: str, wait: float | None = None, *,
            may_be_missing: bool = False) -> Iterator[None]:
    """Hold the run's write lock for the duration of the block (re-entrant within this process).

    ``wait``: seconds to wait for another process writing the run (``None``: :data:`DEFAULT_WAIT`);
    a re-entered lock is already held, so it never waits. ``may_be_missing``: the run need not
    exist yet (publishing a new run); otherwise a missing run, or one that is not a directory,
    is refused before any lock file is made.
    """
    path = lock_path(run_path)
    key = str(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    run = Path(run_path).expanduser().absolute()
    if not path.parent.is_dir():
        raise RunDirError(f"{path.parent}: no such directory")
    # No lock file dropped beside a mistyped path or a file: only a run (or, when publishing, its future place).
    if (run.exists() or run.is_symlink()) and not run.is_dir():
        raise RunDirError(f"{run}: not a run directory (not a directory)")
    if not run.exists() and not may_be_missing:
        raise RunDirError(f"{run}: no such run directory")
    wait = check_wait(wait)
    deadline = time.monotonic() + wait
    fd = _acquire(path, run, wait, deadline)
    try:
        previous = _record(fd).get("token")
        # With the lock held no live writer owns another token's temporaries; removed before that record is
        # overwritten, so a holder killed while removing them leaves the record for the next one. This
        # process's own are never leftovers (atomic_path removes them on any exception) and may be in use.
        if isinstance(previous, str) and WRITER_TOKEN_PATTERN.match(previous) and previous != writer_token():
            remove_temporaries(run, [previous])
        # This holder's token is on disk before it makes any temporary file; the record stays after the
        # release, so whatever it leaves (if killed) is the next holder's to remove.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command, "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "token": writer_token()}).encode(), 0)
        _HELD[key] = [fd, 1]
        finished = False
        try:
            yield
            finished = True
        finally:
            del _HELD[key]
            # Finished without an error: the record names nothing left to remove, so the file goes, under the
            # lock, if the name still leads to this file (waiters on it see that after locking and start
            # again). A writer that failed or was killed leaves it, with the record of its temporaries.
            if finished:
                with contextlib.suppress(OSError):
                    if _same_file(fd, path):
                        os.unlink(path)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(path: Path, run: Path, wait: float, deadline: float) -> int:
    """An open file descriptor of ``path`` holding its exclusive flock, the name still leading to that file."""
    while True:
        try:
            fd = _open_lock(path, run)
        except _Removed:
            continue
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise RunDirError(f"{path}: cannot lock the run ({exc.strerror})") from None
                    if time.monotonic() >= deadline:
                        waited = f" after waiting {wait:g} s" if wait else ""
                        raise RunDirError(
                            f"{run.name}: another command is writing this run: {_holder(fd)}{waited}; "
                            "retry when it is done, or wait for it with `mmexport --lock-wait SECONDS ...`"
                        ) from None
                    time.sleep(POLL_SECONDS)
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder we waited for removed the file: lock the name's file anew


__all__ = ["DEFAULT_WAIT", "check_wait", "is_held_here", "lock_path", "writing"]


def writes_run(command: str):
    """Decorator: the function's first argument (a run path or a RunDir) is written under the run's lock.

    The decorated function accepts one more keyword argument, ``lock_wait`` (seconds to wait
    for another process writing the run; default :data:`DEFAULT_WAIT`), taken here and not
    passed on: ``fold_run(run, "pt", lock_wait=30)``.
    """
    import functools

    def decorate(function):
        @functools.wraps(function)
        def wrapper(run, *args, lock_wait: float | None = None, **kwargs):
            path = getattr(run, "path", run)
            if not Path(path).is_dir():  # no run to protect: no lock file dropped beside a mistyped path or a file
                what = "not a run directory (not a directory)" if Path(path).exists() else "no such run directory"
                raise RunDirError(f"{path}: {what}")
            with writing(path, command, wait=lock_wait):
                return function(run, *args, **kwargs)

        return wrapper

    return decorate


__all__ += ["writes_run"]
