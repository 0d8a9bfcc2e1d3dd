#!/usr/bin/env bash
# Idempotent set-up on Debian 12 as root: apt packages from setup/apt*.txt, then a venv in .venv with
# xenswap installed editable (Cython extensions built in place). Re-running is cheap: each step is
# skipped when its inputs have not changed since it last succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (it installs Debian packages)" >&2
  exit 1
fi

stamp_dir=.venv/.stamps
mkdir -p "$stamp_dir"

# --- Debian packages -----------------------------------------------------------------------------
packages=$(cat setup/apt*.txt | sed 's/#.*//' | tr -s ' \t' '\n' | grep -v '^$' | sort -u)
apt_key=$(echo "$packages" | sha256sum | cut -c1-16)
if [ ! -f "$stamp_dir/apt-$apt_key" ]; then
  missing=$(dpkg-query -W -f='${Package} ${Status}\n' $packages 2>/dev/null | awk '$4=="installed"{print $1}' \
            | sort -u | comm -13 - <(echo "$packages") || true)
  if [ -n "$missing" ]; then
    echo "setup: installing Debian packages: $(echo $missing)"
    # apt's lists must be fresh enough to know the packages (a fresh machine has none)
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
      apt-get update -q
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      -o DPkg::Lock::Timeout=600 $missing
  fi
  rm -f "$stamp_dir"/apt-*
  touch "$stamp_dir/apt-$apt_key"
fi

# --- Python environment -------------------------------------------------------------------------------
# Debian's python3 (not a pyenv or other interpreter on PATH): the nested Xen dom0 runs the same
# interpreter from the same packages, so extensions built here load there too.
PY=/usr/bin/python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
py_key=$(cat pyproject.toml setup.py $(find xenswap -name '*.pyx' -o -name '*.pxd' | sort) | sha256sum | cut -c1-16)
if [ ! -f "$stamp_dir/py-$py_key" ]; then
  .venv/bin/pip install -q --upgrade pip setuptools wheel
  .venv/bin/pip install -q -e '.[test]'
  rm -f "$stamp_dir"/py-*
  touch "$stamp_dir/py-$py_key"
fi
