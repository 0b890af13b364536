"""One writer at a time per run: an exclusive ``flock`` on a lock file beside the run directory.

Every command that changes a run (fold, export, verify -- which appends its results --,
bench when it makes comparison models, train when it replaces a run) holds the lock
for as long as it writes; a second writer waits up to ``wait`` seconds (default 0: it
stops at once) and then stops with one line naming the holder. The wait is a parameter,
never ambient state: ``writing(run, command, wait=...)``, or the ``lock_wait`` keyword that
every function decorated with :func:`writes_run` accepts (the CLI hands ``mmexport
--lock-wait SECONDS`` down so). The lock file lives *beside* the run (``.RUN.lock``), so
it survives the run directory being replaced. Within one process the lock is re-entrant
(a command that calls another writer keeps the lock it has). Readers (inspect, the
runtime) need no lock: every manifest write is an atomic replace, so a reader sees the
old or the new manifest, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Iterator

from mmexport.errors import RunDirError

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


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"{info.get('command', '?')} (pid {info.get('pid', '?')}, since {info.get('since', '?')})"
    except (OSError, ValueError):
        return "another mmexport command"


def is_held_here(run_path: str | os.PathLike[str]) -> bool:
    return str(lock_path(run_path)) in _HELD


@contextlib.contextmanager
def writing(run_path: str | os.PathLike[str], command: str, wait: float | None = None) -> Iterator[None]:
    """Hold the run's write lock for the duration of the block (re-entrant within this process).

    ``wait``: seconds to wait for another process writing the run (``None``: :data:`DEFAULT_WAIT`);
    a re-entered lock is already held, so it never waits.
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
    if not path.parent.is_dir():
        raise RunDirError(f"{path.parent}: no such directory")
    wait = check_wait(wait)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunDirError(f"{path}: cannot create the run's lock file ({exc.strerror})") from None
    deadline = time.monotonic() + wait
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
                        f"{Path(run_path).name}: another command is writing this run: {_holder(path)}{waited}; "
                        "retry when it is done, or wait for it with `mmexport --lock-wait SECONDS ...`"
                    ) from None
                time.sleep(POLL_SECONDS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command,
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        _HELD[key] = [fd, 1]
        _remove_orphans(Path(run_path))
        try:
            yield
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


__all__ = ["DEFAULT_WAIT", "check_wait", "is_held_here", "lock_path", "writing"]


def _remove_orphans(run: Path) -> None:
    """Temporary files a killed writer left (``.<name>.<random>.tmp``, ``.trt-build-*``): with the lock held,
    no other writer can own them."""
    import shutil

    if not run.is_dir():
        return
    for leftover in list(run.rglob(".*.tmp")) + list(run.glob(".trt-build-*")):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()


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
            if not Path(path).is_dir():  # no run to protect: no lock file dropped beside a mistyped path
                raise RunDirError(f"{path}: no such run directory")
            with writing(path, command, wait=lock_wait):
                return function(run, *args, **kwargs)

        return wrapper

    return decorate


__all__ += ["writes_run"]
