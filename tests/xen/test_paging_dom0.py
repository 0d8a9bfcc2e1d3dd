"""Paging a PVH guest with our dom0 pager on the patched hypervisor (runs in the nested rig's dom0).

A guest paged down to its working set keeps running (heartbeat on its console) and its memory is identical after
page-in (md5sum inside the guest of a tmpfs file written before the page-out); the event-prefetch hook holds a
console (interdomain) or timer (VIRQ) event until the pager answers; a pager killed with SIGKILL loses no page.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from paging_helpers import frozen, page_out_to_working_set, paged_to_working_set, serving

from xenswap.hv.xen import bindings, xl

pytestmark = [pytest.mark.dom0, pytest.mark.usefixtures("patched_xen")]

CHECKOUT = Path(__file__).resolve().parents[2]
BLOB_MIB = 2  # demand paging under TCG costs ~40 ms a fault: 512 faults


def md5_of_blob(name: str, **kwargs) -> str:
    out = xl.console_command(name, "md5sum /tmp/blob", **kwargs)
    sums = [ln.split()[0] for ln in out if re.match(r"^[0-9a-f]{32}\s", ln)]
    assert sums, out
    return sums[0]


def mem_kb(domid: int) -> int:
    from xenswap.hv.xen import domain_record

    return int(domain_record(domid)["mem_kb"])


def heartbeats(name: str) -> list[int]:
    text = xl.console_log(name).read_text(errors="replace")
    return [int(n) for n in re.findall(r"^HB (\d+)", text.replace("\r", ""), re.M)]


@pytest.fixture(scope="module")
def guest(pvh_guest):
    """The module's PVH guest, with a random tmpfs file (its md5sum) and a heartbeat on its console."""
    xl.console_command(pvh_guest.name, f"dd if=/dev/urandom of=/tmp/blob bs=1M count={BLOB_MIB} 2>/dev/null; echo ok")
    expected = md5_of_blob(pvh_guest.name)
    # A heartbeat every second: "HB <n>" (n counts up; the log shows the guest ran while it was paged).
    xl.console_command(pvh_guest.name, "(n=0; while :; do n=$((n+1)); echo HB $n; sleep 1; done) >/dev/hvc0 &")
    return pvh_guest, expected


def test_ring_is_refused_a_second_time_while_enabled(guest):
    """Xen allows one paging ring per domain: the takeover path of a restarted pager starts from EBUSY."""
    spec, _ = guest
    domid = xl.domid(spec.name)
    ctrl = bindings.open_xenctrl()
    with bindings.VmEventChannel.open(ctrl, domid):
        with pytest.raises(OSError) as caught:
            bindings.VmEventChannel.open(ctrl, domid)
        assert caught.value.errno == 16 and caught.value.filename == "xc_vm_event_enable"


def test_a_ring_enabled_again_in_the_same_domain_starts_empty(guest, store):
    """Xen leaves the shared ring's indices to the helper (xenpaging and xen-access SHARED_RING_INIT it): a ring
    enabled for the second time in a domain is a recycled page that still held old indices. Without our
    initialisation the pager read stale slots as requests and Xen read stale slots as responses (measured: 70,000
    to 1.5 million "faults" on resident frames, a guest that stopped answering, in every second-pager run)."""
    spec, _ = guest
    domid = xl.domid(spec.name)
    from xenswap.hv.xen.memory import XenMemory

    with serving(domid, store) as first:
        # a few frames out, so that the hold holds: the timer ticks then go through the ring and move its indices
        # (the first harvest splits superpages, paging one frame of each out; after the second one the frames
        # the guest did not touch since can go)
        memory = XenMemory(domid, first)
        memory.accessed_pages_and_clear()
        memory.accessed_pages_and_clear()
        first.page_out(range(0x6000, 0x6100))
        assert first.out
        first.hold_events(True)
        deadline = time.monotonic() + 60
        while first.stats.held_events < 10 and time.monotonic() < deadline:
            time.sleep(0.5)
        first.hold_events(False)
        assert first.stats.held_events >= 10, first.stats
        first.close(page_in_all=True)
    ctrl = bindings.open_xenctrl()
    with bindings.VmEventChannel.open(ctrl, domid) as again:
        assert again.ring.pending() == 0
        assert again.wait(0.5) == []  # and nothing stale turns up once the guest runs


