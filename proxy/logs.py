"""structlog set-up, done once at start-up; secrets are redacted before rendering.

aiohttp's own (stdlib) log records go through the same processors, so a traceback about
a malformed request is rendered as JSON and scrubbed like everything else.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, MutableMapping

import structlog

__all__ = ["configure_logging", "redact", "REDACTED"]

REDACTED = "[redacted]"
_SECRET_KEYS = re.compile(r"(authorization|cookie|token|api[-_]?key|secret|password)", re.I)
_TEXT_PATTERNS = (
    # Bearer / Basic credentials anywhere in a string (also inside bytes reprs)
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + REDACTED),
    # "Authorization: xyz", "Cookie: a=b; c=d", "X-Api-Key: xyz" as header text, also
    # in a repr's quoted form ('Cookie': 'a=b')
    (re.compile(r"(?i)\b((?:proxy-)?authorization|cookie|set-cookie|x-api-key|api-key)(['\"]?\s*[:=]\s*['\"]?)[^\r\n'\"\\]+"),
     r"\1\2" + REDACTED),
    # credentials in URLs: http://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]+:[^/@\s'\"]*@"), r"\1" + REDACTED + "@"),
    # query parameters that carry secrets: ?api_key=..., &token=..., &sig=...
    (re.compile(r"(?i)([?&;][^=&\s]*(?:key|token|secret|password|passwd|sig|signature|auth)[^=&\s]*=)[^&\s'\"\\]+"),
     r"\1" + REDACTED),
    # provider-style API keys (sk-..., pk-..., rk-...)
    (re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{8,}"), REDACTED),
)


def _scrub_text(text: str) -> str:
    for pattern, replacement in _TEXT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEYS.search(str(k)) else _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop secret-looking fields; mask credentials inside strings (tracebacks included)."""
    for key in list(event):
        if key.startswith("_"):
            continue
        if _SECRET_KEYS.search(key) and key != "event":
            event[key] = REDACTED
        else:
            event[key] = _scrub(event[key])
    return event


def configure_logging(*, level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    numeric = getattr(logging, level.upper(), logging.INFO)
    out = stream or sys.stderr
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,  # before redact: tracebacks get scrubbed too
    ]
    structlog.configure(
        processors=[*shared, redact, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redact, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))  # aiohttp's loggers: warnings and up
