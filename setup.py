"""Builds the Cython extensions: every xenswap/**/*.pyx.

An extension declares its own C libraries in its header (``# distutils: libraries = xenctrl``). One whose
headers are missing on this machine (e.g. libxen-dev on a machine without Xen) is skipped with a warning
instead of failing the whole install, so the pure-Python layers still install everywhere.
"""

from pathlib import Path

from setuptools import setup

ext_modules = []
try:
    from Cython.Build import cythonize
except ImportError:  # building an sdist without Cython: extensions come later
    cythonize = None

if cythonize is not None:
    for pyx in sorted(Path("xenswap").rglob("*.pyx")):
        required = [
            line.split("=", 1)[1].strip()
            for line in pyx.read_text().splitlines()
            if line.startswith("# xenswap: requires-header")
        ]
        missing = [h for h in required if not Path(h).exists()]
        if missing:
            print(f"warning: skipping {pyx}: missing {', '.join(missing)}")
            continue
        ext_modules += cythonize(str(pyx), language_level=3, quiet=True)

setup(ext_modules=ext_modules)
