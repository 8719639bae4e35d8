"""The shared-memory data path: the client names a region, the server reads or writes it.

Only names matching ``NAME_RE`` are opened, the transfer must fit the region and the
configured limit, and the server never unlinks a region (the client owns it).

Mapping a region costs more than the copy it saves (``MAP_POPULATE`` of 128 MiB takes ~13 ms
on the development VM, as long as copying it), so ``RegionCache`` keeps each region mapped
between requests. It re-checks the name on every request (a region unlinked and re-created
under the same name, or resized, is mapped afresh) and drops a mapping as soon as the client
unlinks the region, so the server never keeps a client's memory alive.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import logging
import mmap
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from kvtier.errors import InvalidRequest
from server.errors import Forbidden, NotFound, PayloadTooLarge

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^/?[A-Za-z0-9_.-]{1,200}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name.strip("/.") == "":
        raise InvalidRequest(f"invalid shared-memory name {name!r}: expected 1-200 characters "
                             "of letters, digits, '_', '.' or '-'")
    return name.lstrip("/")


def _check_transfer(name: str, offset: int, nbytes: int, limit: int) -> str:
    name = check_name(name)
    if offset < 0 or nbytes < 0:
        raise InvalidRequest(f"shared-memory offset and size must be >= 0, got {offset}, {nbytes}")
    if nbytes > limit:
        raise PayloadTooLarge(f"shared-memory transfer of {nbytes} bytes exceeds the limit {limit}")
    return name


def _shm_open(name: str) -> int:
    try:
        return _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    except FileNotFoundError:
        raise NotFound(f"shared-memory region {name!r} does not exist") from None
    except PermissionError:
        raise Forbidden(f"shared-memory region {name!r} is not accessible to the server") from None
    except OSError as e:
        raise InvalidRequest(f"cannot open shared-memory region {name!r}: {e.strerror}") from None


def _check_fits(name: str, size: int, offset: int, nbytes: int) -> None:
    if offset + nbytes > size:
        raise InvalidRequest(f"shared-memory region {name!r} has {size} bytes; the transfer "
                             f"needs {nbytes} bytes at offset {offset}")


def _map(fd: int, size: int) -> mmap.mmap | None:
    # MAP_POPULATE: map every page in one call instead of one fault per 4 KiB page.
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags) if size else None


def _close_map(mm: mmap.mmap | None, name: str) -> None:
    if mm is None:
        return
    try:
        mm.close()
    except BufferError:  # a tensor still views the region; the mapping dies with it
        log.warning("shared-memory region %r still referenced; left for GC", name)


@contextlib.contextmanager
def open_region(name: str, offset: int, nbytes: int, limit: int) -> Iterator[memoryview]:
    """A writable view of ``nbytes`` at ``offset`` of region ``name``; unmapped on exit.

    Opened with ``shm_open`` + ``mmap`` rather than ``SharedMemory`` so that the resource
    tracker never adopts (and later unlinks) a region the client owns.
    """
    name = _check_transfer(name, offset, nbytes, limit)
    fd = _shm_open(name)
    try:
        size = os.fstat(fd).st_size
        _check_fits(name, size, offset, nbytes)
        mm = _map(fd, size)
    finally:
        os.close(fd)
    if mm is None:
        yield memoryview(bytearray())
        return
    view = memoryview(mm)[offset:offset + nbytes]
    try:
        yield view
    finally:
        view.release()
        _close_map(mm, name)


@dataclass(slots=True, eq=False)
class _Mapping:
    """One cached mapping; ``fd`` stays open so ``st_nlink`` tells when the client unlinked it."""

    name: str
    fd: int
    ident: tuple[int, int, int]  # st_dev, st_ino, st_size when mapped
    mm: mmap.mmap | None
    users: int = 0
    dropped: bool = False  # out of the table; closed when the last user leaves


class RegionCache:
    """Client regions kept mapped between requests; thread-safe.

    ``open()`` has ``open_region``'s contract (same checks, same errors). At most
    ``max_regions`` mappings are kept (least recently used dropped first); a mapping whose
    region was unlinked is dropped by the next ``open()`` or by the sweeper thread within
    ``sweep_s`` seconds, whichever comes first. A mapping in use is never unmapped under its user.
    """

    def __init__(self, max_regions: int = 32, sweep_s: float = 1.0) -> None:
        self.max_regions, self.sweep_s = max_regions, sweep_s
        self._maps: OrderedDict[str, _Mapping] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sweeper: threading.Thread | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)

    @contextlib.contextmanager
    def open(self, name: str, offset: int, nbytes: int, limit: int) -> Iterator[memoryview]:
        """A writable view of ``nbytes`` at ``offset`` of region ``name`` (see class docstring)."""
        name = _check_transfer(name, offset, nbytes, limit)
        m = self._acquire(name, offset, nbytes)
        view = memoryview(bytearray()) if m.mm is None else memoryview(m.mm)[offset:offset + nbytes]
        try:
            yield view
        finally:
            view.release()
            with self._lock:
                m.users -= 1
                close = m.dropped and m.users == 0
            if close:
                self._finish(m)

    def _acquire(self, name: str, offset: int, nbytes: int) -> _Mapping:
        fd = _shm_open(name)
        try:
            st = os.fstat(fd)
            _check_fits(name, st.st_size, offset, nbytes)
        except BaseException:
            os.close(fd)
            raise
        ident = (st.st_dev, st.st_ino, st.st_size)
        with self._lock:
            doomed = self._sweep_locked()
            m = self._maps.get(name)
            if m is not None and m.ident == ident:
                self._maps.move_to_end(name)
                m.users += 1
            elif m is not None:  # unlinked and re-created, or resized: map it afresh
                doomed.append(self._drop_locked(m))
                m = None
        for d in doomed:
            if d is not None:
                self._finish(d)
        if m is not None:
            os.close(fd)
            return m
        try:
            mm = _map(fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        m = _Mapping(name, fd, ident, mm, users=1)
        with self._lock:
            if self._closed.is_set() or name in self._maps:  # lost a race: serve uncached
                m.dropped = True
                return m
            self._maps[name] = m
            doomed = [self._drop_locked(self._maps[k]) for k in list(self._maps)[:-self.max_regions]]
            self._start_sweeper_locked()
        for d in doomed:
            if d is not None:
                self._finish(d)
        return m

    def _drop_locked(self, m: _Mapping) -> _Mapping | None:
        """Take ``m`` out of the table; returns it if nobody uses it (the caller closes it)."""
        self._maps.pop(m.name, None)
        m.dropped = True
        return m if m.users == 0 else None

    def _sweep_locked(self) -> list[_Mapping | None]:
        gone = []
        for m in list(self._maps.values()):
            try:
                unlinked = os.fstat(m.fd).st_nlink == 0
            except OSError:
                unlinked = True
            if unlinked:
                gone.append(self._drop_locked(m))
        return gone

    def _finish(self, m: _Mapping) -> None:
        _close_map(m.mm, m.name)
        with contextlib.suppress(OSError):
            os.close(m.fd)

    def _start_sweeper_locked(self) -> None:
        if self._sweeper is None or not self._sweeper.is_alive():
            self._sweeper = threading.Thread(target=self._sweep_loop, name="kvtier-shm-sweeper", daemon=True)
            self._sweeper.start()

    def _sweep_loop(self) -> None:
        while not self._closed.wait(self.sweep_s):
            with self._lock:
                doomed = self._sweep_locked()
                idle = not self._maps
                if idle:
                    self._sweeper = None
            for d in doomed:
                if d is not None:
                    self._finish(d)
            if idle:
                return

    def close(self) -> None:
        """Unmap every region nobody is using (those in use are unmapped by their last user)."""
        self._closed.set()
        with self._lock:
            doomed = [self._drop_locked(m) for m in list(self._maps.values())]
        for d in doomed:
            if d is not None:
                self._finish(d)


def region_cache(state: object) -> RegionCache:
    """The app's ``RegionCache`` (``app.state.shm_regions``), created on first use."""
    cache = getattr(state, "shm_regions", None)
    if cache is None:
        cache = RegionCache()
        state.shm_regions = cache  # type: ignore[attr-defined]
    return cache
