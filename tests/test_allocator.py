"""Property test of the slab allocator against a plain reference of live intervals."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.tiers.allocator import MIN_SLOT, SlabAllocator

CAP = 64 * MIN_SLOT
PAGE = 8 * MIN_SLOT

ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(1, 3 * PAGE)),
    st.tuples(st.just("free"), st.integers(0, 1000)),
), max_size=200)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_slots_never_overlap_and_stay_inside_capacity(seq):
    a = SlabAllocator(CAP, PAGE)
    live: dict[int, int] = {}  # offset -> reserved bytes
    for op, arg in seq:
        if op == "alloc":
            could = a.can_alloc(arg)
            off = a.alloc(arg)
            assert (off is not None) == could
            if off is None:
                continue
            size = a.slot_size(arg)
            assert size >= arg and off + size <= CAP
            for o, s in live.items():
                assert off + size <= o or o + s <= off, "overlapping slots"
            live[off] = size
        elif live:
            off = sorted(live)[arg % len(live)]
            a.free(off)
            del live[off]
    for off in list(live):
        a.free(off)
    # Everything freed: every page is back, a full-capacity run fits again.
    assert a.can_alloc(CAP)


def test_free_slot_in_class_always_serves_a_put():
    a = SlabAllocator(CAP, PAGE)
    small = [a.alloc(5000) for _ in range(5)]  # one page of the 6 KiB class
    while a.alloc(3 * PAGE) is not None:  # fill the rest with large runs...
        pass
    while a.alloc(PAGE) is not None:  # ...and whole pages
        pass
    assert not a.can_alloc(PAGE)
    a.free(small[2])
    assert a.can_alloc(5000) and a.alloc(5000) == small[2]


def test_pages_return_to_pool_when_empty():
    a = SlabAllocator(CAP, PAGE)
    offs = [a.alloc(MIN_SLOT) for _ in range(CAP // MIN_SLOT)]
    assert all(o is not None for o in offs) and a.alloc(MIN_SLOT) is None
    for o in offs:
        a.free(o)
    assert a.alloc(CAP) == 0  # the whole buffer as one run: no page stuck in a class


def test_fixed_slot_mode_rejects_oversized_blocks():
    a = SlabAllocator(CAP, PAGE, fixed_slot=True)
    assert a.slot_size(10) == PAGE and not a.fits_ever(PAGE + 1) and a.alloc(PAGE + 1) is None
