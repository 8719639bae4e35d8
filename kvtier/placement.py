"""Placement: which tier holds each block, and the cascade between tiers.

Blocks enter the fastest tier that can take them; a full tier demotes victims (chosen by its
eviction policy) one tier down; a block leaving its last tier is dropped together with its
descendants, children before parents (a child is useless without its parent). Blocks pinned
by a reader (``BlockEntry.pins``) are never evicted or freed: one dropped while pinned is
``doomed`` and freed when its last reader lets go.

Locking: ``lock`` (re-entrant) guards the index, the policies and the tiers' counters in
``stats``; every method whose name has no ``_unlocked`` expects the caller to hold it, except
where its docstring says it takes it. Methods that do network I/O say so and run without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Container, Iterable, Sequence

import torch

from kvtier.block import PreparedBlock, write_blocks
from kvtier.errors import KVTierError, StorageFull
from kvtier.index import BlockEntry, PinnedKeys, rebuild_index
from kvtier.pieces import Block, contiguous
from kvtier.policies import EvictionPolicy
from kvtier.policies.admission import AdmissionPolicy
from kvtier.stats import CacheStats
from kvtier.tiers.base import (
    BatchedDeletes,
    BatchedPuts,
    DiskBound,
    LazyDeletes,
    MemoryTier,
    SharedIndex,
    Tier,
    WritesInPlace,
)

log = logging.getLogger(__name__)


class Placement:
    """The block index over a cache's tiers (fastest first) and the moves between them."""

    def __init__(self, tiers: Sequence[Tier], policies: Sequence[EvictionPolicy], stats: CacheStats,
                 admission: AdmissionPolicy) -> None:
        self.tiers = list(tiers)
        self.policies = list(policies)
        self.stats = stats
        self.admission = admission
        self.lock = threading.RLock()
        self.index: dict[bytes, BlockEntry] = {}
        self._protected = PinnedKeys(self.index)
        shared = [t for t, tier in enumerate(self.tiers) if isinstance(tier, SharedIndex)]
        self.shared_idx = shared[0] if shared else -1  # the shared remote tier, if any
        self._remote_deletes: list[bytes] = []
        self._placing: set[bytes] = set()  # blocks being written before they are indexed
        self.placed = threading.Condition(self.lock)  # notified when a key leaves _placing
        # Dropped blocks a reader still holds (doomed), by key: their copies are still in the
        # tiers under that key, so a new block of the key is not placed until they are freed
        # (it would find the slot taken, first writer wins, and lose it when they are).
        self._held: dict[bytes, BlockEntry] = {}
        # Bytes room was made for in each tier that are being written there outside the lock
        # and may not be reserved by the tier yet: ``make_room`` counts them as taken. Without
        # this, a write-through batch that made room and then wrote outside the lock lost that
        # room to a block placed meanwhile, and a put into a full SSD tier failed (StorageFull)
        # where evicting would have made room for both.
        self._promised = [0] * len(self.tiers)
        # tiers that store a batch in one call (group commit): checked once, here
        self.batched = [isinstance(tier, BatchedPuts) for tier in self.tiers]
        self._in_place = [tier if isinstance(tier, WritesInPlace) else None for tier in self.tiers]
        self._viewable = [tier if isinstance(tier, MemoryTier) else None for tier in self.tiers]
        self._disk_bound = [tier if isinstance(tier, DiskBound) else None for tier in self.tiers]

    @property
    def shared(self) -> SharedIndex | None:
        tier = self.tiers[self.shared_idx] if self.shared_idx >= 0 else None
        return tier if isinstance(tier, SharedIndex) else None

    def tier_index(self, name: str) -> int:
        from kvtier.errors import InvalidRequest

        for i, t in enumerate(self.tiers):
            if t.name == name:
                return i
        raise InvalidRequest(f"unknown tier {name!r}: this cache has {[t.name for t in self.tiers]}")

    def warm_start(self) -> None:
        """Index what the persistent tiers hold (a warm restart)."""
        self.index.update(rebuild_index(self.tiers, self.policies))
        if self.index:
            log.info("warm start: %d blocks recovered", len(self.index))

    # ---- placing new blocks -------------------------------------------------------------------
    def place_new(self, entry: BlockEntry, data: torch.Tensor | PreparedBlock) -> int | None:
        """Put a new block into the fastest tier that can ever hold it (lock held, parent
        pinned); the tier it landed in, or None; raises the last ``StorageFull`` if that is why
        no tier took it (a full disk). The caller schedules its write-through.

        A ``PreparedBlock`` is written straight into the slot of a tier that takes it in place
        (``WritesInPlace``: one copy), else encoded into a buffer first. None too while a
        reader still holds a dropped copy of the key (``_held``)."""
        if entry.key in self._held:
            return None
        full: StorageFull | None = None
        nbytes = data.nbytes if isinstance(data, PreparedBlock) else len(data)
        for t, tier in enumerate(self.tiers):
            if not tier.fits_ever(nbytes) or not self.make_room(t, nbytes):
                continue
            try:
                if not isinstance(data, PreparedBlock):
                    tier.put(entry.key, data, entry.meta())
                elif (writer := self._in_place[t]) is not None:
                    writer.put_with(entry.key, nbytes, data.write_into, entry.meta())
                else:
                    tier.put(entry.key, data.pooled(), entry.meta())
            except KVTierError as e:
                self.stats.tiers[tier.name].put_failures += 1
                log.warning("put to %s failed: %s", tier.name, e)
                full = e if isinstance(e, StorageFull) else full
                continue
            self.publish(entry, t, nbytes)
            if entry.parent is not None:
                self.index[entry.parent].add_child(entry.key)  # pinned: still indexed
            return t
        if full is not None:
            raise full
        return None

    def placing(self, key: bytes) -> bool:
        """Whether a block of ``key`` is being written outside the lock, not yet indexed (lock
        held; wait on ``placed`` for it to be published or given up)."""
        return key in self._placing

    def claim_in_place(self, entry: BlockEntry, nbytes: int) -> int | None:
        """For a new block a tier could take in place (lock held, parent pinned): make room in
        the fastest tier that can ever hold it and, where that tier is ``WritesInPlace``, claim
        the key, for the caller to write the block into its slot outside the lock
        (``fill_claimed``) and publish it (``publish_claimed``). The tier; None where the block
        is to be placed with ``place_new`` instead."""
        if entry.key in self._held or entry.key in self._placing:
            return None
        t = self._in_place_landing(nbytes)
        if t is not None:
            self._placing.add(entry.key)
        return t

    def _in_place_landing(self, nbytes: int) -> int | None:
        """The fastest tier that can ever hold a block of ``nbytes``, room made for it, where that
        tier writes in place (``WritesInPlace``); None otherwise (lock held)."""
        for t, tier in enumerate(self.tiers):
            if tier.fits_ever(nbytes) and self.make_room(t, nbytes):
                return t if self._in_place[t] is not None else None
        return None

    def fill_claimed(self, t: int, entry: BlockEntry, block: PreparedBlock) -> bool:
        """Write a block claimed in tier ``t`` into its slot (without the lock: other puts,
        lookups and write-throughs go on meanwhile; nothing evicts a block not yet indexed).
        False, the claim given up, if the tier had no room after all (a concurrent put took
        the room made): place it with ``place_new``. Raises what the write raises, likewise."""
        writer = self._in_place[t]
        assert writer is not None  # claim_in_place claims only such tiers
        try:
            if writer.put_with(entry.key, block.nbytes, block.write_into, entry.meta()):
                return True
        except StorageFull:
            pass
        except BaseException:
            self.unclaim(entry.key)
            raise
        self.unclaim(entry.key)
        return False

    def publish_claimed(self, entry: BlockEntry, t: int, nbytes: int) -> None:
        """Index a block written by ``fill_claimed`` (lock held, parent pinned and live)."""
        self._placing.discard(entry.key)
        self.placed.notify_all()
        self.publish(entry, t, nbytes)
        if entry.parent is not None:
            self.index[entry.parent].add_child(entry.key)

    def fill_chain_in_place(self, blocks: Sequence[tuple[BlockEntry, PreparedBlock]],
                            check: Callable[[], None]) -> list[BlockEntry]:
        """Place a run of a prefix's new blocks (each the parent of the next; the first's parent
        pinned by the caller) straight into the slots of a tier that writes in place: claimed
        and made room for under the lock, written by one ``put_many_with`` outside it
        (``write_blocks``: one pass over the prefix's tensors for them all, not one per block),
        published in order. Returns the leading blocks published, each pinned; it stops short
        as ``place_chain_unlocked`` does, and ``check`` runs as there."""
        claimed: list[tuple[BlockEntry, PreparedBlock]] = []
        with self.lock:
            t: int | None = None
            room = 0
            for entry, block in blocks:
                key = entry.key
                if key in self.index or key in self._placing or key in self._held:
                    break
                if t is None and (t := self._in_place_landing(block.nbytes)) is None:
                    return []
                if not self.make_room(t, room + block.nbytes):
                    break
                room += block.nbytes
                self._placing.add(key)  # one writer per key while it is not indexed yet
                claimed.append((entry, block))
        if not claimed:
            return []
        assert t is not None
        writer = self._in_place[t]
        assert writer is not None  # _in_place_landing says so
        out: list[BlockEntry] = []
        written = 0
        try:
            written = writer.put_many_with(  # fewer where slots ran out: the rest one by one
                [(e.key, b.nbytes, e.meta()) for e, b in claimed],
                lambda slots: write_blocks([b for _, b in claimed[:len(slots)]], slots))
            out = self._publish_chain(t, [(e, b.nbytes) for e, b in claimed[:written]], check)
            return out
        finally:
            self._end_claims(t, [e.key for e, _ in claimed], [e.key for e, _ in claimed[:written]], out)

    def unclaim(self, key: bytes, t: int | None = None) -> None:
        """Give up a claim (takes the lock), deleting the copy written into tier ``t`` if given."""
        with self.lock:
            self._placing.discard(key)
            self.placed.notify_all()
            if t is not None:
                self.tiers[t].delete(key)

    def place_unlocked(self, entry: BlockEntry, data: torch.Tensor) -> int | None:
        """``place_new`` for a parentless block (engine pages), taking the lock itself and
        writing a persistent tier's copy outside it, so many stores overlap their disk writes.
        The tier it landed in, -1 if another writer placed it first, None if no tier can."""
        with self.lock:
            if entry.key in self.index or entry.key in self._placing:
                return -1
            if entry.key in self._held:
                return None
            for t, tier in enumerate(self.tiers):
                if tier.fits_ever(len(data)) and self.make_room(t, len(data)):
                    break
            else:
                return None
            if not tier.persistent:  # a memory copy: cheap enough under the lock
                return self.place_new(entry, data)
            self._placing.add(entry.key)  # one writer per key while it is not indexed yet
            self.promise(t, len(data))
        try:
            try:
                tier.put(entry.key, data, entry.meta())  # not indexed yet: nothing evicts it
            except KVTierError:  # e.g. a concurrent writer took the room made above
                with self.lock:
                    return -1 if entry.key in self.index else self.place_new(entry, data)
            with self.lock:
                if entry.key in self.index:
                    return -1
                self.publish(entry, t, len(data))
                return t
        finally:
            with self.lock:
                self.settle(t, len(data))
                self._placing.discard(entry.key)
                self.placed.notify_all()

    def host_view(self, t: int, key: bytes) -> torch.Tensor | None:
        """The bytes of block ``key`` in tier ``t`` as stored, where that is host memory (a
        memory tier's slot); None elsewhere. Valid while the block is pinned."""
        tier = self._viewable[t]
        if tier is None:
            return None
        view = tier.view(key)
        return view if view.device.type == "cpu" else None

    def takes_pieces(self, nbytes: int) -> bool:
        """Whether a new block of about ``nbytes`` goes first to a tier that writes a block in
        pieces as they are (``BatchedPuts``: the SSD tier), so a put need not copy it together
        (``kvtier.pieces``). A block sent elsewhere in pieces after all is copied then."""
        return self._landing(nbytes) is not None

    def place_many_unlocked(self, blocks: Sequence[tuple[BlockEntry, Block]]
                            ) -> list[int | None | KVTierError]:
        """``place_unlocked`` for many parentless blocks: those bound for a persistent tier that
        stores batches (``BatchedPuts``) go there in one ``put_many`` outside the lock — their
        writes in flight together, made durable together, in pieces where they came so
        (``kvtier.pieces``: no copy) — the others one by one. Per block as ``place_unlocked``
        returns (the tier, -1, None), or the ``KVTierError`` it would raise."""
        out: list[int | None | KVTierError] = [None] * len(blocks)
        batches: dict[int, list[int]] = {}  # tier -> blocks bound for its put_many
        alone: list[int] = []
        with self.lock:
            room: dict[int, int] = {}  # bytes a tier is promised by this batch so far
            for i, (entry, data) in enumerate(blocks):
                if entry.key in self.index or entry.key in self._placing:
                    out[i] = -1
                    continue
                if entry.key in self._held:
                    continue
                n = len(data)
                for t, tier in enumerate(self.tiers):
                    if tier.fits_ever(n) and self.make_room(t, room.get(t, 0) + n):
                        break
                else:
                    continue
                if not (tier.persistent and self.batched[t]):
                    alone.append(i)
                    continue
                room[t] = room.get(t, 0) + n
                batches.setdefault(t, []).append(i)
                self._placing.add(entry.key)  # one writer per key while it is not indexed yet
            for t, n in room.items():
                self.promise(t, n)
        try:
            for i in alone:
                try:
                    out[i] = self.place_unlocked(blocks[i][0], contiguous(blocks[i][1]))
                except KVTierError as e:
                    out[i] = e
            for t, idx in batches.items():
                tier = self.tiers[t]
                assert isinstance(tier, BatchedPuts)
                results = tier.put_many([(blocks[i][0].key, blocks[i][1], blocks[i][0].meta())
                                         for i in idx])
                with self.lock:
                    for i, err in zip(idx, results, strict=True):
                        entry, data = blocks[i]
                        if entry.key in self.index:
                            out[i] = -1
                        elif err is None:
                            self.publish(entry, t, len(data))
                            out[i] = t
                        else:  # e.g. a concurrent writer took the room made above
                            try:
                                out[i] = self.place_new(entry, contiguous(data))
                            except KVTierError as e:
                                out[i] = e
        finally:  # whatever raised: no claim and no promised room outlives the call
            with self.lock:
                for t, idx in batches.items():
                    self.settle(t, room[t])
                    self._placing.difference_update(blocks[i][0].key for i in idx)
                self.placed.notify_all()
        return out

    def place_chain_unlocked(self, blocks: Sequence[tuple[BlockEntry, Block]],
                             check: Callable[[], None]) -> list[BlockEntry]:
        """Place a run of a prefix's new blocks (each the parent of the next; the first's parent
        pinned by the caller) that land in a persistent tier storing batches (``takes_pieces``:
        the SSD tier with no memory tier in front): claimed and made room for under the lock,
        written with one ``put_many`` outside it (the writes in flight together, one group
        commit), published in order. A put of a prefix to the SSD then neither holds the lock
        through its disk writes nor waits for each block's write before the next starts.

        Returns the leading blocks published, each pinned. It stops short at the first block it
        could not claim (indexed, being placed by a concurrent put, held, no room) or whose
        write failed; copies written after that are deleted (a child without its parent is
        useless), and the caller places the rest one by one (``place_new``). ``check`` runs
        under the lock before anything is published; if it raises, nothing is and the copies
        are deleted."""
        if not blocks:
            return []
        with self.lock:
            t = self._landing(len(blocks[0][1]))
            if t is None:
                return []
            tier = self.tiers[t]
            disk = self._disk_bound[t]
            claimed: list[tuple[BlockEntry, Block]] = []
            room = 0
            for entry, data in blocks:
                key = entry.key
                if key in self.index or key in self._placing or key in self._held:
                    break
                if not self.make_room(t, room + len(data)):
                    break
                if disk is not None and disk.short_of_disk(room + len(data)):
                    break  # a full disk refuses it: once, by place_new, which counts it
                room += len(data)
                self._placing.add(key)  # one writer per key while it is not indexed yet
                claimed.append((entry, data))
            self.promise(t, room)
        if not claimed:
            return []
        assert isinstance(tier, BatchedPuts)  # _landing says so
        out: list[BlockEntry] = []
        written: list[bytes] = []
        try:
            results = tier.put_many([(e.key, data, e.meta()) for e, data in claimed])
            written = [e.key for (e, _), err in zip(claimed, results, strict=True) if err is None]
            ok = next((i for i, err in enumerate(results) if err is not None), len(claimed))
            out = self._publish_chain(t, [(e, len(data)) for e, data in claimed[:ok]], check)
            return out
        finally:
            self._end_claims(t, [e.key for e, _ in claimed], written, out, promised=room)

    def _publish_chain(self, t: int, placed: Sequence[tuple[BlockEntry, int]], check: Callable[[], None]
                       ) -> list[BlockEntry]:
        """Publish a run of a prefix's blocks (entry, bytes) written to tier ``t`` outside the
        lock, in order, each pinned (takes the lock); the entries published. None where the
        first's parent was dropped meanwhile (children alone are useless); raises what ``check``
        raises, publishing nothing."""
        with self.lock:
            check()
            parent_key = placed[0][0].parent if placed else None
            parent = self.index.get(parent_key) if parent_key is not None else None
            if parent_key is not None and (parent is None or parent.doomed):
                return []
            for entry, nbytes in placed:
                self.publish(entry, t, nbytes)
                if entry.parent is not None:
                    self.index[entry.parent].add_child(entry.key)
                entry.pins += 1
            return [entry for entry, _ in placed]

    def _end_claims(self, t: int, claimed: Iterable[bytes], written: Iterable[bytes],
                    published: Iterable[BlockEntry], promised: int = 0) -> None:
        """Give up the claims of a run placed outside the lock, deleting the copies written to
        tier ``t`` that were not published, and settle the room ``promised`` for it (takes the
        lock)."""
        with self.lock:
            self.settle(t, promised)
            kept = {e.key for e in published}
            for key in written:
                if key not in kept:
                    self.tiers[t].delete(key)
            self._placing.difference_update(claimed)
            self.placed.notify_all()

    def _landing(self, nbytes: int) -> int | None:
        """The tier a new block of ``nbytes`` goes to first if that is a persistent tier storing
        batches (``BatchedPuts``); None otherwise."""
        for t, tier in enumerate(self.tiers):
            if tier.fits_ever(nbytes):
                return t if tier.persistent and self.batched[t] else None
        return None

    def publish(self, entry: BlockEntry, t: int, nbytes: int) -> None:
        """Record that tier ``t`` holds ``entry`` (lock held)."""
        self.index[entry.key] = entry
        entry.add_tier(t)
        self.policies[t].insert(entry.key)
        s = self.stats.tiers[self.tiers[t].name]
        s.blocks_written += 1
        s.bytes_written += nbytes

    def order_after_put(self, keys: Sequence[bytes], new: Container[bytes]) -> None:
        """Make a put prefix's parents more recent than its children, so leaves are evicted
        first; new blocks are re-inserted (no access counted), old ones touched (lock held)."""
        for key in reversed(keys):
            e = self.index.get(key)
            for t in e.tiers if e else ():
                if key in new:
                    self.policies[t].remove(key)
                    self.policies[t].insert(key)
                else:
                    self.policies[t].touch(key)

    def touch(self, entries: Iterable[BlockEntry], *, pin: bool) -> None:
        """Count a read of ``entries`` (parents last: more recent than children); pin them if
        asked (lock held)."""
        for e in reversed(list(entries)):
            e.hits += 1
            if pin:
                e.pins += 1
            for t in e.tiers:
                self.policies[t].touch(e.key)

    def release(self, entries: Iterable[BlockEntry]) -> None:
        """Unpin ``entries``; a doomed one is freed with its last reader (takes the lock)."""
        with self.lock:
            for e in entries:
                e.pins -= 1
                if e.pins == 0 and e.doomed:
                    self._free(e)

    # ---- making room --------------------------------------------------------------------------
    def make_room(self, t: int, nbytes: int, keep: Collection[bytes] = ()) -> bool:
        """Demote victims of tier ``t`` until ``nbytes`` fit; False if pinned blocks (or ``keep``)
        prevent it (lock held).

        True without evicting anything when the tier is short of disk rather than of budget
        (``DiskBound``): evicting would return no disk space, only empty the tier, so the put
        is left to the tier, which refuses it with ``StorageFull`` (counted by the caller). A
        shared tier evicts by itself: its ``can_fit`` is only its write bound.
        """
        tier = self.tiers[t]
        if t == self.shared_idx:
            return tier.can_fit(nbytes)
        protected = PinnedKeys(self.index, keep) if keep else self._protected
        disk = self._disk_bound[t]
        nbytes += self._promised[t]
        while not tier.can_fit(nbytes):
            if disk is not None and disk.short_of_disk(nbytes):
                return True
            victim = self.policies[t].evict(protected)
            if victim is None:
                return False
            self._demote(victim, t)
        return True

    def promise(self, t: int, nbytes: int) -> None:
        """Room made in tier ``t`` for ``nbytes`` that a caller writes outside the lock (lock
        held): ``make_room`` keeps it taken until ``settle``."""
        self._promised[t] += nbytes

    def settle(self, t: int, nbytes: int) -> None:
        """The write ``promise`` made room for is done, or failed (lock held)."""
        self._promised[t] -= nbytes

    def _demote(self, key: bytes, t: int) -> None:
        """Move a victim of tier ``t`` one tier down (or drop it if it leaves its last tier)."""
        entry = self.index[key]
        below = t + 1 if t + 1 < len(self.tiers) else None
        stats = self.stats.tiers[self.tiers[t].name]
        if below is not None and below not in entry.tiers and self.admission.admit_on_evict(entry.hits):
            self._copy_down(entry, t, below)
        tier = self.tiers[t]
        if isinstance(tier, LazyDeletes):  # its record goes with the next flush: no sync per victim
            tier.delete_later(key)
        else:
            tier.delete(key)
        entry.discard_tier(t)
        stats.evictions["capacity"] += 1
        if entry.tiers:
            stats.demotions += 1
        else:
            self.drop(key, "capacity")

    def _copy_down(self, entry: BlockEntry, src: int, dst: int) -> None:
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        self.tiers[src].read_into(entry.key, buf)
        if not (self.tiers[dst].fits_ever(entry.nbytes) and self.make_room(dst, entry.nbytes)):
            return
        try:
            self.tiers[dst].put(entry.key, buf, entry.meta())
        except KVTierError as e:
            self.stats.tiers[self.tiers[dst].name].put_failures += 1
            log.warning("demotion to %s failed: %s", self.tiers[dst].name, e)
            return
        self.publish(entry, dst, entry.nbytes)

    # ---- drops --------------------------------------------------------------------------------
    def drop(self, key: bytes, reason: str) -> int:
        """Drop a block and its descendants from every tier, children first (lock held);
        returns how many blocks were dropped."""
        order: list[bytes] = []
        stack = [key]
        while stack:
            k = stack.pop()
            if k in self.index:
                order.append(k)
                stack.extend(self.index[k].children or ())
        explicit = reason in ("evicted", "namespace_dropped")
        deletes: dict[int, list[bytes]] = {}
        for k in reversed(order):
            entry = self.index.pop(k)
            if explicit and self.shared_idx in entry.tiers:
                self._remote_deletes.append(k)
            if entry.parent is not None and entry.parent in self.index:
                self.index[entry.parent].discard_child(k)
            for t in entry.tiers:
                self.policies[t].remove(k)
                if k != key or reason != "capacity":
                    self.stats.tiers[self.tiers[t].name].evictions[reason if k == key else "orphaned"] += 1
            if entry.pins:
                entry.doomed = True
                self._held[k] = entry
            else:
                self._free(entry, deletes)
            self.stats.blocks_dropped += 1
        for t, keys in deletes.items():  # once the index is done: a tier sees whole batches
            tier = self.tiers[t]
            if isinstance(tier, BatchedDeletes) and len(keys) > 1:
                tier.delete_many(keys)
            else:
                for k in keys:
                    tier.delete(k)
        return len(order)

    def _free(self, entry: BlockEntry, deletes: dict[int, list[bytes]] | None = None) -> None:
        """Delete a dropped block's copies, now or, with ``deletes``, by the caller (tier index
        -> keys: a tier that deletes many at once does them together). A shared tier's copy is
        only forgotten: the fleet may still use it (explicit evictions delete it:
        ``flush_remote_deletes``)."""
        if self._held.get(entry.key) is entry:
            del self._held[entry.key]
        for t in entry.tiers:
            if t == self.shared_idx:
                continue
            if deletes is None:
                self.tiers[t].delete(entry.key)
            else:
                deletes.setdefault(t, []).append(entry.key)
        entry.tiers = ()

    def flush_remote_deletes(self) -> None:
        """Delete explicitly evicted blocks from the shared tier (network calls, each bounded by
        the tier's timeout: call without the lock)."""
        with self.lock:
            keys, self._remote_deletes = self._remote_deletes, []
        if not keys:
            return
        shared = self.tiers[self.shared_idx]
        for key in keys:
            shared.delete(key)

    def drop_namespace(self, name: str) -> int:
        """Drop every block of namespace ``name`` (lock held); returns how many."""
        roots = [e.key for e in self.index.values() if e.namespace == name and e.parent is None]
        return sum(self.drop(k, "namespace_dropped") for k in roots)

    def drop_expired(self, ttls: dict[str, float], now: float | None = None) -> int:
        """Drop every block older than its namespace's TTL (lock held); returns how many."""
        now = time.time() if now is None else now
        expired = [e.key for e in self.index.values()
                   if e.namespace in ttls and now - e.created > ttls[e.namespace]]
        return sum(self.drop(k, "expired") for k in expired if k in self.index)

    def live(self, key: bytes, ttl_s: float | None) -> BlockEntry | None:
        """The entry of a stored, unexpired block (lock held); an expired one is dropped."""
        e = self.index.get(key)
        if e is None or e.doomed or not e.tiers:
            return None
        if ttl_s is not None and time.time() - e.created > ttl_s:
            self.drop(key, "expired")
            return None
        return e

    def record_size(self, key: bytes, nbytes: int) -> None:
        """Remember the size a reader learned for a block the shared tier's existence query
        found (unknown until then), so later leases carry it (lock held)."""
        entry = self.index.get(key)
        if entry is not None and not entry.nbytes:
            entry.nbytes = nbytes
