/*
 * xenswap-hcall-probe: issue one hypercall whose argument lies in a page that a dom0 test can page out first.
 *
 * Why: Xen reads hypercall arguments through the p2m, and an argument in a frame the dom0 pager has paged out
 * makes that read fail.  Stock Xen returns -EFAULT (guests BUG() on it in their timer path); our hypervisor
 * patch 0005 re-executes the hypercall once the pager has loaded the frame.  A guest kernel only rarely has
 * an argument frame paged out, so tests make it happen on purpose with this probe:
 *
 *   xenswap-hcall-probe SECONDS
 *
 * writes the arguments of EVTCHNOP_status (a read-only query of the guest's own event channel 1) into a page
 * of its own, prints that page's frame number ("pfn=0x..."; a PVH guest's pfn is its gfn), sleeps SECONDS
 * without touching the page, then issues the hypercall through /dev/xen/privcmd (the guest kernel calls Xen
 * with the user address, so Xen reads the argument from that very frame) and prints "rc=N errno=E status=S".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define HYPERVISOR_EVENT_CHANNEL_OP 32
#define EVTCHNOP_STATUS 5
#define DOMID_SELF 0x7FF0U

struct privcmd_hypercall {  /* include/uapi/xen/privcmd.h */
    uint64_t op;
    uint64_t arg[5];
};
#define IOCTL_PRIVCMD_HYPERCALL _IOC(_IOC_NONE, 'P', 0, sizeof(struct privcmd_hypercall))

struct evtchn_status {  /* xen/include/public/event_channel.h */
    uint16_t dom;       /* IN */
    uint32_t port;      /* IN */
    uint32_t status;    /* OUT */
    uint32_t vcpu;      /* OUT */
    uint32_t u[2];      /* OUT */
};

static uint64_t pfn_of(const void *address)
{
    uint64_t entry = 0;
    long page = sysconf(_SC_PAGESIZE);
    int fd = open("/proc/self/pagemap", O_RDONLY);

    if (fd < 0 || pread(fd, &entry, sizeof(entry), ((uintptr_t)address / page) * sizeof(entry)) != sizeof(entry)) {
        perror("pagemap");
        exit(2);
    }
    close(fd);
    if (!(entry >> 63)) {
        fprintf(stderr, "argument page not present\n");
        exit(2);
    }
    return entry & ((1ULL << 55) - 1);
}

int main(int argc, char **argv)
{
    struct privcmd_hypercall call;
    struct evtchn_status *status;
    int privcmd;
    long rc;

    if (argc != 2) {
        fprintf(stderr, "usage: %s SECONDS\n", argv[0]);
        return 2;
    }
    privcmd = open("/dev/xen/privcmd", O_RDWR);
    if (privcmd < 0) {
        perror("/dev/xen/privcmd");
        return 2;
    }
    /* a page of its own: nothing else of this process lives there, so nothing touches it while we sleep */
    status = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (status == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    memset(status, 0, sizeof(*status));
    status->dom = DOMID_SELF;
    status->port = 1;
    printf("pfn=0x%llx\n", (unsigned long long)pfn_of(status));
    fflush(stdout);

    sleep(atoi(argv[1]));

    memset(&call, 0, sizeof(call));
    call.op = HYPERVISOR_EVENT_CHANNEL_OP;
    call.arg[0] = EVTCHNOP_STATUS;
    call.arg[1] = (uintptr_t)status;
    rc = ioctl(privcmd, IOCTL_PRIVCMD_HYPERCALL, &call);
    printf("rc=%ld errno=%d status=%u\n", rc, rc < 0 ? errno : 0, status->status);
    fflush(stdout);
    return rc < 0 ? 1 : 0;
}
