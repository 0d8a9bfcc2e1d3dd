"""Thin helpers around ``xl`` for creating and destroying small guests in a Xen dom0 (tests and the rig use
them; the toolstack itself stays xl). Guest consoles are logged by ``xenconsoled --log=guest`` to
/var/log/xen/console/guest-NAME.log, which is where boot markers are looked for."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from xenswap.errors import MissingTool, XenswapError
from xenswap.hv.xen.xenstore import XenStore

CONSOLE_LOG_DIR = Path("/var/log/xen/console")
CONFIG_DIR = Path("/run/xenswap/xl")
GUEST_UP_MARKER = "XENSWAP_GUEST_UP"


@dataclass
class GuestSpec:
    name: str
    kernel: Path
    initrd: Path
    kind: str = "pv"  # "pv" or "pvh" (no device model needed for either)
    memory_mib: int = 128
    vcpus: int = 1
    cmdline: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # further raw xl.cfg settings

    def config(self) -> str:
        if self.kind not in ("pv", "pvh"):
            raise XenswapError(f"guest type {self.kind!r} not supported here (pv or pvh)")
        args = f"console=hvc0 xenswap.hostname={self.name} {self.cmdline}".strip()
        lines = {
            "name": f'"{self.name}"',
            "type": f'"{self.kind}"',
            "kernel": f'"{self.kernel}"',
            "ramdisk": f'"{self.initrd}"',
            "extra": f'"{args}"',
            "memory": str(self.memory_mib),
            "vcpus": str(self.vcpus),
            "on_crash": '"preserve"',
            **self.extra,
        }
        return "".join(f"{key} = {value}\n" for key, value in lines.items())


def _xl(*args: str, timeout: float = 180) -> str:
    if shutil.which("xl") is None:
        raise MissingTool("xl", "xen-utils-4.17")
    proc = subprocess.run(["xl", *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-800:]
        raise XenswapError(f"xl {' '.join(args)} failed ({proc.returncode}): {detail}")
    return proc.stdout


def console_log(name: str) -> Path:
    return CONSOLE_LOG_DIR / f"guest-{name}.log"


def create(spec: GuestSpec, timeout: float = 180) -> Path:
    """``xl create`` the guest; returns its config file. Clears an old console log of the same name so a
    marker found later belongs to this boot."""
    CONFIG_DIR.mkdir(parents=True, exist_ok=True)
    cfg = CONFIG_DIR / f"{spec.name}.cfg"
    cfg.write_text(spec.config())
    console_log(spec.name).unlink(missing_ok=True)
    _xl("create", str(cfg), timeout=timeout)
    return cfg


def destroy(name: str) -> None:
    """Destroy a domain if it exists (idempotent: for finalizers)."""
    if shutil.which("xl") is None:
        return
    subprocess.run(["xl", "destroy", name], capture_output=True, timeout=120)


def domid(name: str) -> int:
    return int(_xl("domid", name).strip())


def console_tty(name: str) -> str:
    """The pty xenconsoled gives the guest's console (what ``xl console`` attaches to)."""
    with XenStore() as store:
        tty = store.read(f"/local/domain/{domid(name)}/console/tty")
    if not tty:
        raise XenswapError(f"{name} has no console pty in xenstore (is xenconsoled running?)")
    return tty


def type_on_console(name: str, line: str) -> None:
    """Type one line on the guest's console, as if at its shell prompt."""
    with open(console_tty(name), "w") as pty:
        pty.write(line + "\n")


def console_command(name: str, command: str, timeout: float = 180.0) -> list[str]:
    """Run a shell command on the guest's console and return its output lines (the console log holds the echo
    of what was typed too: output lines carry a token prefix the echo cannot start with, and the end marker is
    computed by the guest's shell). Raises XenswapError with the log's tail when it does not finish in time."""
    token = secrets.token_hex(4)
    type_on_console(name, f"{command} 2>&1 | sed 's/^/{token}: /'; echo {token}-$((40+2))")
    wait_for_console(name, f"\n{token}-42", timeout, poll=0.05)
    return [line[len(token) + 2:] for line in _console_text(name).splitlines() if line.startswith(f"{token}: ")]


def _console_text(name: str) -> str:
    return console_log(name).read_text(errors="replace").replace("\r", "")


def wait_for_console(name: str, text: str, timeout: float, poll: float = 0.5) -> float:
    """Seconds until ``text`` appeared in the guest's console log (carriage returns dropped), polled every
    ``poll`` seconds; raises XenswapError with the log's tail."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if text in _console_text(name):
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(poll)
    try:
        last = "\n".join(_console_text(name).splitlines()[-20:])
    except OSError:
        last = "(no console log)"
    raise XenswapError(f"{text!r} not seen on {name}'s console within {timeout:g} s; last lines:\n{last}")


XENCTX = "/usr/lib/xen-4.17/bin/xenctx"


def state_report(console_lines: int = 15, dmesg_lines: int = 25) -> str:
    """What Xen and its guests look like now, for a failure's log: domains and their vCPUs (a vCPU paused on a
    paging request shows state "p"), the hypervisor's recent messages (a triple fault names the guest's RIP), and
    for each guest its console tail and its vCPUs' registers and code bytes (xenctx; Debian's kernel package
    carries no real System.map)."""
    def run(*argv: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (done.stdout + done.stderr).rstrip()
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{argv[0]}: {error}"

    listing = run("xl", "list")
    parts = [f"$ xl list\n{listing}", f"$ xl vcpu-list\n{run('xl', 'vcpu-list')}",
             f"$ xl dmesg | tail -{dmesg_lines}\n" + "\n".join(run("xl", "dmesg").splitlines()[-dmesg_lines:])]
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 2 or fields[1] == "0":
            continue
        name, domid = fields[0], fields[1]
        log = console_log(name)
        if log.exists():
            tail = log.read_text(errors="replace").replace("\r", "").splitlines()[-console_lines:]
            parts.append(f"$ tail {log}\n" + "\n".join(tail))
        parts.append(f"$ xenctx -C {domid}\n" + run(XENCTX, "-C", domid)[-2500:])
    return "\n".join(parts)
