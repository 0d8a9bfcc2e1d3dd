"""Host tap devices for guests, made with pyroute2 (netlink and the tun ioctls, no ip(8))."""

from __future__ import annotations

import ipaddress
import re
import time
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from xenswap.errors import XenswapError

IFNAMSIZ = 15  # usable characters of a Linux interface name
_TAP_ID_RE = re.compile(r"^xs(\d+)(-|$)")


class TapExists(XenswapError):
    def __init__(self, name: str):
        super().__init__(f"host interface {name} already exists (a stale tap? 'xenswap destroy' cleans it)")


def host_tap_ids() -> set[int]:
    """Domain ids whose ``xs<id>-...`` tap exists on this host (from any state directory)."""
    for attempt in range(10):
        try:
            with IPRoute() as ipr:
                names = [link.get_attr("IFLA_IFNAME") or "" for link in ipr.get_links()]
            break
        except NetlinkDumpInterrupted:
            # links changed during the dump (others create interfaces at the same time): dump again
            time.sleep(0.02 * (attempt + 1))
    else:
        raise XenswapError("cannot list host interfaces: the netlink dump kept being interrupted")
    return {int(m.group(1)) for m in map(_TAP_ID_RE.match, names) if m}


def tap_name(domid: int, vm_name: str) -> str:
    """``xs<id>-<short name>``, at most 15 characters, only characters ip(8) accepts unquoted."""
    prefix = f"xs{domid}-"
    short = re.sub(r"[^A-Za-z0-9_]", "", vm_name)[: IFNAMSIZ - len(prefix)]
    return prefix + short if short else prefix.rstrip("-")


def mac_address(domid: int) -> str:
    """A stable, locally administered MAC derived from the domain id (QEMU's 52:54:00 prefix)."""
    if not 0 <= domid < 1 << 24:
        raise ValueError(f"domain id {domid} out of range")
    return f"52:54:00:{domid >> 16:02x}:{(domid >> 8) & 0xFF:02x}:{domid & 0xFF:02x}"


def host_address_for(guest_cidr: str, gateway: str | None) -> str:
    """The host's end of a routed (bridge-less) tap: the guest's gateway, else the subnet's first address
    that is not the guest's own."""
    iface = ipaddress.ip_interface(guest_cidr)
    if gateway:
        return str(ipaddress.ip_address(gateway))
    hosts = iface.network.hosts()
    for candidate in hosts:
        if candidate != iface.ip:
            return str(candidate)
    raise XenswapError(f"no host address left in {iface.network} for a routed tap")


def create_tap(name: str, bridge: str | None = None, guest_cidr: str | None = None, gateway: str | None = None) -> None:
    """A persistent tap (QEMU opens it by name), up; enslaved to ``bridge`` if given, otherwise, when the
    guest has an address, routed: the host end gets the gateway address with the guest as its /32 peer, so
    the host reaches each guest on its own tap even when several guests share a subnet and gateway."""
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=name):
            raise TapExists(name)
        bridge_index = None
        if bridge is not None:
            found = ipr.link_lookup(ifname=bridge)
            if not found:
                raise XenswapError(f"bridge {bridge!r} does not exist on the host")
            bridge_index = found[0]
        flags = {"no_pi": True, "one_queue": False, "vnet_hdr": True, "multi_queue": False}
        try:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr=flags)
        except (NetlinkError, OSError) as exc:
            if getattr(exc, "errno", None) == 16 or getattr(exc, "code", None) == 16:  # EBUSY: taken meanwhile
                raise TapExists(name) from exc
            raise XenswapError(f"cannot create tap {name}: {exc}") from exc
        index = ipr.link_lookup(ifname=name)[0]
        try:
            _disable_ipv6(name)
            if bridge_index is not None:
                ipr.link("set", index=index, master=bridge_index)
            elif guest_cidr is not None:
                guest = ipaddress.ip_interface(guest_cidr)
                # IFA_LOCAL is our end, IFA_ADDRESS the peer: "ip addr add GW peer GUEST/32"
                local = host_address_for(guest_cidr, gateway)
                ipr.addr("add", index=index, local=local, address=str(guest.ip), prefixlen=guest.max_prefixlen)
            ipr.link("set", index=index, state="up")
        except (NetlinkError, OSError) as exc:
            ipr.link("del", index=index)
            raise XenswapError(f"cannot set up tap {name}: {exc}") from exc


def _disable_ipv6(name: str) -> None:
    """No IPv6 on the host end: otherwise the host sends router/neighbour solicitations and MLD reports into
    the guest on its own, packets that wake an idle guest and blur its measured working set."""
    knob = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
    if knob.exists():
        knob.write_text("1\n")


def delete_tap(name: str) -> bool:
    """Remove a tap if it exists; True when something was removed."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code != 19:  # ENODEV: gone meanwhile
                raise
            return False
        return True


def tap_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))
