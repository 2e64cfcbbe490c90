"""Config loading, validation, durations and the file watcher, with real files in tmp_path."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import config.loader
from config.durations import format_duration, parse_duration
from config.errors import ConfigError
from config.loader import format_problems, load_settings
from config.settings import (
    HostPort,
    Settings,
    StateSettings,
    StickyKey,
    UpstreamSettings,
    Upstreams,
)
from config.watch import ConfigWatcher

CONTRACT_EXAMPLE = """\
listen: "0.0.0.0:8080"            # the proxy
drain_timeout: 30s                # on SIGTERM: how long in-flight requests may finish
admin:
  listen: "127.0.0.1:8081"
  token: "${CANARY_ADMIN_TOKEN:-}" # ${VAR} / ${VAR:-default} come from the environment
upstreams:
  baseline:                       # legacy sync path
    url: "http://127.0.0.1:9001"
    http2: false
    timeout: {connect: 5s, total: 30s}
    pool: {max_connections: 20, max_keepalive: 10}
  canary:                         # new async path
    url: "http://127.0.0.1:9002"
    http2: true
    timeout: {connect: 5s, total: 30s}
    pool: {max_connections: 20, max_keepalive: 10}
    retries: {attempts: 2, backoff: 100ms}   # only for failures before the request was sent
routing:
  paths: ["/"]
  sticky_key: "header:X-User-Id"
  force_header: "X-Canary"
  arm_header: "X-Canary-Arm"
rollout:
  stages: [5, 25, 50, 100]
  bake: 10m
  min_requests: 100
  auto_promote: true
  # weight: 30
analysis:
  window: 60s
  interval: 1s
  min_requests: 20
  errors: {warning: 0.05, critical: 0.10}
  latency: {p95_warning: 5s, p99_critical: 10s}
  on_warning: step_back
  on_critical: rollback
  compare_baseline: true
state:
  path: "var/canary-state.json"
logging:
  level: info
  format: json
"""

MINIMAL = """\
upstreams:
  baseline:
    url: http://127.0.0.1:9001
  canary:
    url: http://127.0.0.1:9002
"""


def write(tmp_path: Path, text: str, name: str = "canary.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, env: Mapping[str, str] | None = None) -> Settings:
    return load_settings(write(tmp_path, text), env=env or {})


def problems(tmp_path: Path, text: str, env: Mapping[str, str] | None = None) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env=env or {})
    prefix = f"{path}:"
    lines = format_problems(caught.value).splitlines()
    assert all(line.startswith(prefix) for line in lines)
    return [line.removeprefix(prefix) for line in lines]


# --- whole files -------------------------------------------------------------------


def test_contract_example_parses_to_its_values(tmp_path: Path) -> None:
    settings = load(tmp_path, CONTRACT_EXAMPLE, env={"CANARY_ADMIN_TOKEN": "s3cret"})

    assert settings.source == tmp_path / "canary.yaml"
    assert settings.listen == HostPort(host="0.0.0.0", port=8080)
    assert settings.drain_timeout == 30.0
    assert settings.admin.listen == HostPort(host="127.0.0.1", port=8081)
    assert settings.admin.token == "s3cret"
    canary = settings.upstreams.canary
    assert (canary.name, canary.url, canary.http2) == ("canary", "http://127.0.0.1:9002", True)
    assert (canary.timeout.connect, canary.timeout.total) == (5.0, 30.0)
    assert (canary.retries.attempts, canary.retries.backoff) == (2, 0.1)
    assert settings.upstreams.baseline.name == "baseline"
    assert settings.upstreams.baseline.http2 is False
    assert settings.routing.paths == ("/",)
    assert settings.routing.sticky_key == StickyKey(source="header", name="X-User-Id")
    assert settings.rollout.stages == (5, 25, 50, 100)
    assert (settings.rollout.bake, settings.rollout.weight) == (600.0, None)
    assert settings.analysis.errors.critical == 0.10
    assert settings.analysis.latency.p99_critical == 10.0
    assert settings.state.path == tmp_path / "var" / "canary-state.json"
    assert (settings.logging.level, settings.logging.format) == ("info", "json")


def test_contract_example_token_defaults_to_empty(tmp_path: Path) -> None:
    assert load(tmp_path, CONTRACT_EXAMPLE, env={}).admin.token == ""


def test_minimal_config_gets_every_default(tmp_path: Path) -> None:
    settings = load(tmp_path, MINIMAL)

    expected = Settings(
        upstreams=Upstreams(
            baseline=UpstreamSettings(name="baseline", url="http://127.0.0.1:9001"),
            canary=UpstreamSettings(name="canary", url="http://127.0.0.1:9002"),
        ),
        state=StateSettings(path=tmp_path / "var" / "canary-state.json"),
        source=tmp_path / "canary.yaml",
    )
    assert settings == expected


def test_relative_config_path_gives_absolute_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)

    settings = load_settings("canary.yaml", env={})

    assert settings.source == tmp_path / "canary.yaml"
    assert settings.source.is_absolute()


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANARY_TEST_TOKEN", "from-environ")
    path = write(tmp_path, MINIMAL + "admin: {token: '${CANARY_TEST_TOKEN}'}\n")

    assert load_settings(path).admin.token == "from-environ"


# --- problems ----------------------------------------------------------------------


def test_every_problem_is_reported_with_line_and_dotted_key(tmp_path: Path) -> None:
    text = """\
