import pytest

from kvtier.errors import InvalidRequest
from kvtier.policies import make_policy


def run(policy, trace, capacity):
    for key in trace:
        if key in policy:
            policy.touch(key)
        else:
            while len(policy) >= capacity:
                assert policy.evict() is not None
            policy.insert(key)


def test_scan_flushes_lru_but_not_s3fifo():
    hot = [b"hot%d" % i for i in range(40)]
    scan = [b"scan%d" % i for i in range(2000)]
    kept = {}
    for name in ("lru", "s3fifo"):
        p = make_policy(name)
        run(p, hot * 5 + scan, capacity=100)
        kept[name] = sum(k in p for k in hot)
    assert kept["lru"] == 0
    assert kept["s3fifo"] == len(hot)


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_evict_skips_protected_and_returns_none_when_all_are(name):
    p = make_policy(name)
    for i in range(5):
        p.insert(bytes([i]))
    assert p.evict(protected={bytes([i]) for i in range(5)}) is None
    assert len(p) == 5  # nothing changed
    victim = p.evict(protected={bytes([0]), bytes([1])})
    assert victim not in (bytes([0]), bytes([1])) and victim not in p and len(p) == 4


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_remove_and_exhaust(name):
    p = make_policy(name)
    for i in range(10):
        p.insert(bytes([i]))
    p.remove(bytes([3]))
    p.remove(b"absent")
    seen = set()
    while (k := p.evict()) is not None:
        seen.add(k)
    assert seen == {bytes([i]) for i in range(10)} - {bytes([3])} and len(p) == 0


def test_lru_order():
    p = make_policy("lru")
    for k in (b"a", b"b", b"c"):
        p.insert(k)
    p.touch(b"a")
    assert p.evict() == b"b"


def test_unknown_policy():
    with pytest.raises(InvalidRequest, match="policy"):
        make_policy("mru-ish")
