"""Rig tier: real QEMU guests attached to a topology. The delay and VLAN tests need netem and 802.1Q, which only
Debian's kernel has: they are marked dom0 and run inside the nested Xen rig by tests/rig/test_nested_xen.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from xenswap.hv.qemu import QemuVM
from xenswap.net import build
from xenswap.net.watch import PacketWatcher

pytestmark = pytest.mark.rig

TOPOLOGY = """
name: vm-lans
lans: [lan1, lan2]
nodes:
  r1:
    router: true
    interfaces:
      eth0: {lan: lan1, addresses: [10.181.0.1/24]}
      eth1: {lan: lan2, addresses: [10.182.0.1/24]}
vms:
  netvm1: {lan: lan1, addresses: [10.181.0.2/24], gateway: 10.181.0.1}
  netvm2: {lan: lan2, addresses: [10.182.0.2/24], gateway: 10.182.0.1}
"""


@pytest.fixture(scope="module")
def guests() -> Iterator[tuple[QemuVM, QemuVM]]:
    from xenswap.net import kernel
    from xenswap.net.topology import parse

    topology = parse(TOPOLOGY, features=kernel.probe())
    build.apply(topology, TOPOLOGY)
    vms: list[QemuVM] = []
    try:
        for vm in topology.vms.values():
            vms.append(QemuVM.create(vm.name, ip=str(vm.addresses[0]), gateway=str(vm.gateway),
                                     bridge=build.bridge_for(topology.name, vm.lan), timeout=180))
        yield vms[0], vms[1]
    finally:
        for vm in vms:
            if vm.alive():
                vm.destroy()
        build.destroy_topology(topology.name)


def test_guests_on_two_lans_reach_each_other_through_the_router(guests) -> None:
    vm1, vm2 = guests
    out = vm1.console.run("ping -c 3 -W 3 10.182.0.2", timeout=60)
    assert "3 packets received" in out or " 0% packet loss" in out, out
    out = vm2.console.run("ping -c 3 -W 3 10.181.0.2", timeout=60)
    assert " 0% packet loss" in out, out


def test_a_packet_for_a_guest_is_held_until_released(guests) -> None:
    vm1, vm2 = guests
    vm1.console.run("ping -c 1 -W 5 10.182.0.2", timeout=30)  # ARP everywhere first

    async def scenario() -> str:
        async with PacketWatcher(4799) as watcher:
            watcher.watch_port(vm2.tap)
            pinging = asyncio.create_task(asyncio.to_thread(vm1.console.run, "ping -c 1 -W 10 10.182.0.2", 60))
            while True:
                packet = await watcher.get(timeout=30)
                if packet.destination == "10.182.0.2":
                    break
                packet.release()
            await asyncio.sleep(1.0)  # "waking the VM"
            packet.release()
            return await pinging

    out = asyncio.run(scenario())
    rtt = float(out.split("time=")[1].split()[0])
    assert rtt >= 1000, out

