"""kvtier as SGLang's HiCache L3 storage (``HiCacheStorage``, SGLang >= 0.5.23).

Load it with SGLang's dynamic backend factory::

    python -m sglang.launch_server --model-path ... --enable-hierarchical-cache \\
      --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
      '{"backend_name": "kvtier", "module_path": "kvtier.integrations.sglang",
        "class_name": "KVTierHiCacheStorage", "interface_v1": 1,
        "data_dir": "/mnt/nvme/kvtier", "capacity": "500GiB"}'

``interface_v1`` selects the zero-copy path: ``batch_set_v1`` stores each page straight from the
host pool and ``batch_get_v1`` reads it straight back into the pool (the pool's
``get_page_buffer_meta`` says where a page's parts lie: K and V for MHA in the default
``page_first`` layout, one latent part for MLA). Each part is one kvtier block named by the
page's SGLang key (a SHA-256 hex string) and the part's index. The generic ``get``/``set``/
``batch_get``/``batch_set``/``exists`` work on flat pages (other layouts, older controllers).

Embedded (a ``TieredCache`` with the SSD tier under ``data_dir``; one process per data dir, so
with TP > 1 give each rank its own dir or use a sidecar) or against a running ``kvtier serve``
(``"url"``, ``"token"``). Pages of another model, KV dtype, page size, layout, TP/PP rank or
``salt`` are never served: all of these are in the namespace fingerprint (SGLang's own file
backend keys by model and rank only).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from kvtier.blocks import MAX_KEY_BYTES
from kvtier.config import CacheConfig, HostTierConfig, SSDTierConfig
from kvtier.errors import InvalidRequest
from kvtier.integrations.backend import BackendUnavailable, EngineBackend

log = logging.getLogger(__name__)

_GENERIC = 0x80  # part ids of flat pages (the generic API) start here: never mixed with v1 parts
_BACKEND_KEYS = {"backend_name", "module_path", "class_name", "interface_v1"}


def _engine_key(key: str, part: int) -> bytes:
    """SGLang's hex page hash as bytes (other strings as UTF-8, hashed if long), plus a part id."""
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        raw = key.encode()
    if not raw or len(raw) >= MAX_KEY_BYTES:
        raw = hashlib.blake2b(key.encode(), digest_size=32).digest()
    return raw + bytes([part])


def _open_backend(cfg: dict) -> Any:
    data_dir, url = cfg.get("data_dir"), cfg.get("url")
    if (data_dir is None) == (url is None):
        raise InvalidRequest("the kvtier HiCache backend needs exactly one of 'data_dir' (embedded) "
                             "or 'url' (a running kvtier serve) in its extra config")
    if url is not None:
        from kvtier.client import KVTierClient

        return KVTierClient(url, cfg.get("token"), timeout=float(cfg.get("timeout_s", 10.0)))
    from kvtier.manager import TieredCache

    return TieredCache(CacheConfig(
        host=HostTierConfig(capacity_bytes=0),  # SGLang's host pool is the host tier
        ssd=SSDTierConfig(path=data_dir, capacity_bytes=cfg.get("capacity", "64GiB"),
                          durability=cfg.get("durability", "none"),  # as the vLLM tier: a cache, verified reads
                          direct_io=bool(cfg.get("direct_io", True)),
                          min_free_bytes=cfg.get("min_free", "1GiB"))))


