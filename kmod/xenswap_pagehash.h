/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xenswap page hasher: user/kernel interface of /dev/xenswap-pagehash.
 *
 * One ioctl hashes (xxh64, seed 0) every *resident* 4 KiB page of a range of another process's
 * address space. Pages that are not resident (swapped out, never touched) are reported as absent and
 * are NOT faulted in: hashing an idle VM's memory for sharing must not undo its page-out.
 */
#ifndef XENSWAP_PAGEHASH_H
#define XENSWAP_PAGEHASH_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define XSPH_ABSENT 0 /* not resident: no hash */
#define XSPH_HASHED 1 /* resident: hash valid */
#define XSPH_ZERO   2 /* resident and all zeroes: hash valid */

struct xsph_request {
	__u32 pid;     /* target process (0: the caller) */
	__u32 flags;   /* must be 0 */
	__u64 start;   /* page-aligned user virtual address in the target */
	__u64 npages;  /* number of 4 KiB pages, at most XSPH_MAX_PAGES */
	__u64 hashes;  /* user pointer to __u64[npages] (output) */
	__u64 status;  /* user pointer to __u8[npages] (output, XSPH_*) */
	__u64 hashed;  /* output: pages hashed (HASHED + ZERO) */
};

#define XSPH_MAX_PAGES (1UL << 20) /* 4 GiB per call */
#define XSPH_IOC_HASH _IOWR('x', 0x51, struct xsph_request)

#endif
