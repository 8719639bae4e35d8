"""``kvtier bench trace``: trace generation and JSONL, replay against a reference LRU, the CLI.

The acceptance test replays a generated 200-session trace through the real CLI in a subprocess
and checks its hit rate against a plain OrderedDict LRU model written here from the manager's
documented semantics (parents more recent than children after a put; a lookup touches from the
last hit block to the first; a victim leaves with its descendants; a put never evicts its own
chain).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import pytest

from kvtier import cli as cli_main
from kvtier.bench import plots
from kvtier.bench import trace as tr
from kvtier.commands import bench as bench_cmd
from kvtier.errors import InvalidRequest

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
LLAMA_8B = 131_072  # KV bytes per token, bf16
BT = 256
# 200 sessions, sized so a replay takes a couple of seconds on a 2-core machine.
ACCEPT = dict(sessions=200, user_tokens=512, mean_turns=6.0, seed=7)


# ---- reference model -------------------------------------------------------------------------
class LRUModel:
    """Plain LRU over chained block keys, with the capacity in blocks."""

    def __init__(self, capacity_blocks: int) -> None:
        self.cap = capacity_blocks
        self.order: OrderedDict[bytes, None] = OrderedDict()
        self.children: dict[bytes, set[bytes]] = defaultdict(set)
        self.parent: dict[bytes, bytes | None] = {}
        self.evicted = 0

    def lookup(self, keys: list[bytes]) -> int:
        n = 0
        while n < len(keys) and keys[n] in self.order:
            n += 1
        for k in reversed(keys[:n]):
            self.order.move_to_end(k)
        return n

    def put(self, keys: list[bytes]) -> None:
        chain: set[bytes] = set()  # what this put holds: never a victim
        for i, k in enumerate(keys):
            if k not in self.order:
                while len(self.order) >= self.cap:
                    victim = next((v for v in self.order if v not in chain), None)
                    if victim is None:
                        break
                    self.evicted += 1
                    self._drop(victim)
                if len(self.order) >= self.cap:
                    break
                self.order[k] = None
                self.parent[k] = keys[i - 1] if i else None
                if i:
                    self.children[keys[i - 1]].add(k)
            chain.add(k)
        for k in reversed(keys):
            if k in self.order:
                self.order.move_to_end(k)

    def _drop(self, k: bytes) -> None:
        for child in list(self.children.pop(k, ())):
            self._drop(child)
        del self.order[k]
        p = self.parent.pop(k)
        if p is not None and p in self.children:
            self.children[p].discard(k)


def block_keys(tokens: np.ndarray, bt: int) -> list[bytes]:
    """Chained keys, independently of kvtier.keys (sha256 of parent key + block bytes)."""
    out, prev = [], b""
    for i in range(len(tokens) // bt):
        prev = hashlib.sha256(prev + tokens[i * bt:(i + 1) * bt].tobytes()).digest()
        out.append(prev)
    return out


def reference(requests: list[tr.Request], capacity_blocks: int, bt: int = BT) -> dict:
    model, segs = LRUModel(capacity_blocks), tr.SegmentTokens()
    hit_tokens = prompt_tokens = hit_lookups = 0
    for r in requests:
        prompt = segs.concat(r.prompt)
        n = model.lookup(block_keys(prompt, bt))
        hit_tokens += n * bt
        prompt_tokens += len(prompt)
        hit_lookups += n > 0
        full = np.concatenate([prompt, segs.get(*r.output)]) if r.output else prompt
        model.put(block_keys(full, bt))
    return {"tokens": hit_tokens / prompt_tokens, "lookups": hit_lookups / len(requests),
            "evicted": model.evicted}


# ---- CLI helper ----------------------------------------------------------------------------
def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m kvtier bench trace ...`` (the standalone bench entry until kvtier.cli lists bench)."""
    entry = ["-m", "kvtier", "bench"] if "bench" in cli_main.COMMANDS else ["-m", "kvtier.commands.bench"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *entry, "trace", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def gen_flags(p: dict) -> list[str]:
    names = {"sessions": "--sessions", "user_tokens": "--user-tokens", "mean_turns": "--turns", "seed": "--seed"}
    return [x for k, v in p.items() for x in (names[k], str(v))]


# ---- acceptance ------------------------------------------------------------------------------
def test_cli_replay_of_200_sessions_matches_reference_lru():
    requests = tr.generate(tr.TraceParams(**ACCEPT))
    host = 4 * GIB  # 128 blocks of 32 MiB: well under the working set
    start = time.monotonic()
    proc = cli(*gen_flags(ACCEPT), "--host", "4GiB", "--model", "Llama-3-8B", "--json")
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 60, f"bench trace took {elapsed:.1f} s"
    assert "replay: " in proc.stderr and f"{len(requests)}/{len(requests)} requests" in proc.stderr
    got = json.loads(proc.stdout)
    ref = reference(requests, host // (BT * LLAMA_8B))
    assert got["requests"] == len(requests)
    assert ref["evicted"] > 0 and 0.05 < ref["tokens"] < 0.95, ref  # the capacity really binds
    assert got["hit_rate_tokens"] == pytest.approx(ref["tokens"], abs=0.01)
    assert got["hit_rate_lookups"] == pytest.approx(ref["lookups"], abs=0.01)
    assert got["tiers"]["host"]["capacity_blocks"] == 128
    assert got["ttft"]["saved_s"] == pytest.approx(got["hit_tokens"] / 10_000)


@pytest.mark.parametrize("host_gib", [1, 16])
def test_library_replay_matches_reference_at_other_capacities(host_gib):
    requests = tr.generate(tr.TraceParams(sessions=60, user_tokens=512, mean_turns=6.0, seed=3))
    plan = tr.TierPlan(BT, LLAMA_8B, {"host": host_gib * GIB})
    res = tr.replay(requests, plan)
    ref = reference(requests, plan.blocks("host"))
    assert res.hit_rate_tokens == pytest.approx(ref["tokens"], abs=0.01)
    assert res.hit_rate_lookups == pytest.approx(ref["lookups"], abs=0.01)
    assert res.tiers["host"].hit_tokens == res.hit_tokens


# ---- trace model ---------------------------------------------------------------------------
def test_generate_is_deterministic_and_agentic():
    p = tr.TraceParams(sessions=30, system_prompts=3, seed=1)
    a, b = tr.generate(p), tr.generate(p)
    assert a == b and a != tr.generate(tr.TraceParams(sessions=30, system_prompts=3, seed=2))
    assert [r.t for r in a] == sorted(r.t for r in a)
    assert len({r.session for r in a}) == 30
    assert {r.prompt[0][0] for r in a} <= {"sys0", "sys1", "sys2"}
    by_session: dict[str, list[tr.Request]] = defaultdict(list)
    for r in a:
        by_session[r.session].append(r)
    turns = sorted(len(v) for v in by_session.values())
    assert turns[-1] > turns[0]  # Zipf popularity: some sessions run far longer
    for reqs in by_session.values():
        for prev, nxt in zip(reqs, reqs[1:], strict=False):
            assert nxt.prompt[: len(prev.prompt) + 1] == (*prev.prompt, prev.output)  # turns append
            assert nxt.t >= prev.t


def test_jsonl_round_trip(tmp_path):
    reqs = tr.generate(tr.TraceParams(sessions=5, seed=4))
    path = tmp_path / "t.jsonl"
    tr.write_jsonl(reqs, path)
    back = tr.read_jsonl(path)
    assert [(r.session, r.prompt, r.output) for r in back] == [(r.session, r.prompt, r.output) for r in reqs]
    assert [r.t for r in back] == pytest.approx([r.t for r in reqs])


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"t": -1, "prompt": [["a", 4]]}', "'t' must be"),
    ('{"t": 0, "prompt": []}', "'prompt' must be"),
    ('{"t": 0, "prompt": [["a", 0]]}', "segment must be"),
    ('{"t": 0, "prompt": [["a", 4]], "output": "b"}', "output segment"),
    ('{"t": 0, "prompt": [["a", 4]]}\n{"t": 1, "prompt": [["a", 5]]}', "segment 'a' has 5 tokens"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"t": 0, "prompt": [["ok", 8]]}\n' + line + "\n")
    with pytest.raises(InvalidRequest, match=problem) as e:
        tr.read_jsonl(path)
    assert f"{path}:" in str(e.value)


def test_missing_and_empty_trace_files(tmp_path):
    with pytest.raises(InvalidRequest, match="cannot read trace"):
        tr.read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidRequest, match="no requests"):
        tr.read_jsonl(tmp_path / "empty.jsonl")


