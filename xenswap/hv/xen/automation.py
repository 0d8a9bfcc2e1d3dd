"""xenstore-triggered automation: the dom0 daemon's xenstore interface (every path is in docs/xenstore.md).

The daemon watches its own tree and acts:

- ``/xenswap/request/<domid>``: one request per domain, e.g. ``page-out``, ``page-in``, ``share``. The daemon
  removes the key when it takes the request (so writing the same request again asks again) and answers in
  ``/xenswap/status/<domid>/`` (``request``, ``result``, ``message``, ``time``, then ``seq`` last);
- ``/xenswap/policy/<domid>/<key>``: per-domain policy (``share``, ``auto-page-out``, ``idle-threshold``), checked
  on every write; a bad value is answered in the domain's status like a bad request;
- it publishes what it knows per domain under ``/xenswap/domains/<domid>/`` and its own liveness under
  ``/xenswap/daemon/``.

A bad request or policy value gets exactly one error status and the loop goes on: nothing a writer puts in
xenstore can stop the daemon. ``xenswap request|policy|status`` (registered from xenswap.share) are the
xl-style commands on the same state.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from xenswap.core.policy import DomainOverride, Manager
from xenswap.errors import XenswapError
from xenswap.hv.xen.xenstore import Watch, XenStore, XenStoreError

log = logging.getLogger(__name__)

ROOT = "/xenswap"
REQUESTS = ("page-out", "page-out-all", "page-in", "share")
RESULT_RUNNING, RESULT_OK, RESULT_ERROR, RESULT_UNAVAILABLE = "running", "ok", "error", "unavailable"
PAGING_UNAVAILABLE = ("paging not available on this hypervisor: no Xen paging mechanism "
                      "(xenswap.hv.xen.memory) is loaded in this daemon")
ON_OFF = {"on": True, "1": True, "yes": True, "off": False, "0": False, "no": False}


@dataclass
class DomainPolicy:
    """Per-domain policy from ``/xenswap/policy/<domid>/`` (absent keys keep these defaults)."""

    share: bool = False  # include the domain in the periodic sharing pass
    auto_page_out: bool = True  # let the policy engine page the domain out when idle
    idle_threshold_s: float | None = None  # idle seconds before acting (None: the engine's own prediction)

    def to_xenstore(self) -> dict[str, str]:
        return {"share": "on" if self.share else "off", "auto-page-out": "on" if self.auto_page_out else "off",
                "idle-threshold": "" if self.idle_threshold_s is None else f"{self.idle_threshold_s:g}"}


def parse_policy(values: dict[str, str]) -> tuple[DomainPolicy, list[str]]:
    """A policy from the key/values written under a domain's policy dir, and one error line per bad key
    (bad keys keep their default)."""
    policy = DomainPolicy()
    errors = []
    for key, raw in sorted(values.items()):
        value = raw.strip().lower()
        if key in ("share", "auto-page-out"):
            if value not in ON_OFF:
                errors.append(f"policy {key}: {raw!r} is not on/off")
                continue
            setattr(policy, key.replace("-", "_"), ON_OFF[value])
        elif key == "idle-threshold":
            if value == "":
                continue
            try:
                seconds = float(value)
            except ValueError:
                errors.append(f"policy idle-threshold: {raw!r} is not a number of seconds")
                continue
            if not 0 <= seconds < 10**7:
                errors.append(f"policy idle-threshold: {raw!r} is out of range (0 .. 10^7 s)")
                continue
            policy.idle_threshold_s = seconds
        else:
            errors.append(f"policy {key}: unknown key (known: share, auto-page-out, idle-threshold)")
    return policy, errors


def parse_request(key: str, value: str, live_domids: set[int]) -> tuple[int, str]:
    """(domid, action) of the request written at ``/xenswap/request/<key>``; XenswapError saying what is wrong."""
    try:
        domid = int(key)
    except ValueError:
        raise XenswapError(f"bad request path {ROOT}/request/{key}: the last part must be a domain id") from None
    if domid not in live_domids:
        raise XenswapError(f"no domain {domid}")
    if domid == 0:
        raise XenswapError("Domain-0 runs this daemon: it cannot be paged or shared")
    action = value.strip().lower()
    if action not in REQUESTS:
        shown = value if len(value) <= 60 else value[:60] + "..."
        raise XenswapError(f"unknown request {shown!r}: expected one of {', '.join(REQUESTS)}")
    return domid, action


class Automation:
    """The daemon's xenstore side, in a thread of its own: ``Automation(...).start()`` ... ``stop()``.

    ``engine`` is the policy engine (``xenswap.core.policy.engine_for(hv)``), used for page-out/page-in requests
    and the published figures; None answers paging requests with "unavailable". ``sharer_factory`` makes a
    XenSharer per sharing pass (tests pass a smaller batch)."""

    def __init__(self, engine: Manager | None = None, root: str = ROOT, share_interval: float = 300.0,
                 publish_interval: float = 5.0, sharer_factory: Callable[[], object] | None = None,
                 hv_factory: Callable[[], object] | None = None) -> None:
        self.engine = engine
        self.root = root.rstrip("/")
        self.share_interval = share_interval
        self.publish_interval = publish_interval
        self.sharer_factory = sharer_factory
        self.hv_factory = hv_factory
        self.hv = None  # opened by start()
        self.policies: dict[int, DomainPolicy] = {}
        self.last_share: dict[str, object] | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._seq: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> Automation:
        """Start the thread; returns once its watches are registered (a request written after this is seen)."""
        self._thread = threading.Thread(target=self._run, name="xenswap-xenstore", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise XenswapError(f"xenstore automation did not start within {timeout:g} s")
        if self._error is not None:
            raise XenswapError(f"xenstore automation failed to start: {self._error}") from self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Automation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            self.store = XenStore()
            self.hv = self.hv_factory() if self.hv_factory else _open_hypervisor()
            watch = self.store.watch(f"{self.root}/request", "xenswap-request")
            watch.add(f"{self.root}/policy", "xenswap-policy")
        except BaseException as error:  # reported by start()
            self._error = error
            self._ready.set()
            return
        try:
            self.store.write(f"{self.root}/daemon/pid", str(os.getpid()))
            self.store.write(f"{self.root}/daemon/started", f"{time.time():.0f}")
            self._ready.set()
            self._loop(watch)
        finally:
            with contextlib.suppress(Exception):
                self.store.remove(f"{self.root}/daemon")
            watch.close()
            self.store.close()
            with contextlib.suppress(Exception):
                self.hv.close()

    def _loop(self, watch: Watch) -> None:
        next_publish = next_share = 0.0
        while not self._stop.is_set():
            try:
                path, token = watch.next(timeout=0.5)
            except TimeoutError:
                path = token = None
            try:
                if token == "xenswap-request":
                    self._on_request_event(path)
                elif token == "xenswap-policy":
                    self._on_policy_event(path)
                now = time.monotonic()
                if now >= next_publish:
                    next_publish = now + self.publish_interval
                    self.publish()
                if now >= next_share and self.share_interval > 0:
                    next_share = now + self.share_interval
                    self._periodic_share()
            except Exception:  # never let one bad event end the loop
                log.exception("xenstore automation: event on %s", path)

    # ------------------------------------------------------------------ requests

    def _live(self) -> dict[int, object]:
        return {d.domid: d for d in self.hv.list_domains()}

    def _on_request_event(self, path: str | None) -> None:
        base = f"{self.root}/request"
        if path == base:  # the watch's first firing (or the dir itself changed): take whatever is pending
            for key in self.store.list(base):
                self._take_request(key)
            return
        rest = path[len(base) + 1:] if path else ""
        if rest:
            self._take_request(rest.split("/")[0])

    def _take_request(self, key: str) -> None:
        path = f"{self.root}/request/{key}"
        value = self.store.read(path)
        if value is None:
            return  # our own removal of a request we took, or a dir event
        children = self.store.list(path)
        self.store.remove(path)
        if children:
            self._answer(key, value, RESULT_ERROR, f"bad request: {path} must be a single value, not a directory")
            return
        try:
            domid, action = parse_request(key, value, set(self._live()))
        except XenswapError as error:
            self._answer(key, value, RESULT_ERROR, str(error))
            return
        self._answer(key, value, RESULT_RUNNING, f"{action} started", final=False)
        try:
            result, message = self.act(domid, action)
        except Exception as error:  # a failed action is an answer, not a crash
            result, message = RESULT_ERROR, f"{action} failed: {error}"
        self._answer(key, value, result, message)

    def act(self, domid: int, action: str) -> tuple[str, str]:
        """Carry out one request; (result, message)."""
        if action == "share":
            report = self._share([domid] + [d for d, p in self.policies.items() if p.share and d != domid])
            return RESULT_OK, (f"merged {report.pages_merged} pages into shared frames, freed {report.freed_frames} "
                               f"frames ({report.saved_mib:.1f} MiB)")
        if self.engine is None:
            return RESULT_UNAVAILABLE, PAGING_UNAVAILABLE
        name = self.hv.lookup(domid).name
        if action == "page-in":
            decision = self.engine.page_in(name)
            return RESULT_OK, f"paged in {decision.pages or 0} pages"
        decision = self.engine.page_out(name, keep_ws=action == "page-out")
        return RESULT_OK, f"paged out {decision.pages or 0} pages"

    def _answer(self, key: str, request: str, result: str, message: str, final: bool = True) -> None:
        status = f"{self.root}/status/{key}"
        self.store.write(f"{status}/request", request)
        self.store.write(f"{status}/message", message)
        self.store.write(f"{status}/time", f"{time.time():.3f}")
        self.store.write(f"{status}/result", result)
        if final:
            seq = self._seq.get(key)
            if seq is None:
                seq = int(self.store.read(f"{status}/seq", "0") or 0)
            self._seq[key] = seq + 1
            self.store.write(f"{status}/seq", str(seq + 1))  # last: clients wait for it to change

    # ------------------------------------------------------------------ policy

    def _on_policy_event(self, path: str | None) -> None:
        base = f"{self.root}/policy"
        keys = self.store.list(base) if path == base or not path else [path[len(base) + 1:].split("/")[0]]
        for key in keys:
            self._load_policy(key)

    def _load_policy(self, key: str) -> None:
        directory = f"{self.root}/policy/{key}"
        values = {name: self.store.read(f"{directory}/{name}", "") or "" for name in self.store.list(directory)}
        try:
            domid = int(key)
        except ValueError:
            if values or self.store.exists(directory):
                self._answer(key, "policy", RESULT_ERROR, f"bad policy path {directory}: not a domain id")
            return
        if not values:
            self.policies.pop(domid, None)
            self._tell_engine(domid, None)
            return
        policy, errors = parse_policy(values)
        previous = self.policies.get(domid)
        self.policies[domid] = policy
        self._tell_engine(domid, policy)
        if errors:
            self._answer(key, "policy", RESULT_ERROR, "; ".join(errors))
        elif previous != policy:
            self._answer(key, "policy", RESULT_OK, "policy " + " ".join(
                f"{k}={v or '-'}" for k, v in policy.to_xenstore().items()))

    def _tell_engine(self, domid: int, policy: DomainPolicy | None) -> None:
        """The engine's ticks follow auto-page-out and idle-threshold (the engine knows domains by name)."""
        if self.engine is None or self.hv is None:
            return
        try:
            name = self.hv.lookup(domid).name
        except (XenswapError, OSError):
            return  # no such domain (yet): its policy is applied when it is written again
        override = None if policy is None else DomainOverride(policy.auto_page_out, policy.idle_threshold_s)
        self.engine.set_override(name, override)

    def allows_auto_page_out(self, domid: int) -> bool:
        policy = self.policies.get(domid)
        return True if policy is None else policy.auto_page_out

    def idle_threshold(self, domid: int) -> float | None:
        policy = self.policies.get(domid)
        return None if policy is None else policy.idle_threshold_s

    # ------------------------------------------------------------------ sharing

    def _share(self, domids: list[int]):
        from xenswap.hv.xen.sharer import XenSharer

        skip = paged_out_frames(domids) if self.engine is not None else {}
        with (self.sharer_factory() if self.sharer_factory else XenSharer(skip=skip)) as sharer:  # type: ignore[union-attr]
            report = sharer.share(domids)
        self.last_share = {"time": time.time(), "domains": domids, "pages_merged": report.pages_merged,
                           "freed_frames": report.freed_frames}
        return report

    def _periodic_share(self) -> None:
        live = self._live()
        domids = [d for d, p in self.policies.items() if p.share and d in live]
        if domids:
            self._share(domids)

    # ------------------------------------------------------------------ figures

    def publish(self) -> None:
        """Write every live domain's figures under /xenswap/domains/<domid>/ and drop entries (policy,
        status, figures) of domains that are gone: domids are reused."""
        domains = self.hv.list_domains()
        if self.engine is not None:
            domains = self.engine.annotate(domains)
        shared = xl_shared_mib()
        live = set()
        for dom in domains:
            live.add(str(dom.domid))
            base = f"{self.root}/domains/{dom.domid}"
            figures = {
                "name": dom.name, "state": dom.state, "mem-mib": str(dom.mem_mib),
                "resident-mib": _figure(dom.resident_mib), "wss-mib": _figure(dom.wss_mib),
                "idle-since": "" if dom.idle_since is None else f"{dom.idle_since:.0f}",
                "shared-mib": _figure(shared.get(dom.domid)),
            }
            for key, value in figures.items():
                if value:
                    self.store.write(f"{base}/{key}", value)
                else:  # unknown: absent (xenstore, through pyxs, holds no empty values)
                    self.store.remove(f"{base}/{key}")
        for section in ("domains", "status", "policy"):
            for key in self.store.list(f"{self.root}/{section}"):
                if key.isdigit() and key not in live:
                    self.store.remove(f"{self.root}/{section}/{key}")
                    self.policies.pop(int(key), None)
                    self._seq.pop(key, None)
        self.store.write(f"{self.root}/daemon/heartbeat", f"{time.time():.0f}")
        staged = staged_copies() if self.engine is not None else None
        if staged is not None:
            self.store.write(f"{self.root}/daemon/staged",
                             f"pages={staged.pages} held={staged.contents} budget={staged.budget} "
                             f"evicted={staged.evicted} refused={staged.refused}")
        if self.last_share:
            self.store.write(f"{self.root}/daemon/last-share",
                             f"{self.last_share['time']:.0f} merged={self.last_share['pages_merged']} "
                             f"freed={self.last_share['freed_frames']}")


