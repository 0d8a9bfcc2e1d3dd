import pytest

from xenswap.core.mechanism import from_ranges, to_ranges
from xenswap.core.working_set import WorkingSetModel
from xenswap.errors import SpecError


def test_ranges_round_trip():
    pages = [1, 2, 3, 7, 9, 10]
    assert list(to_ranges(pages)) == [(1, 3), (7, 1), (9, 2)]
    assert from_ranges(to_ranges(pages)) == pages


def test_prediction_keeps_frames_seen_in_most_observations():
    m = WorkingSetModel()
    m.record("ping", [1, 2, 3, 100], now=0)
    m.record("ping", [1, 2, 3, 200], now=10)
    m.record("ping", [1, 2, 300], now=20)
    assert m.predicted("ping") == [1, 2, 3]  # 3 is in 2 of 3 observations (>= half); 100/200/300 once
    assert m.predicted("ping", min_fraction=1.0) == [1, 2]
    assert m.predicted("http") == []


def test_frequent_events_stay_resident():
    m = WorkingSetModel()
    m.record("idle", [1, 2], now=0)
    m.record("ping", [5], now=0)
    m.record("disk", [9], now=0)
    for t in range(1, 20):
        m.note("ping", float(t * 10))  # a ping every 10 s: frequent
    m.note("disk", 5000.0)  # twice in ~83 min: rare
    # ping: 20 in 5000 s (0.004/s) beats the default 1 per 5 min; disk: 2 in 5000 s does not
    assert m.frequent_events(now=5000.0) == ["idle", "ping"]
    assert m.frequent_events(now=5000.0, min_rate=0.005) == ["idle"]


def test_resident_set_and_json_round_trip():
    m = WorkingSetModel()
    m.record("idle", [1, 2, 3], now=0)
    for t in range(30):
        m.record("ping", [3, 4, 5], now=float(t))
    m.record("console", [50, 51], now=0)
    keep = m.resident_set(now=30.0, min_rate=0.5)
    assert keep == [1, 2, 3, 4, 5]  # console (once in 30 s) is not frequent enough to stay resident
    again = WorkingSetModel.from_json(m.to_json())
    assert again.predicted("ping") == [3, 4, 5]
    assert again.resident_set(now=30.0, min_rate=0.5) == keep
    assert again.summary()["ping"]["observations"] == 30


def test_unknown_event_is_a_clear_error():
    with pytest.raises(SpecError, match="unknown event type"):
        WorkingSetModel().record("sneeze", [1])
