"""The shared-memory data path: the client names a region, the server reads or writes it.

Only names matching ``NAME_RE`` are opened, the transfer must fit the region and the
configured limit, and the server never unlinks a region (the client owns it).
"""

from __future__ import annotations

import _posixshmem
import contextlib
import logging
import mmap
import os
import re
from collections.abc import Iterator

from kvtier.errors import InvalidRequest
from server.errors import Forbidden, NotFound, PayloadTooLarge

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^/?[A-Za-z0-9_.-]{1,200}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name.strip("/.") == "":
        raise InvalidRequest(f"invalid shared-memory name {name!r}: expected 1-200 characters "
                             "of letters, digits, '_', '.' or '-'")
    return name.lstrip("/")


@contextlib.contextmanager
def open_region(name: str, offset: int, nbytes: int, limit: int) -> Iterator[memoryview]:
    """A writable view of ``nbytes`` at ``offset`` of region ``name``; unmapped on exit.

    Opened with ``shm_open`` + ``mmap`` rather than ``SharedMemory`` so that the resource
    tracker never adopts (and later unlinks) a region the client owns.
    """
    name = check_name(name)
    if offset < 0 or nbytes < 0:
        raise InvalidRequest(f"shared-memory offset and size must be >= 0, got {offset}, {nbytes}")
    if nbytes > limit:
        raise PayloadTooLarge(f"shared-memory transfer of {nbytes} bytes exceeds the limit {limit}")
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    except FileNotFoundError:
        raise NotFound(f"shared-memory region {name!r} does not exist") from None
    except PermissionError:
        raise Forbidden(f"shared-memory region {name!r} is not accessible to the server") from None
    except OSError as e:
        raise InvalidRequest(f"cannot open shared-memory region {name!r}: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if offset + nbytes > size:
            raise InvalidRequest(f"shared-memory region {name!r} has {size} bytes; the transfer "
                                 f"needs {nbytes} bytes at offset {offset}")
        # MAP_POPULATE: map every page in one call instead of one fault per 4 KiB page.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, size, flags=flags) if size else None
    finally:
        os.close(fd)
    if mm is None:
        yield memoryview(bytearray())
        return
    view = memoryview(mm)[offset:offset + nbytes]
    try:
        yield view
    finally:
        try:
            view.release()
            mm.close()
        except BufferError:  # a tensor still views the region; the mapping dies with it
            log.warning("shared-memory region %r still referenced; left for GC", name)
