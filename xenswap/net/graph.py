"""Render a topology as a picture: graphviz dot source, then `dot -Tpng|-Tsvg`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from xenswap.errors import MissingTool, SpecError
from xenswap.net.topology import Topology


def _quote(text: str) -> str:
    # labels use dot's own "\\n" line breaks, so backslashes pass through; only quotes are escaped
    return '"' + text.replace('"', '\\"') + '"'


def to_dot(topology: Topology) -> str:
    lines = [f"graph {_quote(topology.name)} {{", "  graph [overlap=false, fontsize=10];",
             "  node [fontsize=10]; edge [fontsize=8];"]
    for lan in topology.lans:
        lines.append(f"  {_quote('lan:' + lan)} [label={_quote(lan)}, shape=ellipse, style=filled, "
                     f"fillcolor=lightblue];")
    for node in topology.nodes.values():
        shape = "box3d" if node.router else "box"
        routes = "\\n".join(f"{r.to} via {r.via}" for r in node.routes)
        label = node.name + ("\\n(router)" if node.router else "") + (f"\\n{routes}" if routes else "")
        lines.append(f"  {_quote('node:' + node.name)} [label={_quote(label)}, shape={shape}];")
    for vm in topology.vms.values():
        label = vm.name + "\\n" + "\\n".join(str(a) for a in vm.addresses)
        lines.append(f"  {_quote('vm:' + vm.name)} [label={_quote(label)}, shape=component, style=filled, "
                     f"fillcolor=lightyellow];")
        lines.append(f"  {_quote('vm:' + vm.name)} -- {_quote('lan:' + vm.lan)};")
    for node in topology.nodes.values():
        for iface in node.interfaces:
            if iface.lan is None:
                continue
            label = iface.name + (f".{iface.vlan}" if iface.vlan else "") + "\\n" + \
                "\\n".join(str(a) for a in iface.addresses)
            shaping = topology.effective_shaping(iface)
            if shaping:
                label += "\\n" + shaping.describe()
            lines.append(f"  {_quote('node:' + node.name)} -- {_quote('lan:' + iface.lan)} "
                         f"[label={_quote(label)}];")
    for link in topology.links:
        ends = topology.link_ends(link)
        if len(ends) != 2:
            continue
        a, b = ends
        label = f"{link}\\n{a.name} — {b.name}"
        shaping = topology.links[link].shaping
        if shaping:
            label += "\\n" + shaping.describe()
        lines.append(f"  {_quote('node:' + a.node)} -- {_quote('node:' + b.node)} [label={_quote(label)}, "
                     f"penwidth=2];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(topology: Topology, output: Path) -> Path:
    fmt = output.suffix.lstrip(".").lower()
    if fmt == "dot":
        output.write_text(to_dot(topology))
        return output
    if fmt not in ("png", "svg", "pdf"):
        raise SpecError(f"graph output {output}: use a .png, .svg, .pdf or .dot file name")
    dot = shutil.which("dot")
    if dot is None:
        raise MissingTool("dot", "graphviz")
    result = subprocess.run([dot, f"-T{fmt}", "-o", str(output)], input=to_dot(topology), text=True,
                            capture_output=True, timeout=60)
    if result.returncode != 0:
        raise SpecError(f"graphviz could not render {output}: {result.stderr.strip()}")
    return output
