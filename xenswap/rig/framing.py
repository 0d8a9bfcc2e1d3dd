"""Framing of the rig's command channel (a virtio-serial port between the host and the nested dom0).

Standard library only: the same file runs inside dom0 (copied into its initramfs next to the agent).

A frame is ``MAGIC KIND ID LEN\\n`` followed by LEN payload bytes:

* host → dom0: ``REQ`` (payload: JSON ``{"cmd", "timeout", "env", "cwd"}``), ``PUT`` (JSON with base64 data)
* dom0 → host: ``OUT`` (a chunk of the command's combined stdout/stderr), ``END`` (JSON ``{"rc": int}``)

The magic lets a reader that connects in the middle of a stream (a second ``xenswap rig run`` after the
first one was interrupted) skip to the next frame boundary instead of misreading payload as headers, and
the request id lets it ignore the tail of an older command's output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAGIC = b"\x1eXSR1 "
KINDS = frozenset({"REQ", "PUT", "OUT", "END"})
MAX_PAYLOAD = 64 << 20


@dataclass(frozen=True)
class Frame:
    kind: str
    ident: str
    payload: bytes

    def json(self) -> dict:
        return json.loads(self.payload.decode())


def encode(kind: str, ident: str, payload: bytes) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind!r}")
    if not ident or any(c.isspace() for c in ident):
        raise ValueError(f"bad frame id {ident!r}")
    return MAGIC + f"{kind} {ident} {len(payload)}\n".encode() + payload


def encode_json(kind: str, ident: str, obj: dict) -> bytes:
    return encode(kind, ident, json.dumps(obj, sort_keys=True).encode())


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, collect whole frames. Garbage between frames
    (or a frame cut in half by a reconnect) is skipped up to the next magic."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.skipped = 0  # bytes thrown away while resynchronising (for diagnostics and tests)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while True:
            start = self._buf.find(MAGIC)
            if start < 0:
                # keep a possible partial magic at the end, drop the rest
                keep = len(MAGIC) - 1
                if len(self._buf) > keep:
                    self.skipped += len(self._buf) - keep
                    del self._buf[: len(self._buf) - keep]
                return frames
            if start:
                self.skipped += start
                del self._buf[:start]
            newline = self._buf.find(b"\n", len(MAGIC))
            if newline < 0:
                if len(self._buf) > len(MAGIC) + 128:  # a header is short: this was not one
                    self._drop_bad_magic()
                    continue
                return frames
            header = bytes(self._buf[len(MAGIC) : newline]).decode("ascii", "replace").split(" ")
            if len(header) != 3 or header[0] not in KINDS or not header[2].isdigit():
                self._drop_bad_magic()
                continue
            kind, ident, length = header[0], header[1], int(header[2])
            if length > MAX_PAYLOAD:
                self._drop_bad_magic()
                continue
            end = newline + 1 + length
            if len(self._buf) < end:
                return frames
            frames.append(Frame(kind, ident, bytes(self._buf[newline + 1 : end])))
            del self._buf[:end]

    def _drop_bad_magic(self) -> None:
        self.skipped += len(MAGIC)
        del self._buf[: len(MAGIC)]
