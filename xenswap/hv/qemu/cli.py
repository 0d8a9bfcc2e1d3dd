"""xl-style commands of the QEMU port: create, destroy, pause, unpause, console."""

from __future__ import annotations

import argparse
import sys

from xenswap.cli import print_json
from xenswap.hv.qemu.vm import QemuVM


def cmd_create(args: argparse.Namespace) -> int:
    vm = QemuVM.create(
        args.name, mem_mib=args.mem, ip=args.ip, gateway=args.gw, bridge=args.bridge, disk=args.disk,
        wait_up=not args.no_wait, timeout=args.timeout, network=not args.no_net,
    )
    facts = {"name": vm.name, "domid": vm.domid, "pid": vm.pid, "tap": vm.tap, "ip": vm.ip,
             "state_dir": str(vm.state_dir), "serial_log": str(vm.serial_log_path)}
    if args.json:
        print_json(facts)
    else:
        print(f"created {vm.name} (id {vm.domid}, pid {vm.pid}, tap {vm.tap or '-'}, ip {vm.ip or '-'})")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    QemuVM.open(args.dom).destroy()
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    QemuVM.open(args.dom).pause()
    return 0


def cmd_unpause(args: argparse.Namespace) -> int:
    QemuVM.open(args.dom).resume()
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    vm = QemuVM.open(args.dom)
    if args.command is None:
        if sys.stdin.isatty() and not args.log:
            print(f"console of {vm.name} (Ctrl-] leaves)", file=sys.stderr)
            vm.console.attach()
            print(file=sys.stderr)
        else:
            print(vm.console.tail(args.lines))
        return 0
    status, output = vm.console.run_status(args.command, timeout=args.timeout)
    sys.stdout.write(output)
    return status


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("create", help="boot a tiny guest under QEMU (TCG)")
    p.add_argument("name")
    p.add_argument("--mem", type=int, default=128, metavar="MiB", help="guest memory (default 128, minimum 96)")
    p.add_argument("--ip", metavar="CIDR", help="guest address, e.g. 10.0.0.2/24")
    p.add_argument("--gw", metavar="IP", help="guest's default gateway (routed tap: also the host's end)")
    p.add_argument("--bridge", metavar="BR", help="enslave the guest's tap to this host bridge")
    p.add_argument("--disk", metavar="SPEC", help="QEMU drive file/URI attached as virtio-blk (/dev/vda)")
    p.add_argument("--no-net", action="store_true", help="no network card")
    p.add_argument("--no-wait", action="store_true", help="return once QEMU runs, without waiting for boot")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the guest (default 120)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_create)

    for name, func, text in (
        ("destroy", cmd_destroy, "stop a guest and remove its tap and state"),
        ("pause", cmd_pause, "pause a guest's vCPUs"),
        ("unpause", cmd_unpause, "resume a paused guest"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("dom", metavar="DOM", help="name or id")
        p.set_defaults(handler=func)

    p = sub.add_parser("console", help="attach to a guest's serial console, or run one command on it (-c)")
    p.add_argument("dom", metavar="DOM", help="name or id")
    p.add_argument("-c", dest="command", metavar="CMD", help="shell command to run; exit status is the command's")
    p.add_argument("--timeout", type=float, default=30, help="seconds (default 30)")
    p.add_argument("--log", action="store_true", help="print the tail of the serial log instead of attaching")
    p.add_argument("--lines", type=int, default=20, help="log lines to show with --log (or without a terminal)")
    p.set_defaults(handler=cmd_console)
