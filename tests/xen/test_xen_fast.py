"""Fast tier for the Xen port on the host (no hypervisor): the xen.lowlevel.xc import fix against the real
unpacked xen-utils deb, xl state flags, guest configs, and clear errors where Xen is absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xenswap.hv.xen import xen_python_dirs
from xenswap.hv.xen.port import domain_name, state_flags
from xenswap.hv.xen.xenstore import XenStore, XenStoreError
from xenswap.hv.xen.xl import GuestSpec
from xenswap.rig.image import XEN_PACKAGES, candidate_versions, fetch_trees


@pytest.fixture(scope="module")
def xen_root() -> Path:
    """The unpacked xen-utils-4.17 deb plus the Xen libraries its bindings link against."""
    return fetch_trees(["xen-utils-4.17"])["xen-utils-4.17"]


@pytest.fixture(scope="module")
def lib_path() -> str:
    libs = [n for n in XEN_PACKAGES if n.startswith("lib")]
    trees = fetch_trees(libs)
    dirs = {str(p.parent) for tree in trees.values() for p in tree.rglob("*.so*")}
    return ":".join(sorted(dirs))


PROBE = """
import sys
from pathlib import Path
import xenswap.hv.xen as hx
added = hx.ensure_xen_python_path(Path(sys.argv[1]))
import xen.lowlevel.xc as xc
print(added)
print(xc.__file__)
try:
    xc.xc()
except xc.Error as exc:
    print("open-failed", exc)
"""


def test_xc_import_works_without_pythonpath(xen_root, lib_path):
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": lib_path}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(xen_root)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    added, module_file, opened = proc.stdout.splitlines()
    assert added == str(xen_root / "usr/lib/xen-4.17/lib/python")
    assert module_file.startswith(added + "/xen/lowlevel/xc.")
    assert opened.startswith("open-failed")  # no hypervisor here: the binding loads, the handle cannot open


def test_xc_import_survives_a_namespace_package_called_xen(xen_root, lib_path, tmp_path):
    """pytest puts tests/ on sys.path, making tests/xen a namespace package 'xen' that shadows Xen's."""
    (tmp_path / "xen").mkdir()
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import xen; " + PROBE.split("\n", 1)[1]
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": lib_path}
    proc = subprocess.run([sys.executable, "-c", code, str(xen_root)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].endswith(".so")


def test_xen_python_dirs_empty_without_xen(tmp_path):
    assert xen_python_dirs(tmp_path) == []


def test_state_flags_match_xl_columns():
    assert state_flags({"blocked": 1}) == "-b----"
    assert state_flags({"running": 1}) == "r-----"
    assert state_flags({"paused": 1, "blocked": 1}) == "-bp---"
    assert state_flags({"shutdown": 1, "crashed": 1}) == "---sc-"
    assert state_flags({"dying": 1}) == "-----d"


def test_domain_name_fallbacks():
    assert domain_name(None, 0) == "Domain-0"
    assert domain_name(None, 7) == "(null)7"


def test_guest_config():
    cfg = GuestSpec("g1", Path("/k"), Path("/i"), kind="pvh", memory_mib=96, cmdline="xenswap.ip=10.0.0.2/24").config()
    assert 'type = "pvh"' in cfg and "memory = 96" in cfg
    assert 'extra = "console=hvc0 xenswap.hostname=g1 xenswap.ip=10.0.0.2/24"' in cfg
    with pytest.raises(Exception, match="not supported"):
        GuestSpec("g2", Path("/k"), Path("/i"), kind="hvm").config()


def test_xenstore_without_xenstored_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "socket"))
    with pytest.raises(XenStoreError, match="is this a Xen dom0"):
        XenStore()


def test_cli_xen_commands_fail_clearly_off_xen():
    proc = subprocess.run([sys.executable, "-m", "xenswap", "xen", "pause", "x"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert proc.stderr.startswith("xenswap: error:") and "\n" == proc.stderr[-1] and proc.stderr.count("\n") == 1


def test_candidate_versions_batched():
    versions = candidate_versions(["xen-utils-4.17", "libyajl2", "no-such-package-xyz"])
    assert versions["xen-utils-4.17"].startswith("4.17")
    assert "no-such-package-xyz" not in versions


def test_stage_budget_comes_from_the_environment_and_a_bad_value_is_one_clear_error(monkeypatch):
    from xenswap.errors import XenswapError
    from xenswap.hv.xen.memory import STAGE_BUDGET_ENV, stage_budget_pages

    monkeypatch.delenv(STAGE_BUDGET_ENV, raising=False)
    assert stage_budget_pages() == 128 * 256  # 128 MiB of 4 KiB pages
    monkeypatch.setenv(STAGE_BUDGET_ENV, "64")
    assert stage_budget_pages() == 64 * 256
    for bad in ("lots", "0", "-3", "1.5"):
        monkeypatch.setenv(STAGE_BUDGET_ENV, bad)
        with pytest.raises(XenswapError, match=rf"^{STAGE_BUDGET_ENV}='{bad}': .* whole number of MiB, at least 1$"):
            stage_budget_pages()
