"""A network topology as data: parse a YAML file, validate all of it, report every problem at once.

Nothing here touches the kernel. ``load(path, features)`` returns a ``Topology`` or raises
``TopologyError`` whose message has one line per problem (unknown node, duplicate address, bad unit,
a shaping the running kernel cannot do honestly, ...). The schema is documented in docs/net.md.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xenswap.errors import SpecError
from xenswap.net.units import format_duration, format_rate, parse_duration_us, parse_rate_bps, parse_ratio

# A Linux bridge has at most BR_MAX_PORTS = 1 << 10 ports.
BRIDGE_MAX_PORTS = 1024

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_TOPOLOGY_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,23}")
_IFNAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,14}")
_SHAPING_KEYS = ("delay", "jitter", "loss", "rate")

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TopologyError(SpecError):
    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}, nothing was changed:\n{lines}")


@dataclass(frozen=True)
class Shaping:
    """Egress shaping of one interface (a link applies its shaping to both of its ends)."""

    delay_us: float = 0.0
    jitter_us: float = 0.0
    loss: float = 0.0  # ratio 0..1
    rate_bps: int = 0  # 0 = unlimited

    def __bool__(self) -> bool:
        return bool(self.delay_us or self.jitter_us or self.loss or self.rate_bps)

    def merged(self, other: Shaping) -> Shaping:
        """The interface's own values win over the link's."""
        return Shaping(
            other.delay_us or self.delay_us,
            other.jitter_us or self.jitter_us,
            other.loss or self.loss,
            other.rate_bps or self.rate_bps,
        )

    def describe(self) -> str:
        parts = []
        if self.delay_us:
            parts.append(f"delay {format_duration(self.delay_us)}")
        if self.jitter_us:
            parts.append(f"jitter {format_duration(self.jitter_us)}")
        if self.loss:
            parts.append(f"loss {self.loss * 100:g}%")
        if self.rate_bps:
            parts.append(f"rate {format_rate(self.rate_bps)}")
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class Route:
    to: IPNetwork
    via: IPAddress

    @property
    def is_default(self) -> bool:
        return self.to.prefixlen == 0


@dataclass
class Interface:
    node: str
    name: str
    lan: str | None = None
    link: str | None = None
    vlan: int | None = None
    addresses: list[IPInterface] = field(default_factory=list)
    shaping: Shaping = field(default_factory=Shaping)

    @property
    def segment(self) -> str:
        return f"lan {self.lan}" if self.lan else f"link {self.link}"


@dataclass
class Node:
    name: str
    router: bool = False
    interfaces: list[Interface] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)


@dataclass
class Vm:
    """Where a VM's interface sits: the VM's own port (QEMU tap, Xen vif) joins this LAN's bridge."""

    name: str
    lan: str
    addresses: list[IPInterface] = field(default_factory=list)
    gateway: IPAddress | None = None


@dataclass
class Link:
    name: str
    shaping: Shaping = field(default_factory=Shaping)


@dataclass
class Topology:
    name: str
    lans: list[str]
    links: dict[str, Link]
    nodes: dict[str, Node]
    vms: dict[str, Vm]
    source: str = "<topology>"

    def interfaces(self) -> list[Interface]:
        return [i for n in self.nodes.values() for i in n.interfaces]

    def link_ends(self, link: str) -> list[Interface]:
        return [i for i in self.interfaces() if i.link == link]

    def effective_shaping(self, iface: Interface) -> Shaping:
        base = self.links[iface.link].shaping if iface.link and iface.link in self.links else Shaping()
        return base.merged(iface.shaping)


@dataclass(frozen=True)
class Features:
    """What the running kernel offers (see xenswap.net.probe); defaults say 'everything'."""

    netem: bool = True
    tbf: bool = True
    vlan: bool = True
    statistic: bool = True
    nfqueue: bool = True


def load(path: str | Path, features: Features | None = None) -> Topology:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read topology file {path}: {exc.strerror}") from None
    return parse(text, source=str(path), features=features)


