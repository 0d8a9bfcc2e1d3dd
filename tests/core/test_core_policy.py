"""Policy.decide is pure: states in, decisions out."""

from xenswap.core.idleness import CpuSample, FixedTimeout
from xenswap.core.policy import (
    KEEP,
    PAGE_OUT_ALL,
    PAGE_OUT_WS,
    PAGED_OUT,
    WORKING_SET,
    DomainOverride,
    DomainState,
    Policy,
    PolicyConfig,
    render_metrics,
)


def idle_state(idle_s: float, observations: int = 3) -> DomainState:
    st = DomainState("vm")
    st.detector.feed(CpuSample(0.0, (0.0,)))
    st.detector.feed(CpuSample(1.0, (0.5,)))  # busy
    st.detector.feed(CpuSample(2.0, (0.5,)))  # idle from t=1
    st.detector.feed(CpuSample(1.0 + idle_s, (0.5,)))
    for i in range(observations):
        st.model.record("idle", [1, 2, 3], now=float(i))
    return st


def test_busy_or_short_idle_keeps_resident():
    policy = Policy(PolicyConfig(long_idle_s=300))
    st = DomainState("vm")
    st.detector.feed(CpuSample(0.0, (0.0,)))
    st.detector.feed(CpuSample(1.0, (0.9,)))
    assert policy.decide(st, FixedTimeout(30), 1.0).action == KEEP
    assert policy.decide(idle_state(10), FixedTimeout(30), 11.0).action == KEEP


def test_idle_past_timeout_pages_out_to_working_set_once_measured():
    policy = Policy(PolicyConfig(long_idle_s=1e9, measure_idle_ws=3))
    assert policy.decide(idle_state(40), FixedTimeout(30), 41.0).action == PAGE_OUT_WS
    d = policy.decide(idle_state(40, observations=1), FixedTimeout(30), 41.0)
    assert d.action == KEEP and "measuring" in d.reason


def test_long_predicted_idle_pages_out_entirely():
    p = FixedTimeout(30, history=[1000, 2000, 3000])
    d = Policy(PolicyConfig(long_idle_s=300)).decide(idle_state(40), p, 41.0)
    assert d.action == PAGE_OUT_ALL and d.predicted_idle_s == 2000
    no_pause = Policy(PolicyConfig(long_idle_s=300, allow_pause=False))
    assert no_pause.decide(idle_state(40), p, 41.0).action == PAGE_OUT_WS


def test_working_set_phase_repages_when_it_grew_and_paused_is_left_alone():
    policy = Policy(PolicyConfig(long_idle_s=1e9))
    st = idle_state(40)
    st.phase, st.resident_pages = WORKING_SET, 100
    assert policy.decide(st, FixedTimeout(30), 41.0).action == KEEP
    st.resident_pages = 1000
    assert policy.decide(st, FixedTimeout(30), 41.0).action == PAGE_OUT_WS
    st.phase = PAGED_OUT
    assert policy.decide(st, FixedTimeout(30), 41.0).action == KEEP


def test_operator_override_turns_auto_page_out_off_or_sets_the_idle_threshold():
    policy = Policy(PolicyConfig(long_idle_s=1e9))
    # the predictor alone would act after 30 s of idleness
    assert policy.decide(idle_state(40), FixedTimeout(30), 41.0).action == PAGE_OUT_WS
    off = policy.decide(idle_state(40), FixedTimeout(30), 41.0, DomainOverride(auto_page_out=False))
    assert off.action == KEEP and "auto page-out is off" in off.reason
    # a later threshold holds the page-out back, an earlier one brings it forward
    later = DomainOverride(idle_threshold_s=120)
    assert policy.decide(idle_state(40), FixedTimeout(30), 41.0, later).action == KEEP
    assert policy.decide(idle_state(130), FixedTimeout(30), 131.0, later).action == PAGE_OUT_WS
    sooner = DomainOverride(idle_threshold_s=5)
    assert policy.decide(idle_state(10), FixedTimeout(30), 11.0).action == KEEP
    assert policy.decide(idle_state(10), FixedTimeout(30), 11.0, sooner).action == PAGE_OUT_WS
    # a paged-out domain stays as it is whatever the override says
    st = idle_state(40)
    st.phase = PAGED_OUT
    assert policy.decide(st, FixedTimeout(30), 41.0, sooner).action == KEEP


def test_state_round_trips_through_json_and_metrics_render():
    st = idle_state(40)
    again = DomainState.from_json(st.to_json())
    assert again.detector.idle_since == st.detector.idle_since
    assert again.model.predicted("idle") == [1, 2, 3]
    text = render_metrics({"vm": {"resident_mib": 1.5, "wss_mib": 0.5, "idle_since": 1.0, "phase": "resident",
                                  "vcpu_usage": 0.01, "pageouts": 2}})
    assert 'xenswap_domain_resident_bytes{domain="vm",phase="resident"} 1.57286e+06' in text
    assert "# TYPE xenswap_domain_pageouts_total counter" in text
