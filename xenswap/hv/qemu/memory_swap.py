"""Host swap for paged-out guests: a swap file (default) or zram, set up idempotently by the project.

Swap capacity is a real limit (20 paged-out VMs filled a 2 GiB file in the probe), so the default file is
sized from the guests we expect, capped by free disk: ``XENSWAP_SWAP_MIB`` (default 4096) and never more
than a quarter of the free space. zram keeps compressed pages in RAM (lz4): faster wake-ups, less saving.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from xenswap.config import state_dir
from xenswap.errors import MissingTool, XenswapError

DEFAULT_SWAP_MIB = int(os.environ.get("XENSWAP_SWAP_MIB", "4096"))
SWAP_PRIORITY = 5  # above the kernel's default negative priorities, so our device is used first


@dataclass
class SwapDevice:
    path: str
    kind: str  # file, partition (zram shows as partition)
    size_kib: int
    used_kib: int
    priority: int

    def to_json(self) -> dict:
        return asdict(self)


def swap_devices() -> list[SwapDevice]:
    out = []
    with open("/proc/swaps") as f:
        next(f)
        for line in f:
            path, kind, size, used, prio = line.split()
            out.append(SwapDevice(path, kind, int(size), int(used), int(prio)))
    return out


def default_swap_file() -> Path:
    return state_dir() / "swap" / "swapfile"


def _run(*cmd: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise MissingTool(cmd[0], "util-linux")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise XenswapError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def setup_swap_file(path: Path | None = None, size_mib: int | None = None) -> SwapDevice:
    """Create (fallocate + mkswap) and enable a swap file; no-op when it is already active."""
    path = Path(path or default_swap_file())
    for dev in swap_devices():
        if dev.path == str(path):
            return dev
    size_mib = size_mib or DEFAULT_SWAP_MIB
    path.parent.mkdir(parents=True, exist_ok=True)
    free_mib = shutil.disk_usage(path.parent).free // (1024 * 1024)
    if size_mib > free_mib // 4:
        raise XenswapError(f"swap file of {size_mib} MiB would take more than a quarter of the {free_mib} MiB free "
                           f"in {path.parent}: choose --size-mib")
    if not path.exists() or path.stat().st_size != size_mib * 1024 * 1024:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, size_mib * 1024 * 1024)
        finally:
            os.close(fd)
        _run("mkswap", str(path))
    _run("swapon", "-p", str(SWAP_PRIORITY), str(path))
    return next(d for d in swap_devices() if d.path == str(path))


def setup_zram(size_mib: int | None = None, algorithm: str = "lz4", device: str = "zram0") -> SwapDevice:
    """Enable /dev/zramN as swap (compressed in RAM); no-op when it already is."""
    dev_path = f"/dev/{device}"
    for dev in swap_devices():
        if dev.path == dev_path:
            return dev
    sysfs = Path("/sys/block") / device
    if not sysfs.exists():
        raise XenswapError(f"{dev_path} does not exist (modprobe zram)")
    if int((sysfs / "disksize").read_text()) == 0:
        if algorithm in (sysfs / "comp_algorithm").read_text().replace("[", " ").replace("]", " ").split():
            (sysfs / "comp_algorithm").write_text(algorithm)
        (sysfs / "disksize").write_text(f"{(size_mib or DEFAULT_SWAP_MIB)}M")
    _run("mkswap", dev_path)
    _run("swapon", "-p", str(SWAP_PRIORITY), dev_path)
    return next(d for d in swap_devices() if d.path == dev_path)


def ensure_swap(kind: str = "file", size_mib: int | None = None) -> SwapDevice:
    """Use any active swap; otherwise set up ours (what the manager calls before its first page-out)."""
    active = swap_devices()
    if active:
        return max(active, key=lambda d: d.size_kib - d.used_kib)
    return setup_zram(size_mib) if kind == "zram" else setup_swap_file(size_mib=size_mib)


def teardown_swap(path: str | Path) -> None:
    """swapoff (brings swapped pages back to RAM first) and remove our swap file / reset zram."""
    path = str(path)
    if any(d.path == path for d in swap_devices()):
        _run("swapoff", path)
    if path.startswith("/dev/zram"):
        Path(f"/sys/block/{Path(path).name}/reset").write_text("1")
    else:
        Path(path).unlink(missing_ok=True)
