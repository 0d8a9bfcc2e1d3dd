"""The paging policy and the manager that applies it every tick.

``Policy.decide`` is pure: from a domain's idleness, predicted idle-period length and current phase it says
*keep resident*, *page out to the working set* or *page out entirely and pause*. ``Manager`` is the only
part that touches a port: it samples vCPU times through the ``Hypervisor`` interface, measures and pages
memory through a ``MemoryMechanism`` (one per domain, from ``mechanism_factory``), and keeps every domain's
state in sqlite under ``state_dir()`` so a manager killed at any point is picked up by the next one.
Phases are written *before* acting ("paging-out", "pausing"), so recovery knows what was in flight.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from xenswap.config import state_dir
from xenswap.core.idleness import (
    DEFAULT_BREAKEVEN_S,
    CpuSample,
    IdlenessDetector,
    IdlePredictor,
    make_predictor,
)
from xenswap.core.mechanism import MemoryMechanism, pages_to_mib
from xenswap.core.working_set import EVENT_TYPES, WorkingSetModel

KEEP = "keep"
PAGE_OUT_WS = "page-out-ws"
PAGE_OUT_ALL = "page-out-all"  # and pause
PAGE_IN = "page-in"  # prefetch the working set of an event and resume

RESIDENT, PAGING_OUT, WORKING_SET, PAUSING, PAGED_OUT = "resident", "paging-out", "working-set", "pausing", "paged-out"


@dataclass
class PolicyConfig:
    predictor: str = "adaptive-backoff"
    breakeven_s: float = DEFAULT_BREAKEVEN_S
    long_idle_s: float = 300.0  # predicted idle at least this long: pause and page out everything
    allow_pause: bool = True
    measure_idle_ws: int = 3  # idle-interval observations to take before the first page-out to working set
    frequent_rate: float = 1 / 300  # events/s above which an event's working set stays resident
    # Paused guests: keep the hypervisor's own idle working set (QEMU's main loop, TCG code: a few MiB) resident
    # instead of paging it out too: the wake-up then does not wait on QEMU itself paging in (P2 in
    # docs/benchmarks-paging.md: paused + prefetch 6.6 / 19.4 ms ping / HTTP with it, 18.2 / 33.0 without).
    keep_hypervisor_ws_paused: bool = True


@dataclass(frozen=True)
class DomainOverride:
    """What an operator set for one domain (e.g. in xenstore, /xenswap/policy/<domid>/): beats the engine's own
    choice for that domain."""

    auto_page_out: bool = True  # off: never page the domain out on idleness (requests still work)
    idle_threshold_s: float | None = None  # act after this many idle seconds instead of the predictor's choice


@dataclass
class Decision:
    domain: str
    action: str
    reason: str
    predicted_idle_s: float | None = None
    pages: int | None = None  # pages paged out / prefetched by the action
    timings: dict[str, float] | None = None  # page-in: ms from its start to the end of each step

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class DomainState:
    """Everything the manager remembers about one domain (persisted as JSON)."""

    name: str
    phase: str = RESIDENT
    detector: IdlenessDetector = field(default_factory=IdlenessDetector)
    predictor_state: dict = field(default_factory=dict)
    model: WorkingSetModel = field(default_factory=WorkingSetModel)
    acted_at: float | None = None  # idle-elapsed seconds when we acted in the current idle period
    last_decision: dict | None = None
    resident_pages: int | None = None
    guest_pages: int | None = None
    pageouts: int = 0
    updated: float = 0.0

    def predictor(self, config: PolicyConfig) -> IdlePredictor:
        p = make_predictor(self.predictor_state.get("name", config.predictor))
        for key, value in self.predictor_state.items():
            if key != "name" and hasattr(p, key):
                setattr(p, key, value)
        return p

    def keep_predictor(self, p: IdlePredictor) -> None:
        self.predictor_state = {k: v for k, v in vars(p).items() if isinstance(v, int | float | list | None)}
        self.predictor_state["name"] = p.name

    def to_json(self) -> dict:
        return {
            "name": self.name, "phase": self.phase, "detector": self.detector.to_json(),
            "predictor_state": self.predictor_state, "model": self.model.to_json(), "acted_at": self.acted_at,
            "last_decision": self.last_decision, "resident_pages": self.resident_pages,
            "guest_pages": self.guest_pages, "pageouts": self.pageouts, "updated": self.updated,
        }

    @classmethod
    def from_json(cls, d: dict) -> DomainState:
        return cls(
            name=d["name"], phase=d.get("phase", RESIDENT),
            detector=IdlenessDetector.from_json(d.get("detector", {})),
            predictor_state=d.get("predictor_state", {}), model=WorkingSetModel.from_json(d.get("model", {})),
            acted_at=d.get("acted_at"), last_decision=d.get("last_decision"),
            resident_pages=d.get("resident_pages"), guest_pages=d.get("guest_pages"),
            pageouts=d.get("pageouts", 0), updated=d.get("updated", 0.0),
        )

    @property
    def wss_pages(self) -> int | None:
        ws = self.model.resident_set(self.updated or time.time())
        return len(ws) if self.model.events else None


class Policy:
    """Pure decision: what to do with one domain now."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()

    def decide(self, st: DomainState, predictor: IdlePredictor, now: float,
               override: DomainOverride | None = None) -> Decision:
        det = st.detector
        if st.phase in (PAUSING, PAGED_OUT):
            return Decision(st.name, KEEP, "paused and paged out; a packet or `xenswap page-in` wakes it")
        if not det.idle:
            return Decision(st.name, KEEP, "busy" if det.last_usage is not None else "first sample")
        elapsed = det.idle_for(now)
        predicted = predictor.predicted_length(elapsed)
        if override is not None and not override.auto_page_out:
            return Decision(st.name, KEEP, f"idle {elapsed:.0f}s; auto page-out is off for it (policy)", predicted)
        threshold = override.idle_threshold_s if override is not None else None
        if threshold is not None:
            if elapsed < threshold:
                return Decision(st.name, KEEP, f"idle {elapsed:.0f}s < idle-threshold {threshold:g}s (policy)",
                                predicted)
        elif not predictor.should_act(elapsed):
            return Decision(st.name, KEEP, f"idle {elapsed:.0f}s, {predictor.name} waits", predicted)
        if self.config.allow_pause and predicted >= self.config.long_idle_s:
            return Decision(st.name, PAGE_OUT_ALL, f"idle {elapsed:.0f}s, predicted {predicted:.0f}s", predicted)
        if st.phase in (RESIDENT, PAGING_OUT):
            ws = st.model.events.get("idle")
            if ws is None or ws.observations < self.config.measure_idle_ws:
                return Decision(st.name, KEEP, "idle; measuring the idle working set first", predicted)
            return Decision(st.name, PAGE_OUT_WS, f"idle {elapsed:.0f}s, predicted {predicted:.0f}s", predicted)
        if st.phase == WORKING_SET and st.resident_pages is not None:
            wss = len(st.model.resident_set(now, self.config.frequent_rate))
            if st.resident_pages > max(2 * wss, wss + 256):  # it faulted back more than its working set
                return Decision(st.name, PAGE_OUT_WS, f"resident {st.resident_pages} pages > working set {wss}",
                                predicted)
        return Decision(st.name, KEEP, f"already {st.phase}", predicted)


