"""Shared-memory regions the clients handed over, bound to their tenant.

Why no tenant can reach another's memory through the server:

- **The server opens nothing by name.** A region exists for the server only as a file
  descriptor its owner sent over the region socket (``kvtier.server.shm_socket``: ``SCM_RIGHTS``), in
  the same message as the owner's bearer token. The server maps that descriptor, closes it and
  files the mapping under a fresh random id (128 bits) *and the tenant that token belongs to*.
  A request can only name a region id; no path, no ``/dev/shm`` name, nothing the server would
  open with its own privileges. So the server touches exactly the memory its callers could
  already touch themselves, and each tenant only its own.
- **Every HTTP use checks the tenant.** ``RegionTable.open`` answers an id registered by another
  tenant exactly like an unknown id (404), so ids are not even confirmed across tenants.
- **Regions die with their owner's connection.** The server keeps a mapping until the owner
  releases it or closes its socket connection (a process that exits closes it), and never keeps
  a mapping under a request that is still using it.
- **A region cannot crash the server.** The descriptor must be a memfd sealed against shrinking
  (``F_SEAL_SHRINK``): a mapped file that shrinks makes every access past its end a SIGBUS in
  the server. Its access mode must allow reading and writing.
- **A request touches at most ``--max-kv-bytes`` of it.** Mapping reserves address space only;
  the server faults in (``MADV_POPULATE_WRITE``) just the transfer window of each request, so a
  sparse 2 GiB region costs the server nothing but the bytes moved.

Mapping costs about as much as copying (``MAP_POPULATE`` of 128 MiB took ~13 ms on the
development VM, as long as copying it), so a region stays mapped for its whole registration and
each window is faulted in once; a request then costs a dictionary lookup.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from kvtier.errors import InvalidRequest, StorageFull
from kvtier.server.errors import NotFound, PayloadTooLarge

log = logging.getLogger(__name__)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14; Python >= 3.13 names it
CHUNK = 2 << 20  # a whole 2 MiB chunk of a region is faulted in once per registration
MAX_REGIONS_PER_TENANT = 1024
_populate_works = True


class UnknownRegion(NotFound):
    """A region id this tenant never registered (or released, or whose connection closed)."""


@dataclass(slots=True, eq=False)
class Region:
    """One handed-over region: its mapping, owner and the chunks already faulted in."""

    id: str
    tenant: str
    conn: int  # the socket connection that registered it; it goes when that closes
    mm: mmap.mmap
    size: int
    populated: set[int] = field(default_factory=set)
    users: int = 0
    released: bool = False  # out of the table; unmapped when the last user leaves


def _check_fd(fd: int) -> int:
    """The size of the memfd ``fd``, or InvalidRequest saying what it must be."""
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS) if stat.S_ISREG(st.st_mode) else 0
    except OSError:
        st, seals = None, 0
    if st is None or not seals & fcntl.F_SEAL_SHRINK:
        raise InvalidRequest("a shared-memory region must be a memfd (memfd_create with "
                             "MFD_ALLOW_SEALING) sealed with F_SEAL_SHRINK")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise InvalidRequest("a shared-memory region must be open for reading and writing")
    if st.st_size <= 0:
        raise InvalidRequest("a shared-memory region must not be empty")
    return st.st_size


class RegionTable:
    """Handed-over regions by id, each bound to a tenant; thread-safe.

    ``register`` maps a descriptor (the caller closes it); ``open`` lends a view of a window to
    one request; ``release``/``release_connection`` drop registrations (a mapping in use is
    unmapped by its last user). Errors: 404 ``UnknownRegion`` for an id this tenant does not
    hold, 400 for a window outside the region, 413 for one over the limit.
    """

    def __init__(self, max_per_tenant: int = MAX_REGIONS_PER_TENANT) -> None:
        self.max_per_tenant = max_per_tenant
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._regions)

    def register(self, tenant: str, fd: int, conn: int) -> Region:
        """Map memfd ``fd`` (whole, populating nothing) for ``tenant``; ``fd`` stays the caller's."""
        size = _check_fd(fd)
        with self._lock:
            held = sum(1 for r in self._regions.values() if r.tenant == tenant)
        if held >= self.max_per_tenant:
            raise InvalidRequest(f"this tenant already holds {held} shared-memory regions, the "
                                 f"limit: release some (or close clients) first")
        try:
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise InvalidRequest(f"cannot map a shared-memory region of {size} bytes: {e}") from None
        region = Region(secrets.token_hex(16), tenant, conn, mm, size)
        with self._lock:
            self._regions[region.id] = region
        return region

    def release(self, tenant: str, region_id: object) -> None:
        with self._lock:
            region = self._find_locked(tenant, region_id)
            done = self._drop_locked(region)
        if done:
            _unmap(done)

    def release_connection(self, conn: int) -> int:
        """Drop every region registered over connection ``conn``; returns how many."""
        with self._lock:
            mine = [r for r in self._regions.values() if r.conn == conn]
            done = [self._drop_locked(r) for r in mine]
        for r in done:
            if r:
                _unmap(r)
        return len(mine)

    @contextlib.contextmanager
    def open(self, tenant: str, region_id: str, offset: int, nbytes: int, limit: int) -> Iterator[memoryview]:
        """A writable view of ``nbytes`` at ``offset`` of ``tenant``'s region ``region_id``."""
        if offset < 0 or nbytes < 0:
            raise InvalidRequest(f"shared-memory offset and size must be >= 0, got {offset}, {nbytes}")
        if nbytes > limit:
            raise PayloadTooLarge(f"shared-memory transfer of {nbytes} bytes exceeds the limit {limit}")
        with self._lock:
            region = self._find_locked(tenant, region_id)
            if offset + nbytes > region.size:
                raise InvalidRequest(f"shared-memory region {region_id!r} has {region.size} bytes; "
                                     f"the transfer needs {nbytes} bytes at offset {offset}")
            region.users += 1
        view = None
        try:
            _populate(region, offset, nbytes)
            view = memoryview(region.mm)[offset:offset + nbytes]
            yield view
        finally:
            if view is not None:
                try:
                    view.release()
                except BufferError:  # tensors of a failed request still view it: they go with it
                    log.debug("a view of shared-memory region %s outlives its request", region.id)
            with self._lock:
                region.users -= 1
                done = region.released and region.users == 0
            if done:
                _unmap(region)

    def close(self) -> None:
        """Drop every registration (mappings in use go when their request ends)."""
        with self._lock:
            done = [self._drop_locked(r) for r in list(self._regions.values())]
        for r in done:
            if r:
                _unmap(r)

    def _find_locked(self, tenant: str, region_id: object) -> Region:
        region = self._regions.get(region_id) if isinstance(region_id, str) else None
        if region is None or region.tenant != tenant:  # another tenant's id: as if unknown
            raise UnknownRegion(f"unknown shared-memory region id {str(region_id)[:64]!r}: hand the "
                                "region over on the region socket first (GET /v1/kv/shm/socket)")
        return region

    def _drop_locked(self, region: Region) -> Region | None:
        """Out of the table; returned if nobody uses it (the caller unmaps it outside the lock)."""
        self._regions.pop(region.id, None)
        region.released = True
        return region if region.users == 0 else None


