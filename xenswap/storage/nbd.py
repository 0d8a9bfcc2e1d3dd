"""An NBD server for the block store (asyncio), speaking the fixed newstyle protocol.

One export per object of the store: disks are read-write, golden images and snapshots read-only. Supported:
NBD_OPT_EXPORT_NAME/ABORT/LIST/INFO/GO/STRUCTURED_REPLY/LIST_META_CONTEXT/SET_META_CONTEXT; READ, WRITE,
DISC, FLUSH, TRIM, WRITE_ZEROES (with FUA), BLOCK_STATUS with the ``base:allocation`` context (so
``nbdinfo --map`` and ``qemu-img map`` show allocation) and ``xenswap:layer`` (which level a block comes from:
0 golden, 1 base/migration delta, 2 active delta). A client breaking the protocol gets an error reply, or,
when the byte stream can no longer be trusted (bad magic, oversize payload), a disconnect of that client
alone; the server keeps serving everyone else.

A disk is opened when its first client arrives and closed (flushed, lock released) when its last one leaves,
so ``xenswap disk snapshot`` etc. work on disks nobody is connected to while the server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
from pathlib import Path

from xenswap.storage.store import CorruptBlock, Disk, StorageError, Store

log = logging.getLogger("xenswap.storage.nbd")

# Constants from the NBD protocol specification (doc/proto.md of NetworkBlockDevice/nbd).
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# Which command flags each command accepts (anything else gets EINVAL, as the spec asks).
ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}

MAX_OPTION_LENGTH = 64 * 1024  # names are at most 4 KiB; anything far larger is an attack
MAX_REQUEST_LENGTH = 32 * 1024 * 1024  # the spec's customary maximum payload
META_CONTEXTS = {"base:allocation": 1, "xenswap:layer": 2}

REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
READ_CHUNK = struct.Struct(">IHHQIQ")
OPTION = struct.Struct(">QII")
OPT_REPLY = struct.Struct(">QIII")


class ProtocolViolation(Exception):
    """The client broke a MUST of the protocol in a way that leaves the stream unusable: disconnect it."""


class Exports:
    """Open disks shared by all connections: opened on first use, closed when the last client leaves."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.open_disks: dict[str, tuple[Disk, int]] = {}

    def names(self) -> list[str]:
        return [o.name for o in self.store.list()]

    def acquire(self, name: str) -> Disk:
        held = self.open_disks.get(name)
        if held is not None:
            disk, users = held
            self.open_disks[name] = (disk, users + 1)
            return disk
        disk = self.store.open(name)
        self.open_disks[name] = (disk, 1)
        return disk

    def release(self, name: str) -> None:
        disk, users = self.open_disks[name]
        if users > 1:
            self.open_disks[name] = (disk, users - 1)
            return
        del self.open_disks[name]
        disk.close()

    def flush_all(self) -> None:
        """Flush every open disk and wait (server shutdown)."""
        for disk, _ in self.open_disks.values():
            disk.flush()

    def flush_all_in_background(self) -> None:
        """Start a flush of every open disk without waiting for it (the periodic flush)."""
        for disk, _ in list(self.open_disks.values()):
            if not disk.dirty:
                continue
            future = disk.submit_flush()
            if future is None:
                continue

            def done(waited: asyncio.Future[None], disk: Disk = disk, job=future.job) -> None:  # type: ignore[attr-defined]
                if waited.exception() is None:
                    disk.end_flush(job)
                else:
                    log.error("periodic flush of %s failed: %s", disk.name, waited.exception())

            asyncio.wrap_future(future).add_done_callback(done)