class StateStore:
    """One sqlite row of JSON per domain; WAL so a reader (``xenswap list``) never blocks the manager."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / "memory.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS domains (name TEXT PRIMARY KEY, state TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def load(self, name: str) -> DomainState | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT state FROM domains WHERE name = ?", (name,)).fetchone()
        return None if row is None else DomainState.from_json(json.loads(row[0]))

    def load_all(self) -> dict[str, DomainState]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT state FROM domains").fetchall()
        return {s.name: s for s in (DomainState.from_json(json.loads(r[0])) for r in rows)}

    def save(self, st: DomainState) -> None:
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO domains (name, state) VALUES (?, ?)",
                       (st.name, json.dumps(st.to_json())))

    def forget(self, name: str) -> None:
        with closing(self._connect()) as db, db:
            db.execute("DELETE FROM domains WHERE name = ?", (name,))


MechanismFactory = Callable[[str], MemoryMechanism]


class WakeSource(Protocol):
    """Port-side watcher of events for paused, paged-out domains (QEMU: packets on the tap). On an event it
    calls ``Manager.page_in(name, event=...)``, which prefetches that event's working set and resumes."""

    def watch(self, name: str) -> None: ...

    def unwatch(self, name: str) -> None: ...

    def watched(self) -> list[str]: ...


