"""P6: wake-to-reply of one PVH guest on the patched Xen in the nested rig, three ways in one run.

* prefetch: the guest paged out to its idle working set (our dom0 pager, page store), the event-prefetch hook on
  (patch 0002): the console event is held, the pager loads the console event's measured working set, then the
  event is delivered and the hold goes off, as the daemon's wake does (``XenEventWakeSource``: the wake unwatches
  the guest); keeping it on made every later event of the command (console acknowledgements, timer ticks) one
  more dom0 round trip;
* demand: the same page-out, hook off: every frame the command touches faults in through the paging ring;
* xl save / xl restore: the guest saved to a file and restored (the toolstack's way to get an idle guest's memory
  back), then the same command.

Wake-to-reply = from typing a command on the guest's console (its pty) to its output in the console log; for
save/restore it starts with ``xl restore``.

    .venv/bin/python bench/bench_xen.py            # boots the rig with the patched hypervisor (host, root)
    python3 bench/bench_xen.py --in-dom0           # the measurement itself, run by the above inside dom0

Prints a table and the ratios; --json for raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHECKOUT))


# ---------------------------------------------------------------- dom0 side

def xl(*args: str, timeout: float = 600) -> str:
    proc = subprocess.run(["xl", *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"xl {' '.join(args)}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def console_round_trip(name: str, command: str = "ls / >/dev/null; date", timeout: float = 300,
                       marks: dict | None = None) -> float:
    """Seconds from typing ``command`` on the guest's console to its end marker in the console log (``marks``
    gets both moments, monotonic: "typed", "replied")."""
    from xenswap.hv.xen import xl as xlh

    tty = xlh.console_tty(name)  # looked up before the clock starts
    token = secrets.token_hex(4)
    started = time.monotonic()
    with open(tty, "w") as pty:
        pty.write(f"{command}; echo {token}-$((40+2))\n")
    xlh.wait_for_console(name, f"{token}-42", timeout, poll=0.01)
    replied = time.monotonic()
    if marks is not None:
        marks.update(typed=started, replied=replied)
    return replied - started


# Figures with one entry per round (page-out ones: two per round); the warm-up rounds are dropped from them.
PER_ROUND = ("resident", "prefetch", "prefetch_faults", "prefetch_faults_predicted", "prefetch_frames",
             "prefetch_staged", "prefetch_load_s", "prefetch_store_read_s", "prefetch_xen_load_s", "demand",
             "demand_faults", "save_s", "restore_only_s", "xl_restore", "prefetch_to_hook_s", "prefetch_after_hook_s",
             "prefetch_serving_s")
TWO_PER_ROUND = ("page_out_s", "idle_ws_pages", "out_pages")


def dom0_main(reps: int, memory_mib: int, with_restore: bool = True, warmup: int = 1) -> dict:
    from xenswap.core.page_store import PageStore
    from xenswap.core.working_set import EventWorkingSet
    from xenswap.errors import XenswapError
    from xenswap.hv.xen import xl as xlh
    from xenswap.hv.xen.memory import XenMemory
    from xenswap.hv.xen.memory_events import EventPrefetcher
    from xenswap.hv.xen.pager import DomainPager

    name = f"bench-{secrets.token_hex(2)}"
    spec = xlh.GuestSpec(name=name, kernel=Path(os.environ["XENSWAP_GUEST_KERNEL"]),
                         initrd=Path(os.environ["XENSWAP_GUEST_INITRD"]), kind="pvh", memory_mib=memory_mib,
                         # a triple fault is a "reboot" to Xen: the guest stays for xl.state_report, not rebooted
                         extra={"on_reboot": '"preserve"'})
    figures: dict = {"memory_mib": memory_mib, "reps": reps, "warmup": warmup}
    rounds = warmup + reps
    save_file = Path(f"/tmp/{name}.save")
    xlh.create(spec)
    try:
        xlh.wait_for_console(name, xlh.GUEST_UP_MARKER, 180)
        time.sleep(3)
        figures["resident"] = [console_round_trip(name) for _ in range(rounds)]

        domid = int(xl("domid", name))
        store = PageStore(f"/tmp/{name}.pages.db")
        pager = DomainPager(domid, store).open()
        memory = XenMemory(domid, pager)
        # the console event's working set, measured as the core engine does (accessed bits around one event);
        # the first harvest is coarse (superpages) and splits them
        memory.accessed_pages_and_clear()
        time.sleep(2)
        memory.accessed_pages_and_clear()
        console_round_trip(name)
        first_ws = set(memory.accessed_pages_and_clear())
        console_round_trip(name)
        last_ws = memory.accessed_pages_and_clear()
        # what the core engine predicts from these two observations (frames in at least half of them: the union)
        model = EventWorkingSet()
        model.record(first_ws)
        model.record(last_ws)
        console_ws = model.predicted()
        figures["console_ws_pages"] = len(console_ws)
        figures["console_ws_in_both"] = len(first_ws & set(last_ws))  # how alike two commands' sets are
        # as the manager does before it pages a domain out (Manager._stage_wake_sets): the pager keeps its copies
        # of the predicted frames in dom0 RAM too, so the wake's prefetch reads no store
        figures["staged_limit"] = pager.stage_limit
        pager.stage(console_ws)

        # the gfns the guest faults on during a wake, to tell predicted frames (loaded late) from the rest
        fault_gfns: list[int] = []
        # what the hook loaded in this wake, and when it ran (monotonic); "serving": the ring thread's time
        wake = {"frames": 0, "seconds": 0.0, "read": 0.0, "xen": 0.0, "staged": 0, "serving": 0.0}
        serve = pager.handle

        def handle_and_note(requests: list) -> None:
            fault_gfns.extend(r.gfn for r in requests if r.reason == pager.xc.REASON_MEM_PAGING)
            started = time.monotonic()
            serve(requests)
            wake["serving"] += time.monotonic() - started

        pager.handle = handle_and_note

        def page_out() -> None:
            memory.accessed_pages_and_clear()
            time.sleep(2)
            hot = set(memory.accessed_pages_and_clear())
            time.sleep(2)
            hot |= set(memory.accessed_pages_and_clear())
            started = time.monotonic()
            memory.page_out(g for g in range(memory.guest_pages()) if g not in hot)
            figures.setdefault("page_out_s", []).append(time.monotonic() - started)
            figures.setdefault("idle_ws_pages", []).append(len(hot))
            figures.setdefault("out_pages", []).append(len(pager.out))


        def prefetch_for(kind: str) -> None:
            if kind != "console":
                return
            started = time.monotonic()
            wake.setdefault("hook_at", started)
            read, load = pager.stats.store_read_seconds, pager.stats.xen_load_seconds
            staged = pager.stats.staged_loads
            wake["frames"] += pager.prefetch(console_ws)
            wake["staged"] += pager.stats.staged_loads - staged
            wake["seconds"] += time.monotonic() - started
            wake["read"] += pager.stats.store_read_seconds - read
            wake["xen"] += pager.stats.xen_load_seconds - load
            wake["hook_done"] = time.monotonic()
            prefetcher.disable_after = True  # the guest is awake: the hold goes off once this event is answered

        prefetcher = EventPrefetcher(pager, prefetch_for, min_interval=0)
        for _ in range(rounds):
            page_out()
            faults = pager.stats.faults
            wake.update(frames=0, seconds=0.0, read=0.0, xen=0.0, staged=0, serving=0.0)
            wake.pop("hook_at", None)
            wake.pop("hook_done", None)
            marks: dict = {}
            fault_gfns.clear()
            prefetcher.enable()
            try:
                figures.setdefault("prefetch", []).append(console_round_trip(name, timeout=120, marks=marks))
            except XenswapError:  # no reply in time
                import faulthandler

                print(xlh.state_report(console_lines=120, dmesg_lines=40), file=sys.stderr)
                print(f"stuck: {pager.stats} held={pager.hold_events(True)} fired={prefetcher.fired[-5:]} "
                      f"pending={pager.channel.ring.pending()}", file=sys.stderr)
                faulthandler.dump_traceback(sys.stderr)
                raise
            finally:
                prefetcher.disable()
            figures.setdefault("prefetch_faults", []).append(pager.stats.faults - faults)
            figures.setdefault("prefetch_faults_predicted", []).append(len(set(fault_gfns) & set(console_ws)))
            figures.setdefault("prefetch_frames", []).append(wake["frames"])
            figures.setdefault("prefetch_staged", []).append(wake["staged"])
            figures.setdefault("prefetch_load_s", []).append(wake["seconds"])
            figures.setdefault("prefetch_store_read_s", []).append(wake["read"])
            figures.setdefault("prefetch_xen_load_s", []).append(wake["xen"])
            # where the wake's time went: typing -> hook, the hook, hook answered -> reply; faults served meanwhile
            if "hook_at" in wake:  # (a console event the guest polled instead of taking is never held)
                figures.setdefault("prefetch_to_hook_s", []).append(wake["hook_at"] - marks["typed"])
                figures.setdefault("prefetch_after_hook_s", []).append(marks["replied"] - wake["hook_done"])
            figures.setdefault("prefetch_serving_s", []).append(wake["serving"])
            page_out()
            faults = pager.stats.faults
            try:
                figures.setdefault("demand", []).append(console_round_trip(name))
            except XenswapError:
                print(xlh.state_report(console_lines=120, dmesg_lines=40), file=sys.stderr)
                raise
            figures.setdefault("demand_faults", []).append(pager.stats.faults - faults)
        figures["batched_load"] = pager.batched_load  # patch 0004's load_batch (False: frame by frame)
        figures["fault_ms_median"] = statistics.median(pager.stats.fault_seconds) * 1000
        pager.close()  # frames stay out; the guest is destroyed below
        store.close()
        for path in Path("/tmp").glob(f"{name}.pages.db*"):
            path.unlink()
        # xl save / xl restore, of a fresh guest of the same image (a guest restored by xl and then held by the
        # event hook hung in the rig once: docs/benchmarks-xen.md), measured last
        xl("destroy", name)
        xlh.create(spec)
        xlh.wait_for_console(name, xlh.GUEST_UP_MARKER, 180)
        time.sleep(3)
        console_round_trip(name)
        restore = []
        for _ in range(rounds if with_restore else 0):
            started = time.monotonic()
            xl("save", name, str(save_file))
            figures.setdefault("save_s", []).append(time.monotonic() - started)
            started = time.monotonic()
            xl("restore", str(save_file))
            restored = time.monotonic() - started
            restore.append(restored + console_round_trip(name))
            figures.setdefault("restore_only_s", []).append(restored)
            save_file.unlink()
        figures["xl_restore"] = restore
        for key in PER_ROUND:
            figures[key] = figures.get(key, [])[warmup:]
        for key in TWO_PER_ROUND:
            figures[key] = figures[key][2 * warmup:]

    finally:
        xl("destroy", name) if subprocess.run(["xl", "domid", name], capture_output=True).returncode == 0 else None
        save_file.unlink(missing_ok=True)
    return figures


# ---------------------------------------------------------------- host side

def report(figures: dict) -> str:
    med = {k: statistics.median(figures[k]) for k in ("resident", "prefetch", "demand", "xl_restore")}
    mid_keys = ("prefetch_faults", "demand_faults", "restore_only_s", "save_s", "out_pages", "idle_ws_pages",
                "page_out_s", "prefetch_frames", "prefetch_load_s", "prefetch_staged", "prefetch_faults_predicted",
                "prefetch_store_read_s", "prefetch_xen_load_s", "prefetch_to_hook_s", "prefetch_after_hook_s",
                "prefetch_serving_s")
    mid = {k: statistics.median(figures.get(k) or [0]) for k in mid_keys}  # (older --report files lack some)
    lines = [
        f"P6 wake-to-reply, one {figures['memory_mib']} MiB PVH guest, console command, median of {figures['reps']}"
        f" (after {figures.get('warmup', 0)} unmeasured warm-up round(s) of each way)",
        f"  resident (anchor)            {med['resident']:8.2f} s",
        f"  paged + prefetch hook        {med['prefetch']:8.2f} s  ({mid['prefetch_faults']:.0f} faults "
        f"({mid['prefetch_faults_predicted']:.0f} on predicted frames), "
        f"console WS {figures['console_ws_pages']} frames; per wake {mid['prefetch_frames']:.0f} prefetched "
        f"({mid['prefetch_staged']:.0f} from dom0 RAM) in "
        f"{mid['prefetch_load_s']:.3f} s: store {mid['prefetch_store_read_s']:.3f} s, Xen "
        f"{mid['prefetch_xen_load_s']:.3f} s, {'batched' if figures.get('batched_load') else 'frame by frame'})",
        f"    typed -> hook {mid['prefetch_to_hook_s']:.3f} s, hook {mid['prefetch_load_s']:.3f} s, hook answered -> "
        f"reply {mid['prefetch_after_hook_s']:.3f} s; the ring thread served faults for "
        f"{mid['prefetch_serving_s']:.3f} s",
        f"  paged, demand paging         {med['demand']:8.2f} s  ({mid['demand_faults']:.0f} faults)",
        f"  xl save + xl restore         {med['xl_restore']:8.2f} s  (restore {mid['restore_only_s']:.2f} s, "
        f"save {mid['save_s']:.2f} s)",
        f"  paged out {mid['out_pages']:.0f} frames (idle WS {mid['idle_ws_pages']:.0f}) in {mid['page_out_s']:.1f} s;"
        f" fault served in {figures['fault_ms_median']:.1f} ms (median, in the pager)",
        f"  ratios: xl restore / prefetch = {med['xl_restore'] / med['prefetch']:.1f}x, "
        f"demand / prefetch = {med['demand'] / med['prefetch']:.1f}x, "
        f"xl restore / demand = {med['xl_restore'] / med['demand']:.1f}x",
    ]
    return "\n".join(lines)


def host_main(args: argparse.Namespace) -> int:
    from xenswap.guest.image import build_guest_image
    from xenswap.rig import Rig

    image = build_guest_image()
    started = time.monotonic()
    with Rig.boot(xen="patched", timeout=300, state_dir=args.state_dir) as rig:
        print(f"rig (patched Xen) up in {rig.boot_seconds:.1f} s", flush=True)
        rig.set_env(XENSWAP_GUEST_KERNEL=rig.dom0_path(image.kernel), XENSWAP_GUEST_INITRD=rig.dom0_path(image.initrd))
        rc, out = rig.run(f"python3 bench/bench_xen.py --in-dom0 --reps {args.reps} --warmup {args.warmup} "
                          f"--memory {args.memory}",
                          timeout=3600)
    if rc != 0:
        print(out[-4000:], file=sys.stderr)
        return rc
    figures = json.loads(out.strip().splitlines()[-1])
    figures["total_s"] = time.monotonic() - started
    print(json.dumps(figures, indent=2) if args.json else report(figures))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-dom0", action="store_true", help="measure (inside the rig's dom0)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured rounds of each way first: the pager's store file and heap are fresh in a "
                             "new process (first touches cost page-table updates through Xen in a PV dom0); a "
                             "long-running daemon's are not")
    parser.add_argument("--memory", type=int, default=128, help="guest MiB")
    parser.add_argument("--state-dir", type=Path, default=None, help="the rig's state folder")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--report", type=Path, default=None, help="print the table of a saved --in-dom0 output")
    parser.add_argument("--no-restore", action="store_true", help="skip the xl save/restore part (debugging)")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text().strip().splitlines()[-1])))
        return 0
    if args.in_dom0:
        print(json.dumps(dom0_main(args.reps, args.memory, with_restore=not args.no_restore, warmup=args.warmup)))
        return 0
    return host_main(args)


if __name__ == "__main__":
    sys.exit(main())
