"""`state.backend`, `state.redis` and `rollout.name`: validated, a password never shown."""

from __future__ import annotations

import pytest

from config.errors import ConfigError
from config.loader import parse_settings
from config.settings import redact_url
from tests.admin_support import run_cli

BASE = 'upstreams: {baseline: {url: "http://127.0.0.1:1"}, canary: {url: "http://127.0.0.1:2"}}\n'


def parse(extra: str, env: dict[str, str] | None = None):
    return parse_settings(BASE + extra, filename="c.yaml", base_dir=__import__("pathlib").Path("/tmp"), env=env or {})


def problems(extra: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(extra, env)
    return [f"{p.key}: {p.message}" for p in caught.value.problems]


def test_defaults_are_the_file_backend_and_the_default_rollout():
    settings = parse("")
    assert settings.state.backend == "file" and settings.rollout.name == "default"
    assert settings.state.redis.url == "redis://127.0.0.1:6379/0" and settings.state.redis.key_prefix == "canary"


def test_a_redis_backend_with_a_password_from_the_environment():
    settings = parse(
        'rollout: {name: checkout}\n'
        'state: {backend: redis, redis: {url: "rediss://app:${PW}@cache.internal:6380/2", key_prefix: prod, timeout: 250ms}}\n',
        env={"PW": "s3cret"},
    )
    redis = settings.state.redis
    assert (settings.state.backend, redis.key_prefix, redis.timeout) == ("redis", "prod", 0.25)
    assert redis.url == "rediss://app:s3cret@cache.internal:6380/2"
    assert redact_url(redis.url) == "rediss://***@cache.internal:6380/2"


def test_bad_urls_prefixes_and_names_are_reported_without_the_password():
    found = problems(
        'rollout: {name: "a:b"}\n'
        'state: {backend: etcd, redis: {url: "http://u:${PW}@h:6379", key_prefix: "x y", timeout: 0s}}\n',
        env={"PW": "s3cret"},
    )
    assert sorted(found) == sorted([
        "rollout.name: expected 1-64 letters, digits, '_', '.' or '-' such as \"checkout\", got 'a:b'",
        "state.redis.url: must start with redis:// or rediss://, got 'http://***@h:6379'",
        "state.redis.key_prefix: expected 1-64 letters, digits, '_', '.' or '-' such as \"canary\", got 'x y'",
        "state.redis.timeout: must be greater than 0, got '0s'",
        "state.backend: must be one of file, redis, got 'etcd'",
    ])
    assert not any("s3cret" in problem for problem in found)


def test_a_redis_url_needs_a_host_and_a_database_number():
    assert problems('state: {redis: {url: "redis://:pw@/0"}}\n') == ["state.redis.url: has no host, got 'redis://***@/0'"]
    assert problems('state: {redis: {url: "redis://h:6379/zero"}}\n') == [
        "state.redis.url: the path must be a database number such as /0, got 'redis://h:6379/zero'"
    ]


async def test_validate_never_prints_the_password(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(BASE + 'state: {backend: redis, redis: {url: "ftp://:${PW}@h"}}\n')
    result = await run_cli("validate", "-c", str(config), env={"PW": "s3cret"})
    assert result.code == 2 and "ftp://***@h" in result.out + result.err
    assert "s3cret" not in result.out + result.err


async def test_a_malformed_redis_url_is_a_config_error_not_a_traceback(tmp_path):
    assert problems('state: {redis: {url: "redis://u:s3cret@[::1/0"}}\n') == [
        "state.redis.url: is not a valid URL (Invalid IPv6 URL), got 'redis://***@[::1/0'"
    ]
    config = tmp_path / "c.yaml"
    config.write_text(BASE + 'state: {backend: redis, redis: {url: "redis://u:s3cret@[::1/0"}}\n')
    result = await run_cli("validate", "-c", str(config))
    assert result.code == 2 and "state.redis.url: is not a valid URL" in result.out
    assert "Traceback" not in result.out + result.err and "s3cret" not in result.out + result.err
