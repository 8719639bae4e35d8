"""LMCache's ``LocalDiskBackend`` batched get, the reference ``kvtier.bench.io_compare`` times
next to kvtier's ``get``: run by LMCache's own interpreter (a separate venv with
``lmcache==0.5.6``), never imported by kvtier.

    VENV/bin/python bench/lmcache_disk.py DIR BS SIZE put      # lay out SIZE bytes in BS chunks
    VENV/bin/python bench/lmcache_disk.py DIR BS SIZE get      # one batched get of all; prints JSON

Chunks are ``[2, 32 layers, tokens, 1024]`` bf16 (Llama-3-8B's 128 KiB a token, ``KV_2LTD``),
written through the backend's put tasks with its defaults (buffered I/O, 4 disk threads); the
key index is rebuilt from the files for ``get`` (LMCache keeps it in memory only), so a get runs
in a fresh process after the page cache was dropped. Prints ``{"seconds": s, "bytes": n}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time


def main(argv: list[str]) -> int:
    import torch
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_allocators.host_memory_allocator import HostMemoryAllocator
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend

    root, bs, size, what = argv[0], int(argv[1]), int(argv[2]), argv[3]
    n = size // bs
    tokens = bs // (2 * 32 * 1024 * 2)
    shape = torch.Size([2, 32, tokens, 1024])
    os.makedirs(root, exist_ok=True)
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=tokens, local_cpu=False, max_local_cpu_size=1,
                                            local_disk=root, max_local_disk_size=size * 2 / 1024**3)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    staging = min(size, 1024**3) if what == "put" else size + bs
    cpu = LocalCPUBackend(cfg, memory_allocator=HostMemoryAllocator(staging), dst_device="cpu")
    disk = LocalDiskBackend(cfg, loop, cpu, dst_device="cpu")
    keys = [CacheEngineKey("bench", 1, 0, i, torch.bfloat16) for i in range(n)]
    if what == "put":
        done = threading.Semaphore(0)
        for k in keys:
            obj = cpu.allocate(shape, torch.bfloat16, MemoryFormat.KV_2LTD)
            while obj is None:  # staging full: wait for a write to finish
                done.acquire()
                obj = cpu.allocate(shape, torch.bfloat16, MemoryFormat.KV_2LTD)
            obj.tensor.view(torch.uint8).random_()
            disk.submit_put_task(k, obj, on_complete_callback=lambda _k: done.release())
            obj.ref_count_down()
        for _ in keys:
            done.acquire()
        os.sync()
        print(json.dumps({"files": len(os.listdir(disk.path))}), flush=True)
        return 0
    for k in keys:  # the in-memory index, as the put left it
        disk.insert_key(k, bs, shape, torch.bfloat16, MemoryFormat.KV_2LTD)
    t = time.perf_counter()
    objs = disk.batched_get_blocking(keys)
    seconds = time.perf_counter() - t
    got = sum(1 for o in objs if o is not None)
    print(json.dumps({"seconds": seconds, "bytes": got * bs, "chunks": got}), flush=True)
    return 0 if got == n else 1


if __name__ == "__main__":
    rc = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(rc)  # LMCache's event-loop workers never stop by themselves
