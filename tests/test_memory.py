import pytest
import torch

from kvtier.config import DeviceTierConfig, HostTierConfig
from kvtier.errors import StorageFull
from kvtier.tiers.base import BlockMeta, MemoryTier, Tier
from kvtier.tiers.memory import make_device_tier, make_host_tier

META = BlockMeta("ns", None, 16, "none", 0.0)


def test_host_tier_roundtrip_views_and_capacity():
    tier = make_host_tier(HostTierConfig(capacity_bytes="64KiB", page_bytes="16KiB"))
    assert isinstance(tier, Tier) and isinstance(tier, MemoryTier)
    data = bytes(range(256)) * 20  # 5120 bytes
    tier.put(b"k" * 16, data, META)
    tier.put(b"k" * 16, b"other", META)  # first writer wins
    assert tier.contains(b"k" * 16) and tier.size(b"k" * 16) == len(data)
    out = torch.empty(100, dtype=torch.uint8)
    assert tier.read_into(b"k" * 16, out, offset=256) == 100
    assert bytes(out.numpy()) == data[256:356]
    assert bytes(tier.view(b"k" * 16).numpy()) == data
    assert tier.used_bytes == len(data) <= tier.capacity_bytes
    assert tier.delete(b"k" * 16) and not tier.delete(b"k" * 16) and tier.used_bytes == 0


def test_host_tier_full_raises_and_keeps_what_it_has():
    tier = make_host_tier(HostTierConfig(capacity_bytes="32KiB", page_bytes="16KiB"))
    stored = []
    with pytest.raises(StorageFull, match="host tier"):
        for i in range(100):
            tier.put(bytes([i]) * 16, bytes([i]) * 7000, META)
            stored.append(i)
    assert stored and tier.used_bytes <= tier.capacity_bytes
    for i in stored:
        assert bytes(tier.view(bytes([i]) * 16).numpy()) == bytes([i]) * 7000


def test_device_tier_uses_fixed_slots_and_rejects_oversized_blocks():
    tier = make_device_tier(DeviceTierConfig(capacity_bytes="64KiB", slot_bytes="16KiB"))
    assert tier.buffer.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert tier.fits_ever(16 * 1024) and not tier.fits_ever(16 * 1024 + 1)
    for i in range(4):
        tier.put(bytes([i]) * 16, b"x" * 100, META)  # each small block still takes a slot
    assert not tier.can_fit(1)


def test_host_tier_holds_seven_eighths_of_its_capacity_in_real_sized_blocks():
    """2 MiB of KV plus its header page (a 16-token Llama-3-8B page in block format 2)."""
    block = 2 * 1024**2 + 4096
    tier = make_host_tier(HostTierConfig(capacity_bytes="32MiB"))
    data = torch.zeros(block, dtype=torch.uint8)
    n = 0
    while tier.can_fit(block):
        tier.put(n.to_bytes(16, "little"), data, META)
        n += 1
    assert n * block >= tier.capacity_bytes * 7 / 8 and n == 15  # the slab allocator held 8
    assert all(tier.view(i.to_bytes(16, "little")).data_ptr() % 4096 == 0 for i in range(n))


def test_host_copies_do_not_go_through_torch(monkeypatch):
    """Host-to-host copies are numpy memcpy: torch's copy_ (and its thread pool) is never used."""
    tier = make_host_tier(HostTierConfig(capacity_bytes="1MiB"))
    calls = []
    real = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    src = torch.arange(100_000, dtype=torch.int32).view(torch.uint8)
    tier.put(b"k" * 16, src, META)
    out = torch.empty(src.numel(), dtype=torch.uint8)
    assert tier.read_into(b"k" * 16, out) == src.numel() and torch.equal(out, src)
    assert calls == []


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "numpy"])
def test_put_with_encodes_straight_into_the_slot(monkeypatch, one_pass):
    """A block prepared by kvtier.block is written into its host slot with one copy per byte:
    in one pass with its checksum (kvtier._fastcopy), or with numpy where that is not built."""
    import numpy as np

    import kvtier.block as block_mod
    from kvtier.block import decode_block_into, prepare_block
    from kvtier.codecs import get_codec
    from tests.conftest import random_kv

    if one_pass and not block_mod.ONE_PASS_COPY:
        pytest.skip("kvtier._fastcopy is not built here, or this CPU lacks AVX2 + VPCLMULQDQ")
    monkeypatch.setattr(block_mod, "ONE_PASS_COPY", one_pass)
    tier = make_host_tier(HostTierConfig(capacity_bytes="4MiB"))
    kv = random_kv(256, layers=4, heads=4, dim=64)
    payload = sum(t.numel() * t.element_size() for layer in kv for t in layer)
    copied = []
    copyto, concatenate = np.copyto, np.concatenate
    monkeypatch.setattr(np, "copyto", lambda dst, src, **k: copied.append(dst.nbytes) or copyto(dst, src, **k))
    monkeypatch.setattr(np, "concatenate", lambda parts, out: copied.append(out.nbytes) or concatenate(parts, out=out))
    if one_pass:
        copy_layers = block_mod.copy_layers
        monkeypatch.setattr(block_mod, "copy_layers", lambda dst, at, layers, row: copied.append(
            sum(p.nbytes for parts in layers for p in parts)) or copy_layers(dst, at, layers, row))
    block = prepare_block(get_codec("none"), kv)
    assert tier.put_with(b"k" * 16, block.nbytes, block.write_into, META)
    assert sum(copied) == payload  # every KV byte copied once, into the slot itself
    view = tier.view(b"k" * 16)
    assert view.numel() == block.nbytes and view.data_ptr() % 4096 == 0
    out = [[torch.empty_like(t) for t in layer] for layer in kv]
    decode_block_into(view, out)
    assert all(torch.equal(a, b) for la, lb in zip(kv, out, strict=True) for a, b in zip(la, lb, strict=True))
    assert not tier.put_with(b"k" * 16, 10, lambda slot: pytest.fail("written twice"))  # first writer wins


