"""The dom0 sharer: find identical pages across (and within) Xen domains and share them copy-on-write in Xen.

One pass over a set of domains:

1. **hash**: map each domain's guest frames read-only in batches (``ForeignMemory.map``), xxh64 every mapped page
   in place, unmap. Frames Xen will not map (holes, paged out, special pages) are skipped;
2. **index**: feed the hashes to :class:`xenswap.core.sharing.SharingIndex` (the same engine the QEMU port's
   ``xenswap share scan`` uses), which gives candidate groups and the predicted saving (zero / self / cross);
3. **nominate**: ``xc_memshr_nominate_gfn`` every page of a candidate group. From here on the page is read-only
   to its guest: a guest write unshares it and invalidates its handle;
4. **verify**: map the nominated pages read-only again and compare their bytes with the group's source page.
   Only equal pages go on: a 64-bit hash collision, or a page written between hashing and nomination, is
   never merged. Comparing *after* nomination closes the race: a write after the comparison invalidates the
   handle, and the share below then fails instead of merging different contents;
5. **share**: ``xc_memshr_share_gfns(source, client)`` for every other page of the group; Xen frees the client's
   frame and maps the source's frame read-only in its place (copy-on-write).

Savings are read back from Xen (``xc_sharing_freed_pages``: frames freed by sharing; ``xc_sharing_used_frames``:
frames backing shared pages), so the report is what Xen did, not what we hoped.

Xen 4.17 shares pages of HVM/PVH domains with HAP only; ``memshr_control`` says why it refuses otherwise
(see :func:`explain_control_error`).
"""

from __future__ import annotations

import array
import errno
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from xenswap.config import run_dir
from xenswap.core.sharing import ABSENT, HASHED, ZERO, PageRef, SharingIndex, SharingStats
from xenswap.errors import XenswapError
from xenswap.hv.xen import bindings

PAGE = bindings.PAGE_SIZE
ZERO_PAGE = bytes(PAGE)
ZERO_HASH = xxhash.xxh64_intdigest(ZERO_PAGE)
FOUR_GIB_GFN = 2**32 // PAGE
DEFAULT_BATCH = 1024  # frames per foreign mapping: one privcmd call, 4 MiB of dom0 address space

# share_gfns returns these (negated into errno by libxenctrl) when a handle no longer matches its page:
# the guest wrote the page after it was nominated, so it was unshared. Not an error: that page stays private.
SOURCE_HANDLE_INVALID = 10  # XENMEM_SHARING_OP_S_HANDLE_INVALID
CLIENT_HANDLE_INVALID = 9  # XENMEM_SHARING_OP_C_HANDLE_INVALID


class SharingRefused(XenswapError):
    pass


def explain_control_error(domid: int, error: OSError) -> str:
    """Why Xen refused ``memshr_control(domid, on)``, in words (mem_sharing_control() in Xen 4.17)."""
    reasons = {
        errno.ENOSYS: "the hypervisor was built without CONFIG_MEM_SHARING (stock Debian Xen): boot the patched "
                      "build from hypervisor-patches/",
        errno.EOPNOTSUPP: "the domain is not HVM/PVH (PV guests cannot share pages), or the CPU lacks VMX and the "
                          "hypervisor lacks hypervisor-patches' 'allow sharing on AMD NPT' patch",
        errno.ENODEV: "the domain does not use hardware-assisted paging (HAP: EPT/NPT)",
        errno.EXDEV: "the domain has an IOMMU (passthrough) enabled",
        errno.ESRCH: "no such domain",
    }
    reason = reasons.get(error.errno, error.strerror or "unknown error")
    return f"Xen refuses page sharing for domain {domid}: {reason} ({_errname(error.errno)})"


@dataclass
class DomainScan:
    domid: int
    first_gfn: int
    hashes: array.array  # 'Q' per frame from first_gfn
    status: bytearray  # ABSENT / HASHED / ZERO per frame
    unmappable: Counter = field(default_factory=Counter)  # errno name -> frames Xen would not map

    @property
    def scanned(self) -> int:
        return len(self.status)

    @property
    def mapped(self) -> int:
        return sum(1 for s in self.status if s != ABSENT)


