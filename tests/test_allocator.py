"""Property tests of the extent allocator against a plain reference of free and reserved bytes."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.block import layout
from kvtier.tiers.allocator import UNIT, ExtentAllocator

CAP = 64 * UNIT
KIB, MIB, GIB = 1024, 1024**2, 1024**3

# Mixes of a few block sizes (a namespace's size, another's, odd ones): what a host tier sees.
sizes = st.integers(1, 20 * UNIT)
mixes = st.lists(sizes, min_size=1, max_size=4)
ops = st.lists(st.tuples(st.sampled_from(["alloc", "alloc", "free"]), st.integers(0, 10**6)), max_size=300)


def free_runs(cap: int, live: dict[int, int]) -> list[int]:
    """Lengths of the maximal free runs left between the reserved slots ``live``."""
    runs, at = [], 0
    for off in sorted(live):
        if off > at:
            runs.append(off - at)
        at = off + live[off]
    if cap > at:
        runs.append(cap - at)
    return runs


@settings(max_examples=300, deadline=None)
@given(mixes, ops)
def test_against_a_reference_of_free_runs(mix, seq):
    a = ExtentAllocator(CAP)
    live: dict[int, int] = {}  # offset -> reserved bytes
    for op, arg in seq:
        if op == "alloc":
            n = mix[arg % len(mix)]
            size = a.slot_size(n)
            assert n <= size < n + UNIT and size % UNIT == 0, "waste under one unit, unit-aligned"
            could = a.can_alloc(n)
            # A put never fails while free space holds its slot: the reference says when it does.
            assert could == any(r >= size for r in free_runs(CAP, live))
            off = a.alloc(n)
            assert (off is not None) == could
            if off is None:
                continue
            assert off % UNIT == 0 and off + size <= CAP
            for o, s in live.items():
                assert off + size <= o or o + s <= off, "overlapping slots"
            live[off] = size
        elif live:
            off = sorted(live)[arg % len(live)]
            a.free(off)
            del live[off]
        assert sum(live.values()) == a.reserved_bytes <= CAP, "usage never exceeds capacity"
        assert a.largest_free == max(free_runs(CAP, live), default=0), "free neighbours merged"
    for off in list(live):
        a.free(off)
    assert a.largest_free == CAP and a.can_alloc(CAP)  # everything freed is one extent again


@settings(max_examples=100, deadline=None)
@given(st.integers(8 * UNIT, 64 * MIB), st.integers(1, 4), st.integers(0, UNIT - 1))
def test_waste_is_at_most_an_eighth_and_one_size_fills_the_buffer(n, blocks, spare):
    """Blocks of one size (what a namespace puts) fill the buffer back to back."""
    a = ExtentAllocator(blocks * -(-n // UNIT) * UNIT + spare)
    assert a.slot_size(n) - n <= n / 8
    count = 0
    while a.alloc(n) is not None:
        count += 1
    assert count == blocks and count * n >= a.capacity * 7 / 8


def test_freeing_a_block_of_its_size_makes_room_for_the_next():
    a = ExtentAllocator(CAP)
    small = [a.alloc(5000) for _ in range(5)]
    while a.alloc(3 * UNIT) is not None:  # fill the rest with larger blocks
        pass
    while a.alloc(1) is not None:
        pass
    assert not a.can_alloc(1)
    a.free(small[2])
    assert a.can_alloc(5000) and not a.can_alloc(3 * UNIT) and a.alloc(5000) == small[2]


def test_a_1_gib_host_tier_holds_its_capacity_in_2_mib_blocks():
    block = layout("none", [64 * KIB] * 32)[2]  # a 16-token Llama-3-8B page: 2 MiB + its header page
    assert block == 2 * MIB + 4 * KIB
    a = ExtentAllocator(GIB)
    count = 0
    while a.alloc(block) is not None:
        count += 1
    assert count == GIB // block == 511 and count * block >= GIB * 7 / 8
    big = layout("none", [MIB] * 32)[2]  # 256-token blocks: 31 of them, not 28
    a = ExtentAllocator(GIB)
    assert sum(1 for _ in iter(lambda: a.alloc(big), None)) == 31


def test_fixed_slots_reject_oversized_blocks():
    a = ExtentAllocator(CAP, 8 * UNIT, max_block=8 * UNIT)
    assert a.slot_size(10) == 8 * UNIT and not a.fits_ever(8 * UNIT + 1) and a.alloc(8 * UNIT + 1) is None
    assert [a.alloc(1) for _ in range(9)] == [i * 8 * UNIT for i in range(8)] + [None]
