"""Header rewriting between client and upstream (RFC 9110 §7.6.1 hop-by-hop rules)."""

from __future__ import annotations

from typing import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["HOP_BY_HOP", "upstream_request_headers", "client_response_headers"]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the transport for the upstream, never copied from the client.
_REQUEST_OWN = frozenset({"host", "content-length"})


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def _end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str], also_drop: frozenset[str]) -> Iterable[tuple[str, str]]:
    listed = _connection_tokens(headers)
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in listed or lower in also_drop:
            continue
        yield name, value


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    client_ip: str | None,
    scheme: str,
    host: str | None,
) -> CIMultiDict[str]:
    """The headers to send upstream: end-to-end ones plus X-Forwarded-*."""
    out: CIMultiDict[str] = CIMultiDict(_end_to_end(headers, _REQUEST_OWN))
    if client_ip:
        prior = headers.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    out["X-Forwarded-Proto"] = scheme
    if host:
        out["X-Forwarded-Host"] = host
    return out


def client_response_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """The upstream's end-to-end response headers (Content-Length is kept)."""
    return CIMultiDict(_end_to_end(headers, frozenset()))