def test_put_with_a_failing_writer_leaves_no_trace():
    tier = make_host_tier(HostTierConfig(capacity_bytes="64KiB"))

    def broken(slot):
        slot.fill_(1)
        raise OSError("source went away")

    with pytest.raises(OSError):
        tier.put_with(b"k" * 16, 5000, broken, META)
    assert not tier.contains(b"k" * 16) and tier.used_bytes == 0 and tier.can_fit(64 * 1024)


@pytest.mark.parametrize("make", [lambda: make_host_tier(HostTierConfig(capacity_bytes="64KiB")),
                                  lambda: make_device_tier(DeviceTierConfig(capacity_bytes="64KiB", slot_bytes="16KiB"))],
                         ids=["host", "device"])
def test_put_many_with_fills_the_leading_blocks_it_has_slots_for_in_one_write(make):
    """A window of blocks: slots for the leading ones (up to a key already stored, or no room),
    all handed to one ``write``; what it wrote reads back, nothing of the rest is stored."""
    tier = make()
    assert tier.put_with(b"c" * 16, 100, lambda slot: slot.fill_(3), META)
    calls = []

    def write(slots):
        calls.append([s.numel() for s in slots])
        for n, s in enumerate(slots):
            s.fill_(n + 1)

    blocks = [(b"a" * 16, 5000, META), (b"b" * 16, 7000, META), (b"c" * 16, 100, META), (b"d" * 16, 10, META)]
    assert tier.put_many_with(blocks, write) == 2  # "c" is stored already: the window stops there
    assert calls == [[5000, 7000]]
    assert bool((tier.view(b"a" * 16) == 1).all()) and bool((tier.view(b"b" * 16) == 2).all())
    assert not tier.contains(b"d" * 16) and bool((tier.view(b"c" * 16) == 3).all())
    used = tier.used_bytes
    assert tier.put_many_with([(b"e" * 16, 10, META), (b"f" * 16, 1 << 20, META)], write) == 1  # no room for f
    assert not tier.contains(b"f" * 16) and tier.used_bytes == used + 10
    assert tier.put_many_with([(b"g" * 16, 1 << 20, META)], write) == 0 and len(calls) == 2  # not called


def test_put_many_with_a_failing_writer_stores_none_of_them():
    tier = make_host_tier(HostTierConfig(capacity_bytes="64KiB"))

    def broken(slots):
        for s in slots:
            s.fill_(1)
        raise OSError("source went away")

    with pytest.raises(OSError):
        tier.put_many_with([(b"a" * 16, 5000, META), (b"b" * 16, 5000, META)], broken)
    assert not tier.contains(b"a" * 16) and not tier.contains(b"b" * 16)
    assert tier.used_bytes == 0 and tier.can_fit(64 * 1024)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="Linux only")
def test_a_host_tier_faults_its_memory_in_at_open_without_changing_what_is_written():
    """Prefault (the default) makes the fresh buffer resident on a background thread, so the
    first puts do not pay its page faults; it never changes a byte a put wrote meanwhile, and
    ``prefault=False`` leaves the memory to be faulted in on use."""
    from kvtier.bufpool import prefault

    size = 256 * 1024**2
    before = _resident_bytes()
    lazy = make_host_tier(HostTierConfig(capacity_bytes=size, pinned=False, prefault=False))
    assert lazy.wait_prefaulted(0) and _resident_bytes() - before < size // 4
    lazy.close()
    before = _resident_bytes()
    tier = make_host_tier(HostTierConfig(capacity_bytes=size, pinned=False))
    data = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
    tier.put(b"k", data, META)  # written while the prefault may still run
    assert tier.wait_prefaulted(120)
    if not prefault(tier.buffer[:4096]):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
    assert _resident_bytes() - before > size * 3 // 4
    assert torch.equal(tier.view(b"k"), data)
    region = tier.buffer[size // 2: size // 2 + (1 << 20)]
    region.copy_(data)
    assert prefault(region) and torch.equal(region, data)
    tier.close()
