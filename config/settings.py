"""Immutable settings values: what a validated config file means.

These classes only store values; `config.loader.load_settings` parses, validates and
builds them. Durations are float seconds, weights are whole percents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Action = Literal["pause", "step_back", "rollback"]
ArmName = Literal["baseline", "canary"]
ARMS: tuple[ArmName, ArmName] = ("baseline", "canary")
FallbackKind = Literal["connect", "timeout", "5xx"]
FALLBACK_KINDS: tuple[FallbackKind, ...] = ("connect", "timeout", "5xx")
Http1Client = Literal["lean", "aiohttp"]
HTTP1_CLIENTS: tuple[Http1Client, Http1Client] = ("lean", "aiohttp")

__all__ = [
    "ARMS",
    "Action",
    "AdminSettings",
    "AnalysisSettings",
    "ArmName",
    "ErrorThresholds",
    "FALLBACK_KINDS",
    "FallbackKind",
    "FallbackSettings",
    "HTTP1_CLIENTS",
    "Http1Client",
    "HostPort",
    "LatencyRegression",
    "LatencyThresholds",
    "LimitsSettings",
    "LoggingSettings",
    "PoolSettings",
    "RetrySettings",
    "RolloutSettings",
    "RoutingSettings",
    "Settings",
    "RedisSettings",
    "StateSettings",
    "redact_url",
    "StickyKey",
    "TimeoutSettings",
    "TlsSettings",
    "UpstreamSettings",
    "WebSocketSettings",
    "Upstreams",
]


@dataclass(frozen=True, kw_only=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class TimeoutSettings:
    connect: float = 5.0
    total: float = 30.0


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    max_connections: int = 20
    max_keepalive: int = 10


@dataclass(frozen=True, kw_only=True)
class RetrySettings:
    """Retries apply only to failures before the request was sent (connect errors)."""

    attempts: int = 2
    backoff: float = 0.1


@dataclass(frozen=True, kw_only=True)
class UpstreamSettings:
    name: ArmName
    url: str
    http2: bool = False
    client: Http1Client = "lean"  # the HTTP/1.1 client (http2: true uses httpx)
    timeout: TimeoutSettings = field(default_factory=TimeoutSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    retries: RetrySettings = field(default_factory=RetrySettings)


@dataclass(frozen=True, kw_only=True)
class Upstreams:
    baseline: UpstreamSettings
    canary: UpstreamSettings

    def get(self, arm: ArmName) -> UpstreamSettings:
        return self.baseline if arm == "baseline" else self.canary


@dataclass(frozen=True, kw_only=True)
class StickyKey:
    """Where a request's sticky key comes from: a header or a cookie."""

    source: Literal["header", "cookie"]
    name: str


@dataclass(frozen=True, kw_only=True)
class WebSocketSettings:
    """What happens to the canary's open WebSockets when the canary loses its traffic."""

    on_rollback: Literal["close", "keep"] = "close"


@dataclass(frozen=True, kw_only=True)
class FallbackSettings:
    """Canary failures replayed on the baseline (CONTRACT §8)."""

    enabled: bool = False
    on: tuple[FallbackKind, ...] = FALLBACK_KINDS
    max_body: int = 1024 * 1024  # bytes: larger request bodies stream, without fallback


@dataclass(frozen=True, kw_only=True)
class RoutingSettings:
    paths: tuple[str, ...] = ("/",)
    sticky_key: StickyKey | None = StickyKey(source="header", name="X-User-Id")
    force_header: str = "X-Canary"
    arm_header: str = "X-Canary-Arm"  # "" disables the response header
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    fallback: FallbackSettings = field(default_factory=FallbackSettings)


@dataclass(frozen=True, kw_only=True)
class RolloutSettings:
    stages: tuple[int, ...] = (5, 25, 50, 100)
    bake: float = 600.0
    min_requests: int = 100
    auto_promote: bool = True
    weight: int | None = None  # a pinned weight (state `manual`)
    name: str = "default"  # names this rollout in a shared state backend (Redis keys)
    shadow: float = 0.0  # > 0: mirror traffic to the canary this long before the first stage
    shadow_share: int = 100  # percent of eligible requests mirrored during shadow
    shadow_methods: tuple[str, ...] = ("GET", "HEAD")


@dataclass(frozen=True, kw_only=True)
class ErrorThresholds:
    warning: float = 0.05
    critical: float = 0.10


@dataclass(frozen=True, kw_only=True)
class LatencyRegression:
    """A canary p95 over p95_ratio x the baseline's and min_delta slower is a warning."""

    p95_ratio: float = 1.5  # 0 disables
    min_delta: float = 0.05


@dataclass(frozen=True, kw_only=True)
class LatencyThresholds:
    p95_warning: float = 5.0
    p99_critical: float = 10.0
    regression: LatencyRegression = field(default_factory=LatencyRegression)


@dataclass(frozen=True, kw_only=True)
class AnalysisSettings:
    window: float = 60.0
    interval: float = 1.0
    min_requests: int = 20
    errors: ErrorThresholds = field(default_factory=ErrorThresholds)
    latency: LatencyThresholds = field(default_factory=LatencyThresholds)
    on_warning: Action = "step_back"
    on_critical: Action = "rollback"
    compare_baseline: bool = True
    beta: float = 0.05  # chance of promoting a canary that errs exactly at a threshold


@dataclass(frozen=True, kw_only=True)
class AdminSettings:
    listen: HostPort = HostPort(host="127.0.0.1", port=8081)
    token: str = ""


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    """`state.redis`: where replicas share one rollout (CONTRACT §7). `url` may hold a
    password (from ${VAR}): show it only through `redact_url`."""

    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "canary"
    timeout: float = 1.0  # one Redis call


@dataclass(frozen=True, kw_only=True)
class StateSettings:
    path: Path = Path("var/canary-state.json")  # made absolute by the loader
    backend: Literal["file", "redis"] = "file"
    redis: RedisSettings = field(default_factory=RedisSettings)


@dataclass(frozen=True, kw_only=True)
class LoggingSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


@dataclass(frozen=True, kw_only=True)
class TlsSettings:
    """The proxy listener's certificate chain and key (PEM files, absolute paths)."""

    cert: Path
    key: Path


@dataclass(frozen=True, kw_only=True)
class LimitsSettings:
    """What one client, or a config edit, may cost the proxy (CONTRACT §9)."""

    header_timeout: float = 60.0  # a request head must arrive within this
    keepalive_timeout: float = 75.0  # an idle client connection is closed after this
    max_connections: int = 0  # client connections at once; 0 = derived from the descriptor limit
    max_config_bytes: int = 1024 * 1024  # a bigger config file is rejected unread
    send_timeout: float = 60.0  # a client that reads none of its answer this long is dropped


@dataclass(frozen=True, kw_only=True)
class Settings:
    upstreams: Upstreams
    listen: HostPort = HostPort(host="0.0.0.0", port=8080)
    drain_timeout: float = 30.0
    workers: int = 1  # processes serving `listen`; "auto" in the file = one per core
    admin: AdminSettings = field(default_factory=AdminSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    state: StateSettings = field(default_factory=StateSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    tls: TlsSettings | None = None  # None: plain HTTP on `listen`
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    source: Path | None = None  # the file these settings were loaded from


def redact_url(url: str) -> str:
    """`url` with any password (and user name) replaced by `***`: for logs and /status."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    credentials, at, host = authority.rpartition("@")
    return f"{scheme}://{'***@' if at and credentials else ''}{host}{slash}{tail}"