@dataclass
class ShareReport:
    """What one pass did. ``predicted`` is the index's view before sharing; the rest is what Xen did."""

    domains: list[int]
    scanned_pages: int = 0
    mapped_pages: int = 0
    unmappable: dict[str, int] = field(default_factory=dict)
    predicted: SharingStats | None = None
    groups: int = 0
    nominated: int = 0
    nominate_failed: dict[str, int] = field(default_factory=dict)
    content_mismatch: int = 0  # equal hashes, different bytes (collision or written since hashing): not merged
    shared: int = 0  # successful share_gfns calls: each merged one client frame into its group's source frame
    shared_zero: int = 0  # ... of which of zero pages
    shared_cross: int = 0  # ... of which the client frame held pages of another domain than the source's page
    pages_merged: int = 0  # guest pages moved onto a source frame by those calls
    already_shared: int = 0  # pages found on their group's source frame already (an earlier pass shared them)
    changed_before_share: int = 0  # the handle went stale (guest wrote the page after nomination)
    unsafe_skipped: int = 0  # frames left alone: merging them would make Xen 4.17 BUG() (see merge_order)
    share_failed: dict[str, int] = field(default_factory=dict)
    freed_frames_before: int = 0  # Xen-wide xc_sharing_freed_pages before and after the pass
    freed_frames_after: int = 0
    shared_frames_after: int = 0  # Xen-wide frames backing shared pages (xc_sharing_used_frames)
    audit_errors: int | None = None  # xc_memshr_audit; None: not compiled in (release builds of Xen)
    hash_seconds: float = 0.0
    share_seconds: float = 0.0

    @property
    def freed_frames(self) -> int:
        return self.freed_frames_after - self.freed_frames_before

    @property
    def saved_mib(self) -> float:
        return self.freed_frames * PAGE / 2**20

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "predicted"}
        out["predicted"] = self.predicted.to_json() if self.predicted else None
        out["freed_frames"] = self.freed_frames
        out["saved_mib"] = round(self.saved_mib, 2)
        return out


def domain_of(ref: PageRef) -> int:
    """The domid of an index entry (keys are "<domid>" or "<domid>@<first gfn>" for RAM above 4 GiB)."""
    return int(ref.vm.partition("@")[0])


def _errname(code: int) -> str:
    if code == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"  # Linux's errorcode table calls 95 ENOTSUP; Xen's sources say EOPNOTSUPP
    return errno.errorcode.get(code, str(code))


@dataclass
class Frame:
    """One Xen frame among a group's pages: the (domid, gfn) pages that nominate_gfn gave the same handle."""

    handle: int
    pages: list[tuple[int, int]]

    @property
    def domains(self) -> set[int]:
        return {domid for domid, _ in self.pages}


def merge_order(source: Frame, clients: Sequence[Frame], report: ShareReport
                 ) -> Iterator[tuple[Frame, tuple[int, int], tuple[int, int]]]:
    """(client frame, source page, client page) for each client frame that is safe to merge into source.

    Xen 4.17's share_pages() locks the p2m of the source and the client page's domains, then rewrites the p2m
    entry of *every* page on the client frame; a page of a third domain takes that domain's p2m lock out of
    order and the hypervisor BUG()s ("mm locking order violation: 24 > 16", measured in the rig). So a client
    frame already shared by earlier passes may span at most the two domains whose pages are named in the
    call: one page of the client frame in one of them, a page of the source frame in the other."""
    for client in clients:
        domains = client.domains
        if len(domains) == 1:
            yield client, source.pages[0], client.pages[0]
            continue
        pick = None
        if len(domains) == 2:
            for domid in domains:
                source_page = next((p for p in source.pages if p[0] == domid), None)
                if source_page is not None:
                    other = next(p for p in client.pages if p[0] != domid)
                    pick = (client, source_page, other)
                    break
        if pick is None:
            report.unsafe_skipped += 1
            continue
        yield pick


