"""Byte counts as people read them (decimal units, one decimal: 98.4 MB), for messages and tables alike."""

from __future__ import annotations


def human_bytes(n: int | float) -> str:
    """98.4 MB, 1.1 TB, 512 B."""
    if n < 1000:
        return f"{int(n)} B"
    value = float(n)
    unit = "B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 999.95 or unit == "PB":
            break
    return f"{value:.1f} {unit}"
