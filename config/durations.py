"""Durations as the config file writes them ("100ms", "1.5s", "10m", "1h30m") and back.

Every duration is float seconds inside the program; bare numbers mean seconds.
"""

from __future__ import annotations

import math
import re

__all__ = ["DURATION_EXAMPLES", "format_duration", "parse_duration"]

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_BARE = re.compile(_NUMBER)
_PART = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h|d)\s*")
_PARTS = re.compile(rf"(?:{_PART.pattern})+")
DURATION_EXAMPLES = "such as 100ms, 1.5s, 10m, 2h, 1d or a number of seconds"


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string like "250ms"; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a duration {DURATION_EXAMPLES}, got {value!r}")
    seconds = float(value) if not isinstance(value, str) else _parse_text(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"expected a finite duration, got {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return seconds


def _parse_text(text: str) -> float:
    stripped = text.strip()
    rest = stripped[1:].strip()
    if stripped.startswith("-") and (_BARE.fullmatch(rest) or _PARTS.fullmatch(rest)):
        raise ValueError(f"must not be negative, got {text!r}")
    if _BARE.fullmatch(stripped):
        return float(stripped)
    if not _PARTS.fullmatch(stripped):
        raise ValueError(f"expected a duration {DURATION_EXAMPLES}, got {text!r}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART.findall(stripped))


def format_duration(seconds: float) -> str:
    """A short display form: "250ms", "1.5s", "10m", "1h30m", "1d2h"."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        return f"{_short(seconds * 1000)}ms" if seconds else "0s"
    whole = int(seconds)
    rest = seconds - whole
    days, whole = divmod(whole, 86400)
    hours, whole = divmod(whole, 3600)
    minutes, secs = divmod(whole, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if secs or rest:
        parts.append(f"{_short(secs + rest)}s")
    return "".join(parts)


def _short(number: float) -> str:
    return f"{round(number, 3):g}"
