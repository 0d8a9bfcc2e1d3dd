"""A reproducible initramfs writer: the cpio "newc" format, gzip-compressed, with fixed owners and times.

Written in Python rather than with cpio(1) so that an unprivileged build can add device nodes
(/dev/console must exist before devtmpfs is mounted, or init starts without a console) and so that the
archive is byte-identical for the same inputs (sorted entries, inode numbers in order, mtime 0).
"""

from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass
from pathlib import Path

_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    path: str  # inside the archive, without a leading slash
    mode: int  # full st_mode (type bits + permissions)
    data: bytes = b""  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node


class Archive:
    """Collects entries by path; parent directories are added automatically."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __contains__(self, path: str) -> bool:
        return path.strip("/") in self._entries

    def paths(self) -> list[str]:
        return sorted(self._entries)

    def _add(self, entry: Entry) -> None:
        path = entry.path.strip("/")
        parent = path.rpartition("/")[0]
        if parent and parent not in self._entries:
            self.directory(parent)
        self._entries[path] = Entry(path, entry.mode, entry.data, entry.rdev)

    def directory(self, path: str, perm: int = 0o755) -> None:
        self._add(Entry(path, stat.S_IFDIR | perm))

    def file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self._add(Entry(path, stat.S_IFREG | perm, data))

    def copy(self, path: str, source: Path, perm: int | None = None) -> None:
        mode = source.stat().st_mode
        self.file(path, source.read_bytes(), stat.S_IMODE(mode) if perm is None else perm)

    def symlink(self, path: str, target: str) -> None:
        self._add(Entry(path, stat.S_IFLNK | 0o777, target.encode()))

    def char_device(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._add(Entry(path, stat.S_IFCHR | perm, rdev=(major, minor)))

    def to_bytes(self) -> bytes:
        """The uncompressed newc archive (parents sort before children, so extraction order works)."""
        out = io.BytesIO()
        for ino, path in enumerate(sorted(self._entries), start=1):
            _write_record(out, self._entries[path], ino)
        _write_record(out, Entry(_TRAILER, 0), 0)
        return out.getvalue()

    def write_gzip(self, target: Path) -> None:
        raw = self.to_bytes()
        # mtime=0 and no file name in the gzip header: same input, same bytes
        with open(target, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
            gz.write(raw)


def _pad(out: io.BytesIO) -> None:
    out.write(b"\0" * (-out.tell() % 4))


def _write_record(out: io.BytesIO, entry: Entry, ino: int) -> None:
    name = entry.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = [
        ino, entry.mode, 0, 0, nlink, 0,  # ino, mode, uid, gid, nlink, mtime
        len(entry.data), 0, 0,  # filesize, dev major/minor
        entry.rdev[0], entry.rdev[1], len(name), 0,  # rdev major/minor, namesize, check
    ]
    out.write(b"070701" + b"".join(f"{v:08x}".encode() for v in fields))
    out.write(name)
    _pad(out)
    out.write(entry.data)
    _pad(out)
