"""The process's descriptor limit: raised to the hard limit at start, and what it allows.

Every proxied request holds two descriptors (the client's and the upstream's); the rest
of the process (listeners, the event loop, log, state and config files, admin clients,
refused connections being answered) gets a fixed reserve. `limits.max_connections: 0`
means the number of client connections that fit beside that reserve.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

__all__ = ["DESCRIPTOR_RESERVE", "DescriptorLimit", "derived_max_connections", "raise_descriptor_limit"]

DESCRIPTOR_RESERVE = 128
_MIN_CONNECTIONS = 16
_CEILING = 1 << 20  # taken as the hard limit when that is unlimited


@dataclass(frozen=True, kw_only=True)
class DescriptorLimit:
    soft_before: int
    soft: int
    hard: int
    error: str | None = None  # why the soft limit could not be raised


def raise_descriptor_limit() -> DescriptorLimit:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit (what any process may do)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft >= target:
        return DescriptorLimit(soft_before=soft, soft=soft, hard=target)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        return DescriptorLimit(soft_before=soft, soft=soft, hard=target, error=str(exc))
    return DescriptorLimit(soft_before=soft, soft=target, hard=target)


def derived_max_connections(soft: int) -> int:
    """Client connections at once that `soft` descriptors can serve (at least 16)."""
    return max(_MIN_CONNECTIONS, (soft - DESCRIPTOR_RESERVE) // 2)
