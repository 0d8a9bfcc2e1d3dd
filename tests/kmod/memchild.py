"""A process with a known memory layout for the page-hash tests: 64 anonymous pages where page i (even i < 32)
holds a pattern derived from i, page 1 is written with zeroes, and pages >= 32 are never touched. Prints the
mapping's address, then waits for stdin to close."""

import mmap
import sys

PAGES = 64
region = mmap.mmap(-1, PAGES * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, 32, 2):
    region[i * 4096 : (i + 1) * 4096] = bytes([i + 1]) * 4096
region[4096:8192] = bytes(4096)  # resident, all zero
import ctypes  # noqa: E402

address = ctypes.addressof(ctypes.c_char.from_buffer(region))
print(address, flush=True)
sys.stdin.read()
