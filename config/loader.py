"""Load a YAML config file into `Settings`, reporting every problem with file, line and key.

The file is composed (never constructed with arbitrary tags) with PyYAML's SafeLoader so
every node keeps its line; `config.schema` walks the nodes against the settings classes.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from yaml.nodes import MappingNode

from config.errors import ConfigError, Problem
from config.tls_files import check_tls_files
from config.sizes import SIZE_EXAMPLES, parse_size
from config.workers import WORKERS_HINT, worker_count
from config.schema import (
    Invalid,
    Reader,
    Scalar,
    Section,
    boolean,
    byte_size,
    choice,
    duration,
    fraction,
    integer,
    string,
    string_text,
)
from config.settings import (
    AdminSettings,
    AnalysisSettings,
    ArmName,
    ErrorThresholds,
    FALLBACK_KINDS,
    FallbackSettings,
    HTTP1_CLIENTS,
    HostPort,
    LatencyRegression,
    LatencyThresholds,
    LimitsSettings,
    LoggingSettings,
    PoolSettings,
    RedisSettings,
    RetrySettings,
    RolloutSettings,
    RoutingSettings,
    Settings,
    StateSettings,
    StickyKey,
    TimeoutSettings,
    TlsSettings,
    UpstreamSettings,
    Upstreams,
    WebSocketSettings,
    redact_url,
)

__all__ = ["DEFAULT_MAX_CONFIG_BYTES", "format_problems", "load_settings", "parse_settings"]

DEFAULT_MAX_CONFIG_BYTES = LimitsSettings().max_config_bytes

_ACTIONS = ("pause", "step_back", "rollback")
_positive = duration(positive=True)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 header / cookie names
_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]+")
_HOST_PORT_HINT = 'expected HOST:PORT such as "127.0.0.1:8080" or "[::1]:8080"'


def load_settings(
    path: str | Path, *, env: Mapping[str, str] | None = None, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES
) -> Settings:
    """Read, interpolate and validate the config file at `path`; ConfigError lists every problem.
    A file over `max_bytes` is rejected before a byte of it is read."""
    filename = str(path)
    absolute = Path(os.path.abspath(path))
    raw = _read_capped(absolute, filename, max_bytes)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        message = f"the config file is not valid UTF-8 (byte {raw[exc.start]:#04x})"
        raise ConfigError([Problem(file=filename, line=line, key="", message=message)]) from None
    environ = os.environ if env is None else env
    settings = parse_settings(text, filename=filename, base_dir=absolute.parent, env=environ)
    return replace(settings, source=absolute)


def _read_capped(path: Path, filename: str, max_bytes: int) -> bytes:
    def fail(message: str) -> ConfigError:
        return ConfigError([Problem(file=filename, line=1, key="", message=message)])

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            raw = handle.read(max_bytes + 1) if size <= max_bytes else b""
    except OSError as exc:
        raise fail(f"cannot read the config file: {exc.strerror or exc}") from None
    if size > max_bytes or len(raw) > max_bytes:
        size = max(size, len(raw))
        raise fail(
            f"the config file is {size:,} bytes, over the {max_bytes:,}-byte cap (limits.max_config_bytes "
            f"of the config in force, default 1 MiB); it was not read"
        )
    return raw


def parse_settings(text: str, *, filename: str, base_dir: Path, env: Mapping[str, str]) -> Settings:
    """Validate config `text`; relative paths in it are taken relative to `base_dir`."""
    loader, root = _compose(text, filename)
    try:
        reader = Reader(filename=filename, env=env, loader=loader)
        settings = _settings(reader, root, base_dir)
    finally:
        loader.dispose()
    if reader.problems:
        raise ConfigError(sorted(reader.problems, key=lambda problem: problem.line))
    return settings


def format_problems(err: ConfigError) -> str:
    """Every problem as `FILE:LINE: dotted.key: message`, one per line."""
    return "\n".join(str(problem) for problem in err.problems)


def _compose(text: str, filename: str) -> tuple[yaml.SafeLoader, MappingNode]:
    def fail(line: int, message: str) -> ConfigError:
        return ConfigError([Problem(file=filename, line=line, key="", message=message)])

    try:
        loader = yaml.SafeLoader(text)
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = "; ".join(part for part in (exc.context, exc.problem) if part)
        line = mark.line + 1 if mark else 1
        if "${" in "".join(text.splitlines()[line - 1 : line]):
            detail += ' (inside {...} or [...] quote a ${VAR} value: warning: "${W}")'
        raise fail(line, f"invalid YAML: {detail}") from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise fail(line, f"invalid YAML: unacceptable character #x{code:04x}: {exc.reason}") from None
    except yaml.YAMLError as exc:
        raise fail(1, "invalid YAML: " + " ".join(str(exc).split())) from None
    if root is None:
        loader.dispose()
        raise fail(1, "the file is empty; it needs at least upstreams.baseline.url and upstreams.canary.url")
    if not isinstance(root, MappingNode):
        loader.dispose()
        kind = "a list" if isinstance(root, yaml.SequenceNode) else repr(root.value)
        raise fail(root.start_mark.line + 1, f"expected a mapping of settings at the top level, got {kind}")
    return loader, root


def _settings(reader: Reader, root: MappingNode, base_dir: Path) -> Settings:
    top = reader.section(root, key="", line=root.start_mark.line + 1, cls=Settings, exclude=("source",))
    return Settings(
        upstreams=_upstreams(top.section("upstreams", Upstreams)),
        admin=_admin(top.section("admin", AdminSettings)),
        routing=_routing(top.section("routing", RoutingSettings)),
        rollout=_rollout(top.section("rollout", RolloutSettings)),
        analysis=_analysis(top.section("analysis", AnalysisSettings)),
        state=_state(top.section("state", StateSettings), base_dir),
        logging=_logging(top.section("logging", LoggingSettings)),
        tls=_tls(top, base_dir),
        limits=_limits(top.section("limits", LimitsSettings)),
        **top.fields(listen=host_port, drain_timeout=duration(positive=False), workers=workers),
    )


def _admin(section: Section) -> AdminSettings:
    return AdminSettings(**section.fields(listen=host_port, token=string(empty_ok=True)))


def _upstreams(section: Section) -> Upstreams:
    return Upstreams(
        baseline=_upstream(section.section("baseline", UpstreamSettings, exclude=("name",)), "baseline"),
        canary=_upstream(section.section("canary", UpstreamSettings, exclude=("name",)), "canary"),
    )


def _upstream(section: Section, name: ArmName) -> UpstreamSettings:
    hint = f"the {name} upstream's base URL, e.g. http://127.0.0.1:9001"
    pool_section = section.section("pool", PoolSettings)
    pool = PoolSettings(**pool_section.fields(max_connections=integer(1), max_keepalive=integer(0)))
    _check_order(pool_section, "max_keepalive", "max_connections", (pool.max_keepalive, pool.max_connections))
    timeout = section.section("timeout", TimeoutSettings)
    retries = section.section("retries", RetrySettings)
    return UpstreamSettings(
        name=name,
        url=section.required("url", base_url, placeholder="http://invalid", hint=hint),
        timeout=TimeoutSettings(**timeout.fields(connect=_positive, total=_positive)),
        pool=pool,
        retries=RetrySettings(**retries.fields(attempts=integer(0, 10), backoff=duration(positive=False))),
        **section.fields(http2=boolean, client=choice(*HTTP1_CLIENTS)),
    )


def _routing(section: Section) -> RoutingSettings:
    found = section.fields(
        sticky_key=sticky_key,
        force_header=header_name,
        arm_header=header_name,
    )
    websocket = section.section("websocket", WebSocketSettings)
    found["websocket"] = WebSocketSettings(**websocket.fields(on_rollback=choice("close", "keep")))
    paths = section.items("paths", path_prefix, expected='path prefixes such as "/api/"')
    if paths == []:
        section.problem("paths", 'must list at least one path prefix ("/" matches every path)')
    elif paths is not None:
        found["paths"] = tuple(item.value for item in paths)
    return RoutingSettings(fallback=_fallback(section.section("fallback", FallbackSettings)), **found)


def _fallback(section: Section) -> FallbackSettings:
    found = section.fields(enabled=boolean, max_body=fallback_body_size)
    kinds = section.items("on", choice(*FALLBACK_KINDS), expected="failure kinds such as [connect, timeout, 5xx]")
    if kinds == []:
        section.problem("on", "must list at least one failure kind (connect, timeout, 5xx); set enabled: false to turn fallback off")
    elif kinds is not None:
        found["on"] = tuple(dict.fromkeys(item.value for item in kinds))  # type: ignore[misc]
    return FallbackSettings(**found)


def _rollout(section: Section) -> RolloutSettings:
    found = section.fields(
        bake=duration(positive=False),
        min_requests=integer(0),
        auto_promote=boolean,
        weight=weight,
        name=_rollout_name,
        shadow=duration(positive=False),
        shadow_share=integer(1, 100),
    )
    stages = _stages(section)
    if stages is not None:
        found["stages"] = stages
    methods = section.items("shadow_methods", http_method, expected="HTTP methods such as [GET, HEAD]")
    if methods == []:
        section.problem("shadow_methods", "must list at least one method, e.g. [GET, HEAD]")
    elif methods is not None:
        found["shadow_methods"] = tuple(dict.fromkeys(item.value for item in methods))
    return RolloutSettings(**found)


def http_method(scalar: Scalar) -> str:
    """An HTTP method name (a token), upper-cased: GET, HEAD, POST..."""
    text = string_text(scalar)
    if text is None or not _TOKEN.fullmatch(text.strip()):
        raise Invalid(f"expected an HTTP method such as GET, got {scalar.show()}")
    method = text.strip().upper()
    if method in ("CONNECT", "TRACE"):
        raise Invalid(f"{method} is never forwarded (the proxy answers it 405 itself), got {scalar.show()}")
    return method


def _stages(section: Section) -> tuple[int, ...] | None:
    """Stages: every problem at once (range, order, the last one 100)."""
    items = section.items("stages", integer(), expected="percentages such as [5, 25, 50, 100]")
    if items is None:
        return None
    if not items:
        section.problem("stages", "must list at least one stage, the last one 100")
        return None
    problems = len(section.reader.problems)
    in_range = [item for item in items if 1 <= item.value <= 100]
    for item in items:
        if item not in in_range:
            section.reader.problem(item.line, item.key, f"must be between 1 and 100, got {item.value}")
    for previous, item in zip(in_range, in_range[1:]):
        if item.value <= previous.value:
            message = f"stages must increase strictly, got {item.value} after {previous.value}"
            section.reader.problem(item.line, item.key, message)
    last = items[-1]
    if last.value != 100 and last in in_range:
        section.reader.problem(last.line, last.key, f"the last stage must be 100, got {last.value}")
    return tuple(item.value for item in items) if len(section.reader.problems) == problems else None


def _analysis(section: Section) -> AnalysisSettings:
    errors_section = section.section("errors", ErrorThresholds)
    errors = ErrorThresholds(**errors_section.fields(warning=fraction, critical=fraction))
    _check_order(errors_section, "warning", "critical", (errors.warning, errors.critical))
    latency = section.section("latency", LatencyThresholds)
    regression = latency.section("regression", LatencyRegression)
    return AnalysisSettings(
        errors=errors,
        latency=LatencyThresholds(
            **latency.fields(p95_warning=_positive, p99_critical=_positive),
            regression=LatencyRegression(
                **regression.fields(p95_ratio=_ratio_or_off, min_delta=duration(positive=False))
            ),
        ),
        **section.fields(
            window=_positive,
            interval=_positive,
            min_requests=integer(1),
            on_warning=choice(*_ACTIONS),
            on_critical=choice(*_ACTIONS),
            compare_baseline=boolean,
            beta=fraction,
        ),
    )


def _ratio_or_off(scalar: Scalar) -> float:
    """`analysis.latency.regression.p95_ratio`: a number above 1, or 0 to turn it off."""
    value = scalar.value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value == 0 or 1 < value < float("inf")):
        raise Invalid(f"expected a ratio above 1 (such as 1.5), or 0 to turn it off, got {scalar.show()}")
    return float(value)


def _state(section: Section, base_dir: Path) -> StateSettings:
    path = section.value("path", string(empty_ok=False), default=str(StateSettings().path))
    resolved = Path(path).expanduser()
    redis_section = section.section("redis", RedisSettings)
    redis = RedisSettings(
        **redis_section.fields(url=redis_url, key_prefix=_key_prefix, timeout=_positive)
    )
    return StateSettings(
        path=Path(os.path.abspath(base_dir / resolved)),
        redis=redis,
        **section.fields(backend=choice("file", "redis")),
    )


_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _rollout_name(scalar: Scalar) -> str:
    """A Redis key part: letters, digits, `_ . -` (no `:` — it separates key parts)."""
    text = string_text(scalar)
    if text is None or not _NAME.fullmatch(text):
        raise Invalid(f"expected 1-64 letters, digits, '_', '.' or '-' such as \"checkout\", got {scalar.show()}")
    return text


def _key_prefix(scalar: Scalar) -> str:
    text = string_text(scalar)
    if text is None or not _NAME.fullmatch(text):
        raise Invalid(f"expected 1-64 letters, digits, '_', '.' or '-' such as \"canary\", got {scalar.show()}")
    return text


def redis_url(scalar: Scalar) -> str:
    """redis://[[user]:password@]host[:port][/db] or rediss://...; a bad value is shown
    with its password hidden."""
    text = string_text(scalar)
    if text is None:
        raise Invalid(f"expected a URL such as redis://127.0.0.1:6379/0, got {scalar.show()}")
    text = text.strip()
    shown = repr(redact_url(text))
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. an unclosed [IPv6] host
        raise Invalid(f"is not a valid URL ({exc}), got {shown}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise Invalid(f"must start with redis:// or rediss://, got {shown}")
    try:
        parts.port
    except ValueError:
        raise Invalid(f"has an invalid port, got {shown}") from None
    if not parts.hostname:
        raise Invalid(f"has no host, got {shown}")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise Invalid(f"the path must be a database number such as /0, got {shown}")
    if parts.query or parts.fragment or any(char.isspace() for char in text):
        raise Invalid(f"must not have a query, fragment or spaces, got {shown}")
    return text


def _tls(top: Section, base_dir: Path) -> TlsSettings | None:
    """`tls:` absent means plain HTTP; present, both files must exist, parse and match."""
    if not top.has("tls"):
        return None
    section = top.section("tls", TlsSettings)
    problems = len(section.reader.problems)
    files = {
        name: section.required(name, string(empty_ok=False), placeholder="", hint=f"the PEM {what} file")
        for name, what in (("cert", "certificate chain"), ("key", "private key"))
    }
    if len(section.reader.problems) > problems:
        return None
    cert, key = (Path(os.path.abspath(base_dir / Path(files[name]).expanduser())) for name in ("cert", "key"))
    problem = check_tls_files(cert, key)
    if problem is not None:
        section.problem(problem.key, problem.message)
        return None
    return TlsSettings(cert=cert, key=key)


def _logging(section: Section) -> LoggingSettings:
    return LoggingSettings(
        **section.fields(level=choice("debug", "info", "warning", "error"), format=choice("json", "console"))
    )


def _limits(section: Section) -> LimitsSettings:
    return LimitsSettings(
        **section.fields(
            header_timeout=_positive,
            keepalive_timeout=_positive,
            max_connections=integer(0),
            max_config_bytes=byte_size(1024, 1024**3),
            send_timeout=_positive,
        )
    )


def _check_order(section: Section, low: str, high: str, values: tuple[float, float]) -> None:
    """Report `low` > `high` at whichever of the two keys the file sets."""
    low_value, high_value = values
    if low_value <= high_value:
        return
    if section.has(low) or not section.has(high):
        section.problem(low, f"must not exceed {high} ({high_value:g}), got {low_value:g}")
    else:
        section.problem(high, f"must be at least {low} ({low_value:g}), got {high_value:g}")


def size(scalar: Scalar) -> int:
    """A byte size: a whole number of bytes or "1MiB", "512KiB", "64kB"."""
    if isinstance(scalar.value, bool) or not isinstance(scalar.value, (int, str)):
        raise Invalid(f"expected a size {SIZE_EXAMPLES}, got {scalar.show()}")
    try:
        return parse_size(scalar.value if isinstance(scalar.value, int) else scalar.text)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


MAX_FALLBACK_BODY = 64 * 1024 * 1024


def fallback_body_size(scalar: Scalar) -> int:
    """`routing.fallback.max_body`: bodies kept in memory for a replay, so bounded (64 MiB)."""
    value = size(scalar)
    if value > MAX_FALLBACK_BODY:
        raise Invalid(f"at most 64MiB (each kept body is held in memory for a replay), got {scalar.show()}")
    return value


def host_port(scalar: Scalar) -> HostPort:
    text = string_text(scalar)
    if text is None:
        raise Invalid(f"{_HOST_PORT_HINT}, got {scalar.show()}")
    host, port = _split_host_port(text.strip(), scalar.show())
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise Invalid(f"port must be a number between 0 and 65535, got {scalar.show()}")
    return HostPort(host=host, port=int(port))


def _split_host_port(text: str, shown: str) -> tuple[str, str]:
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid(f"{_HOST_PORT_HINT}, got {shown} (not an IPv6 address in brackets)") from None
        if not bracket:
            raise Invalid(f"{_HOST_PORT_HINT}, got {shown}")
        return host, port
    host, colon, port = text.rpartition(":")
    if ":" in host:
        raise Invalid(f'IPv6 addresses need brackets, e.g. "[::1]:8080", got {shown}')
    if not colon or not _HOSTNAME.fullmatch(host):
        raise Invalid(f"{_HOST_PORT_HINT}, got {shown}")
    return host, port


def base_url(scalar: Scalar) -> str:
    """An http(s) URL with a host and no query or fragment, without a trailing slash."""
    text = string_text(scalar)
    if text is None:
        raise Invalid(f"expected a URL such as http://127.0.0.1:9001, got {scalar.show()}")
    text = text.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise Invalid(f"must start with http:// or https://, got {scalar.show()}")
    try:
        parts.port
    except ValueError:
        raise Invalid(f"has an invalid port, got {scalar.show()}") from None
    if not parts.hostname:
        raise Invalid(f"has no host, got {scalar.show()}")
    if "?" in text or "#" in text:
        raise Invalid(f"must not have a query (?...) or fragment (#...), got {scalar.show()}")
    if any(char.isspace() for char in text):
        raise Invalid(f"must not contain spaces, got {scalar.show()}")
    return text.rstrip("/")


def sticky_key(scalar: Scalar) -> StickyKey | None:
    """"header:NAME" or "cookie:NAME"; "" or null means no sticky key (random per request)."""
    hint = 'expected "header:NAME", "cookie:NAME" or "" (none)'
    text = "" if scalar.value is None else string_text(scalar)
    if text is None:
        raise Invalid(f"{hint}, got {scalar.show()}")
    if not text.strip():
        return None
    source, _, name = (part.strip() for part in text.partition(":"))
    if source not in ("header", "cookie") or not _TOKEN.fullmatch(name):
        raise Invalid(f"{hint}, got {scalar.show()}")
    return StickyKey(source="header" if source == "header" else "cookie", name=name)


def header_name(scalar: Scalar) -> str:
    """A header name, or "" (or null) to turn the feature off."""
    text = string(empty_ok=True)(scalar).strip()
    if text and not _TOKEN.fullmatch(text):
        raise Invalid(f"expected an HTTP header name such as X-Canary, got {scalar.show()}")
    return text


def path_prefix(scalar: Scalar) -> str:
    text = string_text(scalar)
    if text is None or not text.startswith("/") or any(char.isspace() for char in text):
        raise Invalid(f'expected a path prefix starting with "/", got {scalar.show()}')
    return text


def workers(scalar: Scalar) -> int:
    """A number of processes 1..256, or "auto" for one per core."""
    value = scalar.value
    text = str(value) if type(value) is int else string_text(scalar)
    count = worker_count(text) if text is not None else None
    if count is None:
        raise Invalid(f"{WORKERS_HINT}, got {scalar.show()}")
    return count


def weight(scalar: Scalar) -> int | None:
    """A pinned weight 0..100, or null for none."""
    return None if scalar.value is None else integer(0, 100)(scalar)
