"""Topology files: every problem reported at once, one line each, and a bad file touches nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenswap.cli import main
from xenswap.net.topology import BRIDGE_MAX_PORTS, Features, TopologyError, load, parse

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

BAD = """
name: broken
lans: {lan1: {}}
links:
  l1: {delay: 10 parsecs, loss: 150%}
  dangling: {}
nodes:
  r1:
    router: true
    interfaces:
      eth0: {lan: lan1, addresses: [10.1.0.1/24]}
      eth1: {link: l1, addresses: [10.9.0.1/30], rate: fast}
  h1:
    interfaces:
      eth0: {lan: lan9, addresses: [10.1.0.5/24]}
      eth1: {lan: lan1, addresses: [10.1.0.1/24, 10.1.0.300/24]}
    routes: [{to: default, via: 10.7.0.1}]
  h2:
    interfaces:
      eth0: {link: l1, addresses: [10.9.0.2]}
      eth1: {link: nowhere}
vms:
  vm1: {lan: lan2, addresses: [10.1.0.7/24]}
"""


def test_bad_file_lists_every_problem_once() -> None:
    with pytest.raises(TopologyError) as caught:
        parse(BAD, source="broken.yaml")
    problems = caught.value.problems
    expected = [
        "link l1: delay: bad duration '10 parsecs'",
        "link l1: loss: bad percentage '150%'",
        "node r1 interface eth1: rate: bad rate 'fast'",
        "node h1 interface eth0: unknown LAN 'lan9' (known: lan1)",
        "node h1 interface eth1: '10.1.0.300/24' is not an IPv4 or IPv6 address",
        "duplicate address 10.1.0.1 on lan lan1: node r1 interface eth0 and node h1 interface eth1",
        "node h1: route to 0.0.0.0/0 via 10.7.0.1: 10.7.0.1 is not on any subnet",
        "node h2 interface eth0: address '10.9.0.2' needs a prefix length",
        "node h2 interface eth1: unknown link 'nowhere' (known: l1, dangling)",
        "vm vm1: unknown LAN 'lan2' (known: lan1)",
        "link dangling: a link joins exactly 2 interfaces, it has 0",
    ]
    for text in expected:
        assert sum(text in p for p in problems) == 1, (text, problems)
    assert len(problems) == len(expected), problems
    message = str(caught.value)
    assert message.startswith(f"broken.yaml: {len(expected)} problems, nothing was changed:")
    assert all("\n" not in p for p in problems)


def test_kernel_without_netem_refuses_delay_once_per_link_and_vlan_without_8021q() -> None:
    text = (EXAMPLES / "three-routers.yaml").read_text()
    assert parse(text, features=Features()).name == "three-routers"  # fine where netem exists
    with pytest.raises(TopologyError) as caught:
        parse(text, features=Features(netem=False, vlan=False))
    assert caught.value.problems == [
        f"link {link}: delay/jitter needs the netem qdisc (sch_netem), which this kernel lacks; there is no honest "
        "fallback here: drop the delay or run where netem exists (e.g. the nested Xen dom0)"
        for link in ("r1-r2", "r2-r3")
    ]
    vlan = "name: v\nlans: [trunk]\nnodes:\n  h: {interfaces: {eth0: {lan: trunk, vlan: 10}}}\n"
    with pytest.raises(TopologyError, match=r"vlan 10 needs 802.1Q support \(8021q\)"):
        parse(vlan, features=Features(vlan=False))
    # rate and loss have honest fallbacks (tbf, statistic drop): accepted without netem
    shaped = "name: s\nlans: [l]\nnodes:\n  h: {interfaces: {eth0: {lan: l, rate: 1mbit, loss: 2%}}}\n"
    assert parse(shaped, features=Features(netem=False, vlan=False)).nodes["h"].interfaces[0].shaping.loss == 0.02


def test_bridge_port_limit() -> None:
    hosts = "\n".join(f"  h{i}: {{interfaces: {{eth0: {{lan: big}}}}}}" for i in range(BRIDGE_MAX_PORTS + 1))
    with pytest.raises(TopologyError, match=f"lan big: {BRIDGE_MAX_PORTS + 1} ports, but a Linux bridge takes at "
                                            f"most {BRIDGE_MAX_PORTS}"):
        parse(f"name: big\nlans: [big]\nnodes:\n{hosts}\n")


def test_examples_are_valid() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        assert load(path, Features()).name


def test_cli_apply_of_a_bad_file_touches_nothing(tmp_path: Path, nothing_left, capsys) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text(BAD)
    assert main(["net", "apply", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("xenswap: error: ") and "unknown LAN 'lan9'" in err
    from xenswap.net.store import Store

    with Store() as store:
        assert store.tid("broken") is None  # not even a record