def _populate(region: Region, offset: int, nbytes: int) -> None:
    """Fault in the window's pages not faulted in yet: one call instead of a page fault per
    4 KiB page, never outside the window, and each whole chunk once per registration.

    Running out of memory here is a 507, not a fault that kills the server later.
    """
    global _populate_works
    if nbytes == 0 or not _populate_works:
        return
    lo, hi = offset - offset % mmap.PAGESIZE, offset + nbytes
    spans: list[list[int]] = []
    whole: list[int] = []
    for c in range(lo // CHUNK, (hi - 1) // CHUNK + 1):
        if c in region.populated:
            continue
        c_lo, c_hi = c * CHUNK, min((c + 1) * CHUNK, region.size)
        s, e = max(lo, c_lo), min(hi, c_hi)
        if (s, e) == (c_lo, c_hi):
            whole.append(c)
        if spans and spans[-1][1] == s:
            spans[-1][1] = e
        else:
            spans.append([s, e])
    for s, e in spans:
        try:
            region.mm.madvise(MADV_POPULATE_WRITE, s, e - s)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise StorageFull(f"cannot fault in {e - s} bytes of shared-memory region "
                                  f"{region.id!r}: {exc.strerror}") from None
            log.info("MADV_POPULATE_WRITE unsupported (kernel < 5.14): pages fault in on first touch")
            _populate_works = False
            return
    region.populated.update(whole)


def _unmap(region: Region) -> None:
    try:
        region.mm.close()
    except BufferError:  # a tensor of the last request still views it: unmapped when it goes
        log.debug("shared-memory region %s still viewed; unmapped by the garbage collector", region.id)
