"""Idleness detection and the Golding et al. predictors, on synthetic samples and on a recorded guest trace."""

from pathlib import Path

import pytest

from xenswap.core.idleness import (
    AdaptiveBackoff,
    CpuSample,
    FixedTimeout,
    IdlenessDetector,
    MovingAverage,
    dump_trace,
    evaluate,
    evaluate_all,
    idle_periods,
    load_trace,
    quantum_usage,
)

TRACE = Path(__file__).parent / "data" / "vcpu-trace.csv"


def test_quantum_usage_is_fraction_of_interval_times_vcpus():
    prev = CpuSample(10.0, (1.0, 2.0))
    cur = CpuSample(12.0, (2.0, 2.5))  # 1.5 s used out of 2 s x 2 vCPUs
    assert quantum_usage(prev, cur) == pytest.approx(0.375)
    assert quantum_usage(cur, cur) == 0.0  # zero interval
    assert quantum_usage(prev, CpuSample(11.0, (9.0, 9.0))) == 1.0  # clamped


def test_detector_tracks_idle_periods():
    det = IdlenessDetector(threshold=0.05)
    cpu = 0.0
    usage = [0.5, 0.01, 0.01, 0.01, 0.6, 0.0, 0.0]
    det.feed(CpuSample(0.0, (cpu,)))
    for t, u in enumerate(usage, start=1):
        cpu += u
        det.feed(CpuSample(float(t), (cpu,)))
    # idle from t=1 (start of the first idle quantum) to t=4 (start of the busy one): 3 s; idle again since t=5
    assert det.completed_periods == [3.0]
    assert det.idle and det.idle_since == 5.0
    assert det.idle_for(7.0) == 2.0
    again = IdlenessDetector.from_json(det.to_json())
    assert again.idle_since == det.idle_since and again.last == det.last


def synthetic(periods: list[float], busy: float = 2.0, step: float = 1.0) -> list[CpuSample]:
    samples, t, cpu = [CpuSample(0.0, (0.0,))], 0.0, 0.0
    for length in periods:
        for _ in range(int(busy / step)):
            t += step
            cpu += 0.5 * step
            samples.append(CpuSample(t, (cpu,)))
        for _ in range(int(length / step)):
            t += step
            cpu += 0.001 * step
            samples.append(CpuSample(t, (cpu,)))
    t += step
    samples.append(CpuSample(t, (cpu + step,)))  # close the last period
    return samples


def test_idle_periods_of_synthetic_trace():
    assert [length for _, length in idle_periods(synthetic([5, 50, 3]))] == [5.0, 50.0, 3.0]


def test_fixed_timeout_scoring():
    ev = evaluate(FixedTimeout(timeout=10), synthetic([5, 50, 15, 100]), breakeven=10)
    assert ev.periods == 4 and ev.acted == 3  # the 5 s period ends before the timeout
    assert ev.false_alarms == 1  # 15 s period: acted at 10, woke 5 s later
    assert ev.captured_s == pytest.approx(40 + 5 + 90)
    assert ev.missed == 0


def test_adaptive_backoff_doubles_after_false_alarm_and_halves_after_good_call():
    p = AdaptiveBackoff(timeout=10, min_timeout=2, max_timeout=100)
    p.observe(12, acted_at=10, breakeven=10)
    assert p.timeout == 20
    p.observe(200, acted_at=20, breakeven=10)
    assert p.timeout == 10


def test_moving_average_acts_early_when_periods_are_long():
    p = MovingAverage(alpha=0.5, breakeven=10, min_wait=2, fallback_timeout=30)
    assert not p.should_act(5) and p.should_act(30)  # no history: plain timeout
    for _ in range(3):
        p.observe(100, acted_at=None, breakeven=10)
    assert p.should_act(2)  # average 100 s promises far more than breakeven
    assert p.predicted_length(2) == pytest.approx(100)


def test_trace_round_trip(tmp_path):
    samples = synthetic([5, 20])
    path = tmp_path / "t.csv"
    path.write_text(dump_trace(samples))
    again = load_trace(path)
    assert [s.vcpu_seconds[0] for s in again] == pytest.approx([s.vcpu_seconds[0] for s in samples])
    assert again[-1].t - again[0].t == pytest.approx(samples[-1].t - samples[0].t)


def test_recorded_guest_trace():
    """A real trace: vCPU time of an idle TCG guest poked now and then (see tests/core/data/README.md)."""
    samples = load_trace(TRACE)
    assert len(samples) > 100
    periods = idle_periods(samples)
    assert len(periods) >= 3  # the pokes split the idle time into several periods
    results = {ev.predictor: ev for ev in evaluate_all(samples)}
    assert set(results) == {"fixed-timeout", "moving-average", "adaptive-backoff"}
    for ev in results.values():
        assert ev.periods == len(periods)
        assert 0 < ev.captured_s <= ev.idle_s
        assert ev.acted + ev.missed <= ev.periods


def test_cli_evaluates_the_recorded_trace(capsys):
    import json

    from xenswap.cli import main

    assert main(["idle", "--evaluate", str(TRACE), "--json"]) == 0
    rows = {r["predictor"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"fixed-timeout", "moving-average", "adaptive-backoff"}
    assert all(0 <= r["captured_fraction"] <= 1 for r in rows.values())
