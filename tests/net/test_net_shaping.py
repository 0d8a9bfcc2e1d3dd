"""Shaping observable on this host: loss as a ping loss ratio, rate as TCP throughput between namespaces."""

from __future__ import annotations

import subprocess
import sys
import time

from netutil import ping_loss

from xenswap.net import build, kernel

LOSSY = """
name: lossy
lans: [lan]
nodes:
  a: {interfaces: {eth0: {lan: lan, addresses: [10.50.0.1/24], loss: 30%}}}
  b: {interfaces: {eth0: {lan: lan, addresses: [10.50.0.2/24]}}}
"""

RATED = """
name: rated
links:
  slow: {rate: 8mbit}
  fast: {}
nodes:
  s:
    interfaces:
      eth0: {link: slow, addresses: [10.60.0.1/30]}
      eth1: {link: fast, addresses: [10.61.0.1/30]}
  r:
    interfaces:
      eth0: {link: slow, addresses: [10.60.0.2/30]}
      eth1: {link: fast, addresses: [10.61.0.2/30]}
"""

RECEIVER = """
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 5001)); srv.listen(1); srv.settimeout(20)
print("ready", flush=True)
conn, _ = srv.accept(); conn.settimeout(20)
total, first = 0, None
while True:
    data = conn.recv(1 << 16)
    if not data:
        break
    first = first or time.monotonic()
    total += len(data)
print(total * 8 / (time.monotonic() - first), flush=True)
"""

SENDER = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], 5001), timeout=20)
chunk = b"x" * 65536
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    sock.sendall(chunk)
sock.close()
"""


def throughput_bps(names: build.Naming, address: str, seconds: float) -> float:
    """A small Python receiver in r and sender in s; bounded in time, only inside our namespaces."""
    enter = ["nsenter"]
    receiver = subprocess.Popen([*enter, f"--net={kernel.ns_path(names.netns('r'))}", sys.executable, "-c",
                                 RECEIVER, address], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run([*enter, f"--net={kernel.ns_path(names.netns('s'))}", sys.executable, "-c", SENDER,
                        address, str(seconds)], check=True, timeout=seconds + 30)
        return float(receiver.stdout.readline())
    finally:
        receiver.kill()
        receiver.wait()


def test_loss_is_observable_as_ping_loss(topologies) -> None:
    topology = topologies(LOSSY)
    names = build.naming_for(topology.name)
    ping_loss(names.netns("a"), "10.50.0.2", 5, interval=0.1)  # resolve ARP first (ARP is not dropped)
    loss = ping_loss(names.netns("a"), "10.50.0.2", 400)
    # 30% configured on a's egress only; binomial sd for 400 pings is 2.3%, so this band is > 5 sd wide
    assert 0.18 <= loss <= 0.42, loss
    assert ping_loss(names.netns("b"), "10.50.0.2", 50) == 0.0  # b to itself: untouched


def test_rate_is_observable_as_throughput(topologies) -> None:
    topology = topologies(RATED)
    names = build.naming_for(topology.name)
    started = time.monotonic()
    slow = throughput_bps(names, "10.60.0.2", 1.5)
    fast = throughput_bps(names, "10.61.0.2", 0.5)
    assert 8e6 * 0.6 <= slow <= 8e6 * 1.1, slow
    assert fast >= 5 * slow, (fast, slow)
    assert time.monotonic() - started < 30
