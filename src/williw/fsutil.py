"""Atomic file writes: write ``name.<uuid>.incomplete``, fsync, rename; the temporary is removed on failure.

A reader therefore sees either the old file or the complete new one, never a half-written one
(huggingface_hub ``file_download._download_to_tmp_and_move`` does the same).
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from williw.jsonio import dumps_strict, read_file

INCOMPLETE_SUFFIX = ".incomplete"
# Test hook (fault injection): with WILLIW_TEST_KILL_AT=<point>, the process SIGKILLs itself when it reaches the
# `kill_point` of that name, so a test can crash a real process at an exact step and inspect what is left on disk
# (tests/test_split_kill.py). Unset, as in any real use, a kill point is one environment lookup.
KILL_AT_ENV = "WILLIW_TEST_KILL_AT"


@contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb", perms: int = 0o666) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit fsync it and rename it onto ``path``.

    ``perms`` (before the umask) applies from the file's creation, so a secret never exists world-readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}{INCOMPLETE_SUFFIX}")
    try:
        with open(tmp, mode, opener=lambda name, flags: os.open(name, flags, perms)) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        if exc.filename in (str(tmp), tmp):  # the user named the target, not our temporary beside it
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def kill_point(name: str) -> None:
    """Die here by SIGKILL (no handler, no cleanup: a crash) if ``WILLIW_TEST_KILL_AT`` is ``name``; a test hook."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike[str], obj: Any, perms: int = 0o666) -> None:
    """Write ``obj`` as indented strict JSON, atomically.

    Raises:
        ValueError: ``obj`` holds NaN or Infinity (which no JSON reader, williw's included, accepts); nothing is
            written.
    """
    text = dumps_strict(obj, indent=2)
    with atomic_writer(path, "w", perms) as f:
        f.write(text + "\n")


def read_json(path: str | os.PathLike[str], error: type[Exception], missing: str) -> Any:
    """Load a JSON file strictly (`williw.jsonio.read_file`): every way it fails is one ``error`` naming the file.

    Args:
        path: the file.
        error: the exception family of the caller (MetadataError, PlanError, ...).
        missing: what to say when the file does not exist, e.g. "no such plan file".
    """
    return read_file(path, error, missing)
