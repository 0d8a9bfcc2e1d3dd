"""``xenswap share``: predict and apply content-based page sharing across the QEMU port's guests.

``scan`` hashes every resident guest page (kernel module when loaded, else pagemap + /proc/PID/mem; paged-out
pages are never faulted back in) into a SharingIndex and prints what sharing would save; ``ksm`` drives the
kernel's merging and shows what it achieved, so prediction and result can be compared.
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
