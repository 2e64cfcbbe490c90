"""Secrets never reach the logs: the real proxy, a failing upstream, the configured renderer."""

from __future__ import annotations

import io
import json

import aiohttp
import structlog

from proxy.logs import configure_logging
from tests.conftest import upstream_settings

SECRET = "sk-live-0123456789abcdef"


async def test_failures_are_logged_without_request_secrets(proxy_factory, unused_tcp_port):
    stream = io.StringIO()
    configure_logging(level="debug", fmt="json", stream=stream)
    try:
        dead = upstream_settings("canary", f"http://127.0.0.1:{unused_tcp_port}")
        server, _ = await proxy_factory(weight=100, canary=dead)
        headers = {"Authorization": f"Bearer {SECRET}", "Cookie": f"session={SECRET}", "X-Api-Key": SECRET}
        async with aiohttp.ClientSession() as client:
            async with client.get(server.make_url(f"/v1/chat?api_key={SECRET}"), headers=headers) as resp:
                assert resp.status == 502
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    assert any(line["event"] == "upstream_failed" for line in lines)
    assert SECRET not in stream.getvalue()


def test_the_renderer_masks_secret_fields_and_bearer_tokens_in_text():
    stream = io.StringIO()
    configure_logging(level="info", fmt="json", stream=stream)
    try:
        log = structlog.get_logger("t")
        log.info("evt", authorization=f"Bearer {SECRET}", admin_token="abc123secret",
                 detail=f"upstream said: bad header Authorization: Bearer {SECRET}",
                 headers={"Cookie": "a=b", "Accept": "text/plain"})
    finally:
        structlog.reset_defaults()
    line = json.loads(stream.getvalue())
    assert line["authorization"] == "[redacted]" and line["admin_token"] == "[redacted]"
    assert SECRET not in line["detail"] and "abc123secret" not in stream.getvalue()
    assert line["headers"] == {"Cookie": "[redacted]", "Accept": "text/plain"}