listen: "0.0.0.0:99999"
upstreams:
  baseline:
    url: http://127.0.0.1:9001
    timeout: {connect: 0s, total: abc}
  canary:
    http2: 1
    pool: {max_connections: 2, max_keepalive: 5}
routing:
  paths: ["/", "api"]
rollout:
  min_requests: 2.5
  auto_promote: true
  weigth: 10
analysis:
  errors: {warning: 0.2, critical: 0.1}
  on_critical: explode
"""
    assert problems(tmp_path, text) == [
        "1: listen: port must be a number between 0 and 65535, got '0.0.0.0:99999'",
        "5: upstreams.baseline.timeout.connect: must be greater than 0, got '0s'",
        "5: upstreams.baseline.timeout.total: expected a duration such as 100ms, 1.5s, 10m, 2h, 1d"
        " or a number of seconds, got 'abc'",
        "6: upstreams.canary.url: missing required key: the canary upstream's base URL,"
        " e.g. http://127.0.0.1:9001",
        "7: upstreams.canary.http2: expected true or false, got 1",
        "8: upstreams.canary.pool.max_keepalive: must not exceed max_connections (2), got 5",
        "10: routing.paths[1]: expected a path prefix starting with \"/\", got 'api'",
        "12: rollout.min_requests: expected an integer, got 2.5",
        "14: rollout.weigth: unknown key (expected one of: stages, bake, min_requests, auto_promote, weight, name, shadow, shadow_share, shadow_methods)",
        "16: analysis.errors.warning: must not exceed critical (0.1), got 0.2",
        "17: analysis.on_critical: must be one of pause, step_back, rollback, got 'explode'",
    ]


def test_problem_format_is_file_line_key_message(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "logging:\n  level: loud\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})

    message = "must be one of debug, info, warning, error, got 'loud'"
    assert str(caught.value) == f"{path}:7: logging.level: {message}"
    assert format_problems(caught.value) == str(caught.value)


def test_missing_urls_are_problems(tmp_path: Path) -> None:
    assert problems(tmp_path, "listen: '127.0.0.1:0'\n") == [
        "1: upstreams.baseline.url: missing required key: the baseline upstream's base URL,"
        " e.g. http://127.0.0.1:9001",
        "1: upstreams.canary.url: missing required key: the canary upstream's base URL,"
        " e.g. http://127.0.0.1:9001",
    ]


def test_yaml_syntax_error_is_reported_at_its_line(tmp_path: Path) -> None:
    found = problems(tmp_path, MINIMAL + "routing:\n  paths: [\"/\"\n  sticky_key: x\n")

    assert len(found) == 1
    assert found[0].startswith("8: (top level): invalid YAML: ")


EMPTY = "the file is empty; it needs at least upstreams.baseline.url and upstreams.canary.url"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", f"1: (top level): {EMPTY}"),
        ("# nothing\n", f"1: (top level): {EMPTY}"),
        ("- a\n- b\n", "1: (top level): expected a mapping of settings at the top level, got a list"),
        ("\n\nhello\n", "3: (top level): expected a mapping of settings at the top level, got 'hello'"),
    ],
)
def test_file_must_be_a_mapping(tmp_path: Path, text: str, message: str) -> None:
    assert problems(tmp_path, text) == [message]


def test_unreadable_file_is_one_problem(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as caught:
        load_settings(missing, env={})

    [problem] = caught.value.problems
    assert (problem.file, problem.line, problem.key) == (str(missing), 1, "")
    assert "cannot read the config file" in problem.message


def test_unsafe_tags_are_rejected_not_constructed(tmp_path: Path) -> None:
    found = problems(tmp_path, MINIMAL + "listen: !!python/name:os.getcwd ''\n")

    assert len(found) == 1
    assert found[0].startswith("6: listen: unsupported value: ")


def test_duplicate_keys_are_problems(tmp_path: Path) -> None:
    assert problems(tmp_path, MINIMAL + "drain_timeout: 1s\ndrain_timeout: 2s\n") == [
        "7: drain_timeout: duplicate key (first set at line 6)",
    ]


def test_merge_keys_share_upstream_settings(tmp_path: Path) -> None:
    text = """\
