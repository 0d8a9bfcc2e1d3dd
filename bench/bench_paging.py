"""Paging benchmarks, each side by side with its anchor in one run (issue 3).

P1  host memory per idle guest: N identical idle guests fully resident (anchor) vs managed (paged out to the
    measured idle working set, QEMU's own memory released). Per guest: PSS of the QEMU process plus its share
    of the growth of the host's swap cache.
P2  wake-to-reply of one guest (ping RTT; TCP connect + HTTP GET of the first request): fully resident (anchor),
    paged out to its working set (running), paged out entirely + paused woken by the packet with prefetch of
    the event's working set, the same with demand paging only (resume, no prefetch), and a QMP
    migrate-to-file save + ``-incoming`` restore.

    .venv/bin/python bench/bench_paging.py --n 20 --reps 5

Needs root, QEMU and the guest image (built on first use). Prints a table and ratios; --json for raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xenswap.core.policy import PAGED_OUT, Manager, engine_for, mechanism_factory_for
from xenswap.hv.qemu import QemuVM, open_hypervisor
from xenswap.hv.qemu.memory import range_digest, smaps_rollup
from xenswap.hv.qemu.memory_events import http_get
from xenswap.hv.qemu.memory_swap import ensure_swap
from xenswap.hv.qemu.vm import qemu_argv

TAG = f"b{os.getpid() % 10000}"


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def pss_kib(pid: int) -> int:
    return smaps_rollup(pid)["Pss"]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- P1

KPF_SWAPCACHE = 1 << 13  # include/uapi/linux/kernel-page-flags.h


def mapped_swapcache_kib(pid: int) -> int:
    """KiB of the process's mapped pages that are also in the swap cache (a page faulted back from swap keeps
    its slot): PSS counts them already, so they must not be counted again in the swap-cache share."""
    from array import array

    from xenswap.hv.qemu.memory import PM_PFN_MASK, PM_PRESENT, anonymous_ranges

    pfns = []
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for addr, length in anonymous_ranges(pid):
            data = os.pread(pagemap.fileno(), length // 4096 * 8, addr // 4096 * 8)
            entries = array("Q")
            entries.frombytes(data[: len(data) // 8 * 8])
            pfns += [e & PM_PFN_MASK for e in entries if e & PM_PRESENT]
    count = 0
    with open("/proc/kpageflags", "rb", buffering=0) as flags:
        for pfn in pfns:
            word = os.pread(flags.fileno(), 8, pfn * 8)
            if len(word) == 8 and int.from_bytes(word, "little") & KPF_SWAPCACHE:
                count += 1
    return count * 4


def pss_breakdown_kib(pid: int, kernel: str = "") -> dict[str, int]:
    """PSS by kind of mapping: guest RAM, QEMU's other anonymous/private memory, the guest kernel file QEMU maps
    (-kernel vmlinux), and other files (QEMU binary and libraries)."""
    out = {"guest_ram": 0, "qemu_anon": 0, "kernel_file": 0, "other_files": 0}
    current = None
    size = 0
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                parts = line.split()
                start, end = (int(x, 16) for x in parts[0].split("-"))
                size = end - start
                path = parts[5] if len(parts) > 5 else ""
                if path == kernel or path.endswith("vmlinux") or path.endswith("vmlinuz"):
                    current = "kernel_file"
                elif path.startswith("/") and not path.startswith("/memfd:"):
                    current = "other_files"
                else:
                    current = "guest_ram" if size >= 64 << 20 else "qemu_anon"
            elif first == "Pss:" and current:
                out[current] += int(line.split()[1])
            elif first == "Private_Dirty:" and current == "other_files":
                # copied-on-write pages of a file map (.data, .bss, RELRO) are QEMU's own anonymous memory
                dirty = int(line.split()[1])
                out["other_files"] -= dirty
                out["qemu_anon"] += dirty
    return out


def p1_snapshot(vms: list[QemuVM], swapcache0: int) -> dict:
    n = len(vms)
    pss = [pss_kib(vm.pid) for vm in vms]
    mapped_sc = [mapped_swapcache_kib(vm.pid) for vm in vms]
    growth = max(0, meminfo("SwapCached") - swapcache0)
    breakdown = [pss_breakdown_kib(vm.pid, vm.config.kernel) for vm in vms]
    return {
        "pss_kib_per_vm": statistics.mean(pss),
        "swapcache_growth_kib_per_vm": growth / n,
        "mapped_swapcache_kib_per_vm": statistics.mean(mapped_sc),
        # the swap cache's growth minus what PSS counts already (mapped swap-cache pages), never below 0
        "unmapped_swapcache_kib_per_vm": max(0.0, growth - sum(mapped_sc)) / n,
        "pss_breakdown_kib_per_vm": {k: statistics.mean(b[k] for b in breakdown) for k in breakdown[0]},
    }


def private_kernel_image(directory: Path, index: int):
    """The guest image with a copy of the kernel of its own: a file mapped by one QEMU only, whose pages the
    release of QEMU's memory can drop (pages of a file that other QEMUs map too are left alone). The copy's
    page cache is dropped after writing, so only what QEMU reads of it is in memory."""
    import dataclasses
    import shutil

    from xenswap.guest.image import build_guest_image

    image = build_guest_image()
    source = image.vmlinux or image.kernel
    copy = directory / f"kernel-{index}"
    shutil.copyfile(source, copy)
    with open(copy, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return dataclasses.replace(image, vmlinux=copy) if image.vmlinux else dataclasses.replace(image, kernel=copy)


def bench_p1(n: int, mem: int, settle: float, boot: str = "pvh", paused: bool = True,
             private_kernel: bool = False) -> dict:
    hv = open_hypervisor()
    vms: list[QemuVM] = []
    kernels = tempfile.TemporaryDirectory(prefix="xenswap-kernels-", dir="/var/tmp") if private_kernel else None
    try:
        t0 = time.monotonic()
        for i in range(n):
            image = private_kernel_image(Path(kernels.name), i) if kernels else None
            vms.append(QemuVM.create(f"{TAG}p1-{i}", image=image, mem_mib=mem, network=False, timeout=300,
                                     boot=boot))
            log(f"P1: booted {i + 1}/{n} ({time.monotonic() - t0:.0f} s)")
        boot_times = [vm.config.up_s for vm in vms if vm.config.up_s]
        boot_s = statistics.median(boot_times) if boot_times else None
        time.sleep(settle)
        swapcache0 = meminfo("SwapCached")
        resident = p1_snapshot(vms, swapcache0)
        manager = Manager(hv, mechanism_factory_for(hv))
        # Idle working sets of all guests at once: two 5 s windows (clear all, wait, read all).
        mechs = {vm.name: manager.mechanism(vm.name) for vm in vms}
        for _ in range(3):
            for m in mechs.values():
                m.accessed_pages_and_clear()
            time.sleep(5)
            for name, m in mechs.items():
                manager.record_event(name, "idle", m.accessed_pages_and_clear())
        t1 = time.monotonic()
        for vm in vms:
            manager.page_out(vm.name, keep_ws=True)
        pageout_s = time.monotonic() - t1
        log(f"P1: paged out {n} guests to their working sets in {pageout_s:.1f} s; idling {settle:.0f} s")
        time.sleep(settle)
        managed = p1_snapshot(vms, swapcache0)
        wss = [len(manager.state(vm.name).model.resident_set(time.time())) * 4 for vm in vms]
        result = {
            "n": n, "mem_mib": mem, "settle_s": settle, "boot": boot, "boot_s_median": boot_s,
            "private_kernel": private_kernel,
            "resident": resident, "managed": managed,
            "idle_wss_kib_mean": statistics.mean(wss),
            "pageout_s_total": pageout_s,
        }
        if paused:
            # Long idle: the policy pauses and pages out everything (QEMU's own idle working set stays or goes
            # as PolicyConfig.keep_hypervisor_ws_paused says).
            for vm in vms:
                manager.page_out(vm.name, keep_ws=False)
            log(f"P1: paused and paged out {n} guests entirely; idling {settle:.0f} s")
            time.sleep(settle)
            result["paused"] = p1_snapshot(vms, swapcache0)
            result["keep_hypervisor_ws_paused"] = manager.config.keep_hypervisor_ws_paused
        return result
    finally:
        for vm in vms:
            try:
                vm.destroy()
            except Exception as exc:  # keep tearing the rest down
                log(f"destroy {vm.name}: {exc}")
        if kernels:
            kernels.cleanup()


# ---------------------------------------------------------------- P2

PING_TIME = re.compile(r"time=([\d.]+) ms")


def ping_ms(ip: str, timeout: float = 10) -> float:
    proc = subprocess.run(["ping", "-c", "1", "-W", str(timeout), ip], capture_output=True, text=True)
    m = PING_TIME.search(proc.stdout)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"no ping reply from {ip}")
    return float(m.group(1))


def http_ms(ip: str) -> float:
    t0 = time.monotonic()
    http_get(ip, timeout=30)
    return (time.monotonic() - t0) * 1000


def wait_phase(manager: Manager, name: str, phase: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while manager.state(name).phase != phase and time.monotonic() < deadline:
        time.sleep(0.02)


# Wake-up configurations of the paused scenarios: "before" or features joined by "+":
#   qmp   stop/cont over a persistent QMP connection (else a new connection each time)
#   pin   the host's neighbour entry for the guest pinned, so the host does not ARP for the paused guest first
#   keep  QEMU's own idle working set stays resident when the guest is paused (else paged out too)
# (Also measured and dropped, see docs/benchmarks-paging.md: the waker thread at real-time priority, and mapping
# the prefetched pages before the resume.)
P2_FEATURES = ("qmp", "pin", "keep")
DEFAULT_P2_CONFIGS = ("before", "qmp+pin", "qmp+pin+keep")


def p2_features(config: str) -> set[str]:
    features = set() if config == "before" else set(config.split("+"))
    unknown = features - set(P2_FEATURES)
    if unknown:
        raise ValueError(f"unknown P2 feature(s) {sorted(unknown)} in {config!r}: before, or {'+'.join(P2_FEATURES)}")
    return features


def configure_wake(manager: Manager, config: str) -> None:
    from xenswap.hv.qemu import vm as vm_module

    features = p2_features(config)
    vm_module.use_persistent_monitors("qmp" in features)
    manager.waker.pin_neighbours = "pin" in features
    manager.config.keep_hypervisor_ws_paused = "keep" in features


def bench_p2(mem: int, reps: int, configs: tuple[str, ...] = DEFAULT_P2_CONFIGS, restore: bool = True) -> dict:
    hv = open_hypervisor()
    subnet = f"10.{90 + os.getpid() % 30}.{os.getpid() % 250}"
    vm = QemuVM.create(f"{TAG}p2", mem_mib=mem, ip=f"{subnet}.2/24", timeout=300)
    manager = engine_for(hv)
    results: dict[str, dict[str, list[float]]] = {}
    timelines: dict[str, dict[str, list[dict]]] = {}

    def record(scenario: str, metric: str, value: float) -> None:
        results.setdefault(scenario, {}).setdefault(metric, []).append(value)

    try:
        name = vm.name
        mech = manager.mechanism(name)
        http_get(vm.ip)
        # Working sets of the events we wake for (three observations each) and of the idle background.
        from xenswap.hv.qemu.memory_events import measure_event

        for event in ("idle", "ping", "http"):
            for _ in range(3):
                manager.record_event(name, event, measure_event(vm, mech, event, window=3)[0])
        manager.page_in(name, all_pages=True)
        for rep in range(reps):
            log(f"P2: round {rep + 1}/{reps}")
            for metric, probe in (("ping_ms", ping_ms), ("http_ms", http_ms)):
                # resident: bring everything back and map it (a read of guest RAM from outside faults it in)
                manager.page_in(name, all_pages=True)
                base, length = vm.ram_region()
                range_digest(vm.pid, base, length)
                vm.console.run("true")
                time.sleep(0.5)
                record("resident", metric, probe(vm.ip))

                manager.page_out(name, keep_ws=True)
                time.sleep(0.5)
                record("working set (running)", metric, probe(vm.ip))

                # Configurations in a different order each round: drift of the host's load hits all alike.
                for config in configs[rep % len(configs):] + configs[:rep % len(configs)]:
                    configure_wake(manager, config)
                    for mode, prefetch in (("prefetch", True), ("demand paging", False)):
                        label = f"paused [{config}], {mode}"
                        manager.waker.prefetch = prefetch
                        manager.page_out(name, keep_ws=False)
                        time.sleep(0.5)
                        manager.waker.wakes.clear()
                        record(label, metric, probe(vm.ip))
                        wait_phase(manager, name, "resident")
                        if manager.waker.wakes:
                            timelines.setdefault(label, {}).setdefault(metric, []).append(manager.waker.wakes[0])
                    # back to resident for the next configuration (its page-out starts from the same state)
                    manager.page_in(name, all_pages=True)
                    range_digest(vm.pid, base, length)
                manager.waker.prefetch = True
                configure_wake(manager, configs[-1])
                # The floor of any paused wake-up: paused, watched, nothing paged out (all of RAM mapped).
                st = manager.state(name)
                st.phase = PAGED_OUT
                manager.store.save(st)
                hv.pause(name)
                manager._wake_plans[name] = manager._wake_plan(st)  # as page_out(pause) leaves it
                manager.waker.watch(name)
                time.sleep(0.5)
                manager.waker.wakes.clear()
                label = f"paused [{configs[-1]}], nothing paged out"
                record(label, metric, probe(vm.ip))
                wait_phase(manager, name, "resident")
                if manager.waker.wakes:
                    timelines.setdefault(label, {}).setdefault(metric, []).append(manager.waker.wakes[0])

            if restore:
                record("QMP save + restore", "ping_ms", restore_ms(vm, "ping"))
                record("QMP save + restore", "http_ms", restore_ms(vm, "http"))
        return {"reps": reps, "mem_mib": mem, "configs": list(configs), "scenarios": results,
                "timelines": timelines}
    finally:
        manager.waker.close()
        vm.destroy()


def restore_ms(vm: QemuVM, probe: str) -> float:
    """Save the running guest with QMP migrate to a file, stop QEMU, then time a fresh QEMU started with
    ``-incoming`` from that file until the guest answers (the anchor a wake-up must beat)."""
    with tempfile.TemporaryDirectory(prefix="xenswap-bench-") as tmp:
        state = Path(tmp) / "state"
        vm.qmp("migrate-set-parameters", {"max-bandwidth": 10 << 30})
        vm.qmp("migrate", {"uri": f"exec:cat > {state}"})
        while vm.qmp("query-migrate").get("status") not in ("completed", "failed"):
            time.sleep(0.01)
        old_pid = vm.pid
        os.kill(old_pid, signal.SIGKILL)
        while Path(f"/proc/{old_pid}").exists():
            time.sleep(0.01)
        argv = [*qemu_argv(vm.config, vm.state_dir), "-incoming", f"exec:cat {state}"]
        argv[0] = subprocess.run(["which", argv[0]], capture_output=True, text=True).stdout.strip()
        t0 = time.monotonic()
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)
        vm.config.pid = int((vm.state_dir / "qemu.pid").read_text().strip())
        vm._save()
        for f in ("ram.json",):
            (vm.state_dir / f).unlink(missing_ok=True)
        deadline = time.monotonic() + 30
        while True:
            # Short probe timeouts: a probe sent before the new QEMU opened the tap is lost, and waiting the
            # whole second for it would add up to 1 s to the restore (what it measured at first here).
            try:
                if probe == "ping":
                    ping_ms(vm.ip, timeout=0.1)
                else:
                    http_get(vm.ip, timeout=0.5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        return (time.monotonic() - t0) * 1000


# ---------------------------------------------------------------- working-set table and plot (docs/working-sets.md)

POSTER_PAGES = {  # the poster's table: 4 KiB pages of an idle Linux VM under instrumented Xen
    "Idle VM": 445, "Idle shell": 725, "Ping response": 776, "Idle ssh": 805, "Copy out 20 MB": 856,
    "Copy in 20 MB": 7723, "find / -name '*'": 6098, "One-minute editor session": 1432,
}


def ssh_argv(key: Path, ip: str) -> list[str]:
    return ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", f"root@{ip}"]


def bench_ws_table(mem: int, window: float, reps: int) -> dict:
    """Each row: clear (page the guest out entirely), run the activity, count the guest frames faulted back."""
    from xenswap.hv.qemu.memory_events import measure_event

    hv = open_hypervisor()
    subnet = f"10.{120 + os.getpid() % 30}.{os.getpid() % 250}"
    vm = QemuVM.create(f"{TAG}ws", mem_mib=mem, ip=f"{subnet}.2/24", timeout=300)
    manager = Manager(hv, mechanism_factory_for(hv))
    mech = manager.mechanism(vm.name)
    rows: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="xenswap-ws-") as tmp:
        key = Path(tmp) / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        blob = Path(tmp) / "blob"
        blob.write_bytes(os.urandom(20 << 20))
        pub = (Path(tmp) / "key.pub").read_text().strip()
        vm.console.run(f"mkdir -p /root/.ssh && echo '{pub}' > /root/.ssh/authorized_keys && "
                       "dd if=/dev/urandom of=/www/blob bs=1M count=20 2>/dev/null", timeout=120, check=True)
        ssh = ssh_argv(key, vm.ip)
        subprocess.run([*ssh, "true"], check=True, timeout=120)  # dropbear makes its host key now

        def during(label: str, action) -> None:
            for _ in range(reps):
                mech.accessed_pages_and_clear()
                action()
                time.sleep(1)
                rows.setdefault(label, []).append(len(mech.accessed_pages_and_clear()))
                log(f"WS: {label}: {rows[label][-1]} pages")

        during("Idle VM", lambda: time.sleep(window))
        # Our guest always has a shell on its console; "idle shell" = that shell right after a command.
        during("Idle shell", lambda: (vm.console.run("true"), time.sleep(window)))
        during("Ping response", lambda: ping_ms(vm.ip))
        session = subprocess.Popen([*ssh, "sleep 3600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        time.sleep(3)
        during("Idle ssh", lambda: time.sleep(window))
        session.kill()
        session.wait()
        during("Copy out 20 MB", lambda: subprocess.run([*ssh, "cat /www/blob"], stdout=subprocess.DEVNULL,
                                                         check=True, timeout=600))

        vm.console.run("rm -f /www/blob", check=True)  # the guest's root is a RAM disk: make room for copy-in

        def copy_in() -> None:
            with open(blob, "rb") as f:
                subprocess.run([*ssh, "cat > /root/in; rm -f /root/in"], stdin=f, check=True, timeout=600)

        during("Copy in 20 MB", copy_in)
        during("find / -name '*'", lambda: vm.console.run("find / -name '*' >/dev/null 2>&1", timeout=300))
        during("One-minute editor session", lambda: vm.console.run(
            "for i in $(seq 60); do echo \"line $i of my notes\" >> /root/notes; sed -i 's/notes/NOTES/' "
            "/root/notes; sleep 1; done; rm -f /root/notes", timeout=120))
        for event in ("ping", "tcp", "http", "console", "disk"):
            for _ in range(reps):
                rows.setdefault(f"event: {event}", []).append(len(measure_event(vm, mech, event)[0]))
    vm.destroy()
    return {"window_s": window, "reps": reps, "mem_mib": mem, "rows": rows}


def bench_ws_plot(mem: int, duration: float, interval: float, png: Path) -> dict:
    """WSS of an idle guest over time: frames touched in each interval, and distinct frames since the start."""
    hv = open_hypervisor()
    vm = QemuVM.create(f"{TAG}wp", mem_mib=mem, network=False, timeout=300)
    manager = Manager(hv, mechanism_factory_for(hv))
    mech = manager.mechanism(vm.name)
    times, per_interval, cumulative = [], [], []
    seen: set[int] = set()
    try:
        mech.accessed_pages_and_clear()
        t0 = time.monotonic()
        while time.monotonic() - t0 < duration:
            time.sleep(interval)
            touched = mech.accessed_pages_and_clear()
            seen.update(touched)
            times.append((time.monotonic() - t0) / 60)
            per_interval.append(len(touched))
            cumulative.append(len(seen))
    finally:
        vm.destroy()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(times, per_interval, label=f"pages touched per {interval:.0f} s")
    ax.plot(times, cumulative, label="distinct pages touched since start")
    ax.set_xlabel("minutes idle")
    ax.set_ylabel("4 KiB pages")
    ax.set_title(f"Working set of an idle {mem} MiB guest (QEMU TCG), {duration / 60:.0f} min")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return {"duration_s": duration, "interval_s": interval, "per_interval": per_interval, "cumulative": cumulative}


# ---------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(p1: dict | None, p2: dict | None) -> None:
    if p1:
        print(f"P1: host memory per idle guest, N={p1['n']} guests of {p1['mem_mib']} MiB, boot {p1['boot']}"
              f"{' (private kernel copies)' if p1.get('private_kernel') else ''} "
              f"(median boot {p1['boot_s_median'] or float('nan'):.1f} s; settled {p1['settle_s']:.0f} s; "
              f"idle WSS {p1['idle_wss_kib_mean'] / 1024:.1f} MiB)")
        print(f"  {'':28s} {'PSS':>7s} {'+unmapped':>9s} {'=total':>7s} {'(upper)':>8s}   PSS: "
              "guest RAM / QEMU anon / kernel file / other files")
        for label in ("resident", "managed", "paused"):
            f = p1.get(label)
            if not f:
                continue
            total = f["pss_kib_per_vm"] + f["unmapped_swapcache_kib_per_vm"]
            upper = f["pss_kib_per_vm"] + f["swapcache_growth_kib_per_vm"]
            b = f["pss_breakdown_kib_per_vm"]
            print(f"  {label:28s} {f['pss_kib_per_vm'] / 1024:7.1f} {f['unmapped_swapcache_kib_per_vm'] / 1024:9.1f} "
                  f"{total / 1024:7.1f} {upper / 1024:8.1f}   "
                  f"{b['guest_ram'] / 1024:.1f} / {b['qemu_anon'] / 1024:.1f} / {b['kernel_file'] / 1024:.1f} / "
                  f"{b['other_files'] / 1024:.1f}  (MiB per guest)")
        res = p1["resident"]["pss_kib_per_vm"] + p1["resident"]["unmapped_swapcache_kib_per_vm"]
        for label in ("managed", "paused"):
            f = p1.get(label)
            if f:
                print(f"  ratio resident/{label}: "
                      f"{res / (f['pss_kib_per_vm'] + f['unmapped_swapcache_kib_per_vm']):.1f}x")
    if p2:
        s = p2["scenarios"]
        print(f"P2: wake-to-reply, median of {p2['reps']} (ms), [min-max]")
        print(f"  {'scenario':48s} {'ping':>20s} {'http':>20s}")
        for scenario, metrics in s.items():
            cells = []
            for metric in ("ping_ms", "http_ms"):
                v = metrics.get(metric, [])
                cells.append(f"{median(v):7.1f} [{min(v):5.1f}-{max(v):5.1f}]" if v else f"{'':20s}")
            print(f"  {scenario:48s} {cells[0]:>20s} {cells[1]:>20s}")
        res = s["resident"]
        rst = s.get("QMP save + restore", {})
        for config in p2.get("configs", []):
            pre, dem = s[f"paused [{config}], prefetch"], s[f"paused [{config}], demand paging"]
            for metric in ("ping_ms", "http_ms"):
                print(f"  [{config}] {metric[:-3]}: demand/prefetch {median(dem[metric]) / median(pre[metric]):.2f}x, "
                      f"prefetch/resident {median(pre[metric]) / median(res[metric]):.2f}x, "
                      f"restore/prefetch {median(rst.get(metric, [float('nan')])) / median(pre[metric]):.2f}x")
        print("  wake-up timeline, median ms after the frame reached the tap (waker saw it, state loaded, guest "
              "prefetch, QEMU prefetch, resumed):")
        for label, by_metric in p2.get("timelines", {}).items():
            for metric, lines in by_metric.items():
                steps = ("seen_ms", "state", "prefetch", "prefetch_hypervisor", "resume")
                figures = " ".join(f"{median([t[k] for t in lines if k in t]):6.1f}" for k in steps)
                events = ",".join(sorted({t["event"] for t in lines}))
                print(f"    {label:44s} {metric[:-3]:5s} {figures}  (woken as {events})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="P1 guests (default 20)")
    parser.add_argument("--mem", type=int, default=128, help="guest MiB (default 128)")
    parser.add_argument("--boot", choices=["pvh", "bzimage"], default="pvh",
                        help="P1 guests' kernel: uncompressed vmlinux at its PVH entry (QEMU keeps the file mapped) "
                             "or the compressed bzImage (read into QEMU's own memory)")
    parser.add_argument("--no-paused", action="store_true", help="P1 without the paused phase")
    parser.add_argument("--private-kernel", action="store_true",
                        help="P1: each guest boots its own copy of the kernel file (experiment)")
    parser.add_argument("--settle", type=float, default=30, help="P1 idle seconds before measuring (default 30)")
    parser.add_argument("--reps", type=int, default=5, help="P2 repetitions (default 5)")
    parser.add_argument("--p2-configs", default=",".join(DEFAULT_P2_CONFIGS),
                        help=f"P2 wake-up configurations to compare: before, or features joined by + "
                             f"({', '.join(P2_FEATURES)})")
    parser.add_argument("--no-restore", action="store_true", help="P2 without the QMP save + restore anchor")
    parser.add_argument("--only", choices=["p1", "p2", "ws-table", "ws-plot"], help="run one part")
    parser.add_argument("--window", type=float, default=30, help="ws-table idle window (s), default 30")
    parser.add_argument("--duration", type=float, default=1200, help="ws-plot idle run (s), default 1200")
    parser.add_argument("--png", type=Path, default=Path("docs/wss-idle.png"), help="ws-plot output")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = parser.parse_args()
    ensure_swap()
    if args.only == "ws-table":
        table = bench_ws_table(args.mem, args.window, args.reps)
        print(f"{'activity':32s} {'ours (pages)':>14s} {'ours (MiB)':>10s} {'poster (pages)':>14s}")
        for label, values in table["rows"].items():
            pages = statistics.median(values)
            print(f"{label:32s} {pages:14.0f} {pages * 4 / 1024:10.1f} {POSTER_PAGES.get(label, ''):>14}")
        if args.json:
            print(json.dumps(table, indent=2))
        return 0
    if args.only == "ws-plot":
        plot = bench_ws_plot(args.mem, args.duration, 10.0, args.png)
        print(f"wrote {args.png}: median {statistics.median(plot['per_interval'])} pages per 10 s, "
              f"{plot['cumulative'][-1]} distinct pages in {args.duration:.0f} s")
        if args.json:
            print(json.dumps(plot))
        return 0
    p1 = (bench_p1(args.n, args.mem, args.settle, args.boot, not args.no_paused, args.private_kernel)
          if args.only in (None, "p1") else None)
    configs = tuple(c for c in args.p2_configs.split(",") if c)
    try:
        for config in configs:
            p2_features(config)
    except ValueError as exc:
        parser.error(str(exc))
    p2 = bench_p2(args.mem, args.reps, configs, not args.no_restore) if args.only in (None, "p2") else None
    report(p1, p2)
    if args.json:
        print(json.dumps({"p1": p1, "p2": p2}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
