"""Event prefetch for the Xen port (hypervisor patch 0002): an event for a paged guest is held in Xen and announced
on the paging ring; the pager prefetches that event kind's predicted working set (from the core working-set
engine), then answers, and Xen delivers the event. The guest wakes with what it is about to touch already in.

Event kinds. The announcement says which of the guest's event-channel ports fired, its state (VIRQ,
interdomain, ...), the VIRQ number or the sending domain. The guest's own ports of its devices are in xenstore
(``console/port``, ``store/port``, and each vif's and vbd's ``event-channel`` under ``device/vif/N`` and
``device/vbd/N``), so:

=====================================  ==================  ==============================================
held event                             kind                working set prefetched
=====================================  ==================  ==============================================
VIRQ_TIMER (virq 0)                    ``idle``            the timer-tick background
the console's port (xenconsoled)       ``console``         what a console command touched
a vif's ports (netback)                ``ping``            the network working set
a vbd's port (blkback)                 ``disk``            the disk working set
anything else (xenstore, IPIs, ...)    ``idle``
=====================================  ==================  ==============================================

A device's ports are not always one ``event-channel`` key: Linux's netfront takes split channels
(``event-channel-tx``, ``event-channel-rx``) whenever netback offers them, which Linux's netback does (seen in the
rig: a vif had only ``event-channel-tx`` = 7 and ``event-channel-rx`` = 8), and a multi-queue vif or vbd keeps
its keys under ``queue-N/``. Every one of them is the device's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from xenswap.hv.xen import bindings
from xenswap.hv.xen.pager import DomainPager

VIRQ_TIMER = 0
ECS_VIRQ, ECS_INTERDOMAIN = 5, 3


def port_kinds(domid: int, store=None) -> dict[int, str]:
    """The guest's event-channel ports of its console, vifs and vbds (from xenstore) and their event kinds."""
    from xenswap.hv.xen.xenstore import XenStore

    own = store is None
    store = store or XenStore()
    try:
        base = f"/local/domain/{domid}"
        kinds = {}
        for path, kind in ((f"{base}/console/port", "console"), (f"{base}/store/port", "idle")):
            value = store.read(path)
            if value and value.isdigit():
                kinds[int(value)] = kind
        for device, kind in (("vif", "ping"), ("vbd", "disk")):
            for index in store.list(f"{base}/device/{device}") if store.exists(f"{base}/device/{device}") else []:
                for port in device_ports(store, f"{base}/device/{device}/{index}"):
                    kinds[port] = kind
        return kinds
    finally:
        if own:
            store.close()


# Where a frontend writes its event channels: one channel, or a split pair (netfront's tx and rx).
EVENT_CHANNEL_KEYS = ("event-channel", "event-channel-tx", "event-channel-rx")


def device_ports(store, device_path: str) -> list[int]:
    """The event-channel ports a frontend device wrote under ``device_path`` (split or not, one queue or several)."""
    queues = [f"{device_path}/{name}" for name in store.list(device_path) if name.startswith("queue-")]
    ports = []
    for path in [device_path, *queues]:
        for key in EVENT_CHANNEL_KEYS:
            value = store.read(f"{path}/{key}")
            if value and value.isdigit():
                ports.append(int(value))
    return ports


def event_kind(request, kinds: dict[int, str]) -> str:
    """The core engine's event type of a held event (table in the module docstring)."""
    if request.state == ECS_VIRQ and request.virq == VIRQ_TIMER:
        return "idle"
    return kinds.get(request.port, "idle")


class EventPrefetcher:
    """Holds a domain's events while it has frames out, and on each held event calls ``on_event(kind)`` (which
    prefetches) before the pager lets it through. The same event kind is prefetched at most once per
    ``min_interval`` seconds (a 100 Hz tick must not cost 100 store reads a second once its set is in)."""

    def __init__(self, pager: DomainPager, on_event: Callable[[str], None], min_interval: float = 1.0) -> None:
        self.pager = pager
        self.on_event = on_event
        self.min_interval = min_interval
        self.kinds = port_kinds(pager.domid)
        self.fired: list[tuple[float, str, object]] = []  # (monotonic time, kind, request), last 256
        self._last: dict[str, float] = {}
        self.disable_after = False
        pager.on_event = self._held

    def _held(self, pager: DomainPager, request) -> None:
        kind = event_kind(request, self.kinds)
        now = time.monotonic()
        self.fired.append((now, kind, request))
        del self.fired[:-256]
        if now - self._last.get(kind, -1e9) >= self.min_interval or kind != "idle":
            self._last[kind] = now
            self.on_event(kind)
        if self.disable_after:
            self.disable_after = False
            self.disable()  # releases every held event; the pager answers this one right after

    def enable(self) -> None:
        self.pager.hold_events(True)

    def disable(self) -> None:
        self.pager.hold_events(False)


class XenEventWakeSource:
    """The manager's ``WakeSource`` for Xen guests: watching a guest turns the event hold on; a held event makes
    the manager page in (prefetch) that event's working set, then the event is delivered.

    The manager's page_in unwatches first; from inside a held event that must not release the hold before the
    prefetch is done (the event would reach the guest first), so unwatching there is deferred until the pager
    has answered."""

    def __init__(self, manager, prefetch: bool = True) -> None:
        self.manager = manager
        self.prefetch = prefetch  # False: deliver at once, demand paging only (for comparison)
        self._watched: dict[str, EventPrefetcher] = {}
        self._lock = threading.Lock()
        self._in_event = threading.local()

    def watch(self, name: str) -> None:
        from xenswap.hv.xen.memory import pager_for

        pager = pager_for(self.manager.hv.domid(name))
        prefetcher = EventPrefetcher(pager, lambda kind: self._wake(name, kind))
        with self._lock:
            self._watched[name] = prefetcher
        prefetcher.enable()

    def _wake(self, name: str, kind: str) -> None:
        self._in_event.name = name
        try:
            self.manager.page_in(name, event=kind, prefetch=self.prefetch)
        finally:
            self._in_event.name = None

    def unwatch(self, name: str) -> None:
        with self._lock:
            prefetcher = self._watched.pop(name, None)
        if prefetcher is None:
            return
        if getattr(self._in_event, "name", None) == name:
            # Inside the held event: the hold goes off once the prefetch is done (EventPrefetcher._held).
            prefetcher.disable_after = True
        else:
            prefetcher.disable()

    def watched(self) -> list[str]:
        with self._lock:
            return sorted(self._watched)

    def close(self) -> None:
        for name in self.watched():
            self.unwatch(name)


def wake_source_for(hv: object, manager) -> XenEventWakeSource:
    bindings.load()  # a clear error when the bindings are not built
    return XenEventWakeSource(manager)
