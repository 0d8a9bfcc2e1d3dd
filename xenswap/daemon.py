"""The manager: applies the policy to every domain continuously, and the main job (``xenswap demo``).

Thin on purpose: the decisions come from the engines in xenswap.core, the actions from the hypervisor
port. What the policy engine learns each tick (resident MiB, working-set MiB, idle since) lives in its embedded
state store, which ``xenswap list`` in another shell reads too.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

from xenswap.hv import select_hypervisor
from xenswap.hv.base import DomainInfo, Hypervisor


@dataclass
class Manager:
    """One manager loop over one port. ``engine`` is the policy engine from xenswap.core (None: watch only)."""

    hv: Hypervisor
    engine: object | None = None

    def tick(self) -> list[DomainInfo]:
        if self.engine is not None:
            self.engine.tick()  # type: ignore[attr-defined]
        domains = self.hv.list_domains()
        if self.engine is not None:
            domains = self.engine.annotate(domains)  # type: ignore[attr-defined]
        return domains

    def close(self) -> None:
        """Stop the engine's wake source (its packet-watching thread and queue rules)."""
        waker = getattr(self.engine, "waker", None)
        if waker is not None and hasattr(waker, "close"):
            waker.close()


def _policy_engine(hv: Hypervisor) -> object | None:
    """The paging policy engine when this port has memory mechanisms; None keeps a watch-only loop."""
    from xenswap.core.policy import engine_for

    return engine_for(hv)


def render_table(domains: list[DomainInfo], title: str):  # -> rich.table.Table
    from rich.table import Table

    table = Table(title=title)
    for header in ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)", "Res(MiB)", "WSS(MiB)", "Idle(s)", "IP"]:
        table.add_column(header, justify="left" if header in ("Name", "State", "IP") else "right")
    now = time.time()
    for d in domains:
        table.add_row(
            d.name, str(d.domid), str(d.mem_mib), str(d.vcpus), d.state, f"{d.cpu_time_s:.1f}",
            "-" if d.resident_mib is None else f"{d.resident_mib:.1f}",
            "-" if d.wss_mib is None else f"{d.wss_mib:.1f}",
            "-" if d.idle_since is None else str(int(now - d.idle_since)),
            str(d.extra.get("ip") or "-"),
        )
    return table


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP end the loop like Ctrl-C does, so teardown always runs."""

    def handler(signum: int, frame: object) -> None:
        raise _Stop()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_manager(manager: Manager, interval: float, duration: float | None, live: bool, title: str) -> None:
    deadline = None if duration is None else time.monotonic() + duration
    with contextlib.ExitStack() as stack:
        display = None
        if live:
            from rich.live import Live

            display = stack.enter_context(Live(render_table([], title), refresh_per_second=2))
        while deadline is None or time.monotonic() < deadline:
            domains = manager.tick()
            if display is not None:
                display.update(render_table(domains, title))
            time.sleep(interval)


def cmd_daemon(args: argparse.Namespace) -> int:
    hv = select_hypervisor(args.hv)
    manager = Manager(hv, _policy_engine(hv))
    automation = None
    if hv.name == "xen":  # requests, per-domain policy and published figures in xenstore (docs/xenstore.md)
        from xenswap.hv.xen.automation import start_for_daemon

        automation = start_for_daemon(manager)
    try:
        with _stop_on_signals():
            run_manager(manager, args.interval, args.duration, live=args.live, title=f"xenswap ({hv.name})")
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        if automation is not None:
            automation.stop()
        manager.close()
    return 0


class HostBridge:
    """A Linux bridge in the host namespace with an address for the host end; removed on exit (pyroute2)."""

    def __init__(self, name: str, cidr: str):
        self.name, self.cidr = name, cidr

    def __enter__(self) -> HostBridge:
        from pyroute2 import IPRoute

        address, prefix = self.cidr.split("/")
        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=self.name):
                ipr.link("add", ifname=self.name, kind="bridge")
            index = ipr.link_lookup(ifname=self.name)[0]
            with contextlib.suppress(Exception):  # already there from an earlier run
                ipr.addr("add", index=index, address=address, prefixlen=int(prefix))
            ipr.link("set", index=index, state="up")
        return self

    def __exit__(self, *exc: object) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=self.name):
                ipr.link("del", index=index)


DEMO_BRIDGE = "xsdemo0"
DEMO_NET = "10.77.0"  # a /24 on our own bridge: the guests and the host end only


def cmd_demo(args: argparse.Namespace) -> int:
    """Boot a handful of tiny guests, manage them with a live table, and tear everything down on exit."""
    from xenswap.guest.image import build_guest_image
    from xenswap.hv.qemu import QemuVM, open_hypervisor

    image = build_guest_image()
    hv = open_hypervisor()
    vms: list[QemuVM] = []
    manager: Manager | None = None
    try:
        with _stop_on_signals(), HostBridge(DEMO_BRIDGE, f"{DEMO_NET}.1/24"):
            for i in range(args.guests):
                vms.append(
                    QemuVM.create(
                        f"{args.prefix}{i + 1}", image, mem_mib=args.mem, ip=f"{DEMO_NET}.{i + 2}/24",
                        gateway=f"{DEMO_NET}.1", bridge=DEMO_BRIDGE, wait_up=False,
                    )
                )
            manager = Manager(hv, _policy_engine(hv))
            run_manager(manager, args.interval, args.duration, live=not args.no_live, title="xenswap demo (QEMU/TCG)")
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        if manager is not None:
            manager.close()
        for vm in vms:
            with contextlib.suppress(Exception):
                vm.destroy()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from xenswap.hv.cli import add_hv_argument

    p = sub.add_parser("daemon", help="run the manager in the foreground (policy applied every tick)")
    add_hv_argument(p)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between ticks")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--live", action="store_true", help="show a live status table")
    p.set_defaults(handler=cmd_daemon)

    p = sub.add_parser("demo", help="main job: boot tiny guests under QEMU and manage them live until Ctrl-C")
    p.add_argument("--guests", type=int, default=3)
    p.add_argument("--mem", type=int, default=128, help="MiB per guest")
    p.add_argument("--prefix", default="demo")
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--no-live", action="store_true", help="no live table (for logs and tests)")
    p.set_defaults(handler=cmd_demo)
