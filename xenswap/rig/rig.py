"""The nested Xen rig: Debian's Xen 4.17 booted inside ``qemu-system-x86_64 -accel tcg``, with a command
channel into its dom0.

* QEMU loads the hypervisor as a multiboot kernel; the first multiboot module is the dom0 kernel (with its
  command line), the second the dom0 initramfs (see xenswap.rig.image).
* The command channel is a virtio-serial port (``xenswap.cmd``) backed by a unix socket on the host; the
  dom0 agent runs each request as a shell command and streams back its output and exit status
  (xenswap.rig.framing).
* The checkout and the xenswap cache are 9p shares, read-only, mounted in dom0 at /mnt/checkout and
  /mnt/cache, so dom0 runs the checkout's tests and finds the guest images the host built.

Traps (measured, see docs): ``-cpu max`` crashes the PV dom0 unless SMAP is off, hence ``qemu64,+svm,+npt``
(NPT is needed for HAP, and Debian's Xen has no shadow paging, so no PVH/HVM without it).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import xenswap
from xenswap.config import cache_dir, run_dir
from xenswap.errors import MissingTool, XenswapError
from xenswap.rig.framing import FrameDecoder, encode_json
from xenswap.rig.image import DOM0_CACHE, DOM0_CHECKOUT, build_rig_image

QEMU = "qemu-system-x86_64"
CPU_MODEL = "qemu64,+svm,+npt"
PORT_NAME = "xenswap.cmd"

# Console lines after which waiting for dom0 is pointless.
FATAL_MARKERS = [
    "Hardware Dom0 crashed",
    "Kernel panic - not syncing",
    "(XEN) Panic on CPU",
    "Domain 0 (vcpu#0) crashed",
]


class RigError(XenswapError):
    """The rig failed: boot timeout, QEMU died, lost command channel."""


class RigBootTimeout(RigError):
    pass


class RigNotRunning(RigError):
    def __init__(self, state_dir: Path):
        super().__init__(f"no rig running (state in {state_dir}): start one with 'xenswap rig boot'")


def checkout_root() -> Path:
    """The source checkout this xenswap runs from (shared into dom0)."""
    root = Path(xenswap.__file__).resolve().parents[1]
    if not (root / "tests").is_dir():
        raise RigError(f"xenswap at {root} is not a source checkout (no tests/): the rig shares a checkout into dom0")
    return root


def default_state_dir() -> Path:
    return run_dir() / "rig"


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_bytes()[-64000:].decode(errors="replace")
    except OSError:
        return "(no serial log)"
    return "\n".join(text.splitlines()[-lines:])


XEN_KINDS = ("stock", "patched")


def patched_hypervisor(check_only: bool = False) -> Path:
    """The patched Xen 4.17 hypervisor ELF (hypervisor-patches/: paging, sharing, our two patches), built by
    ``hypervisor-patches/xenbuild.py`` when its cache has no build for the current patches (about 2.5 minutes
    on two cores; needs root for apt and setup/apt-xenbuild.txt). The build's progress goes to stderr.

    With ``check_only`` nothing is built: RigError if the build is not cached yet."""
    recipe = checkout_root() / "hypervisor-patches" / "xenbuild.py"
    args = [sys.executable, str(recipe), "--json"] + (["--check"] if check_only else [])
    proc = subprocess.run(args, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RigError(f"building the patched hypervisor failed ({' '.join(args)} exited {proc.returncode}; "
                       "its error is on stderr above)")
    info = json.loads(proc.stdout)
    elf = Path(info["dir"]) / "xen"
    if not elf.is_file():
        raise RigError(f"the patched hypervisor {info['key']} is not built yet ({elf} missing)")
    return elf


@dataclass
class BootConfig:
    xen: str = "stock"  # which hypervisor: "stock" is Debian's, "patched" ours; a path-like xen_path overrides it
    xen_path: Path | None = None  # a different hypervisor ELF (e.g. a patched build)
    memory_mib: int = 2048
    dom0_mem_mib: int = 1024
    smp: int = 2
    share_cache: bool = True
    xen_args: str = ""  # extra hypervisor command line
    dom0_args: str = ""  # extra dom0 kernel command line


class Channel:
    """Host end of the command channel (one connection to QEMU's chardev socket)."""

    def __init__(self, sock_path: Path):
        self.sock_path = sock_path
        self.sock: socket.socket | None = None
        self.decoder = FrameDecoder()

    def connect(self, deadline: float) -> None:
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.sock_path))
                self.sock = sock
                return
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise RigError(f"cannot connect to the rig's command socket {self.sock_path}") from None
                time.sleep(0.1)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(
        self,
        kind: str,
        payload: dict,
        timeout: float,
        on_output: Callable[[bytes], None] | None = None,
        still_alive: Callable[[], None] | None = None,
    ) -> tuple[int, bytes]:
        """Send one request, collect its output until END; ``still_alive`` is called about once a second
        and may raise to abort (QEMU died, dom0 crashed)."""
        if self.sock is None:
            raise RigError("command channel not connected")
        ident = secrets.token_hex(6)
        self.sock.sendall(encode_json(kind, ident, payload))
        output = bytearray()
        deadline = time.monotonic() + timeout
        self.sock.settimeout(1.0)
        while True:
            if time.monotonic() > deadline:
                raise RigError(f"no answer from dom0 within {timeout:g} s for {payload.get('cmd', kind)!r}")
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                data = None
            if data == b"":
                raise RigError("the rig's command channel closed (QEMU exited?)")
            if data is None:
                if still_alive is not None:
                    still_alive()
                continue
            for frame in self.decoder.feed(data):
                if frame.ident != ident:
                    continue  # the tail of an older, abandoned command
                if frame.kind == "OUT":
                    output += frame.payload
                    if on_output is not None:
                        on_output(frame.payload)
                elif frame.kind == "END":
                    return int(frame.json()["rc"]), bytes(output)


