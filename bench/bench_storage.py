"""Branching storage benchmark: xenswap's NBD server vs qemu-nbd serving a qcow2 overlay chain.

Both sides hold the same disk history on the same golden image: a raw golden image, then DEPTH generations
of scattered 4 KiB writes. qcow2 keeps one overlay file per generation (the chain a cloud builds with
snapshots); xenswap takes a snapshot per generation (flattened, so the disk reads through active delta ->
base delta -> golden whatever the depth). The same clients run the same workloads against each:

* libnbd's Python binding, one request at a time: 4 KiB random reads, 4 KiB random writes (then a flush),
  1 MiB sequential reads -- latency-bound, the client's own cost is in every figure;
* ``qemu-img bench`` (QEMU's NBD client, in C) with 16 requests in flight: 4 KiB scattered reads and writes,
  1 MiB sequential reads -- throughput-bound, the server is the bottleneck.

Each workload runs in alternating rounds on both sides (the median is kept), so load from other work on
the machine hits both alike. Printed: throughput of each side, the ratio ours/qcow2, and lookup memory.

Run: .venv/bin/python bench/bench_storage.py [--size-mib 256] [--depths 1,8,32] [--seconds 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xenswap.storage.store import Store

WRITES_PER_GENERATION = 64
BS = 4096

# Runs under Debian's python3 (python3-libnbd), so both servers see the very same client code.
CLIENT = r"""
import json, random, sys, time
import nbd
uri, workload, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(seed)
blocks = size // 4096
ops = 0
moved = 0
start = time.perf_counter()
deadline = start + seconds
if workload == "randread":
    while time.perf_counter() < deadline:
        for _ in range(200):
            h.pread(4096, rng.randrange(blocks) * 4096)
        ops += 200
    moved = ops * 4096
elif workload == "randwrite":
    buf = bytes(rng.randrange(256) for _ in range(4096))
    while time.perf_counter() < deadline:
        for _ in range(200):
            h.pwrite(buf, rng.randrange(blocks) * 4096)
        ops += 200
    h.flush()
    moved = ops * 4096
elif workload == "seqread":
    offset = 0
    while time.perf_counter() < deadline or ops == 0:
        h.pread(1 << 20, offset)
        offset = (offset + (1 << 20)) % size
        ops += 1
    moved = ops << 20
