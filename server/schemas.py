"""Request and response models: the OpenAPI schema is generated from these.

Token ids are strict non-negative integers (``"5"`` or ``5.0`` are rejected, not coerced);
the per-request length limit is a setting, checked in the routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TokenId = Annotated[int, Field(strict=True, ge=0, le=2**62)]
Dim = Annotated[int, Field(strict=True, ge=1, le=1 << 20)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Layout(Strict):
    """Per-token KV shape: ``num_layers`` layers of tensors shaped ``[tokens, *tensor_shape]``."""

    num_layers: Annotated[int, Field(strict=True, ge=1, le=4096)]
    tensor_shapes: list[list[Dim]] = Field(min_length=1, max_length=16)
    dtype: str = Field(examples=["float16", "bfloat16", "float32"])


class NamespaceCreate(Strict):
    name: str = Field(min_length=1, max_length=200, examples=["llama3-8b"])
    model_id: str | None = Field(None, max_length=256)
    layout: Layout | None = None
    block_tokens: Annotated[int, Field(strict=True, ge=1, le=1 << 20)] | None = None
    codec: str | None = Field(None, max_length=64, examples=["none", "fp8", "int8+zstd"])
    ttl_s: Annotated[float, Field(gt=0, le=10 * 365 * 86400)] | None = None


class BlockNamespaceCreate(Strict):
    """A namespace of an engine's opaque pages, addressed by the engine's own keys."""

    name: str = Field(min_length=1, max_length=200, examples=["vllm-llama3-8b-tp0"])
    page_bytes: Annotated[int, Field(strict=True, ge=1, le=1 << 30)]
    fingerprint: dict[str, Any] | str = Field(
        description="the engine configuration (model, KV dtype, tokens per block, TP/PP rank, "
        "cache layout, salt); part of every key, so two configurations never share a page")
    codec: str = Field("none", max_length=64, description="lossless only: none or zstd")
    ttl_s: Annotated[float, Field(gt=0, le=10 * 365 * 86400)] | None = None


class LayoutOut(BaseModel):
    """A namespace's layout as the server answers it: no input bounds (a block namespace's
    layout is one tensor of ``page_bytes``, up to 1 GiB, past ``Dim``'s bound)."""

    num_layers: int
    tensor_shapes: list[list[int]]
    dtype: str


class NamespaceOut(BaseModel):
    name: str
    model_id: str
    block_tokens: int
    codec: str
    layout: LayoutOut | None
    ttl_s: float | None
    tenant: str
    kind: Literal["kv", "pages"] = "kv"
    fingerprint: str | None = Field(None, description="block namespaces: the engine configuration")
    page_bytes: int | None = Field(None, description="block namespaces: bytes of one page")


class BlockHitsOut(BaseModel):
    leading: int = Field(description="keys present from key 0 on: what an engine can load")
    present: list[bool]


class BlocksStoredOut(BaseModel):
    stored: int = Field(description="blocks newly stored (a key already stored keeps its page)")


class TokensRequest(Strict):
    namespace: str = Field(min_length=1, max_length=300)
    token_ids: list[TokenId] = Field(min_length=1)


class PrefetchRequest(TokensRequest):
    to: str = Field("host", max_length=32, description="target tier: device or host")
    policy: Literal["best_effort", "wait_complete", "timeout"] = Field(
        "best_effort", description="best_effort answers at once; wait_complete when done; "
        "timeout when done or after timeout_s, reporting the contiguous tokens that arrived")
    timeout_s: float | None = Field(None, gt=0, le=300, description="for policy=timeout; default "
                                    "grows with the prefix length, capped")


class BlockOut(BaseModel):
    index: int
    key: str = Field(description="hex of the 16-byte chained prefix hash")
    tier: str


class HitOut(BaseModel):
    namespace: str
    tokens: int = Field(description="cached prefix length (a multiple of block_tokens)")
    block_tokens: int
    requested_tokens: int
    tiers: dict[str, int]
    blocks: list[BlockOut]