class NbdConnection(asyncio.Protocol):
    """One client. Requests are handled in arrival order straight from data_received: every operation is
    a few preads/pwrites on local files, cheaper than handing it to a task. Flushes (FLUSH, FUA) are the
    exception: their fsync and commit run in the store's flush thread and the reply follows when done."""

    def __init__(self, exports: Exports) -> None:
        self.exports = exports
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.state = "hello"
        self.no_zeroes = False
        self.structured = False
        self.meta_export: str | None = None
        self.meta_ids: list[tuple[int, str]] = []
        self.disk: Disk | None = None
        self.export_name: str | None = None
        self.paused = False
        # Replies are gathered while a batch of requests is handled and sent with one writev at the end:
        # a client with 16 requests in flight costs one system call instead of 16.
        self.out: list[bytes | bytearray] = []

    def _send(self, data: bytes | bytearray) -> None:
        self.out.append(data)

    def _flush_out(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(self.out)
        self.out = []

    # -- transport -------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Room for a whole 1 MiB read reply in the kernel: one send instead of a trickle through the loop.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        transport.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "closed"
        if self.disk is not None:
            self.disk = None
            try:
                self.exports.release(self.export_name)  # type: ignore[arg-type]
            except Exception:  # a failing flush must not take the server down with it
                log.exception("closing export %s", self.export_name)

    def pause_writing(self) -> None:
        self.paused = True
        self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.paused = False
        self.transport.resume_reading()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            while self.state != "closed":
                if self.state == "hello":
                    if not self._hello():
                        return
                elif self.state == "options":
                    if not self._option():
                        return
                elif not self._request():
                    return
        except ProtocolViolation as exc:
            log.info("disconnecting client: %s", exc)
            self._close()
        finally:
            self._flush_out()

    def _close(self) -> None:
        self.state = "closed"
        self.buf.clear()
        self._flush_out()  # error replies queued before the disconnect still go out
        if self.transport is not None:
            self.transport.close()

    # -- handshake ---------------------------------------------------------------------------------------
    def _hello(self) -> bool:
        if len(self.buf) < 4:
            return False
        (flags,) = struct.unpack_from(">I", self.buf)
        del self.buf[:4]
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise ProtocolViolation(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.state = "options"
        return True

    def _opt_reply(self, opt: int, rtype: int, payload: bytes = b"") -> None:
        self._send(OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, rtype, len(payload)) + payload)

    def _option(self) -> bool:
        if len(self.buf) < OPTION.size:
            return False
        magic, opt, length = OPTION.unpack_from(self.buf)
        if magic != IHAVEOPT:
            raise ProtocolViolation("bad option magic")
        if length > MAX_OPTION_LENGTH:
            raise ProtocolViolation(f"option length {length} is absurd")
        if len(self.buf) < OPTION.size + length:
            return False
        data = bytes(self.buf[OPTION.size : OPTION.size + length])
        del self.buf[: OPTION.size + length]
        if opt == OPT_EXPORT_NAME:
            self._opt_export_name(data)
        elif opt == OPT_ABORT:
            self._opt_reply(opt, REP_ACK)
            self._close()
        elif opt == OPT_LIST:
            if data:
                self._opt_reply(opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
            else:
                for name in self.exports.names():
                    raw = name.encode()
                    self._opt_reply(opt, REP_SERVER, struct.pack(">I", len(raw)) + raw)
                self._opt_reply(opt, REP_ACK)
        elif opt in (OPT_INFO, OPT_GO):
            self._opt_info_go(opt, data)
        elif opt == OPT_STRUCTURED_REPLY:
            if data:
                self._opt_reply(opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
            else:
                self.structured = True
                self._opt_reply(opt, REP_ACK)
        elif opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._opt_meta(opt, data)
        elif opt == OPT_STARTTLS:
            self._opt_reply(opt, REP_ERR_POLICY, b"TLS is not offered: use the unix socket or loopback TCP")
        else:
            self._opt_reply(opt, REP_ERR_UNSUP, f"option {opt} is not supported".encode())
        return True

    def _info_of(self, name: str):  # -> ObjectInfo | None
        return self.exports.store.find(name) if name else None

    def _tflags(self, read_only: bool) -> int:
        flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN
        if read_only:
            flags |= TFLAG_READ_ONLY
        else:
            flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
        if self.structured:
            flags |= TFLAG_SEND_DF
        return flags

    def _enter(self, name: str) -> tuple[int, int] | None:
        try:
            disk = self.exports.acquire(name)
        except StorageError as exc:
            log.warning("cannot open export %s: %s", name, exc)
            return None
        self.disk = disk
        self.export_name = name
        if self.meta_export != name:
            self.meta_ids = []
        self.state = "transmission"
        return disk.size, self._tflags(not disk.writable)

    def _opt_export_name(self, data: bytes) -> None:
        name = data.decode(errors="replace")
        entered = self._enter(name) if self._info_of(name) else None
        if entered is None:
            raise ProtocolViolation(f"NBD_OPT_EXPORT_NAME for unknown export {name!r}")  # the spec: terminate
        size, flags = entered
        self._send(struct.pack(">QH", size, flags) + (b"" if self.no_zeroes else bytes(124)))

    def _opt_info_go(self, opt: int, data: bytes) -> None:
        if len(data) < 6:
            self._opt_reply(opt, REP_ERR_INVALID, b"truncated INFO/GO request")
            return
        (name_len,) = struct.unpack_from(">I", data)
        if 4 + name_len + 2 > len(data):
            self._opt_reply(opt, REP_ERR_INVALID, b"export name overruns the option")
            return
        name = data[4 : 4 + name_len].decode(errors="replace")
        (count,) = struct.unpack_from(">H", data, 4 + name_len)
        if 4 + name_len + 2 + 2 * count != len(data):
            self._opt_reply(opt, REP_ERR_INVALID, b"information request count does not match the length")
            return
        wanted = set(struct.unpack_from(f">{count}H", data, 6 + name_len))
        info = self._info_of(name)
        if info is None:
            self._opt_reply(opt, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        read_only = info.kind != "disk"
        if opt == OPT_GO:
            entered = self._enter(name)
            if entered is None:
                self._opt_reply(opt, REP_ERR_POLICY, f"export {name!r} is busy or damaged (see server log)".encode())
                return
        self._opt_reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, info.size, self._tflags(read_only)))
        if INFO_NAME in wanted:
            self._opt_reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + name.encode())
        if INFO_DESCRIPTION in wanted:
            desc = f"xenswap {info.kind} on golden image {info.golden}".encode()
            self._opt_reply(opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + desc)
        self._opt_reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, info.block_size, MAX_REQUEST_LENGTH))
        self._opt_reply(opt, REP_ACK)

    def _opt_meta(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self._opt_reply(opt, REP_ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        try:
            (name_len,) = struct.unpack_from(">I", data)
            name = data[4 : 4 + name_len].decode(errors="replace")
            if len(data) < 4 + name_len + 4:
                raise ValueError
            (count,) = struct.unpack_from(">I", data, 4 + name_len)
            pos = 8 + name_len
            queries = []
            for _ in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                if pos + 4 + qlen > len(data):
                    raise ValueError
                queries.append(data[pos + 4 : pos + 4 + qlen].decode(errors="replace"))
                pos += 4 + qlen
            if pos != len(data):
                raise ValueError
        except (struct.error, ValueError):
            self._opt_reply(opt, REP_ERR_INVALID, b"malformed meta context request")
            return
        if self._info_of(name) is None:
            self._opt_reply(opt, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        chosen: list[str] = []
        if not queries and opt == OPT_LIST_META_CONTEXT:
            chosen = list(META_CONTEXTS)
        for q in queries:
            for ctx in META_CONTEXTS:
                exact = q == ctx
                by_namespace = opt == OPT_LIST_META_CONTEXT and q.endswith(":") and ctx.startswith(q)
                if (exact or by_namespace) and ctx not in chosen:
                    chosen.append(ctx)
        for ctx in chosen:
            self._opt_reply(opt, REP_META_CONTEXT, struct.pack(">I", META_CONTEXTS[ctx]) + ctx.encode())
        if opt == OPT_SET_META_CONTEXT:
            self.meta_export = name
            self.meta_ids = [(META_CONTEXTS[c], c) for c in chosen]
        self._opt_reply(opt, REP_ACK)

    # -- transmission ------------------------------------------------------------------------------------
    def _simple(self, handle: int, error: int = 0, payload: bytes | bytearray = b"") -> None:
        self._send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle))
        if payload:
            self._send(payload)

    def _error(self, handle: int, error: int, message: str) -> None:
        if self.structured:
            msg = message.encode()[:4096]
            payload = struct.pack(">IH", error, len(msg)) + msg
            self._send(
                CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, len(payload)) + payload
            )
        else:
            self._simple(handle, error)

    def _ok(self, handle: int) -> None:
        self._simple(handle)

    def _request(self) -> bool:
        buf = self.buf
        if len(buf) < REQUEST.size:
            return False
        magic, flags, cmd, handle, offset, length = REQUEST.unpack_from(buf)
        if magic != REQUEST_MAGIC:
            raise ProtocolViolation(f"bad request magic {magic:#x}")
        if cmd == CMD_WRITE:
            if length > MAX_REQUEST_LENGTH:
                # We cannot skip a payload this large safely: refuse it and drop the client.
                self._error(handle, EOVERFLOW, f"write of {length} bytes exceeds the maximum {MAX_REQUEST_LENGTH}")
                raise ProtocolViolation(f"oversize write payload {length}")
            if len(buf) < REQUEST.size + length:
                return False
            payload = memoryview(buf)[REQUEST.size : REQUEST.size + length]
        else:
            payload = None
        try:
            self._dispatch(flags, cmd, handle, offset, length, payload)
        finally:
            if payload is not None:
                payload.release()
        consumed = REQUEST.size + (length if cmd == CMD_WRITE else 0)
        try:
            del buf[:consumed]
        except BufferError:  # a view of the payload is still alive (an error traceback): start a new buffer
            self.buf = bytearray(buf[consumed:])
        return True

    def _dispatch(self, flags: int, cmd: int, handle: int, offset: int, length: int,
                  payload: memoryview | None) -> None:
        disk = self.disk
        assert disk is not None
        allowed = ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            self._error(handle, EINVAL, f"unknown command {cmd}")
            return
        if flags & ~allowed:
            self._error(handle, EINVAL, f"flags {flags:#x} not valid for command {cmd}")
            return
        if cmd == CMD_DISC:
            self._close()
            return
        if cmd == CMD_FLUSH:
            self._reply_after_flush(handle)
            return
        if cmd == CMD_READ and (length == 0 or length > MAX_REQUEST_LENGTH):
            self._error(handle, EINVAL if length == 0 else EOVERFLOW,
                        f"read length {length} must be 1..{MAX_REQUEST_LENGTH}")
            return
        if offset + length > disk.size:
            error = ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM) else EINVAL
            self._error(handle, error, f"range {offset}+{length} is beyond the end of the export ({disk.size})")
            return
        if cmd == CMD_READ:
            self._read(handle, offset, length)
            return
        if cmd == CMD_BLOCK_STATUS:
            self._block_status(handle, flags, offset, length)
            return
        # The writing commands.
        if not disk.writable:
            self._error(handle, EPERM, f"export {disk.name!r} is read-only")
            return
        if cmd == CMD_WRITE and length == 0:
            self._ok(handle)
            return
        try:
            if cmd == CMD_WRITE:
                disk.write(offset, payload)  # type: ignore[arg-type]
            elif cmd == CMD_WRITE_ZEROES:
                if length:
                    disk.write_zeroes(offset, length)
            else:
                disk.trim(offset, length)
        except (OSError, StorageError) as exc:
            self._error(handle, ENOSPC if isinstance(exc, OSError) and exc.errno == 28 else EIO, str(exc))
            return
        if flags & CMD_FLAG_FUA:
            self._reply_after_flush(handle)
            return
        self._ok(handle)

    def _reply_after_flush(self, handle: int) -> None:
        """Reply once the flush thread has made everything written so far durable. Other requests (of this
        client and of others) go on meanwhile; NBD lets replies come out of order."""
        disk = self.disk
        assert disk is not None
        try:
            future = disk.submit_flush()
        except StorageError as exc:
            self._error(handle, EIO, str(exc))
            return
        if future is None:
            self._ok(handle)
            return

        def done(waited: asyncio.Future[None]) -> None:
            try:
                waited.result()
            except Exception as exc:
                log.error("flush of %s failed: %s", disk.name, exc)
                self._error(handle, EIO, f"flush failed: {exc}")
            else:
                disk.end_flush(future.job)  # type: ignore[attr-defined]
                self._ok(handle)
            self._flush_out()

        asyncio.wrap_future(future).add_done_callback(done)

    def _read(self, handle: int, offset: int, length: int) -> None:
        disk = self.disk
        try:
            data = disk.read(offset, length)  # type: ignore[union-attr]
        except CorruptBlock as exc:
            log.error("%s", exc)
            self._error(handle, EIO, str(exc))
            return
        except OSError as exc:
            self._error(handle, EIO, f"read failed: {exc}")
            return
        if self.structured:
            head = READ_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle,
                                   length + 8, offset)
        else:
            head = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)
        self._send(head)
        self._send(data)
        if length > 65536:
            self._flush_out()  # big replies go out at once: the kernel sends while we read the next one

    def _block_status(self, handle: int, flags: int, offset: int, length: int) -> None:
        if not self.structured or not self.meta_ids:
            self._error(handle, EINVAL, "no metadata context was negotiated")
            return
        if length == 0:
            self._error(handle, EINVAL, "block status of zero length")
            return
        limit = 1 if flags & CMD_FLAG_REQ_ONE else 1024
        for n, (ctx_id, ctx) in enumerate(self.meta_ids):
            extents = self.disk.extents(offset, length, ctx, limit)  # type: ignore[union-attr]
            payload = struct.pack(">I", ctx_id) + b"".join(struct.pack(">II", ln, fl) for ln, fl in extents)
            done = REPLY_FLAG_DONE if n == len(self.meta_ids) - 1 else 0
            self._send(
                CHUNK.pack(STRUCTURED_REPLY_MAGIC, done, REPLY_TYPE_BLOCK_STATUS, handle, len(payload)) + payload
            )


