"""``xenswap net apply|diff|destroy|show|graph FILE`` and ``xenswap net list``: network topologies as data."""

from __future__ import annotations

import argparse
from pathlib import Path

from xenswap.cli import print_json, print_table
from xenswap.net import build, kernel
from xenswap.net.topology import Topology, load


def _load(path: str) -> tuple[Topology, str]:
    topology = load(path, kernel.probe())
    return topology, Path(path).read_text()


def cmd_diff(args: argparse.Namespace) -> int:
    topology, _ = _load(args.file)
    plan = build.diff(topology)
    if args.json:
        print_json([{"sign": c.sign, "what": c.what} for c in plan.changes])
    elif not plan:
        print(f"{topology.name}: up to date, nothing to change")
    else:
        print("\n".join(plan.describe()))
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    topology, document = _load(args.file)
    preview = build.diff(topology)
    if not preview:
        print(f"{topology.name}: up to date, nothing to change")
        return 0
    print("\n".join(preview.describe()))
    plan = build.apply(topology, document)
    print(f"{topology.name}: applied {len(plan.changes)} changes")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    name = args.file
    if Path(args.file).exists():
        name = load(args.file).name  # only the name is needed: no kernel checks to destroy
    removed = build.destroy_topology(name)
    for line in removed:
        print(f"- {line}")
    print(f"{name}: destroyed ({len(removed)} objects)")
    return 0


def show_rows(topology: Topology) -> list[dict[str, object]]:
    try:
        naming = build.naming_for(topology.name)
    except kernel.NetError:
        naming = None
    namespaces = set(kernel.list_namespaces())
    rows: list[dict[str, object]] = []
    for node in topology.nodes.values():
        ns = naming.netns(node.name) if naming else None
        for iface in node.interfaces:
            rows.append({
                "kind": "router" if node.router else "host",
                "name": node.name,
                "interface": iface.name + (f".{iface.vlan}" if iface.vlan else ""),
                "on": iface.segment,
                "addresses": [str(a) for a in iface.addresses],
                "shaping": topology.effective_shaping(iface).describe(),
                "netns": ns,
                "host_device": naming.bridge(iface.lan) if naming and iface.lan else None,
                "up": bool(ns and ns in namespaces),
            })
    for vm in topology.vms.values():
        rows.append({
            "kind": "vm", "name": vm.name, "interface": "tap/vif", "on": f"lan {vm.lan}",
            "addresses": [str(a) for a in vm.addresses], "shaping": "none", "netns": None,
            "host_device": naming.bridge(vm.lan) if naming else None, "up": naming is not None,
        })
    return rows


def cmd_show(args: argparse.Namespace) -> int:
    if Path(args.file).exists():
        topology = load(args.file)
    else:
        from xenswap.net.store import Store
        from xenswap.net.topology import parse

        with Store() as store:
            document = store.document(args.file)
        if document is None:
            raise kernel.NetError(f"no topology file or applied topology named {args.file!r}")
        topology = parse(document, source=args.file)
    rows = show_rows(topology)
    if args.json:
        print_json({"name": topology.name, "entries": rows})
        return 0
    print_table(["Kind", "Name", "Iface", "On", "Addresses", "Shaping", "Netns", "Bridge", "Up"],
                [[r["kind"], r["name"], r["interface"], r["on"], " ".join(r["addresses"]) or None,
                  r["shaping"], r["netns"], r["host_device"], "yes" if r["up"] else "no"] for r in rows])
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from xenswap.net.graph import render

    topology = load(args.file)
    output = Path(args.output or Path(args.file).with_suffix(".png").name)
    render(topology, output)
    print(output)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from xenswap.net.store import Store

    with Store() as store:
        entries = store.entries()
    namespaces = kernel.list_namespaces()
    for entry in entries:
        prefix = build.Naming(str(entry["name"]), int(str(entry["tid"]))).ns_prefix
        entry["namespaces"] = sum(n.startswith(prefix) for n in namespaces)
    if args.json:
        print_json(entries)
        return 0
    print_table(["Name", "Number", "Namespaces", "Source"],
                [[e["name"], e["tid"], e["namespaces"], e["source"]] for e in entries])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    net = sub.add_parser("net", help="virtual network topologies (apply, diff, destroy, show, graph)")
    actions = net.add_subparsers(dest="net_command", metavar="ACTION")
    actions.required = True
    p = actions.add_parser("apply", help="build or update a topology (prints the diff first)")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(handler=cmd_apply)
    p = actions.add_parser("diff", help="what apply would change")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_diff)
    p = actions.add_parser("destroy", help="remove everything a topology made (FILE or topology name)")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(handler=cmd_destroy)
    p = actions.add_parser("show", help="nodes, interfaces, addresses and where they live")
    p.add_argument("file", metavar="FILE", help="topology file, or the name of an applied topology")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_show)
    p = actions.add_parser("list", help="topologies applied here")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_list)
    p = actions.add_parser("graph", help="render the topology as a picture (graphviz)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", help="output file (.png, .svg, .pdf or .dot); default FILE's name .png")
    p.set_defaults(handler=cmd_graph)
