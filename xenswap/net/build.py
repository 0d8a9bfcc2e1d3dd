"""Build a validated Topology in the kernel: diff against what is there, apply, roll back, destroy.

Layout in the kernel (why: a QEMU tap or a Xen vif is created in the host namespace and joins a bridge
by name there, so LAN bridges live in the host namespace; every node gets its own namespace):
- LAN ``lan1``            -> bridge ``xs<tid>b<hash>`` in the host namespace, no address, IPv6 off on it
- node ``r1``             -> namespace ``xs<tid>-r1`` with ``lo`` up; routers get IPv4/IPv6 forwarding
- node interface on a LAN -> veth: ``eth0`` inside the node's namespace, ``xs<tid>p<hash>`` on the bridge
- link ``r1-r2``          -> veth with one end in each node's namespace, named as in the file
- vlan                    -> an 802.1Q device ``<if>.<vid>`` on the interface, addresses on it
- shaping                 -> netem if the kernel has it, else tbf for rate and an iptables statistic drop
                             for loss (delay without netem is refused at validation)
Host-side devices carry the ifalias ``xenswap <topology> ...`` and the netdev group GROUP_BASE+tid, so
teardown deletes them all in one batched RTM_DELLINK by group.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xenswap.net import kernel
from xenswap.net.kernel import NetError
from xenswap.net.rtnl import Rtnl
from xenswap.net.store import GROUP_BASE, MAX_TID, Store
from xenswap.net.topology import Features, Shaping, Topology

RTPROT_STATIC = 4
IFA_F_NODAD = 0x02
MAIN_TABLE = 254
# no duplicate address detection in our namespaces (new devices inherit "default"): DAD of the link-local
# address would hold back the first IPv6 packets for 1-2 s
NO_DAD = {"net.ipv6.conf.default.accept_dad": "0"}
IN6_ADDR_GEN_MODE_NONE = 1
NETEM_CLASS = 0x00010001  # class 1:1 of the root netem qdisc "1:" (where a child qdisc attaches)
NO_IPV6_ADDRESSES = {"attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE)]})]}


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:7]


@dataclass(frozen=True)
class Naming:
    topology: str
    tid: int

    @property
    def ns_prefix(self) -> str:
        return f"xs{self.tid}-"

    @property
    def group(self) -> int:
        return GROUP_BASE + self.tid

    def netns(self, node: str) -> str:
        return f"{self.ns_prefix}{node}"

    def bridge(self, lan: str) -> str:
        return f"xs{self.tid}b{_short_hash(lan)}"

    def port(self, node: str, ifname: str) -> str:
        return f"xs{self.tid}p{_short_hash(node + '/' + ifname)}"

    def alias(self, what: str) -> str:
        return f"xenswap {self.topology} {what}"


@dataclass
class Desired:
    bridges: dict[str, str] = field(default_factory=dict)  # bridge -> alias
    namespaces: dict[str, bool] = field(default_factory=dict)  # ns -> forwarding
    ports: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # port -> (bridge, ns, ifname)
    links: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)  # (nsA, ifA) -> (nsB, ifB)
    vlans: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)  # (ns, vlanif) -> (parent, vid)
    addresses: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    routes: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    shaping: dict[tuple[str, str], Shaping] = field(default_factory=dict)


def desired_state(topology: Topology, naming: Naming) -> Desired:
    want = Desired()
    for lan in topology.lans:
        want.bridges[naming.bridge(lan)] = naming.alias(f"lan {lan}")
    for node in topology.nodes.values():
        ns = naming.netns(node.name)
        want.namespaces[ns] = node.router
        want.routes[ns] = {(str(r.to), str(r.via)) for r in node.routes}
        for iface in node.interfaces:
            if iface.lan is not None:
                want.ports[naming.port(node.name, iface.name)] = (naming.bridge(iface.lan), ns, iface.name)
            target = iface.name
            if iface.vlan is not None:
                target = f"{iface.name}.{iface.vlan}"
                want.vlans[(ns, target)] = (iface.name, iface.vlan)
            want.addresses[(ns, target)] = {str(a) for a in iface.addresses}
            shaping = topology.effective_shaping(iface)
            if shaping:
                want.shaping[(ns, iface.name)] = shaping
    for link in topology.links:
        a, b = topology.link_ends(link)
        want.links[(naming.netns(a.node), a.name)] = (naming.netns(b.node), b.name)
    return want


@dataclass
class Actual:
    namespaces: set[str] = field(default_factory=set)
    bridges: set[str] = field(default_factory=set)
    ports: dict[str, str | None] = field(default_factory=dict)  # port -> bridge it is enslaved to
    ns_links: dict[str, dict[str, str]] = field(default_factory=dict)  # ns -> ifname -> kind
    addresses: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    routes: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    forwarding: dict[str, bool] = field(default_factory=dict)
    qdiscs: dict[tuple[str, str], str] = field(default_factory=dict)  # (ns, ifname) -> root qdisc kind


def _kind(msg) -> str:
    info = msg.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or "device"


def read_actual(naming: Naming, root: IPRoute, namespaces: list[str] | None = None) -> Actual:
    have = Actual()
    all_ns = kernel.list_namespaces() if namespaces is None else namespaces
    have.namespaces = {n for n in all_ns if n.startswith(naming.ns_prefix)}
    by_index = {}
    ours = []
    for msg in root.get_links():
        by_index[msg["index"]] = msg.get_attr("IFLA_IFNAME")
        if msg.get_attr("IFLA_GROUP") == naming.group:
            ours.append(msg)
    for msg in ours:
        name = msg.get_attr("IFLA_IFNAME")
        if _kind(msg) == "bridge":
            have.bridges.add(name)
        else:
            have.ports[name] = by_index.get(msg.get_attr("IFLA_MASTER"))
    for ns in sorted(have.namespaces):
        with kernel.open_namespace(ns) as ipr:
            names = {}
            for msg in ipr.get_links():
                if msg.get_attr("IFLA_IFNAME") != "lo":
                    names[msg["index"]] = msg.get_attr("IFLA_IFNAME")
            have.ns_links[ns] = {
                names[m["index"]]: _kind(m) for m in ipr.get_links() if m["index"] in names
            }
            for name in names.values():
                have.addresses[(ns, name)] = set()
            for msg in ipr.get_addr():
                name = names.get(msg["index"])
                address = msg.get_attr("IFA_ADDRESS")
                if name is None or address is None or address.startswith("fe80:"):
                    continue
                have.addresses[(ns, name)].add(str(ipaddress.ip_interface(f"{address}/{msg['prefixlen']}")))
            have.routes[ns] = set()
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in ipr.get_routes(family=family, table=MAIN_TABLE):
                    if msg["proto"] != RTPROT_STATIC:
                        continue
                    dst = msg.get_attr("RTA_DST")
                    dst = f"{dst}/{msg['dst_len']}" if dst else ("0.0.0.0/0" if family == socket.AF_INET else "::/0")
                    have.routes[ns].add((str(ipaddress.ip_network(dst)), msg.get_attr("RTA_GATEWAY")))
            for msg in ipr.get_qdiscs():
                if msg["parent"] == 0xFFFFFFFF and msg["index"] in names:
                    have.qdiscs[(ns, names[msg["index"]])] = msg.get_attr("TCA_KIND")
        have.forwarding[ns] = kernel.read_sysctl(ns, "net.ipv4.ip_forward") == "1"
    return have


@dataclass
class Change:
    sign: str  # '+', '-', '~'
    what: str
    run: Callable[[Builder], None]
    undo: Callable[[Builder], None] | None = None

    def __str__(self) -> str:
        return f"{self.sign} {self.what}"


def shaping_method(shaping: Shaping, features: Features) -> str:
    """How a shaping is realised here; part of the recorded signature so a kernel change re-applies it."""
    if features.netem:
        return "netem+tbf" if shaping.rate_bps else "netem"
    parts = []
    if shaping.rate_bps:
        parts.append("tbf")
    if shaping.loss:
        parts.append("statistic")
    return "+".join(parts)


def shaping_signature(shaping: Shaping, features: Features) -> str:
    return f"{shaping.describe()} via {shaping_method(shaping, features)}"


class Builder:
    """Holds the netlink handles while a plan runs (one on the host namespace, a few cached per namespace)."""

    def __init__(self, naming: Naming, features: Features):
        # each handle holds ~4 fds (socket, epoll, self-pipe): stay well inside the open-files limit
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.handle_cache = max(16, min(1024, (soft - 64) // 8))
        self.naming = naming
        self.features = features
        # measured: decoding an echoed reply costs more than one lookup, so devices are addressed by name
        self.root = IPRoute()
        self.fast_root = Rtnl.here()  # the hot, simple requests (see xenswap.net.rtnl)
        self.handles: dict[str, IPRoute] = {}
        self.fast: dict[str, Rtnl] = {}
        self.root_index: dict[str, int] = {}

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()
        for fast in self.fast.values():
            fast.close()
        self.fast.clear()
        self.root.close()
        self.fast_root.close()

    def _remember_fast(self, ns: str, fast: Rtnl) -> Rtnl:
        if len(self.fast) >= self.handle_cache:
            self.fast.pop(next(iter(self.fast))).close()
        self.fast[ns] = fast
        return fast

    def fast_ns(self, ns: str) -> Rtnl:
        fast = self.fast.get(ns)
        if fast is None:
            fast = self._remember_fast(ns, Rtnl(kernel.namespace_socket(ns)))
        return fast

    def _remember(self, ns: str, handle: IPRoute) -> IPRoute:
        if len(self.handles) >= self.handle_cache:
            oldest = next(iter(self.handles))
            self.handles.pop(oldest).close()
        self.handles[ns] = handle
        return handle

    def ns(self, ns: str) -> IPRoute:
        handle = self.handles.get(ns)
        if handle is None:
            handle = self._remember(ns, kernel.open_namespace(ns))
        return handle

    def forget(self, ns: str) -> None:
        handle = self.handles.pop(ns, None)
        if handle is not None:
            handle.close()
        fast = self.fast.pop(ns, None)
        if fast is not None:
            fast.close()

    @staticmethod
    def index(ipr: IPRoute, ifname: str) -> int:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise NetError(f"interface {ifname} not found")
        return found[0]

    def host_index(self, ifname: str) -> int:
        """Index of a host-side device: remembered from its creation, else looked up once."""
        index = self.root_index.get(ifname)
        if index is None:
            try:
                index = self.root_index[ifname] = self.fast_root.index(ifname)
            except NetlinkError:
                raise NetError(f"interface {ifname} not found") from None
        return index

    # --- operations (each is undone by its counterpart) -------------------------------------------------

    def add_namespace(self, ns: str, ipv6: bool) -> None:
        fast = self._remember_fast(ns, Rtnl(kernel.create_namespace_socket(ns, NO_DAD if ipv6 else None)))
        fast.set_link("lo", up=True)

    def remove_namespace(self, ns: str) -> None:
        self.forget(ns)
        kernel.remove_namespace(ns)

    def _tag_host_link(self, ifname: str, alias: str) -> None:
        # the kernel ignores IFLA_IFALIAS when creating a link, and IPv6 settings before the device exists:
        # one "set" gives the alias and turns off IPv6 address generation (no link-local address, so the
        # host's own IPv6 takes no part in the LAN); it comes before the device can have a carrier
        self.fast_root.set_link(ifname, attrs=[("IFLA_IFALIAS", alias), ("IFLA_AF_SPEC", NO_IPV6_ADDRESSES)])

    def add_bridge(self, name: str, alias: str) -> None:
        # no multicast snooping: without an MLD querier it can swallow IPv6 neighbour solicitations
        self.fast_root.add_link(name, "bridge", group=self.naming.group, data=[("IFLA_BR_MCAST_SNOOPING", 0)])
        self._tag_host_link(name, alias)
        self.fast_root.set_link(name, up=True)  # only now: "up" with IPv6 on would add a link-local

    def delete_root_link(self, name: str) -> None:
        self.root_index.pop(name, None)
        try:
            self.root.link("del", index=self.index(self.root, name))
        except NetError:
            pass

    def add_port(self, port: str, bridge: str, ns: str, ifname: str) -> None:
        fd = os.open(kernel.ns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.fast_root.add_veth(port, ifname, fd, up=True, group=self.naming.group,
                                    master=self.host_index(bridge))
        finally:
            os.close(fd)
        self._tag_host_link(port, self.naming.alias(f"port {ns}/{ifname}"))
        self.fast_ns(ns).set_link(ifname, up=True)

    def add_link(self, end_a: tuple[str, str], end_b: tuple[str, str]) -> None:
        (ns_a, if_a), (ns_b, if_b) = end_a, end_b
        self.root.link("add", ifname=if_a, kind="veth", net_ns_fd=kernel.ns_path(ns_a),
                       peer={"ifname": if_b, "net_ns_fd": kernel.ns_path(ns_b)})
        for ns, ifname in ((ns_a, if_a), (ns_b, if_b)):
            self.ns(ns).link("set", ifname=ifname, state="up")

    def delete_ns_link(self, ns: str, ifname: str) -> None:
        handle = self.ns(ns)
        found = handle.link_lookup(ifname=ifname)
        if found:
            handle.link("del", index=found[0])

    def add_vlan(self, ns: str, name: str, parent: str, vid: int) -> None:
        handle = self.ns(ns)
        handle.link("add", ifname=name, kind="vlan", link=self.index(handle, parent), vlan_id=vid)
        handle.link("set", index=self.index(handle, name), state="up")

    def address(self, command: str, ns: str, ifname: str, address: str) -> None:
        iface = ipaddress.ip_interface(address)
        if command == "add":
            fast = self.fast_ns(ns)
            fast.add_address(fast.index(ifname), str(iface.ip), iface.network.prefixlen)
            return
        handle = self.ns(ns)
        kwargs = {"flags": IFA_F_NODAD} if iface.version == 6 else {}
        handle.addr(command, index=self.index(handle, ifname), address=str(iface.ip),
                    prefixlen=iface.network.prefixlen, **kwargs)

    def route(self, command: str, ns: str, dst: str, via: str) -> None:
        handle = self.ns(ns)
        net = ipaddress.ip_network(dst)
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        handle.route(command, family=family, dst=str(net.network_address), dst_len=net.prefixlen,
                     gateway=via, proto=RTPROT_STATIC, table=MAIN_TABLE)

    def forwarding(self, ns: str, on: bool) -> None:
        value = "1" if on else "0"
        kernel.write_sysctls(ns, {"net.ipv4.ip_forward": value, "net.ipv6.conf.all.forwarding": value})

    def clear_shaping(self, ns: str, ifnames: list[str]) -> None:
        handle = self.ns(ns)
        for ifname in ifnames:
            found = handle.link_lookup(ifname=ifname)
            if found:
                try:
                    handle.tc("del", index=found[0], root=True)
                except NetlinkError:
                    pass  # no root qdisc of ours there
        if not self.features.netem and self.features.statistic:
            self._loss_rules(ns, {})

    def _loss_rules(self, ns: str, losses: dict[str, float]) -> None:
        # our namespace, our mangle table: rewriting the whole table keeps it exactly what the file says
        rules = "".join(
            f"-A POSTROUTING -o {ifname} -m statistic --mode random --probability {loss:.6f} "
            f"-m comment --comment xenswap-loss -j DROP\n"
            for ifname, loss in sorted(losses.items())
        )
        table = "*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n" \
                ":OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n" + rules + "COMMIT\n"
        for ipv6 in (False, True):
            kernel.iptables_restore(ns, table, ipv6=ipv6, replace_tables=True)

    @staticmethod
    def _tbf(handle: IPRoute, index: int, rate_bps: int, handle_id: str, parent: int | None = None) -> None:
        # burst: enough for a few full frames and ~1 ms of traffic at this rate (tbf needs burst >= MTU)
        burst = max(3200, rate_bps // 8 // 1000)
        kwargs = {"parent": parent} if parent is not None else {}
        handle.tc("add", "tbf", index=index, handle=handle_id, rate=f"{rate_bps}bit", burst=burst, latency="50ms",
                  **kwargs)

    def apply_shaping(self, ns: str, shapes: dict[str, Shaping]) -> None:
        handle = self.ns(ns)
        losses = {}
        for ifname, shaping in shapes.items():
            index = self.index(handle, ifname)
            if self.features.netem:
                # netem does delay, jitter and loss; the rate goes to a tbf below it (pyroute2 0.9.7's
                # encoding of netem's own rate attribute is refused by the kernel with ERANGE)
                handle.tc("add", "netem", index=index, handle="1:", delay=int(shaping.delay_us),
                          jitter=int(shaping.jitter_us), loss=shaping.loss * 100)
                if shaping.rate_bps:
                    self._tbf(handle, index, shaping.rate_bps, handle_id="10:", parent=NETEM_CLASS)
                continue
            if shaping.rate_bps:
                self._tbf(handle, index, shaping.rate_bps, handle_id="1:")
            if shaping.loss:
                losses[ifname] = shaping.loss
        if losses or (not self.features.netem and self.features.statistic):
            self._loss_rules(ns, losses)


@dataclass
class Plan:
    naming: Naming
    changes: list[Change]
    shaping_record: dict[str, str]

    def __bool__(self) -> bool:
        return bool(self.changes)

    def describe(self) -> list[str]:
        return [str(c) for c in self.changes]


def plan(topology: Topology, naming: Naming, features: Features, recorded_shaping: dict[str, str],
         root: IPRoute) -> Plan:
    """The changes that take the kernel from what is there to what the topology says, in a safe order."""
    want = desired_state(topology, naming)
    fresh = not any(n.startswith(naming.ns_prefix) for n in kernel.list_namespaces())
    have = read_actual(naming, root, namespaces=[] if fresh else None)
    removals: list[Change] = []
    additions: list[Change] = []

    def add(what: str, run, undo=None) -> None:
        additions.append(Change("+", what, run, undo))

    def remove(what: str, run) -> None:
        removals.append(Change("-", what, run))

    # removals first (their names may be reused by additions); they are not undone on failure
    for ns in sorted(have.namespaces - want.namespaces.keys()):
        remove(f"namespace {ns}", lambda b, ns=ns: b.remove_namespace(ns))
    for port, master in sorted(have.ports.items()):
        spec = want.ports.get(port)
        if spec is None or master != spec[0] or spec[1] not in have.namespaces \
                or spec[2] not in have.ns_links.get(spec[1], {}):
            remove(f"port {port}", lambda b, port=port: b.delete_root_link(port))
            have.ports.pop(port)
            if spec is not None:
                have.ns_links.get(spec[1], {}).pop(spec[2], None)
    for bridge in sorted(have.bridges - want.bridges.keys()):
        remove(f"bridge {bridge}", lambda b, br=bridge: b.delete_root_link(br))
    wanted_ns_links: dict[str, set[str]] = {ns: set() for ns in want.namespaces}
    for _bridge, ns, ifname in want.ports.values():
        wanted_ns_links[ns].add(ifname)
    for (ns_a, if_a), (ns_b, if_b) in want.links.items():
        wanted_ns_links[ns_a].add(if_a)
        wanted_ns_links[ns_b].add(if_b)
    for (ns, name) in want.vlans:
        wanted_ns_links[ns].add(name)
    for ns, links in sorted(have.ns_links.items()):
        if ns not in want.namespaces:
            continue
        for ifname in sorted(set(links) - wanted_ns_links[ns]):
            remove(f"interface {ns}/{ifname}", lambda b, ns=ns, i=ifname: b.delete_ns_link(ns, i))
            links.pop(ifname)

    ipv6 = {ns for (ns, _ifname), addresses in want.addresses.items() if any(":" in a for a in addresses)}
    for ns in want.namespaces:
        if ns not in have.namespaces:
            add(f"namespace {ns}", lambda b, ns=ns, v6=ns in ipv6: b.add_namespace(ns, v6),
                lambda b, ns=ns: b.remove_namespace(ns))
    for bridge, alias in want.bridges.items():
        if bridge not in have.bridges:
            add(f"bridge {bridge} ({alias.split(' ', 2)[2]})", lambda b, br=bridge, a=alias: b.add_bridge(br, a),
                lambda b, br=bridge: b.delete_root_link(br))
    for port, (bridge, ns, ifname) in want.ports.items():
        if port not in have.ports:
            add(f"port {ns}/{ifname} on bridge {bridge} (host side {port})",
                lambda b, p=port, br=bridge, ns=ns, i=ifname: b.add_port(p, br, ns, i),
                lambda b, p=port: b.delete_root_link(p))
    for (ns_a, if_a), (ns_b, if_b) in want.links.items():
        if if_a not in have.ns_links.get(ns_a, {}) or if_b not in have.ns_links.get(ns_b, {}):
            for ns, ifname in ((ns_a, if_a), (ns_b, if_b)):
                if ifname in have.ns_links.get(ns, {}):
                    additions.insert(0, Change("-", f"interface {ns}/{ifname} (half a link)",
                                               lambda b, ns=ns, i=ifname: b.delete_ns_link(ns, i)))
            add(f"link {ns_a}/{if_a} <-> {ns_b}/{if_b}",
                lambda b, x=(ns_a, if_a), y=(ns_b, if_b): b.add_link(x, y),
                lambda b, ns=ns_a, i=if_a: b.delete_ns_link(ns, i) if ns in kernel.list_namespaces() else None)
    for (ns, name), (parent, vid) in want.vlans.items():
        if name not in have.ns_links.get(ns, {}):
            add(f"vlan {ns}/{name} (id {vid} on {parent})",
                lambda b, ns=ns, n=name, p=parent, v=vid: b.add_vlan(ns, n, p, v),
                lambda b, ns=ns, n=name: b.delete_ns_link(ns, n))
    readdress: set[str] = set()  # namespaces losing an address: the kernel drops routes through it
    for (ns, ifname), addresses in want.addresses.items():
        current = have.addresses.get((ns, ifname), set())
        if current - addresses:
            readdress.add(ns)
        for address in sorted(current - addresses):
            removals.append(Change("-", f"address {address} on {ns}/{ifname}",
                                   lambda b, ns=ns, i=ifname, a=address: b.address("del", ns, i, a)))
        for address in sorted(addresses - current):
            add(f"address {address} on {ns}/{ifname}",
                lambda b, ns=ns, i=ifname, a=address: b.address("add", ns, i, a))
    for ns, on in want.namespaces.items():
        if have.forwarding.get(ns, False) != on:
            add(f"forwarding {'on' if on else 'off'} in {ns}", lambda b, ns=ns, on=on: b.forwarding(ns, on))
    for ns, routes in want.routes.items():
        current = have.routes.get(ns, set())
        for dst, via in sorted(current - routes):
            removals.append(Change("-", f"route {dst} via {via} in {ns}",
                                   lambda b, ns=ns, d=dst, v=via: b.route("del", ns, d, v)))
        for dst, via in sorted(routes - current):
            add(f"route {dst} via {via} in {ns}", lambda b, ns=ns, d=dst, v=via: b.route("replace", ns, d, v))
        if ns in readdress:
            for dst, via in sorted(routes & current):
                additions.append(Change("~", f"route {dst} via {via} in {ns} (again, after the address change)",
                                        lambda b, ns=ns, d=dst, v=via: b.route("replace", ns, d, v)))

    # shaping: compare with what we recorded last time, and check the qdisc is really there
    record = {f"{ns}/{ifname}": shaping_signature(s, features) for (ns, ifname), s in want.shaping.items()}
    touched: dict[str, dict[str, Shaping]] = {}
    cleared: dict[str, list[str]] = {}
    for key in sorted(set(record) | set(recorded_shaping)):
        ns, ifname = key.split("/", 1)
        if ns not in want.namespaces:
            continue
        shaping = want.shaping.get((ns, ifname))
        expect_qdisc = shaping is not None and ("netem" in record.get(key, "") or "tbf" in record.get(key, ""))
        qdisc_ok = not expect_qdisc or have.qdiscs.get((ns, ifname)) in ("netem", "tbf")
        if recorded_shaping.get(key) == record.get(key) and qdisc_ok and ns in have.namespaces:
            continue
        if shaping is None:
            cleared.setdefault(ns, []).append(ifname)
            removals.append(Change("-", f"shaping on {ns}/{ifname} ({recorded_shaping[key]})",
                                   lambda b, ns=ns, i=ifname: b.clear_shaping(ns, [i])))
        else:
            touched.setdefault(ns, {})[ifname] = shaping
    for ns, shapes in touched.items():
        # loss rules are rewritten per namespace, so a touched namespace re-applies all its shaped interfaces
        shapes = {i: s for (n, i), s in want.shaping.items() if n == ns}
        what = "; ".join(f"{i}: {shaping_signature(s, features)}" for i, s in sorted(shapes.items()))
        add(f"shaping in {ns}: {what}",
            lambda b, ns=ns, s=shapes: (b.clear_shaping(ns, list(s)), b.apply_shaping(ns, s)),
            lambda b, ns=ns, s=shapes: b.clear_shaping(ns, list(s)) if ns in kernel.list_namespaces() else None)
    return Plan(naming, removals + additions, record)


def execute(plan: Plan, builder: Builder) -> None:
    """Run a plan; if a step fails, undo the steps done so far (newest first) and raise one clear error."""
    done: list[Change] = []
    for change in plan.changes:
        try:
            change.run(builder)
        except Exception as exc:
            for previous in reversed(done):
                if previous.undo is not None:
                    try:
                        previous.undo(builder)
                    except Exception:  # best effort: keep undoing the rest
                        pass
            reason = exc.args[1] if isinstance(exc, NetlinkError) and len(exc.args) > 1 else exc
            raise NetError(f"could not apply '{change}': {reason}; rolled back the {len(done)} changes made "
                           f"before it") from exc
        done.append(change)


def destroy(naming: Naming, builder: Builder) -> list[str]:
    """Remove everything of this topology: host-side devices by group in one batch, then its namespaces."""
    removed = []
    ours = [m for m in builder.root.get_links() if m.get_attr("IFLA_GROUP") == naming.group
            and (m.get_attr("IFLA_IFALIAS") or "").startswith(naming.alias(""))]
    if ours:
        try:
            # one RTM_DELLINK for the whole group: the kernel unregisters them as one batch
            builder.root.link("del", group=naming.group)
        except NetlinkError:
            for msg in ours:
                builder.delete_root_link(msg.get_attr("IFLA_IFNAME"))
        removed += [f"device {m.get_attr('IFLA_IFNAME')}" for m in ours]
    for ns in kernel.list_namespaces():
        if ns.startswith(naming.ns_prefix):
            builder.remove_namespace(ns)
            removed.append(f"namespace {ns}")
    return removed


def tids_in_kernel() -> set[int]:
    """Topology numbers with namespaces or host devices in the kernel (whichever store made them)."""
    taken = {int(m.group(1)) for n in kernel.list_namespaces() if (m := re.match(r"xs(\d+)-", n))}
    with IPRoute() as root:
        for msg in root.get_links():
            group = msg.get_attr("IFLA_GROUP") or 0
            if GROUP_BASE < group <= GROUP_BASE + MAX_TID:
                taken.add(group - GROUP_BASE)
    return taken


# --- the entry points the CLI and other areas use -------------------------------------------------------------


def diff(topology: Topology, features: Features | None = None) -> Plan:
    features = features or kernel.probe()
    with Store() as store:
        tid = store.tid(topology.name)
        naming = Naming(topology.name, tid if tid is not None else
                        store.allocate(topology.name, topology.source, tids_in_kernel()))
        if tid is None:
            store.forget(topology.name)  # a diff must not leave a record behind
        with IPRoute() as root:
            return plan(topology, naming, features, store.shaping(topology.name), root)


def apply(topology: Topology, document: str = "", features: Features | None = None) -> Plan:
    features = features or kernel.probe()
    with Store() as store:
        new = store.tid(topology.name) is None
        naming = Naming(topology.name, store.allocate(topology.name, topology.source, tids_in_kernel()))
        builder = Builder(naming, features)
        try:
            the_plan = plan(topology, naming, features, store.shaping(topology.name), builder.root)
            execute(the_plan, builder)
        except Exception:
            if new:
                store.forget(topology.name)
            raise
        finally:
            builder.close()
        store.record_applied(topology.name, topology.source, document, the_plan.shaping_record)
        return the_plan


def destroy_topology(name: str) -> list[str]:
    with Store() as store:
        tid = store.tid(name)
        if tid is None:
            raise NetError(f"topology {name!r} was never applied here (known: "
                           f"{', '.join(e['name'] for e in store.entries()) or 'none'})")
        naming = Naming(name, tid)
        builder = Builder(naming, Features())
        try:
            removed = destroy(naming, builder)
        finally:
            builder.close()
        store.forget(name)
        return removed


def naming_for(name: str) -> Naming:
    with Store() as store:
        tid = store.tid(name)
    if tid is None:
        raise NetError(f"topology {name!r} is not applied")
    return Naming(name, tid)


def bridge_for(topology: str, lan: str) -> str:
    """The host bridge a VM's tap or vif joins to sit on ``lan`` (e.g. QemuVM.create(bridge=...))."""
    return naming_for(topology).bridge(lan)
