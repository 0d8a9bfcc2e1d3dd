"""The small interface every hypervisor port implements (cf. Ganeti's lib/hypervisor/hv_base.py).

Ports are mechanisms only: they list domains, pause and resume them, and report the raw figures the
engines in xenswap.core need (vCPU time, memory residency). Policy lives in xenswap.core, never here.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field

from xenswap.errors import UnknownDomain


@dataclass
class DomainInfo:
    """One row of ``xenswap list``: xl's columns plus ours (None until a later layer fills them)."""

    name: str
    domid: int
    mem_mib: int
    vcpus: int
    state: str  # xl's six flags, e.g. "-b----", "--p---"
    cpu_time_s: float
    resident_mib: float | None = None
    wss_mib: float | None = None
    idle_since: float | None = None  # unix time the domain was last seen becoming idle
    extra: dict = field(default_factory=dict)  # port-specific facts (host pid, vCPU thread ids, ...)

    def to_json(self) -> dict:
        return asdict(self)


class Hypervisor(abc.ABC):
    """A port: QEMU (xenswap.hv.qemu) or Xen (xenswap.hv.xen)."""

    name: str = "abstract"

    @abc.abstractmethod
    def list_domains(self) -> list[DomainInfo]:
        """Every domain this port manages, in id order."""

    def lookup(self, ref: str | int) -> DomainInfo:
        """A domain by name or numeric id; UnknownDomain names the known ones."""
        domains = self.list_domains()
        for dom in domains:
            if dom.name == str(ref) or str(dom.domid) == str(ref):
                return dom
        raise UnknownDomain(str(ref), [d.name for d in domains])

    def is_managed(self, dom: DomainInfo) -> bool:
        """Whether the manager may page or share this domain (not, e.g., the control domain it runs in)."""
        return True

    @abc.abstractmethod
    def pause(self, ref: str | int) -> None: ...

    @abc.abstractmethod
    def unpause(self, ref: str | int) -> None: ...

    @abc.abstractmethod
    def vcpu_times(self, ref: str | int) -> list[float]:
        """Cumulative CPU seconds of each vCPU: what the scheduler-quantum idleness heuristic samples."""
