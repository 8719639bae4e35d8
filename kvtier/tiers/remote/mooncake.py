"""Mooncake Store backend: the KV-cache store behind Kimi's serving, via its Python client.

Install ``mooncake-transfer-engine-non-cuda`` on CPU-only hosts (the default package needs a
CUDA driver to import) and the system package ``libibverbs1`` (its shared libraries link it even
for TCP). URL: ``mooncake://MASTER_HOST:RPC_PORT?metadata=http://HOST:PORT/metadata``, optional
``&protocol=tcp|rdma&device=mlx5_0&local_hostname=IP&segment=BYTES&buffer=BYTES``; ``segment``
> 0 makes this process a storage node contributing that much memory.

Each value is stored as the block followed by a 4-byte crc32c bound to its key (``key_bound``: a
value moved under another key fails it). Two read paths, both verifying
every byte of the value before returning:

- *direct*: a whole-value read into memory registered once with ``register`` lands straight in
  the caller's buffer (one scatter call: the block into ``out``, the trailer into a small
  registered slot); ``get_many_into`` does a prefix's blocks in one such call. A call that times
  out may still complete later, so its span of registered memory is quarantined until it does:
  a later read into those bytes waits for it first, and owners reusing the memory for anything
  else wait for ``when_settled`` (the ``RegisteredReads`` contract).
- *staged*: anything else (unregistered memory, a span at an offset) is read into a registered
  staging buffer kvtier owns, verified, then copied out; a timed-out call keeps its stage until
  it is over, so a late completion lands in memory nobody reads.

Values of ``PARALLEL_VERIFY`` bytes or more are checksummed on two cores (crc32c releases the
GIL; ``kvtier.tiers.remote.mooncake_value``). Mooncake keeps the first value on a
duplicate put; it has no TTL (its master evicts under memory pressure), so ``ttl_s`` is accepted
and ignored. Calls run on a small worker pool so each is bounded by ``timeout_s`` even when the
client stalls on a lost storage node.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

import torch

from kvtier.block import checksum
from kvtier.config import parse_size
from kvtier.errors import BackendUnavailable, CorruptBlock, InvalidRequest
from kvtier.tiers.remote.base import Call, Workers, check_span, key_bound
from kvtier.tiers.remote.mooncake_value import TRAILER, checksums, verify_copy

log = logging.getLogger(__name__)
T = TypeVar("T")
NOT_FOUND = -704  # Mooncake's OBJECT_NOT_FOUND
DIRECT_MIN = 64 * 1024  # smaller reads (block headers) are staged: a copy that small is free
TRAILER_SLOT, TRAILER_SLAB = 64, 4096  # direct reads' trailers: 64 slots per registered slab


@dataclass(frozen=True, slots=True)
class _Late:
    """A timed-out engine call that may still write into registered bytes ``[lo, hi)``."""

    lo: int
    hi: int
    call: Call


class MooncakeBackend:
    """RemoteBackend (with ``RegisteredReads``) on a Mooncake Store cluster."""

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
        self._workers = Workers(workers, "kvtier-mooncake")
        self._crc_worker = Workers(1, "kvtier-mooncake-crc")
        self._lock = threading.Lock()
        self._store = None
        self._stages: list[torch.Tensor] = []  # free registered staging buffers
        self._trailers: list[torch.Tensor] = []  # free registered trailer slots
        self._regions: list[tuple[int, int, torch.Tensor]] = []  # registered [lo, hi), owner
        self._late: list[_Late] = []  # quarantined spans of registered memory

    # -- plumbing -------------------------------------------------------------------------------

    def _bounded(self, fn: Callable[[], T], deadline: float | None = None) -> T:
        """Run ``fn`` on a worker; TimeoutError at ``deadline`` (default: now + timeout)."""
        try:
            return self._workers.run(fn, self._left(deadline))
        except TimeoutError:
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

    def _register_new(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        rc = self._get_store().register_buffer(buf.data_ptr(), nbytes)
        if rc != 0:
            raise BackendUnavailable(f"mooncake register_buffer of {nbytes} bytes failed: {rc}")
        return buf

    def _free_stage(self, nbytes: int) -> torch.Tensor | None:
        """The most recently used free stage that fits: it is the one still in cache."""
        with self._lock:
            for i in range(len(self._stages) - 1, -1, -1):
                if self._stages[i].numel() >= nbytes:
                    return self._stages.pop(i)
        return None

    def _take_stage(self, nbytes: int) -> torch.Tensor:
        stage = self._free_stage(nbytes)
        return stage if stage is not None else \
            self._register_new(max(1 << (nbytes - 1).bit_length(), 1 << 20))

    def _give_stage(self, stage: torch.Tensor) -> None:
        with self._lock:
            self._stages.append(stage)

    def _take_trailers(self, n: int, deadline: float) -> list[torch.Tensor]:
        with self._lock:
            if len(self._trailers) >= n:
                taken, self._trailers[-n:] = self._trailers[-n:], []
                return taken
        slabs = -(-n // (TRAILER_SLAB // TRAILER_SLOT))
        new = self._bounded(lambda: [self._register_new(TRAILER_SLAB) for _ in range(slabs)],
                            deadline)
        self._give_trailers([slot for slab in new for slot in slab.split(TRAILER_SLOT)])
        return self._take_trailers(n, deadline)

    def _give_trailers(self, slots: list[torch.Tensor]) -> None:
        with self._lock:
            self._trailers += slots

    def _submit_get(self, fn: Callable[[], T], deadline: float, release: Callable[[], None],
                    spans: Sequence[tuple[int, int]] = ()) -> T:
        """Run an engine read by ``deadline``; the caller releases its buffers on return.

        On timeout a call that never started is cancelled (``release`` at once); a running one
        gets ``release`` only once it is over, and its ``spans`` of registered memory stay
        quarantined until then. If the call raised, it is over: ``release`` at once.
        """
        call = self._workers.submit(fn)
        if call.wait(self._left(deadline)):
            try:
                return call.result()
            except BaseException:
                release()  # the call is over: nothing writes into its buffers any more
                raise
        if call.cancel():
            release()
        else:
            late = [_Late(lo, hi, call) for lo, hi in spans]
            with self._lock:
                self._late += late
            call.add_done_callback(lambda _: self._settle(late, release))
        raise TimeoutError(f"mooncake get exceeded {self.timeout_s}s")

    def _settle(self, late: list[_Late], release: Callable[[], None]) -> None:
        with self._lock:
            for entry in late:
                self._late.remove(entry)
        release()

    def _late_into(self, tensor: torch.Tensor) -> list[Call]:
        if not self._late:  # the common case: no lock, no list
            return []
        lo = tensor.data_ptr()
        hi = lo + tensor.numel() * tensor.element_size()
        with self._lock:
            return list({id(e.call): e.call for e in self._late if e.lo < hi and lo < e.hi}.values())

    def _wait_late(self, outs: Sequence[torch.Tensor], deadline: float) -> None:
        """Before writing into ``outs``: wait for late calls still writing there."""
        for call in (c for out in outs for c in self._late_into(out)):
            if not call.wait(self._left(deadline)):
                raise TimeoutError("a timed-out mooncake read into this buffer is still running")

    def _direct(self, out: torch.Tensor) -> bool:
        """True when ``out`` may be written by the engine: registered host memory, big enough."""
        if out.device.type != "cpu" or not out.is_contiguous() or out.numel() < DIRECT_MIN:
            return False
        lo = out.data_ptr()
        hi = lo + out.numel() * out.element_size()
        with self._lock:
            return any(a <= lo and hi <= b for a, b, _ in self._regions)

    # -- RegisteredReads ------------------------------------------------------------------------

    def register(self, tensor: torch.Tensor) -> None:
        """Register host memory once for direct reads (and raw ``get_into``/``put_from``)."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise InvalidRequest(
                f"mooncake can register only contiguous host memory, got a "
                f"{'' if tensor.is_contiguous() else 'non-contiguous '}{tensor.device} tensor")
        lo = tensor.data_ptr()
        hi = lo + tensor.numel() * tensor.element_size()
        with self._lock:
            if any(a <= lo and hi <= b for a, b, _ in self._regions):
                return
        rc = self._bounded(lambda: self._get_store().register_buffer(lo, hi - lo))
        if rc != 0:
            raise BackendUnavailable(f"mooncake register_buffer of {hi - lo} bytes failed: {rc}")
        with self._lock:
            self._regions.append((lo, hi, tensor))

    def unregister(self, tensor: torch.Tensor) -> bool:
        lo = tensor.data_ptr()
        with self._lock:
            region = next((r for r in self._regions if r[0] == lo), None)
        if region is None or self._late_into(region[2]):
            return False
        with self._lock:
            self._regions.remove(region)
        rc = self._bounded(lambda: self._get_store().unregister_buffer(lo))
        return rc == 0

    def when_settled(self, tensor: torch.Tensor, fn: Callable[[], None]) -> None:
        late = self._late_into(tensor)
        if not late:
            fn()
            return
        left = [len(late)]
        lock = threading.Lock()

        def one_done(_: Call) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                fn()

        for call in late:  # runs after ``_settle``: it was added first
            call.add_done_callback(one_done)

    def get_many_into(self, keys: Sequence[bytes],
                      outs: Sequence[torch.Tensor]) -> list[int | Exception]:
        if len(keys) != len(outs):
            raise InvalidRequest(f"get_many_into needs one out per key: {len(keys)} keys, "
                                 f"{len(outs)} outs")
        deadline = time.monotonic() + self.timeout_s  # one bound for the whole prefix
        self._wait_late(outs, deadline)
        direct = [j for j, out in enumerate(outs) if self._direct(out)]
        results: list[int | Exception | None] = [None] * len(keys)
        if direct:
            got = self._get_direct([keys[j] for j in direct], [outs[j] for j in direct], deadline)
            for j, res in zip(direct, got, strict=True):
                results[j] = res
        done: list[int | Exception] = []
        for j, res in enumerate(results):
            if res is None:  # not registered, or not a whole value: the staged path says why
                try:
                    res = self._get_staged(keys[j], outs[j], 0, deadline)
                except (KeyError, CorruptBlock, InvalidRequest) as e:
                    res = e
            done.append(res)
        return done

    def _get_direct(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor],
                    deadline: float) -> list[int | Exception | None]:
        """Whole values straight into registered ``outs``, one engine call; per key the count,
        the exception, or None where the value is not exactly ``out``'s size."""
        slots = self._take_trailers(len(keys), deadline)
        names = [self._key(k) for k in keys]
        ptrs = [[o.data_ptr(), s.data_ptr()] for o, s in zip(outs, slots, strict=True)]
        sizes = [[o.numel(), TRAILER.size] for o in outs]
        codes = self._submit_get(  # on timeout the trailers wait for the late call
            lambda: self._get_store().batch_get_into_multi_buffers(names, ptrs, sizes),
            deadline, lambda: self._give_trailers(slots),
            [(p[0], p[0] + o.numel()) for p, o in zip(ptrs, outs, strict=True)])
        try:
            stored = [TRAILER.unpack_from(s.numpy().data)[0] for s in slots]
        finally:
            self._give_trailers(slots)
        results: list[int | Exception | None] = [None] * len(keys)
        ok = []
        for j, (n, out) in enumerate(zip(codes, outs, strict=True)):
            if n == NOT_FOUND:
                results[j] = KeyError(keys[j])
            elif n == out.numel() + TRAILER.size:
                ok.append(j)
        crcs = checksums([outs[j].numpy().data for j in ok], self._crc_worker)
        for j, crc in zip(ok, crcs, strict=True):
            results[j] = outs[j].numel() if key_bound(crc, keys[j], outs[j].numel()) == stored[j] else \
                CorruptBlock(f"mooncake value {keys[j].hex()} failed its crc32c check")
        return results

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
        trailer = TRAILER.pack(key_bound(checksum(data), key, data.nbytes))
        rc = self._bounded(lambda: self._get_store().put_parts(self._key(key), data, trailer))
        if rc != 0:
            raise BackendUnavailable(f"mooncake put of {key.hex()} failed: {rc}")

    def get_into(self, key: bytes, out: torch.Tensor, offset: int = 0) -> int:
        deadline = time.monotonic() + self.timeout_s  # one bound for the whole call
        self._wait_late([out], deadline)
        if offset == 0 and self._direct(out):
            res = self._get_direct([key], [out], deadline)[0]
            if isinstance(res, Exception):
                raise res
            if res is not None:
                return res
        return self._get_staged(key, out, offset, deadline)

    def _get_staged(self, key: bytes, out: torch.Tensor, offset: int, deadline: float) -> int:
        nbytes = out.numel()
        stage: torch.Tensor | None
        n, stage = self._fetch(key, offset + nbytes + TRAILER.size, deadline)
        try:
            if n == NOT_FOUND:
                raise KeyError(key)
            if n < 0:  # maybe a value longer than the span asked for: size the stage and retry
                total = self.size(key, deadline)
                if total is None:
                    raise KeyError(key)
                self._give_stage(stage)
                stage = None  # given back: a failed retry must not give it twice
                n, stage = self._fetch(key, total + TRAILER.size, deadline)
                if n == NOT_FOUND:
                    raise KeyError(key)
                if n < 0:
                    raise BackendUnavailable(f"mooncake get_into of {key.hex()} failed: {n}")
            if n < TRAILER.size:
                raise CorruptBlock(f"mooncake value {key.hex()} is shorter than its checksum")
            length = n - TRAILER.size
            check_span(length, offset, nbytes, key)
            data = stage.numpy().data
            if key_bound(verify_copy(data, length, out, offset), key, length) != TRAILER.unpack_from(data, length)[0]:
                raise CorruptBlock(f"mooncake value {key.hex()} failed its crc32c check")
            return nbytes
        finally:
            if stage is not None:
                self._give_stage(stage)

    def _fetch(self, key: bytes, capacity: int, deadline: float) -> tuple[int, torch.Tensor]:
        """``get_into`` a staging buffer of at least ``capacity`` bytes, done by ``deadline``.
        A late write lands in the stage, which is handed back only once the call is over."""
        stage = self._free_stage(capacity)  # the common case: no call into the client
        if stage is None:
            stage = self._bounded(lambda: self._take_stage(capacity), deadline)
        name = self._key(key)
        n = self._submit_get(
            lambda: self._get_store().get_into(name, stage.data_ptr(), stage.numel()),
            deadline, lambda: self._give_stage(stage))
        return n, stage

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
        leaks the client (and the memory registered with it) instead: closing it under a
        running call crashes the process."""
        with self._lock:
            store, self._store = self._store, None
            self._stages.clear()
            self._trailers.clear()
        self._crc_worker.shutdown(0)
        drained = self._workers.shutdown(self.timeout_s * 2 + 5)
        if store is None:
            return
        if not drained:
            log.warning("mooncake call still running at close; leaving the client open")
            return
        store.close()
        with self._lock:
            self._regions.clear()

    def raw_store(self):
        """The Mooncake client itself, for benchmarks against the raw API."""
        return self._bounded(self._get_store)


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
