"""The proxy's own resources against a real `canary serve` (issue 11): descriptors, huge
or missing config files, temp files left by a killed process, the client choice."""

from __future__ import annotations

import asyncio
import resource
from collections import Counter

import aiohttp
import pytest

from config.errors import ProxyOverloaded
from config.settings import UpstreamSettings
from proxy.upstream.base import overloaded, shortage_reason
from proxy.upstream.lean import Http1Transport
from proxy.upstream.pool import make_transport
from proxy.upstream.session import AiohttpTransport
from tests.admin_support import run_cli, until_status
from tests.hardening_support import arm_figures, get, hardened_config
from tests.serve_process import write_config

MB = 1024 * 1024


def _descriptor_limit(limit: int):
    def lower() -> None:  # in the child, before exec: as `prlimit --nofile=1024` would
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return lower


async def test_1500_concurrent_requests_at_1024_descriptors_are_all_answered_none_against_an_arm(
    canary, upstreams, tmp_path
):
    from tests.serve_process import ServeProcess

    config = hardened_config(tmp_path / "c.yaml", upstreams, weight=50, limits="")
    proxy = await ServeProcess(config, preexec_fn=_descriptor_limit(1024)).start()
    try:
        limit = await proxy.wait_for_event("descriptor_limit")
        assert (limit["soft"], limit["hard"]) == (1024, 1024)
        assert (await proxy.wait_for_event("serving"))["max_connections"] == 448
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async def one() -> tuple[int, str | None]:
                async with session.get(f"{proxy.proxy_url}/sleep/0.2") as response:
                    await response.read()
                    return response.status, response.headers.get("Retry-After")
            answers = Counter(await asyncio.gather(*(one() for _ in range(1500))))
        assert set(answers) <= {(200, None), (503, "1")}, answers
        assert answers[(200, None)] >= 400 and answers[(503, "1")] > 0, answers
        for arm in ("baseline", "canary"):
            assert (await arm_figures(proxy, arm))["errors"] == 0
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy.admin_url}/metrics") as response:
                metrics = await response.text()
        shed = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("canary_shed_total{"))
        assert shed == answers[(503, "1")]
        assert any(e.get("event") == "load_shed" for e in proxy.events)
    finally:
        await proxy.kill()


