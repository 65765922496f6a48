"""
Sizes and ages as people read them, for the C{koboldfs} command and the
status page alike.
"""

from __future__ import annotations


def size(n: float) -> str:
    """
    C{n} bytes in binary units: C{"512 B"}, C{"1.5 MiB"}.
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def age(seconds: float) -> str:
    """
    How long ago, in the largest whole unit: C{"3h ago"}; a negative age
    (clocks apart) is now.
    """
    seconds = max(0.0, seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"
