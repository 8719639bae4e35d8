"""CircuitBreaker state machine on a controlled clock, and its thread safety."""

from __future__ import annotations

import threading

import pytest

from kvtier.tiers.remote.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_opens_after_n_consecutive_failures_only():
    b = CircuitBreaker(failures=3, cooldown_s=1.0, clock=Clock())
    b.record_failure()
    b.record_failure()
    b.record_success()  # not consecutive any more
    b.record_failure()
    b.record_failure()
    assert b.state == CLOSED and b.allow()
    b.record_failure()
    assert b.state == OPEN and b.opens == 1
    assert not b.allow()


def test_half_open_probe_closes_on_success():
    clock = Clock()
    b = CircuitBreaker(failures=1, cooldown_s=2.0, clock=clock)
    b.record_failure()
    clock.t += 1.9
    assert not b.allow()
    clock.t += 0.2
    assert b.allow()  # the probe
    assert b.state == HALF_OPEN
    assert not b.allow()  # only one probe at a time
    b.record_success()
    assert b.state == CLOSED and b.allow()
    assert b.to_dict() == {"state": CLOSED, "opens": 1, "consecutive_failures": 0}


def test_failed_probe_reopens_for_another_cooldown():
    clock = Clock()
    b = CircuitBreaker(failures=2, cooldown_s=1.0, clock=clock)
    b.record_failure()
    b.record_failure()
    clock.t += 1.0
    assert b.allow()
    b.record_failure()
    assert b.state == OPEN and b.opens == 2
    assert not b.allow()
    clock.t += 1.0
    assert b.allow()


def test_lost_probe_does_not_wedge_half_open():
    clock = Clock()
    b = CircuitBreaker(failures=1, cooldown_s=1.0, clock=clock)
    b.record_failure()
    clock.t += 1.0
    assert b.allow()  # a probe whose caller never reports back
    clock.t += 0.5
    assert not b.allow()
    clock.t += 0.6
    assert b.allow()


def test_only_one_thread_gets_the_probe():
    clock = Clock()
    b = CircuitBreaker(failures=1, cooldown_s=1.0, clock=clock)
    b.record_failure()
    clock.t += 5
    allowed = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        allowed.append(b.allow())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(allowed) == [False] * 7 + [True]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="failures"):
        CircuitBreaker(failures=0)
    with pytest.raises(ValueError, match="cooldown_s"):
        CircuitBreaker(cooldown_s=0)
