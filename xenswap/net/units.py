"""Units in topology files: durations ("10ms"), rates ("10mbit"), ratios ("1%"), parsed strictly.

Each parser raises ValueError with a message naming what was expected, so validation can report it as
one line; nothing here guesses (a bare number is refused, since "10" could be ms or s, bits or bytes).
"""

from __future__ import annotations

import re

_NUMBER = r"(\d+(?:\.\d+)?)"

_TIME_UNITS_US = {"us": 1.0, "ms": 1_000.0, "s": 1_000_000.0}
_RATE_UNITS_BPS = {
    "bit": 1,
    "kbit": 1_000,
    "mbit": 1_000_000,
    "gbit": 1_000_000_000,
    "bps": 8,
    "kbps": 8_000,
    "mbps": 8_000_000,
    "gbps": 8_000_000_000,
}


def parse_duration_us(text: object) -> float:
    """'10ms' -> 10000.0 (microseconds)."""
    match = re.fullmatch(_NUMBER + r"\s*(us|ms|s)", str(text).strip().lower())
    if match is None:
        raise ValueError(f"bad duration {text!r}: expected a number with a unit us, ms or s (e.g. 10ms)")
    return float(match.group(1)) * _TIME_UNITS_US[match.group(2)]


def parse_rate_bps(text: object) -> int:
    """'10mbit' -> 10_000_000 (bits per second); 'mbps' means megabytes per second, as in tc."""
    match = re.fullmatch(_NUMBER + r"\s*([kmg]?(?:bit|bps))", str(text).strip().lower())
    if match is None:
        raise ValueError(
            f"bad rate {text!r}: expected a number with a unit bit, kbit, mbit, gbit (or bps, kbps, mbps, gbps "
            "for bytes per second), e.g. 10mbit"
        )
    bits = float(match.group(1)) * _RATE_UNITS_BPS[match.group(2)]
    if bits < 8:
        raise ValueError(f"bad rate {text!r}: must be at least 8bit")
    return int(bits)


def parse_ratio(text: object) -> float:
    """'1.5%' -> 0.015; a loss must be given in percent so 0.5 vs 50% is never ambiguous."""
    match = re.fullmatch(_NUMBER + r"\s*%", str(text).strip())
    if match is None:
        raise ValueError(f"bad percentage {text!r}: expected a number followed by % (e.g. 1%)")
    value = float(match.group(1)) / 100.0
    if value > 1.0:
        raise ValueError(f"bad percentage {text!r}: must be between 0% and 100%")
    return value


def format_rate(bps: int) -> str:
    for unit, factor in (("gbit", 1_000_000_000), ("mbit", 1_000_000), ("kbit", 1_000)):
        if bps >= factor and bps % factor == 0:
            return f"{bps // factor}{unit}"
    return f"{bps}bit"


def format_duration(us: float) -> str:
    if us >= 1000 and us % 1000 == 0:
        return f"{int(us // 1000)}ms"
    return f"{us:g}us"
