"""Quarantine of registered memory after a timed-out direct read: a late write never lands in
memory that was handed out again. The engine is a stand-in whose reads block until released
and then really write into the registered addresses (as Mooncake's transfer engine does)."""

from __future__ import annotations

import ctypes
import threading

import pytest
import torch

from kvtier.block import checksum
from kvtier.config import RemoteTierConfig
from kvtier.tiers.remote.base import key_bound
from kvtier.tiers.remote.breaker import CircuitBreaker
from kvtier.tiers.remote.mooncake import TRAILER, MooncakeBackend
from kvtier.tiers.remote.tier import RemoteTier

NBYTES = 256 * 1024
URL = "mooncake://127.0.0.1:1?metadata=http://127.0.0.1:2/metadata"


class StallingStore:
    """Serves values from a dict; a get of a key in ``stall`` blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.stall: set[str] = set()
        self.release = threading.Event()
        self.late_done = threading.Event()

    def register_buffer(self, ptr: int, size: int) -> int:
        return 0

    def unregister_buffer(self, ptr: int) -> int:
        return 0

    def batch_get_into_multi_buffers(self, names, all_ptrs, all_sizes):
        codes = []
        for name, ptrs, sizes in zip(names, all_ptrs, all_sizes, strict=True):
            if name in self.stall:
                assert self.release.wait(30), "test never released the stalled read"
            value = self.values.get(name)
            if value is None:
                codes.append(-704)
                continue
            if sum(sizes) != len(value):
                codes.append(-600)
                continue
            at = 0
            for ptr, size in zip(ptrs, sizes, strict=True):
                ctypes.memmove(ptr, value[at:at + size], size)
                at += size
            codes.append(len(value))
        if any(n in self.stall for n in names):
            self.late_done.set()
        return codes

    def get_into(self, name, ptr, size):
        value = self.values.get(name)
        if value is None or size < len(value):  # a bigger buffer is fine, as in Mooncake
            return -704 if value is None else -600
        return self.batch_get_into_multi_buffers([name], [[ptr]], [[len(value)]])[0]

    def get_size(self, name) -> int:
        return len(self.values[name]) if name in self.values else -704

    def remove(self, name, force) -> int:
        return 0 if self.values.pop(name, None) is not None else -704

    def close(self) -> None:
        pass


@pytest.fixture
def parts():
    backend = MooncakeBackend(URL, timeout_s=0.3, prefix="q:")
    engine = StallingStore()
    backend._store = engine  # the stand-in engine, instead of connecting
    tier = RemoteTier(backend, RemoteTierConfig(backend="mooncake", url=URL, timeout_s=0.3),
                      breaker=CircuitBreaker(100, 0.1))
    yield tier, backend, engine
    engine.release.set()
    tier.close()


def _value(fill: int, key: bytes) -> bytes:
    data = bytes([fill]) * NBYTES
    return data + TRAILER.pack(key_bound(checksum(data), key, NBYTES))


def test_timed_out_direct_read_quarantines_its_buffer_until_the_late_write(parts):
    tier, backend, engine = parts
    engine.values["q:" + b"old".hex()] = _value(0xAA, b"old")
    engine.values["q:" + b"new".hex()] = _value(0x55, b"new")
    engine.stall.add("q:" + b"old".hex())
    slot = torch.zeros(NBYTES, dtype=torch.uint8)
    assert tier.register(slot)

    with pytest.raises(KeyError):
        tier.read_into(b"old", slot)  # times out; the engine still holds the read
    assert tier.stats()["timeouts"] == 1
    settled = threading.Event()
    tier.when_settled(slot, settled.set)
    assert not settled.is_set()
    assert tier.wait_settled(slot, timeout=0.05) is False
    assert tier.unregister(slot) is False  # a late write may still come

    # A new read into the quarantined slot waits for the late call, bounded by its own
    # deadline: with the late call still stalled it fails rather than racing it.
    with pytest.raises(KeyError):
        tier.read_into(b"new", slot)
    assert tier.stats()["timeouts"] == 2

    engine.release.set()  # the late write lands (0xAA), in a slot nobody was handed
    assert engine.late_done.wait(5)
    assert settled.wait(5)
    assert tier.wait_settled(slot, timeout=5)
    assert bool((slot == 0xAA).all())
    # Once settled, reads into the slot are direct again and nothing older overwrites them.
    assert tier.read_into(b"new", slot) == NBYTES
    assert bool((slot == 0x55).all())
    assert tier.unregister(slot) is True


def test_batch_read_waits_for_a_late_call_into_any_of_its_buffers(parts):
    tier, backend, engine = parts
    for name, fill in ((b"a", 1), (b"b", 2), (b"slow", 3)):
        engine.values["q:" + name.hex()] = _value(fill, name)
    engine.stall.add("q:" + b"slow".hex())
    ring = torch.zeros(2 * NBYTES, dtype=torch.uint8)
    assert tier.register(ring)
    a, b = ring[:NBYTES], ring[NBYTES:]
    got = tier.read_blocks_into([b"a", b"slow"], [a, b])  # the whole batch times out
    assert all(isinstance(r, KeyError) for r in got)
    waiter = threading.Thread(target=lambda: got.__setitem__(
        slice(None), tier.read_blocks_into([b"b"], [b])))
    waiter.start()  # waits for the late call into ``b`` ...
    engine.release.set()  # ... which then finishes, so this read goes through
    waiter.join(5)
    assert got == [NBYTES]
    assert bool((b == 2).all()) and bool((a == 1).all())


def test_a_corrupt_direct_read_is_refused_and_wrong_sizes_fall_back_to_staging(parts):
    tier, backend, engine = parts
    value = bytearray(_value(7, b"bad"))
    value[100] ^= 1
    engine.values["q:" + b"bad".hex()] = bytes(value)
    engine.values["q:" + b"good".hex()] = _value(9, b"good")
    buf = torch.zeros(NBYTES + 4096, dtype=torch.uint8)
    assert tier.register(buf)
    got = tier.read_blocks_into([b"bad", b"good"], [buf[:NBYTES], buf[4096:4096 + NBYTES]])
    assert "crc32c" in str(got[0]) and got[1] == NBYTES
    assert tier.stats()["corrupt_blocks"] == 1 and "q:" + b"bad".hex() not in engine.values
    assert bool((buf[4096:4096 + NBYTES] == 9).all())
    short = buf[:NBYTES - 1000]  # registered, but not the value's size: staged, then copied
    short.zero_()
    assert tier.read_into(b"good", short) == NBYTES - 1000
    assert bool((short == 9).all())
