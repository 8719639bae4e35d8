"""Redis/Valkey backend (standalone and Cluster) via redis-py: the everywhere-available option.

Value layout, under a namespace prefix (binary keys, ``prefix + key``):

- values up to ``chunk_bytes`` live in one key: manifest header, one crc32c, then the bytes;
- every crc32c is bound to the block's key and chunk index (``key_bound``), so a value moved
  under another key fails its check and is a miss;
- larger values are split into ``chunk_bytes`` chunks at ``prefix + key + b"#" + index`` and
  the manifest (header + one crc32c per chunk) is written last with ``SET NX``, so a reader
  sees the whole value or nothing, and the first writer wins. Chunks outlive the manifest's
  TTL by a minute so an unexpired manifest never points at expired chunks.

Chunks carry no hash tag, so in a Cluster one value's chunks (and a prefix's blocks) spread
over the nodes. Reads fetch the manifest and the chunks the requested span needs in one
pipelined round trip (per node). Every call is bounded by ``timeout_s`` through socket
timeouts with redis-py's retries turned off (a retry would multiply the bound).

Reads into host tensors on a single server skip redis-py's reply parser (``redis_direct``):
the payload is received straight into the caller's tensor and checksummed as it arrives, under
one deadline for the whole call. Cluster reads and device tensors take the redis-py path.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
from collections.abc import Iterator, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import numpy as np
import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvtier.block import checksum
from kvtier.errors import BackendUnavailable, CorruptBlock, InvalidRequest
from kvtier.tiers.remote.base import check_span, key_bound
from kvtier.tiers.remote.redis_direct import DirectReads
from kvtier.tiers.remote.redis_layout import (
    FLAG_INLINE,
    HEADER,
    MAGIC,
    VERSION,
    parse_header,
    parse_manifest,
)
from kvtier.tiers.remote.resp import ProtocolError, ReplyError

log = logging.getLogger(__name__)

CHUNK_TTL_SLACK_S = 60.0
DEFAULT_CHUNK_BYTES = 4 * 1024**2
# A big GET parsed through a small socket buffer starves other Python threads (ANCHORS.md).
DEFAULT_SOCKET_READ_SIZE = 4 * 1024**2


class RedisBackend:
    """RemoteBackend on one Redis/Valkey server or a Redis Cluster."""

    name = "redis"

    def __init__(
        self, url: str, *, cluster: bool = False, timeout_s: float = 1.0, prefix: str = "kvtier:",
        ttl_s: float | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        socket_read_size: int = DEFAULT_SOCKET_READ_SIZE,
    ) -> None:
        if not url:
            raise InvalidRequest("redis backend needs a url like 'redis://127.0.0.1:6379/0'")
        if chunk_bytes < 1024:
            raise InvalidRequest(f"chunk_bytes must be >= 1024, got {chunk_bytes}")
        if ttl_s is not None and ttl_s <= 0:
            raise InvalidRequest(f"ttl_s must be > 0 or None, got {ttl_s}")
        self.url = url
        self.cluster = cluster
        self.name = "redis-cluster" if cluster else "redis"
        self.timeout_s = timeout_s
        self.prefix = prefix.encode()
        self.chunk_bytes = chunk_bytes
        self._ttl_ms = None if ttl_s is None else int(ttl_s * 1000)
        self._chunk_ttl_ms = None if ttl_s is None else int((ttl_s + CHUNK_TTL_SLACK_S) * 1000)
        self._kwargs: dict[str, Any] = dict(
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            socket_read_size=socket_read_size, retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._lock = threading.Lock()
        self._client: redis.Redis | redis.cluster.RedisCluster | None = None
        self._direct = DirectReads(url, self._kwargs, timeout_s)

    # -- client -------------------------------------------------------------------------------

    def _get_client(self) -> redis.Redis | redis.cluster.RedisCluster:
        """Build the client on first use: a Cluster client connects at construction, and the
        engine being down at startup must not stop kvtier from starting."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                if self.cluster:
                    nodes = [redis.cluster.ClusterNode(h, p) for h, p in _hosts(self.url)]
                    self._client = redis.cluster.RedisCluster(
                        startup_nodes=nodes, reinitialize_steps=1, **self._kwargs)
                else:
                    self._client = redis.Redis.from_url(self.url, **self._kwargs)
            return self._client

    def _mkey(self, key: bytes) -> bytes:
        return self.prefix + key

    def _ckey(self, key: bytes, i: int) -> bytes:
        return self.prefix + key + b"#" + i.to_bytes(4, "big")

    # -- RemoteBackend ------------------------------------------------------------------------

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        with _translate():
            pipe = self._get_client().pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._mkey(k))
            return [bool(r) for r in pipe.execute()]

    def put(self, key: bytes, data: memoryview) -> None:
        length = data.nbytes
        with _translate():
            client = self._get_client()
            mkey = self._mkey(key)
            if length <= self.chunk_bytes:
                header = HEADER.pack(MAGIC, VERSION, FLAG_INLINE, 0, length, self.chunk_bytes, 1)
                value = b"".join((header, struct.pack("<I", key_bound(checksum(data), key, length)), data))
                client.set(mkey, value, nx=True, px=self._ttl_ms)
                return
            if client.exists(mkey):  # first writer wins; skip sending the chunks again
                return
            nchunks = -(-length // self.chunk_bytes)
            crcs = []
            pipe = client.pipeline(transaction=False)
            for i in range(nchunks):
                part = data[i * self.chunk_bytes:(i + 1) * self.chunk_bytes]
                crcs.append(key_bound(checksum(part), key, part.nbytes, i))
                pipe.set(self._ckey(key, i), part, px=self._chunk_ttl_ms)
            pipe.execute()
            manifest = HEADER.pack(MAGIC, VERSION, 0, 0, length, self.chunk_bytes, nchunks)
            client.set(mkey, manifest + struct.pack(f"<{nchunks}I", *crcs), nx=True, px=self._ttl_ms)

    def get_into(self, key: bytes, out, offset: int = 0) -> int:
        if not self.cluster and out.device.type == "cpu" and out.is_contiguous():
            with _translate():
                n = self._direct.get_into(self._mkey(key), self._ckey, key, out, offset,
                                          self.chunk_bytes)
            if n is not None:
                return n
        return self._get_into_parsed(key, out, offset)

    def _get_into_parsed(self, key: bytes, out, offset: int = 0) -> int:
        """The redis-py path: Cluster (redirections, several nodes) and device tensors."""
        nbytes = out.numel()
        cb = self.chunk_bytes
        first, last = offset // cb, (offset + max(nbytes, 1) - 1) // cb
        with _translate():
            client = self._get_client()
            if last == 0:  # fits the first chunk: most likely an inline value, one plain GET
                res: list[Any] = [client.get(self._mkey(key))]
            else:  # manifest and the chunks the span needs, in one pipelined round trip
                pipe = client.pipeline(transaction=False)
                pipe.get(self._mkey(key))
                for i in range(first, last + 1):
                    pipe.get(self._ckey(key, i))
                res = pipe.execute()
            manifest = res[0]
            if manifest is None:
                raise KeyError(key)
            length, chunk_bytes, nchunks, inline, crcs = parse_manifest(manifest, key)
            check_span(length, offset, nbytes, key)
            if inline:
                data = memoryview(manifest)[HEADER.size + 4:]
                _verify(data, crcs[0], key, 0)
                _copy(out, 0, data[offset:offset + nbytes])
                return nbytes
            if chunk_bytes != cb or len(res) == 1:  # another chunk size, or chunks not fetched
                first, last = offset // chunk_bytes, (offset + max(nbytes, 1) - 1) // chunk_bytes
                pipe = self._get_client().pipeline(transaction=False)
                for i in range(first, last + 1):
                    pipe.get(self._ckey(key, i))
                chunks = pipe.execute()
            else:
                chunks = res[1:]
        pos = 0
        for i, chunk in zip(range(first, last + 1), chunks, strict=True):
            if chunk is None:
                raise KeyError(key)  # expired or evicted under the manifest: a miss
            view = memoryview(chunk)
            _verify(view, crcs[i], key, i)
            start = max(offset - i * chunk_bytes, 0)
            take = min(len(view) - start, nbytes - pos)
            _copy(out, pos, view[start:start + take])
            pos += take
        return nbytes

    def size(self, key: bytes) -> int | None:
        with _translate():  # replies are bytes (no decode_responses)
            head = cast(bytes, self._get_client().getrange(self._mkey(key), 0, HEADER.size - 1))
        if not head:
            return None
        return parse_header(head, key)[0]

    def delete(self, key: bytes) -> bool:
        with _translate():
            client = self._get_client()
            head = cast(bytes, client.getrange(self._mkey(key), 0, HEADER.size - 1))
            if not head:
                return False
            _, _, nchunks, flags = parse_header(head, key)
            client.delete(self._mkey(key))  # manifest first: readers never see a partial value
            if not flags & FLAG_INLINE:
                pipe = client.pipeline(transaction=False)
                for i in range(nchunks):
                    pipe.delete(self._ckey(key, i))
                pipe.execute()
            return True

    def close(self) -> None:
        self._direct.close()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    # -- raw access for benchmarks and tests --------------------------------------------------

    def raw_client(self) -> redis.Redis | redis.cluster.RedisCluster:
        return self._get_client()


@contextlib.contextmanager
def _translate() -> Iterator[None]:
    """redis-py errors -> TimeoutError (the bound was hit) or BackendUnavailable."""
    try:
        yield
    except TimeoutError:
        raise
    except redis.exceptions.TimeoutError as e:
        raise TimeoutError(f"redis call timed out: {e}") from e
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError,
            ReplyError, ProtocolError) as e:
        raise BackendUnavailable(f"redis unavailable: {type(e).__name__}: {e}") from e


def _hosts(url: str) -> list[tuple[str, int]]:
    """``redis://h1:p1,h2:p2`` (or a bare ``h1:p1,h2:p2``) -> [(h1, p1), (h2, p2)]."""
    netloc = urlsplit(url).netloc if "://" in url else url
    hosts = []
    for part in netloc.split("@")[-1].split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise InvalidRequest(f"malformed redis cluster url {url!r}: expected host:port[,host:port]")
        hosts.append((host, int(port)))
    return hosts


def _verify(data: memoryview, crc: int, key: bytes, part: int) -> None:
    if key_bound(checksum(data), key, data.nbytes, part) != crc:
        raise CorruptBlock(f"remote value {key.hex()} failed its crc32c check")


def _copy(out, pos: int, src: memoryview) -> None:
    """Copy ``src`` into ``out[pos:]``: a memcpy for host tensors, a staged copy otherwise."""
    n = src.nbytes
    if n == 0:
        return
    arr = np.frombuffer(src, dtype=np.uint8)
    if out.device.type == "cpu":
        out.numpy()[pos:pos + n] = arr
    else:
        import torch

        out[pos:pos + n].copy_(torch.from_numpy(arr.copy()))
