"""Client-owned shared memory for the sidecar's same-host data plane.

A region is a memfd the client creates, seals against shrinking and maps; the server never
opens it by name: the client hands the descriptor over once on the server's region socket
(``RegionLink``, protocol in ``kvtier.server.shm_socket``) with its bearer token, and names it by the
id the server answers from then on. The server drops its mapping when the client closes the
link (or exits).

Creating a region and faulting its pages in is slow, so regions are pooled and reused. A region
is free, in use for one request, or loaned: tensors viewing it were handed to the caller
(``kv_buffer`` or ``get``), and it returns to the pool only when the last of them is freed.
Loaned tensors outlive ``close()``: the mapping goes when the last of them does.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import socket
import threading
import weakref
from dataclasses import dataclass
from math import prod

import msgpack
import numpy as np
import torch

from kvtier.errors import InvalidRequest, KVTierError
from kvtier.layout import KV, KVLayout
from kvtier.wire import packed_views

try:
    import fcntl
except ImportError:  # not POSIX: only the msgpack data plane
    fcntl = None  # type: ignore[assignment]



class RegionError(KVTierError):
    """The server refused a region on its region socket (``status`` as HTTP would give it)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"region socket: {status} {error}: {message}")
        self.status, self.error, self.message = status, error, message


@dataclass(eq=False)
class Region:
    """A sealed memfd of ``size`` bytes mapped here; ``id`` once the server holds it.

    The descriptor is kept (to hand the region over again to a restarted server) and closed by
    ``close()``, or when the region is garbage-collected.
    """

    fd: int
    mm: mmap.mmap
    size: int
    id: str | None = None
    link: int = 0  # the link generation ``id`` belongs to

    def __post_init__(self) -> None:
        self._close_fd = weakref.finalize(self, os.close, self.fd)

    @classmethod
    def create(cls, size: int) -> Region:
        if not hasattr(os, "memfd_create") or not hasattr(fcntl, "F_ADD_SEALS"):
            raise InvalidRequest("use_shm needs Linux (sealed memfds); use the msgpack data plane")
        fd = os.memfd_create("kvtier-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # The server relies on the size: a region that could shrink could SIGBUS it.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, mm, size)

    def close_fd(self) -> None:
        self._close_fd()  # runs once: later calls (and collection) do nothing
        self.fd = -1

    def close(self) -> None:
        """Close the descriptor, and the mapping unless tensors still view it (then it goes
        with the last of them)."""
        self.close_fd()
        with contextlib.suppress(BufferError):
            self.mm.close()


class RegionLink:
    """One connection to the server's region socket; registrations live as long as it does.

    Thread-safe: a lock pairs each message with its answer. Blocking, but local and short (the
    server maps a descriptor and answers). The server answers every message in order, so an
    answer not read (a release sent without waiting, ``release_nowait``) is read and dropped
    before the next message's; a link that timed out or failed mid-message is ``broken`` for
    good (its late answer would be read as the next message's: a region filed under another's
    id) and the pool replaces it.
    """

    def __init__(self, path: str, token: str | None, timeout: float) -> None:
        self.path, self.token = path, token
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise InvalidRequest(f"cannot reach the sidecar's region socket {path!r} "
                                 f"({e.strerror}): the shared-memory path needs the same host "
                                 "and file system as the server (see --shm-socket)") from None
        self._lock = threading.Lock()
        self._owed = 0  # answers to messages sent without waiting, still to be read
        self.broken = False

    def _ask(self, msg: dict, fds: list[int], *, wait: bool = True) -> dict:
        msg = {**msg, "token": self.token}
        with self._lock:
            if self.broken:
                raise ConnectionError(f"region socket {self.path!r}: link broken by an earlier failure")
            try:
                socket.send_fds(self._sock, [msgpack.packb(msg)], fds)
                if not wait:
                    self._owed += 1
                    return {}
                while self._owed:
                    self._recv()
                    self._owed -= 1
                reply = self._recv()
            except OSError as e:  # ConnectionError too
                self.broken = True
                self._sock.close()
                raise ConnectionError(f"region socket {self.path!r}: {e}") from e
        d = msgpack.unpackb(reply, raw=False)
        if not d.get("ok"):
            raise RegionError(d.get("status", 500), d.get("error", "Error"), d.get("message", ""))
        return d

    def _recv(self) -> bytes:
        reply = self._sock.recv(4096)
        if not reply:
            raise ConnectionError("closed by the server")
        return reply

    def register(self, region: Region) -> str:
        return self._ask({"op": "register"}, [region.fd])["id"]

    def release_nowait(self, region_id: str) -> None:
        """Ask the server to drop ``region_id`` without waiting for its answer (read, and
        dropped, before the next message's): a caller that gave up on a stalled server must not
        wait for it a second time."""
        self._ask({"op": "release", "id": region_id}, [], wait=False)

    def close(self) -> None:
        self._sock.close()


@dataclass(slots=True, eq=False)
class Loan:
    """A pooled region the caller holds tensors of (``kv_buffer`` or ``get``): KV in the packed
    layout with ``slot_tokens`` rows per tensor, starting at address ``base``."""

    region: Region
    base: int
    layout: KVLayout
    slot_tokens: int
    spoiled: bool = False  # a put of it went unanswered: discarded, not pooled, once freed


class ShmPool:
    """Reusable client-owned regions and the link that hands them to the server.

    A region is either free, in use for one request, or loaned: tensors viewing it were handed
    to the caller, and it returns to the pool only when the last of them is freed.
    """

    def __init__(self, token: str | None = None, timeout: float = 30.0) -> None:
        self.token, self.timeout = token, timeout
        self.socket_path: str | None = None  # learned from GET /v1/kv/shm/socket
        self._link: RegionLink | None = None
        self._generation = 0
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._loans: dict[int, Loan] = {}
        self._returned: collections.deque[Loan] = collections.deque()  # freed, not yet returned
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self, nbytes: int) -> Region:
        self._take_returns()
        with self._lock:
            fits = [r for r in self._free if r.size >= nbytes]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
                return region
        region = Region.create(max(1 << 20, 1 << (max(nbytes, 1) - 1).bit_length()))
        with self._lock:
            self._all.append(region)
        return region

    def release(self, region: Region) -> None:
        with self._lock:
            if not self._closed and any(r is region for r in self._all):
                self._free.append(region)
                return
        region.close()  # the pool closed while it was lent out

    def discard(self, region: Region) -> None:
        """Never lend ``region`` again: a request naming it got no answer (a timeout, a broken
        connection, a cancelled call), so the server may still be reading or writing it, and a
        later request's KV packed into it could be stored under the earlier one's token ids
        (or overwritten by its decode). The server is asked to drop it (its mapping stays until
        that request ends); this side closes it."""
        with self._lock:
            self._all = [r for r in self._all if r is not region]
            self._free = [r for r in self._free if r is not region]
            link = self._link if region.link == self._generation else None
        if link is not None and region.id is not None:
            with contextlib.suppress(ConnectionError):
                link.release_nowait(region.id)
        region.close()

    def registered_id(self, region: Region) -> str | None:
        """``region``'s id at the server, if the current link registered it."""
        link = self._link
        return region.id if region.link == self._generation and link is not None and not link.broken else None

    def register(self, region: Region) -> str:
        """Hand ``region`` to the server (once per link); needs ``socket_path``."""
        with self._lock:
            if self._link is not None and self._link.broken:  # its registrations went with it
                self._link.close()
                self._link = None
            if self._link is None:
                if self.socket_path is None:
                    raise InvalidRequest("the region socket's path is not known yet")
                self._link = RegionLink(self.socket_path, self.token, self.timeout)
                self._generation += 1
            link, generation = self._link, self._generation
        region.id, region.link = link.register(region), generation
        return region.id

    def forget_server(self) -> None:
        """The server lost our registrations (it restarted): drop the link, learn the socket
        again and re-register each region on its next use."""
        with self._lock:
            link, self._link, self.socket_path = self._link, None, None
            self._generation += 1
        if link is not None:
            link.close()

    def loan(self, region: Region, layout: KVLayout, slot_tokens: int) -> list[tuple[torch.Tensor, ...]]:
        """KV views ``[slot_tokens, *shape]`` of ``region``; it comes back when they are freed."""
        arr = np.frombuffer(region.mm, dtype=np.uint8)
        flat = torch.from_numpy(arr)  # torch's storage keeps arr (and so the mapping) alive
        loan = Loan(region, flat.data_ptr(), layout, slot_tokens)
        with self._lock:
            self._loans[loan.base] = loan
        weakref.finalize(arr, self._return, loan)
        return packed_views(flat, layout, slot_tokens)

    def _return(self, loan: Loan) -> None:
        """The last view of a loan was freed. A finalizer: it runs wherever a garbage collection
        does, which may be inside this pool's (or its link's) own locked code on this thread,
        so it takes no lock and only queues the loan; the pool's next call (or ``close``)
        returns it. Taking the lock here hung a client whose earlier ``get`` views were freed
        by a collection while it picked a region."""
        self._returned.append(loan)
        if self._closed:  # no next call: return it now (close set the flag, then drained)
            self._take_returns()

    def _take_returns(self) -> None:
        """Return the loans whose views were freed since the last call (``_return``)."""
        while True:
            try:
                loan = self._returned.popleft()
            except IndexError:
                return
            with self._lock:
                if self._loans.get(loan.base) is loan:
                    del self._loans[loan.base]
            if loan.spoiled:
                self.discard(loan.region)
            else:
                self.release(loan.region)

    def find_loan(self, kv: KV) -> Loan | None:
        """The loaned region ``kv`` lies in, in the packed layout (each tensor's first rows);
        None if ``kv`` is anything else, so the caller packs it."""
        try:
            first = kv[0][0]
            ptr = first.data_ptr() if first.device.type == "cpu" and first.dim() else 0
        except (TypeError, IndexError, AttributeError):
            return None
        with self._lock:
            loan = self._loans.get(ptr)
        if loan is None:
            return None
        layout, n = loan.layout, first.shape[0]
        if not 0 < n <= loan.slot_tokens or len(kv) != layout.num_layers:
            return None
        dtype, addr = layout.torch_dtype, loan.base
        for layer in kv:
            if len(layer) != len(layout.tensor_shapes):
                return None
            for t, shape in zip(layer, layout.tensor_shapes, strict=True):
                if (not isinstance(t, torch.Tensor) or t.dtype != dtype or t.data_ptr() != addr
                        or tuple(t.shape) != (n, *shape) or not t.is_contiguous()):
                    return None
                addr += loan.slot_tokens * prod(shape) * dtype.itemsize
        return loan

    def close(self) -> None:
        """Close the link (the server unmaps every region) and every region not lent out.

        Tensors from ``get()`` or ``kv_buffer()`` stay readable: their region is unmapped when
        the last of them is freed. They can no longer be put without a copy.
        """
        with self._lock:
            self._closed = True
        self._take_returns()
        with self._lock:
            link, self._link = self._link, None
            lent = {id(loan.region) for loan in self._loans.values()}
            regions, self._all, self._free = self._all, [], []
        if link is not None:
            link.close()
        for region in regions:
            if id(region) in lent:
                region.close_fd()  # the mapping keeps the memory for the tensors
            else:
                region.close()
