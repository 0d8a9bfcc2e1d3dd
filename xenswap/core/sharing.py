"""Content-based sharing index: which pages of which VMs are identical, and what sharing them would save.

Pure engine (no I/O): it takes per-VM page hashes (from xenswap.hv.pagehash or a Xen foreign-mapping
hasher) and answers what a sharer needs: candidate groups to confirm byte-by-byte and merge copy-on-write,
and the expected savings, split the way the literature reports them (zero pages, sharing within one VM,
sharing across VMs; Barker et al. ATC'12 found ~85% of sharing is within one VM).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PAGE = 4096
ABSENT, HASHED, ZERO = 0, 1, 2  # same codes as xenswap.hv.pagehash


@dataclass(frozen=True)
class PageRef:
    vm: str
    index: int  # page number within the VM's memory (guest frame number for guest RAM)


@dataclass
class SharingStats:
    vms: int
    resident_pages: int
    zero_pages: int
    unique_contents: int  # distinct non-zero contents
    shareable_pages: int  # pages that could be freed: every copy beyond the first of each content (zero included)
    self_shareable: int  # ... of which within a single VM
    cross_shareable: int  # ... of which only across VMs

    @property
    def saving_mib(self) -> float:
        return self.shareable_pages * PAGE / 2**20

    @property
    def saving_fraction(self) -> float:
        return self.shareable_pages / self.resident_pages if self.resident_pages else 0.0

    def to_json(self) -> dict:
        return {**self.__dict__, "saving_mib": round(self.saving_mib, 2), "saving_fraction": self.saving_fraction}


class SharingIndex:
    """hash → pages holding that content, over any number of VMs. Re-adding a VM replaces its pages."""

    def __init__(self) -> None:
        self._by_hash: dict[int, list[PageRef]] = defaultdict(list)
        self._zero_hashes: set[int] = set()
        self._vm_pages: dict[str, list[tuple[int, int]]] = {}

    def add_vm(self, vm: str, hashes: Sequence[int], status: Sequence[int] | bytes, first_index: int = 0) -> None:
        if vm in self._vm_pages:
            self.remove_vm(vm)
        pages = []
        for offset, (h, s) in enumerate(zip(hashes, status, strict=True)):
            if s == ABSENT:
                continue
            ref = PageRef(vm, first_index + offset)
            self._by_hash[h].append(ref)
            if s == ZERO:
                self._zero_hashes.add(h)
            pages.append((h, ref.index))
        self._vm_pages[vm] = pages

    def remove_vm(self, vm: str) -> None:
        for h, _ in self._vm_pages.pop(vm, []):
            refs = [r for r in self._by_hash[h] if r.vm != vm]
            if refs:
                self._by_hash[h] = refs
            else:
                del self._by_hash[h]
                self._zero_hashes.discard(h)

    def candidates(self, min_copies: int = 2, cross_vm_only: bool = False) -> Iterable[list[PageRef]]:
        """Groups of pages with equal hashes, largest first. A hash match is only a candidate: the sharer must
        compare the bytes before merging (a 64-bit hash collision must never merge two different pages)."""
        groups = [refs for refs in self._by_hash.values() if len(refs) >= min_copies]
        if cross_vm_only:
            groups = [refs for refs in groups if len({r.vm for r in refs}) > 1]
        return sorted(groups, key=len, reverse=True)

    def stats(self) -> SharingStats:
        resident = zero = unique = shareable = self_share = cross = 0
        for h, refs in self._by_hash.items():
            n = len(refs)
            resident += n
            if h in self._zero_hashes:
                zero += n
            else:
                unique += 1
            shareable += n - 1
            per_vm: dict[str, int] = defaultdict(int)
            for r in refs:
                per_vm[r.vm] += 1
            # within each VM all but one copy can go; what remains (one per VM) collapses across VMs
            within = sum(c - 1 for c in per_vm.values())
            self_share += within
            cross += len(per_vm) - 1
        return SharingStats(len(self._vm_pages), resident, zero, unique, shareable, self_share, cross)
