"""Namespace records in the shared remote tier: how a second instance finds a namespace.

A block's key chains from its namespace's digest (name, model, layout, codec, block size,
tenant), so an instance that shares a remote tier but never saw a namespace cannot even compute
the keys of its blocks. Each instance therefore publishes the record of every namespace it
stores into (its ``Namespace.to_dict()``) beside the blocks, under a key derived from the
namespace's name alone; an instance that meets an unknown name looks the record up once and
registers it locally, so sharing takes no registration call.

Records are first-writer-wins like blocks: dropping a namespace deletes its record, so a
namespace re-created with other settings publishes afresh. A record that fails to decode is
ignored (a miss). Lookups of names nobody published are remembered for ``MISS_TTL_S`` so a
stream of unknown names does not cost a network round trip each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time

import torch

from kvtier.errors import KVTierError
from kvtier.namespaces import Namespace
from kvtier.tiers.base import BlockMeta, Tier

log = logging.getLogger(__name__)

MISS_TTL_S = 1.0
MAX_RECORD_BYTES = 64 * 1024


def record_key(name: str) -> bytes:
    """The remote key of namespace ``name``'s record (disjoint from every block key)."""
    return hashlib.blake2b(name.encode(), digest_size=16, person=b"kvtier-nsrec-v1").digest()


class SharedNamespaces:
    """Publishes and finds namespace records in a shared tier. Thread-safe."""

    def __init__(self, tier: Tier, clock=time.monotonic) -> None:
        self.tier = tier
        self._clock = clock
        self._lock = threading.Lock()
        self._published: set[tuple[str, bytes]] = set()  # (name, digest) already published
        self._misses: dict[str, float] = {}  # name -> when a lookup last found nothing

    def publish(self, ns: Namespace) -> None:
        """Share ``ns``'s record (once per process and digest); failures only cost sharing."""
        if ns.layout is None:
            return
        mark = (ns.name, ns.digest)
        with self._lock:
            if mark in self._published:
                return
            self._published.add(mark)
            self._misses.pop(ns.name, None)
        record = json.dumps(ns.to_dict(), sort_keys=True).encode()
        try:
            self.tier.put(record_key(ns.name), memoryview(record),
                          BlockMeta(ns.name, None, 0, "none", time.time()))
        except KVTierError as e:
            with self._lock:
                self._published.discard(mark)  # try again with the next put
            log.debug("could not publish namespace %r to the %s tier: %s", ns.name, self.tier.name, e)

    def find(self, name: str) -> Namespace | None:
        """The record another instance published for ``name``, or None."""
        with self._lock:
            missed = self._misses.get(name)
            if missed is not None and self._clock() - missed < MISS_TTL_S:
                return None
        ns = self._fetch(name)
        with self._lock:
            if ns is None:
                self._misses[name] = self._clock()
                if len(self._misses) > 10_000:
                    self._misses.clear()
            else:
                self._published.add((ns.name, ns.digest))
        return ns

    def _fetch(self, name: str) -> Namespace | None:
        key = record_key(name)
        try:
            size = self.tier.size(key)
            if not size or size > MAX_RECORD_BYTES:
                return None
            buf = torch.empty(size, dtype=torch.uint8)
            self.tier.read_into(key, buf)
            ns = Namespace.from_dict(json.loads(buf.numpy().tobytes()))
        except (KeyError, KVTierError, ValueError, TypeError) as e:
            log.debug("no usable record of namespace %r in the %s tier: %s", name, self.tier.name, e)
            return None
        if ns.name != name or ns.layout is None:
            return None
        return ns

    def forget(self, name: str) -> None:
        """Delete ``name``'s record (the namespace was dropped)."""
        with self._lock:
            self._published = {m for m in self._published if m[0] != name}
        try:
            self.tier.delete(record_key(name))
        except KVTierError as e:
            log.debug("could not delete the record of namespace %r: %s", name, e)
