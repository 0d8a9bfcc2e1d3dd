#!/bin/sh
# Build the patched Xen 4.17 hypervisor (see README.md). Needs root (apt) and setup/apt-xenbuild.txt.
# Re-running with nothing changed does nothing; prints the output folder on the last line.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=python3
[ -x "$here/../.venv/bin/python" ] && python="$here/../.venv/bin/python"
exec "$python" "$here/xenbuild.py" "$@"
