import subprocess
import sys

import numpy as np
import pytest

from kvtier.errors import InvalidRequest, InvalidType
from kvtier.keys import KEY_BYTES, as_token_array, namespace_digest, prefix_hashes

SCRIPT = """
import numpy as np
from kvtier.keys import namespace_digest, prefix_hashes
ns = namespace_digest("llama", "L2|2x8;2x8|float32", "none", 16, "tenant-a")
print(",".join(k.hex() for k in prefix_hashes(ns, np.arange(100, dtype=np.int64) * 7, 16)))
"""


def _keys_in_subprocess(seed: str) -> list[str]:
    env = {"PYTHONHASHSEED": seed, "PATH": ""}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, **env})
    return out.stdout.strip().split(",")


def test_keys_identical_across_processes_and_hash_seeds():
    a, b = _keys_in_subprocess("1"), _keys_in_subprocess("12345")
    ns = namespace_digest("llama", "L2|2x8;2x8|float32", "none", 16, "tenant-a")
    here = [k.hex() for k in prefix_hashes(ns, np.arange(100, dtype=np.int64) * 7, 16)]
    assert a == b == here
    assert len(here) == 6  # 100 tokens -> 6 full blocks of 16; the partial block has no key
    assert all(len(bytes.fromhex(k)) == KEY_BYTES for k in here)


def test_keys_are_chained():
    ns = namespace_digest("m", "L1|1|float32", "none", 4)
    t = as_token_array(list(range(12)))
    k1 = prefix_hashes(ns, t, 4)
    t2 = t.copy()
    t2[0] = 99  # a change in block 0 changes every later key
    k2 = prefix_hashes(ns, t2, 4)
    assert all(a != b for a, b in zip(k1, k2, strict=True))
    t3 = t.copy()
    t3[11] = 99  # a change in the last block changes only its key
    k3 = prefix_hashes(ns, t3, 4)
    assert k1[:2] == k3[:2] and k1[2] != k3[2]


@pytest.mark.parametrize("field", range(5))
def test_any_namespace_field_gives_disjoint_keys(field):
    base = ["m", "L1|1|float32", "none", "4", ""]
    other = list(base)
    other[field] = other[field] + "x" if field != 3 else "8"
    t = as_token_array(list(range(32)))
    ka = prefix_hashes(namespace_digest(*base[:3], int(base[3]), base[4]), t, 4)
    kb = prefix_hashes(namespace_digest(*other[:3], int(other[3]), other[4]), t, 4)
    assert not set(ka) & set(kb)


@pytest.mark.parametrize("bad, exc", [
    ([], InvalidRequest), ([1.5, 2], InvalidType), (["a"], InvalidType), ("abc", InvalidType),
    ([-1, 2], InvalidRequest), ([[1, 2], [3, 4]], InvalidRequest), ([True, False], InvalidType),
])
def test_bad_token_ids(bad, exc):
    with pytest.raises(exc):
        as_token_array(bad)
