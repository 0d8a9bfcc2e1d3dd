"""Paging on real QEMU guests (rig tier). One guest is shared by the module to save CPU (TCG boots cost ~15 s
of a core each)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xenswap.core.policy import PAGED_OUT, PAGING_OUT, RESIDENT, WORKING_SET, engine_for
from xenswap.hv.qemu.memory import range_digest

pytestmark = pytest.mark.rig

SUBNET = f"10.{60 + os.getpid() % 40}.{os.getpid() % 200}"


def ping(ip: str, timeout: int = 10) -> bool:
    return subprocess.run(["ping", "-c", "1", "-W", str(timeout), ip], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def guest(host_swap):
    from xenswap.hv.qemu import QemuVM

    vm = QemuVM.create(f"pg{os.getpid() % 100000}", mem_mib=128, ip=f"{SUBNET}.2/24")
    try:
        vm.console.run("dd if=/dev/urandom of=/tmp/blob bs=1k count=4096 2>/dev/null", timeout=60, check=True)
        yield vm
    finally:
        vm.destroy()


@pytest.fixture(scope="module")
def manager(guest):
    from xenswap.hv.qemu import open_hypervisor

    m = engine_for(open_hypervisor())
    yield m
    m.waker.close()


def guest_md5(vm) -> str:
    return vm.console.run("md5sum /tmp/blob", timeout=60, check=True).split()[0]


def test_memory_identical_after_20_page_out_cycles(guest, manager):
    from xenswap.hv.qemu.memory_events import http_get, measure_event

    name = guest.name
    mech = manager.mechanism(name)
    for _ in range(2):
        manager.record_event(name, "idle", measure_event(guest, mech, "idle", window=3)[0])
    md5 = guest_md5(guest)
    base, length = guest.ram_region()
    for cycle in range(20):
        guest.pause()
        before = range_digest(guest.pid, base, length)
        manager.page_out(name, keep_ws=cycle % 2 == 0, pause=False)
        assert len(mech.resident_pages()) < 4096, "page-out left more than 16 MiB resident"
        after = range_digest(guest.pid, base, length)  # faults everything back in from swap
        assert after == before, f"guest RAM changed across page-out cycle {cycle}"
        guest.resume()
        manager.page_out(name, keep_ws=True, pause=False)
        # Services keep answering while paged out (demand paging brings back what they touch).
        assert ping(guest.ip)
        if cycle % 5 == 4:
            assert http_get(guest.ip).startswith(b"HTTP/1.")
            assert guest_md5(guest) == md5
    assert guest_md5(guest) == md5


def host_neighbour_states(tap: str, ip: str) -> list[int]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=tap)[0]
        return [n["state"] for n in ipr.get_neighbours(ifindex=index, dst=ip)]


def wait_resident(manager, name: str) -> None:
    deadline = time.monotonic() + 5
    while manager.state(name).phase != RESIDENT and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.state(name).phase == RESIDENT


def test_paused_and_paged_out_guest_answers_ping(guest, manager):
    from xenswap.hv.qemu.memory_events import NUD_PERMANENT

    name = guest.name
    manager.page_out(name, keep_ws=False)  # pause + everything out; the tap waker is armed
    assert manager.state(name).phase == PAGED_OUT
    assert guest.status() == "paused"
    assert len(manager.mechanism(name).resident_pages()) < 256
    # The host will not ARP for the paused guest (nobody would answer): the first frame is the ping itself.
    assert any(state & NUD_PERMANENT for state in host_neighbour_states(guest.tap, guest.ip))
    manager.waker.wakes.clear()
    t0 = time.monotonic()
    assert ping(guest.ip)  # held in the tap queue, working set prefetched, guest resumed, then delivered
    assert time.monotonic() - t0 < 5
    assert guest.status() == "running"
    wait_resident(manager, name)
    wake = manager.waker.wakes[-1]
    assert wake["event"] == "ping"
    assert 0 <= wake["seen_ms"] <= wake["prefetch"] <= wake["resume"] < 5000


def test_paused_guest_woken_by_http_prefetches_for_http(guest, manager):
    """Classified by the real first packet (a TCP SYN to port 80), not by an ARP request."""
    from xenswap.hv.qemu.memory_events import http_get

    name = guest.name
    manager.page_out(name, keep_ws=False)
    manager.waker.wakes.clear()
    assert http_get(guest.ip, timeout=10).startswith(b"HTTP/1.")
    wait_resident(manager, name)
    assert [w["event"] for w in manager.waker.wakes] == ["http"]


def test_pause_and_resume_keep_working_while_another_process_holds_the_second_monitor(guest, manager):
    """This process keeps a connection open on the VM's second monitor for stop/cont; another process (the CLI)
    finds it taken and falls back to a short connection on the first."""
    from xenswap.hv.qemu import vm as vm_module

    guest.pause()
    guest.resume()
    assert (str(guest.qmp_long_socket), guest.pid) in vm_module._monitors
    xenswap = str(Path(sys.executable).with_name("xenswap"))  # the venv's entry point (same XENSWAP_STATE)
    subprocess.run([xenswap, "pause", guest.name], check=True, timeout=30)
    assert guest.status() == "paused"
    subprocess.run([xenswap, "unpause", guest.name], check=True, timeout=30)
    assert guest.status() == "running"
    assert ping(guest.ip)


KILLABLE_MANAGER = """
import sys
from xenswap.core.policy import engine_for
from xenswap.hv.qemu import open_hypervisor
m = engine_for(open_hypervisor(), wake=False)
print("ready", flush=True)
while True:
    m.page_out(sys.argv[1], keep_ws=True)
    m.page_out(sys.argv[1], keep_ws=False, pause=False)
