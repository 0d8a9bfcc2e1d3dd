"""``xenswap``: xl-style commands. Thin: parse arguments, call a layer, print.

Each area registers its own sub-commands from ``xenswap/<area>/cli.py`` (a ``register(subparsers)``
function), so the areas stay independent; this module only wires them together and turns any
XenswapError into one clear line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence

from xenswap.errors import XenswapError

# Areas that contribute sub-commands; a module that does not exist yet is simply not offered.
COMMAND_MODULES = [
    "xenswap.hv.cli",
    "xenswap.hv.qemu.cli",
    "xenswap.core.cli",
    "xenswap.storage.cli",
    "xenswap.net.cli",
    "xenswap.guest.cli",
    "xenswap.rig.cli",
    "xenswap.hv.xen.cli",
    "xenswap.share",
    "xenswap.daemon",
]


def print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """xl-like plain columns: first column left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(parts).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xenswap", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in COMMAND_MODULES:
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int | None] = args.handler
    try:
        return handler(args) or 0
    except XenswapError as exc:
        print(f"xenswap: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `xenswap list | head`: the reader left; say nothing more (stdout is gone)
        sys.stdout = open(os.devnull, "w")  # keeps the interpreter's final flush quiet
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
