"""Agentic trace replay: what hit rate, bytes moved and prefill time a tier configuration gives.

A trace is a time-ordered list of requests. Each request's prompt is a list of named *segments*
(a shared system prompt, then a session's earlier user and assistant turns, then the new user
turn) and its output is one more segment; equal segment names mean equal token ids, so sessions
sharing a system prompt share a cached prefix and a session's next turn extends its last one.
Traces are generated from parameters (seeded, deterministic) or read from JSONL (see
``docs/bench-trace.md``).

Replay does what an engine does per request: ``lookup`` the prompt (hit tokens, per tier), load
the hit if part of it sits below the fastest tier (``get`` promotes it), then ``put`` the whole
context (prompt + output). It runs kvtier's real ``TieredCache`` with a *tiny* KV layout, every
tier sized to hold exactly as many blocks as the real model's KV would fit in its configured
bytes: see ``TierPlan``. Byte figures are reported at the real model's block size.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvtier.bench.params import TraceParams
from kvtier.block import header_size
from kvtier.config import CacheConfig, HostTierConfig, SSDTierConfig
from kvtier.errors import InvalidRequest
from kvtier.keys import prefix_hashes
from kvtier.layout import KVLayout
from kvtier.manager import TieredCache

Segment = tuple[str, int]
VOCAB = 32000
NAMESPACE = "trace"
# One layer of one float16 value per token: the smallest real layout kvtier accepts.
TINY_LAYOUT = KVLayout(1, ((1,),), "float16")
_PAGE = 4096  # the slab allocator's smallest size class


@dataclass(frozen=True, slots=True)
class Request:
    """One request: ``prompt`` segments, then an ``output`` segment the engine generates."""

    t: float  # seconds from the start of the trace
    session: str
    prompt: tuple[Segment, ...]
    output: Segment | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(n for _, n in self.prompt)

    def to_dict(self) -> dict:
        return {"t": round(self.t, 6), "session": self.session,
                "prompt": [list(s) for s in self.prompt],
                "output": list(self.output) if self.output else None}


def generate(p: TraceParams) -> list[Request]:
    """A deterministic trace: equal params give equal requests on every machine."""
    rng = np.random.default_rng(p.seed)

    def draw(mean: int) -> int:
        return int(rng.integers(max(1, mean // 2), mean + mean // 2 + 1))

    systems = [(f"sys{i}", draw(p.system_tokens)) for i in range(p.system_prompts)]
    ranks = rng.permutation(p.sessions) + 1  # popularity independent of arrival order
    weights = ranks.astype(float) ** -p.zipf_alpha
    turns = np.clip(np.rint(p.mean_turns * p.sessions * weights / weights.sum()), 1, p.max_turns)
    start = np.cumsum(rng.exponential(1.0 / p.arrival_rate, p.sessions))
    out: list[Request] = []
    for s in range(p.sessions):
        sid = f"s{s:05d}"
        history: list[Segment] = [systems[int(rng.integers(p.system_prompts))]]
        t = float(start[s])
        for k in range(int(turns[s])):
            if k:
                t += float(rng.exponential(p.think_time_s)) if p.think_time_s else 0.0
            history.append((f"{sid}.u{k}", draw(p.user_tokens)))
            answer = (f"{sid}.a{k}", draw(p.assistant_tokens))
            out.append(Request(t, sid, tuple(history), answer))
            history.append(answer)
    out.sort(key=lambda r: r.t)
    return out


def write_jsonl(requests: Sequence[Request], path: str | Path) -> None:
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps(r.to_dict(), separators=(",", ":")) + "\n")


def read_jsonl(path: str | Path) -> list[Request]:
    """Requests of a JSONL trace, sorted by time. Raises InvalidRequest naming file:line."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"cannot read trace {path}: {getattr(e, 'strerror', None) or e}") from None
    out: list[Request] = []
    lengths: dict[str, int] = {}
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"{path}:{no}: not JSON ({e.msg})") from None
        try:
            req = _request(obj)
        except InvalidRequest as e:
            raise InvalidRequest(f"{path}:{no}: {e}") from None
        for name, n in (*req.prompt, *([req.output] if req.output else [])):
            if lengths.setdefault(name, n) != n:
                raise InvalidRequest(f"{path}:{no}: segment {name!r} has {n} tokens here but "
                                     f"{lengths[name]} earlier (a segment name means fixed tokens)")
        out.append(req)
    if not out:
        raise InvalidRequest(f"trace {path} has no requests")
    out.sort(key=lambda r: r.t)
    return out


