"""Byte counts in messages and tables: one formatter for the library and the CLI."""

from __future__ import annotations

import pytest

from chatcli.units import human_bytes


@pytest.mark.parametrize(("n", "shown"), [
    (0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (98_400_000, "98.4 MB"),
    (999_960, "1.0 MB"),  # rounds up into the next unit, never "1000.0 kB"
    (1.1e12, "1.1 TB"), (5e18, "5000.0 PB"),
])
def test_human_bytes(n: float, shown: str) -> None:
    assert human_bytes(n) == shown
