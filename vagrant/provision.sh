#!/usr/bin/env bash
# Provision a Debian 12 node as a xenswap Xen host: the same steps as the nested rig, on real hardware.
set -euo pipefail
src=${1:-/opt/xenswap}
cd "$src"

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# Debian's Xen (toolstack, grub integration, xencommons) — then our patched hypervisor replaces the binary it boots.
apt-get install -y -q xen-system-amd64 xen-utils-4.17 make

# xenswap itself: the same idempotent set-up the README's commands run.
bash setup/install.sh
ln -sf "$src/.venv/bin/xenswap" /usr/local/sbin/xenswap

# The patched hypervisor (UNSUPPORTED + MEM_PAGING + MEM_SHARING and our patch series), cached by its inputs.
# build.sh prints the build's output folder on its last line (xen.gz, xen-syms, config, build-info.json).
xen_build=$(bash hypervisor-patches/build.sh | tail -n 1)
install -m 0644 "$xen_build/xen.gz" /boot/xen-4.17-xenswap.gz
# Boot it by default; dom0 keeps 2 GiB, the rest is for guests. HAP without IOMMU is what Xen's paging needs.
cat > /etc/default/grub.d/xenswap.cfg <<'CFG'
GRUB_DEFAULT="Debian GNU/Linux, with Xen hypervisor"
GRUB_CMDLINE_XEN_DEFAULT="dom0_mem=2048M,max:2048M iommu=0 loglvl=all guest_loglvl=all"
CFG
update-grub

# dom0 helpers: the page-hash module, built against the running dom0 kernel's headers.
apt-get install -y -q "linux-headers-$(uname -r)"
make -C kmod KVER="$(uname -r)"
install -D -m 0644 kmod/xenswap_pagehash.ko "/lib/modules/$(uname -r)/extra/xenswap_pagehash.ko"
depmod -a
echo xenswap_pagehash > /etc/modules-load.d/xenswap.conf

install -m 0644 vagrant/xenswap.service /etc/systemd/system/xenswap.service
sed -i "s#@SRC@#$src#" /etc/systemd/system/xenswap.service
systemctl daemon-reload
systemctl enable xenswap.service
echo "provisioned: run 'vagrant reload' to boot into the patched Xen"
