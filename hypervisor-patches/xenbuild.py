"""Reproducible build of the patched Xen 4.17 hypervisor (only the hypervisor, not the toolstack).

Steps, each cached so that re-running with nothing changed does nothing:

1. a ``deb-src`` twin of the machine's deb822 Debian sources (file ``xenswap-src.sources``), ``apt-get update``;
2. ``apt-get source xen`` into ``<cache>/xen-build/src/<version>/`` (dpkg-source applies Debian's patch series);
3. Debian's hypervisor configuration (``boot/xen-4.17-amd64.config`` from the xen-hypervisor deb, via
   :mod:`xenswap.debs`) plus our fragment ``config.fragment``, then ``make olddefconfig``;
4. our numbered patches ``NNNN-*.patch`` (``patch -p1``, in name order);
5. ``make -C xen`` into a fresh tree; ``xen`` (multiboot ELF), ``xen.gz``, ``xen-syms`` and the final ``.config``
   land in ``<cache>/xen-build/<key>/``, where key hashes the source version, Debian's config, the fragment,
   the patches and this recipe.

Prints the output folder on the last line of stdout (``--json`` prints a JSON object instead).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout: import xenswap without installing it

from xenswap import debs  # noqa: E402
from xenswap.config import cache_dir  # noqa: E402
from xenswap.errors import XenswapError  # noqa: E402

SOURCE_PACKAGE = "xen"
SOURCE_SERIES = "4.17"
HYPERVISOR_PACKAGE = "xen-hypervisor-4.17-amd64"
DEBIAN_CONFIG = "boot/xen-4.17-amd64.config"
APT_SOURCES = Path("/etc/apt/sources.list.d")
OUR_SOURCES = APT_SOURCES / "xenswap-src.sources"
# Bump when the recipe below changes in a way that changes the binary.
RECIPE_VERSION = "1"
# Shown by `xl info` as part of xen_extra, so a booted hypervisor says it is ours.
VENDOR_VERSION = "-xenswap"
# A source version apt could not fetch is not asked for again for this long.
UNFETCHABLE_RETRY_S = 24 * 3600


def log(message: str) -> None:
    print(f"xenbuild: {message}", file=sys.stderr, flush=True)


def run(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        logfile: Path | None = None) -> str:
    if logfile is not None:
        with logfile.open("a") as out:
            out.write(f"$ {' '.join(args)}\n")
            out.flush()
            proc = subprocess.run(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = logfile.read_text(errors="replace")[-1500:]
            raise XenswapError(f"{' '.join(args)} failed (rc={proc.returncode}), see {logfile}:\n{tail}")
        return ""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise XenswapError(f"{' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc.stdout


# ---------------------------------------------------------------- 1. deb-src

def deb822_stanzas(text: str) -> list[dict[str, str]]:
    """Parse a deb822 sources file into stanzas (comments dropped, continuation lines joined)."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last_key = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last_key = {}, ""
            continue
        if line[0] in " \t" and last_key:
            current[last_key] += " " + line.strip()
            continue
        key, _, value = line.partition(":")
        last_key = key.strip()
        current[last_key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def deb_src_sources(apt_dir: Path = APT_SOURCES) -> str:
    """A deb-src twin of every Debian 'deb' stanza in the machine's .sources files (same URIs and suites)."""
    lines = ["# Written by xenswap hypervisor-patches/xenbuild.py: source packages for 'apt-get source xen'.", ""]
    for path in sorted(apt_dir.glob("*.sources")):
        if path.name == OUR_SOURCES.name:
            continue
        for stanza in deb822_stanzas(path.read_text()):
            if "deb" not in stanza.get("Types", "").split() or stanza.get("Enabled", "yes") == "no":
                continue
            if "debian" not in stanza.get("URIs", ""):
                continue
            for key in ("URIs", "Suites", "Components", "Signed-By"):
                if key in stanza:
                    lines.append(f"{key}: {stanza[key]}" if key != "URIs" else f"Types: deb-src\nURIs: {stanza[key]}")
            lines.append("")
    if len(lines) <= 2:
        raise XenswapError(f"no Debian 'Types: deb' stanza in {apt_dir}/*.sources to mirror as deb-src")
    return "\n".join(lines)


def ensure_deb_src() -> None:
    wanted = deb_src_sources()
    current = OUR_SOURCES.read_text() if OUR_SOURCES.exists() else None
    if current != wanted:
        log(f"writing {OUR_SOURCES}")
        OUR_SOURCES.write_text(wanted)
    if current != wanted or not source_versions():
        log("apt-get update")
        run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"])


# ---------------------------------------------------------------- 2. source

def source_versions() -> list[str]:
    """Versions of the xen source package apt knows, newest first."""
    out = subprocess.run(["apt-cache", "showsrc", SOURCE_PACKAGE], capture_output=True, text=True).stdout
    versions = sorted({line.split(":", 1)[1].strip() for line in out.splitlines()
                       if line.startswith("Version:") and line.split(":", 1)[1].strip().startswith(SOURCE_SERIES)})
    # dpkg's order, not string order
    ordered: list[str] = []
    for version in versions:
        position = 0
        while position < len(ordered) and subprocess.run(
                ["dpkg", "--compare-versions", version, "lt", ordered[position]]).returncode == 0:
            position += 1
        ordered.insert(position, version)
    return ordered


def fetch_source(preferred: str | None) -> tuple[str, Path]:
    """Unpack the newest fetchable xen source (the hypervisor deb's own version first); returns (version, tree)."""
    root = cache_dir() / "xen-build" / "src"
    candidates = source_versions()
    if preferred in candidates:
        candidates.remove(preferred)
        candidates.insert(0, preferred)
    failures = []
    for version in candidates:
        target = root / version
        if (target / ".complete").exists():
            return version, next(p for p in target.iterdir() if p.is_dir())
        unfetchable = root / f"{version}.unfetchable"
        if unfetchable.exists() and time.time() - unfetchable.stat().st_mtime < UNFETCHABLE_RETRY_S:
            # Tried lately and not served: asking apt again costs a minute of retries on every rig boot.
            failures.append(f"{version}: {unfetchable.read_text().strip()} (cached failure)")
            continue
        partial = target.with_name(version + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            log(f"apt-get source {SOURCE_PACKAGE}={version}")
            run(["apt-get", "source", "-q", f"{SOURCE_PACKAGE}={version}"], cwd=partial)
        except XenswapError as error:
            # The security archive sometimes serves a binary whose source is not (yet) reachable.
            failures.append(f"{version}: {str(error).splitlines()[-1]}")
            shutil.rmtree(partial, ignore_errors=True)
            unfetchable.write_text(str(error).splitlines()[-1] + "\n")
            continue
        (partial / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        if version != preferred:
            log(f"warning: source {preferred} not fetchable, using {version}")
        return version, next(p for p in target.iterdir() if p.is_dir())
    raise XenswapError("no xen 4.17 source package could be fetched: " + "; ".join(failures or ["none listed"]))


# ---------------------------------------------------------------- 3-5. build

def our_patches() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def build_key(source_version: str, debian_config: bytes, fragment: bytes, patches: list[Path]) -> str:
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION.encode(), source_version.encode(), debian_config, fragment):
        digest.update(hashlib.sha256(part).digest())
    for patch in patches:
        digest.update(patch.name.encode() + b"\0" + hashlib.sha256(patch.read_bytes()).digest())
    return digest.hexdigest()[:20]


def fragment_options(fragment: bytes) -> dict[str, str]:
    options = {}
    for line in fragment.decode().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            options[key] = value
    return options


def build_env(source_date_epoch: int) -> dict[str, str]:
    """A clean environment: the hypervisor takes no distro CFLAGS, and stamps no host/user/date of this machine."""
    env = {key: value for key, value in os.environ.items()
           if key not in {"CFLAGS", "CPPFLAGS", "LDFLAGS", "CXXFLAGS", "MAKEFLAGS", "MFLAGS"}}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's python3, not a shim in front of it
    stamp = time.gmtime(source_date_epoch)
    env.update({
        "LC_ALL": "C",
        "SOURCE_DATE_EPOCH": str(source_date_epoch),
        "XEN_BUILD_DATE": time.strftime("%a %b %d %H:%M:%S UTC %Y", stamp),
        "XEN_BUILD_TIME": time.strftime("%H:%M:%S", stamp),
        "XEN_WHOAMI": "xenswap",
        "XEN_DOMAIN": "xenswap",
        "XEN_BUILD_HOST": "xenswap",
        "XEN_VENDORVERSION": VENDOR_VERSION,
        "WGET": "/bin/false",
        "GIT": "/bin/false",
    })
    return env


def changelog_epoch(tree: Path) -> int:
    out = run(["dpkg-parsechangelog", "-l", str(tree / "debian" / "changelog"), "-S", "Timestamp"])
    return int(out.strip())


def build(jobs: int, check_only: bool = False) -> dict[str, object]:
    fragment = (HERE / "config.fragment").read_bytes()
    patches = our_patches()
    hypervisor = debs.download([HYPERVISOR_PACKAGE])[0]
    debian_config_path = debs.extract(hypervisor) / DEBIAN_CONFIG
    debian_config = debian_config_path.read_bytes()

    build_root = cache_dir() / "xen-build"
    build_root.mkdir(parents=True, exist_ok=True)
    with (build_root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second caller then finds it cached
        ensure_deb_src()
        source_version, source_tree = fetch_source(preferred=hypervisor.version)
        key = build_key(source_version, debian_config, fragment, patches)
        out_dir = build_root / key
        info_path = out_dir / "build-info.json"
        if info_path.exists():
            info = json.loads(info_path.read_text())
            info["cached"] = True
            return info
        if check_only:
            return {"key": key, "dir": str(out_dir), "cached": False}

        partial = build_root / f"{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        tree = partial / "src"
        logfile = partial / "build.log"
        started = time.monotonic()
        log(f"building {key} in {partial} (log: {logfile})")
        shutil.copytree(source_tree, tree, symlinks=True)
        env = build_env(changelog_epoch(tree))
        make = ["make", "-C", "xen", "XEN_TARGET_ARCH=x86_64", "PYTHON=python3"]

        for patch in patches:
            run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)], cwd=tree, logfile=logfile)

        config = tree / "xen" / ".config"
        config.write_bytes(debian_config + b"\n# xenswap fragment\n" + fragment)
        run([*make, "olddefconfig"], cwd=tree, env=env, logfile=logfile)
        final_config = config.read_text()
        for option, value in fragment_options(fragment).items():
            expected = f"{option}={value}" if value != "n" else f"# {option} is not set"
            if expected not in final_config.splitlines():
                raise XenswapError(f"olddefconfig dropped {option}={value} (a dependency is missing)")

        run([*make, f"-j{jobs}"], cwd=tree, env=env, logfile=logfile)
        seconds = round(time.monotonic() - started, 1)

        for name in ("xen", "xen.gz", "xen-syms"):
            shutil.copy2(tree / "xen" / name, partial / name)
        shutil.copy2(config, partial / "config")
        info = {
            "key": key,
            "dir": str(out_dir),
            "source_version": source_version,
            "debian_config_from": f"{hypervisor.name}={hypervisor.version}",
            "patches": [p.name for p in patches],
            "fragment": fragment_options(fragment),
            "xen_version": run(["make", "-s", "-C", "xen", "xenversion"], cwd=tree, env=env).strip(),
            "build_seconds": seconds,
            "jobs": jobs,
            "cached": False,
        }
        (partial / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(tree)  # 150 MB of objects; the log and the binaries are what we keep
        shutil.rmtree(out_dir, ignore_errors=True)
        partial.rename(out_dir)
        log(f"built in {seconds} s: {out_dir}")
        return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--check", action="store_true", help="only print the build key and whether it is cached")
    parser.add_argument("--json", action="store_true", help="print the build info as JSON")
    args = parser.parse_args(argv)
    try:
        info = build(args.jobs, check_only=args.check)
    except XenswapError as error:
        print(f"xenbuild: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2) if args.json else info["dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
