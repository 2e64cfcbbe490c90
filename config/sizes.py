"""Byte sizes as the config file writes them ("1MiB", "512KiB", "64kB", or a number of bytes).

Binary units (KiB, MiB, GiB) are powers of 1024, decimal ones (kB, MB, GB) powers of 1000;
every size is a whole number of bytes inside the program.
"""

from __future__ import annotations

import re

__all__ = ["SIZE_EXAMPLES", "format_size", "parse_size"]

_UNIT_BYTES = {
    "": 1, "b": 1,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
SIZE_EXAMPLES = "such as 1MiB, 512KiB, 64kB or a number of bytes"


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like "1MiB"; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size {SIZE_EXAMPLES}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        return value
    match = _SIZE.fullmatch(value)
    unit = _UNIT_BYTES.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"expected a size {SIZE_EXAMPLES}, got {value!r}")
    return int(float(match.group(1)) * unit)


def format_size(size: int) -> str:
    """A short display form: "1MiB", "1.5KiB", "700B"."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{round(size / factor, 2):g}{unit}"
    return f"{size}B"
