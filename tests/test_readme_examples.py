"""The README's in-process example and the sidecar's defaults use distinct data directories, so
following the README in one directory works whichever runs first."""

from __future__ import annotations

import re
from pathlib import Path

from kvtier import CacheConfig, HostTierConfig, SSDTierConfig, TieredCache
from kvtier.settings import build_settings

README = Path(__file__).resolve().parents[1] / "README.md"


def example_ssd_path() -> str:
    paths = re.findall(r'SSDTierConfig\(path="([^"]+)"', README.read_text())
    assert paths, "the README's in-process example sets SSDTierConfig(path=...)"
    return paths[0]


def test_the_in_process_example_and_the_sidecar_never_share_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sidecar = build_settings({}, env={})
    example = Path(example_ssd_path()).resolve()
    sidecar_root = Path(sidecar.server.data_dir).resolve()
    assert example != sidecar_root and sidecar_root not in example.parents
    assert example not in sidecar_root.parents
    small = {"host": HostTierConfig(capacity_bytes="1MiB")}
    # the sidecar's cache open (kvtier serve running here), the example's opens beside it
    with TieredCache(CacheConfig(**small, ssd=SSDTierConfig(path=sidecar.cache.ssd.path, min_free_bytes=0))), \
            TieredCache(CacheConfig(**small, ssd=SSDTierConfig(path=example_ssd_path(), min_free_bytes=0))):
        pass
