"""Fast tier: the patched-hypervisor recipe (hypervisor-patches/xenbuild.py) without building Xen: the deb-src
file it writes, the cache key, and that our patches still apply to the cached Debian source."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from xenswap.config import cache_dir
from xenswap.errors import XenswapError

HERE = Path(__file__).resolve().parents[2] / "hypervisor-patches"


@pytest.fixture(scope="module")
def xenbuild():
    spec = importlib.util.spec_from_file_location("xenbuild", HERE / "xenbuild.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEBIAN_SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_deb_src_mirrors_every_debian_stanza(xenbuild, tmp_path):
    (tmp_path / "debian.sources").write_text(DEBIAN_SOURCES)
    (tmp_path / "other.sources").write_text("Types: deb\nURIs: https://packages.example.org/apt\nSuites: stable\n")
    text = xenbuild.deb_src_sources(tmp_path)
    stanzas = xenbuild.deb822_stanzas(text)
    assert [s["Types"] for s in stanzas] == ["deb-src", "deb-src"]
    assert [(s["URIs"], s["Suites"]) for s in stanzas] == [
        ("http://deb.debian.org/debian", "bookworm bookworm-updates"),
        ("http://deb.debian.org/debian-security", "bookworm-security"),
    ]
    assert all(s["Signed-By"] == "/usr/share/keyrings/debian-archive-keyring.gpg" for s in stanzas)


def test_deb_src_refuses_a_machine_without_debian_sources(xenbuild, tmp_path):
    with pytest.raises(XenswapError, match="no Debian 'Types: deb' stanza"):
        xenbuild.deb_src_sources(tmp_path)


def test_key_changes_with_every_input(xenbuild, tmp_path):
    patch = tmp_path / "0001-a.patch"
    patch.write_text("one")
    base = xenbuild.build_key("4.17.5-1", b"CONFIG_X=y", b"CONFIG_UNSUPPORTED=y", [patch])
    assert base == xenbuild.build_key("4.17.5-1", b"CONFIG_X=y", b"CONFIG_UNSUPPORTED=y", [patch])
    assert base != xenbuild.build_key("4.17.7-1", b"CONFIG_X=y", b"CONFIG_UNSUPPORTED=y", [patch])
    assert base != xenbuild.build_key("4.17.5-1", b"CONFIG_X=n", b"CONFIG_UNSUPPORTED=y", [patch])
    assert base != xenbuild.build_key("4.17.5-1", b"CONFIG_X=y", b"", [patch])
    patch.write_text("two")
    assert base != xenbuild.build_key("4.17.5-1", b"CONFIG_X=y", b"CONFIG_UNSUPPORTED=y", [patch])


def test_fragment_turns_on_paging_and_sharing(xenbuild):
    options = xenbuild.fragment_options((HERE / "config.fragment").read_bytes())
    assert options == {"CONFIG_UNSUPPORTED": "y", "CONFIG_MEM_PAGING": "y", "CONFIG_MEM_SHARING": "y"}


def test_patches_are_numbered_and_explain_why(xenbuild):
    patches = xenbuild.our_patches()
    assert [p.name[:4] for p in patches] == [f"{i:04d}" for i in range(1, len(patches) + 1)]
    for patch in patches:
        header = patch.read_text().split("\n---\n", 1)[0]
        assert "Why:" in header, patch.name


def test_patches_apply_to_the_cached_debian_source(xenbuild, tmp_path):
    sources = sorted((cache_dir() / "xen-build" / "src").glob("*/.complete"))
    if not sources:
        pytest.skip("no Debian xen source in the cache yet (hypervisor-patches/build.sh fetches it)")
    tree = next(p for p in sources[-1].parent.iterdir() if p.is_dir())
    work = tmp_path / "xen"
    # only the hypervisor half: the patches touch nothing else, and it copies in well under a second
    shutil.copytree(tree / "xen", work / "xen", symlinks=True)
    for patch in xenbuild.our_patches():
        proc = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)], cwd=work,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{patch.name} no longer applies:\n{proc.stdout}{proc.stderr}"
