"""Hypervisor ports. ``select_hypervisor`` picks the one that runs here."""

from __future__ import annotations

import importlib
from pathlib import Path

from xenswap.hv.base import Hypervisor


def running_on_xen_dom0() -> bool:
    caps = Path("/proc/xen/capabilities")
    try:
        return "control_d" in caps.read_text()
    except OSError:
        return False


def select_hypervisor(kind: str = "auto") -> Hypervisor:
    """The port for ``kind`` (qemu, xen, or auto: xen inside a Xen dom0, otherwise qemu)."""
    if kind == "auto":
        kind = "xen" if running_on_xen_dom0() else "qemu"
    module = importlib.import_module(f"xenswap.hv.{kind}")
    return module.open_hypervisor()