class Manager:
    """Applies the policy to every domain of a port, one ``tick()`` at a time (the daemon calls it)."""

    def __init__(self, hypervisor, mechanism_factory: MechanismFactory, config: PolicyConfig | None = None,
                 store: StateStore | None = None, clock: Callable[[], float] = time.time) -> None:
        self.hv = hypervisor
        self.mechanism_factory = mechanism_factory
        self.policy = Policy(config)
        self.config = self.policy.config
        self.store = store or StateStore()
        self.clock = clock
        self._mechanisms: dict[str, MemoryMechanism] = {}
        self.waker: WakeSource | None = None
        self._clearing: set[str] = set()  # domains whose accessed bits this process has cleared
        self.overrides: dict[str, DomainOverride] = {}  # by domain name; see set_override
        # Per domain this process paused: the frames to prefetch for each event type, worked out when pausing so
        # that a wake-up does not load and decode the domain's state before the resume.
        self._wake_plans: dict[str, dict[str | None, list[int]]] = {}
        # The waker calls page_in from its own thread while tick() runs in the daemon's.
        self._lock = threading.RLock()

    def mechanism(self, name: str) -> MemoryMechanism:
        cached = self._mechanisms.get(name)
        if cached is not None and not getattr(cached, "alive", lambda: True)():
            del self._mechanisms[name]  # the domain's process was restarted (e.g. restored from a save)
        if name not in self._mechanisms:
            self._mechanisms[name] = self.mechanism_factory(name)
        return self._mechanisms[name]

    def state(self, name: str) -> DomainState:
        return self.store.load(name) or DomainState(name)

    def set_override(self, name: str, override: DomainOverride | None) -> None:
        """An operator's setting for one domain (None: back to the engine's own choices). Kept in memory only:
        its source (e.g. xenstore) is the durable copy and is read again when a daemon starts."""
        with self._lock:
            if override is None or override == DomainOverride():
                self.overrides.pop(name, None)
            else:
                self.overrides[name] = override

    def annotate(self, domains: list) -> list:
        """Fill the resident / working-set / idle-since columns of ``xenswap list`` rows (DomainInfo)."""
        return fill_domain_info(domains, self.store)

    # -- the tick

    def tick(self) -> list[Decision]:
        with self._lock:
            return self._tick()

    def _tick(self) -> list[Decision]:
        decisions = []
        live = set()
        for dom in self.hv.list_domains():
            if not self.hv.is_managed(dom):
                continue
            live.add(dom.name)
            try:
                decisions.append(self.tick_domain(dom.name))
            except (OSError, ProcessLookupError) as exc:  # the domain went away mid-tick
                self._mechanisms.pop(dom.name, None)
                decisions.append(Decision(dom.name, KEEP, f"skipped: {exc}"))
        for gone in set(self._mechanisms) - live:
            self._mechanisms.pop(gone)
        return decisions

    def tick_domain(self, name: str) -> Decision:
        now = self.clock()
        st = self.state(name)
        self.recover(st)
        if st.phase == PAGED_OUT and self.waker is not None and name not in self.waker.watched():
            self.waker.watch(name)  # e.g. a new manager taking over a guest the previous one paged out
        predictor = st.predictor(self.config)
        was_idle_since = st.detector.idle_since
        st.detector.feed(CpuSample(now, tuple(self.hv.vcpu_times(name))))
        if was_idle_since is not None and st.detector.idle_since is None:
            predictor.observe(st.detector.completed_periods[-1], st.acted_at, self.config.breakeven_s)
            st.acted_at = None
            if st.phase == WORKING_SET:
                st.phase = RESIDENT  # it woke up; demand paging brings back what it touches
        mech = self.mechanism(name)
        ws = st.model.events.get("idle")
        observed = ws.observations if ws else 0
        if st.detector.idle and st.phase == RESIDENT and (
                observed < self.config.measure_idle_ws or now - st.model.last_seen.get("idle", 0) >= 60):
            # Idle-interval working set: the frames touched since the previous clear. The first clear made
            # by this process only starts the interval (a successor manager cannot trust an old one).
            touched = mech.accessed_pages_and_clear()
            if name in self._clearing:
                st.model.record("idle", touched, now)
            self._clearing.add(name)
        decision = self.policy.decide(st, predictor, now, self.overrides.get(name))
        self.apply(st, decision, mech)
        st.keep_predictor(predictor)
        st.resident_pages = len(mech.resident_pages())
        st.guest_pages = mech.guest_pages()
        st.last_decision = decision.to_json()
        st.updated = now
        self.store.save(st)
        return decision

    def apply(self, st: DomainState, decision: Decision, mech: MemoryMechanism) -> None:
        if decision.action == PAGE_OUT_WS:
            self.page_out(st.name, keep_ws=True, st=st, mech=mech, decision=decision)
        elif decision.action == PAGE_OUT_ALL:
            self.page_out(st.name, keep_ws=False, st=st, mech=mech, decision=decision)

    def recover(self, st: DomainState) -> None:
        """A previous manager died mid-action: finish what its phase says was in flight."""
        if st.phase == PAGING_OUT:
            # The VM was never paused for this; redo the (idempotent) page-out to the working set.
            self._page_out_ws(st, self.mechanism(st.name))
        elif st.phase == PAUSING:
            # Paused (or about to be) but not fully paged out: complete it; packets still wake it.
            self.hv.pause(st.name)
            st.pageouts += 1
            self.mechanism(st.name).page_out(None)
            st.phase = PAGED_OUT
            self.store.save(st)

    # -- actions (also used by the CLI)

    @staticmethod
    def _release_overhead(mech: MemoryMechanism, keep_working_set: bool = False) -> None:
        """Optional mechanism extra: page out the hypervisor's own per-domain memory (QEMU's heap, TCG cache);
        for a paused domain its own working set stays (the wake-up would wait on it)."""
        release = getattr(mech, "release_overhead", None)
        if release is not None:
            release(keep_working_set=keep_working_set)

    def _stage_wake_sets(self, st: DomainState, mech: MemoryMechanism, resident: set[int],
                         plan: dict[str | None, list[int]] | None = None) -> None:
        """Optional mechanism extra (Xen: the pager keeps copies in dom0 RAM): the frames a wake would prefetch
        (``plan``, worked out here unless the caller has it), the most frequent event type's first, so that its
        prefetch reads no page store."""
        stage = getattr(mech, "stage", None)
        if stage is None:
            return
        now = self.clock()
        plan = self._wake_plan(st) if plan is None else plan
        by_rate = sorted(EVENT_TYPES, key=lambda event: -st.model.rate(event, now))
        stage(g for event in by_rate for g in plan[event] if g not in resident)

    def _page_out_ws(self, st: DomainState, mech: MemoryMechanism) -> int:
        keep = set(st.model.resident_set(self.clock(), self.config.frequent_rate))
        out = [gfn for gfn in range(mech.guest_pages()) if gfn not in keep]
        self._stage_wake_sets(st, mech, keep)
        n = mech.page_out(out)
        self._release_overhead(mech)
        st.pageouts += 1
        st.phase = WORKING_SET
        self.store.save(st)
        return n

    def page_out(self, name: str, keep_ws: bool, st: DomainState | None = None, mech: MemoryMechanism | None = None,
                 decision: Decision | None = None, pause: bool | None = None) -> Decision:
        """Page out to the working set (``keep_ws``) or entirely; entirely pauses too unless ``pause=False``."""
        with self._lock:
            return self._page_out(name, keep_ws, st, mech, decision, (not keep_ws) if pause is None else pause)

    def _page_out(self, name: str, keep_ws: bool, st: DomainState | None, mech: MemoryMechanism | None,
                  decision: Decision | None, pause: bool) -> Decision:
        st = st or self.state(name)
        mech = mech or self.mechanism(name)
        self._wake_plans.pop(name, None)  # set again below if this page-out pauses it
        st.acted_at = st.detector.idle_for(self.clock()) if st.detector.idle else None
        if keep_ws:
            st.phase = PAGING_OUT
            self.store.save(st)  # intent first: a manager killed now is picked up by the next one
            n = self._page_out_ws(st, mech)
        elif not pause:
            self._stage_wake_sets(st, mech, set())
            n = mech.page_out(None)  # the guest keeps running and faults back what it touches
            self._release_overhead(mech)
            st.pageouts += 1
            st.phase = WORKING_SET
            self.store.save(st)
        else:
            st.phase = PAUSING
            self.store.save(st)
            self.hv.pause(name)
            plan = self._wake_plan(st)
            self._stage_wake_sets(st, mech, set(), plan)
            n = mech.page_out(None)
            self._release_overhead(mech, keep_working_set=self.config.keep_hypervisor_ws_paused)
            st.pageouts += 1
            st.phase = PAGED_OUT
            self.store.save(st)
            self._wake_plans[name] = plan
            if self.waker is not None:
                self.waker.watch(name)
        if decision is None:
            decision = Decision(name, PAGE_OUT_WS if keep_ws else PAGE_OUT_ALL, "requested")
        decision.pages = n
        return decision

    def page_in(self, name: str, event: str | None = None, all_pages: bool = False, prefetch: bool = True
                ) -> Decision:
        """Prefetch an event's working set (or everything), then resume the domain if we paused it.
        ``prefetch=False`` only resumes: pure demand paging (the baseline prefetching is measured against)."""
        with self._lock:
            return self._page_in(name, event, all_pages, prefetch)

    def _wake_plan(self, st: DomainState) -> dict[str | None, list[int]]:
        """Frames to prefetch per event type (None: no event known), from the domain's working-set model."""
        background = st.model.resident_set(self.clock())
        plan: dict[str | None, list[int]] = {None: background}
        for event in EVENT_TYPES:
            plan[event] = st.model.predicted(event) or background
        return plan

    def _page_in(self, name: str, event: str | None, all_pages: bool, prefetch: bool) -> Decision:
        started = time.monotonic()
        timings: dict[str, float] = {}

        def step(label: str) -> None:
            timings[label] = (time.monotonic() - started) * 1000

        if self.waker is not None:
            self.waker.unwatch(name)
        mech = self.mechanism(name)
        plan = self._wake_plans.pop(name, None)
        st: DomainState | None = None
        if plan is None:  # not paused by this process (or resumed since): the persisted state says
            st = self.state(name)
            plan = self._wake_plan(st)
            paused = st.phase in (PAUSING, PAGED_OUT)
        else:
            paused = True  # `cont` of a guest someone else resumed meanwhile is harmless
        if all_pages:
            pages = list(range(mech.guest_pages()))
        else:
            pages = plan.get(event, plan[None])
        step("state")
        n = mech.prefetch(pages) if prefetch else 0
        step("prefetch")
        if prefetch and hasattr(mech, "prefetch_overhead"):
            mech.prefetch_overhead()  # the hypervisor's own pages the domain needs to run (QEMU's TCG cache)
        step("prefetch_hypervisor")
        if paused:
            self.hv.unpause(name)
        step("resume")
        # Book-keeping after the resume: the guest is running (and answering) meanwhile.
        st = st or self.state(name)
        if event:
            st.model.note(event, self.clock())
        st.phase = RESIDENT
        st.acted_at = None
        self.store.save(st)
        step("saved")
        return Decision(name, PAGE_IN, f"prefetched {event or 'working set'}", pages=n, timings=timings)

    def record_event(self, name: str, event: str, touched: Iterable[int]) -> None:
        st = self.state(name)
        st.model.record(event, touched, self.clock())
        self.store.save(st)


