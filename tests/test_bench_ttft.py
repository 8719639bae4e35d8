"""``kvtier.bench.ttft --turns``: the agentic session the TTFT goal is measured on (its speed is
the bench's business; here only that it runs, reloads each turn's context and reports)."""

from __future__ import annotations

from kvtier.bench import ttft


def test_an_agentic_session_reloads_each_turns_context_and_reports_it(capsys):
    ttft.main(["--turns", "2", "--prompts", "600", "--turn-tokens", "64",
               "--hidden", "64", "--layers", "2", "--heads", "2", "--kv-heads", "1"])
    out = capsys.readouterr().out
    assert "2 turns of 64 tokens, 600 -> 728 tokens" in out
    assert "TTFT cached/recompute, median" in out


def test_turns_report_every_figure():
    model = ttft.make_model(64, 2, 2, 1)
    r = ttft.bench_turns(model, 600, 2, 64)
    assert r["last_tokens"] == 728
    # Turn 1 (664 tokens) finds the first turn's 2 blocks of 256 (512 of its 663 prompt tokens),
    # which the cost model takes or, on this machine's speeds, may decline: never more.
    assert 0 <= r["least_reloaded"] <= 512 / 663
    assert 0 < r["ratio_median"] <= r["ratio_p99"] <= r["ratio_worst"]
    assert sum(r["decisions"].values()) >= 2  # both timed turns went through the cost model
