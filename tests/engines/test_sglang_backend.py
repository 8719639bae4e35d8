"""kvtier as SGLang 0.5.23's HiCache storage, with SGLang's own factory and host pool on CPU:
the dynamic factory loads it from the extra-config JSON, pages round-trip byte for byte through
the zero-copy v1 methods (default ``page_first`` layout) and the generic ones, hits count only
the leading run, and pages survive a restart and are shared through ``kvtier serve``."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

if importlib.util.find_spec("sglang") is None:  # installed but broken must fail, not skip
    pytest.skip("sglang is not installed: .ci/run installs sglang==0.5.23 --no-deps with "
                "tests/engines/requirements.txt", allow_module_level=True)

from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

from kvtier.errors import InvalidRequest  # noqa: E402
from kvtier.integrations.sglang import KVTierHiCacheStorage  # noqa: E402

PAGE, HEADS, DIM, LAYERS = 16, 2, 32, 4


def host_pool(dtype=torch.float16, layout="page_first") -> MHATokenToKVPoolHost:
    device = MHATokenToKVPool(512, PAGE, dtype, HEADS, DIM, LAYERS, "cpu", False, v_head_dim=DIM,
                              start_layer=0, end_layer=LAYERS - 1)
    return MHATokenToKVPoolHost(device.get_device_pool_infos()[0].buffer_info, 2, 0, PAGE, layout,
                                pin_memory=False, device_capacity_tokens=device.size,
                                start_layer=device.start_layer, end_layer=device.end_layer,
                                write_back_staging=device.hicache_write_back_staging)


def extra_config(**kw) -> str:
    """Exactly what a user passes to --hicache-storage-backend-extra-config."""
    return json.dumps({"backend_name": "kvtier", "module_path": "kvtier.integrations.sglang",
                       "class_name": "KVTierHiCacheStorage", "interface_v1": 1,
                       "min_free": 0, "direct_io": False, **kw})


def backend(extra: str, pool: MHATokenToKVPoolHost, model: str = "tiny") -> KVTierHiCacheStorage:
    config = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                  attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                                  is_page_first_layout=True, model_name=model,
                                  extra_config=json.loads(extra))
    b = StorageBackendFactory.create_backend("dynamic", config, pool)
    assert isinstance(b, KVTierHiCacheStorage)
    b.register_mem_pool_host(pool)  # as SGLang's cache controller does next
    return b


def pages(first: int, n: int) -> torch.Tensor:
    """Host-pool token indices of pages ``first .. first+n-1``."""
    return torch.arange(first * PAGE, (first + n) * PAGE)


def fill(pool: MHATokenToKVPoolHost, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    raw = pool.kv_buffer.view(-1).view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))


def page_bytes(pool: MHATokenToKVPoolHost, page: int) -> torch.Tensor:
    """Every byte of one page: K and V of every layer (page_first: kv_buffer[:, tokens])."""
    return pool.kv_buffer[:, page * PAGE:(page + 1) * PAGE].contiguous().view(torch.uint8).clone()


KEYS = [f"{i:064x}" for i in range(1, 7)]  # SGLang keys: SHA-256 hex strings


def test_v1_round_trips_every_byte_and_counts_the_leading_run(tmp_path):
    pool = host_pool()
    assert pool.layout == "page_first"
    b = backend(extra_config(data_dir=str(tmp_path / "kv")), pool)
    try:
        fill(pool)
        before = [page_bytes(pool, p) for p in range(4)]
        assert b.batch_set_v1(KEYS[:4], pages(0, 4)) == [True] * 4
        assert b.batch_exists(KEYS) == 4
        assert b.batch_exists([KEYS[0], "ff" * 32, KEYS[2]]) == 1  # only the leading run counts
        pool.kv_buffer.zero_()
        assert b.batch_get_v1(KEYS[:4] + ["ee" * 32], pages(8, 5)) == [True] * 4 + [False]
        for i in range(4):
            assert torch.equal(page_bytes(pool, 8 + i), before[i]), f"page {i} differs"
        assert not page_bytes(pool, 12).any()
        assert b.exists(KEYS[0]) and not b.exists(KEYS[5])
    finally:
        b.close()
    again = backend(extra_config(data_dir=str(tmp_path / "kv")), host_pool())  # a restart
    try:
        assert again.batch_exists(KEYS) == 4
    finally:
        again.close()


def test_generic_get_set_round_trip(tmp_path):
    pool = host_pool()
    b = backend(extra_config(data_dir=str(tmp_path / "kv")), pool)
    try:
        fill(pool, seed=3)
        values = [pool.get_data_page(p * PAGE) for p in range(3)]
        assert b.batch_set(KEYS[:3], values)
        assert b.set(KEYS[3], pool.get_data_page(3 * PAGE))
        assert all(b.exists(k) for k in KEYS[:4])
        got = b.batch_get(KEYS[:3] + [KEYS[5]], [pool.get_dummy_flat_data_page() for _ in range(4)])
        assert [g is not None for g in got] == [True, True, True, False]
        for g, v in zip(got[:3], values, strict=True):
            assert torch.equal(g.view(torch.uint8), v.view(torch.uint8))
        got = b.get(KEYS[3], pool.get_dummy_flat_data_page())  # random bytes: compare as bytes (NaNs)
        assert torch.equal(got.view(torch.uint8), pool.get_data_page(3 * PAGE).view(torch.uint8))
        # a target that is not a whole number of pages is a miss (logged), like any failed read
        assert b.get(KEYS[0], torch.empty(7, dtype=torch.uint8)) is None
    finally:
        b.close()


def test_another_kv_dtype_model_or_salt_never_shares_a_page(tmp_path, kvtier_serve):
    pool = host_pool()
    fill(pool)
    b = backend(extra_config(url=kvtier_serve), pool)
    b.batch_set_v1(KEYS[:2], pages(0, 2))
    second = backend(extra_config(url=kvtier_serve), host_pool())  # another engine, same config
    assert second.batch_exists(KEYS[:2]) == 2
    out = host_pool()
    reader = backend(extra_config(url=kvtier_serve), out)
    assert reader.batch_get_v1(KEYS[:2], pages(0, 2)) == [True, True]
    assert torch.equal(page_bytes(out, 1), page_bytes(pool, 1))
    assert backend(extra_config(url=kvtier_serve), host_pool(dtype=torch.bfloat16)).batch_exists(KEYS[:2]) == 0
    assert backend(extra_config(url=kvtier_serve), host_pool(), model="other").batch_exists(KEYS[:2]) == 0
    assert backend(extra_config(url=kvtier_serve, salt="t2"), host_pool()).batch_exists(KEYS[:2]) == 0


def test_bad_config_is_refused(tmp_path):
    pool = host_pool()
    with pytest.raises(InvalidRequest, match="exactly one"):
        backend(extra_config(), pool)
    with pytest.raises(InvalidRequest, match="unknown"):
        backend(extra_config(data_dir=str(tmp_path), bogus=1), pool)
    with pytest.raises(InvalidRequest, match="lossless"):
        backend(extra_config(data_dir=str(tmp_path / "kv"), codec="fp8"), pool)


def test_the_backend_keeps_caching_after_the_sidecar_lost_its_namespace(kvtier_serve):
    """Registered once, with the host pool: after another client dropped the namespace (or the
    sidecar restarted without its data dir) every write failed and every lookup missed until
    SGLang restarted. The backend now registers it again."""
    from kvtier.client import KVTierClient

    pool = host_pool()
    b = backend(extra_config(url=kvtier_serve), pool)
    try:
        fill(pool, seed=4)
        with KVTierClient(kvtier_serve) as other:
            other.drop_namespace(b.namespace)
        assert b.batch_set_v1(KEYS[:2], pages(0, 2)) == [True, True]
        assert b.batch_exists(KEYS[:2]) == 2
    finally:
        b.close()
