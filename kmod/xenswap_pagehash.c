// SPDX-License-Identifier: GPL-2.0
/*
 * xenswap_pagehash: hash the resident pages of another process without faulting the rest back in.
 *
 * Why a kernel module: the sharer hashes the memory of hundreds of mostly paged-out guests (QEMU
 * processes on the QEMU port; pages foreign-mapped into the pager on Xen). From user space the only
 * ways in are /proc/PID/mem, which copies every page and faults swapped-out pages back in, or pagemap
 * + mem, two passes and a copy. Here get_user_pages_remote(FOLL_NOFAULT) pins only what is resident,
 * and xxh64 hashes it in place.
 */
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/pid.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/xxhash.h>

#include "xenswap_pagehash.h"

#define BATCH 64

static struct mm_struct *target_mm(u32 pid_nr)
{
	struct task_struct *task;
	struct mm_struct *mm;
	struct pid *pid;

	if (pid_nr == 0) {
		mmget(current->mm);
		return current->mm;
	}
	pid = find_get_pid(pid_nr);
	if (!pid)
		return ERR_PTR(-ESRCH);
	task = get_pid_task(pid, PIDTYPE_PID);
	put_pid(pid);
	if (!task)
		return ERR_PTR(-ESRCH);
	mm = get_task_mm(task);
	put_task_struct(task);
	return mm ? mm : ERR_PTR(-EINVAL); /* kernel threads have no mm */
}

static long hash_range(struct mm_struct *mm, struct xsph_request *req)
{
	u64 __user *uhashes = u64_to_user_ptr(req->hashes);
	u8 __user *ustatus = u64_to_user_ptr(req->status);
	struct page **pages;
	u64 hashes[BATCH];
	u8 status[BATCH];
	u64 done = 0, hashed = 0;
	long ret = 0;

	pages = kmalloc_array(BATCH, sizeof(*pages), GFP_KERNEL);
	if (!pages)
		return -ENOMEM;

	while (done < req->npages) {
		unsigned long addr = req->start + done * PAGE_SIZE;
		unsigned long want = min_t(u64, BATCH, req->npages - done);
		long got, i;

		mmap_read_lock(mm);
		/* FOLL_NOFAULT: stop at the first page that is not resident instead of faulting it in. */
		got = get_user_pages_remote(mm, addr, want, FOLL_NOFAULT, pages, NULL, NULL);
		mmap_read_unlock(mm);
		if (got <= 0) {
			/* The first page is absent (or the address is unmapped): report it and step over it. */
			hashes[0] = 0;
			status[0] = XSPH_ABSENT;
			got = 0;
			want = 1;
		} else {
			for (i = 0; i < got; i++) {
				void *kaddr = kmap_local_page(pages[i]);

				hashes[i] = xxh64(kaddr, PAGE_SIZE, 0);
				status[i] = memchr_inv(kaddr, 0, PAGE_SIZE) ? XSPH_HASHED : XSPH_ZERO;
				kunmap_local(kaddr);
				put_page(pages[i]);
			}
			hashed += got;
			want = got;
		}
		if (copy_to_user(uhashes + done, hashes, want * sizeof(u64)) ||
		    copy_to_user(ustatus + done, status, want)) {
			ret = -EFAULT;
			break;
		}
		done += want;
		if (fatal_signal_pending(current)) {
			ret = -EINTR;
			break;
		}
		cond_resched();
	}
	kfree(pages);
	req->hashed = hashed;
	return ret;
}

static long xsph_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct xsph_request req;
	struct mm_struct *mm;
	long ret;

	if (cmd != XSPH_IOC_HASH)
		return -ENOTTY;
	/* Reading another process's memory: the same privilege ptrace attach would need. */
	if (!capable(CAP_SYS_PTRACE))
		return -EPERM;
	if (copy_from_user(&req, (void __user *)arg, sizeof(req)))
		return -EFAULT;
	if (req.flags || !PAGE_ALIGNED(req.start) || req.npages == 0 || req.npages > XSPH_MAX_PAGES)
		return -EINVAL;
	if (req.start + req.npages * PAGE_SIZE < req.start)
		return -EINVAL;

	mm = target_mm(req.pid);
	if (IS_ERR(mm))
		return PTR_ERR(mm);
	ret = hash_range(mm, &req);
	mmput(mm);
	if (copy_to_user((void __user *)arg, &req, sizeof(req)))
		return -EFAULT;
	return ret;
}

static const struct file_operations xsph_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = xsph_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static struct miscdevice xsph_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "xenswap-pagehash",
	.fops = &xsph_fops,
	.mode = 0600,
};

module_misc_device(xsph_dev);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("xenswap");
MODULE_DESCRIPTION("Hash resident pages of a process (xxh64) without faulting paged-out ones back in");
