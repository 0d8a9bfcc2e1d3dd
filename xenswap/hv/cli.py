"""``xenswap list``: xl's columns plus xenswap's own, for whichever port runs here."""

from __future__ import annotations

import argparse
import time

from xenswap.cli import print_json, print_table
from xenswap.core.policy import fill_domain_info
from xenswap.hv import select_hypervisor

HEADERS = ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)", "Res(MiB)", "WSS(MiB)", "Idle(s)"]


def _fmt(value: float | None, digits: int = 1) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def cmd_list(args: argparse.Namespace) -> int:
    hv = select_hypervisor(args.hv)
    domains = [hv.lookup(ref) for ref in args.domains] if args.domains else hv.list_domains()
    domains = fill_domain_info(domains)  # the manager's figures, from its state store
    if args.json:
        print_json([d.to_json() for d in domains])
        return 0
    now = time.time()
    rows = [
        [
            d.name,
            d.domid,
            d.mem_mib,
            d.vcpus,
            d.state,
            _fmt(d.cpu_time_s),
            _fmt(d.resident_mib),
            _fmt(d.wss_mib),
            None if d.idle_since is None else int(now - d.idle_since),
        ]
        for d in domains
    ]
    print_table(HEADERS, rows)
    return 0


def add_hv_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hv", choices=["auto", "qemu", "xen"], default="auto",
        help="hypervisor port (auto: xen when this is a Xen dom0, else qemu)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list domains (xl columns + resident/working-set/idle)")
    p.add_argument("domains", nargs="*", metavar="DOM", help="name or id; default all")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_hv_argument(p)
    p.set_defaults(handler=cmd_list)
