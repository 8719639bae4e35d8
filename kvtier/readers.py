"""Many small reads at once without a task per read: ``n`` readers share one iterator.

Why not ``Executor.map`` or a ``submit`` per read: each task is a future, a condition and a
thread hand-off, several GIL round trips per read. At thousands of 128 KiB reads a second on
a 2-core machine they were a fifth of the GIL's time, and each hand-off wakes a thread (dear on
a VM whose idle cores halt). ``n`` long-lived tasks that each take the next item until none is
left cost that once per reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from concurrent.futures import wait as wait_futures
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def shared_readers(pool: Executor, n: int, items: Iterable[T], work: Callable[[Iterator[T]], R]) -> list[R]:
    """Run ``work`` as ``n`` tasks of ``pool`` that share one iterator over ``items`` (each
    ``work`` loops over it; ``next`` on a list's iterator is one step under the GIL); returns
    each task's result. Waits for every task, then raises the first error any of them raised
    (so a caller's cleanup never runs under a read still in flight). One reader (``n <= 1``)
    runs on the caller's thread: no hand-off at all."""
    todo = iter(items)
    if n <= 1:
        return [work(todo)]
    futures = [pool.submit(work, todo) for _ in range(n)]
    wait_futures(futures)
    return [f.result() for f in futures]
