"""The daemon's xenstore automation against the real xenstored in the nested dom0: requests written to xenstore
are taken and answered, bad ones get one clear error and the loop goes on, policy is checked, figures are
published, and the xl-style commands (``xenswap request|policy|status``) work on the same state."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from xenswap.hv.xen import xl
from xenswap.hv.xen.automation import PAGING_UNAVAILABLE, ROOT, Automation
from xenswap.hv.xen.xenstore import XenStore

pytestmark = pytest.mark.dom0


def xenstore_write(path: str, value: str) -> None:
    """Through the xenstore-write tool, as an operator (or another program) would."""
    subprocess.run(["xenstore-write", path, value], check=True, capture_output=True, timeout=30)


def wait_answer(scratch: str, key: str, seq_before: int, timeout: float = 300) -> dict[str, str]:
    status = f"{scratch}/status/{key}"
    deadline = time.monotonic() + timeout
    with XenStore() as store:
        while time.monotonic() < deadline:
            if int(store.read(f"{status}/seq", "0") or 0) > seq_before:
                return {name: store.read(f"{status}/{name}", "") or "" for name in store.list(status)}
            time.sleep(0.2)
    raise AssertionError(f"no answer at {status} within {timeout} s")


def seq(scratch: str, key: str) -> int:
    with XenStore() as store:
        return int(store.read(f"{scratch}/status/{key}/seq", "0") or 0)


@pytest.fixture(scope="module")
def guest(pvh_guest):
    return pvh_guest.name, xl.domid(pvh_guest.name)


def test_bad_requests_get_one_error_each_and_the_loop_goes_on(scratch, guest):
    _, domid = guest
    with Automation(engine=None, root=scratch, share_interval=0, publish_interval=3600) as automation:
        cases = [
            ("abc", "page-out", "the last part must be a domain id"),
            ("4242", "page-out", "no domain 4242"),
            ("0", "share", "Domain-0 runs this daemon"),
            (str(domid), "explode now", "unknown request 'explode now': expected one of page-out"),
        ]
        for key, value, expected in cases:
            before = seq(scratch, key)
            xenstore_write(f"{scratch}/request/{key}", value)
            answer = wait_answer(scratch, key, before, timeout=30)
            assert answer["result"] == "error", answer
            assert expected in answer["message"], answer
            assert answer["request"] == value
            assert answer["seq"] == str(before + 1)  # exactly one answer
        with XenStore() as store:
            assert store.list(f"{scratch}/request") == []  # every request was taken
        assert automation._thread is not None and automation._thread.is_alive()
        # ... and it still answers a good request afterwards
        before = seq(scratch, str(domid))
        xenstore_write(f"{scratch}/request/{domid}", "page-in")
        answer = wait_answer(scratch, str(domid), before, timeout=30)
        assert answer["result"] == "unavailable" and answer["message"] == PAGING_UNAVAILABLE


def test_paging_requests_without_a_mechanism_say_so(scratch, guest):
    _, domid = guest
    with Automation(engine=None, root=scratch, share_interval=0, publish_interval=3600):
        for action in ("page-out", "page-out-all", "page-in"):
            before = seq(scratch, str(domid))
            xenstore_write(f"{scratch}/request/{domid}", action)
            answer = wait_answer(scratch, str(domid), before, timeout=30)
            assert (answer["result"], answer["message"]) == ("unavailable", PAGING_UNAVAILABLE), answer


def test_share_request_written_before_start_is_taken_and_shares(scratch, guest):
    """A request pending when the daemon starts is handled (the watch's first firing); share merges the guest's
    duplicate pages (zero pages at least) and Xen's counters show it."""
    name, domid = guest
    xenstore_write(f"{scratch}/request/{domid}", "share")
    started = time.monotonic()
    with Automation(engine=None, root=scratch, share_interval=0, publish_interval=1.0) as automation:
        answer = wait_answer(scratch, str(domid), 0, timeout=600)
        elapsed = time.monotonic() - started
        assert answer["result"] == "ok", answer
        merged = int(answer["message"].split("merged ")[1].split()[0])
        assert merged > 1000, answer  # a 128 MiB guest that just booted has thousands of zero pages
        print(f"\nshare request for one guest answered in {elapsed:.1f} s: {answer['message']}")
        assert automation.last_share is not None and automation.last_share["domains"] == [domid]
        # published figures include the shared MiB (from Xen) within a publish interval or two
        deadline = time.monotonic() + 30
        with XenStore() as store:
            while time.monotonic() < deadline:
                if (store.read(f"{scratch}/domains/{domid}/shared-mib") or "0") not in ("", "0"):
                    break
                time.sleep(0.5)
            assert store.read(f"{scratch}/domains/{domid}/name") == name
            assert int(store.read(f"{scratch}/domains/{domid}/shared-mib") or 0) > 0
            assert store.read(f"{scratch}/domains/0/name") == "Domain-0"
            assert float(store.read(f"{scratch}/daemon/heartbeat") or 0) > time.time() - 60


def test_policy_is_checked_and_applied(scratch, guest):
    _, domid = guest
    with Automation(engine=None, root=scratch, share_interval=0, publish_interval=3600) as automation:
        before = seq(scratch, str(domid))
        xenstore_write(f"{scratch}/policy/{domid}/idle-threshold", "soon")
        answer = wait_answer(scratch, str(domid), before, timeout=30)
        assert answer["result"] == "error"
        assert answer["message"] == "policy idle-threshold: 'soon' is not a number of seconds"
        before = seq(scratch, str(domid))
        xenstore_write(f"{scratch}/policy/{domid}/idle-threshold", "90")
        answer = wait_answer(scratch, str(domid), before, timeout=30)
        assert answer["result"] == "ok", answer
        before = seq(scratch, str(domid))
        xenstore_write(f"{scratch}/policy/{domid}/share", "on")
        answer = wait_answer(scratch, str(domid), before, timeout=30)
        assert answer["result"] == "ok" and "share=on" in answer["message"], answer
        assert automation.policies[domid].share is True
        assert automation.idle_threshold(domid) == 90.0
        assert automation.allows_auto_page_out(domid) is True
        before = seq(scratch, str(domid))
        xenstore_write(f"{scratch}/policy/{domid}/auto-page-out", "off")
        wait_answer(scratch, str(domid), before, timeout=30)
        assert automation.allows_auto_page_out(domid) is False


def xenswap(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xenswap", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_xl_style_commands_on_the_daemons_state(guest):
    """``xenswap request|policy|status`` against an automation on the real /xenswap tree."""
    name, domid = guest
    with XenStore() as store:
        if store.read(f"{ROOT}/daemon/pid"):
            pytest.fail(f"a xenswap daemon is already answering on {ROOT}: this test needs the tree to itself")
    proc = xenswap("request", name, "page-in")
    assert proc.returncode == 1 and "no xenswap daemon is answering" in proc.stderr, proc.stderr
    try:
        with Automation(engine=None, share_interval=0, publish_interval=1.0):
            proc = xenswap("request", name, "share", "--json")
            assert proc.returncode == 0, proc.stderr
            answer = json.loads(proc.stdout)
            assert answer["result"] == "ok" and answer["message"].startswith("merged "), answer
            proc = xenswap("request", name, "page-out")
            assert proc.returncode == 1 and proc.stdout.startswith("unavailable: paging not available"), proc.stdout
            proc = xenswap("policy", name, "share=maybe")
            assert proc.returncode == 1 and "policy share: 'maybe' is not on/off" in proc.stderr, proc.stderr
            proc = xenswap("policy", name, "share=on", "idle-threshold=120")
            assert proc.returncode == 0, proc.stderr
            assert "idle-threshold  120" in proc.stdout or "idle-threshold 120" in " ".join(proc.stdout.split())
            time.sleep(2.5)  # a publish interval or two
            proc = xenswap("status", "--json")
            assert proc.returncode == 0, proc.stderr
            status = json.loads(proc.stdout)
            rows = {row["domid"]: row for row in status["domains"]}
            assert rows[domid]["name"] == name
            # the last thing answered for the domain was its policy change (status records requests and policy)
            assert (rows[domid]["last-request"], rows[domid]["last-result"]) == ("policy", "ok"), rows[domid]
            assert status["daemon"]["pid"]
            proc = xenswap("status")
            assert proc.returncode == 0 and name in proc.stdout
    finally:
        with XenStore() as store:
            for section in ("request", "status", "policy", "domains", "daemon"):
                store.remove(f"{ROOT}/{section}")


def test_paging_requests_drive_the_policy_engine(scratch, guest, tmp_path, monkeypatch):
    """With the Xen paging mechanism (xenswap.hv.xen.memory) the daemon's engine acts on page requests: a
    page-out-all pauses the guest with its memory paged out, a page-in resumes it."""
    from xenswap.core.policy import DomainOverride, engine_for
    from xenswap.hv.xen import open_hypervisor
    from xenswap.hv.xen.memory import stage_budget_pages

    monkeypatch.setenv("XENSWAP_STATE", str(tmp_path))  # the engine's state store, not the real daemon's
    _, domid = guest
    hv = open_hypervisor()
    engine = engine_for(hv)
    assert engine is not None, "no Xen paging mechanism: xenswap.hv.xen.memory did not load"
    try:
        with Automation(engine=engine, root=scratch, share_interval=0, publish_interval=3600) as automation:
            before = seq(scratch, str(domid))
            xenstore_write(f"{scratch}/request/{domid}", "page-out-all")
            answer = wait_answer(scratch, str(domid), before, timeout=300)
            assert answer["result"] == "ok" and answer["message"].startswith("paged out "), answer
            assert hv.lookup(domid).state[2] == "p"
            automation.publish()  # the engine's pager holds staged copies within the process's budget
            with XenStore() as store:
                staged = store.read(f"{scratch}/daemon/staged") or ""
            assert re.fullmatch(rf"pages=\d+ held=\d+ budget={stage_budget_pages()} evicted=\d+ refused=\d+",
                                staged), staged
            before = seq(scratch, str(domid))
            xenstore_write(f"{scratch}/request/{domid}", "page-in")
            answer = wait_answer(scratch, str(domid), before, timeout=300)
            assert answer["result"] == "ok" and answer["message"].startswith("paged in "), answer
            assert hv.lookup(domid).state[2] == "-"
            # the domain's policy reaches the engine's ticks (keys by domain name)
            xenstore_write(f"{scratch}/policy/{domid}/auto-page-out", "off")
            xenstore_write(f"{scratch}/policy/{domid}/idle-threshold", "45")
            deadline = time.monotonic() + 30
            name = hv.lookup(domid).name
            while engine.overrides.get(name) != DomainOverride(False, 45.0) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert engine.overrides.get(name) == DomainOverride(False, 45.0), engine.overrides
    finally:
        if hv.lookup(domid).state[2] == "p":
            hv.unpause(domid)
        hv.close()