def _request(obj: object) -> Request:
    if not isinstance(obj, dict):
        raise InvalidRequest(f"expected a JSON object, got {type(obj).__name__}")
    t = obj.get("t")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
        raise InvalidRequest(f"'t' must be a number of seconds >= 0, got {t!r}")
    session = obj.get("session", "")
    if not isinstance(session, str):
        raise InvalidRequest(f"'session' must be a string, got {session!r}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequest(f"'prompt' must be a non-empty list of [segment, tokens] pairs, got {prompt!r}")
    output = obj.get("output")
    return Request(float(t), session, tuple(_segment(s, "prompt") for s in prompt),
                   None if output is None else _segment(output, "output"))


def _segment(s: object, where: str) -> Segment:
    if (isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and s[0]
            and isinstance(s[1], int) and not isinstance(s[1], bool) and s[1] > 0):
        return s[0], s[1]
    raise InvalidRequest(f"{where} segment must be [name, tokens > 0], got {s!r}")


class SegmentTokens:
    """Token ids of named segments: a pure function of the name (blake2b-seeded)."""

    def __init__(self) -> None:
        self._cache: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int) -> np.ndarray:
        arr = self._cache.get(name)
        if arr is None:
            seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
            arr = self._cache[name] = np.random.default_rng(seed).integers(0, VOCAB, n, dtype=np.int64)
        return arr

    def concat(self, segments: Sequence[Segment]) -> np.ndarray:
        return np.concatenate([self.get(name, n) for name, n in segments])


