"""Xen port: domains through xen.lowlevel.xc (Debian's xen-utils-4.17 bindings), names and keys through
xenstore with pyxs.

Debian installs the xc bindings under /usr/lib/xen-<version>/lib/python, which is not on sys.path; importing
this package adds that directory when the normal import fails, so ``import xen.lowlevel.xc`` works without the
user setting PYTHONPATH.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from xenswap.errors import XenswapError

# Newest first: the bindings must match the running hypervisor's toolstack, and a host has one installed.
XEN_PYTHON_GLOB = "/usr/lib/xen-*/lib/python"


class XenUnavailable(XenswapError):
    pass


def xen_python_dirs(root: Path = Path("/")) -> list[Path]:
    """Directories under ``root`` holding Debian's xen Python package (xen/lowlevel/xc*.so)."""
    pattern = XEN_PYTHON_GLOB.lstrip("/")
    found = [d for d in root.glob(pattern) if any((d / "xen" / "lowlevel").glob("xc*.so"))]
    return sorted(found, reverse=True)


def _xen_package_has_lowlevel() -> bool:
    """Whether ``import xen`` would find Debian's package (with xen/lowlevel), and not e.g. a namespace
    package formed by some directory called xen on sys.path (pytest puts tests/ there, holding tests/xen)."""
    try:
        spec = importlib.util.find_spec("xen")
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    return any((Path(loc) / "lowlevel").is_dir() for loc in (spec.submodule_search_locations or []))


def ensure_xen_python_path(root: Path = Path("/")) -> Path | None:
    """Make ``import xen.lowlevel.xc`` work: if it does not already, append the Xen library dir to sys.path.
    Returns the directory added (None if the import worked as is or no directory was found).

    Appending is enough even when a namespace package ``xen`` shadows it: a regular package anywhere on
    sys.path wins over namespace portions (PEP 420); a namespace ``xen`` already imported is dropped."""
    if _xen_package_has_lowlevel():
        return None
    for directory in xen_python_dirs(root):
        if str(directory) not in sys.path:
            sys.path.append(str(directory))
        loaded = sys.modules.get("xen")
        if loaded is not None and getattr(loaded, "__file__", None) is None:
            del sys.modules["xen"]
        importlib.invalidate_caches()
        return directory
    return None


def load_xc() -> ModuleType:
    """The xen.lowlevel.xc module, or a clear error saying what is missing."""
    ensure_xen_python_path()
    try:
        return importlib.import_module("xen.lowlevel.xc")
    except ImportError as exc:
        raise XenUnavailable(
            f"xen.lowlevel.xc cannot be imported ({exc}): install the Debian package xen-utils-4.17"
        ) from None


def domain_record(domid: int, xc: object | None = None) -> dict | None:
    """xc's domain_getinfo record of exactly this domain, or None when there is none (domain_getinfo(d, 1) answers
    with the next domain up when d does not exist, and fails with ESRCH when there is none above it)."""
    module = load_xc()
    try:
        info = (xc or module.xc()).domain_getinfo(domid, 1)
    except module.Error:  # ESRCH: no domain at or above domid
        return None
    return info[0] if info and int(info[0]["domid"]) == domid else None


def existing_domain_record(domid: int, xc: object | None = None) -> dict:
    """``domain_record`` of a domain that must exist: XenswapError("no domain N") otherwise."""
    info = domain_record(domid, xc)
    if info is None:
        raise XenswapError(f"no domain {domid}")
    return info


def open_hypervisor():  # -> XenHypervisor (imported lazily: the port needs a running Xen)
    from xenswap.hv.xen.port import XenHypervisor

    return XenHypervisor.open()


ensure_xen_python_path()