class NbdServer:
    def __init__(self, store: Store, socket_path: Path | None = None, tcp: tuple[str, int] | None = None,
                 autoflush: float = 5.0) -> None:
        self.store = store
        self.autoflush = autoflush
        self.flusher: asyncio.Task[None] | None = None
        self.exports = Exports(store)
        self.socket_path = socket_path
        self.tcp = tcp
        self.servers: list[asyncio.base_events.Server] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.socket_path is not None:
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            self.servers.append(await loop.create_unix_server(lambda: NbdConnection(self.exports),
                                                              str(self.socket_path)))
        if self.autoflush > 0:
            self.flusher = asyncio.create_task(self._flush_periodically())
        if self.tcp is not None:
            self.servers.append(await loop.create_server(lambda: NbdConnection(self.exports),
                                                         self.tcp[0], self.tcp[1], reuse_address=True))

    async def _flush_periodically(self) -> None:
        """Flush open disks every few seconds even if their clients never do: bounds what a crash loses to
        the last interval (NBD allows losing unflushed writes; this just keeps the loss small)."""
        while True:
            await asyncio.sleep(self.autoflush)
            try:
                self.exports.flush_all_in_background()
            except Exception:  # a full disk or a damaged store must not stop the server
                log.exception("periodic flush failed")

    def addresses(self) -> list[str]:
        out = []
        for server in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append(name if isinstance(name, str) else f"{name[0]}:{name[1]}")
        return out

    async def serve_until_signalled(self) -> None:
        if not self.servers:
            await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ready = os.environ.get("XENSWAP_NBD_READY_FD")
        if ready:  # tell a parent process (tests, benchmarks) we are listening
            os.write(int(ready), b"ready\n")
            os.close(int(ready))
        await stop.wait()
        self.close()

    def close(self) -> None:
        if self.flusher is not None:
            self.flusher.cancel()
        for server in self.servers:
            server.close()
        self.exports.flush_all()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