class KVTierHiCacheStorage(HiCacheStorage):
    """SGLang HiCache storage backed by kvtier; see the module docstring for its config keys:
    ``data_dir`` or ``url`` (+ ``token``), ``capacity``, ``durability``, ``direct_io``,
    ``min_free``, ``codec`` (``none``/``zstd``), ``salt``, ``namespace``, ``ttl_s``,
    ``timeout_s`` (a sidecar call; default 10: after one times out, calls fail at once for a
    back-off, ``kvtier.integrations.backend``)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None) -> None:
        self.storage_config = storage_config
        self._cfg = dict(storage_config.extra_config or {})
        unknown = set(self._cfg) - _BACKEND_KEYS - {
            "data_dir", "url", "token", "capacity", "durability", "direct_io", "min_free", "codec",
            "salt", "namespace", "ttl_s", "timeout_s"}
        if unknown:
            raise InvalidRequest(f"unknown kvtier HiCache config keys {sorted(unknown)}")
        self.backend = _open_backend(self._cfg)
        self.calls = EngineBackend(self.backend)
        self.mem_pool_host: Any = None  # SGLang's host pool, once registered
        self.namespace: str | None = None
        self._parts = 1  # blocks per page (K and V for MHA)
        self._part_bytes = 0
        self._writer = storage_config.is_storage_writer

    # ---- setup ----------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Learn the pool's page geometry and register the fingerprinted block namespace."""
        super().register_mem_pool_host(mem_pool_host)
        sizes = mem_pool_host.get_page_buffer_meta(torch.arange(mem_pool_host.page_size))[1]
        if len(set(sizes)) != 1:
            raise InvalidRequest(f"kvtier needs equal-sized page parts, the host pool has {sorted(set(sizes))}")
        self._register(len(sizes), sizes[0], mem_pool_host)

    def _register(self, parts: int, part_bytes: int, pool: Any | None) -> None:
        c = self.storage_config
        fp = {
            "engine": "sglang", "model": c.model_name or "", "mla": c.is_mla_model,
            "tp_size": c.tp_size, "tp_rank": None if c.is_mla_model else c.tp_rank,
            "pp_size": c.pp_size, "pp_rank": c.pp_rank, "cp_size": c.attn_cp_size,
            "cp_rank": c.attn_cp_rank, "dcp_size": c.dcp_size, "dcp_rank": c.dcp_rank,
            "dp_rank": c.dp_rank if not c.is_mla_model else None,
            "kv_dtype": str(getattr(pool, "dtype", "")), "layout": getattr(pool, "layout", ""),
            "page_tokens": getattr(pool, "page_size", 0), "layers": getattr(pool, "layer_num", 0),
            "parts": parts, "part_bytes": part_bytes, "salt": self._cfg.get("salt", ""),
        }
        digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        self.namespace = self._cfg.get("namespace") or f"sglang-{digest}"
        self.calls.register(self.namespace, page_bytes=part_bytes, fingerprint=fp,
                            codec=self._cfg.get("codec", "none"), ttl_s=self._cfg.get("ttl_s"))
        self._parts, self._part_bytes = parts, part_bytes

    def _part_views(self, host_indices: torch.Tensor, n_pages: int) -> list[torch.Tensor]:
        """Zero-copy uint8 views of every part of ``n_pages`` pages in the host pool."""
        pool = self.mem_pool_host
        ptrs, sizes = pool.get_page_buffer_meta(host_indices[: n_pages * pool.page_size])
        flat = pool.kv_buffer.view(-1).view(torch.uint8)
        base = flat.data_ptr()
        return [flat[p - base: p - base + s] for p, s in zip(ptrs, sizes, strict=True)]

    def _keys(self, keys: list[str], parts: range) -> list[bytes]:
        return [_engine_key(k, p) for k in keys for p in parts]

    # ---- the zero-copy v1 interface -------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many pages from the first one on are stored (every part of each)."""
        if not keys or self.namespace is None:
            return 0
        try:
            present = self.calls.block_exists(self._keys(keys, range(self._parts))).present
        except BackendUnavailable:  # a sidecar that did not answer lately: a miss, at once
            return 0
        for i in range(len(keys)):
            if not all(present[i * self._parts:(i + 1) * self._parts]):
                return i
        return len(keys)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Read pages straight into the host pool; True for the leading run that arrived whole."""
        if not keys:
            return []
        views = self._part_views(host_indices, len(keys))
        try:
            n = self.calls.get_blocks_into(self._keys(keys, range(self._parts)), views)
        except Exception as e:  # noqa: BLE001  a failed read is a miss for SGLang, never a crash
            log.warning("kvtier HiCache read of %d pages failed: %s", len(keys), e)
            n = 0
        whole = n // self._parts
        return [i < whole for i in range(len(keys))]

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Store pages straight from the host pool (a page already stored keeps its bytes)."""
        if not keys or not self._writer:  # an MLA replica that is not its shard's writer
            return [True] * len(keys)
        views = self._part_views(host_indices, len(keys))
        try:
            self.calls.put_blocks(self._keys(keys, range(self._parts)), views)
        except Exception as e:  # noqa: BLE001
            log.warning("kvtier HiCache write of %d pages failed: %s", len(keys), e)
            return [False] * len(keys)
        return [True] * len(keys)

    # ---- the generic interface: flat pages ------------------------------------------------
    def _flat_parts(self, nbytes: int) -> range:
        if self.namespace is None:  # no host pool registered: one block per value
            self._register(1, nbytes, None)
        if nbytes % self._part_bytes:
            raise InvalidRequest(f"a {nbytes}-byte value is not a whole number of "
                                 f"{self._part_bytes}-byte page parts")
        return range(_GENERIC, _GENERIC + nbytes // self._part_bytes)

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        if not self._writer:
            return True
        try:
            for key, value in zip(keys, values, strict=True):
                raw = value.detach().contiguous().cpu().view(-1).view(torch.uint8)
                parts = self._flat_parts(raw.numel())
                self.calls.put_blocks(self._keys([key], parts),
                                      raw.view(len(parts), self._part_bytes))
        except Exception as e:  # noqa: BLE001
            log.warning("kvtier HiCache generic write failed: %s", e)
            return False
        return True

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        targets = target_locations or [None] * len(keys)
        for key, target in zip(keys, targets, strict=True):
            if target is None:
                if self.namespace is None or self.mem_pool_host is None:
                    out.append(None)
                    continue
                target = self.mem_pool_host.get_dummy_flat_data_page()
            raw = target.view(-1).view(torch.uint8)
            parts = range(0)
            try:
                parts = self._flat_parts(raw.numel())
                n = self.calls.get_blocks_into(self._keys([key], parts),
                                               raw.view(len(parts), self._part_bytes))
            except Exception as e:  # noqa: BLE001
                log.warning("kvtier HiCache generic read of %s failed: %s", key, e)
                n = -1
            out.append(target if n == len(parts) else None)
        return out

    def exists(self, key: str) -> bool:
        """Stored whole, as zero-copy parts or as a flat page."""
        if self.namespace is None:
            return False
        if self.batch_exists([key]) == 1:
            return True
        flat = self._keys([key], range(_GENERIC, _GENERIC + self._parts))
        try:
            return self.calls.block_exists(flat).leading == len(flat)
        except BackendUnavailable:
            return False

    def clear(self) -> None:
        """Drop every page of this backend's namespace."""
        if self.namespace is not None:
            self.calls.drop_namespace()
            self._register(self._parts, self._part_bytes, self.mem_pool_host)

    def close(self) -> None:
        self.backend.close()