"""


def test_kill_9_mid_page_out_leaves_guest_running_and_successor_takes_over(guest, manager):
    name = guest.name
    md5 = guest_md5(guest)
    pageouts_before = manager.state(name).pageouts
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_MANAGER, name], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # dozens of page-outs in flight
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert guest.status() == "running"
    assert ping(guest.ip)
    st = manager.state(name)
    assert st.pageouts > pageouts_before  # the dead manager's work is on record
    assert st.phase in (PAGING_OUT, WORKING_SET)
    manager.tick()  # the successor recovers whatever was in flight
    assert manager.state(name).phase in (WORKING_SET, RESIDENT)
    assert guest.status() == "running"
    assert guest_md5(guest) == md5


def test_manager_ticks_page_an_idle_guest_out_to_its_working_set(guest):
    """The daemon's loop on a real guest: idle detected from vCPU time, idle working set measured over a few
    ticks, page-out to it; ``annotate`` fills the columns of ``xenswap list``."""
    from xenswap.core.policy import PAGE_OUT_WS, PolicyConfig, StateStore
    from xenswap.hv.qemu import open_hypervisor

    hv = open_hypervisor()
    store = StateStore(Path(os.environ["XENSWAP_STATE"]) / "tick-test.sqlite")
    m = engine_for(hv, PolicyConfig(predictor="fixed-timeout", measure_idle_ws=2, long_idle_s=1e9), wake=False)
    m.store = store
    m.policy.config.breakeven_s = 1
    from xenswap.core.idleness import FixedTimeout

    st = m.state(guest.name)
    st.keep_predictor(FixedTimeout(timeout=3))
    store.save(st)
    actions = []
    for _ in range(12):
        actions += [d.action for d in m.tick() if d.domain == guest.name]
        if PAGE_OUT_WS in actions:
            break
        time.sleep(1)
    assert PAGE_OUT_WS in actions, actions
    st = m.state(guest.name)
    assert st.phase == WORKING_SET
    assert st.model.events["idle"].observations >= 2
    assert st.resident_pages is not None and st.resident_pages < 4096
    info = m.annotate([d for d in hv.list_domains() if d.name == guest.name])[0]
    assert info.resident_mib is not None and info.resident_mib < 16
    assert info.wss_mib is not None and info.idle_since is not None
    assert ping(guest.ip)
