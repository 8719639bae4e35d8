"""A Mooncake value's verification (``kvtier.tiers.remote.mooncake_value``), without Mooncake:
the two-core checksum equals the one-pass crc32c, and a verified copy copies exactly its window
while checksumming every byte."""

from __future__ import annotations

import pytest
import torch

from kvtier.block import checksum
from kvtier.tiers.remote.base import Workers
from kvtier.tiers.remote.mooncake_value import PARALLEL_VERIFY, VERIFY_PIECE, checksums, verify_copy


def payload(n: int, seed: int = 0) -> memoryview:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().data.cast("B")


@pytest.mark.parametrize("sizes", [[1000, 3], [PARALLEL_VERIFY + 17], [PARALLEL_VERIFY // 2 + 5] * 3])
def test_checksums_on_two_cores_equal_the_plain_crc32c(sizes):
    views = [payload(n, i) for i, n in enumerate(sizes)]
    worker = Workers(1, "test-crc")
    assert checksums(views, worker) == [checksum(v) for v in views]


@pytest.mark.parametrize("offset, n", [(0, 3 * VERIFY_PIECE + 9), (VERIFY_PIECE - 3, 10), (5, 0)])
def test_a_verified_copy_checksums_everything_and_copies_its_window(offset, n):
    length = 3 * VERIFY_PIECE + 9
    data = payload(length + 4)  # a trailer's room past the value: never checksummed
    out = torch.zeros(n, dtype=torch.uint8)
    assert verify_copy(data, length, out, offset) == checksum(data[:length])
    assert bytes(out.numpy()) == bytes(data[offset:offset + n])
    strided = torch.zeros(2 * n, dtype=torch.uint8)[::2]  # not contiguous: copied another way
    assert verify_copy(data, length, strided, offset) == checksum(data[:length])
    assert bytes(strided.contiguous().numpy()) == bytes(data[offset:offset + n])