def parse(text: str, source: str = "<topology>", features: Features | None = None) -> Topology:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TopologyError(source, [f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    return _Validator(source).run(data, features or Features())


class _Validator:
    def __init__(self, source: str):
        self.source = source
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(f"{where}: expected a mapping, got {type(value).__name__}")
            return {}
        return value

    def unknown_keys(self, data: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in data:
            if key not in allowed:
                self.problem(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})")

    def name(self, value: Any, what: str) -> bool:
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            self.problem(f"bad {what} name {value!r}: use 1-32 letters, digits, '-' or '_'")
            return False
        return True

    def shaping(self, data: dict[str, Any], where: str) -> Shaping:
        values: dict[str, Any] = {}
        for key, parser in (("delay", parse_duration_us), ("jitter", parse_duration_us),
                            ("loss", parse_ratio), ("rate", parse_rate_bps)):
            if key in data and data[key] is not None:
                try:
                    values[key] = parser(data[key])
                except ValueError as exc:
                    self.problem(f"{where}: {key}: {exc}")
        shaping = Shaping(values.get("delay", 0.0), values.get("jitter", 0.0), values.get("loss", 0.0),
                          values.get("rate", 0))
        if shaping.jitter_us and not shaping.delay_us:
            self.problem(f"{where}: jitter needs a delay")
        return shaping

    def addresses(self, value: Any, where: str) -> list[IPInterface]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.problem(f"{where}: addresses must be a list like [10.1.0.1/24, 'fd00:1::1/64']")
            return []
        result = []
        for item in value:
            text = str(item)
            if "/" not in text:
                self.problem(f"{where}: address {text!r} needs a prefix length (e.g. {text}/24)")
                continue
            try:
                result.append(ipaddress.ip_interface(text))
            except ValueError:
                self.problem(f"{where}: {text!r} is not an IPv4 or IPv6 address with prefix")
        return result

    def run(self, data: Any, features: Features) -> Topology:
        if not isinstance(data, dict):
            raise TopologyError(self.source, ["the file must be a mapping with keys name, lans, links, nodes, vms"])
        self.unknown_keys(data, ("name", "lans", "links", "nodes", "vms"), "top level")
        name = data.get("name")
        if not isinstance(name, str) or not _TOPOLOGY_NAME.fullmatch(name):
            self.problem(f"name {name!r}: give the topology a name of 1-24 lowercase letters, digits or '-'")
            name = str(name)

        lans_data = data.get("lans") or {}
        if isinstance(lans_data, list):
            lans_data = {lan: {} for lan in lans_data}
        lans_data = self.mapping(lans_data, "lans")
        lans = []
        for lan, spec in lans_data.items():
            if self.name(lan, "LAN"):
                self.unknown_keys(self.mapping(spec, f"lan {lan}"), ("description",), f"lan {lan}")
                lans.append(lan)

        links: dict[str, Link] = {}
        for link, spec in self.mapping(data.get("links"), "links").items():
            if not self.name(link, "link"):
                continue
            spec = self.mapping(spec, f"link {link}")
            self.unknown_keys(spec, (*_SHAPING_KEYS, "description"), f"link {link}")
            if link in lans:
                self.problem(f"link {link}: a LAN has the same name")
            links[link] = Link(link, self.shaping(spec, f"link {link}"))

        nodes: dict[str, Node] = {}
        for node_name, spec in self.mapping(data.get("nodes"), "nodes").items():
            if not self.name(node_name, "node"):
                continue
            nodes[node_name] = self.node(node_name, self.mapping(spec, f"node {node_name}"), lans, links)

        vms: dict[str, Vm] = {}
        for vm_name, spec in self.mapping(data.get("vms"), "vms").items():
            if not self.name(vm_name, "VM"):
                continue
            spec = self.mapping(spec, f"vm {vm_name}")
            self.unknown_keys(spec, ("lan", "addresses", "gateway"), f"vm {vm_name}")
            lan = spec.get("lan")
            if lan not in lans:
                self.problem(f"vm {vm_name}: unknown LAN {lan!r}{self.known(lans)}")
            gateway = None
            if spec.get("gateway") is not None:
                try:
                    gateway = ipaddress.ip_address(str(spec["gateway"]))
                except ValueError:
                    self.problem(f"vm {vm_name}: gateway {spec['gateway']!r} is not an IP address")
            vm = Vm(vm_name, str(lan), self.addresses(spec.get("addresses"), f"vm {vm_name}"), gateway)
            if gateway is not None and not any(gateway in a.network for a in vm.addresses):
                self.problem(f"vm {vm_name}: gateway {gateway} is not in any of its subnets")
            vms[vm_name] = vm

        topology = Topology(str(name), lans, links, nodes, vms, self.source)
        self.cross_checks(topology)
        self.kernel_checks(topology, features)
        if self.problems:
            raise TopologyError(self.source, self.problems)
        return topology

    @staticmethod
    def known(names: list[str] | dict[str, Any]) -> str:
        names = list(names)
        return f" (known: {', '.join(names)})" if names else " (none are defined)"

    def node(self, name: str, spec: dict[str, Any], lans: list[str], links: dict[str, Link]) -> Node:
        self.unknown_keys(spec, ("router", "interfaces", "routes", "description"), f"node {name}")
        node = Node(name, router=bool(spec.get("router", False)))
        for ifname, ispec in self.mapping(spec.get("interfaces"), f"node {name} interfaces").items():
            where = f"node {name} interface {ifname}"
            if not isinstance(ifname, str) or not _IFNAME.fullmatch(ifname) or ifname == "lo":
                self.problem(f"{where}: bad interface name (1-15 characters, starting with a letter, not lo)")
                continue
            ispec = self.mapping(ispec, where)
            self.unknown_keys(ispec, ("lan", "link", "vlan", "addresses", *_SHAPING_KEYS), where)
            lan, link = ispec.get("lan"), ispec.get("link")
            if (lan is None) == (link is None):
                self.problem(f"{where}: give exactly one of lan or link")
            elif lan is not None and lan not in lans:
                self.problem(f"{where}: unknown LAN {lan!r}{self.known(lans)}")
            elif link is not None and link not in links:
                self.problem(f"{where}: unknown link {link!r}{self.known(links)}")
            vlan = ispec.get("vlan")
            if vlan is not None and (not isinstance(vlan, int) or not 1 <= vlan <= 4094):
                self.problem(f"{where}: vlan must be a number from 1 to 4094, got {vlan!r}")
                vlan = None
            if vlan is not None and len(ifname) > 10:
                self.problem(f"{where}: with a vlan the interface name must be at most 10 characters")
            node.interfaces.append(Interface(
                name, ifname, lan=lan, link=link, vlan=vlan,
                addresses=self.addresses(ispec.get("addresses"), where), shaping=self.shaping(ispec, where),
            ))
        routes = spec.get("routes") or []
        if not isinstance(routes, list):
            self.problem(f"node {name}: routes must be a list of {{to: NET, via: ADDRESS}}")
            routes = []
        for number, rspec in enumerate(routes, 1):
            where = f"node {name} route {number}"
            rspec = self.mapping(rspec, where)
            self.unknown_keys(rspec, ("to", "via"), where)
            try:
                via = ipaddress.ip_address(str(rspec.get("via")))
            except ValueError:
                self.problem(f"{where}: via {rspec.get('via')!r} is not an IP address")
                continue
            to_text = str(rspec.get("to"))
            try:
                if to_text == "default":
                    to = ipaddress.ip_network("0.0.0.0/0" if via.version == 4 else "::/0")
                else:
                    to = ipaddress.ip_network(to_text)
            except ValueError:
                self.problem(f"{where}: to {to_text!r} is not 'default' or a network like 10.2.0.0/24")
                continue
            if to.version != via.version:
                self.problem(f"{where}: to {to} and via {via} are of different IP versions")
                continue
            node.routes.append(Route(to, via))
        return node

    def cross_checks(self, topology: Topology) -> None:
        by_segment: dict[str, dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str]] = {}
        ports: dict[str, int] = {lan: 0 for lan in topology.lans}

        def claim(segment: str, address: IPInterface, owner: str) -> None:
            seen = by_segment.setdefault(segment, {})
            if address.ip in seen:
                self.problem(f"duplicate address {address.ip} on {segment}: {seen[address.ip]} and {owner}")
            else:
                seen[address.ip] = owner

        for node in topology.nodes.values():
            own: dict[Any, str] = {}
            for iface in node.interfaces:
                owner = f"node {node.name} interface {iface.name}"
                segment = iface.segment + (f" vlan {iface.vlan}" if iface.vlan else "")
                for address in iface.addresses:
                    claim(segment, address, owner)
                    if address.ip in own:
                        self.problem(f"duplicate address {address.ip} on node {node.name}: {own[address.ip]} and "
                                     f"interface {iface.name}")
                    own[address.ip] = f"interface {iface.name}"
                if iface.lan in ports:
                    ports[iface.lan] += 1
            for route in node.routes:
                if not any(route.via in a.network for i in node.interfaces for a in i.addresses):
                    self.problem(f"node {node.name}: route to {route.to} via {route.via}: {route.via} is not on any "
                                 f"subnet of the node's interfaces")
        for vm in topology.vms.values():
            for address in vm.addresses:
                claim(f"lan {vm.lan}", address, f"vm {vm.name}")
            if vm.lan in ports:
                ports[vm.lan] += 1
        for link in topology.links:
            ends = topology.link_ends(link)
            if len(ends) != 2:
                self.problem(f"link {link}: a link joins exactly 2 interfaces, it has {len(ends)}")
            elif ends[0].node == ends[1].node:
                self.problem(f"link {link}: both ends are on node {ends[0].node}")
        for lan, count in ports.items():
            if count > BRIDGE_MAX_PORTS:
                self.problem(f"lan {lan}: {count} ports, but a Linux bridge takes at most {BRIDGE_MAX_PORTS}; "
                             f"split it into several LANs joined by a router")

    def kernel_checks(self, topology: Topology, features: Features) -> None:
        """Refuse what this kernel cannot do honestly, one line per link or interface, before anything is built."""
        owners: list[tuple[str, Shaping]] = [(f"link {name}", link.shaping) for name, link in topology.links.items()]
        owners += [(f"node {i.node} interface {i.name}", i.shaping) for i in topology.interfaces()]
        for where, shaping in owners:
            if (shaping.delay_us or shaping.jitter_us) and not features.netem:
                self.problem(f"{where}: delay/jitter needs the netem qdisc (sch_netem), which this kernel lacks; "
                             "there is no honest fallback here: drop the delay or run where netem exists "
                             "(e.g. the nested Xen dom0)")
            if shaping.loss and not features.netem and not features.statistic:
                self.problem(f"{where}: loss needs netem or the iptables statistic match; this kernel has neither")
            if shaping.rate_bps and not features.tbf:
                self.problem(f"{where}: rate needs the tbf qdisc (sch_tbf), which this kernel lacks")
        for iface in topology.interfaces():
            if iface.vlan is not None and not features.vlan:
                self.problem(f"node {iface.node} interface {iface.name}: vlan {iface.vlan} needs 802.1Q support "
                             "(8021q), which this kernel lacks")
