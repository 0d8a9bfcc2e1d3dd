"""``xenswap disk ...``: golden images, branches, snapshots, deltas, and the NBD server that exports them."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
from pathlib import Path

from xenswap.cli import print_json, print_table
from xenswap.config import run_dir
from xenswap.errors import SpecError
from xenswap.storage.store import DEFAULT_BLOCK_SIZE, Store

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise SpecError(f"bad size {text!r}: use bytes or a number with K, M, G or T (e.g. 1G)")
    return int(match.group(1)) * UNITS[match.group(2).upper()]


def default_socket() -> Path:
    return run_dir() / "storage" / "nbd.sock"


def _store(args: argparse.Namespace) -> Store:
    return Store(args.store)


def cmd_golden(args: argparse.Namespace) -> int:
    size = parse_size(args.size) if args.size else None
    info = _store(args).create_golden(args.name, source=args.source, size=size, block_size=args.block_size)
    print(f"golden image {info.name}: {info.size} bytes, block size {info.block_size}")
    return 0


def cmd_branch(args: argparse.Namespace) -> int:
    info = _store(args).branch(args.name, args.source)
    print(f"disk {info.name} branched from {args.source}")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    info = _store(args).snapshot(args.disk, args.name)
    print(f"snapshot {info.name} of {args.disk}")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    _store(args).commit(args.disk)
    print(f"{args.disk}: active delta folded into its base (migration) delta")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    result = _store(args).compact(args.disk)
    if args.json:
        print_json(result)
        return 0
    print(f"{args.disk}: {result['blocks']} blocks rewritten in order; store data "
          f"{result['data_bytes_before'] >> 20} -> {result['data_bytes_after'] >> 20} MiB")
    return 0


def cmd_flatten(args: argparse.Namespace) -> int:
    _store(args).flatten(args.name, args.output, args.format)
    print(f"{args.name} written to {args.output} ({args.format})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    count = _store(args).export_delta(args.name, args.output, args.layer)
    print(f"{count} blocks of {args.name} ({args.layer}) written to {args.output}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    info = _store(args).import_delta(args.file, args.name, args.onto)
    print(f"disk {info.name} created on {args.onto} from {args.file}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    objects = store.list()
    if args.json:
        out = []
        for o in objects:
            out.append({**o.to_json(), **store.usage(o.name)})
        print_json(out)
        return 0
    rows = []
    for o in objects:
        use = store.usage(o.name)
        rows.append([o.name, o.kind, o.golden, o.parent, o.size >> 20, o.block_size,
                     use["base_clusters"], use["active_clusters"]])
    print_table(["Name", "Kind", "Golden", "Parent", "Size(MiB)", "Block", "BaseClusters", "ActiveClusters"], rows)
    return 0


def cmd_tree(args: argparse.Namespace) -> int:
    tree = _store(args).tree()
    if args.json:
        print_json(tree)
        return 0

    def show(node: dict, depth: int) -> None:
        ro = "" if node["kind"] == "disk" else " (read-only)"
        print(f"{'  ' * depth}{node['name']} [{node['kind']}]{ro}")
        for child in node["children"]:
            show(child, depth + 1)

    for node in tree:
        show(node, 0)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = _store(args)
    for name in args.names:
        store.remove(name)
        print(f"removed {name}")
    return 0


def parse_tcp(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise SpecError(f"bad --tcp {text!r}: use PORT or HOST:PORT")
    return host or "127.0.0.1", int(port)


def cmd_serve(args: argparse.Namespace) -> int:
    from xenswap.storage.nbd import NbdServer

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="xenswap-nbd: %(levelname)s %(message)s")
    tcp = parse_tcp(args.tcp) if args.tcp else None
    if tcp and tcp[0] not in ("127.0.0.1", "::1", "localhost") and not args.allow_remote:
        raise SpecError(f"--tcp {args.tcp} is not loopback: NBD has no authentication; add --allow-remote")
    socket_path = None if args.no_socket else Path(args.socket or default_socket())
    server = NbdServer(_store(args), socket_path, tcp, autoflush=args.autoflush)

    async def main() -> None:
        await server.start()
        print("serving on " + ", ".join(server.addresses()), flush=True)
        await server.serve_until_signalled()

    asyncio.run(main())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    disk = sub.add_parser("disk", help="copy-on-write branching disks: golden images, branches, snapshots, NBD")
    dsub = disk.add_subparsers(dest="disk_command", metavar="SUBCOMMAND")
    dsub.required = True

    def add(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        p = dsub.add_parser(name, help=help_text)
        p.add_argument("--store", metavar="DIR", help="store directory (default: STATE/storage)")
        p.set_defaults(handler=handler)
        return p

    p = add("golden", "create a golden image from an image file (raw, qcow2, ...) or an empty size", cmd_golden)
    p.add_argument("name")
    p.add_argument("--from", dest="source", metavar="IMAGE", help="image to import (any format qemu-img reads)")
    p.add_argument("--size", help="create an empty image of this size instead (e.g. 1G)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="bytes per block (default 4096)")

    p = add("branch", "create a read-write disk on a golden image or a snapshot", cmd_branch)
    p.add_argument("source", help="golden image or snapshot")
    p.add_argument("name", help="name of the new disk")

    p = add("snapshot", "freeze a disk's contents as a read-only snapshot", cmd_snapshot)
    p.add_argument("disk")
    p.add_argument("name")

    p = add("commit", "fold a disk's active delta into its base (migration) delta", cmd_commit)
    p.add_argument("disk")

    p = add("compact", "commit, and rewrite the disk's blocks in order into one data file (frees space)",
            cmd_compact)
    p.add_argument("disk")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("flatten", "write a disk/snapshot/golden image as one standalone image (V2P)", cmd_flatten)
    p.add_argument("name")
    p.add_argument("output")
    p.add_argument("--format", default="raw", help="raw (default) or any qemu-img output format, e.g. qcow2")

    p = add("export", "write a delta to a file (what migration sends)", cmd_export)
    p.add_argument("name")
    p.add_argument("output")
    p.add_argument("--layer", choices=["active", "base", "all"], default="active",
                   help="active: changes since the last commit; base: the migration delta; all: both")

    p = add("import", "create a disk from a delta file on top of a golden image or snapshot", cmd_import)
    p.add_argument("file")
    p.add_argument("name")
    p.add_argument("--onto", required=True, help="golden image or snapshot the delta was taken against")

    p = add("list", "list golden images, disks and snapshots", cmd_list)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("tree", "show the tree of golden images, disks and snapshots", cmd_tree)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("rm", "delete images, disks or snapshots (a golden image in use cannot be deleted)", cmd_rm)
    p.add_argument("names", nargs="+")

    p = add("serve", "serve every object of the store over NBD (one export per name)", cmd_serve)
    p.add_argument("--socket", metavar="PATH", help="unix socket (default RUN/storage/nbd.sock)")
    p.add_argument("--no-socket", action="store_true", help="TCP only")
    p.add_argument("--tcp", metavar="[HOST:]PORT", help="also listen on TCP (loopback by default)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --tcp address")
    p.add_argument("--autoflush", type=float, default=5.0, metavar="SECONDS",
                   help="also flush open disks this often (bounds what a crash can lose; 0: only on client flush)")
    p.add_argument("-v", "--verbose", action="store_true", help="log connections and protocol errors")
