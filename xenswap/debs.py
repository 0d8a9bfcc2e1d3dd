"""Fetch and unpack Debian packages into the cache, for the guest images and the nested Xen rig.

Packages are downloaded with ``apt-get download`` (no installation on the host) and unpacked with
``dpkg-deb -x``. Both steps are keyed by the exact version, so a recipe that names the same versions
reuses the cache and a newer package version rebuilds whatever depends on it.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from xenswap.config import cache_dir
from xenswap.errors import MissingTool, XenswapError


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    path: Path

    @property
    def key(self) -> str:
        return f"{self.name}={self.version}"


def _run(args: list[str], cwd: Path | None = None) -> str:
    if shutil.which(args[0]) is None:
        raise MissingTool(args[0], "apt")
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise XenswapError(f"{' '.join(args)} failed: {proc.stderr.strip()[-600:]}")
    return proc.stdout


def candidate_version(package: str) -> str:
    """The version apt would install now (``apt-get update`` must have run once)."""
    out = _run(["apt-cache", "policy", package])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    raise XenswapError(f"apt knows no package {package!r}: run 'apt-get update' (make setup does)")


def kernel_package() -> str:
    """The kernel package behind Debian's linux-image-amd64 metapackage (e.g. linux-image-6.1.0-56-amd64)."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise XenswapError("cannot resolve linux-image-amd64 to a kernel package")


def download(packages: list[str]) -> list[Deb]:
    """Download each package's candidate version into the cache (once) and return them."""
    debs_dir = cache_dir() / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    result = []
    for name in packages:
        version = candidate_version(name)
        # apt-get download names files with the epoch's colon escaped as %3a
        matches = sorted(debs_dir.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
        if not matches:
            _run(["apt-get", "download", f"{name}={version}"], cwd=debs_dir)
            matches = sorted(debs_dir.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
            if not matches:
                raise XenswapError(f"apt-get download {name}={version} left no .deb in {debs_dir}")
        result.append(Deb(name, version, matches[0]))
    return result


def extract(deb: Deb) -> Path:
    """Unpack a package into its own cache folder (once); returns the folder (its root filesystem tree)."""
    target = cache_dir() / "extract" / f"{deb.name}_{deb.version.replace(':', '%3a')}"
    if (target / ".complete").exists():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb.path), str(partial)])
    (partial / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def fetch_tree(packages: list[str]) -> dict[str, Path]:
    """Download and unpack packages; maps package name to its unpacked tree."""
    return {deb.name: extract(deb) for deb in download(packages)}
