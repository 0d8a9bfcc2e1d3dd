"""Fast tier of the QEMU port: command lines, names, addresses and the error paths that need no guest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xenswap.cli import main
from xenswap.errors import MissingTool, UnknownDomain, XenswapError
from xenswap.guest.image import GuestImage
from xenswap.hv.qemu import QemuVM, _xl_state, open_hypervisor
from xenswap.hv.qemu import tap as taps
from xenswap.hv.qemu.qmp import QMPFailure, qmp_execute
from xenswap.hv.qemu.vm import VMConfig, kernel_cmdline, qemu_argv


def _config(**kw: object) -> VMConfig:
    base = {"name": "vm1", "domid": 7, "mem_mib": 128, "vcpus": 1, "kernel": "/k", "initrd": "/i"}
    return VMConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_kernel_cmdline_carries_network_and_hostname() -> None:
    line = kernel_cmdline(_config(ip="10.0.0.2/24", gateway="10.0.0.1"))
    assert line.split() == ["console=ttyS0", "xenswap.hostname=vm1", "xenswap.ip=10.0.0.2/24", "xenswap.gw=10.0.0.1"]
    assert "xenswap.ip" not in kernel_cmdline(_config())
    # routed tap without an explicit gateway: the host's end becomes the guest's gateway
    assert "xenswap.gw=10.0.0.1" in kernel_cmdline(_config(ip="10.0.0.2/24", host_address="10.0.0.1"))


def test_qemu_argv_tcg_nodefaults_tap_disk(tmp_path: Path) -> None:
    argv = qemu_argv(_config(tap="xs7-vm1", mac="52:54:00:00:00:07", disk="nbd+unix:///e?socket=/s"), tmp_path)
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-accel") + 1].startswith("tcg")
    for flag in ("-nodefaults", "-daemonize", "-no-user-config"):
        assert flag in argv
    assert argv[argv.index("-vga") + 1] == "none" and argv[argv.index("-display") + 1] == "none"
    assert "memory-backend-ram,id=xenswap-ram,size=128M" in joined and "memory-backend=xenswap-ram" in joined
    assert "tap,id=net0,ifname=xs7-vm1,script=no,downscript=no" in joined
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:07" in joined
    assert "file=nbd+unix:///e?socket=/s,if=none,id=disk0,format=raw" in joined
    assert "virtio-blk-pci,drive=disk0" in joined
    assert f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off" in joined
    no_net = qemu_argv(_config(), tmp_path)
    assert "-netdev" not in no_net and "-drive" not in no_net


def test_disk_format_is_named_not_probed(tmp_path: Path) -> None:
    import subprocess

    from xenswap.hv.qemu.vm import disk_format

    raw, qcow = tmp_path / "d.raw", tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M"], check=True)
    assert disk_format(str(raw)) == "raw" and disk_format(str(qcow)) == "qcow2"
    assert disk_format("nbd+unix:///export?socket=/run/x.sock") == "raw"
    with pytest.raises(XenswapError, match="cannot be read"):
        disk_format(str(tmp_path / "missing.img"))


def test_qemu_argv_escapes_commas(tmp_path: Path) -> None:
    argv = qemu_argv(_config(kernel="/a,b/vmlinuz"), tmp_path)
    assert argv[argv.index("-kernel") + 1] == "/a,,b/vmlinuz"


def test_tap_names_fit_ifnamsiz_and_macs_are_distinct() -> None:
    for domid, name in ((1, "vm1"), (4242, "a-very-long-guest-name"), (99999, "x.y_z")):
        tap = taps.tap_name(domid, name)
        assert len(tap) <= 15 and tap.startswith(f"xs{domid}")
    assert taps.tap_name(3, "web.1") == "xs3-web1"
    macs = {taps.mac_address(i) for i in range(1, 300)}
    assert len(macs) == 299
    assert taps.mac_address(258) == "52:54:00:00:01:02"


def test_host_address_for_routed_taps() -> None:
    assert taps.host_address_for("10.0.0.2/24", None) == "10.0.0.1"
    assert taps.host_address_for("10.0.0.1/24", None) == "10.0.0.2"
    assert taps.host_address_for("10.0.0.2/24", "10.0.0.254") == "10.0.0.254"


def test_xl_state_flags() -> None:
    assert _xl_state("running", True) == "r-----"
    assert _xl_state("running", False) == "-b----"
    assert _xl_state("paused", False) == "--p---"
    assert _xl_state("shutdown", False) == "---s--"
    assert _xl_state("guest-panicked", False) == "----c-"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name"}, "invalid VM name"),
        ({"name": "123"}, "confused with a domain id"),
        ({"name": "ok", "mem_mib": 64}, "too little"),
        ({"name": "ok", "ip": "10.0.0.300/24"}, "invalid guest address"),
        ({"name": "ok", "ip": "10.0.0.2"}, "needs a prefix length"),
        ({"name": "ok", "gateway": "nope"}, "invalid gateway"),
    ],
)
def test_bad_create_arguments_are_refused_before_anything_starts(kwargs: dict, message: str) -> None:
    with pytest.raises(XenswapError, match=message):
        QemuVM.create(**kwargs)
    assert open_hypervisor().list_domains() == []


def test_missing_qemu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without qemu-system-x86_64
    with pytest.raises(MissingTool, match="qemu-system-x86_64 not found: install the Debian package qemu-system-x86"):
        QemuVM.create("noqemu")


def test_missing_guest_image_is_a_clear_error(tmp_path: Path) -> None:
    image = GuestImage(tmp_path / "vmlinuz", tmp_path / "initrd.gz", "0" * 16, "6.1.0-0-amd64")
    with pytest.raises(XenswapError, match="is missing: run 'xenswap guest build'"):
        QemuVM.create("noimage", image=image)
    assert open_hypervisor().list_domains() == []


def test_unknown_domain(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnknownDomain):
        QemuVM.open("no-such-vm")
    for argv in (["destroy", "nope"], ["pause", "42"], ["unpause", "nope"], ["console", "nope", "-c", "true"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("xenswap: error: unknown domain") and len(err.splitlines()) == 1


def test_qmp_on_a_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QMPFailure, match="cannot reach QEMU's monitor"):
        qmp_execute(tmp_path / "none.sock", "query-status", timeout=2)


def test_dead_vm_state_is_cleaned_from_listing(tmp_path: Path) -> None:
    """A state directory whose QEMU is gone (crash, reboot) disappears from the listing and from disk."""
    from xenswap.hv.qemu.vm import qemu_root

    vm_dir = qemu_root() / "ghost"
    vm_dir.mkdir(parents=True)
    (vm_dir / "vm.json").write_text(json.dumps({**_config(name="ghost").__dict__, "pid": 2**22 + 1, "created": 0}))
    assert open_hypervisor().list_domains() == []
    assert not vm_dir.exists()
