"""Building topologies in the kernel: real namespaces, bridges, veths and packets."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from netutil import in_ns, ours, ping_rtt_ms

from xenswap.net import build, kernel
from xenswap.net.build import Naming
from xenswap.net.kernel import NetError
from xenswap.net.store import Store
from xenswap.net.topology import parse

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TWO_LANS = (EXAMPLES / "two-lans.yaml").read_text()


def naming(name: str) -> Naming:
    return build.naming_for(name)


def test_two_lans_route_v4_and_v6_and_reapply_is_a_no_op(topologies) -> None:
    topology = topologies(TWO_LANS)
    names = naming(topology.name)
    h1 = names.netns("h1")
    # h1's eth0 drops 1% of its packets (the topology's loss): three echoes, of which one must come back (ping
    # exits 0 when any reply came). A single echo failed a clean-clone run once.
    in_ns(h1, "ping", "-c", "3", "-i", "0.2", "-W", "5", "10.2.0.10")
    in_ns(h1, "ping", "-c", "3", "-i", "0.2", "-W", "5", "fd00:2::10")
    # the router forwards, the hosts do not
    assert kernel.read_sysctl(names.netns("r1"), "net.ipv4.ip_forward") == "1"
    assert kernel.read_sysctl(names.netns("h2"), "net.ipv4.ip_forward") == "0"
    # host-side devices: tagged, in our group, no IPv6 of the host on them
    bridge = names.bridge("lan1")
    shown = subprocess.run(["ip", "-d", "link", "show", bridge], capture_output=True, text=True, check=True).stdout
    assert "alias xenswap two-lans lan lan1" in shown and f"group {names.group}" in shown
    port = names.port("h1", "eth0")
    for device in (bridge, port):
        assert "inet6" not in subprocess.run(["ip", "-6", "addr", "show", device], capture_output=True, text=True,
                                             check=True).stdout
    # shaping in place on h1 (rate through tbf, loss through a statistic drop, as this kernel has no netem)
    features = kernel.probe()
    qdiscs = in_ns(names.netns("h1"), "tc", "qdisc", "show", "dev", "eth0").stdout
    assert ("netem" if features.netem else "tbf") in qdiscs
    assert not build.diff(parse(TWO_LANS, features=features))  # idempotent: nothing left to do


def test_diff_shows_exactly_the_edit_and_apply_converges(topologies) -> None:
    topology = topologies(TWO_LANS)
    names = naming(topology.name)
    edited = TWO_LANS.replace("eth0: {lan: lan2, addresses: [10.2.0.10/24, \"fd00:2::10/64\"]}",
                              "eth0: {lan: lan2, addresses: [10.2.0.11/24, \"fd00:2::10/64\"]}")
    edited = edited.replace("rate: 20mbit, loss: 1%", "rate: 10mbit")
    assert edited != TWO_LANS
    new = parse(edited, features=kernel.probe())
    changes = build.diff(new).describe()
    h1, h2 = names.netns("h1"), names.netns("h2")
    assert f"- address 10.2.0.10/24 on {h2}/eth0" in changes
    assert f"+ address 10.2.0.11/24 on {h2}/eth0" in changes
    assert any(c.startswith(f"+ shaping in {h1}: eth0: rate 10mbit") for c in changes)
    assert f"~ route 0.0.0.0/0 via 10.2.0.1 in {h2} (again, after the address change)" in changes
    assert len(changes) == 5, changes  # the IPv6 default route of h2 is re-asserted too
    build.apply(new, edited)
    assert not build.diff(new)
    in_ns(h1, "ping", "-c", "1", "-W", "5", "10.2.0.11")
    assert "statistic" not in in_ns(h1, "iptables-save", "-t", "mangle").stdout  # the loss rule went away
    # removing a node removes its namespace and its bridge port, nothing else
    smaller = edited.replace("  h2:\n", "  h2gone:\n", 1)
    smaller_t = parse(smaller, features=kernel.probe())
    changes = build.diff(smaller_t).describe()
    assert f"- namespace {h2}" in changes and f"+ namespace {names.netns('h2gone')}" in changes


def test_a_failure_half_way_rolls_back_everything(nothing_left) -> None:
    # a real kernel refusal: a device with the name our second bridge would get already exists
    topology = parse(TWO_LANS, features=kernel.probe())
    with Store() as store:
        names = Naming(topology.name, store.allocate(topology.name, "test", build.tids_in_kernel()))
    squatter = names.bridge("lan2")
    subprocess.run(["ip", "link", "add", squatter, "type", "veth", "peer", "name", squatter + "x"], check=True)
    try:
        before_ns = kernel.list_namespaces()
        with pytest.raises(NetError, match=rf"could not apply '\+ bridge {squatter} \(lan lan2\)'.*rolled back"):
            build.apply(topology)
        assert kernel.list_namespaces() == before_ns
        assert ours()[1] == {squatter}  # the squatter is not ours; nothing of ours remains
    finally:
        subprocess.run(["ip", "link", "del", squatter], check=True)
        with Store() as store:
            store.forget(topology.name)


def test_links_between_routers_and_ipv6_across_three_hops(topologies) -> None:
    text = (EXAMPLES / "three-routers.yaml").read_text()
    if not kernel.probe().netem:
        # same topology without the delays (which this kernel cannot do): the wiring and routing still count
        text = text.replace("{delay: 10ms}", "{}").replace("{delay: 20ms, rate: 100mbit}", "{rate: 100mbit}")
    topology = topologies(text)
    a = naming(topology.name).netns("a")
    in_ns(a, "ping", "-c", "1", "-W", "5", "10.20.0.10")
    in_ns(a, "ping", "-c", "1", "-W", "5", "fd20::10")
    trace = in_ns(a, "ping", "-c", "1", "-W", "5", "10.20.0.10").stdout
    assert "ttl=61" in trace  # three routers on the way


def test_numbers_in_use_in_the_kernel_are_not_reused(topologies, tmp_path, monkeypatch) -> None:
    """Another state directory (another user, another test session) must not get the same names."""
    first = topologies(TWO_LANS)
    first_tid = naming(first.name).tid
    monkeypatch.setenv("XENSWAP_STATE", str(tmp_path / "other-state"))
    with Store() as other:
        assert other.tid(first.name) is None
        assert other.allocate("another", "test", build.tids_in_kernel()) != first_tid


@pytest.mark.dom0
def test_three_router_rtt_is_the_sum_of_link_delays(topologies) -> None:
    """Runs where netem exists (the nested Xen dom0): RTT = 2 x (10 + 20) ms within tolerance."""
    assert kernel.probe().netem, "this test runs where the kernel has netem"
    topology = topologies((EXAMPLES / "three-routers.yaml").read_text())
    a = naming(topology.name).netns("a")
    for address in ("10.20.0.10", "fd20::10"):
        ping_rtt_ms(a, address, count=2)  # warm up: ARP / neighbour discovery at every hop
    rtt = ping_rtt_ms(a, "10.20.0.10", count=5)
    rtt6 = ping_rtt_ms(a, "fd20::10", count=5)
    print(f"three-router RTT min/avg: IPv4 {rtt[0]:.1f}/{rtt[1]:.1f} ms, IPv6 {rtt6[0]:.1f}/{rtt6[1]:.1f} ms "
          "(configured 60 ms)")
    # the minimum is the delay plus the path's own cost (a few ms under nested TCG); never below the delay
    for low, _avg in (rtt, rtt6):
        assert 60.0 <= low <= 60.0 * 1.25, (rtt, rtt6)


VLANS = """
name: vlans
lans: [trunk]
nodes:
  a: {interfaces: {eth0: {lan: trunk, vlan: 10, addresses: [10.90.10.1/24]}}}
  b: {interfaces: {eth0: {lan: trunk, vlan: 10, addresses: [10.90.10.2/24]}}}
  c: {interfaces: {eth0: {lan: trunk, vlan: 20, addresses: [10.90.10.3/24]}}}
"""


@pytest.mark.dom0
def test_vlans_on_one_trunk_lan_are_isolated(topologies) -> None:
    """Runs where 8021q exists (the nested Xen dom0): same subnet, same bridge, different VLAN ids."""
    assert kernel.probe().vlan, "this test runs where the kernel has 802.1Q"
    topology = topologies(VLANS)
    names = naming(topology.name)
    a = names.netns("a")
    assert "10.90.10.1/24" in in_ns(a, "ip", "-4", "addr", "show", "dev", "eth0.10").stdout
    in_ns(a, "ping", "-c", "1", "-W", "3", "10.90.10.2")
    assert in_ns(a, "ping", "-c", "1", "-W", "2", "10.90.10.3", check=False).returncode != 0
