"""Kernel modules from an unpacked Debian kernel package: find them, resolve their dependencies, order them.

Debian's linux-image .deb ships no modules.dep (depmod runs at install time), so dependencies are read
from each module's ELF ``.modinfo`` section (``depends=a,b``), exactly what depmod itself reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from xenswap.errors import XenswapError


def module_name(path_or_name: str) -> str:
    """The kernel's canonical module name: file stem with '-' folded to '_' (xen-netfront -> xen_netfront)."""
    name = path_or_name.rsplit("/", 1)[-1]
    if name.endswith(".ko"):
        name = name[:-3]
    return name.replace("-", "_")


def read_modinfo(ko: bytes) -> dict[str, list[str]]:
    """Key/values of a module's .modinfo section (a 64-bit little-endian ELF, as on amd64)."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
        raise XenswapError("not a 64-bit little-endian ELF kernel module")
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)
    sections = []
    for i in range(shnum):
        name_off, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        sections.append((name_off, offset, size))
    strtab_off = sections[shstrndx][1]
    info: dict[str, list[str]] = {}
    for name_off, offset, size in sections:
        end = ko.index(b"\0", strtab_off + name_off)
        if ko[strtab_off + name_off : end] != b".modinfo":
            continue
        for item in ko[offset : offset + size].split(b"\0"):
            if b"=" in item:
                key, _, value = item.decode(errors="replace").partition("=")
                info.setdefault(key, []).append(value)
    return info


@dataclass(frozen=True)
class Module:
    name: str
    relpath: str  # relative to lib/modules/<version>/, e.g. kernel/drivers/net/virtio_net.ko
    depends: tuple[str, ...]


class ModuleTree:
    """The modules of one unpacked kernel: lib/modules/<version>/ under ``root``."""

    def __init__(self, root: Path):
        versions = sorted((root / "lib" / "modules").iterdir())
        if len(versions) != 1:
            raise XenswapError(f"expected one kernel version under {root}/lib/modules, found {len(versions)}")
        self.version = versions[0].name
        self.base = versions[0]
        self._paths = {module_name(p.name): p for p in sorted(self.base.rglob("*.ko"))}
        builtin = (self.base / "modules.builtin").read_text().split()
        self.builtin = {module_name(line) for line in builtin}
        self._cache: dict[str, Module] = {}

    def module(self, name: str) -> Module:
        name = module_name(name)
        if name not in self._cache:
            path = self._paths.get(name)
            if path is None:
                raise XenswapError(f"kernel {self.version} has no module {name!r} (neither a .ko nor built in)")
            depends = read_modinfo(path.read_bytes()).get("depends", [""])[0]
            deps = tuple(sorted(module_name(d) for d in depends.split(",") if d))
            self._cache[name] = Module(name, str(path.relative_to(self.base)), deps)
        return self._cache[name]

    def path(self, module: Module) -> Path:
        return self.base / module.relpath

    def load_order(self, wanted: list[str]) -> list[Module]:
        """``wanted`` and everything they need, dependencies first; built-in modules are skipped."""
        order: list[Module] = []
        seen: set[str] = set()

        def visit(name: str, stack: tuple[str, ...]) -> None:
            name = module_name(name)
            if name in seen or name in self.builtin:
                return
            if name in stack:
                raise XenswapError(f"module dependency cycle: {' -> '.join((*stack, name))}")
            module = self.module(name)
            for dep in module.depends:
                visit(dep, (*stack, name))
            seen.add(name)
            order.append(module)

        for name in wanted:
            visit(name, ())
        return order

    def modules_dep(self, modules: list[Module]) -> str:
        """A modules.dep for exactly these modules (kmod's format: a module's full dependency list, the
        modules needing others first), so ``modprobe`` inside the guest can load any of them later."""
        by_name = {m.name: m for m in modules}
        lines = []
        for module in sorted(modules, key=lambda m: m.relpath):
            closure = [m for m in self.load_order([module.name]) if m.name != module.name and m.name in by_name]
            deps = " ".join(m.relpath for m in reversed(closure))
            lines.append(f"{module.relpath}:{' ' + deps if deps else ''}")
        return "\n".join(lines) + "\n"
