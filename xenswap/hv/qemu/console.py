"""A guest's serial console: run shell commands over it and wait for lines in its log.

QEMU serves the guest's ttyS0 on a unix socket and also writes everything the guest prints to a log
file. ``run`` sends one command framed by markers that only appear in the *output* (the typed line
spells them with an empty quote pair inside, so the terminal's echo of the command never matches),
and returns what the command printed between them. A per-VM lock file serialises users, because
QEMU serves one socket client at a time.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import socket
import time
from pathlib import Path

from xenswap.errors import XenswapError

_CTRL_C = b"\x03"
_KILL_LINE = b"\x15"  # Ctrl-U: drop anything half-typed on the console's current line


class ConsoleError(XenswapError):
    """The console did not answer, or a command did not finish in time."""


class CommandFailed(XenswapError):
    def __init__(self, command: str, status: int, output: str):
        self.status = status
        self.output = output
        tail = output.strip().splitlines()[-1:] or [""]
        super().__init__(f"guest command {command!r} exited with {status}: {tail[0][:200]}")


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


class SerialConsole:
    def __init__(self, socket_path: Path, log_path: Path, lock_path: Path):
        self.socket_path = socket_path
        self.log_path = log_path
        self.lock_path = lock_path

    def log_text(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(since)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().replace("\r", "").splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout: float, since: int = 0, window: int = 8192) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the serial log after byte offset ``since``.

        The log is read incrementally; a match may span reads as long as it fits in ``window`` bytes.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        offset, text = since, ""
        while True:
            size = self.log_size()
            if size > offset:
                text = (text + self.log_text(offset))[-max(window, size - offset):]
                offset = size
                match = regex.search(text)
                if match:
                    return match
            if time.monotonic() >= deadline:
                raise ConsoleError(f"{pattern!r} did not appear on the console within {timeout:.0f}s")
            time.sleep(0.05)

    def run(self, cmd: str, timeout: float = 30.0, check: bool = False) -> str:
        """Run ``cmd`` in the guest's console shell; returns its output (stdout and stderr, newlines only)."""
        status, output = self.run_status(cmd, timeout)
        if check and status != 0:
            raise CommandFailed(cmd, status, output)
        return output

    def run_status(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        nonce = secrets.token_hex(6)
        begin, end = f"XSB{nonce}", f"XSE{nonce}"
        # The '' splits each marker in the echoed input; eval keeps multi-line commands in one unit, and the
        # subshell keeps the console's shell alive through an "exit" (state such as cd does not persist).
        line = f"echo {begin[:3]}''{begin[3:]}; (eval {_shell_quote(cmd)}); echo {end[:3]}''{end[3:]} $?\n"
        begin_bytes = begin.encode()
        end_pattern = re.compile(re.escape(end).encode() + rb" (\d+)\r?\n")
        deadline = time.monotonic() + timeout
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            self._lock(lock, deadline)
            with self._connect(deadline) as sock:
                sock.sendall(_KILL_LINE + line.encode())
                received = bytearray()
                output_start = -1  # index in ``received`` just after the begin marker's line
                scanned = 0  # everything before this was searched for the end marker already
                while True:
                    if output_start < 0:
                        at = received.find(begin_bytes)
                        newline = received.find(b"\n", at) if at >= 0 else -1
                        if newline >= 0:
                            output_start = scanned = newline + 1
                    if output_start >= 0:
                        match = end_pattern.search(received, max(output_start, scanned - len(end) - 16))
                        if match:
                            output = bytes(received[output_start : match.start()]).decode(errors="replace")
                            return int(match.group(1)), output.replace("\r\n", "\n").replace("\r", "")
                        scanned = len(received)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        sock.sendall(_CTRL_C)  # stop the command so the console is usable again
                        tail = received.decode(errors="replace").replace("\r", "")[-300:]
                        raise ConsoleError(f"guest command {cmd!r} did not finish within {timeout:.0f}s: {tail!r}")
                    sock.settimeout(min(remaining, 1.0))
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        raise ConsoleError(f"console socket {self.socket_path} closed (did the VM stop?)")
                    received += chunk

    def attach(self, stdin_fd: int = 0, stdout_fd: int = 1, escape: bytes = b"\x1d") -> None:
        """Interactive session on the console until ``escape`` (Ctrl-]) is typed or the VM goes away. The
        local terminal is put in raw mode so keys such as Ctrl-C reach the guest."""
        import select
        import termios
        import tty

        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            self._lock(lock, time.monotonic() + 5)
            with self._connect(time.monotonic() + 5) as sock:
                saved = termios.tcgetattr(stdin_fd) if os.isatty(stdin_fd) else None
                try:
                    if saved is not None:
                        tty.setraw(stdin_fd)
                    sock.sendall(b"\n")  # show a fresh prompt
                    while True:
                        readable, _, _ = select.select([sock, stdin_fd], [], [])
                        if sock in readable:
                            data = sock.recv(65536)
                            if not data:
                                return
                            os.write(stdout_fd, data)
                        if stdin_fd in readable:
                            data = os.read(stdin_fd, 1024)
                            if not data or escape in data:
                                return
                            sock.sendall(data)
                finally:
                    if saved is not None:
                        termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)

    def _lock(self, lock, deadline: float) -> None:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ConsoleError(f"console of {self.socket_path.parent.name} is busy (lock held)") from None
                time.sleep(0.05)

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise ConsoleError(f"cannot connect to the console at {self.socket_path}: {exc}") from exc
        return sock
