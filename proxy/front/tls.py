"""HTTPS on the proxy listener, with certificates swapped on reload without a restart.

The listening socket keeps one `ssl.SSLContext` for its whole life (asyncio gives no
public way to replace it). Its SNI callback, which OpenSSL calls for every new handshake
(with or without a server name), hands the connection the context of the most recently
loaded certificate. A reload builds a fresh context first and swaps it in only once it
loaded, so a broken file never replaces a good one; open connections keep theirs.
"""

from __future__ import annotations

import ssl

import structlog

from config.settings import TlsSettings
from config.tls_files import server_context

__all__ = ["ListenerTls"]

log = structlog.get_logger("canary.tls")


class ListenerTls:
    """The proxy listener's TLS: `context` goes to the listening site once; `load`
    re-reads the files (at start and on every reload)."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._current = server_context(settings.cert, settings.key)
        self.context = server_context(settings.cert, settings.key)
        self.context.sni_callback = self._choose_context

    def _choose_context(self, connection: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self._current
        if connection.context is not current:
            connection.context = current

    def load(self, settings: TlsSettings) -> bool:
        """Re-read the files; the next connection gets them. False (and the old
        certificate keeps serving) when they cannot be loaded."""
        try:
            fresh = server_context(settings.cert, settings.key)
        except (OSError, ssl.SSLError) as exc:
            log.error("tls_reload_failed", cert=str(settings.cert), key=str(settings.key), error=_describe(exc))
            return False
        self._current = fresh
        self.settings = settings
        log.info("tls_certificate_loaded", cert=str(settings.cert))
        return True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason
    return getattr(exc, "strerror", None) or exc.__class__.__name__