def test_the_proxy_running_out_of_descriptors_or_memory_is_told_apart():
    import errno

    assert shortage_reason(OSError(errno.EMFILE, "Too many open files")) == "descriptors"
    assert shortage_reason(OSError(errno.ENFILE, "File table overflow")) == "descriptors"
    assert shortage_reason(OSError(errno.ENOMEM, "Cannot allocate memory")) == "memory"
    try:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as inner:
            raise RuntimeError("wrapped by a client library") from inner
    except RuntimeError as outer:
        shortage = overloaded("canary", outer)
    assert isinstance(shortage, ProxyOverloaded) and shortage.reason == "descriptors" and shortage.status == 503
    assert shortage_reason(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None


# -- 5. a 50 MB config ------------------------------------------------------------------------
def _bloat(text: str, size: int) -> str:
    return text + "# " + "x" * size + "\n"


async def test_canary_validate_rejects_a_50_mb_file_unread(tmp_path, upstreams):
    config = hardened_config(tmp_path / "c.yaml", upstreams)
    write_config(config, _bloat(config.read_text(), 50 * MB))
    result = await run_cli("validate", "-c", str(config), timeout=5)
    assert result.code == 2
    assert "over the 1,048,576-byte cap (limits.max_config_bytes" in result.out and "not read" in result.out


async def test_a_50_mb_config_edit_is_rejected_unread_while_requests_flow(canary, upstreams, tmp_path):
    config = hardened_config(tmp_path / "c.yaml", upstreams)
    proxy = await canary(config)
    good = config.read_text()
    async with aiohttp.ClientSession() as session:
        write_config(config, _bloat(good, 50 * MB))
        answers = []
        while not any(e.get("event") == "config_rejected" for e in proxy.events):
            answers.append(await get(session, f"{proxy.proxy_url}/during"))
        status = await until_status(proxy, lambda s: s["config"]["error"] is not None)
        assert "the config file is" in status["config"]["error"] and "it was not read" in status["config"]["error"]
        assert {code for code, _ in answers} <= {200}
        # a file just under a raised cap is parsed off the event loop and applies
        write_config(config, good.replace("limits: {}", "limits: {max_config_bytes: 2MiB}"))
        await until_status(proxy, lambda s: s["config"]["reloads"]["ok"] == 1)
        write_config(config, _bloat(good.replace("limits: {}", "limits: {max_config_bytes: 2MiB}"), MB))
        status = await until_status(proxy, lambda s: s["config"]["reloads"]["ok"] == 2)
        assert status["config"]["error"] is None
        assert (await get(session, f"{proxy.proxy_url}/after"))[0] == 200


# -- 6. a missing config file --------------------------------------------------------------
async def test_a_deleted_config_file_is_reported_and_the_last_good_one_keeps_serving(canary, upstreams, tmp_path):
    config = hardened_config(tmp_path / "c.yaml", upstreams)
    proxy = await canary(config)
    text = config.read_text()
    config.unlink()
    status = await until_status(proxy, lambda s: s["config"]["error"] is not None, timeout=5)
    assert "the config file is missing" in status["config"]["error"] and "last good config keeps serving" in status["config"]["error"]
    assert (await proxy.wait_for_event("config_missing"))["path"] == str(config)
    async with aiohttp.ClientSession() as session:
        assert (await get(session, f"{proxy.proxy_url}/still"))[0] == 200
    write_config(config, text)  # back: read again, and the report clears
    status = await until_status(proxy, lambda s: s["config"]["error"] is None and s["config"]["reloads"]["ok"] == 1)


# -- 8. stale temp files --------------------------------------------------------------------
async def test_temp_files_left_by_a_killed_state_write_are_removed_at_start(canary, upstreams, tmp_path):
    var = tmp_path / "var"
    var.mkdir()
    stale = [var / ".state.json.k1lled.tmp", var / ".state.json.abc123.tmp"]
    for path in stale:
        path.write_text('{"half": ')
    unrelated = var / "notes.tmp"
    unrelated.write_text("mine")
    proxy = await canary(hardened_config(tmp_path / "c.yaml", upstreams))
    assert not any(path.exists() for path in stale) and unrelated.exists()
    removed = await proxy.wait_for_event("stale_temp_files_removed")
    assert sorted(removed["files"]) == sorted(str(path) for path in stale)


# -- the HTTP/1.1 client choice ----------------------------------------------------------------
async def test_the_lean_client_is_the_default_and_the_config_or_the_deprecated_variable_pick_another(monkeypatch):
    upstream = UpstreamSettings(name="canary", url="http://127.0.0.1:1")
    chosen = [make_transport(upstream), make_transport(UpstreamSettings(name="canary", url="http://127.0.0.1:1", client="aiohttp"))]
    monkeypatch.setenv("CANARY_HTTP1_CLIENT", "aiohttp")
    chosen.append(make_transport(upstream))
    assert [type(t) for t in chosen] == [Http1Transport, AiohttpTransport, AiohttpTransport]
    for transport in chosen:
        await transport.close()
    monkeypatch.setenv("CANARY_HTTP1_CLIENT", "fast")
    with pytest.raises(ValueError, match="use one of lean, aiohttp"):
        make_transport(upstream)


async def test_serve_warns_that_the_client_variable_is_deprecated_and_refuses_a_bad_one(upstreams, tmp_path):
    from tests.serve_process import ServeProcess

    config = hardened_config(tmp_path / "c.yaml", upstreams)
    proxy = await ServeProcess(config, env={"CANARY_HTTP1_CLIENT": "aiohttp"}).start()
    try:
        warning = await proxy.wait_for_event("deprecated_environment")
        assert warning["variable"] == "CANARY_HTTP1_CLIENT"
    finally:
        await proxy.kill()
    result = await run_cli("serve", "-c", str(config), env={"CANARY_HTTP1_CLIENT": "fast"})
    assert result.code == 2 and "CANARY_HTTP1_CLIENT='fast'" in result.err