class Rig:
    """A running nested Xen rig. Use ``Rig.boot()`` (or ``Rig.attach()`` for one started by
    ``xenswap rig boot``); a context manager that shuts QEMU down on exit."""

    def __init__(self, state_dir: Path, pid: int, process: subprocess.Popen | None = None):
        self.state_dir = state_dir
        self.pid = pid
        self.process = process
        self.channel = Channel(state_dir / "cmd.sock")
        self.env: dict[str, str] = {}  # exported to every command run in dom0
        self.boot_seconds: float | None = None

    # -- paths --------------------------------------------------------------------------------------------
    @property
    def serial_log(self) -> Path:
        return self.state_dir / "serial.log"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def serial_tail(self, lines: int = 40) -> str:
        return tail(self.serial_log, lines)

    # -- lifecycle ------------------------------------------------------------------------------------------
    @classmethod
    def qemu_command(cls, config: BootConfig, state_dir: Path, xen: Path, kernel: Path, initrd: Path) -> list[str]:
        for path in (xen, kernel, initrd):
            if "," in str(path):
                raise RigError(f"{path}: QEMU's multiboot module list cannot hold a path with a comma")
        xen_cmdline = (
            f"console=com1 com1=115200,8n1 dom0_mem={config.dom0_mem_mib}M,max:{config.dom0_mem_mib}M "
            f"loglvl=all guest_loglvl=all noreboot {config.xen_args}"
        ).strip()
        dom0_cmdline = f"console=hvc0 earlyprintk=xen rdinit=/init {config.dom0_args}".strip()
        cmd = [
            QEMU, "-accel", "tcg", "-cpu", CPU_MODEL, "-m", str(config.memory_mib), "-smp", str(config.smp),
            "-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{state_dir / 'serial.log'}",
            "-kernel", str(xen), "-append", xen_cmdline,
            "-initrd", f"{kernel} {dom0_cmdline},{initrd}",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=cmd,path={state_dir / 'cmd.sock'},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=cmd,name={PORT_NAME}",
            "-virtfs", f"local,path={checkout_root()},mount_tag=checkout,security_model=none,readonly=on",
        ]
        if config.share_cache:
            cmd += ["-virtfs", f"local,path={cache_dir()},mount_tag=cache,security_model=none,readonly=on"]
        return cmd

    @classmethod
    def boot(
        cls,
        xen: str = "stock",
        xen_path: Path | str | None = None,
        timeout: float = 300.0,
        state_dir: Path | None = None,
        detach: bool = False,
        config: BootConfig | None = None,
        **overrides,
    ) -> Rig:
        """Build (cached) and boot the rig; returns once dom0 answers on the command channel.

        ``xen="patched"`` boots our patched build (built first if not cached, see patched_hypervisor);
        ``xen_path`` boots a different hypervisor ELF instead of Debian's (``xen="stock"``). ``detach`` leaves
        QEMU running after this process exits (``xenswap rig boot``). Raises RigBootTimeout with the tail of
        the serial log when dom0 does not come up within ``timeout`` seconds.
        """
        if shutil.which(QEMU) is None:
            raise MissingTool(QEMU, "qemu-system-x86")
        config = config or BootConfig(xen=xen, xen_path=Path(xen_path) if xen_path else None, **overrides)
        if config.xen not in XEN_KINDS and config.xen_path is None:
            raise RigError(f"unknown hypervisor {config.xen!r}: use xen='stock' or 'patched', or pass xen_path=")
        if config.xen == "patched" and config.xen_path is None:
            config.xen_path = patched_hypervisor()
        if config.xen_path is not None and not config.xen_path.is_file():
            raise RigError(f"hypervisor image {config.xen_path} does not exist (build it first, or boot xen='stock')")
        image = build_rig_image()
        xen_elf = config.xen_path or image.xen
        state_dir = state_dir or default_state_dir()
        existing = _read_state(state_dir)
        if existing and _pid_is_rig(existing.get("pid", 0), state_dir):
            raise RigError(f"a rig is already running (pid {existing['pid']}): 'xenswap rig stop' first")
        shutil.rmtree(state_dir, ignore_errors=True)
        state_dir.mkdir(parents=True)
        cmd = cls.qemu_command(config, state_dir, xen_elf, image.kernel, image.initrd)
        started = time.monotonic()
        with open(state_dir / "qemu.log", "wb") as qemu_log:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT,
                start_new_session=detach,  # a detached rig survives the CLI process and its Ctrl-C
            )
        rig = cls(state_dir, process.pid, process)
        rig._write_state({
            "pid": process.pid, "started": time.time(), "command": cmd, "xen": str(xen_elf),
            "xen_kind": "path" if config.xen_path and config.xen != "patched" else config.xen,
            "recipe_hash": image.recipe_hash, "ready": False,
        })
        try:
            rig._wait_ready(started + timeout, timeout)
        except BaseException:
            rig.shutdown()
            raise
        rig.boot_seconds = time.monotonic() - started
        rig._update_state(ready=True, boot_seconds=round(rig.boot_seconds, 2))
        return rig

    @classmethod
    def attach(cls, state_dir: Path | None = None) -> Rig:
        """The rig a previous ``xenswap rig boot`` left running."""
        state_dir = state_dir or default_state_dir()
        state = _read_state(state_dir)
        if not state or not _pid_is_rig(state.get("pid", 0), state_dir):
            raise RigNotRunning(state_dir)
        rig = cls(state_dir, int(state["pid"]))
        rig.env = dict(state.get("env") or {})
        rig.boot_seconds = state.get("boot_seconds")
        return rig

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        self.channel.connect(deadline)
        remaining = max(1.0, deadline - time.monotonic())
        try:
            rc, out = self.channel.request(
                "REQ", {"cmd": "echo dom0-ready", "timeout": 30}, remaining, still_alive=self._check_alive,
            )
        except RigError as exc:
            if isinstance(exc, RigBootTimeout):
                raise
            raise RigBootTimeout(
                f"the nested Xen rig did not come up within {timeout:g} s ({exc}); serial log "
                f"{self.serial_log}, last lines:\n{self.serial_tail()}"
            ) from None
        if rc != 0 or b"dom0-ready" not in out:
            raise RigBootTimeout(f"dom0 answered but not as expected (rc={rc}): {out[-300:]!r}")

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            qemu_log = tail(self.state_dir / "qemu.log", 10)
            raise RigBootTimeout(
                f"QEMU exited with status {self.process.returncode} before dom0 was ready:\n{qemu_log}\n"
                f"serial log, last lines:\n{self.serial_tail()}"
            )
        log = self.serial_tail(200)
        for marker in FATAL_MARKERS:
            if marker in log:
                raise RigBootTimeout(f"the nested Xen rig failed ({marker!r}); serial log, last lines:\n"
                                     f"{self.serial_tail()}")

    def _write_state(self, state: dict) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        tmp.rename(self.state_file)

    def _update_state(self, **changes) -> None:
        state = _read_state(self.state_dir) or {}
        state.update(changes)
        self._write_state(state)

    def set_env(self, **env: str) -> None:
        """Variables exported to every later command (remembered for ``xenswap rig run`` too)."""
        self.env.update(env)
        self._update_state(env=self.env)

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _pid_is_rig(self.pid, self.state_dir)

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop QEMU (dom0 holds nothing worth a clean shutdown: everything is in its RAM)."""
        self.channel.close()
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(grace)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        elif _pid_is_rig(self.pid, self.state_dir):
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _pid_is_rig(self.pid, self.state_dir) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_is_rig(self.pid, self.state_dir):
                os.kill(self.pid, signal.SIGKILL)
        self._update_state(ready=False, stopped=time.time())

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # -- commands ---------------------------------------------------------------------------------------------
    def _ensure_connected(self) -> None:
        if self.channel.sock is None:
            if not self.alive():
                raise RigNotRunning(self.state_dir)
            self.channel.connect(time.monotonic() + 10)

    def _check_running(self) -> None:
        if not self.alive():
            raise RigError(f"the rig's QEMU exited; serial log, last lines:\n{self.serial_tail()}")

    def run(
        self,
        cmd: str,
        timeout: float = 600.0,
        env: dict[str, str] | None = None,
        cwd: str = DOM0_CHECKOUT,
        on_output: Callable[[bytes], None] | None = None,
    ) -> tuple[int, str]:
        """Run a shell command in dom0; returns (exit status, combined stdout+stderr). Status 124 means the
        command hit ``timeout`` and was killed in dom0."""
        self._ensure_connected()
        payload = {"cmd": cmd, "timeout": timeout, "env": {**self.env, **(env or {})}, "cwd": cwd}
        rc, out = self.channel.request("REQ", payload, timeout + 30, on_output, still_alive=self._check_running)
        return rc, out.decode(errors="replace")

    def copy_in(self, source: Path | bytes, dest: str, mode: int = 0o644, timeout: float = 300.0) -> None:
        """Write a host file (or bytes) to ``dest`` in dom0 (through the channel; for big files prefer the
        9p shares, see dom0_path)."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        self._ensure_connected()
        payload = {"path": dest, "mode": mode, "data": base64.b64encode(data).decode()}
        rc, out = self.channel.request("PUT", payload, timeout, still_alive=self._check_running)
        if rc != 0:
            raise RigError(f"copy to dom0:{dest} failed: {out.decode(errors='replace').strip()}")

    def dom0_path(self, host_path: Path | str) -> str:
        """Where a host file under the checkout or the cache appears inside dom0 (the 9p shares)."""
        path = Path(host_path).resolve()
        for base, mount in ((checkout_root(), DOM0_CHECKOUT), (cache_dir().resolve(), DOM0_CACHE)):
            if path.is_relative_to(base):
                return f"{mount}/{path.relative_to(base)}"
        raise RigError(f"{path} is neither in the checkout nor in the cache: dom0 cannot see it (use copy_in)")


def _read_state(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _pid_is_rig(pid: int, state_dir: Path) -> bool:
    """True if ``pid`` is alive and is this rig's QEMU (not a recycled pid)."""
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return QEMU in cmdline and str(state_dir / "cmd.sock") in cmdline
