"""One exception family, so the CLI can print one clear line for any bad input and exit non-zero."""


class XenswapError(Exception):
    """A user-facing error: the message alone must say what went wrong and what to do."""

    exit_code = 1


class UnknownDomain(XenswapError):
    def __init__(self, ref: str, known: list[str] | None = None):
        hint = f" (known: {', '.join(known)})" if known else ""
        super().__init__(f"unknown domain {ref!r}{hint}")


class MissingTool(XenswapError):
    def __init__(self, tool: str, package: str):
        super().__init__(f"{tool} not found: install the Debian package {package} (make setup does it)")


class SpecError(XenswapError):
    """A malformed input file or argument, found before anything was touched."""
