"""``python -m xenswap.storage SUBCOMMAND``: the ``xenswap disk`` commands without loading the other areas
(a server that starts in a tenth of a second matters to the crash test, which restarts it 50 times)."""

from __future__ import annotations

import argparse
import sys

from xenswap.errors import XenswapError
from xenswap.storage.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xenswap.storage")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register(sub)
    args = parser.parse_args(["disk", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.handler(args) or 0
    except XenswapError as exc:
        print(f"xenswap: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
