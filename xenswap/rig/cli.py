"""``xenswap rig boot|run|shell|stop|status|image``: a nested Xen rig kept running in the background (state in
run_dir()/rig), so a developer can run several commands against one boot."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from xenswap.cli import print_json, print_table


def _guest_env(rig) -> dict[str, str]:
    """Where dom0 finds the tiny guest image (built on the host, seen through the cache share)."""
    from xenswap.guest.image import build_guest_image

    image = build_guest_image()
    return {"XENSWAP_GUEST_KERNEL": rig.dom0_path(image.kernel), "XENSWAP_GUEST_INITRD": rig.dom0_path(image.initrd)}


def cmd_boot(args: argparse.Namespace) -> int:
    from xenswap.rig import Rig

    if args.xen == "patched" and args.xen_path is None:
        from xenswap.rig.rig import patched_hypervisor

        args.xen_path = patched_hypervisor()  # builds (cached) first
        print(f"patched hypervisor: {args.xen_path}")
    rig = Rig.boot(xen=args.xen, xen_path=args.xen_path, timeout=args.timeout, detach=True, smp=args.smp,
                   state_dir=args.state_dir,
                   memory_mib=args.memory, dom0_mem_mib=args.dom0_mem)
    if args.guest_image:
        try:
            rig.set_env(**_guest_env(rig))
        except BaseException:
            rig.shutdown()
            raise
    print(f"rig up in {rig.boot_seconds:.1f} s with {args.xen_path or 'stock'} hypervisor (QEMU pid {rig.pid}, "
          f"serial log {rig.serial_log}); "
          f"'xenswap rig run CMD' runs in dom0, 'xenswap rig stop' ends it")
    return 0


def _stream(chunk: bytes) -> None:
    sys.stdout.write(chunk.decode(errors="replace"))
    sys.stdout.flush()


def cmd_run(args: argparse.Namespace) -> int:
    from xenswap.rig import Rig

    rig = Rig.attach(args.state_dir)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd  # `xenswap rig run -- CMD` too
    rc, _out = rig.run(" ".join(cmd), timeout=args.timeout, cwd=args.cwd, on_output=_stream)
    return rc


def cmd_shell(args: argparse.Namespace) -> int:
    """A line-at-a-time shell: each line runs as its own command in dom0 (no tty: no full-screen programs)."""
    from xenswap.rig import Rig

    rig = Rig.attach(args.state_dir)
    rc = 0
    while True:
        if sys.stdin.isatty():
            sys.stdout.write("dom0# ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return rc
        if line.strip() in ("exit", "logout"):
            return rc
        if line.strip():
            rc, _out = rig.run(line, timeout=args.timeout, cwd=args.cwd, on_output=_stream)


def cmd_stop(args: argparse.Namespace) -> int:
    from xenswap.rig import Rig, RigNotRunning

    try:
        rig = Rig.attach(args.state_dir)
    except RigNotRunning:
        print("no rig running")
        return 0
    rig.shutdown()
    print(f"rig stopped (QEMU pid {rig.pid})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from xenswap.rig.rig import _pid_is_rig, _read_state, default_state_dir

    state_dir = args.state_dir or default_state_dir()
    state = _read_state(state_dir) or {}
    running = bool(state) and _pid_is_rig(int(state.get("pid", 0)), state_dir)
    status = {
        "running": running,
        "pid": state.get("pid") if running else None,
        "uptime_s": round(time.time() - state["started"], 1) if running and "started" in state else None,
        "boot_seconds": state.get("boot_seconds"),
        "xen": state.get("xen"),
        "xen_kind": state.get("xen_kind"),
        "state_dir": str(state_dir),
        "env": state.get("env") or {},
    }
    if args.json:
        print_json(status)
    else:
        print_table(["Key", "Value"], [[k, v] for k, v in status.items() if k != "env"])
    return 0 if running else 3


def cmd_image(args: argparse.Namespace) -> int:
    from xenswap.rig.image import build_rig_image

    image = build_rig_image(force=args.force)
    info = {k: str(v) for k, v in image.__dict__.items()}
    if args.json:
        print_json(info)
    else:
        print_table(["Key", "Value"], list(info.items()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    rig = sub.add_parser("rig", help="nested Xen rig: Xen 4.17 in QEMU (TCG), commands run in its dom0")
    rsub = rig.add_subparsers(dest="rig_command", metavar="ACTION", required=True)

    p = rsub.add_parser("boot", help="boot a rig in the background and wait for dom0")
    p.add_argument("--xen", choices=["stock", "patched"], default="stock",
                   help="Debian's hypervisor (default) or ours from hypervisor-patches/ (built first if not cached)")
    p.add_argument("--xen-path", type=Path, default=None, help="boot this hypervisor ELF instead of Debian's")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for dom0 (default 300)")
    p.add_argument("--smp", type=int, default=2)
    p.add_argument("--memory", type=int, default=2048, help="MiB for the whole nested machine")
    p.add_argument("--dom0-mem", type=int, default=1024, help="MiB for dom0")
    p.add_argument("--no-guest-image", dest="guest_image", action="store_false",
                   help="do not build the tiny guest image for dom0 (XENSWAP_GUEST_KERNEL/INITRD)")
    p.add_argument("--state-dir", type=Path, default=None, help="the rig's state folder (default: run dir/rig)")
    p.set_defaults(handler=cmd_boot)

    p = rsub.add_parser("run", help="run a shell command in dom0 (cwd: the checkout); exits with its status")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--cwd", default="/mnt/checkout")
    p.add_argument("--state-dir", type=Path, default=None, help="the rig's state folder (default: run dir/rig)")
    p.set_defaults(handler=cmd_run)

    p = rsub.add_parser("shell", help="read commands from stdin, run each in dom0")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--cwd", default="/mnt/checkout")
    p.add_argument("--state-dir", type=Path, default=None, help="the rig's state folder (default: run dir/rig)")
    p.set_defaults(handler=cmd_shell)

    p = rsub.add_parser("stop", help="stop the background rig")
    p.add_argument("--state-dir", type=Path, default=None, help="the rig's state folder (default: run dir/rig)")
    p.set_defaults(handler=cmd_stop)

    p = rsub.add_parser("status", help="is a rig running (exit 3 if not)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--state-dir", type=Path, default=None, help="the rig's state folder (default: run dir/rig)")
    p.set_defaults(handler=cmd_status)

    p = rsub.add_parser("image", help="build (cached) and show the rig's boot files")
    p.add_argument("--force", action="store_true", help="rebuild the dom0 initramfs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_image)
