"""The nested Xen rig: Debian's Xen 4.17 inside QEMU (TCG), with a command channel into its dom0."""

from xenswap.rig.rig import BootConfig, Rig, RigBootTimeout, RigError, RigNotRunning

__all__ = ["BootConfig", "Rig", "RigBootTimeout", "RigError", "RigNotRunning"]
