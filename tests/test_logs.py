"""Secrets never reach the logs: the real proxy, a failing upstream, the configured renderer."""

from __future__ import annotations

import io
import logging
import json

import aiohttp
import pytest
import structlog

from proxy.logs import configure_logging
from tests.conftest import upstream_settings
from tests.upstreams import raw_upstream

SECRET = "sk-live-0123456789abcdef"


@pytest.fixture
def log_stream():
    """Logging configured as `canary serve` does, into a buffer; reset afterwards."""
    stream = io.StringIO()
    configure_logging(level="debug", fmt="json", stream=stream)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


async def test_failures_are_logged_without_request_secrets(proxy_factory, unused_tcp_port, log_stream):
    stream = log_stream
    dead = upstream_settings("canary", f"http://127.0.0.1:{unused_tcp_port}")
    server, _ = await proxy_factory(weight=100, canary=dead)
    headers = {"Authorization": f"Bearer {SECRET}", "Cookie": f"session={SECRET}", "X-Api-Key": SECRET}
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url(f"/v1/chat?api_key={SECRET}"), headers=headers) as resp:
            assert resp.status == 502
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    failed = [line for line in lines if line["event"] == "upstream_failed"]
    assert failed and failed[0]["arm"] == "canary" and failed[0]["path"] == "/v1/chat"
    assert failed[0]["method"] == "GET" and failed[0]["status"] == 502
    assert SECRET not in stream.getvalue()


def test_the_renderer_masks_secret_fields_and_bearer_tokens_in_text(log_stream):
    structlog.get_logger("t").info(
        "evt", authorization=f"Bearer {SECRET}", admin_token="abc123secret",
        detail=f"upstream said: bad header Authorization: Bearer {SECRET}",
        headers={"Cookie": "a=b", "Accept": "text/plain"},
    )
    line = json.loads(log_stream.getvalue())
    assert line["authorization"] == "[redacted]" and line["admin_token"] == "[redacted]"
    assert SECRET not in line["detail"] and "abc123secret" not in log_stream.getvalue()
    assert line["headers"] == {"Cookie": "[redacted]", "Accept": "text/plain"}


def test_aiohttp_stdlib_records_are_json_and_scrubbed(log_stream):
    try:
        raise ValueError(f"bad header b'Authorization: Bearer {SECRET}' in http://u/x?api_key=AIzaSecret99")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    stream = log_stream
    line = json.loads(stream.getvalue())
    assert line["event"] == "Error handling request" and line["level"] == "error"
    assert "ValueError" in line["exception"]
    assert SECRET not in stream.getvalue() and "AIzaSecret99" not in stream.getvalue()


async def test_a_malformed_upstream_answer_logs_no_request_headers(proxy_factory, log_stream):
    async with raw_upstream(b"NOT-HTTP garbage\r\n\r\n") as url:
        server, _ = await proxy_factory(weight=100, canary=upstream_settings("canary", url))
        headers = {"Authorization": "Token plain-secret-1", "Cookie": "session=plain-secret-2"}
        async with aiohttp.ClientSession() as client:
            async with client.get(server.make_url("/v1/x?code=plain-secret-3"), headers=headers) as resp:
                assert resp.status == 502
    text = log_stream.getvalue()
    assert "upstream_failed" in text
    assert "plain-secret" not in text
