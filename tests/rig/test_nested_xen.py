"""Rig tier: boot the nested Xen rig once, run the dom0 test suite inside it, and check ``xenswap list`` run in
dom0 shows a guest created there. Timings go to stdout (``pytest -s`` shows them)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xenswap.rig import Rig, RigBootTimeout
from xenswap.rig.rig import patched_hypervisor

pytestmark = pytest.mark.rig

CHECKOUT = Path(__file__).resolve().parents[2]


def test_boot_timeout_reports_serial_tail(tmp_path):
    """Runs before the module's rig boots (file order), so only one nested machine uses the CPUs at a time."""
    started = time.monotonic()
    with pytest.raises(RigBootTimeout) as info:
        Rig.boot(timeout=8, state_dir=tmp_path / "rig")
    message = str(info.value)
    assert "did not come up within 8 s" in message
    # the tail of the serial log: the hypervisor (or already dom0's kernel) had started printing
    assert re.search(r"\(XEN\)|\[\s*\d+\.\d+\]", message.split("last lines:", 1)[1])
    assert time.monotonic() - started < 60
    assert not Rig(tmp_path / "rig", 0).alive()


@pytest.fixture(scope="module")
def rig():
    from xenswap.guest.image import build_guest_image

    image = build_guest_image()
    # the kernel module is loaded by a dom0 test: build it here against the dom0 kernel's headers
    build = subprocess.run(["make", "-C", str(CHECKOUT / "kmod")], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    # Our patched hypervisor (built from hypervisor-patches/ on first use, ~2.5 min, then cached): the paging,
    # sharing and event-prefetch tests need it, and every other dom0 test runs on it as well.
    started = time.monotonic()
    xen_elf = patched_hypervisor()
    print(f"\npatched hypervisor {xen_elf} ready after {time.monotonic() - started:.1f} s")
    rig = Rig.boot(xen="patched", xen_path=xen_elf, timeout=300)
    try:
        print(f"rig: dom0 ready after {rig.boot_seconds:.1f} s")
        rig.set_env(XENSWAP_GUEST_KERNEL=rig.dom0_path(image.kernel),
                    XENSWAP_GUEST_INITRD=rig.dom0_path(image.initrd))
        yield rig
    finally:
        rig.shutdown()
    assert not rig.alive()


def test_rig_runs_the_patched_hypervisor(rig):
    rc, out = rig.run("xl info", timeout=60)
    assert rc == 0, out
    assert re.search(r"^xen_extra\s+:\s+\.\d+-xenswap$", out, re.M), out
    assert "hap" in re.search(r"^virt_caps\s+:(.*)$", out, re.M).group(1)


def test_channel_exit_status_and_copy_in(rig):
    rig.copy_in(b"from the host\n", "/tmp/xenswap-copied")
    rc, out = rig.run("cat /tmp/xenswap-copied; cat /proc/xen/capabilities; exit 3", timeout=30)
    assert rc == 3
    assert out.splitlines() == ["from the host", "control_d"]


def _relay_live(chunk: bytes) -> None:
    """dom0's pytest output as it comes (past pytest's capture): CI shows which dom0 test runs and passes."""
    sys.__stdout__.write(chunk.decode(errors="replace"))
    sys.__stdout__.flush()


def _failure_digest(out: str) -> str:
    """The dom0 suite's failures first (per failing test: its last error line and the Xen state the dom0 conftest
    recorded after it), then the end of its output: a CI log cut in the middle still shows why."""
    failures = re.split(r"^(_{5,} test\S* _{5,})$", out, flags=re.M)
    digest = []
    for header, body in zip(failures[1::2], failures[2::2], strict=True):
        body = re.split(r"^={5,} ", body, flags=re.M)[0]
        errors = re.findall(r"^E {3}.*$", body, re.M)
        raised = [line for line in errors if re.match(r"E\s+\w+(Error|Exception|Timeout)\b", line)]
        state = body.partition("xen state after the failure")[2]
        digest += [header, *(raised or errors)[-1:], state[:1800].strip("- \n")]
    return "\n".join([*digest, "...", out[-2500:]])


def triple_faults(serial_log: Path) -> list[str]:
    """Xen's reports of guest triple faults in the rig's serial log (all of Xen's console, which ``xl dmesg``'s
    ring may have lost), each with the lines before it: hypervisor patch 0007's trace of the vCPU's last
    VMRUN/#VMEXIT pairs, and 0008's line on the frame at the guest's RIP (its p2m type, or the failed walk)."""
    lines = serial_log.read_text(errors="replace").splitlines()
    reports = []
    for index, line in enumerate(lines):
        if "Triple fault" in line:
            start = index
            while start > 0 and index - start < 20 and "VMRUN/#VMEXIT" not in lines[start]:
                start -= 1
            # and 0007's lines before the trace: the #VMEXIT that lost the guest's state, exceptions combined
            while start > 0 and re.search(r"saved Xen's own state|is pending, rip", lines[start - 1]):
                start -= 1
            reports.append("\n".join(lines[start:index + 1]))
    return reports


def failed_tests(out: str) -> list[str]:
    """The node ids pytest's short summary (-rfE) lists as FAILED or ERROR."""
    return re.findall(r"^(?:FAILED|ERROR) (tests/\S+::\S+)", out, re.M)


def failed_on_a_lost_guest(out: str) -> set[str]:
    """The failed tests (node ids) whose failure report (the dom0 conftest's Xen state) lists a domain that has
    shut down: a guest lost under the test (a triple fault is a reboot to Xen, and the test guests are kept on
    one), not a test that failed with its guests alive."""
    sections = dict(re.findall(r"^_+ (test\S*) _+$\n(.*?)(?=^_+ test|^={5,} )", out, re.M | re.S))
    lost = set()
    for test in failed_tests(out):
        state = sections.get(test.rsplit("::", 1)[1], "").partition("xen state after the failure")[2]
        # xl list's State column: r b p s, then the shutdown reason or c, then d; "s" is shut down
        if re.search(r"^\S+\s+\d+\s+\d+\s+\d+\s+[-r][-b][-p]s\S\S\s", state, re.M):
            lost.add(test)
    return lost


DOM0_PYTEST = "python3 -m pytest -p no:cacheprovider -m 'dom0 and not soak' -v -rfE"


@pytest.mark.timeout(3000)  # the whole dom0 suite (paging, sharing, automation under nested TCG) in one test
def test_dom0_suite_passes(rig):
    """Every dom0-marked test of the project (Xen port, xenstore, paging, sharing, automation, kernel module,
    netem/VLAN topologies) in one boot.

    A run in which Xen reported a guest triple fault, and every failed test's report shows a guest shut down under
    it, runs its failed tests once more, in a fresh pytest (fresh guests): QEMU's TCG emulation of SVM now and
    then loses a guest's state at the first instruction after a VMRUN (docs/xen.md, "Guest triple faults"; paging
    makes it likelier, it is not caused by it), and one such loss fails every later test of the module that
    shares the guest. Each fault is printed with Xen's exit trace; a test that fails again, or that failed with its
    guests alive, fails this test."""
    faults_before = len(triple_faults(rig.serial_log))
    started = time.monotonic()
    rc, out = rig.run(f"{DOM0_PYTEST} --durations=8 tests", timeout=2400, on_output=_relay_live)
    print(f"dom0 suite: {time.monotonic() - started:.1f} s\n{out[-2500:]}")
    faults = triple_faults(rig.serial_log)[faults_before:]
    failed = failed_tests(out)
    lost = failed_on_a_lost_guest(out)
    if rc != 0 and faults and failed and set(failed) <= lost:
        print(f"\n{len(faults)} guest triple fault(s) in the dom0 suite:\n" + "\n\n".join(faults))
        print(f"running the {len(failed)} failed test(s) once more: {failed}", flush=True)
        first_digest = _failure_digest(out)
        rc, out = rig.run(f"{DOM0_PYTEST} {' '.join(shlex.quote(test) for test in dict.fromkeys(failed))}",
                          timeout=1200, on_output=_relay_live)
        assert rc == 0, f"failed again after the triple fault:\n{_failure_digest(out)}\n\nfirst run:\n{first_digest}"
    elif faults:
        why = "no test failed" if rc == 0 else "a test failed with its guests alive"
        print(f"\n{len(faults)} guest triple fault(s) in the dom0 suite ({why}; nothing rerun):\n"
              + "\n\n".join(faults))
    assert rc == 0, _failure_digest(out)
    summary = re.search(r"(\d+) passed", out)
    assert summary and int(summary.group(1)) > 0, out[-2000:]
    assert " failed" not in out and " error" not in out


def test_xenswap_list_in_dom0_shows_guest(rig):
    kernel, initrd = rig.env["XENSWAP_GUEST_KERNEL"], rig.env["XENSWAP_GUEST_INITRD"]
    config = (f'name = "listed"\\ntype = "pv"\\nkernel = "{kernel}"\\nramdisk = "{initrd}"\\n'
              f'memory = 128\\nextra = "console=hvc0 xenswap.hostname=listed"\\n')
    started = time.monotonic()
    rc, out = rig.run(f"printf '{config}' > /tmp/listed.cfg && xl create /tmp/listed.cfg", timeout=180)
    assert rc == 0, out
    print(f"PV xl create: {time.monotonic() - started:.1f} s")
    try:
        rc, out = rig.run("xenswap list --json 2>/dev/null", timeout=60)
        assert rc == 0, out
        listed = {d["name"]: d for d in json.loads(out)}
        assert listed["listed"]["domid"] > 0
        assert listed["listed"]["mem_mib"] in range(120, 129)
        assert listed["Domain-0"]["domid"] == 0
        rc, table = rig.run("xenswap list listed", timeout=60)
        assert rc == 0 and table.splitlines()[0].split()[:6] == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
        assert table.splitlines()[1].split()[0] == "listed"
    finally:
        rig.run("xl destroy listed", timeout=60)
    rc, out = rig.run("xenswap list missing-guest", timeout=60)
    assert rc == 1 and "unknown domain 'missing-guest'" in out
