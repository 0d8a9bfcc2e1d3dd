#!/bin/sh
# /init of the xenswap tiny guest (busybox sh). The same image boots under QEMU (console ttyS0, virtio) and
# as a Xen PV/PVH domU (console hvc0, xen-netfront/blkfront), so everything here tolerates missing devices.
#
# Kernel command line parameters (all optional):
#   xenswap.ip=ADDR/PREFIX    static address of eth0      xenswap.gw=ADDR        default route
#   xenswap.hostname=NAME     hostname (default: guest)   xenswap.ssh=0          do not start dropbear
#   xenswap.netwait=SECONDS   how long to wait for eth0 when an address is given (default 15)
#   xenswap.ipv6=1            keep IPv6 (off by default: its background traffic wakes idle guests)
# When the guest is up it prints "XENSWAP_GUEST_UP <hostname>" on every console.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run /tmp /var/log /var/run
mount -t devpts devpts /dev/pts
mount -t tmpfs -o size=8m tmpfs /run
mount -t tmpfs -o size=16m tmpfs /tmp

IP=
GW=
HOSTNAME=guest
SSH=1
NETWAIT=15
IPV6=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        xenswap.ip=*) IP="${arg#*=}" ;;
        xenswap.gw=*) GW="${arg#*=}" ;;
        xenswap.hostname=*) HOSTNAME="${arg#*=}" ;;
        xenswap.ssh=*) SSH="${arg#*=}" ;;
        xenswap.netwait=*) NETWAIT="${arg#*=}" ;;
        xenswap.ipv6=*) IPV6="${arg#*=}" ;;
    esac
done
hostname "$HOSTNAME"
echo "127.0.0.1 localhost $HOSTNAME" >/etc/hosts

# Modules in dependency order (computed when the image was built). A module whose hardware or
# hypervisor is absent (xen-netfront under QEMU, virtio under Xen PV) just fails to load.
KVER="$(uname -r)"
while read -r ko params; do
    insmod "/lib/modules/$KVER/$ko" $params 2>/dev/null
done <"/lib/modules/$KVER/xenswap.load"

# IPv6 off unless asked for: its autoconfiguration and MLD chatter would wake an idle guest now and then.
[ "$IPV6" = 1 ] || echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6
[ "$IPV6" = 1 ] || echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6
ip link set lo up
if [ -n "$IP" ]; then
    waited=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$waited" -lt "$((NETWAIT * 10))" ]; do
        usleep 100000
        waited=$((waited + 1))
    done
    if [ -e /sys/class/net/eth0 ]; then
        ip addr add "$IP" dev eth0
        ip link set eth0 up
        [ -n "$GW" ] && ip route add default via "$GW" dev eth0
    else
        echo "xenswap-init: no eth0 after ${NETWAIT}s, network left unconfigured"
    fi
fi

mkdir -p /www
cat >/www/index.html <<EOF
<html><body><h1>xenswap guest $HOSTNAME</h1><p>hostname=$HOSTNAME ip=$IP</p></body></html>
EOF
httpd -p 80 -h /www

if [ "$SSH" != 0 ] && [ -x /usr/sbin/dropbear ]; then
    mkdir -p /etc/dropbear
    # -R: make host keys on first connection (keeps boot fast and every guest's key its own);
    # -B: root may log in with the empty password (test guests on private networks only).
    dropbear -R -B -p 22
fi

# Only warnings and worse from the kernel from now on: they would interleave with console output.
dmesg -n 1

# A respawning shell on every active console (ttyS0 under QEMU, hvc0 under Xen). setsid makes the
# console its controlling terminal, so Ctrl-C reaches commands run there. The loop is started by
# start-stop-daemon rather than with "&": a shell ignores SIGINT in its background jobs, for good, and
# every shell and command below would inherit that (Ctrl-C would never stop anything on the console).
consoles="$(sed -n 's/^\([a-zA-Z0-9]*\) .*/\1/p' /proc/consoles)"
[ -n "$consoles" ] || consoles=console
for tty in $consoles; do
    [ -c "/dev/$tty" ] || continue
    start-stop-daemon -S -b -m -p "/run/console-$tty.pid" -x /bin/sh -- -c \
        "while :; do setsid sh -c 'exec sh -i <>/dev/$tty >&0 2>&0'; sleep 1; done"
    echo "XENSWAP_GUEST_UP $HOSTNAME" >"/dev/$tty"
done
echo "XENSWAP_GUEST_UP $HOSTNAME"

# PID 1 must never exit. "wait" on a background sleep also reaps orphaned processes re-parented to us
# (each SIGCHLD wakes it); the long sleep keeps PID 1 from adding wake-ups of its own to an idle guest.
while :; do
    sleep 3600 &
    wait
done
