"""Mooncake Store backend: the KV-cache store behind Kimi's serving, via its Python client.

Install ``mooncake-transfer-engine-non-cuda`` on CPU-only hosts (the default package needs a
CUDA driver to import) and the system package ``libibverbs1`` (its shared libraries link it even
for TCP). URL: ``mooncake://MASTER_HOST:RPC_PORT?metadata=http://HOST:PORT/metadata``, optional
``&protocol=tcp|rdma&device=mlx5_0&local_hostname=IP&segment=BYTES&buffer=BYTES``; ``segment``
> 0 makes this process a storage node contributing that much memory.

Each value is stored as the block followed by a 4-byte crc32c, read with ``get_into`` into a
registered staging buffer (registered once, reused), verified, then copied out: a call that
times out may still complete later, and it must land in memory kvtier no longer hands out,
never in the caller's buffer. Mooncake keeps the first value on a duplicate put; it has no
TTL (its master evicts under memory pressure), so ``ttl_s`` is accepted and ignored.
Calls run on a small worker pool so each is bounded by ``timeout_s`` even when the client
stalls on a lost storage node.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

import torch

from kvtier.block import checksum
from kvtier.config import parse_size
from kvtier.errors import BackendUnavailable, CorruptBlock, InvalidRequest
from kvtier.tiers.remote.base import check_span

log = logging.getLogger(__name__)
T = TypeVar("T")
NOT_FOUND = -704  # Mooncake's OBJECT_NOT_FOUND
TRAILER = struct.Struct("<I")
VERIFY_PIECE = 256 * 1024  # checksum-then-copy unit: well inside a core's L2


class MooncakeBackend:
    """RemoteBackend on a Mooncake Store cluster (master + storage nodes)."""

    name = "mooncake"

    def __init__(
        self, url: str, *, timeout_s: float = 1.0, prefix: str = "kvtier:",
        ttl_s: float | None = None, workers: int = 4,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.prefix = prefix
        self.ttl_s = ttl_s  # Mooncake has no per-key TTL; see the module docstring
        self._cfg = parse_url(url)
        self._pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="kvtier-mooncake")
        self._lock = threading.Lock()
        self._store = None
        self._stages: list[torch.Tensor] = []  # free registered staging buffers
        self._registered: set[int] = set()

    # -- plumbing -------------------------------------------------------------------------------

    def _bounded(self, fn: Callable[[], T], deadline: float | None = None) -> T:
        """Run ``fn`` on the worker pool; TimeoutError at ``deadline`` (default: now + timeout)."""
        future = self._pool.submit(fn)
        try:
            return future.result(timeout=self._left(deadline))
        except cf.TimeoutError:
            raise TimeoutError(f"mooncake call exceeded {self.timeout_s}s") from None

    def _left(self, deadline: float | None) -> float:
        return self.timeout_s if deadline is None else max(0.0, deadline - time.monotonic())

    def _get_store(self):
        """Connect on first use (inside a bounded call): the master may be down at startup."""
        with self._lock:
            if self._store is None:
                from mooncake.store import MooncakeDistributedStore

                store = MooncakeDistributedStore()
                rc = store.setup(self._cfg)
                if rc != 0:
                    raise BackendUnavailable(f"mooncake setup against {self.url!r} failed: {rc}")
                self._store = store
            return self._store

    def _key(self, key: bytes) -> str:
        return self.prefix + key.hex()

    def _free_stage(self, nbytes: int) -> torch.Tensor | None:
        """The most recently used free stage that fits: it is the one still in cache."""
        with self._lock:
            for i in range(len(self._stages) - 1, -1, -1):
                if self._stages[i].numel() >= nbytes:
                    return self._stages.pop(i)
        return None

    def _take_stage(self, nbytes: int) -> torch.Tensor:
        stage = self._free_stage(nbytes)
        if stage is not None:
            return stage
        size = max(1 << (nbytes - 1).bit_length(), 1 << 20)
        stage = torch.empty(size, dtype=torch.uint8)
        rc = self._get_store().register_buffer(stage.data_ptr(), size)
        if rc != 0:
            raise BackendUnavailable(f"mooncake register_buffer of {size} bytes failed: {rc}")
        return stage

    def _give_stage(self, stage: torch.Tensor) -> None:
        with self._lock:
            self._stages.append(stage)

    # -- RemoteBackend ------------------------------------------------------------------------

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        names = [self._key(k) for k in keys]
        res = self._bounded(lambda: self._get_store().batch_is_exist(names))
        if any(r < 0 for r in res):
            raise BackendUnavailable(f"mooncake batch_is_exist failed: {res}")
        return [r == 1 for r in res]

    def put(self, key: bytes, data: memoryview) -> None:
        trailer = TRAILER.pack(checksum(data))
        rc = self._bounded(lambda: self._get_store().put_parts(self._key(key), data, trailer))
        if rc != 0:
            raise BackendUnavailable(f"mooncake put of {key.hex()} failed: {rc}")

    def get_into(self, key: bytes, out: torch.Tensor, offset: int = 0) -> int:
        nbytes = out.numel()
        deadline = time.monotonic() + self.timeout_s  # one bound for the whole call
        n, stage = self._fetch(key, offset + nbytes + TRAILER.size, deadline)
        try:
            if n == NOT_FOUND:
                raise KeyError(key)
            if n < 0:  # maybe a value longer than the span asked for: size the stage and retry
                total = self.size(key, deadline)
                if total is None:
                    raise KeyError(key)
                self._give_stage(stage)
                n, stage = self._fetch(key, total + TRAILER.size, deadline)
                if n == NOT_FOUND:
                    raise KeyError(key)
                if n < 0:
                    raise BackendUnavailable(f"mooncake get_into of {key.hex()} failed: {n}")
            if n < TRAILER.size:
                raise CorruptBlock(f"mooncake value {key.hex()} is shorter than its checksum")
            length = n - TRAILER.size
            check_span(length, offset, nbytes, key)
            data = memoryview(stage.numpy())
            if _verify_copy(data, length, out, offset) != TRAILER.unpack_from(data, length)[0]:
                raise CorruptBlock(f"mooncake value {key.hex()} failed its crc32c check")
            return nbytes
        finally:
            self._give_stage(stage)

    def _fetch(self, key: bytes, capacity: int, deadline: float) -> tuple[int, torch.Tensor]:
        """``get_into`` a staging buffer of at least ``capacity`` bytes, done by ``deadline``."""
        stage = self._free_stage(capacity)  # the common case: no call into the client
        if stage is None:
            stage = self._bounded(lambda: self._take_stage(capacity), deadline)
        name = self._key(key)
        future = self._pool.submit(
            lambda: self._get_store().get_into(name, stage.data_ptr(), stage.numel()))
        try:
            return future.result(timeout=self._left(deadline)), stage
        except cf.TimeoutError:
            # The late write lands in ``stage``; hand it back only once the call is over.
            future.add_done_callback(lambda _: self._give_stage(stage))
            raise TimeoutError(f"mooncake get_into exceeded {self.timeout_s}s") from None

    def size(self, key: bytes, deadline: float | None = None) -> int | None:
        n = self._bounded(lambda: self._get_store().get_size(self._key(key)), deadline)
        if n == NOT_FOUND:
            return None
        if n < 0:
            raise BackendUnavailable(f"mooncake get_size of {key.hex()} failed: {n}")
        return n - TRAILER.size

    def delete(self, key: bytes) -> bool:
        rc = self._bounded(lambda: self._get_store().remove(self._key(key), True))
        if rc == NOT_FOUND:
            return False
        if rc != 0:
            raise BackendUnavailable(f"mooncake remove of {key.hex()} failed: {rc}")
        return True

    def close(self) -> None:
        """Close the client once no call is running in it; a call stuck past a grace period
        leaks the client instead (closing it under a running call crashes the process)."""
        with self._lock:
            store, self._store = self._store, None
            self._stages.clear()
        drained = threading.Thread(target=self._pool.shutdown, kwargs={"cancel_futures": True},
                                   daemon=True)
        drained.start()
        drained.join(self.timeout_s * 2 + 5)
        if store is None:
            return
        if drained.is_alive():
            log.warning("mooncake call still running at close; leaving the client open")
            return
        store.close()

    def raw_store(self):
        """The Mooncake client itself, for benchmarks against the raw API."""
        return self._bounded(self._get_store)

    def register(self, tensor: torch.Tensor) -> None:
        """Register a host buffer once for zero-copy raw ``get_into``/``put_from`` (benchmarks)."""
        with self._lock:
            if tensor.data_ptr() in self._registered:
                return
            self._registered.add(tensor.data_ptr())
        self._get_store().register_buffer(tensor.data_ptr(), tensor.numel())


def _verify_copy(data: memoryview, length: int, out: torch.Tensor, offset: int) -> int:
    """crc32c of ``data[:length]``, copying ``[offset, offset + out.numel())`` into ``out``.

    Why piecewise: each piece is checksummed and then copied while still in cache, one pass
    over memory instead of two; and a plain memoryview copy, because ``torch.copy_`` of a few
    MiB wakes its intra-op threads, which on a busy host costs more than the copy.
    """
    end = offset + out.numel()
    dst = memoryview(out.numpy()).cast("B") if out.device.type == "cpu" and \
        out.is_contiguous() else None
    crc = 0
    for lo in range(0, length, VERIFY_PIECE):
        hi = min(lo + VERIFY_PIECE, length)
        crc = checksum(data[lo:hi], crc)
        a, b = max(lo, offset), min(hi, end)
        if a < b and dst is not None:
            dst[a - offset:b - offset] = data[a:b]
    if dst is None and end > offset:
        out.copy_(torch.frombuffer(data[offset:end], dtype=torch.uint8))
    return crc


def parse_url(url: str) -> dict:
    """``mooncake://host:port?metadata=...`` -> the setup dict; InvalidRequest names the problem."""
    parts = urlsplit(url or "")
    if parts.scheme != "mooncake" or not parts.hostname or not parts.port:
        raise InvalidRequest(
            f"malformed mooncake url {url!r}: expected "
            "'mooncake://MASTER_HOST:RPC_PORT?metadata=http://HOST:PORT/metadata'"
        )
    q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if "metadata" not in q:
        raise InvalidRequest(f"mooncake url {url!r} lacks ?metadata=<metadata server url>")
    return {
        "local_hostname": q.get("local_hostname", "127.0.0.1"),
        "metadata_server": q["metadata"],
        "global_segment_size": parse_size(q.get("segment", 0)),
        "local_buffer_size": parse_size(q.get("buffer", "64MiB")),
        "protocol": q.get("protocol", "tcp"),
        "rdma_devices": q.get("device", ""),
        "master_server_addr": f"{parts.hostname}:{parts.port}",
    }
