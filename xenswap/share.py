"""``xenswap share``: predict and apply content-based page sharing across guests.

QEMU port: ``scan`` hashes every resident guest page (kernel module when loaded, else pagemap + /proc/PID/mem;
paged-out pages are never faulted back in) into a SharingIndex and prints what sharing would save; ``ksm`` drives
the kernel's merging and shows what it achieved, so prediction and result can be compared.

Xen port (dom0): ``xen`` hashes the guests' frames through foreign mappings, verifies candidates byte by byte
and shares them copy-on-write in Xen (xenswap.hv.xen.sharer); it prints the prediction next to what Xen freed.
"""

from __future__ import annotations

import argparse

from xenswap.cli import print_json, print_table
from xenswap.core.sharing import SharingIndex
from xenswap.hv import ksm
from xenswap.hv.pagehash import PAGE, PageHasher


def scan_qemu_guests(names: list[str] | None = None) -> SharingIndex:
    from xenswap.hv.qemu import QemuVM, open_hypervisor

    hv = open_hypervisor()
    domains = [hv.lookup(n) for n in names] if names else hv.list_domains()
    hasher = PageHasher()
    index = SharingIndex()
    for dom in domains:
        vm = QemuVM.open(dom.name)
        address, length = vm.ram_region()
        result = hasher.hash_range(vm.pid, address, length // PAGE)
        index.add_vm(dom.name, result.hashes, result.status)
    return index


def cmd_scan(args: argparse.Namespace) -> int:
    stats = scan_qemu_guests(args.domains).stats()
    if args.json:
        print_json(stats.to_json())
    else:
        print_table(
            ["VMs", "Resident", "Zero", "Unique", "Shareable", "Self", "Cross", "Saving(MiB)", "Saving(%)"],
            [[stats.vms, stats.resident_pages, stats.zero_pages, stats.unique_contents, stats.shareable_pages,
              stats.self_shareable, stats.cross_shareable, f"{stats.saving_mib:.1f}",
              f"{100 * stats.saving_fraction:.1f}"]],
        )
    return 0


def cmd_ksm(args: argparse.Namespace) -> int:
    if args.action == "on":
        ksm.start(args.pages_to_scan, args.sleep_ms)
    elif args.action == "off":
        ksm.stop(unmerge=args.unmerge)
    st = ksm.status()
    if args.json:
        print_json(st.to_json())
    else:
        print_table(["Run", "Shared", "Sharing", "Unshared", "Scans", "Saved(MiB)"],
                    [[st.run, st.pages_shared, st.pages_sharing, st.pages_unshared, st.full_scans,
                      f"{st.saved_mib:.1f}"]])
    return 0


def xen_share_targets(hv, names: list[str]) -> list[int]:
    """Domain ids to share between: the named ones, else every running HVM/PVH guest (PV ones cannot share)."""
    if names:
        return [hv.lookup(name).domid for name in names]
    return [d.domid for d in hv.list_domains() if d.domid != 0 and d.extra.get("hvm") and d.state[3:] == "---"]


def cmd_xen(args: argparse.Namespace) -> int:
    from xenswap.errors import XenswapError
    from xenswap.hv.xen import open_hypervisor
    from xenswap.hv.xen.sharer import XenSharer

    hv = open_hypervisor()
    try:
        domids = xen_share_targets(hv, args.domains)
    finally:
        hv.close()
    if not domids:
        raise XenswapError("no HVM/PVH guests running to share pages between (PV guests cannot share in Xen)")
    with XenSharer(batch=args.batch) as sharer:
        report = sharer.share(domids, cross_only=args.cross_only)
    if args.json:
        print_json(report.to_json())
        return 0
    p = report.predicted
    assert p is not None
    print_table(
        ["Domains", "Scanned", "Mapped", "Zero", "Predicted", "Self", "Cross", "Merged", "Freed", "Saved(MiB)",
         "Hash(s)", "Share(s)"],
        [[",".join(map(str, report.domains)), report.scanned_pages, report.mapped_pages, p.zero_pages,
          p.shareable_pages, p.self_shareable, p.cross_shareable, report.pages_merged, report.freed_frames,
          f"{report.saved_mib:.1f}", f"{report.hash_seconds:.1f}", f"{report.share_seconds:.1f}"]],
    )
    skipped = {**{f"nominate {k}": v for k, v in report.nominate_failed.items()},
               **{f"share {k}": v for k, v in report.share_failed.items()}}
    if report.content_mismatch or report.changed_before_share or report.unsafe_skipped or skipped:
        print(f"not merged: {report.content_mismatch} content differed, {report.changed_before_share} written "
              f"before sharing, {report.unsafe_skipped} frames spanning too many domains"
              + "".join(f", {v} {k}" for k, v in sorted(skipped.items())))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    share = sub.add_parser("share", help="content-based page sharing across guests").add_subparsers(
        dest="share_command", metavar="ACTION", required=True)
    p = share.add_parser("scan", help="hash resident guest pages and predict what sharing saves")
    p.add_argument("domains", nargs="*", metavar="DOM")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_scan)
    p = share.add_parser("ksm", help="control the kernel's merging (on/off/status)")
    p.add_argument("action", choices=["on", "off", "status"])
    p.add_argument("--pages-to-scan", type=int, default=1000)
    p.add_argument("--sleep-ms", type=int, default=20)
    p.add_argument("--unmerge", action="store_true", help="with off: break all merged pages")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_ksm)
    p = share.add_parser("xen", help="Xen dom0: share identical pages of guests copy-on-write (memshr)")
    p.add_argument("domains", nargs="*", metavar="DOM", help="names or ids (default: every running PVH/HVM guest)")
    p.add_argument("--cross-only", action="store_true", help="only pages with copies in more than one domain")
    p.add_argument("--batch", type=int, default=1024, help="frames per foreign mapping")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_xen)

    # The daemon's xenstore interface (request/policy/status) lives with the Xen automation.
    from xenswap.hv.xen.automation import register_commands

    register_commands(sub)
