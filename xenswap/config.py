"""Where xenswap keeps things. Every path can be moved by an environment variable (tests use temporary ones)."""

import os
from pathlib import Path


def _dir(env: str, default: str) -> Path:
    return Path(os.environ.get(env, default))


def state_dir() -> Path:
    """Durable state (embedded stores, per-VM directories)."""
    return _dir("XENSWAP_STATE", "/var/lib/xenswap")


def cache_dir() -> Path:
    """Downloads and built artefacts (Debian packages, guest images, Xen builds): safe to delete, slow to rebuild."""
    return _dir("XENSWAP_CACHE", "/var/cache/xenswap")


def run_dir() -> Path:
    """Sockets and pid files of running things."""
    return _dir("XENSWAP_RUN", "/run/xenswap")
