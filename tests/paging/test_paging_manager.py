"""The manager end to end on real child processes: idle detection -> measured idle working set -> page-out to
it -> page-in; pause + page-out entirely; recovery of a manager that died mid-page-out (state in sqlite)."""

from __future__ import annotations

import pytest

from xenswap.core.policy import (
    PAGE_OUT_ALL,
    PAGE_OUT_WS,
    PAGED_OUT,
    PAGING_OUT,
    RESIDENT,
    WORKING_SET,
    Manager,
    PolicyConfig,
    StateStore,
    domain_figures,
    render_metrics,
)


class SteppedClock:
    """Wall time that advances 10 s per tick: the children barely use CPU, so every quantum reads as idle."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def port(memchild, child_port):
    return child_port({"a": memchild(2048)})


def make_manager(port, tmp_path, **config) -> tuple[Manager, SteppedClock]:
    clock = SteppedClock()
    cfg = PolicyConfig(predictor="fixed-timeout", measure_idle_ws=2, **config)
    mechanisms = {}

    def factory(name: str):
        if name not in mechanisms:
            mechanisms[name] = port.children[name].mechanism()
        return mechanisms[name]

    return Manager(port, factory, cfg, StateStore(tmp_path / "memory.sqlite"), clock=clock), clock


def run_ticks(manager: Manager, clock: SteppedClock, n: int, between=None) -> list:
    decisions = []
    for _ in range(n):
        decisions += manager.tick()
        if between:
            between()
        clock.now += 10
    return decisions


def test_idle_child_is_paged_out_to_its_working_set(port, tmp_path):
    child = port.children["a"]
    before = child.checksum()
    manager, clock = make_manager(port, tmp_path, long_idle_s=1e9)
    # Between ticks the "guest" touches the same few pages: its idle working set.
    decisions = run_ticks(manager, clock, 8, between=lambda: child.touch(10, 6))
    actions = [d.action for d in decisions]
    assert PAGE_OUT_WS in actions and PAGE_OUT_ALL not in actions
    st = manager.state("a")
    assert st.phase in (WORKING_SET, RESIDENT)
    assert st.model.predicted("idle") == [10, 11, 13, 14, 15]  # 12 is a zero page (shared, not resident)
    assert set(manager.mechanism("a").resident_pages()) <= {10, 11, 13, 14, 15}
    figures = domain_figures(manager.store)["a"]
    assert figures["wss_mib"] == pytest.approx(5 * 4096 / 2**20, abs=0.1)
    assert figures["idle_since"] is not None
    metrics = render_metrics({"a": figures})
    assert 'xenswap_domain_working_set_bytes{domain="a",phase=' in metrics
    manager.page_in("a", all_pages=True)
    assert child.checksum() == before


def test_long_predicted_idle_pauses_and_pages_out_entirely(port, tmp_path):
    child = port.children["a"]
    before = child.checksum()
    manager, clock = make_manager(port, tmp_path, long_idle_s=5)
    decisions = run_ticks(manager, clock, 4)
    assert PAGE_OUT_ALL in [d.action for d in decisions]
    assert manager.state("a").phase == PAGED_OUT
    assert open(f"/proc/{child.pid}/stat").read().split()[2] == "T"  # stopped
    assert len(manager.mechanism("a").resident_pages()) <= 32
    manager.page_in("a", event="ping")
    assert manager.state("a").phase == RESIDENT
    assert child.checksum() == before  # answers again: it was resumed


def test_next_manager_finishes_an_interrupted_page_out(port, tmp_path):
    """A manager killed between writing its intent and finishing leaves phase "paging-out"; the next one
    (fresh process state, same sqlite) completes it and the domain never stopped running."""
    child = port.children["a"]
    before = child.checksum()
    manager, clock = make_manager(port, tmp_path, long_idle_s=1e9)
    run_ticks(manager, clock, 2, between=lambda: child.touch(10, 6))
    st = manager.state("a")
    st.phase = PAGING_OUT
    manager.store.save(st)
    del manager
    successor, clock2 = make_manager(port, tmp_path, long_idle_s=1e9)
    clock2.now = clock.now
    successor.tick()
    assert successor.state("a").phase in (WORKING_SET, RESIDENT)
    assert open(f"/proc/{child.pid}/stat").read().split()[2] != "T"
    assert len(successor.mechanism("a").resident_pages()) < 100
    assert child.checksum() == before


def test_wake_up_resumes_from_the_plan_made_when_pausing_and_a_successor_from_the_stored_state(port, tmp_path):
    """The manager that paused a domain works out what to prefetch per event type at pause time, so a wake-up
    goes straight to prefetch and resume (state is written after the resume); a manager that did not pause
    it (a successor) finds the same pages in the stored state."""
    child = port.children["a"]
    before = child.checksum()
    manager, _ = make_manager(port, tmp_path, long_idle_s=1e9)
    manager.record_event("a", "idle", [1, 2])
    for _ in range(2):
        manager.record_event("a", "ping", [100, 101, 102, 103])
    manager.page_out("a", keep_ws=False)
    assert open(f"/proc/{child.pid}/stat").read().split()[2] == "T"
    woke = manager.page_in("a", event="ping")
    assert woke.pages == 4
    steps = woke.timings
    assert list(steps) == ["state", "prefetch", "prefetch_hypervisor", "resume", "saved"]
    assert all(a <= b for a, b in zip(list(steps.values()), list(steps.values())[1:], strict=False))
    assert open(f"/proc/{child.pid}/stat").read().split()[2] != "T"
    assert manager.state("a").phase == RESIDENT
    assert manager.state("a").model.last_seen.get("ping") is not None

    manager.page_out("a", keep_ws=False)
    successor, _ = make_manager(port, tmp_path, long_idle_s=1e9)
    # No http working set known: the resident set instead (idle background + ping, which is frequent now).
    woke = successor.page_in("a", event="http")
    assert woke.pages == 6
    assert open(f"/proc/{child.pid}/stat").read().split()[2] != "T"
    assert successor.state("a").phase == RESIDENT
    assert child.checksum() == before


class StagingRecorder:
    """A child's real mechanism plus the optional ``stage`` extra, which only records what it is asked to hold
    (the Xen pager's own staging is tested in the rig: tests/xen/test_paging_dom0.py)."""

    def __init__(self, mechanism) -> None:
        self.mechanism = mechanism
        self.asked: list[list[int]] = []

    def __getattr__(self, name: str):
        return getattr(self.mechanism, name)

    def stage(self, gfns) -> int:
        self.asked.append(list(dict.fromkeys(gfns)))
        return len(self.asked[-1])


def test_page_out_stages_the_wake_sets_most_frequent_event_first_and_not_the_resident_ones(port, tmp_path):
    manager, clock = make_manager(port, tmp_path, long_idle_s=1e9)
    recorder = StagingRecorder(port.children["a"].mechanism())
    manager._mechanisms["a"] = recorder
    manager.record_event("a", "idle", [1, 2])
    manager.record_event("a", "console", [200, 201, 1])  # once, long ago: not frequent
    clock.now += 1000
    for _ in range(3):
        manager.record_event("a", "ping", [100, 101, 2])  # three times a second: frequent, kept resident
    manager.record_event("a", "tcp", [300])  # once, now: frequent too (1 a second)

    manager.page_out("a", keep_ws=True)
    # resident: the frequent events' sets (idle, ping, tcp); what stays to prefetch is console's
    assert recorder.asked == [[200, 201]]

    manager.page_in("a", all_pages=True)
    manager.page_out("a", keep_ws=False)  # paused, everything out: every wake set, the most frequent first
    assert recorder.asked[-1] == [2, 100, 101, 300, 1, 200, 201]
    manager.page_in("a", event="console")
