"""Hundreds of networks: 200 isolated ones up and down, nothing left behind."""

from __future__ import annotations

import subprocess
import time

from netutil import in_ns, wait_until_gone

from xenswap.net import build, kernel
from xenswap.net.topology import parse

COUNT = 200


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def link_names() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def isolated_networks(count: int, name: str = "many") -> str:
    lines = [f"name: {name}", "lans:"] + [f"  n{i}: {{}}" for i in range(count)] + ["nodes:"]
    lines += [f"  h{i}: {{interfaces: {{eth0: {{lan: n{i}, addresses: [10.{100 + i // 250}.{i % 250}.1/24]}}}}}}"
              for i in range(count)]
    return "\n".join(lines) + "\n"


def test_200_isolated_networks_up_and_down_leave_nothing(nothing_left) -> None:
    before = (netns_names(), link_names())
    topology = parse(isolated_networks(COUNT), features=kernel.probe())
    started = time.monotonic()
    try:
        build.apply(topology)
        up = time.monotonic() - started
        names = build.naming_for(topology.name)
        assert len({n for n in netns_names() if n.startswith(names.ns_prefix)}) == COUNT
        # each network works and is isolated: h7 reaches its own address, not h8's
        in_ns(names.netns("h7"), "ping", "-c", "1", "-W", "2", "10.100.7.1")
        assert in_ns(names.netns("h7"), "ping", "-c", "1", "-W", "1", "10.100.8.1", check=False).returncode != 0
    finally:
        started = time.monotonic()
        build.destroy_topology(topology.name)
        down = time.monotonic() - started
    wait_until_gone(nothing_left)
    after = (netns_names(), link_names())
    # others may add or remove their own devices meanwhile: compare what could be ours
    assert {n for n in after[0] - before[0] if n.startswith("xs")} == set()
    assert {n for n in after[1] - before[1] if n.startswith("xs") and "-" not in n} == set()
    assert up < 20 and down < 10, (up, down)  # generous on a loaded CI box; the benchmark has the real figures
