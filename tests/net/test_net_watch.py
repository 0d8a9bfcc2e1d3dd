"""Packets heading for a VM's port are seen, held, and released or dropped by the manager (NFQUEUE)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import struct
import subprocess
import time

import pytest
from pyroute2 import IPRoute

from xenswap.net import build, kernel
from xenswap.net.watch import HeldPacket, PacketWatcher, stale_rules

LAN = """
name: watched
lans: [lan]
nodes:
  h1: {interfaces: {eth0: {lan: lan, addresses: [10.70.0.1/24, "fd70::1/64"]}}}
  h2: {interfaces: {eth0: {lan: lan, addresses: [10.70.0.2/24, "fd70::2/64"]}}}
"""
QUEUE = 4711


def start_ping(ns: str, address: str, timeout_s: int = 5) -> subprocess.Popen[str]:
    return subprocess.Popen(["nsenter", f"--net={kernel.ns_path(ns)}", "ping", "-n", "-c", "1", "-W", str(timeout_s),
                             address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def next_for(watcher: PacketWatcher, destination: str) -> HeldPacket:
    """The next held packet for ``destination``; others (IPv6 multicast: MLD, ND) are released on the way."""
    while True:
        packet = await watcher.get(timeout=5)
        if packet.destination == destination:
            return packet
        packet.release()


def test_hold_then_release_delivers_late_and_drop_loses(topologies) -> None:
    topology = topologies(LAN)
    names = build.naming_for(topology.name)
    h1, h2_port = names.netns("h1"), names.port("h2", "eth0")
    with IPRoute() as ipr:
        h2_port_index = ipr.link_lookup(ifname=h2_port)[0]
    # ARP and ND first (ARP is not IP and never held; ND is IPv6 and would be held like any packet)
    for address in ("10.70.0.2", "fd70::2"):
        subprocess.run(["nsenter", f"--net={kernel.ns_path(h1)}", "ping", "-c", "1", "-W", "2", address], check=True,
                       capture_output=True)

    async def scenario() -> None:
        async with PacketWatcher(QUEUE) as watcher:
            watcher.watch_port(h2_port)
            # 1. held for 0.5 s, then released: the ping succeeds, its RTT shows the hold
            ping = start_ping(h1, "10.70.0.2")
            packet = await next_for(watcher, "10.70.0.2")
            assert packet.hw_protocol == 0x0800
            assert packet.out_port == h2_port_index
            await asyncio.sleep(0.5)
            assert ping.poll() is None  # still waiting for its reply: the request is held
            packet.release()
            out, _ = await asyncio.to_thread(ping.communicate, timeout=10)
            assert ping.returncode == 0, out
            rtt = float(out.split("time=")[1].split()[0])
            assert rtt >= 500, out
            # 2. dropped: no reply
            ping = start_ping(h1, "10.70.0.2", timeout_s=1)
            packet = await next_for(watcher, "10.70.0.2")
            packet.drop()
            await asyncio.to_thread(ping.communicate, timeout=10)
            assert ping.returncode == 1
            # 3. IPv6 is held too
            ping = start_ping(h1, "fd70::2")
            packet = await next_for(watcher, "fd70::2")
            assert packet.destination == "fd70::2" and packet.hw_protocol == 0x86DD
            packet.release()
            await asyncio.to_thread(ping.communicate, timeout=10)
            assert ping.returncode == 0
            # 4. closing with a packet still held delivers it (never a silent drop)
            ping = start_ping(h1, "10.70.0.2")
            await next_for(watcher, "10.70.0.2")
        out, _ = await asyncio.to_thread(ping.communicate, timeout=10)
        assert ping.returncode == 0, out

    asyncio.run(scenario())
    assert not stale_rules()

    async def killed_manager_then_new_one() -> None:
        # a rule left behind (as by a killed manager) is not doubled by the next watcher, and goes with it
        left = PacketWatcher(QUEUE)
        left.watch_port(h2_port)
        assert len(stale_rules()) == 1
        async with PacketWatcher(QUEUE + 2) as watcher:
            watcher.watch_port(h2_port)
            assert len(stale_rules()) == 1 and f"--queue-num {QUEUE + 2}" in stale_rules()[0]
        assert not stale_rules()

    asyncio.run(killed_manager_then_new_one())
    # with the watcher gone the port is not watched any more: plain ping works
    start = time.monotonic()
    subprocess.run(["nsenter", f"--net={kernel.ns_path(h1)}", "ping", "-c", "1", "-W", "2", "10.70.0.2"], check=True,
                   capture_output=True)
    assert time.monotonic() - start < 1.5


TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


@pytest.fixture
def vm_tap(topologies):
    """A tap on the LAN's bridge standing in for a VM's NIC: we hold its fd and read what the host sends it."""
    topology = topologies(LAN)
    names = build.naming_for(topology.name)
    tap = f"xs{names.tid}tapw"
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=tap)[0]
            ipr.link("set", index=index, master=ipr.link_lookup(ifname=names.bridge("lan"))[0], state="up")
        yield names, tap, fd
    finally:
        os.close(fd)  # a non-persistent tap disappears with its last fd


def read_frames(fd: int, seconds: float) -> list[bytes]:
    frames = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            frames.append(os.read(fd, 65536))
    return frames


def test_a_packet_for_a_vm_tap_waits_until_released(vm_tap) -> None:
    names, tap, fd = vm_tap
    h1 = names.netns("h1")
    vm_mac = "52:54:00:70:00:63"
    # the "VM" at 10.70.0.99: a static neighbour entry, so h1 sends IP straight away (ARP is never held)
    subprocess.run(["nsenter", f"--net={kernel.ns_path(h1)}", "ip", "neigh", "replace", "10.70.0.99", "lladdr",
                    vm_mac, "dev", "eth0", "nud", "permanent"], check=True)
    mac = bytes.fromhex(vm_mac.replace(":", ""))

    def echo_requests(frames: list[bytes]) -> list[bytes]:
        return [f for f in frames if f[:6] == mac and f[12:14] == b"\x08\x00" and f[14 + 16:14 + 20] ==
                bytes([10, 70, 0, 99])]

    async def scenario() -> None:
        async with PacketWatcher(QUEUE + 1) as watcher:
            watcher.watch_port(tap)
            start_ping(h1, "10.70.0.99", timeout_s=1)
            packet = await next_for(watcher, "10.70.0.99")
            assert echo_requests(await asyncio.to_thread(read_frames, fd, 0.3)) == []  # held: nothing on the tap
            packet.release()
            assert len(echo_requests(await asyncio.to_thread(read_frames, fd, 0.5))) == 1  # delivered to the VM

    asyncio.run(scenario())