class PrefetchOut(BaseModel):
    id: str
    namespace: str
    target: str
    state: Literal["pending", "running", "done", "failed", "cancelled", "timeout"]
    ready_tokens: int
    requested_tokens: int
    policy: str = "best_effort"
    stopped_by: str | None = None
    error: str | None = None
    cancelled: bool | None = Field(None, description="DELETE only: whether this call stopped a "
                                                      "prefetch still running (false: it had finished)")


class CountOut(BaseModel):
    blocks: int = Field(description="blocks removed")


class StoredOut(BaseModel):
    tokens: int = Field(description="tokens newly stored")


class ShmRegion(Strict):
    """A window of a region the client handed over on the region socket (``kvtier.server.shm_socket``)."""

    id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$", description="the id the region socket "
                           "answered when the client handed the region over (GET /v1/kv/shm/socket)")
    name: str | None = Field(None, max_length=256, json_schema_extra={"deprecated": True},
                             description="no longer accepted: regions are not opened by name "
                             "(400); send id")
    offset: Annotated[int, Field(strict=True, ge=0)] = 0
    size: Annotated[int, Field(strict=True, ge=0)] = Field(
        description="bytes the client made available at offset")


class ShmSocketOut(BaseModel):
    path: str = Field(description="the region socket: a Unix SOCK_SEQPACKET socket on this host")
    protocol: int = Field(description="version of the socket's messages (server.shm_socket)")


class ShmPutRequest(TokensRequest):
    """KV for ``len(token_ids)`` tokens, packed layer by layer, tensor by tensor, each
    ``[slot_tokens, *tensor_shape]`` C-contiguous, starting at ``region.offset``; the first
    ``len(token_ids)`` rows of each tensor are stored."""

    layout: Layout
    region: ShmRegion
    slot_tokens: Annotated[int, Field(strict=True, ge=1, le=1 << 40)] | None = Field(
        None, description="rows per tensor in the region (default len(token_ids)); a buffer "
        "from KVTierClient.kv_buffer sized for more tokens than this put uses sends its capacity")


class ShmGetRequest(TokensRequest):
    region: ShmRegion


class ShmGetOut(BaseModel):
    tokens: int = Field(description="valid tokens: the first rows of each tensor slot")
    slot_tokens: int = Field(description="rows per tensor in the packed region (>= tokens)")
    layout: LayoutOut | None
    nbytes: int


class TierStatsOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    misses: int
    hit_tokens: int
    blocks_read: int
    blocks_written: int
    bytes_read: int
    bytes_written: int
    promotions: int
    demotions: int
    evictions: dict[str, int]
    corrupt_blocks: int
    put_failures: int
    reload_seconds: dict[str, Any]
    age_seconds: dict[str, Any]


class NamespaceStatsOut(BaseModel):
    lookups: int
    lookup_hits: int
    tokens_looked_up: int
    tokens_hit: int
    hit_rate_tokens: float
    puts: int
    tokens_put: int


class StatsOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    lookups: int
    lookup_hits: int
    tokens_looked_up: int
    tokens_hit: int
    hit_rate_lookups: float
    hit_rate_tokens: float
    puts: int
    tokens_put: int
    blocks_dropped: int
    prefetch: dict[str, int]
    cost_decisions: dict[str, int]
    tiers: dict[str, TierStatsOut]
    namespaces: dict[str, NamespaceStatsOut] = Field(
        default_factory=dict, description="per-namespace counters, only the caller's own")


class ErrorOut(BaseModel):
    error: str = Field(description="exception class, e.g. UnknownNamespace")
    message: str = Field(description="what was wrong, naming the bad value")
    status: int


class HealthOut(BaseModel):
    status: str  # ok | degraded | unavailable
    detail: str | None = None
    problems: list[str] | None = None  # with "degraded": what each tier lacks
