"""The benchmarks stay runnable (timings themselves are read from their output, not asserted)."""

from __future__ import annotations

import pytest

from tests.benchmods import load_benchmark


def test_turn_overhead_benchmark_reports_every_variant_and_emits_every_turn() -> None:
    results = load_benchmark("bench_turn_overhead").main(["--turns", "50", "--repeat", "1"])
    variants = {
        "baseline",
        "naive listeners (no work)",
        "lk_observe, no-op spans",
        "lk_observe",
        "lk_observe, fast at 10%",
    }
    assert set(results) == {f"{v}, {m}" for v in variants for m in ("paced", "back to back")}
    assert all(seconds > 0 for seconds in results.values())


def test_loop_lag_benchmark_reports_baseline_and_faults() -> None:
    results = load_benchmark("bench_loop_lag").main(quick=True)
    assert {"baseline (no lk_observe)", "http healthy", "http black hole"} <= set(results)


def test_benchmark_quick_run_reports_speedup_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    table = load_benchmark("bench_monitor").main(quick=True)
    assert "get_stats speedup" in table
    assert "memory ratio" in table
    assert table in capsys.readouterr().out


def test_the_benchmark_runs() -> None:
    results = load_benchmark("bench_monitor_snapshot").main(["--quick"])
    assert results["write"] and results["merge"]


def test_session_overhead_benchmark_reports_every_variant_by_thread() -> None:
    bench = load_benchmark("bench_session_overhead")
    summary = bench.main(["--turns", "3", "--repeat", "2"])
    names = {v.name for v in bench.variants()}
    assert {"plain", "livekit tracing", "lk_observe", "both", "lk_observe + logs"} <= names
    assert set(summary["variants"]) == names
    for name, variant in summary["variants"].items():
        assert set(variant["ms_per_turn"]) == {"loop", "sink", "export", "other", "total"}
        assert variant["ms_per_turn"]["loop"]["mean"] > 0
        if name not in (bench.PLAIN, bench.SAMPLED):  # sampling may keep none of 3 turns
            assert variant["spans_per_turn"] > 0
    ours = summary["variants"]["lk_observe"]
    assert ours["turns_emitted"] == [3]  # every scripted turn reached the sinks
    assert ours["ms_per_turn"]["sink"]["mean"] > 0
    assert "attributed_added_ms_per_turn" in ours
    assert "difference" in summary["ratio_to_livekit_tracing"]


def test_the_audio_tap_benchmark_reports_per_frame_and_per_second_figures() -> None:
    results = load_benchmark("bench_audio_taps").main(["--quick"])
    assert results["input frame, 16 kHz mono (us)"] > 0
    assert results["input frame through the tap, all in (us)"] > 0
    assert results["session + Silero, CPU ms per s of audio"] > 0
    assert "added by lk_observe, CPU ms per s of audio" in results


def test_the_build_comparison_runs_both_builds() -> None:
    medians = load_benchmark("bench_builds").main(
        ["--base", "HEAD", "--pairs", "1", "--turns", "20", "--repeat", "1"]
    )
    assert set(medians) == {"lk_observe, no-op spans, paced", "lk_observe, paced",
                            "lk_observe, fast at 10%, paced"}  # fmt: skip
    assert all(before > 0 and after > 0 for before, after in medians.values())