# ---------------------------------------------------------------- figures for `xenswap list` and metrics


def domain_figures(store: StateStore | None = None) -> dict[str, dict]:
    """Per domain: resident_mib, wss_mib, idle_since (unix time or None), phase — from the manager's state."""
    out = {}
    for name, st in (store or StateStore()).load_all().items():
        wss = st.wss_pages
        out[name] = {
            "resident_mib": None if st.resident_pages is None else round(pages_to_mib(st.resident_pages), 1),
            "wss_mib": None if wss is None else round(pages_to_mib(wss), 1),
            "idle_since": st.detector.idle_since,
            "phase": st.phase,
            "vcpu_usage": st.detector.last_usage,
            "pageouts": st.pageouts,
        }
    return out


def fill_domain_info(domains: list, store: StateStore | None = None) -> list:
    """Fill DomainInfo.resident_mib / wss_mib / idle_since in place from the manager's state."""
    figures = domain_figures(store)
    for dom in domains:
        f = figures.get(dom.name)
        if f:
            # a port that measures residency itself (QEMU: the RAM mapping now) beats the last tick's figure
            dom.resident_mib = dom.resident_mib if dom.resident_mib is not None else f["resident_mib"]
            dom.wss_mib = f["wss_mib"]
            dom.idle_since = f["idle_since"]
    return domains


