"""Commands of the paging engines: idle, page-out, page-in, wss, swap, metrics.

The engines are hypervisor-neutral; the commands reach the port through ``select_hypervisor`` and its memory
module (``xenswap.hv.<port>.memory.mechanism_for``), so they work the same on the QEMU and the Xen port.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from xenswap.cli import print_json, print_table
from xenswap.core.idleness import CpuSample, IdlenessDetector, dump_trace, evaluate_all, load_trace
from xenswap.core.mechanism import pages_to_mib
from xenswap.core.policy import Manager, StateStore, domain_figures, mechanism_factory_for, render_metrics
from xenswap.core.working_set import EVENT_TYPES
from xenswap.errors import XenswapError
from xenswap.hv import select_hypervisor


def _manager(args: argparse.Namespace) -> Manager:
    hv = select_hypervisor(getattr(args, "hv", "auto"))
    factory = mechanism_factory_for(hv)
    if factory is None:
        raise XenswapError(f"the {hv.name} port has no memory mechanisms here")
    return Manager(hv, factory)


def _progress(text: str, quiet: bool) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- idle


def cmd_idle(args: argparse.Namespace) -> int:
    if args.evaluate:
        results = evaluate_all(load_trace(args.evaluate), breakeven=args.breakeven)
        if args.json:
            print_json([r.to_json() for r in results])
        else:
            print_table(["Predictor", "Periods", "Idle(s)", "Acted", "FalseAlarms", "Missed", "Captured"],
                        [[r.predictor, r.periods, f"{r.idle_s:.0f}", r.acted, r.false_alarms, r.missed,
                          f"{100 * r.captured_fraction:.0f}%"] for r in results])
        return 0
    hv = select_hypervisor(args.hv)
    domains = [hv.lookup(d) for d in args.domains] if args.domains else hv.list_domains()
    if args.record:
        if len(domains) != 1:
            raise XenswapError("--record needs exactly one DOM")
        return _record(hv, domains[0].name, args)
    detectors = {d.name: IdlenessDetector(threshold=args.threshold) for d in domains}
    for d in domains:
        detectors[d.name].feed(CpuSample(time.time(), tuple(hv.vcpu_times(d.name))))
    time.sleep(args.interval)
    figures = domain_figures()
    rows = []
    for d in domains:
        usage = detectors[d.name].feed(CpuSample(time.time(), tuple(hv.vcpu_times(d.name))))
        f = figures.get(d.name, {})
        idle_since = f.get("idle_since")
        rows.append({"name": d.name, "usage": round(usage or 0.0, 4), "idle": (usage or 0.0) < args.threshold,
                     "idle_for_s": None if idle_since is None else round(time.time() - idle_since),
                     "phase": f.get("phase", "resident")})
    if args.json:
        print_json(rows)
    else:
        print_table(["Name", "Usage", "Idle", "Idle(s)", "Phase"],
                    [[r["name"], f"{100 * r['usage']:.2f}%", "yes" if r["idle"] else "no", r["idle_for_s"],
                      r["phase"]] for r in rows])
    return 0


def _record(hv, name: str, args: argparse.Namespace) -> int:
    samples = []
    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        samples.append(CpuSample(time.time(), tuple(hv.vcpu_times(name))))
        if not args.json and len(samples) % 20 == 0:
            _progress(f"recorded {len(samples)} samples", False)
        time.sleep(args.interval)
    with open(args.record, "w") as f:
        f.write(dump_trace(samples))
    if args.json:
        print_json({"samples": len(samples), "file": args.record})
    else:
        print(f"recorded {len(samples)} samples of {name} to {args.record}")
    return 0


# ---------------------------------------------------------------- page-out / page-in


def cmd_page_out(args: argparse.Namespace) -> int:
    manager = _manager(args)
    name = manager.hv.lookup(args.dom).name
    mech = manager.mechanism(name)
    _ensure_swap(args)
    before = len(mech.resident_pages())
    _progress(f"paging out {name}: {pages_to_mib(before):.1f} MiB resident...", args.json)
    t0 = time.monotonic()
    decision = manager.page_out(name, keep_ws=args.keep_ws, pause=args.pause)
    after = len(mech.resident_pages())
    out = {"domain": name, "action": decision.action, "seconds": round(time.monotonic() - t0, 3),
           "resident_mib_before": round(pages_to_mib(before), 1), "resident_mib_after": round(pages_to_mib(after), 1),
           "kept_pages": len(manager.state(name).model.resident_set(time.time())) if args.keep_ws else 0,
           "paused": manager.state(name).phase == "paged-out"}
    if args.json:
        print_json(out)
    else:
        print(f"{name}: {out['resident_mib_before']} -> {out['resident_mib_after']} MiB resident in {out['seconds']} s"
              + (" (paused)" if out["paused"] else ""))
    return 0


def cmd_page_in(args: argparse.Namespace) -> int:
    manager = _manager(args)
    name = manager.hv.lookup(args.dom).name
    t0 = time.monotonic()
    decision = manager.page_in(name, event=args.event, all_pages=args.all)
    out = {"domain": name, "prefetched_pages": decision.pages, "seconds": round(time.monotonic() - t0, 3)}
    if args.json:
        print_json(out)
    else:
        print(f"{name}: prefetched {decision.pages} pages in {out['seconds']} s, running")
    return 0


# ---------------------------------------------------------------- wss


def cmd_wss(args: argparse.Namespace) -> int:
    manager = _manager(args)
    name = manager.hv.lookup(args.dom).name
    if args.measure:
        events = [args.event] if args.event else ["idle"]
        _ensure_swap(args)
        module = importlib.import_module(f"xenswap.hv.{manager.hv.name}.memory_events")
        vm = manager.hv.vm(name)
        mech = manager.mechanism(name)
        for event in events:
            for i in range(args.repeat):
                _progress(f"measuring {event} working set of {name} ({i + 1}/{args.repeat})...", args.json)
                frames, _seconds = module.measure_event(vm, mech, event, window=args.window)
                manager.record_event(name, event, frames)
        manager.page_in(name, all_pages=False)
    summary = manager.state(name).model.summary()
    if args.event:
        summary = {args.event: summary.get(args.event, {})}
    if args.json:
        print_json({"domain": name, "events": summary})
        return 0
    print_table(["Event", "Observations", "Last(pages)", "Predicted(pages)", "Predicted(MiB)"],
                [[e, s.get("observations"), s.get("last_observed_pages"), s.get("predicted_pages"),
                  s.get("predicted_mib")] for e, s in summary.items()])
    return 0


# ---------------------------------------------------------------- swap, metrics


def _swap_module(args: argparse.Namespace):
    kind = select_hypervisor(getattr(args, "hv", "auto")).name
    try:
        return importlib.import_module(f"xenswap.hv.{kind}.memory_swap")
    except ImportError:
        raise XenswapError(f"the {kind} port pages without host swap") from None


def _ensure_swap(args: argparse.Namespace) -> None:
    try:
        module = _swap_module(args)
    except XenswapError:
        return
    module.ensure_swap()


def cmd_swap(args: argparse.Namespace) -> int:
    module = _swap_module(args)
    if args.swap_command == "setup":
        dev = module.setup_zram(args.size_mib) if args.kind == "zram" else module.setup_swap_file(
            size_mib=args.size_mib)
        devices = [dev]
    else:
        devices = module.swap_devices()
    if args.json:
        print_json([d.to_json() for d in devices])
    else:
        print_table(["Device", "Type", "Size(MiB)", "Used(MiB)", "Prio"],
                    [[d.path, d.kind, d.size_kib // 1024, d.used_kib // 1024, d.priority] for d in devices])
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    live = {d.name for d in select_hypervisor(args.hv).list_domains()}
    figures = {name: f for name, f in domain_figures(StateStore()).items() if name in live}
    sys.stdout.write(render_metrics(figures))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from xenswap.hv.cli import add_hv_argument

    p = sub.add_parser("idle", help="vCPU usage per quantum and idleness of domains; record/evaluate traces")
    p.add_argument("domains", nargs="*", metavar="DOM")
    p.add_argument("--interval", type=float, default=1.0, help="sampling interval (s), default 1")
    p.add_argument("--threshold", type=float, default=0.05, help="idle below this fraction of the quantum")
    p.add_argument("--record", metavar="FILE", help="record a vCPU-time trace (CSV) of one DOM")
    p.add_argument("--duration", type=float, default=60, help="seconds to record (default 60)")
    p.add_argument("--evaluate", metavar="FILE", help="replay a trace through the idle-period predictors")
    p.add_argument("--breakeven", type=float, default=10.0, help="page-out pays back after this many idle s")
    p.add_argument("--json", action="store_true")
    add_hv_argument(p)
    p.set_defaults(handler=cmd_idle)

    p = sub.add_parser("page-out", help="page a domain's memory out to host swap")
    p.add_argument("dom", metavar="DOM")
    p.add_argument("--keep-ws", action="store_true", help="keep the predicted working set resident")
    p.add_argument("--pause", action="store_true", help="also pause it (a packet or page-in wakes it)")
    p.add_argument("--json", action="store_true")
    add_hv_argument(p)
    p.set_defaults(handler=cmd_page_out)

    p = sub.add_parser("page-in", help="prefetch a domain's working set and resume it")
    p.add_argument("dom", metavar="DOM")
    p.add_argument("--event", choices=EVENT_TYPES, help="prefetch this event's working set")
    p.add_argument("--all", action="store_true", help="prefetch all of its memory")
    p.add_argument("--json", action="store_true")
    add_hv_argument(p)
    p.set_defaults(handler=cmd_page_in)

    p = sub.add_parser("wss", help="working sets per event type (show, or --measure on the live domain)")
    p.add_argument("dom", metavar="DOM")
    p.add_argument("--event", choices=EVENT_TYPES)
    p.add_argument("--measure", action="store_true", help="trigger the event and measure (default event: idle)")
    p.add_argument("--repeat", type=int, default=1, help="measurements to take (default 1)")
    p.add_argument("--window", type=float, default=10.0, help="idle measurement window (s), default 10")
    p.add_argument("--json", action="store_true")
    add_hv_argument(p)
    p.set_defaults(handler=cmd_wss)

    p = sub.add_parser("swap", help="host swap for paged-out domains")
    p.add_argument("swap_command", choices=["setup", "status"])
    p.add_argument("--kind", choices=["file", "zram"], default="file", help="swap file (default) or zram")
    p.add_argument("--size-mib", type=int, default=None, help="size (default $XENSWAP_SWAP_MIB or 4096)")
    p.add_argument("--json", action="store_true")
    add_hv_argument(p)
    p.set_defaults(handler=cmd_swap)

    p = sub.add_parser("metrics", help="paging figures of live domains in Prometheus text format")
    add_hv_argument(p)
    p.set_defaults(handler=cmd_metrics)