@dataclass(frozen=True, slots=True)
class TierPlan:
    """How real capacities map onto the tiny replay layout.

    A tier of ``capacity_bytes`` holds ``blocks = capacity_bytes // real_block_bytes`` blocks
    of the real model. The replay gives the host tier ``blocks`` slab pages of exactly one tiny
    block slot each (the page *is* the size class) and the SSD tier ``blocks`` times the tiny
    block's encoded size, so both hold exactly ``blocks`` blocks.
    """

    block_tokens: int
    bytes_per_token: float  # of the real model's KV (fractional for compressed-attention models)
    capacities: dict[str, int]  # tier -> real bytes; "host" and optionally "ssd"

    @property
    def real_block_bytes(self) -> int:
        return math.ceil(self.block_tokens * self.bytes_per_token)

    @property
    def tiny_block_bytes(self) -> int:
        return header_size(TINY_LAYOUT.num_layers, "none") + self.block_tokens * TINY_LAYOUT.bytes_per_token

    @property
    def tiny_slot_bytes(self) -> int:
        return -(-self.tiny_block_bytes // _PAGE) * _PAGE

    def blocks(self, tier: str) -> int:
        return self.capacities.get(tier, 0) // self.real_block_bytes

    def cache_config(self, ssd_path: str | None) -> CacheConfig:
        for tier in self.capacities:
            if tier not in ("host", "ssd"):
                raise InvalidRequest(f"unknown tier {tier!r} for trace replay: expected host or ssd")
            if self.blocks(tier) < 1:
                raise InvalidRequest(
                    f"{tier} capacity {self.capacities[tier]} B holds no {self.real_block_bytes}-byte "
                    f"block ({self.block_tokens} tokens x {self.bytes_per_token} B/token)")
        slot = self.tiny_slot_bytes
        host = HostTierConfig(capacity_bytes=self.blocks("host") * slot, page_bytes=slot, pinned=False)
        ssd = SSDTierConfig(path=None, capacity_bytes=0)
        if self.capacities.get("ssd") and ssd_path:
            ssd = SSDTierConfig(path=ssd_path, capacity_bytes=self.blocks("ssd") * self.tiny_block_bytes,
                                durability="none", admission="write_back", direct_io=False,
                                min_free_bytes=0, io_threads=1, map_size=1 << 30)
        return CacheConfig(block_tokens=self.block_tokens, host=host, ssd=ssd)


@dataclass(slots=True)
class TierResult:
    name: str
    capacity_bytes: int
    capacity_blocks: int
    hit_lookups: int = 0  # lookups served at least one block by this tier
    hit_blocks: int = 0
    hit_tokens: int = 0
    bytes_written: int = 0  # real bytes stored into the tier (puts, demotions, promotions)
    bytes_reloaded: int = 0  # real bytes an engine reads from the tier for its hits
    evicted_blocks: int = 0
    demotions: int = 0
    promotions: int = 0
    hit_age_s: dict[str, float | None] = field(default_factory=dict)  # percentiles, trace time
    resident_age_s: dict[str, float | None] = field(default_factory=dict)


@dataclass(slots=True)
class ReplayResult:
    requests: int
    prompt_tokens: int
    hit_lookups: int
    hit_tokens: int
    dropped_blocks: int
    wall_s: float
    plan: TierPlan
    tiers: dict[str, TierResult]

    @property
    def hit_rate_lookups(self) -> float:
        return self.hit_lookups / self.requests if self.requests else 0.0

    @property
    def hit_rate_tokens(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def ttft(self, prefill_rate: float) -> dict[str, float]:
        """Prefill seconds without a cache, with it, and saved (reload cost not counted)."""
        full = self.prompt_tokens / prefill_rate
        saved = self.hit_tokens / prefill_rate
        n = max(1, self.requests)
        return {"prefill_rate_tokens_per_s": prefill_rate, "recompute_s": full, "saved_s": saved,
                "mean_ttft_recompute_s": full / n, "mean_ttft_cached_s": (full - saved) / n,
                "mean_saved_per_request_s": saved / n}

    def to_dict(self) -> dict:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "hit_lookups": self.hit_lookups, "hit_tokens": self.hit_tokens,
                "hit_rate_lookups": self.hit_rate_lookups, "hit_rate_tokens": self.hit_rate_tokens,
                "dropped_blocks": self.dropped_blocks, "wall_s": self.wall_s,
                "block_tokens": self.plan.block_tokens, "bytes_per_token": self.plan.bytes_per_token,
                "tiers": {k: {f: getattr(v, f) for f in TierResult.__slots__} for k, v in self.tiers.items()}}


Progress = Callable[[int, int], None]
PERCENTILES = (("p50", 50), ("p90", 90), ("p99", 99))


def replay(requests: Sequence[Request], plan: TierPlan, *, progress: Progress | None = None,
           load_hits: bool = True) -> ReplayResult:
    """Replay ``requests`` against a fresh TieredCache laid out by ``plan``."""
    if not requests:
        raise InvalidRequest("the trace has no requests to replay")
    with tempfile.TemporaryDirectory(prefix="kvtier-trace-") as tmp:
        config = plan.cache_config(str(Path(tmp) / "ssd"))
        with TieredCache(config) as cache:
            return _replay(cache, requests, plan, progress, load_hits)


def _replay(cache: TieredCache, requests: Sequence[Request], plan: TierPlan,
            progress: Progress | None, load_hits: bool) -> ReplayResult:
    bt = plan.block_tokens
    ns = cache.register_namespace(NAMESPACE, layout=TINY_LAYOUT, block_tokens=bt, codec="none")
    digest, top = ns.digest, cache.tiers[0].name
    most = max(r.prompt_tokens + (r.output[1] if r.output else 0) for r in requests)
    kv_buf = torch.zeros(most, 1, dtype=torch.float16)
    segs = SegmentTokens()
    created: dict[bytes, float] = {}  # key -> trace time it was (last) stored
    hit_ages: dict[str, list[float]] = defaultdict(list)
    per_tier: Counter = Counter()
    tier_lookups: Counter = Counter()
    hit_lookups = hit_tokens = prompt_tokens = 0
    start = time.perf_counter()
    for i, req in enumerate(requests):
        prompt = segs.concat(req.prompt)
        hit = cache.lookup(NAMESPACE, prompt)
        prompt_tokens += len(prompt)
        if hit.blocks:
            hit_lookups += 1
            hit_tokens += hit.tokens
            for b in hit.blocks:
                per_tier[b.tier] += 1
                hit_ages[b.tier].append(req.t - created.get(b.key, req.t))
            tier_lookups.update({b.tier for b in hit.blocks})
            if load_hits and any(b.tier != top for b in hit.blocks):
                cache.get(NAMESPACE, prompt)  # an engine loads the hit: promotes it
        full = np.concatenate([prompt, segs.get(*req.output)]) if req.output else prompt
        keys = prefix_hashes(digest, full, bt)
        held = [any(t.contains(k) for t in cache.tiers) for k in keys]
        cache.put(NAMESPACE, full, [(kv_buf[: len(full)],)])
        for k, was in zip(keys, held, strict=True):
            if not was:
                created[k] = req.t
        if progress:
            progress(i + 1, len(requests))
    end_t = requests[-1].t if requests else 0.0
    stats = cache.stats()
    tiers: dict[str, TierResult] = {}
    real = plan.real_block_bytes
    for tier in cache.tiers:
        ts = stats.tiers[tier.name]
        resident = [end_t - c for k, c in created.items() if tier.contains(k)]
        tiers[tier.name] = TierResult(
            tier.name, plan.capacities.get(tier.name, 0), plan.blocks(tier.name),
            tier_lookups[tier.name], per_tier[tier.name], per_tier[tier.name] * bt, ts.blocks_written * real,
            per_tier[tier.name] * real, sum(ts.evictions.values()), ts.demotions, ts.promotions,
            percentiles(hit_ages[tier.name]), percentiles(resident))
    return ReplayResult(len(requests), prompt_tokens, hit_lookups, hit_tokens,
                        stats.blocks_dropped, time.perf_counter() - start, plan, tiers)


def percentiles(xs: Sequence[float]) -> dict[str, float | None]:
    if not xs:
        return {k: None for k, _ in PERCENTILES}
    vals = np.percentile(np.asarray(xs, dtype=float), [q for _, q in PERCENTILES])
    return {k: float(v) for (k, _), v in zip(PERCENTILES, vals, strict=True)}


def geometric(lo: int, hi: int, points: int) -> list[int]:
    """``points`` sizes from ``lo`` to ``hi`` in equal ratios (ends included)."""
    if points < 2 or lo == hi:
        return [lo]
    r = (hi / lo) ** (1 / (points - 1))
    return [int(round(lo * r**i)) for i in range(points - 1)] + [hi]


def default_points(lo: int, hi: int) -> int:
    """Doubling steps (1GiB..64GiB -> 7 points), at most 9."""
    return max(2, min(9, round(math.log2(hi / lo)) + 1)) if hi > lo else 1


def measure_prefill_rate(tokens: int = 512, repeats: int = 3) -> float:
    """Prefill tokens/s of a small Llama-architecture transformers model (random weights) here.

    The model is small (4 layers, hidden 256) so this measures this machine, not a production
    model: use it to compare runs on one machine, and ``--prefill-rate`` for real deployments.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4 * tokens)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (1, tokens))
    times = []
    with torch.inference_mode():
        model(ids, use_cache=True)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids, use_cache=True)
            times.append(time.perf_counter() - t0)
    return tokens / float(np.median(times))

