"""shared_readers: every item read once, by at most n readers; errors raised after all finish."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvtier.readers import shared_readers


def test_every_item_once_by_at_most_n_readers():
    seen: list[int] = []
    threads: set[int] = set()
    lock = threading.Lock()

    def work(todo):
        mine = 0
        for x in todo:
            with lock:
                seen.append(x)
                threads.add(threading.get_ident())
            mine += 1
        return mine

    with ThreadPoolExecutor(8) as pool:
        counts = shared_readers(pool, 3, range(1000), work)
    assert sorted(seen) == list(range(1000))
    assert len(counts) == 3 and sum(counts) == 1000
    assert 1 <= len(threads) <= 3


def test_an_error_is_raised_only_after_every_reader_is_done():
    """The caller's cleanup (releasing pins) must never run under a read still in flight."""
    gate = threading.Event()
    done: list[int] = []

    def work(todo):
        for x in todo:
            if x == 0:
                gate.set()
                raise ValueError("block 0 unreadable")
            assert gate.wait(10)
            done.append(x)

    with ThreadPoolExecutor(2) as pool, pytest.raises(ValueError, match="block 0"):
        shared_readers(pool, 2, range(200), work)
    assert sorted(done) == list(range(1, 200))  # the other reader finished every other item


def test_one_reader_runs_on_the_callers_thread():
    with ThreadPoolExecutor(2) as pool:
        assert shared_readers(pool, 1, range(3), lambda todo: [threading.get_ident() for _ in todo]) \
            == [[threading.get_ident()] * 3]


def test_no_items_still_returns_each_readers_result():
    with ThreadPoolExecutor(2) as pool:
        assert shared_readers(pool, 2, [], lambda todo: sum(1 for _ in todo)) == [0, 0]
