"""The exceptions canary-proxy raises, in one place.

It lives in `config` because that is the bottom layer every other package may import.

    CanaryError
    ├── ConfigError          a config file is invalid (carries every Problem found)
    ├── StateError           the state store cannot be read or written
    │   └── StateCorrupt     the state file exists but cannot be parsed; it is kept
    ├── AdminError           the admin listener refused or could not be reached
    │   └── AdminUnreachable
    ├── WorkerStartError     `workers: N`: the worker processes did not all start
    └── UpstreamError        forwarding to an arm failed (translated to 502/503/504)
        ├── UpstreamConnectError   connect failed or the connection broke -> 502
        ├── UpstreamTimeout        connect or total timeout -> 504
        ├── PoolExhausted          no connection free in time -> 503
        └── ProxyOverloaded        the proxy itself lacks descriptors or memory -> 503
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AdminError",
    "AdminUnreachable",
    "CanaryError",
    "ConfigError",
    "PoolExhausted",
    "Problem",
    "ProxyOverloaded",
    "StateCorrupt",
    "StateError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamTimeout",
    "WorkerStartError",
]


class CanaryError(Exception):
    """Base of every error canary-proxy raises on purpose."""


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One thing wrong in a config file, printed as `FILE:LINE: dotted.key: message`."""

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        key = self.key or "(top level)"
        return f"{self.file}:{self.line}: {key}: {self.message}"


class ConfigError(CanaryError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StateError(CanaryError):
    pass


class StateCorrupt(StateError):
    pass


class AdminError(CanaryError):
    pass


class AdminUnreachable(AdminError):
    pass


class WorkerStartError(CanaryError):
    """Not every worker process was accepting in time at start; the log says why."""


class UpstreamError(CanaryError):
    status = 502
    kind = "upstream_error"
    public = "the upstream failed"  # what the client is told: no internal addresses

    def __init__(self, arm: str, message: str) -> None:
        self.arm = arm
        super().__init__(message)


class UpstreamConnectError(UpstreamError):
    status = 502
    kind = "upstream_unreachable"
    public = "the upstream is unreachable or broke the connection"


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "upstream_timeout"
    public = "the upstream timed out"


class PoolExhausted(UpstreamError):
    status = 503
    kind = "pool_exhausted"
    public = "all connections to the upstream are busy"


class ProxyOverloaded(UpstreamError):
    """The proxy could not forward for want of its own resources (`reason`: descriptors,
    memory): never counted against the arm."""

    status = 503
    kind = "proxy_overloaded"
    public = "the proxy is overloaded; retry shortly"

    def __init__(self, arm: str, message: str, *, reason: str) -> None:
        super().__init__(arm, message)
        self.reason = reason