def _pager_registry():  # -> the module xenswap.hv.xen.memory, or None
    """This process's pagers live in xenswap.hv.xen.memory (None where it does not load: no paging bindings)."""
    try:
        from xenswap.hv.xen import memory
    except ImportError:
        return None
    return memory


def paged_out_frames(domids: list[int]) -> dict[int, set[int]]:
    """Frames this process's pager has evicted, per domain: the sharer must not map them (mapping a paged-out
    frame makes Xen page it back in). Reads the pager registry of xenswap.hv.xen.memory."""
    memory = _pager_registry()
    pagers = getattr(memory, "_pagers", {})
    return {domid: set(pagers[domid].out) for domid in domids if domid in pagers}


def staged_copies():  # -> xenswap.core.staging.StagingStats | None
    """What this process's pagers hold staged in dom0 RAM; None without a pager."""
    memory = _pager_registry()
    return None if memory is None else memory.staging_stats()


def _figure(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def xl_shared_mib() -> dict[int, int]:
    """Per domid, MiB of the domain's memory on shared frames (``xl sharing``; xen.lowlevel.xc does not give
    the domain's shr_pages). Empty when xl is missing or fails."""
    try:
        out = subprocess.run(["xl", "sharing"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_xl_sharing(out)


def parse_xl_sharing(out: str) -> dict[int, int]:
    """``xl sharing`` output (Name ID Mem Shared; names may hold spaces) as {domid: shared MiB}."""
    shared = {}
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 4 and fields[-3].isdigit() and fields[-1].isdigit():
            shared[int(fields[-3])] = int(fields[-1])
    return shared


def _open_hypervisor():
    from xenswap.hv.xen import open_hypervisor

    return open_hypervisor()


def start_for_daemon(manager: object) -> Automation | None:
    """The daemon's hook: start the automation when the manager runs on Xen (None elsewhere)."""
    hv = getattr(manager, "hv", None)
    if getattr(hv, "name", None) != "xen":
        return None
    return Automation(engine=getattr(manager, "engine", None)).start()


# ---------------------------------------------------------------- xl-style commands on the same state


def request(domain: str, action: str, timeout: float = 600.0, root: str = ROOT) -> dict[str, str]:
    """Write a request for ``domain`` (name or id) and wait for the daemon's final answer (its status dict)."""
    from xenswap.hv.xen import open_hypervisor

    hv = open_hypervisor()
    try:
        domid = hv.lookup(domain).domid if not domain.isdigit() else int(domain)
    finally:
        hv.close()
    status = f"{root}/status/{domid}"
    with XenStore() as store, store.watch(f"{status}/seq", "xenswap-answer") as watch:
        if store.read(f"{root}/daemon/pid") is None:
            raise XenswapError(f"no xenswap daemon is answering ({root}/daemon/pid missing): start 'xenswap daemon'")
        before = store.read(f"{status}/seq", "0")
        store.write(f"{root}/request/{domid}", action)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                watch.next(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            if store.read(f"{status}/seq", "0") != before:
                return {name: store.read(f"{status}/{name}", "") or "" for name in store.list(status)}
    raise XenswapError(f"no answer to {action!r} for domain {domid} within {timeout:g} s")


def cmd_request(args: argparse.Namespace) -> int:
    answer = request(args.domain, args.action, args.timeout)
    if args.json:
        from xenswap.cli import print_json

        print_json(answer)
    else:
        print(f"{answer.get('result')}: {answer.get('message')}")
    return 0 if answer.get("result") == RESULT_OK else 1


def cmd_policy(args: argparse.Namespace) -> int:
    from xenswap.cli import print_table
    from xenswap.hv.xen import open_hypervisor

    hv = open_hypervisor()
    try:
        domid = hv.lookup(args.domain).domid
    finally:
        hv.close()
    directory = f"{ROOT}/policy/{domid}"
    with XenStore() as store:
        for setting in args.settings:
            key, sep, value = setting.partition("=")
            if not sep:
                raise XenswapError(f"bad setting {setting!r}: use KEY=VALUE (share, auto-page-out, idle-threshold)")
            _, errors = parse_policy({key: value})
            if errors:
                raise XenswapError(errors[0])
            store.write(f"{directory}/{key}", value)
        values = {name: store.read(f"{directory}/{name}", "") or "" for name in store.list(directory)}
    policy, _ = parse_policy(values)
    print_table(["Key", "Value"], sorted(policy.to_xenstore().items()))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from xenswap.cli import print_json, print_table

    rows = []
    with XenStore() as store:
        for key in sorted(store.list(f"{ROOT}/domains"), key=lambda k: int(k) if k.isdigit() else -1):
            base = f"{ROOT}/domains/{key}"
            figures = {name: store.read(f"{base}/{name}", "") or "" for name in store.list(base)}
            status = f"{ROOT}/status/{key}"
            figures["last-request"] = store.read(f"{status}/request", "") or ""
            figures["last-result"] = store.read(f"{status}/result", "") or ""
            rows.append({"domid": int(key), **figures})
        daemon = {name: store.read(f"{ROOT}/daemon/{name}", "") or "" for name in store.list(f"{ROOT}/daemon")}
    if args.json:
        print_json({"daemon": daemon, "domains": rows})
        return 0
    if not daemon:
        print("no xenswap daemon publishing (start 'xenswap daemon' in dom0)")
    print_table(["Name", "ID", "Mem", "State", "Res(MiB)", "WSS(MiB)", "Shared(MiB)", "Idle(s)", "Last request"],
                [[r.get("name"), r["domid"], r.get("mem-mib"), r.get("state"), r.get("resident-mib") or None,
                  r.get("wss-mib") or None, r.get("shared-mib") or None,
                  int(time.time() - float(r["idle-since"])) if r.get("idle-since") else None,
                  f"{r['last-request']}: {r['last-result']}" if r.get("last-request") else None] for r in rows])
    return 0


def register_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("request", help="Xen dom0: ask the daemon (through xenstore) to page out/in or share a domain")
    p.add_argument("domain", metavar="DOM")
    p.add_argument("action", choices=REQUESTS)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_request)
    p = sub.add_parser("policy", help="Xen dom0: show or set a domain's policy in xenstore (KEY=VALUE ...)")
    p.add_argument("domain", metavar="DOM")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(handler=cmd_policy)
    p = sub.add_parser("status", help="Xen dom0: the figures the daemon publishes in xenstore, per domain")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)


__all__ = ["Automation", "DomainPolicy", "XenStoreError", "parse_policy", "parse_request", "start_for_daemon"]
