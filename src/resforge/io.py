"""File writes that never leave a half-written file behind."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)  # read once: mkstemp's files are 0600, ours get the usual permissions
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    A crash or kill during the write leaves the previous file (if any) intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        fd = os.open(tmp, os.O_RDWR)  # on disk before the rename, or a power cut could leave an empty file
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def temp_dir(parent: str | os.PathLike, kind: str) -> Iterator[Path]:
    """A temporary folder `.<kind>.*.tmp` in `parent` for files renamed into place, removed after the block.

    A kill -9 cannot remove it: the next one of the same kind in `parent` removes those left behind.
    Each holds a lock (flock, which a dead process drops) while in use, so a folder of a command still
    running beside this one stays; sweeping and claiming hold a lock on `parent`, so no fresh folder
    is swept before it is locked.
    """
    import fcntl

    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    here = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(here, fcntl.LOCK_EX)
        for stale in parent.glob(f".{kind}.*.tmp"):
            if stale.is_dir() and not stale.is_symlink() and _unclaimed(stale):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}.", suffix=".tmp", dir=parent))
        claim = os.open(tmp, os.O_RDONLY)
        fcntl.flock(claim, fcntl.LOCK_EX)
    finally:
        os.close(here)  # closing drops the lock
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(claim)


def _unclaimed(folder: Path) -> bool:
    """No live process holds `folder`'s lock."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: str | os.PathLike, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