# ---- capacity mapping ----------------------------------------------------------------------
def one_block_requests(n: int) -> list[tr.Request]:
    return [tr.Request(float(i), f"s{i}", ((f"seg{i}", BT),)) for i in range(n)]


@pytest.mark.parametrize("tiers", [{"host": 5}, {"host": 2, "ssd": 7}])
def test_tiers_hold_exactly_the_real_block_count(tiers):
    """Capacity for N real blocks holds N tiny blocks: no more, no fewer (slab slots included)."""
    caps = {t: n * BT * LLAMA_8B + BT * LLAMA_8B // 2 for t, n in tiers.items()}  # + half a block
    plan = tr.TierPlan(BT, LLAMA_8B, caps)
    assert {t: plan.blocks(t) for t in tiers} == tiers
    total = sum(tiers.values())
    res = tr.replay(one_block_requests(total + 3), plan)
    assert res.dropped_blocks == 3
    for t, n in tiers.items():
        assert res.tiers[t].capacity_blocks == n


def test_ssd_tier_serves_what_host_cannot_hold():
    requests = tr.generate(tr.TraceParams(sessions=40, user_tokens=512, seed=5))
    host_only = tr.replay(requests, tr.TierPlan(BT, LLAMA_8B, {"host": GIB}))
    both = tr.replay(requests, tr.TierPlan(BT, LLAMA_8B, {"host": GIB, "ssd": 64 * GIB}))
    assert both.tiers["ssd"].hit_blocks > 0 and both.tiers["host"].promotions > 0
    assert both.hit_tokens == sum(t.hit_tokens for t in both.tiers.values())
    assert max(t.hit_lookups for t in both.tiers.values()) <= both.hit_lookups
    assert both.hit_rate_tokens > host_only.hit_rate_tokens


def test_capacity_that_holds_no_block_is_refused():
    with pytest.raises(InvalidRequest, match="holds no"):
        tr.replay(one_block_requests(1), tr.TierPlan(BT, LLAMA_8B, {"host": 1 << 20}))


# ---- sweep, plots, bad arguments -------------------------------------------------------------
def test_sweep_writes_a_plot_and_results(tmp_path):
    proc = cli("--sessions", "20", "--sweep", "host=1GiB..4GiB", "--sweep-points", "3",
               "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "hit_rate_vs_host.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "sweep.json").read_text())["results"]
    assert [r["capacities"]["host"] for r in results] == [GIB, 2 * GIB, 4 * GIB]
    assert results[-1]["hit_rate_tokens"] >= results[0]["hit_rate_tokens"]
    assert "sweep: " in proc.stderr and str(png) in proc.stdout