upstreams:
  baseline: &common
    url: http://127.0.0.1:9001
    pool: {max_connections: 3, max_keepalive: 1}
  canary:
    <<: *common
    url: http://127.0.0.1:9002
"""
    canary = load(tmp_path, text).upstreams.canary

    assert canary.url == "http://127.0.0.1:9002"
    assert canary.pool.max_connections == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("drain_timeout: true", "drain_timeout: expected a duration such as 100ms, 1.5s, 10m, 2h, 1d"
         " or a number of seconds, got true"),
        ("drain_timeout: -1s", "drain_timeout: must not be negative, got '-1s'"),
        ("rollout: {min_requests: true}", "rollout.min_requests: expected an integer, got true"),
        ("rollout: {weight: 101}", "rollout.weight: must be between 0 and 100, got 101"),
        ("analysis: {min_requests: 0}", "analysis.min_requests: must be at least 1, got 0"),
        ("analysis: {errors: {critical: abc}}", "analysis.errors.critical: expected a number, got 'abc'"),
        ("analysis: {errors: {warning: 1}}",
         "analysis.errors.warning: must be greater than 0 and less than 1, got 1"),
        ("analysis: {compare_baseline: 'true'}",
         "analysis.compare_baseline: expected true or false, got 'true'"),
        ("analysis: {beta: 0}", "analysis.beta: must be greater than 0 and less than 1, got 0"),
        ("admin: {listen: '::1:80'}",
         "admin.listen: IPv6 addresses need brackets, e.g. \"[::1]:8080\", got '::1:80'"),
        ("listen: 8080", "listen: expected HOST:PORT such as \"127.0.0.1:8080\" or \"[::1]:8080\", got 8080"),
        ("routing: {sticky_key: 'query:x'}",
         "routing.sticky_key: expected \"header:NAME\", \"cookie:NAME\" or \"\" (none), got 'query:x'"),
        ("routing: {force_header: 'X Canary'}",
         "routing.force_header: expected an HTTP header name such as X-Canary, got 'X Canary'"),
        ("routing: {paths: '/'}",
         "routing.paths: expected a list of path prefixes such as \"/api/\", got '/'"),
        ("state: {path: ''}", "state.path: must not be empty"),
        ("logging: {format: xml}", "logging.format: must be one of json, console, got 'xml'"),
        ("admin: 5", "admin: expected a mapping with keys listen, token, got 5"),
    ],
)
def test_wrong_values_name_the_key_and_the_fix(tmp_path: Path, line: str, message: str) -> None:
    assert problems(tmp_path, MINIMAL + line + "\n") == [f"6: {message}"]


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert problems(tmp_path, MINIMAL + "listn: ':80'\n") == [
        "6: listn: unknown key (expected one of: upstreams, listen, drain_timeout, workers, admin, routing,"
        " rollout, analysis, state, logging, tls, limits)",
    ]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://h", "must start with http:// or https://, got 'ftp://h'"),
        ("http://", "has no host, got 'http://'"),
        ("http://h:99999", "has an invalid port, got 'http://h:99999'"),
        ("http://h/?a=1", "must not have a query (?...) or fragment (#...), got 'http://h/?a=1'"),
        ("http://h/#top", "must not have a query (?...) or fragment (#...), got 'http://h/#top'"),
    ],
)
def test_bad_upstream_urls(tmp_path: Path, url: str, message: str) -> None:
    text = MINIMAL.replace("http://127.0.0.1:9002", url)

    assert problems(tmp_path, text) == [f"5: upstreams.canary.url: {message}"]


def test_url_trailing_slash_is_stripped(tmp_path: Path) -> None:
    text = MINIMAL.replace("http://127.0.0.1:9002", "https://canary.internal/api/")

    assert load(tmp_path, text).upstreams.canary.url == "https://canary.internal/api"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("'127.0.0.1:0'", HostPort(host="127.0.0.1", port=0)),
        ("localhost:8080", HostPort(host="localhost", port=8080)),
        ("'[::1]:9000'", HostPort(host="::1", port=9000)),
        ("'[::]:0'", HostPort(host="::", port=0)),
    ],
)
def test_listen_forms(tmp_path: Path, value: str, expected: HostPort) -> None:
    assert load(tmp_path, MINIMAL + f"listen: {value}\n").listen == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("'cookie:session'", StickyKey(source="cookie", name="session")),
        ("'header: X-Tenant'", StickyKey(source="header", name="X-Tenant")),
        ("''", None),
        ("null", None),
    ],
)
def test_sticky_key_forms(tmp_path: Path, value: str, expected: StickyKey | None) -> None:
    assert load(tmp_path, MINIMAL + f"routing: {{sticky_key: {value}}}\n").routing.sticky_key == expected


def test_arm_header_empty_disables_it(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL + "routing: {arm_header: ''}\n").routing.arm_header == ""


# --- stages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("[]", "6: rollout.stages: must list at least one stage, the last one 100"),
        ("[5, 5, 100]", "6: rollout.stages[1]: stages must increase strictly, got 5 after 5"),
        ("[50, 25, 100]", "6: rollout.stages[1]: stages must increase strictly, got 25 after 50"),
        ("[5, 25, 50]", "6: rollout.stages[2]: the last stage must be 100, got 50"),
        ("[0, 100]", "6: rollout.stages[0]: must be between 1 and 100, got 0"),
        ("[5, 101]", "6: rollout.stages[1]: must be between 1 and 100, got 101"),
        ("[5.5, 100]", "6: rollout.stages[0]: expected an integer, got 5.5"),
        ("50", "6: rollout.stages: expected a list of percentages such as [5, 25, 50, 100], got 50"),
    ],
)
def test_stage_validation(tmp_path: Path, stages: str, message: str) -> None:
    assert problems(tmp_path, MINIMAL + f"rollout: {{stages: {stages}}}\n") == [message]


def test_stage_items_report_their_own_lines(tmp_path: Path) -> None:
    text = MINIMAL + "rollout:\n  stages:\n    - 10\n    - 200\n    - 100\n"

    assert problems(tmp_path, text) == ["9: rollout.stages[1]: must be between 1 and 100, got 200"]


def test_single_stage_of_100_is_valid(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL + "rollout: {stages: [100]}\n").rollout.stages == (100,)


# --- environment interpolation -----------------------------------------------------


def test_unset_variable_is_a_problem_at_its_line(tmp_path: Path) -> None:
    text = MINIMAL.replace("http://127.0.0.1:9002", "http://${CANARY_HOST}:9002")

    assert problems(tmp_path, text) == [
        "5: upstreams.canary.url: environment variable CANARY_HOST is not set"
        " (set it, or write ${CANARY_HOST:-default})",
    ]


def test_variables_inside_longer_strings(tmp_path: Path) -> None:
    text = MINIMAL.replace("http://127.0.0.1:9002", "http://${CANARY_HOST}:${CANARY_PORT:-9002}/")

    settings = load(tmp_path, text, env={"CANARY_HOST": "10.0.0.7"})

    assert settings.upstreams.canary.url == "http://10.0.0.7:9002"


def test_default_applies_when_unset_or_empty(tmp_path: Path) -> None:
    text = MINIMAL + "admin: {token: '${TOKEN:-fallback}'}\n"

    assert load(tmp_path, text, env={}).admin.token == "fallback"
    assert load(tmp_path, text, env={"TOKEN": ""}).admin.token == "fallback"
    assert load(tmp_path, text, env={"TOKEN": "t"}).admin.token == "t"
    assert load(tmp_path, text, env={"TOKEN": "null"}).admin.token == "null"


def test_interpolated_values_are_typed_by_their_key(tmp_path: Path) -> None:
    text = MINIMAL + """\
