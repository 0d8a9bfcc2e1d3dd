"""A child process with a known block of anonymous memory, driven over stdin/stdout by the paging tests.

Commands (one per line): ``sum`` -> sha256 of the block; ``touch FIRST COUNT`` -> read those pages;
``quit``. At start it prints the block's address and length.
"""

import ctypes
import hashlib
import mmap
import random
import sys

pages = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
huge = len(sys.argv) > 2 and sys.argv[2] == "huge"
size = pages * 4096
block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if huge:
    block.madvise(mmap.MADV_HUGEPAGE)
rng = random.Random(1234)
# Pseudo-random, incompressible-ish content; every 4th page stays zero (like a guest's free memory).
for page in range(pages):
    if page % 4:
        block[page * 4096 : page * 4096 + 4096] = rng.randbytes(4096)
address = ctypes.addressof(ctypes.c_char.from_buffer(block))
print(address, size, flush=True)
for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
        break
    if cmd[0] == "sum":
        print(hashlib.sha256(block).hexdigest(), flush=True)
    elif cmd[0] == "touch":
        first, count = int(cmd[1]), int(cmd[2])
        total = 0
        for page in range(first, first + count):
            total += block[page * 4096]
        print(total, flush=True)
