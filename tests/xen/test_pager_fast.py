"""Fast tier: the pure parts of the Xen pager's event prefetch: which event kind a held event is."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from xenswap.core.working_set import EVENT_TYPES
from xenswap.hv.xen.memory_events import ECS_INTERDOMAIN, ECS_VIRQ, VIRQ_TIMER, event_kind

KINDS = {2: "console", 1: "idle", 7: "ping", 9: "disk"}


@pytest.mark.parametrize(("state", "port", "virq", "expected"), [
    (ECS_VIRQ, 3, VIRQ_TIMER, "idle"),  # the timer tick, whatever its port
    (ECS_VIRQ, 2, VIRQ_TIMER, "idle"),
    (ECS_INTERDOMAIN, 2, 0, "console"),  # xenconsoled's notification on the console port
    (ECS_INTERDOMAIN, 7, 0, "ping"),  # netback
    (ECS_INTERDOMAIN, 9, 0, "disk"),  # blkback
    (ECS_INTERDOMAIN, 1, 0, "idle"),  # xenstore
    (ECS_INTERDOMAIN, 40, 0, "idle"),  # unknown port: the background set
    (6, 5, 0, "idle"),  # IPI
])
def test_held_event_kinds(state, port, virq, expected):
    request = SimpleNamespace(state=state, port=port, virq=virq)
    kind = event_kind(request, KINDS)
    assert kind == expected
    assert kind in EVENT_TYPES  # the core working-set engine knows every kind the hook can report