elapsed = time.perf_counter() - start
h.shutdown()
print(json.dumps({"ops": ops, "seconds": elapsed, "ops_per_s": ops / elapsed, "mib_per_s": moved / elapsed / 2**20}))
"""


def run(*cmd: str) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])}... failed: {proc.stderr}")
    return proc.stdout


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_socket(path: Path, proc: subprocess.Popen) -> None:
    for _ in range(500):
        if path.exists():
            return
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.returncode}")
        time.sleep(0.01)
    sys.exit(f"no socket {path}")


def make_golden(path: Path, size: int) -> None:
    rng = random.Random(0)
    chunk = rng.randbytes(1 << 20)
    with open(path, "wb") as f:
        for i in range(size >> 20):
            # Different bytes per MiB (so nothing dedups or compresses by accident), cheaply.
            f.write(chunk[i % 4096 :] + chunk[: i % 4096])


def history(size: int, depth: int) -> list[list[tuple[int, int]]]:
    """Per generation: (block, pattern byte) writes, the same for both sides."""
    rng = random.Random(depth)
    return [[(rng.randrange(size // BS), rng.randrange(1, 255)) for _ in range(WRITES_PER_GENERATION)]
            for _ in range(depth)]


def build_qcow2(work: Path, golden: Path, gens: list[list[tuple[int, int]]]) -> Path:
    backing = golden
    fmt = "raw"
    for i, gen in enumerate(gens):
        top = work / f"overlay{i}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", fmt, str(top))
        cmds = []
        for block, pattern in gen:
            cmds += ["-c", f"write -q -P {pattern} {block * BS} {BS}"]
        run("qemu-io", "-f", "qcow2", *cmds, str(top))
        backing, fmt = top, "qcow2"
    return backing


def build_ours(store: Store, name: str, gens: list[list[tuple[int, int]]]) -> None:
    store.branch(name, "golden")
    for i, gen in enumerate(gens):
        disk = store.open(name)
        for block, pattern in gen:
            disk.write(block * BS, bytes([pattern]) * BS)
        disk.close()
        if i < len(gens) - 1:  # the last generation stays in the active delta, like the qcow2 top
            store.snapshot(name, f"{name}-gen{i}")


def client(uri: str, workload: str, seconds: float, seed: int) -> dict:
    if workload.startswith("qd16-"):
        return qemu_bench(uri, workload)
    out = run("/usr/bin/python3", "-c", CLIENT, uri, workload, str(seconds), str(seed))
    return json.loads(out)


# qemu-img bench: QEMU's own NBD client in C with 16 requests in flight, so the server is the bottleneck.
# 4 KiB requests advance by 257 blocks, modulo the disk (QEMU 7.2 wraps with %), which is coprime with the
# number of blocks: every block is visited once per pass in a scattered order.
QEMU_BENCH = {
    "qd16-read": ["-c", "20000", "-d", "16", "-s", "4096", "-S", str(257 * BS)],
    "qd16-write": ["-w", "-c", "20000", "-d", "16", "-s", "4096", "-S", str(257 * BS)],
    "qd16-seqread": ["-c", "512", "-d", "16", "-s", "1M", "-S", "1M"],
}


def qemu_bench(uri: str, workload: str) -> dict:
    args = QEMU_BENCH[workload]
    count = int(args[args.index("-c") + 1])
    size = BS if "4096" in args else 1 << 20
    out = run("qemu-img", "bench", "-f", "raw", *args, uri)
    seconds = float(out.split("Run completed in")[1].split()[0])
    return {"ops": count, "seconds": seconds, "ops_per_s": count / seconds, "mib_per_s": count * size / seconds / 2**20}


WORKLOADS = [
    ("randread", "4k IOPS", "libnbd QD1, 4 KiB random reads"),
    ("randwrite", "4k IOPS", "libnbd QD1, 4 KiB random writes + flush"),
    ("seqread", "MiB/s", "libnbd QD1, 1 MiB sequential reads"),
    ("qd16-read", "4k IOPS", "qemu-img bench QD16, 4 KiB scattered reads"),
    ("qd16-write", "4k IOPS", "qemu-img bench QD16, 4 KiB scattered writes"),
    ("qd16-seqread", "MiB/s", "qemu-img bench QD16, 1 MiB sequential reads"),
]


ALL_WORKLOADS = [("cold-qd16-read", "4k IOPS", "fresh server, one QD16 pass over every block"), *WORKLOADS]


def start_server(side: str, store_root: Path, name: str, chain_top: Path, sock: Path) -> tuple[subprocess.Popen, str]:
    if side == "qcow2":
        proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(sock), "-t", "-e", "4", "-x", "disk",
                                 "--cache=writeback", str(chain_top)])
        uri = f"nbd+unix:///disk?socket={sock}"
    else:
        proc = subprocess.Popen([sys.executable, "-m", "xenswap.storage", "serve", "--store", str(store_root),
                                 "--socket", str(sock)], stdout=subprocess.DEVNULL)
        uri = f"nbd+unix:///{name}?socket={sock}"
    wait_socket(sock, proc)
    return proc, uri


def cold_reads(store_root: Path, name: str, chain_top: Path, qsock: Path, xsock: Path, size: int,
               rounds: int) -> dict[str, dict]:
    """A freshly started server reads every block once (QD16, scattered): all of its lookup metadata is
    cold -- qemu-nbd fills the L2 caches of every image in the chain, ours loads two maps from sqlite and
    checks each golden block's checksum the first time. (The files themselves stay in the page cache.)"""
    samples: dict[str, list[dict]] = {"ours": [], "qcow2": []}
    args = ["-c", str(size // BS), "-d", "16", "-s", "4096", "-S", str(257 * BS)]
    for r in range(rounds):
        for side in ("ours", "qcow2") if r % 2 == 0 else ("qcow2", "ours"):
            proc, uri = start_server(side, store_root, name, chain_top, xsock if side == "ours" else qsock)
            try:
                out = run("qemu-img", "bench", "-f", "raw", *args, uri)
            finally:
                proc.terminate()
                proc.wait()
            seconds = float(out.split("Run completed in")[1].split()[0])
            samples[side].append({"ops": size // BS, "seconds": seconds, "ops_per_s": size // BS / seconds,
                                  "mib_per_s": size / seconds / 2**20})
    result = {}
    for side, runs in samples.items():
        runs.sort(key=lambda x: x["ops_per_s"])
        result[side] = {**runs[len(runs) // 2], "all_ops_per_s": [round(x["ops_per_s"], 1) for x in runs]}
    return result


def interleaved(sides: dict[str, tuple[str, int]], rounds: int, seconds: float) -> dict[str, dict]:
    """Run every workload on each side in turns (the order flips each round), so that noise from other
    work on the machine hits both sides alike; keep the median of the rounds."""
    samples: dict[str, dict[str, list[dict]]] = {side: {} for side in sides}
    idle = {side: rss_kib(pid) for side, (_, pid) in sides.items()}
    names = list(sides)
    for r in range(rounds):
        for workload, _, _ in WORKLOADS:
            for side in names if r % 2 == 0 else names[::-1]:
                uri = sides[side][0]
                samples[side].setdefault(workload, []).append(client(uri, workload, seconds, seed=42 + r))
    out: dict[str, dict] = {}
    for side, (_, pid) in sides.items():
        result: dict = {"rss_idle_kib": idle[side], "rss_after_kib": rss_kib(pid)}
        for workload, runs in samples[side].items():
            runs.sort(key=lambda x: x["ops_per_s"])
            result[workload] = runs[len(runs) // 2]
            result[workload]["all_ops_per_s"] = [round(x["ops_per_s"], 1) for x in runs]
        out[side] = result
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--depths", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=1.0, help="per workload, side and round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median is kept)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not Path("/usr/lib/python3/dist-packages/nbd.py").exists():
        sys.exit("needs Debian's python3-libnbd (setup/apt-storage.txt)")
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="xenswap-bench-storage-", dir="/var/tmp"))
    rows = []
    try:
        golden = work / "golden.raw"
        make_golden(golden, size)
        store = Store(work / "store")
        store.create_golden("golden", source=str(golden))
        for depth in (int(d) for d in args.depths.split(",")):
            gens = history(size, depth)
            chain_top = build_qcow2(work, golden, gens)
            name = f"disk{depth}"
            build_ours(store, name, gens)
            opened = store.open(name, writable=False)
            own_map = opened.active.nbytes()
            shared_map = opened.base.nbytes()
            opened.close()
            qsock, xsock = work / f"qemu-{depth}.sock", work / f"xs-{depth}.sock"
            cold = cold_reads(store.root, name, chain_top, qsock, xsock, size, args.rounds)
            qemu = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(qsock), "-t", "-e", "4", "-x", "disk",
                                     "--cache=writeback", str(chain_top)])
            ours_proc = subprocess.Popen([sys.executable, "-m", "xenswap.storage", "serve", "--store",
                                          str(store.root), "--socket", str(xsock)], stdout=subprocess.DEVNULL)
            try:
                wait_socket(qsock, qemu)
                wait_socket(xsock, ours_proc)
                both = interleaved({"ours": (f"nbd+unix:///{name}?socket={xsock}", ours_proc.pid),
                                    "qcow2": (f"nbd+unix:///disk?socket={qsock}", qemu.pid)},
                                   args.rounds, args.seconds)
            finally:
                for proc in (qemu, ours_proc):
                    proc.terminate()
                    proc.wait()
            ours, theirs = both["ours"], both["qcow2"]
            ours["cold-qd16-read"], theirs["cold-qd16-read"] = cold["ours"], cold["qcow2"]
            for f in work.glob("overlay*.qcow2"):
                f.unlink()
            row = {"depth": depth, "ours": ours, "qcow2": theirs,
                   "qcow2_l2_cover_bytes": depth * (size // (64 << 10)) * 8,
                   "ours_map_bytes": {"active": own_map, "base_shared": shared_map}}
            for w, _, _ in ALL_WORKLOADS:
                row[f"ratio_{w}"] = ours[w]["ops_per_s"] / theirs[w]["ops_per_s"]
            rows.append(row)
            print_row(row)
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def print_row(row: dict) -> None:
    d = row["depth"]
    o, q = row["ours"], row["qcow2"]
    print(f"depth {d:>2}:")
    for w, unit, _ in ALL_WORKLOADS:
        key = "mib_per_s" if unit == "MiB/s" else "ops_per_s"
        print(f"  {w:<14} ours {o[w][key]:>9.0f}  qcow2 {q[w][key]:>9.0f} {unit:<8} ratio ours/qcow2 "
              f"{row[f'ratio_{w}']:.2f}x")
    mb = row["ours_map_bytes"]
    print(f"  lookup memory: ours map {mb['active'] / 1024:.1f} KiB own + {mb['base_shared'] / 1024:.1f} KiB "
          f"base (shared by every branch of the snapshot); qcow2 L2 tables to cover the disk "
          f"{row['qcow2_l2_cover_bytes'] / 1024:.0f} KiB ({d} image(s) x size x 8 / 64 KiB clusters)")
    print(f"  server RSS growth over the run: ours "
          f"{(o['rss_after_kib'] - o['rss_idle_kib']) / 1024:.1f} MiB, qemu-nbd "
          f"{(q['rss_after_kib'] - q['rss_idle_kib']) / 1024:.1f} MiB; RSS after ours "
          f"{o['rss_after_kib'] / 1024:.1f} MiB, qemu-nbd {q['rss_after_kib'] / 1024:.1f} MiB", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
