"""structlog set-up, done once at start-up; secrets are redacted before rendering."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, MutableMapping

import structlog

__all__ = ["configure_logging", "redact"]

_SECRET_KEYS = re.compile(r"(authorization|cookie|token|api[-_]?key|secret|password)", re.I)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_KEY_LIKE = re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_-]{8,}")
REDACTED = "[redacted]"


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _KEY_LIKE.sub(REDACTED, _BEARER.sub(r"\1 " + REDACTED, value))
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEYS.search(str(k)) else _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop secret-looking fields and mask bearer tokens / API keys inside strings."""
    for key in list(event):
        if _SECRET_KEYS.search(key) and key != "event":
            event[key] = REDACTED
        else:
            event[key] = _scrub(event[key])
    return event


def configure_logging(*, level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    numeric = getattr(logging, level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # aiohttp's own loggers: warnings and up, through the same stream.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=stream or sys.stderr, format="%(message)s")