def render_metrics(figures: dict[str, dict] | None = None) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    figures = domain_figures() if figures is None else figures
    metrics = [
        ("xenswap_domain_resident_bytes", "gauge", "Guest RAM resident in host memory",
         lambda f: None if f["resident_mib"] is None else f["resident_mib"] * 1048576),
        ("xenswap_domain_working_set_bytes", "gauge", "Predicted working set kept resident",
         lambda f: None if f["wss_mib"] is None else f["wss_mib"] * 1048576),
        ("xenswap_domain_idle_since_seconds", "gauge", "Unix time the domain became idle (absent when busy)",
         lambda f: f["idle_since"]),
        ("xenswap_domain_vcpu_usage_ratio", "gauge", "Fraction of the last quantum the vCPUs used",
         lambda f: f["vcpu_usage"]),
        ("xenswap_domain_pageouts_total", "counter", "Page-outs applied to the domain", lambda f: f["pageouts"]),
    ]
    lines = []
    for metric, kind, help_text, get in metrics:
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        for name, f in sorted(figures.items()):
            value = get(f)
            if value is not None:
                label = name.replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{metric}{{domain="{label}",phase="{f["phase"]}"}} {value:g}')
    return "\n".join(lines) + "\n"


def mechanism_factory_for(hv) -> MechanismFactory | None:
    """The port's memory mechanism factory: ``<port module>.memory.mechanism_for(hv, name)`` when it has one."""
    import importlib

    try:
        module = importlib.import_module(f"xenswap.hv.{hv.name}.memory")
    except ImportError:
        return None
    make = getattr(module, "mechanism_for", None)
    return None if make is None else (lambda name: make(hv, name))


def engine_for(hv, config: PolicyConfig | None = None, wake: bool = True) -> Manager | None:
    """What the daemon drives each tick (``.tick()``, ``.annotate(domains)``); None when the port cannot page.
    With ``wake``, the port's wake source (``<port>.memory_events.wake_source_for``) is attached too."""
    import importlib

    factory = mechanism_factory_for(hv)
    if factory is None:
        return None
    manager = Manager(hv, factory, config)
    if wake:
        try:
            module = importlib.import_module(f"xenswap.hv.{hv.name}.memory_events")
        except ImportError:
            module = None
        make = getattr(module, "wake_source_for", None)
        if make is not None:
            manager.waker = make(hv, manager)
    return manager