def test_guest_paged_to_its_working_set_keeps_running_with_identical_memory(guest, store):
    from xenswap.hv.xen.memory import XenMemory

    spec, expected = guest
    domid = xl.domid(spec.name)
    before_kb = mem_kb(domid)
    with serving(domid, store) as pager:
        memory = XenMemory(domid, pager)
        started = time.monotonic()
        evicted, hot = page_out_to_working_set(memory)
        seconds = time.monotonic() - started
        print(f"\npaged out {evicted} of {memory.guest_pages()} frames ({len(hot)} in the working set, "
              f"{pager.stats.superpages_split} superpages split) in {seconds:.1f} s; "
              f"mem {before_kb} -> {mem_kb(domid)} KiB")
        assert len(hot) < memory.guest_pages() // 8  # exact to the frame once superpages are split
        assert evicted > memory.guest_pages() * 3 // 4
        assert mem_kb(domid) < before_kb - evicted * 4 * 0.9  # Xen freed the frames
        with pager._lock:  # the ring thread may be loading a frame the guest touched
            pager._flush_loaded()
            assert set(store.gfns(pager.key)) == pager.out
            assert len(pager.out) >= evicted - pager.stats.faults
            assert set(memory.resident_pages()).isdisjoint(pager.out)

        # Two heartbeats while paged out. The first ones fault the shell's working set back in, ~10-70 ms a
        # fault under TCG depending on the host's load: up to a minute, not a fixed few seconds.
        beats = heartbeats(spec.name)
        deadline = time.monotonic() + 60
        while len(heartbeats(spec.name)) < len(beats) + 2 and time.monotonic() < deadline:
            time.sleep(1)
            print(f"  +1 s: {pager.stats.faults} faults, {len(heartbeats(spec.name)) - len(beats)} heartbeats")
        assert len(heartbeats(spec.name)) >= len(beats) + 2, "no heartbeat while paged out"

        faults = pager.stats.faults
        started = time.monotonic()
        assert md5_of_blob(spec.name) == expected  # demand-paged back in through the ring
        took = time.monotonic() - started
        new_faults = pager.stats.faults - faults
        fault_ms = sorted(pager.stats.fault_seconds)[len(pager.stats.fault_seconds) // 2] * 1000
        print(f"md5sum of the {BLOB_MIB} MiB file: {took:.1f} s, {new_faults} faults "
              f"({took / max(1, new_faults) * 1000:.0f} ms per fault round trip, {fault_ms:.1f} ms in the pager)")
        assert new_faults >= BLOB_MIB * 256 * 0.9

        started = time.monotonic()
        loaded = pager.page_in_all()
        print(f"page-in of the remaining {loaded} frames: {time.monotonic() - started:.1f} s")
        assert pager.out == set() and store.gfns(pager.key) == []
        assert md5_of_blob(spec.name) == expected
        pager.close(page_in_all=True)
    assert mem_kb(domid) >= before_kb - 64


def test_batched_load_gives_back_identical_frames_and_enoent_per_frame(guest, store):
    """load_batch (patch 0004): one hypercall loads a batch; a frame that is not paged out gets ENOENT without
    stopping the others; the frames Xen maps are byte for byte the stored copies; the pager's page-in (batched)
    then brings the rest back, its bookkeeping exact, and the guest's file has the same md5sum."""
    spec, expected = guest
    domid = xl.domid(spec.name)
    with paged_to_working_set(domid, store) as (pager, _, hot):
        with frozen(pager):
            chosen = sorted(pager.out)[::97][:300]
            resident = [g for g in hot if g not in pager.out][:2]
            assert len(chosen) == 300 and len(resident) == 2
            stored = store.get_pages(pager.key, chosen)
            with pager.fmem.map(domid, resident) as mapping:
                resident_before = bytes(mapping)
            gfns = [*chosen[:100], resident[0], *chosen[100:], resident[1]]
            data = [stored[g] if g in stored else bytes(range(256)) * 16 for g in gfns]
            started = time.perf_counter()
            statuses = pager.ctrl.mem_paging_load_batch(domid, gfns, data)
            took = time.perf_counter() - started
            print(f"\nload_batch of {len(gfns)} frames: {took * 1000:.1f} ms "
                  f"({took / len(gfns) * 1000:.3f} ms per frame)")
            assert statuses[100] == statuses[-1] == errno.ENOENT  # resident: the batch went on
            assert statuses[:100] + statuses[101:-1] == [0] * 300
            with pager.fmem.map(domid, chosen) as mapping:
                assert mapping.errors == [0] * 300
                assert [bytes(mapping.page(i)) == stored[g] for i, g in enumerate(chosen)] == [True] * 300
            with pager.fmem.map(domid, resident) as mapping:
                assert bytes(mapping) == resident_before  # an ENOENT frame is not written
        # the pager still counts the chosen frames as out: its load gets ENOENT for them and forgets them
        out_before, faults_before = len(pager.out), pager.stats.faults
        started = time.monotonic()
        loaded = pager.page_in_all()
        took = time.monotonic() - started
        print(f"page-in of the other {loaded} frames: {took:.1f} s ({took / max(1, loaded) * 1000:.2f} ms per frame)")
        assert pager.batched_load is True
        # every frame still out was loaded, except the 300 (ENOENT) and what the guest faulted in meanwhile
        assert out_before - 300 - (pager.stats.faults - faults_before) <= loaded <= out_before - 300
        assert pager.out == set() and store.gfns(pager.key) == []
        assert store.check() == []
        assert md5_of_blob(spec.name) == expected
        pager.close(page_in_all=True)


def test_staged_frames_load_from_dom0_ram_byte_for_byte(guest, store, monkeypatch):
    """``stage``: frames already out are read from the store once, at the call; frames paged out afterwards keep
    the bytes the page-out copied. Loading a staged frame asks the store nothing, Xen maps exactly the stored
    bytes, and the copy is dropped once the frame is back in the guest."""
    spec, expected = guest
    domid = xl.domid(spec.name)
    with paged_to_working_set(domid, store) as (pager, memory, _):
        asked: list[int] = []
        read = store.get_pages

        def get_pages_noted(key, gfns):
            gfns = list(gfns)
            asked.extend(gfns)
            return read(key, gfns)

        with frozen(pager):
            chosen = sorted(pager.out)[::41][:pager.stage_limit]
            stored = store.get_pages(pager.key, chosen)
            monkeypatch.setattr(store, "get_pages", get_pages_noted)  # undone after the test
            assert memory.stage(chosen) == len(chosen) == len(pager.staged())
            assert sorted(asked) == chosen  # read once, now
            asked.clear()
            assert pager.prefetch(chosen) == len(chosen)
            assert asked == [] and pager.stats.staged_loads == len(chosen) and pager.staged() == {}
            with pager.fmem.map(domid, chosen) as mapping:
                assert [bytes(mapping.page(i)) == stored[g] for i, g in enumerate(chosen)] == [True] * len(chosen)

            # paged out again with the same set staged: the copies are the page-out's own bytes (a load sets
            # the frames' accessed bits, which the page-out honours: cleared first, the guest is paused)
            memory.accessed_pages_and_clear()
            assert pager.page_out(chosen) >= len(chosen) - 8  # a frame Xen refuses at nominate stays in
            staged = sorted(pager.staged())
            assert staged == sorted(set(chosen) & pager.out) and asked == []
            assert pager.staged() == store.get_pages(pager.key, staged)
            asked.clear()
            loads = pager.stats.staged_loads
            pager.prefetch(staged[:100])
            assert asked == [] and pager.stats.staged_loads == loads + 100
            assert memory.stage([]) == 0 and pager.staged() == {}  # a new set replaces the old one
            assert pager.prefetch(staged[100:200]) == 100
            assert sorted(asked) == staged[100:200]  # nothing held: from the store
        pager.page_in_all()
        assert md5_of_blob(spec.name) == expected
        pager.close(page_in_all=True)


def test_pager_killed_with_sigkill_loses_no_page(guest, store, tmp_path):
    """A standalone pager evicts the cold frames and is killed; the guest then faults with no pager (its vCPU
    waits on the ring); a new pager takes the ring over, serves it, and every page comes back intact."""
    spec, expected = guest
    domid = xl.domid(spec.name)
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    first = subprocess.Popen([sys.executable, "-m", "xenswap.hv.xen.pager", str(domid), "--store", str(store.path),
                              "--page-out-cold", "3"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in first.stdout:
            lines.append(line)
            if "serving" in line:
                break
        assert "serving" in lines[-1], "".join(lines)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    key = _uuid(domid)
    out_after_kill = set(store.gfns(key))
    assert len(out_after_kill) > 1000, lines

    # The guest touches its paged-out file while no pager runs: its vCPU pauses on the first fault.
    xl.type_on_console(spec.name, "md5sum /tmp/blob > /tmp/sum.txt")
    time.sleep(3)

    with serving(domid, store) as second:
        assert second.stats.restarts_recovered == 1
        # its ring thread already serves faults: what is no longer out, it loaded
        assert second.out <= out_after_kill and len(out_after_kill - second.out) <= second.stats.faults
        assert xl.console_command(spec.name, "cat /tmp/sum.txt")[0].split()[0] == expected
        assert md5_of_blob(spec.name) == expected
        assert second.stats.faults > 0
        second.close(page_in_all=True)
    assert store.gfns(key) == []
    assert store.check() == []


def test_event_hook_holds_console_and_timer_events_until_the_pager_answers(guest, store):
    from xenswap.hv.xen.memory import XenMemory
    from xenswap.hv.xen.memory_events import EventPrefetcher

    spec, expected = guest
    domid = xl.domid(spec.name)
    token = secrets.token_hex(3)
    seen: list[tuple[str, bool, int]] = []  # (kind, command output already on the console?, prefetched)

    with serving(domid, store) as pager:
        memory = XenMemory(domid, pager)
        # the console event's working set, measured like the core engine does: accessed bits around one event
        memory.accessed_pages_and_clear()
        xl.console_command(spec.name, "md5sum /tmp/blob")
        console_ws = memory.accessed_pages_and_clear()
        page_out_to_working_set(memory)
        assert len(pager.out) > 1000

        def on_event(kind: str) -> None:
            output_there = f"{token}-{7 * 6}" in xl.console_log(spec.name).read_text(errors="replace")
            prefetched = pager.prefetch(console_ws) if kind == "console" else 0
            seen.append((kind, output_there, prefetched))
            if kind == "console":
                time.sleep(1.0)  # the event stays held meanwhile: the guest cannot have answered

        prefetcher = EventPrefetcher(pager, on_event, min_interval=0)
        prefetcher.enable()
        try:
            assert md5_of_blob(spec.name) == expected
            before_echo = len(seen)
            typed = time.monotonic()
            xl.console_command(spec.name, f"echo {token}-$((6*7))")
            took = time.monotonic() - typed
        finally:
            prefetcher.disable()
        kinds = {kind for kind, _, _ in seen}
        print(f"\nheld events: {len(prefetcher.fired)} ({sorted(kinds)}), console round trips {took:.1f} s")
        assert "console" in kinds and "idle" in kinds  # the console's interdomain port and VIRQ_TIMER
        console_events = [s for s in seen if s[0] == "console"]
        echo_events = [s for s in seen[before_echo:] if s[0] == "console"]
        assert echo_events and not echo_events[0][1], "the command ran before its console event was released"
        assert sum(p for _, _, p in console_events) > 0, "the console working set was not prefetched"
        assert any(req.state == 5 and req.virq == 0 for _, _, req in prefetcher.fired)
        assert took >= 1.0  # every console event was held for the hook's second

        # A second hold in the same domain announces its events too (patch 0002 re-arms the tasklet that a
        # disable killed; without that the guest's console hung on the second hold).
        again = EventPrefetcher(pager, lambda kind: None, min_interval=0)
        again.enable()
        try:
            assert xl.console_command(spec.name, f"echo {token}-again") == [f"{token}-again"]
        finally:
            again.disable()
        assert any(kind == "console" for _, kind, _ in again.fired), again.fired
        pager.close(page_in_all=True)


def _uuid(domid: int) -> str:
    from xenswap.hv.xen.pager import domain_uuid

    return domain_uuid(domid)
