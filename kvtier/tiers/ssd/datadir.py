"""The SSD tier's data directory: format-version file, layout and the single-owner lock.

::

    <path>/KVTIER_FORMAT     {"format": "kvtier-ssd", "version": 2}
    <path>/LOCK              flock'ed by the one process that has the directory open
    <path>/index/            LMDB environment (data.mdb, lock.mdb)
    <path>/segments/         append-only segment files, 00000001.seg, ...

An empty or absent directory is initialised; anything else that is not ours, or is of a newer
format version, is refused with a one-line ``DataDirError`` rather than guessed at.

Versions: 1 — index records checksum the payload alone; 2 — the checksums are seeded with the
block's key (``index.seal``). A version-1 directory is migrated when opened (``migrate``), and
its version file rewritten only once every record is.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path

from kvtier.errors import DataDirError

FORMAT = "kvtier-ssd"
VERSION = 2
VERSION_FILE = "KVTIER_FORMAT"
LOCK_FILE = "LOCK"
# A process that just died can leave its lock held a moment longer: a child it was starting (the
# index check) holds a copy of the lock's descriptor until it execs. Wait that out, briefly.
LOCK_WAIT_S = 1.0


def open_data_dir(path: str | os.PathLike) -> tuple[Path, int]:
    """Validate (or initialise) ``path`` and lock it; returns (path, lock fd).

    Raises DataDirError naming the directory and the problem.
    """
    root = Path(path)
    problem = "cannot be created"  # what an OSError means at each step
    try:
        if root.exists() and not root.is_dir():
            raise DataDirError(f"data directory {root}: exists but is not a directory")
        root.mkdir(parents=True, exist_ok=True)
        problem = "unreadable"
        marker = root / VERSION_FILE
        if marker.exists() or marker.is_symlink():
            _check_version(root, marker)
        else:
            # a version file half-written by a process killed while initialising is ours
            others = sorted(set(os.listdir(root)) - {VERSION_FILE + ".tmp"})
            if others:
                raise DataDirError(
                    f"data directory {root}: not a kvtier data directory (no {VERSION_FILE} "
                    f"file, but {len(others)} other entries such as {others[0]!r})")
            problem = "unwritable"
            write_version(root, VERSION)
        problem = "unwritable"
        (root / "segments").mkdir(exist_ok=True)
        (root / "index").mkdir(exist_ok=True)
        lock_fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except DataDirError:
        raise
    except OSError as e:
        raise DataDirError(f"data directory {root}: {problem} ({e.strerror or e})") from None
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return root, lock_fd
        except OSError as e:
            busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            if busy and time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            os.close(lock_fd)
            if busy:
                raise DataDirError(f"data directory {root}: in use by another process") from None
            raise DataDirError(f"data directory {root}: cannot lock ({e.strerror})") from None


def format_version(root: Path) -> int:
    """The format version of an opened data directory (``open_data_dir`` checked the file)."""
    return json.loads((root / VERSION_FILE).read_bytes())["version"]


def _check_version(root: Path, marker: Path) -> None:
    try:
        info = json.loads(marker.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise DataDirError(
            f"data directory {root}: not a kvtier data directory ({VERSION_FILE} is not a "
            "kvtier format file)") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataDirError(
            f"data directory {root}: not a kvtier data directory ({VERSION_FILE} names format "
            f"{info.get('format') if isinstance(info, dict) else info!r}, expected {FORMAT!r})")
    version = info.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DataDirError(f"data directory {root}: unknown format version {version!r}")
    if version > VERSION:
        raise DataDirError(
            f"data directory {root}: format version {version} is newer than this kvtier "
            f"supports ({VERSION}); upgrade kvtier or use another directory")


def write_version(root: Path, version: int) -> None:
    """Write the version file durably (a new file, fsync'd, renamed over, directory fsync'd)."""
    tmp = root / (VERSION_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps({"format": FORMAT, "version": version}).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, root / VERSION_FILE)
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    """Make a created, renamed or removed directory entry durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
