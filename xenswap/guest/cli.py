"""``xenswap guest build``: build (or find in the cache) the tiny guest image and print its paths."""

from __future__ import annotations

import argparse

from xenswap.cli import print_json
from xenswap.guest.image import build_guest_image, prune_images


def cmd_build(args: argparse.Namespace) -> int:
    image = build_guest_image(with_dropbear=not args.no_dropbear, force=args.force)
    if args.json:
        print_json(image.to_json())
    else:
        print(f"kernel  {image.kernel}\ninitrd  {image.initrd}\nrecipe  {image.recipe_hash}\n"
              f"version {image.kernel_version}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    current = build_guest_image(with_dropbear=not args.no_dropbear)
    removed = prune_images({current.recipe_hash})
    if args.json:
        print_json({"kept": current.recipe_hash, "removed": removed})
    else:
        print(f"kept {current.recipe_hash} and images in use; removed {len(removed)}: {' '.join(removed) or '-'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    guest = sub.add_parser("guest", help="tiny guest images")
    guest_sub = guest.add_subparsers(dest="guest_command", metavar="COMMAND")
    guest_sub.required = True
    p = guest_sub.add_parser("build", help="build the guest image from Debian packages (cached by recipe)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache has this recipe")
    p.add_argument("--no-dropbear", action="store_true", help="leave the ssh server out")
    p.set_defaults(handler=cmd_build)
    p = guest_sub.add_parser("prune", help="delete cached images of old recipes (keeps the current one and any in use)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-dropbear", action="store_true", help="the current image is the one without dropbear")
    p.set_defaults(handler=cmd_prune)
