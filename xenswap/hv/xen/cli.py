"""Xen-port commands: ``xenswap xen pause|unpause|vcpus DOM`` and ``xenswap xenstore read|write|ls|watch``."""

from __future__ import annotations

import argparse

from xenswap.cli import print_json, print_table


def _hv():
    from xenswap.hv.xen import open_hypervisor

    return open_hypervisor()


def cmd_pause(args: argparse.Namespace) -> int:
    _hv().pause(args.domain)
    return 0


def cmd_unpause(args: argparse.Namespace) -> int:
    _hv().unpause(args.domain)
    return 0


def cmd_vcpus(args: argparse.Namespace) -> int:
    times = _hv().vcpu_times(args.domain)
    if args.json:
        print_json([{"vcpu": i, "cpu_time_s": t} for i, t in enumerate(times)])
    else:
        print_table(["VCPU", "Time(s)"], [[i, f"{t:.2f}"] for i, t in enumerate(times)])
    return 0


def cmd_xs_read(args: argparse.Namespace) -> int:
    from xenswap.hv.xen.xenstore import XenStore, XenStoreError

    with XenStore() as store:
        value = store.read(args.path)
    if value is None:
        raise XenStoreError(f"xenstore path {args.path} does not exist")
    print(value)
    return 0


def cmd_xs_write(args: argparse.Namespace) -> int:
    from xenswap.hv.xen.xenstore import XenStore

    with XenStore() as store:
        store.write(args.path, args.value)
    return 0


def cmd_xs_ls(args: argparse.Namespace) -> int:
    from xenswap.hv.xen.xenstore import XenStore

    with XenStore() as store:
        names = store.list(args.path)
        rows = [[name, store.read(f"{args.path.rstrip('/')}/{name}")] for name in names]
    if args.json:
        print_json({name: value for name, value in rows})
    else:
        print_table(["Key", "Value"], rows)
    return 0


def cmd_xs_watch(args: argparse.Namespace) -> int:
    from xenswap.hv.xen.xenstore import XenStore

    with XenStore() as store, store.watch(args.path) as watch:
        watch.skip_initial()
        for count, (path, _token) in enumerate(watch.events(args.timeout), start=1):
            print(path, flush=True)
            if args.count and count >= args.count:
                break
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    xen = sub.add_parser("xen", help="Xen port (run in dom0): pause, unpause, vCPU times")
    xsub = xen.add_subparsers(dest="xen_command", metavar="ACTION", required=True)
    for name, handler in (("pause", cmd_pause), ("unpause", cmd_unpause)):
        p = xsub.add_parser(name, help=f"{name} a domain (name or id)")
        p.add_argument("domain", metavar="DOM")
        p.set_defaults(handler=handler)
    p = xsub.add_parser("vcpus", help="cumulative CPU seconds per vCPU")
    p.add_argument("domain", metavar="DOM")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_vcpus)

    xs = sub.add_parser("xenstore", help="read/write/list/watch xenstore keys (via xenstored's socket)")
    xssub = xs.add_subparsers(dest="xs_command", metavar="ACTION", required=True)
    p = xssub.add_parser("read")
    p.add_argument("path")
    p.set_defaults(handler=cmd_xs_read)
    p = xssub.add_parser("write")
    p.add_argument("path")
    p.add_argument("value")
    p.set_defaults(handler=cmd_xs_write)
    p = xssub.add_parser("ls")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_xs_ls)
    p = xssub.add_parser("watch", help="print each changed path until no event for --timeout seconds")
    p.add_argument("path")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--count", type=int, default=0, help="stop after this many events")
    p.set_defaults(handler=cmd_xs_watch)
