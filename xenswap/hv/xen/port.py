"""The Xen port: xenswap.hv.base.Hypervisor over xen.lowlevel.xc (domains, pause, vCPU times) and xenstore
(names). Run in dom0 as root."""

from __future__ import annotations

from typing import Any

from xenswap.errors import UnknownDomain, XenswapError
from xenswap.hv.base import DomainInfo, Hypervisor
from xenswap.hv.xen import XenUnavailable, load_xc
from xenswap.hv.xen.xenstore import XenStore, XenStoreError

# xl's state column: six flags in this order, '-' when unset.
STATE_FLAGS = [("running", "r"), ("blocked", "b"), ("paused", "p"), ("shutdown", "s"), ("crashed", "c"),
               ("dying", "d")]


def state_flags(info: dict[str, Any]) -> str:
    """xl's six-letter state (e.g. "-b----") from an xc domain_getinfo() record."""
    return "".join(letter if info.get(key) else "-" for key, letter in STATE_FLAGS)


def domain_name(store: XenStore | None, domid: int) -> str:
    """The name xl shows: xenstore's /local/domain/<id>/name; dom0 is Domain-0 even before
    xen-init-dom0 wrote it; otherwise a placeholder like xl's."""
    name = store.read(f"/local/domain/{domid}/name") if store is not None else None
    if name:
        return name
    return "Domain-0" if domid == 0 else f"(null){domid}"


class XenHypervisor(Hypervisor):
    name = "xen"

    def __init__(self, xc_handle: Any, store: XenStore | None):
        self.xc = xc_handle
        self.store = store

    @classmethod
    def open(cls) -> XenHypervisor:
        xc_module = load_xc()
        try:
            handle = xc_module.xc()
        except xc_module.Error as exc:
            raise XenUnavailable(f"cannot open the Xen control interface ({exc}): not running in a Xen dom0?") from None
        try:
            store: XenStore | None = XenStore()
        except XenStoreError:
            store = None  # names fall back to placeholders; xenstored may be starting
        return cls(handle, store)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def _raw_domains(self) -> list[dict[str, Any]]:
        return sorted(self.xc.domain_getinfo(0, 65535), key=lambda d: d["domid"])

    def _info(self, raw: dict[str, Any]) -> DomainInfo:
        domid = int(raw["domid"])
        return DomainInfo(
            name=domain_name(self.store, domid),
            domid=domid,
            mem_mib=int(raw["mem_kb"]) // 1024,
            vcpus=int(raw["online_vcpus"]),
            state=state_flags(raw),
            cpu_time_s=int(raw["cpu_time"]) / 1e9,
            extra={
                "hvm": bool(raw.get("hvm")),  # PVH guests are HVM containers to Xen
                "max_mem_mib": int(raw.get("maxmem_kb", 0)) // 1024,
                "max_vcpu_id": int(raw.get("max_vcpu_id", 0)),
                "shutdown_reason": raw.get("shutdown_reason"),
            },
        )

    def list_domains(self) -> list[DomainInfo]:
        return [self._info(raw) for raw in self._raw_domains()]

    def domid(self, ref: str | int) -> int:
        return self.lookup(ref).domid

    def _call(self, what: str, ref: str | int, fn: Any, *args: Any) -> Any:
        domid = self.domid(ref)
        try:
            return fn(domid, *args)
        except self._xc_error() as exc:
            raise XenswapError(f"{what} of domain {ref} failed: {exc}") from None

    def _xc_error(self) -> type[Exception]:
        return load_xc().Error

    def is_managed(self, dom: DomainInfo) -> bool:
        return dom.domid != 0  # Domain-0 runs the manager and the pager: it is listed, never paged

    def pause(self, ref: str | int) -> None:
        if self.domid(ref) == 0:
            raise XenswapError("refusing to pause Domain-0 (it runs this toolstack)")
        self._call("pause", ref, self.xc.domain_pause)

    def unpause(self, ref: str | int) -> None:
        self._call("unpause", ref, self.xc.domain_unpause)

    def vcpu_times(self, ref: str | int) -> list[float]:
        dom = self.lookup(ref)
        times = []
        for vcpu in range(dom.extra["max_vcpu_id"] + 1):
            try:
                info = self.xc.vcpu_getinfo(dom.domid, vcpu)
            except self._xc_error() as exc:
                raise XenswapError(f"vcpu_getinfo({dom.name}, {vcpu}) failed: {exc}") from None
            times.append(int(info["cpu_time"]) / 1e9)
        return times

    def lookup(self, ref: str | int) -> DomainInfo:
        domains = self.list_domains()
        for dom in domains:
            if dom.name == str(ref) or str(dom.domid) == str(ref):
                return dom
        raise UnknownDomain(str(ref), [d.name for d in domains])
