"""Benchmark: N isolated networks (namespace + bridge + veth pair + address each), up and down.

Ours (xenswap.net: one topology of N LANs with one host each, built with pyroute2) against the anchor, a
shell script of `ip` commands doing the same, in one run; prints the times, the ratios and the memory the
networks take in the kernel (slab + per-CPU; times are the best of the rounds, memory the mean).
"Down" ends when the kernel has really removed the devices and the namespaces (not just when a call
returned): see kernel_caught_up().

    .venv/bin/python bench/bench_net.py            # N=500
    .venv/bin/python bench/bench_net.py --count 100
    .venv/bin/python bench/bench_net.py --floor    # where teardown time goes: the kernel's cost per device kind
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyroute2 import IPRoute

from xenswap.net import build, kernel
from xenswap.net.rtnl import Rtnl
from xenswap.net.store import GROUP_BASE, MAX_TID
from xenswap.net.topology import parse

ANCHOR_NS = "xsbench-ip-"
ANCHOR_BR = "xsbenchb"
ANCHOR_VETH = "xsbenchv"
CANARY_NS = "xsbench-canary"
CANARY_VETH = "xsbenchc"
FLOOR_NS = "xsbench-floor-"
FLOOR_DEV = "xsbenchf"
FLOOR_GROUP = GROUP_BASE + MAX_TID + 1  # outside the groups of topologies


def address(i: int) -> str:
    return f"10.{100 + i // 250}.{i % 250}.1/24"


def topology_text(count: int) -> str:
    lines = ["name: bench", "lans:"] + [f"  n{i}: {{}}" for i in range(count)] + ["nodes:"]
    lines += [f"  h{i}: {{interfaces: {{eth0: {{lan: n{i}, addresses: [{address(i)}]}}}}}}" for i in range(count)]
    return "\n".join(lines) + "\n"


def anchor_scripts(count: int) -> tuple[str, str]:
    up, down = ["set -e"], ["set -e"]
    for i in range(count):
        ns, br, veth = f"{ANCHOR_NS}{i}", f"{ANCHOR_BR}{i}", f"{ANCHOR_VETH}{i}"
        up += [
            f"ip netns add {ns}",
            f"ip -n {ns} link set lo up",
            f"ip link add {br} type bridge",
            f"ip link set {br} up",
            f"ip link add {veth} type veth peer name eth0 netns {ns}",
            f"ip link set {veth} master {br} up",
            f"ip -n {ns} addr add {address(i)} dev eth0",
            f"ip -n {ns} link set eth0 up",
        ]
        down += [f"ip netns del {ns}", f"ip link del {br}"]
    return "\n".join(up) + "\n", "\n".join(down) + "\n"


def kernel_kib() -> int:
    """Kernel memory that namespaces and devices take: slab + per-CPU allocations, kB. (Host-wide "used"
    memory moves with every other process on the machine; these two hardly do.)"""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(info[key].split()[0]) for key in ("Slab", "Percpu"))


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the kernel did not finish in time")
        time.sleep(0.01)


def host_links(prefix: str) -> int:
    with IPRoute() as ipr:
        return sum(1 for m in ipr.get_links() if (m.get_attr("IFLA_IFNAME") or "").startswith(prefix))


def kernel_caught_up() -> None:
    """Wait until the kernel has finished tearing down every namespace unnamed before this call.

    `ip netns del` (and our destroy) only drop the bind mount; the kernel frees a namespace and the devices
    in it later, in cleanup_net on the ordered "netns" workqueue, which takes the whole list of dying
    namespaces at once and runs the batches one after another. So a canary namespace unnamed after ours,
    with a veth whose other end sits in the host, loses that host end no earlier than our namespaces lose
    their devices. (Holding an fd on one of the namespaces to watch it would keep it alive: the fd is a
    reference. Measured: with 200 namespaces the canary went 0.08 s after the last of them.)"""
    sock = kernel.create_namespace_socket(CANARY_NS)
    sock.close()
    fd = os.open(kernel.ns_path(CANARY_NS), os.O_RDONLY | os.O_CLOEXEC)
    try:
        root = Rtnl.here()
        try:
            root.add_veth(CANARY_VETH, "canary", fd)
        finally:
            root.close()
    finally:
        os.close(fd)
    kernel.remove_namespace(CANARY_NS)
    wait_for(lambda: host_links(CANARY_VETH) == 0)


def run_ours(count: int) -> dict[str, float]:
    topology = parse(topology_text(count), features=kernel.probe())
    mem0 = kernel_kib()
    started = time.perf_counter()
    try:
        build.apply(topology)
        up = time.perf_counter() - started
        mem = kernel_kib() - mem0
        naming = build.naming_for("bench")
        assert sum(n.startswith(naming.ns_prefix) for n in kernel.list_namespaces()) == count
    finally:
        started = time.perf_counter()
        build.destroy_topology("bench")
        wait_for(lambda: host_links(f"xs{naming.tid}b") + host_links(f"xs{naming.tid}p") == 0)
        kernel_caught_up()
        down = time.perf_counter() - started
    return {"up": up, "down": down, "mem_kib": mem}


def run_anchor(count: int) -> dict[str, float]:
    up_script, down_script = anchor_scripts(count)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "up.sh").write_text(up_script)
        (Path(tmp) / "down.sh").write_text(down_script)
        mem0 = kernel_kib()
        started = time.perf_counter()
        try:
            subprocess.run(["bash", f"{tmp}/up.sh"], check=True)
            up = time.perf_counter() - started
            mem = kernel_kib() - mem0
        finally:
            started = time.perf_counter()
            subprocess.run(["bash", f"{tmp}/down.sh"], check=False, stderr=subprocess.DEVNULL)
            wait_for(lambda: host_links(ANCHOR_BR) + host_links(ANCHOR_VETH) == 0)
            kernel_caught_up()
            down = time.perf_counter() - started
    return {"up": up, "down": down, "mem_kib": mem}


def _floor_case(count: int, build_one, teardown) -> float:
    """Build ``count`` objects, then time ``teardown`` until the kernel has removed them (kernel_caught_up)."""
    root = Rtnl.here()
    try:
        for i in range(count):
            build_one(root, i)
    finally:
        root.close()
    settle()
    started = time.perf_counter()
    teardown()
    wait_for(lambda: host_links(FLOOR_DEV) == 0)
    kernel_caught_up()
    return time.perf_counter() - started


def _floor_namespace(name: str, bridge: bool) -> None:
    fast = Rtnl(kernel.create_namespace_socket(name))
    try:
        fast.set_link("lo", up=True)
        if bridge:
            fast.add_link("br0", "bridge", data=[("IFLA_BR_MCAST_SNOOPING", 0)])
            fast.set_link("br0", up=True)
            fast.add_link("p0", "veth", master=fast.index("br0"),
                          data=[("VETH_INFO_PEER", {"attrs": [("IFLA_IFNAME", "p1")]})])
            fast.set_link("p0", up=True)
    finally:
        fast.close()


def _delete_floor_group() -> None:
    with IPRoute() as ipr:
        if any(m.get_attr("IFLA_GROUP") == FLOOR_GROUP for m in ipr.get_links()):
            ipr.link("del", group=FLOOR_GROUP)


def _delete_floor_namespaces() -> None:
    for name in kernel.list_namespaces():
        if name.startswith(FLOOR_NS):
            kernel.remove_namespace(name)


def floor(count: int) -> None:
    """What the kernel itself needs to remove ``count`` devices of each kind, timed until really gone.

    A bridge's teardown ends in br_multicast_dev_del(), which calls rcu_barrier(): one RCU grace period per
    bridge, under RTNL, whether the bridges go one request each, in one request by group, or in the kernel's
    batched cleanup of dying namespaces (cleanup_net -> one unregister_netdevice_many for all of them)."""
    def host_bridge(root: Rtnl, i: int) -> None:
        root.add_link(f"{FLOOR_DEV}{i}", "bridge", group=FLOOR_GROUP, data=[("IFLA_BR_MCAST_SNOOPING", 0)])
        root.set_link(f"{FLOOR_DEV}{i}", up=True)

    def host_veth(root: Rtnl, i: int) -> None:
        root.add_link(f"{FLOOR_DEV}{i}", "veth", group=FLOOR_GROUP,
                      data=[("VETH_INFO_PEER", {"attrs": [("IFLA_IFNAME", f"{FLOOR_DEV}{i}p")]})])

    cases = [
        ("bridges in the host, one RTM_DELLINK by group", host_bridge, _delete_floor_group),
        ("bridges (+ a veth port) each in its own namespace, namespaces unnamed",
         lambda _root, i: _floor_namespace(f"{FLOOR_NS}{i}", bridge=True), _delete_floor_namespaces),
        ("veth pairs in the host, one RTM_DELLINK by group", host_veth, _delete_floor_group),
        ("empty namespaces (lo up), unnamed", lambda _root, i: _floor_namespace(f"{FLOOR_NS}{i}", bridge=False),
         _delete_floor_namespaces),
    ]
    print(f"teardown floor, {count} of each, until the kernel has removed them; kernel {os.uname().release}")
    for label, build_one, teardown in cases:
        try:
            seconds = _floor_case(count, build_one, teardown)
        finally:
            _delete_floor_group()  # nothing left behind if a case failed half-way
            _delete_floor_namespaces()
        print(f"  {label:72} {seconds:6.2f} s  {seconds / count * 1000:6.2f} ms each", flush=True)
    settle()


def settle() -> None:
    """Let the kernel finish freeing namespaces from the previous round before timing the next."""
    time.sleep(5.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=1, help="alternate ours/anchor this many times")
    parser.add_argument("--floor", action="store_true",
                        help="only measure the kernel's teardown cost per device kind (bridges, veths, namespaces)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_net: run as root (it creates namespaces and devices)", file=sys.stderr)
        return 1
    if args.floor:
        floor(args.count)
        return 0
    os.environ.setdefault("XENSWAP_STATE", tempfile.mkdtemp(prefix="xenswap-bench-net-"))
    print(f"{args.count} isolated networks (namespace + bridge + veth pair + address each), "
          f"{args.rounds} round(s); nproc={os.cpu_count()}, kernel {os.uname().release}")
    results: dict[str, list[dict[str, float]]] = {"ours": [], "ip script": []}
    for _ in range(args.rounds):
        results["ours"].append(run_ours(args.count))
        settle()
        results["ip script"].append(run_anchor(args.count))
        settle()
    best = {name: {k: min(r[k] for r in runs) for k in ("up", "down")} for name, runs in results.items()}
    mem = {name: sum(r["mem_kib"] for r in runs) / len(runs) for name, runs in results.items()}
    print(f"{'':10} {'up s':>8} {'down s':>8} {'kernel MiB':>11} {'KiB/network':>12}")
    for name in results:
        print(f"{name:10} {best[name]['up']:8.2f} {best[name]['down']:8.2f} {mem[name] / 1024:11.1f} "
              f"{mem[name] / args.count:12.1f}")
    ours, anchor = best["ours"], best["ip script"]
    print(f"ratio (ip script / ours): up {anchor['up'] / ours['up']:.1f}x, down {anchor['down'] / ours['down']:.1f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"our process peak RSS: {peak / 1024:.1f} MiB (the ip script's processes are short-lived)")
    per = {k: ours[k] / args.count * 1000 for k in ("up", "down")}
    print(f"per network, ours: up {per['up']:.2f} ms, down {per['down']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