listen: "${HOST}:${PORT}"
drain_timeout: ${DRAIN}
rollout:
  min_requests: "${MIN}"
  auto_promote: ${AUTO}
  weight: ${WEIGHT:-}
admin: {token: "${TOKEN}"}
"""
    env = {"HOST": "127.0.0.1", "PORT": "80", "DRAIN": "250ms", "MIN": "7", "AUTO": "false", "TOKEN": "123"}

    settings = load(tmp_path, text, env=env)

    assert settings.listen == HostPort(host="127.0.0.1", port=80)
    assert settings.drain_timeout == 0.25
    assert (settings.rollout.min_requests, settings.rollout.auto_promote) == (7, False)
    assert settings.rollout.weight is None
    assert settings.admin.token == "123"


def test_interpolated_value_still_validated(tmp_path: Path) -> None:
    text = MINIMAL + "rollout: {min_requests: '${MIN}'}\n"

    assert problems(tmp_path, text, env={"MIN": "lots"}) == [
        "6: rollout.min_requests: expected an integer, got 'lots'",
    ]


def test_double_dollar_escapes_a_literal(tmp_path: Path) -> None:
    text = MINIMAL + "admin: {token: 'a$${NOT_A_VAR}b'}\n"

    assert load(tmp_path, text).admin.token == "a${NOT_A_VAR}b"


def test_every_bad_reference_in_a_value_is_reported(tmp_path: Path) -> None:
    text = MINIMAL + "admin: {token: '${A}${B}${1x}'}\n"

    assert problems(tmp_path, text) == [
        "6: admin.token: environment variable A is not set (set it, or write ${A:-default})",
        "6: admin.token: environment variable B is not set (set it, or write ${B:-default})",
        "6: admin.token: malformed reference ${1x} (expected ${NAME} or ${NAME:-default})",
    ]


# --- state path --------------------------------------------------------------------


def test_state_path_is_relative_to_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    path = write(config_dir, MINIMAL + "state: {path: ../run/state.json}\n")

    assert load_settings(path, env={}).state.path == tmp_path / "run" / "state.json"


def test_absolute_state_path_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "state.json"

    assert load(tmp_path, MINIMAL + f"state: {{path: '{target}'}}\n").state.path == target


# --- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("100ms", 0.1),
        ("1.5s", 1.5),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("30", 30.0),
        (" 5 s ", 5.0),
        ("1h30m", 5400.0),
        (".5s", 0.5),
        (0, 0.0),
        (45, 45.0),
        (0.02, 0.02),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["", "abc", "5x", "5 sec", "1e3s", "inf", "s", True, None, [1], float("nan")]
)
def test_parse_duration_rejects_nonsense(value: object) -> None:
    with pytest.raises(ValueError, match="expected a"):
        parse_duration(value)


@pytest.mark.parametrize("value", ["-5s", "-1", -0.5])
def test_parse_duration_rejects_negative(value: object) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (1.5, "1.5s"),
        (10, "10s"),
        (90, "1m30s"),
        (600, "10m"),
        (5400, "1h30m"),
        (86400, "1d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**10))
def test_format_duration_round_trips(milliseconds: int) -> None:
    seconds = milliseconds / 1000
    assert math.isclose(parse_duration(format_duration(seconds)), seconds, rel_tol=1e-9, abs_tol=1e-9)


# --- watcher -----------------------------------------------------------------------


def bump_mtime(path: Path, seconds: int = 10) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))


def test_watcher_reports_an_edit_once(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    watcher = ConfigWatcher(path)
    assert not watcher.changed()

    path.write_text(MINIMAL + "drain_timeout: 1s\n")
    bump_mtime(path)

    assert watcher.changed()
    assert not watcher.changed()


def test_watcher_sees_an_atomic_replace_with_the_same_mtime_and_size(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    watcher = ConfigWatcher(path)
    before = path.stat()
    replacement = write(tmp_path, MINIMAL.replace("9002", "9003"), name="canary.yaml.tmp")
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))

    os.replace(replacement, path)

    assert path.stat().st_ino != before.st_ino
    assert watcher.changed()


def test_watcher_ignores_a_briefly_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    watcher = ConfigWatcher(path)
    moved = tmp_path / "moved.yaml"

    path.rename(moved)
    assert not watcher.changed()
    moved.rename(path)
    assert not watcher.changed()

    path.unlink()
    assert not watcher.changed()
    write(tmp_path, MINIMAL + "drain_timeout: 1s\n")
    assert watcher.changed()


def test_watcher_sees_a_file_created_after_start(tmp_path: Path) -> None:
    path = tmp_path / "canary.yaml"
    watcher = ConfigWatcher(path)
    assert not watcher.changed()

    write(tmp_path, MINIMAL)

    assert watcher.changed()


def test_mark_seen_absorbs_a_change(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    watcher = ConfigWatcher(path)
    path.write_text(MINIMAL + "drain_timeout: 1s\n")
    bump_mtime(path)

    watcher.mark_seen()

    assert not watcher.changed()


# --- surface and layering ----------------------------------------------------------


def test_loader_public_surface() -> None:
    assert sorted(config.loader.__all__) == ["DEFAULT_MAX_CONFIG_BYTES", "format_problems", "load_settings", "parse_settings"]


def test_config_imports_neither_proxy_nor_rollout() -> None:
    code = (
        "import sys, config.loader, config.watch, config.durations; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('proxy', 'rollout')))"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_an_unquoted_variable_in_a_flow_mapping_gets_a_hint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        'upstreams:\n  baseline: {url: "http://a:1"}\n  canary: {url: "http://a:2"}\n'
        "analysis:\n  errors: {warning: ${W}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={"W": "0.05"})
    assert str(caught.value).startswith(f"{path}:5: ")
    assert 'quote a ${VAR} value' in str(caught.value)
    path.write_text(path.read_text().replace("${W}", '"${W}"'))
    assert load_settings(path, env={"W": "0.05"}).analysis.errors.warning == 0.05


def test_a_bad_admin_token_value_is_never_echoed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('admin: {token: 123456789}\nupstreams:\n  baseline: {url: "http://a:1"}\n  canary: {url: "http://a:2"}\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert "admin.token: expected a string" in str(caught.value) and "123456789" not in str(caught.value)


def test_every_stage_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('upstreams:\n  baseline: {url: "http://a:1"}\n  canary: {url: "http://a:2"}\n'
                    "rollout:\n  stages: [50, 25, 101]\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert [str(p).split(": ", 1)[1] for p in caught.value.problems] == [
        "rollout.stages[2]: must be between 1 and 100, got 101",
        "rollout.stages[1]: stages must increase strictly, got 25 after 50",
    ]
