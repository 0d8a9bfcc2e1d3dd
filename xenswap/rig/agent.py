"""The dom0 side of the rig's command channel: reads framed requests from the virtio-serial port, runs each
as a shell command, streams its output back and ends with its exit status.

Runs inside the nested dom0 from its initramfs (standard library only, next to framing.py). One command at
a time: the host side is one connection anyway (QEMU's socket chardev accepts a single client).
"""

from __future__ import annotations

import base64
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    from xenswap.rig.framing import FrameDecoder, encode, encode_json
except ImportError:  # inside dom0 the agent runs from the initramfs, without the package
    from framing import FrameDecoder, encode, encode_json  # type: ignore[no-redef]

PORT_NAME = "xenswap.cmd"
CHUNK = 16384


def find_port(name: str = PORT_NAME) -> Path:
    for entry in Path("/sys/class/virtio-ports").glob("*"):
        try:
            if (entry / "name").read_text().strip() == name:
                return Path("/dev") / entry.name
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {name}")


class Agent:
    def __init__(self, fd: int):
        self.fd = fd

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            except OSError:
                return  # host gone: the output has nowhere to go, the command still finishes
            view = view[written:]

    def serve(self, stop_on_eof: bool = False) -> None:
        """Serve requests forever (``stop_on_eof``: return when the peer closes, for a socket peer in tests)."""
        decoder = FrameDecoder()
        while True:
            try:
                data = os.read(self.fd, CHUNK)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if not data and stop_on_eof:
                return
            if not data:
                # EOF means "host not connected" on a virtio-serial port; poll until someone connects
                time.sleep(0.1)
                continue
            for frame in decoder.feed(data):
                if frame.kind == "REQ":
                    self.run(frame.ident, frame.json())
                elif frame.kind == "PUT":
                    self.put(frame.ident, frame.json())

    def put(self, ident: str, req: dict) -> None:
        try:
            path = Path(req["path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(req["data"]))
            path.chmod(int(req.get("mode", 0o644)))
            rc = 0
        except (OSError, ValueError, KeyError) as exc:
            self.send(encode("OUT", ident, f"copy_in failed: {exc}\n".encode()))
            rc = 1
        self.send(encode_json("END", ident, {"rc": rc}))

    def run(self, ident: str, req: dict) -> None:
        env = dict(os.environ)
        env.update(req.get("env") or {})
        timeout = float(req.get("timeout") or 600)
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", req["cmd"]],
                cwd=req.get("cwd") or "/",
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so a timeout kills the whole process group
            )
        except OSError as exc:
            self.send(encode("OUT", ident, f"cannot start command: {exc}\n".encode()))
            self.send(encode_json("END", ident, {"rc": 127}))
            return
        deadline = time.monotonic() + timeout
        timed_out = False
        sel = selectors.DefaultSelector()
        assert proc.stdout is not None
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if sel.select(timeout=min(remaining, 1.0)):
                chunk = os.read(proc.stdout.fileno(), CHUNK)
                if not chunk:
                    break
                self.send(encode("OUT", ident, chunk))
        if timed_out:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.send(encode("OUT", ident, f"\n[rig agent: command timed out after {timeout:g} s]\n".encode()))
        rc = proc.wait()
        if timed_out:
            rc = 124
        elif rc < 0:
            rc = 128 - rc
        sel.close()
        proc.stdout.close()
        self.send(encode_json("END", ident, {"rc": rc}))


def main() -> int:
    port = find_port(sys.argv[1] if len(sys.argv) > 1 else PORT_NAME)
    fd = os.open(port, os.O_RDWR)
    print(f"xenswap rig agent serving on {port}", flush=True)
    Agent(fd).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
