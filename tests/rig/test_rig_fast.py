"""Fast tier for the nested Xen rig: channel framing, the dom0 agent against a real socket and real
commands, the dom0 initramfs recipe (its binaries executed in a chroot), and clear errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from xenswap.config import cache_dir
from xenswap.errors import XenswapError
from xenswap.rig import Rig, RigError, RigNotRunning
from xenswap.rig.agent import Agent
from xenswap.rig.framing import MAGIC, FrameDecoder, encode, encode_json
from xenswap.rig.image import DOM0_MODULES, build_rig_image, hypervisor_elf, module_dependencies, recipe
from xenswap.rig.rig import Channel, checkout_root


# -- framing ------------------------------------------------------------------------------------------------
def test_frames_roundtrip_byte_by_byte():
    stream = encode("OUT", "a1", b"hello\n") + encode_json("END", "a1", {"rc": 3}) + encode("OUT", "b2", b"")
    decoder = FrameDecoder()
    frames = [f for i in range(len(stream)) for f in decoder.feed(stream[i : i + 1])]
    assert [(f.kind, f.ident) for f in frames] == [("OUT", "a1"), ("END", "a1"), ("OUT", "b2")]
    assert frames[0].payload == b"hello\n"
    assert frames[1].json() == {"rc": 3}
    assert decoder.skipped == 0


def test_decoder_resyncs_after_garbage_and_cut_frames():
    whole = encode("OUT", "x", b"payload with \n newlines")
    cut = whole[: len(whole) // 2 + 3]  # the second half of a frame, as seen after a reconnect
    stream = b"console noise" + cut[len(MAGIC) + 2 :] + MAGIC + b"BOGUS header\n" + whole
    frames = FrameDecoder().feed(stream)
    assert [(f.kind, f.payload) for f in frames] == [("OUT", b"payload with \n newlines")]


def test_payload_containing_magic_is_not_split():
    payload = b"before " + MAGIC + b"OUT z 3\nabc after"
    frames = FrameDecoder().feed(encode("OUT", "y", payload))
    assert len(frames) == 1 and frames[0].payload == payload


def test_encode_rejects_bad_kind_and_id():
    with pytest.raises(ValueError):
        encode("NOPE", "x", b"")
    with pytest.raises(ValueError):
        encode("OUT", "has space", b"")


# -- agent over a real socket, running real commands -----------------------------------------------------------
@pytest.fixture
def channel():
    host, guest = socket.socketpair()
    agent = threading.Thread(target=Agent(guest.fileno()).serve, kwargs={"stop_on_eof": True}, daemon=True)
    agent.start()
    chan = Channel(Path("/nonexistent"))
    chan.sock = host
    yield chan
    host.close()
    agent.join(10)
    guest.close()


def test_agent_streams_output_and_exit_status(channel):
    chunks: list[bytes] = []
    rc, out = channel.request("REQ", {"cmd": "echo out; echo err >&2; exit 5", "timeout": 30}, 30, chunks.append)
    assert rc == 5
    assert out == b"out\nerr\n" == b"".join(chunks)


def test_agent_env_cwd_and_timeout(channel, tmp_path):
    rc, out = channel.request("REQ", {"cmd": "echo $FOO; pwd", "env": {"FOO": "bar"}, "cwd": str(tmp_path)}, 30)
    assert (rc, out.decode().split()) == (0, ["bar", str(tmp_path)])
    rc, out = channel.request("REQ", {"cmd": "sleep 30", "timeout": 0.5}, 30)
    assert rc == 124 and b"timed out" in out


def test_agent_put_writes_file(channel, tmp_path):
    import base64

    target = tmp_path / "sub" / "file"
    data = base64.b64encode(b"\0data").decode()
    rc, _ = channel.request("PUT", {"path": str(target), "mode": 0o600, "data": data}, 30)
    assert rc == 0
    assert target.read_bytes() == b"\0data"
    assert target.stat().st_mode & 0o777 == 0o600


def test_agent_ignores_unrelated_frames(channel):
    channel.sock.sendall(b"garbage" + encode("OUT", "stale", b"old output"))
    rc, out = channel.request("REQ", {"cmd": "echo fresh"}, 30)
    assert (rc, out) == (0, b"fresh\n")


# -- the dom0 image ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rig_image():
    return build_rig_image()


@pytest.fixture(scope="module")
def dom0_tree(rig_image, tmp_path_factory):
    root = tmp_path_factory.mktemp("dom0root")
    with open(rig_image.initrd, "rb") as archive:
        subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], stdin=archive, cwd=root, check=True)
    return root


def test_image_is_cached_by_recipe(rig_image):
    again = build_rig_image()
    assert again == rig_image
    assert rig_image.initrd.parent.name == f"dom0-{rig_image.recipe_hash}"
    recorded = json.loads((rig_image.initrd.parent / "recipe.json").read_text())
    changed = dict(recorded["packages"], **{"xen-utils-4.17": "0.0-other"})
    assert recipe(changed)["packages"] != recorded["packages"]
    assert recipe(recorded["packages"]) == recorded


def test_hypervisor_is_multiboot_elf(rig_image):
    data = rig_image.xen.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert (0x1BADB002).to_bytes(4, "little") in data[:65536]  # multiboot header magic


def test_dom0_tree_has_toolstack_python_and_modules(dom0_tree, rig_image):
    for rel in ["init", "usr/lib/xen-4.17/bin/xl", "usr/lib/xen-4.17/bin/xenstored", "usr/bin/python3.11",
                "usr/lib/x86_64-linux-gnu/libgcc_s.so.1", "usr/lib/xenswap-rig/agent.py", "bin/busybox",
                "usr/lib/python3/dist-packages/pyxs", "usr/lib/python3/dist-packages/pytest"]:
        assert (dom0_tree / rel).exists(), rel
    loaded = (dom0_tree / "etc/xenswap-rig/modules").read_text().split()
    names = [Path(m).name.split(".ko")[0] for m in loaded]
    for module in DOM0_MODULES:
        assert module in names or module.replace("-", "_") in names, module
    assert names.index("9pnet") < names.index("9p")  # dependencies first


def test_dom0_binaries_run_in_chroot(dom0_tree):
    """Every library the dom0 binaries need is in the image: run them in a chroot of it."""
    env = {"PATH": "/usr/lib/xen-4.17/bin:/usr/bin:/bin:/sbin", "LD_LIBRARY_PATH": ""}
    xl = subprocess.run(["chroot", str(dom0_tree), "xl", "help"], capture_output=True, text=True, env=env)
    # it loads and runs; with no hypervisor here it stops at opening the control interface
    assert "error while loading shared libraries" not in xl.stderr
    assert "cannot init xl context" in xl.stderr
    code = "import ssl, json, pyxs, pytest, yaml, rich, pyroute2, qemu.qmp, ctypes; print('ok')"
    py = subprocess.run(["chroot", str(dom0_tree), "/usr/bin/python3", "-c", code], capture_output=True, text=True,
                        env=env)
    assert py.stdout.strip() == "ok", py.stderr
    # libxl's vif hotplug script is #!/bin/bash (without it every xl create of a guest with a vif fails)
    bash = subprocess.run(["chroot", str(dom0_tree), "/bin/bash", "-c", "echo ${BASH_VERSINFO[0]}"],
                          capture_output=True, text=True, env=env)
    assert bash.stdout.strip().isdigit(), bash.stderr
    for tool in ["xenstored", "xenconsoled", "xen-init-dom0", "xenstore-read"]:
        proc = subprocess.run(["chroot", str(dom0_tree), "sh", "-c", f"ldd $(command -v {tool})"],
                              capture_output=True, text=True, env=env)
        assert "not found" not in proc.stdout, (tool, proc.stdout)


def test_module_dependencies_are_ordered(rig_image):
    tree = rig_image.kernel.parents[1]
    order = [p.name for p in module_dependencies(["xenfs", "8021q"], tree, rig_image.kernel_version)]
    assert order.index("xen-privcmd.ko") < order.index("xenfs.ko")
    assert order.index("garp.ko") < order.index("8021q.ko")
    with pytest.raises(XenswapError, match="no-such-module"):
        module_dependencies(["no-such-module"], tree, rig_image.kernel_version)


def test_missing_hypervisor_package_image_is_clear(tmp_path):
    with pytest.raises(XenswapError, match="no hypervisor image"):
        hypervisor_elf(tmp_path, "1.0")


# -- rig errors -------------------------------------------------------------------------------------------------
def test_boot_with_missing_hypervisor_elf_is_clear(tmp_path):
    with pytest.raises(RigError, match="does not exist"):
        Rig.boot(xen_path=tmp_path / "xen.elf", state_dir=tmp_path / "rig")


def test_attach_without_rig_is_clear(tmp_path):
    with pytest.raises(RigNotRunning, match="xenswap rig boot"):
        Rig.attach(tmp_path)


def test_cli_run_without_rig_is_one_clear_line():
    proc = subprocess.run([sys.executable, "-m", "xenswap", "rig", "run", "true"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("xenswap: error: no rig running")


def test_dom0_paths_follow_the_shares(tmp_path):
    rig = Rig(tmp_path, pid=0)
    assert rig.dom0_path(checkout_root() / "tests" / "xen") == "/mnt/checkout/tests/xen"
    assert rig.dom0_path(cache_dir() / "images" / "x" / "vmlinuz") == "/mnt/cache/images/x/vmlinuz"
    with pytest.raises(RigError, match="copy_in"):
        rig.dom0_path("/etc/hostname")
