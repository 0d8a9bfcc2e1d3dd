"""xenswap: keep hundreds of mostly-idle VMs on one node, each available again on demand."""

__version__ = "0.1.0"