BAD_ARGS = [
    (["--sweep", "host=1XB..4GiB"], "malformed size '1XB'"),
    (["--sweep", "host=8GiB..1GiB"], "LO <= HI"),
    (["--sweep", "gpu=1GiB..2GiB"], "malformed --sweep item"),
    (["--host", "lots"], "malformed size 'lots'"),
    (["--host", "1MiB"], "holds no"),
    (["--trace", "/nonexistent/trace.jsonl"], "cannot read trace"),
    (["--trace", "BAD"], ":2: not JSON"),
    (["--model", "gpt-9"], "unknown preset 'gpt-9'"),
]


def bad_trace(tmp_path: Path, args: list[str]) -> list[str]:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 0, "prompt": [["a", 8]]}\n{oops\n')
    return ["--sessions", "2", *(str(bad) if a == "BAD" else a for a in args)]


@pytest.mark.parametrize("args, problem", [BAD_ARGS[0], BAD_ARGS[5], BAD_ARGS[7]])
def test_bad_arguments_print_one_line_and_exit_nonzero(tmp_path, args, problem):
    proc = cli(*bad_trace(tmp_path, args), timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and problem in lines[0], proc.stderr


@pytest.mark.parametrize("args, problem", BAD_ARGS)
def test_bad_arguments_print_one_line_in_process(tmp_path, capsys, args, problem):
    """Every bad argument is one error line and exit status 2, without a subprocess each."""
    assert bench_cmd.main(["trace", *bad_trace(tmp_path, args)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and problem in lines[0] and lines[0].startswith("kvtier bench trace: error:")


def test_unknown_model_suggests_a_flag_bench_trace_has(tmp_path, capsys):
    assert bench_cmd.main(["trace", "--model", "GPT-5", "--sessions", "2"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'GPT-5'" in err and "--bytes-per-token" in err
    assert "--config a" not in err  # calc's flag, which bench trace does not have


def test_plot_helpers_for_the_io_benchmark(tmp_path):
    cdf = plots.latency_cdf(tmp_path / "cdf.png", {"host": [1e-4, 2e-4, 5e-4], "ssd": [1e-3, 3e-3]})
    bw = plots.bandwidth_vs_block_size(tmp_path / "bw.png", {"kvtier": [(1 << 18, 1e9), (1 << 21, 2e9)],
                                                              "fio": [(1 << 18, 1.1e9), (1 << 21, 2.2e9)]})
    for p in (cdf, bw):
        assert p.read_bytes()[:4] == b"\x89PNG"
    assert plots.binary_size(3 * GIB) == "3 GiB"


def test_measured_prefill_rate_is_positive():
    rate = tr.measure_prefill_rate(tokens=128, repeats=1)
    assert 0 < rate < float("inf")


def test_geometric_sweep_points():
    assert tr.geometric(GIB, 64 * GIB, tr.default_points(GIB, 64 * GIB)) == [GIB << i for i in range(7)]
    assert tr.geometric(GIB, GIB, 5) == [GIB]
