"""Check the listener's TLS files as `canary validate` and a reload do: present, PEM, matching.

The check loads them into a throwaway server context exactly as the proxy listener will,
so a file that passes here also loads there; what fails is named with the key to fix.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["TlsFileProblem", "check_tls_files", "server_context"]


@dataclass(frozen=True, kw_only=True)
class TlsFileProblem:
    key: Literal["cert", "key"]  # which setting to fix: tls.cert or tls.key
    message: str


def _no_password() -> bytes:
    """An encrypted key fails to load instead of prompting on the terminal."""
    return b""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with the ssl module's secure defaults, TLS 1.2+, ALPN http/1.1.
    Raises OSError or ssl.SSLError when the files cannot be loaded."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert, key, password=_no_password)
    return context


def check_tls_files(cert: Path, key: Path) -> TlsFileProblem | None:
    """The first problem with the certificate chain and key, or None when they load."""
    for name, path in (("cert", cert), ("key", key)):
        if path.exists() and not path.is_file():
            return TlsFileProblem(key=name, message=f"{path}: not a file (give the PEM file itself, not a folder)")
        if not path.is_file():
            what = "certificate chain" if name == "cert" else "private key"
            return TlsFileProblem(key=name, message=f"{path}: no such file (give the PEM {what}; "
                                  "a relative path is taken from the config file's folder)")
    try:
        ssl.create_default_context(cafile=str(cert))
    except (ssl.SSLError, OSError) as exc:
        return TlsFileProblem(key="cert", message=f"{cert}: not a PEM certificate chain ({_reason(exc)})")
    try:
        server_context(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return TlsFileProblem(key="key", message=f"{key}: does not match the certificate in {cert}")
        return TlsFileProblem(
            key="key", message=f"{key}: not an unencrypted PEM private key ({_reason(exc)})"
        )
    except OSError as exc:
        return TlsFileProblem(key="key", message=f"{key}: cannot be read ({_reason(exc)})")
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return exc.__class__.__name__
