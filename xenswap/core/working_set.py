"""Working sets per event type (pure: observed page sets in, predicted page sets out).

The poster: "build a minimal working set for each event, keep the working sets of frequent events in memory
(timer interrupts, network packets), swap in the predicted working set before delivering the event".
A measurement is the set of guest frames touched while handling one event (the mechanism's accessed bits,
cleared just before the event). Each event type keeps a frequency count per frame; its predicted working set
is the frames touched in at least ``min_fraction`` of its observations. Event types also keep occurrence
counts, so the policy can keep the working sets of *frequent* events resident.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from xenswap.core.mechanism import PAGE_SIZE, from_ranges, pages_to_mib, to_ranges

# Event types a VM reacts to while "idle". "idle" is the timer-only background (ticks, RCU, watchdogs).
EVENT_TYPES = ("idle", "ping", "tcp", "http", "disk", "console")
NETWORK_EVENTS = ("ping", "tcp", "http")


def check_event(event: str) -> str:
    if event not in EVENT_TYPES:
        from xenswap.errors import SpecError

        raise SpecError(f"unknown event type {event!r} (known: {', '.join(EVENT_TYPES)})")
    return event


@dataclass
class EventWorkingSet:
    """Frequency counts of the frames one event type touched, over its observations."""

    observations: int = 0
    page_counts: Counter = field(default_factory=Counter)
    sizes: list[int] = field(default_factory=list)  # pages touched per observation (last 64)

    def record(self, touched: Iterable[int]) -> None:
        touched = set(touched)
        self.observations += 1
        self.page_counts.update(touched)
        self.sizes.append(len(touched))
        del self.sizes[:-64]

    def predicted(self, min_fraction: float = 0.5) -> list[int]:
        """Frames touched in at least ``min_fraction`` of the observations (at least once)."""
        if not self.observations:
            return []
        need = max(1, int(min_fraction * self.observations + 0.999999))
        return sorted(gfn for gfn, n in self.page_counts.items() if n >= need)

    def to_json(self) -> dict:
        # Store frames grouped by count as runs: a 1,000-page set is a few dozen numbers.
        by_count: dict[int, list[int]] = {}
        for gfn, n in self.page_counts.items():
            by_count.setdefault(n, []).append(gfn)
        return {
            "observations": self.observations,
            "sizes": self.sizes,
            "pages": {str(n): [list(r) for r in to_ranges(g)] for n, g in by_count.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> EventWorkingSet:
        counts: Counter = Counter()
        for n, ranges in d.get("pages", {}).items():
            for gfn in from_ranges(ranges):
                counts[gfn] = int(n)
        return cls(observations=d.get("observations", 0), page_counts=counts, sizes=list(d.get("sizes", [])))


@dataclass
class WorkingSetModel:
    """All event types of one domain, plus how often each event happens."""

    events: dict[str, EventWorkingSet] = field(default_factory=dict)
    occurrences: Counter = field(default_factory=Counter)
    first_seen: dict[str, float] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)

    def record(self, event: str, touched: Iterable[int], now: float | None = None) -> None:
        """A measured event: the frames it touched."""
        self.events.setdefault(check_event(event), EventWorkingSet()).record(touched)
        if now is not None:
            self.note(event, now)

    def note(self, event: str, now: float) -> None:
        """An event happened (measured or not): feeds the frequency estimate."""
        self.occurrences[check_event(event)] += 1
        self.first_seen.setdefault(event, now)
        self.last_seen[event] = now

    def rate(self, event: str, now: float) -> float:
        """Occurrences per second since the event type was first seen."""
        n = self.occurrences.get(event, 0)
        if not n:
            return 0.0
        span = max(now - self.first_seen[event], 1.0)
        return n / span

    def predicted(self, event: str, min_fraction: float = 0.5) -> list[int]:
        ws = self.events.get(check_event(event))
        return ws.predicted(min_fraction) if ws else []

    def frequent_events(self, now: float, min_rate: float = 1 / 300) -> list[str]:
        """The background ("idle") always counts as frequent; others when seen at least every 5 min."""
        return [e for e in EVENT_TYPES if e == "idle" or self.rate(e, now) >= min_rate]

    def resident_set(self, now: float, min_rate: float = 1 / 300, min_fraction: float = 0.5) -> list[int]:
        """What to keep in host RAM when paging out to the working set: the union of frequent events' sets."""
        keep: set[int] = set()
        for event in self.frequent_events(now, min_rate):
            keep.update(self.predicted(event, min_fraction))
        return sorted(keep)

    def summary(self, page_size: int = PAGE_SIZE) -> dict[str, dict]:
        out = {}
        for event, ws in sorted(self.events.items()):
            pages = len(ws.predicted())
            out[event] = {
                "observations": ws.observations,
                "occurrences": self.occurrences.get(event, 0),
                "predicted_pages": pages,
                "predicted_mib": round(pages_to_mib(pages, page_size), 2),
                "last_observed_pages": ws.sizes[-1] if ws.sizes else None,
            }
        return out

    def to_json(self) -> dict:
        return {
            "events": {e: ws.to_json() for e, ws in self.events.items()},
            "occurrences": dict(self.occurrences),
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }

    @classmethod
    def from_json(cls, d: dict) -> WorkingSetModel:
        return cls(
            events={e: EventWorkingSet.from_json(v) for e, v in d.get("events", {}).items()},
            occurrences=Counter(d.get("occurrences", {})),
            first_seen=dict(d.get("first_seen", {})),
            last_seen=dict(d.get("last_seen", {})),
        )