def group_chunks(groups: list[list[PageRef]], batch: int) -> Iterator[list[list[PageRef]]]:
    """Whole groups, packed into chunks of about ``batch`` pages (a bigger group is a chunk of its own): a group
    is never split, so all its pages on one Xen frame are seen together (see ``merge_order``)."""
    chunk: list[list[PageRef]] = []
    size = 0
    for group in groups:
        chunk.append(group)
        size += len(group)
        if size >= batch:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class SharingRegistry:
    """The domains this host's sharer has enabled sharing for (file in the run dir: Xen's sharing state does
    not outlive the host either). Each pass hashes all of them, so frames shared with any of them are seen
    whole. Entries are keyed by domid and checked against the domain's UUID (domids are reused)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or run_dir() / "xen-sharing.json"

    def _load(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, entries: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, sort_keys=True))
        tmp.replace(self.path)

    def add(self, domid: int) -> None:
        entries = self._load()
        uuid = _domain_uuid(domid)
        if uuid is not None and entries.get(str(domid)) != uuid:
            entries[str(domid)] = uuid
            self._save(entries)

    def live_domains(self) -> list[int]:
        """Registered domains still running as the same domain; stale entries are dropped."""
        entries = self._load()
        live = {k: v for k, v in entries.items() if _domain_uuid(int(k)) == v}
        if live != entries:
            self._save(live)
        return sorted(int(k) for k in live)


def _domain_uuid(domid: int) -> str | None:
    from xenswap.hv.xen import domain_record

    info = domain_record(domid)
    if info is None or info.get("dying"):
        return None
    return bytes(info["handle"]).hex()


class XenSharer:
    """Hash, verify and share pages of running domains. Needs dom0 with the Xen bindings built.

    ``ctrl`` / ``fmem`` default to fresh libxenctrl / libxenforeignmemory handles (``close()`` them with the
    sharer). ``skip`` maps domid -> gfns never to map: a paging pager's evicted frames, since mapping a paged-out
    frame makes Xen page it back in."""

    def __init__(self, ctrl=None, fmem=None, batch: int = DEFAULT_BATCH,
                 skip: dict[int, Iterable[int]] | None = None) -> None:
        xc = bindings.load()
        self._own = ctrl is None, fmem is None
        self.ctrl = ctrl if ctrl is not None else bindings.open_xenctrl()
        try:
            self.fmem = fmem if fmem is not None else xc.ForeignMemory()
        except OSError as error:
            raise XenswapError(f"cannot open libxenforeignmemory ({error.strerror}): run this in dom0") from error
        self.batch = batch
        self.skip = {domid: set(gfns) for domid, gfns in (skip or {}).items()}

    def close(self) -> None:
        if self._own[1]:
            self.fmem.close()
        if self._own[0]:
            self.ctrl.close()

    def __enter__(self) -> XenSharer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ control

    def enable(self, domid: int) -> None:
        try:
            self.ctrl.memshr_control(domid, True)
        except OSError as error:
            raise SharingRefused(explain_control_error(domid, error)) from error

    def guest_ranges(self, domid: int, max_pages: int | None = None) -> list[range]:
        """The gfn ranges holding the guest's RAM: [0, maxmem) and, for a guest with RAM above 4 GiB, the same
        amount from gfn 4 GiB on (libxl's layout; what lies between is the MMIO hole). Not beyond
        max_gpfn, and not the special pages Xen puts just below 4 GiB for PVH guests: backends in dom0 map
        those (console, xenstore rings), so they could not be shared anyway."""
        end = self.ctrl.domain_maximum_gpfn(domid) + 1
        pages = self._maxmem_pages(domid) if max_pages is None else max_pages
        ranges = [range(0, min(end, pages))]
        if end > FOUR_GIB_GFN:
            ranges.append(range(FOUR_GIB_GFN, min(end, FOUR_GIB_GFN + pages)))
        return ranges

    @staticmethod
    def _maxmem_pages(domid: int) -> int:
        from xenswap.hv.xen import existing_domain_record

        return int(existing_domain_record(domid)["maxmem_kb"]) * 1024 // PAGE

    # ------------------------------------------------------------------ 1. hash

    def _chunks(self, gfns: Sequence[int]) -> Iterator[list[int]]:
        for start in range(0, len(gfns), self.batch):
            yield list(gfns[start:start + self.batch])

    def hash_domain(self, domid: int, gfns: range) -> DomainScan:
        hashes = array.array("Q", bytes(8 * len(gfns)))
        status = bytearray(len(gfns))
        scan = DomainScan(domid, gfns.start, hashes, status)
        skip = self.skip.get(domid, set())
        for chunk in self._chunks(gfns):
            wanted = [g for g in chunk if g not in skip] if skip else chunk
            if not wanted:
                continue
            try:
                mapping = self.fmem.map(domid, wanted)
            except OSError as error:
                scan.unmappable[_errname(error.errno)] += len(wanted)
                continue
            with mapping:
                view = memoryview(mapping)
                try:
                    for i, (gfn, err) in enumerate(zip(wanted, mapping.errors, strict=True)):
                        if err:
                            scan.unmappable[_errname(err)] += 1
                            continue
                        page = view[i * PAGE:(i + 1) * PAGE]
                        h = xxhash.xxh64_intdigest(page)
                        index = gfn - gfns.start
                        hashes[index] = h
                        status[index] = ZERO if h == ZERO_HASH and page == ZERO_PAGE else HASHED
                        page.release()
                finally:
                    view.release()
        return scan

    # ------------------------------------------------------------------ 2-5. nominate, verify, share

    def share(self, domids: Sequence[int], cross_only: bool = False, max_pages: dict[int, int] | None = None
              ) -> ShareReport:
        """One full pass over ``domids`` (at least one; self-sharing within one domain counts too).

        Every other domain this host's sharer enabled sharing for before is hashed and nominated too: a frame
        shared with such a domain must be seen whole by the pass (see ``merge_order``). Their pages are only
        moved together with a target domain's page already on the same frame, never merged anew."""
        if not domids:
            raise XenswapError("no domains to share pages between")
        report = ShareReport(list(domids))
        registry = SharingRegistry()
        for domid in domids:
            self.enable(domid)
            registry.add(domid)
        visible = list(domids) + [d for d in registry.live_domains() if d not in domids]
        started = time.monotonic()
        index = SharingIndex()
        unmappable: Counter = Counter()
        for domid in visible:
            for number, gfns in enumerate(self.guest_ranges(domid, (max_pages or {}).get(domid))):
                scan = self.hash_domain(domid, gfns)
                # one index entry per range (SharingIndex.add_vm replaces a VM's pages); the key says the domain
                index.add_vm(f"{domid}" if number == 0 else f"{domid}@{gfns.start:#x}", scan.hashes,
                             bytes(scan.status), scan.first_gfn)
                if domid in domids:
                    report.scanned_pages += scan.scanned
                    report.mapped_pages += scan.mapped
                    unmappable.update(scan.unmappable)
        report.unmappable = dict(unmappable)
        report.predicted = index.stats()
        report.hash_seconds = time.monotonic() - started

        started = time.monotonic()
        report.freed_frames_before = self.ctrl.sharing_freed_pages()
        groups = list(index.candidates(min_copies=2, cross_vm_only=cross_only))
        report.groups = len(groups)
        nominate_failed: Counter = Counter()
        share_failed: Counter = Counter()
        for chunk in group_chunks(groups, self.batch):
            self._share_chunk(chunk, set(domids), report, nominate_failed, share_failed)
        report.nominate_failed = dict(nominate_failed)
        report.share_failed = dict(share_failed)
        report.freed_frames_after = self.ctrl.sharing_freed_pages()
        report.shared_frames_after = self.ctrl.sharing_used_frames()
        report.audit_errors = self.audit()
        report.share_seconds = time.monotonic() - started
        return report

    def _share_chunk(self, chunk: list[list[PageRef]], targets: set[int], report: ShareReport,
                     nominate_failed: Counter, share_failed: Counter) -> None:
        # 3. nominate: every page of a group, grouped by the frame Xen has it on (its handle)
        groups: list[list[Frame]] = []
        for group in chunk:
            frames: dict[int, Frame] = {}
            for ref in group:
                domid = domain_of(ref)
                try:
                    handle = self.ctrl.memshr_nominate_gfn(domid, ref.index)
                except OSError as error:
                    nominate_failed[_errname(error.errno)] += 1
                    continue
                report.nominated += 1
                frames.setdefault(handle, Frame(handle, [])).pages.append((domid, ref.index))
            # Only frames holding a page of a target domain take part: pages of the other (visible) domains
            # move only together with target pages they already share a frame with.
            ordered = sorted((f for f in frames.values() if f.domains & targets), key=lambda f: len(f.pages),
                             reverse=True)
            if ordered:
                report.already_shared += len(ordered[0].pages) - 1
                if len(ordered) >= 2:
                    groups.append(ordered)
        if not groups:
            return
        # 4. verify the bytes, now that the pages are read-only to their guests
        verified = self._verify(groups, report)
        # 5. merge every client frame into its group's source frame
        for frames, zero in verified:
            source = frames[0]
            for client, source_page, client_page in merge_order(source, frames[1:], report):
                try:
                    self.ctrl.memshr_share_gfns(source_page[0], source_page[1], source.handle,
                                                client_page[0], client_page[1], client.handle)
                except OSError as error:
                    if error.errno in (SOURCE_HANDLE_INVALID, CLIENT_HANDLE_INVALID):
                        report.changed_before_share += 1
                    else:
                        share_failed[_errname(error.errno)] += 1
                    continue
                source.pages.extend(client.pages)
                report.shared += 1
                report.pages_merged += len(client.pages)
                report.shared_zero += zero
                report.shared_cross += any(domid != source_page[0] for domid, _ in client.pages)

    def _map_pages(self, pages: Iterable[tuple[int, int]]) -> Iterator[tuple[tuple[int, int], memoryview]]:
        """(page, its bytes) for each (domid, gfn) Xen lets us map read-only; the view is only valid until the
        next item (its mapping is unmapped batch by batch)."""
        by_domain: dict[int, list[int]] = {}
        for domid, gfn in pages:
            by_domain.setdefault(domid, []).append(gfn)
        for domid, gfns in by_domain.items():
            for chunk in self._chunks(gfns):
                try:
                    mapping = self.fmem.map(domid, chunk)
                except OSError:
                    continue  # unverifiable: these pages drop out
                with mapping:
                    view = memoryview(mapping)
                    try:
                        for i, (gfn, err) in enumerate(zip(chunk, mapping.errors, strict=True)):
                            if not err:
                                page = view[i * PAGE:(i + 1) * PAGE]
                                yield (domid, gfn), page
                                page.release()
                    finally:
                        view.release()

    def _verify(self, groups: list[list[Frame]], report: ShareReport) -> list[tuple[list[Frame], bool]]:
        """Each group cut down to the frames whose bytes equal its source frame's; (frames, is_zero) pairs.
        One page per frame is enough: every page on a frame is that frame. Only the source pages are copied;
        the others are compared in place."""
        references = {page: bytes(data) for page, data in self._map_pages(frames[0].pages[0] for frames in groups)}
        expected: dict[tuple[int, int], bytes] = {}
        for frames in groups:
            reference = references.get(frames[0].pages[0])
            if reference is not None:
                for frame in frames[1:]:
                    expected[frame.pages[0]] = reference
        equal = {page for page, data in self._map_pages(expected) if data == expected[page]}
        result = []
        for frames in groups:
            reference = references.get(frames[0].pages[0])
            kept = [frames[0]] + [f for f in frames[1:] if reference is not None and f.pages[0] in equal]
            report.content_mismatch += len(frames) - len(kept)
            if len(kept) >= 2:
                result.append((kept, reference == ZERO_PAGE))
        return result

    # ------------------------------------------------------------------ figures

    def audit(self) -> int | None:
        """Xen's sharing audit (errors found, 0 = consistent); None when the hypervisor has it compiled out."""
        try:
            return self.ctrl.memshr_audit()
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return None
            raise


def sharing_totals(ctrl=None) -> dict[str, int]:
    """Xen-wide sharing figures: frames freed by sharing and frames backing shared pages (``xl info``'s
    sharing_freed_memory / sharing_used_memory, in pages)."""
    own = ctrl is None
    ctrl = ctrl if ctrl is not None else bindings.open_xenctrl()
    try:
        return {"freed_frames": ctrl.sharing_freed_pages(), "shared_frames": ctrl.sharing_used_frames()}
    finally:
        if own:
            ctrl.close()
