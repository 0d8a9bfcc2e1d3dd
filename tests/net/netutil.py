"""Helpers for the net tests: what of ours exists in the kernel, and commands run inside a namespace."""

from __future__ import annotations

import re
import subprocess
import time

from pyroute2 import IPRoute

from xenswap.net import kernel

# our kernel objects: namespaces xs<tid>-<node>, host devices xs<tid>b<hash> / xs<tid>p<hash>
_OUR_NETNS = re.compile(r"^xs\d+-")
_OUR_LINK = re.compile(r"^xs\d+[bp][0-9a-f]{7}$")


def netns_names() -> set[str]:
    """What `ip netns list` lists: the names under /run/netns."""
    return set(kernel.list_namespaces())


def link_names() -> set[str]:
    """What `ip -o link` lists in the host namespace."""
    with IPRoute() as ipr:
        return {m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}


def ours() -> tuple[set[str], set[str]]:
    return ({n for n in netns_names() if _OUR_NETNS.match(n)}, {n for n in link_names() if _OUR_LINK.match(n)})


def wait_until_gone(before: tuple[set[str], set[str]], timeout: float = 10.0) -> tuple[set[str], set[str]]:
    """Namespaces are freed by the kernel asynchronously: give it a moment before comparing."""
    deadline = time.monotonic() + timeout
    while True:
        now = ours()
        if now == before or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def in_ns(ns: str, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net={kernel.ns_path(ns)}", *cmd], capture_output=True, text=True,
                          timeout=timeout, check=check)


def ping_loss(ns: str, address: str, count: int, interval: float = 0.005) -> float:
    """Fraction of ``count`` echo requests without a reply (no -w: with it, ping keeps going until count replies)."""
    out = in_ns(ns, "ping", "-q", "-n", "-c", str(count), "-i", str(interval), "-W", "1", address,
                check=False).stdout
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match, out
    sent, received = int(match.group(1)), int(match.group(2))
    assert sent == count, out
    return 1 - received / sent


def ping_rtt_ms(ns: str, address: str, count: int = 5) -> tuple[float, float]:
    """(min, avg) RTT in ms; works with iputils' and busybox's summary lines."""
    out = in_ns(ns, "ping", "-q", "-c", str(count), "-i", "0.2", "-W", "2", address).stdout  # busybox has no -n
    match = re.search(r"= ([\d.]+)/([\d.]+)/", out)
    assert match, out
    return float(match.group(1)), float(match.group(2))
