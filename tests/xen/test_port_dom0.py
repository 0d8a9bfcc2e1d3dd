"""The Xen port against real domains in the nested dom0: list, state flags, pause/unpause, vCPU times,
``xenswap list`` output, destroy."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from xenswap.errors import UnknownDomain, XenswapError
from xenswap.hv import select_hypervisor
from xenswap.hv.xen import xl
from xenswap.hv.xen.port import XenHypervisor

pytestmark = pytest.mark.dom0


def xl_list() -> dict[str, list[str]]:
    out = subprocess.run(["xl", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0]: line.split() for line in out.splitlines()[1:]}


def xenswap_list_json() -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "xenswap", "list", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_auto_selects_xen_in_dom0():
    assert isinstance(select_hypervisor("auto"), XenHypervisor)


def test_dom0_listed_like_xl(hv):
    dom0 = hv.lookup(0)
    row = xl_list()["Domain-0"]
    assert dom0.name == "Domain-0"
    assert dom0.mem_mib == int(row[2])
    assert dom0.vcpus == int(row[3])
    assert dom0.state[0] == "r"  # this very code runs on it
    assert dom0.cpu_time_s > 0


def test_unknown_domain_is_clear(hv):
    with pytest.raises(UnknownDomain, match="no-such-guest"):
        hv.lookup("no-such-guest")


def test_domain_record_is_exactly_the_asked_domain(hv):
    """The record of the domain asked for, or None for a domain that does not exist (domain_getinfo(d, 1) would
    answer with the next domain up, or nothing)."""
    from xenswap.hv.xen import domain_record

    assert domain_record(0)["domid"] == 0
    unused = max(d.domid for d in hv.list_domains()) + 1000
    assert domain_record(unused) is None


def test_refuses_to_pause_dom0(hv):
    with pytest.raises(XenswapError, match="Domain-0"):
        hv.pause("Domain-0")


def test_pv_guest_boots_and_is_listed(hv, pv_guest):
    dom = hv.lookup(pv_guest.name)
    assert dom.domid > 0
    assert 120 <= dom.mem_mib <= 128
    assert dom.vcpus == 1
    assert dom.extra["hvm"] is False
    assert dom.state[2] == "-"
    row = xl_list()[pv_guest.name]
    # r/b (and neither: runnable, waiting for a CPU) change from one instant to the next; the rest is stable
    assert dom.state[2:] == row[4][2:] == "----"
    assert dom.state[:2] in ("r-", "-b", "--")
    listed = {d["name"]: d for d in xenswap_list_json()}
    assert listed[pv_guest.name]["domid"] == dom.domid
    assert listed[pv_guest.name]["mem_mib"] == dom.mem_mib


def test_pause_unpause_and_vcpu_time(hv, pv_guest):
    hv.pause(pv_guest.name)
    try:
        assert hv.lookup(pv_guest.name).state[2] == "p"
        assert xl_list()[pv_guest.name][4][2] == "p"
        frozen = hv.vcpu_times(pv_guest.name)
        time.sleep(1.5)
        assert hv.vcpu_times(pv_guest.name) == frozen  # a paused vCPU accrues no time
    finally:
        hv.unpause(pv_guest.name)
    assert hv.lookup(pv_guest.name).state[2] == "-"
    before = sum(hv.vcpu_times(pv_guest.name))
    # the guest's init keeps a shell and services running; give it a moment to be scheduled
    deadline = time.monotonic() + 30
    while sum(hv.vcpu_times(pv_guest.name)) <= before and time.monotonic() < deadline:
        subprocess.run(["xl", "sysrq", pv_guest.name, "m"], capture_output=True)  # makes the guest run
        time.sleep(0.5)
    assert sum(hv.vcpu_times(pv_guest.name)) > before


def test_destroy_removes_domain(hv, pv_guest):
    # runs after the other PV tests of this module (file order); the fixture's own destroy is then a no-op
    assert hv.lookup(pv_guest.name).domid > 0
    xl.destroy(pv_guest.name)
    deadline = time.monotonic() + 30
    while pv_guest.name in xl_list() and time.monotonic() < deadline:
        time.sleep(0.5)
    with pytest.raises(UnknownDomain):
        hv.lookup(pv_guest.name)


def test_pvh_guest_boots(hv, pvh_guest):
    # the fixture has waited for the guest's boot marker
    dom = hv.lookup(pvh_guest.name)
    assert dom.extra["hvm"] is True  # a PVH guest is an HVM container to Xen
    assert hv.lookup(pvh_guest.name).state[4] == "-"  # not crashed
