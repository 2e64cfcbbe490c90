"""The admin listener of a real `canary serve`: reads, token checks, control actions, bad bodies."""

from __future__ import annotations

import stat
from datetime import datetime

import aiohttp

from tests.admin_support import TOKEN, Traffic, admin_get, admin_post
from tests.admin_support import control_config

POSTS = ("/promote", "/pause", "/resume", "/rollback", "/reset", "/weight")


async def test_status_history_healthz_dashboard_and_series(canary):
    proxy = await canary()
    async with Traffic(proxy.proxy_url) as traffic:
        await traffic.wait_for(50)
    status = await admin_get(proxy, "/status")
    assert (status["state"], status["weight"], status["stage"], status["stages"]) == ("progressing", 5, 1, [5, 25, 50, 100])
    for arm in ("baseline", "canary"):
        assert set(status["arms"][arm]) >= {"requests", "errors", "error_rate", "p50", "p95", "p99"}
    assert status["arms"]["baseline"]["requests"] + status["arms"]["canary"]["requests"] >= 70
    assert status["verdict"]["level"] == "insufficient_data" and status["verdict"]["reasons"]
    assert status["config"]["path"] == str(proxy.config) and status["config"]["error"] is None
    assert datetime.fromisoformat(status["config"]["loaded_at"]).tzinfo is not None
    assert [h["action"] for h in status["history"]] == ["start"]

    history = await admin_get(proxy, "/history")
    assert history[-1]["action"] == "start" and history[-1]["weight"] == 5
    assert set(history[-1]) >= {"at", "action", "trigger", "from_weight", "weight", "state", "reason", "evidence"}
    series = await admin_get(proxy, "/series")
    assert set(series) >= {"t", "weight", "baseline", "canary"}
    assert (await admin_get(proxy, "/healthz"))["status"] == "ok"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.admin_url}/") as page:
            assert page.status == 200 and "canary-proxy" in await page.text()
            assert "default-src 'self'" in page.headers["Content-Security-Policy"]
        async with session.get(f"{proxy.admin_url}/static/dashboard.js") as script:
            assert script.status == 200


async def test_every_post_needs_the_token(canary):
    proxy = await canary()
    for path in POSTS:
        body = {"percent": 50} if path == "/weight" else {}
        for token in (None, "wrong-token", TOKEN + "x", ""):
            code, answer = await admin_post(proxy, path, body, token=token)
            assert code == 401, (path, token)
            assert "admin token" in answer["error"]
    async with aiohttp.ClientSession() as session:  # right token, wrong scheme
        async with session.post(f"{proxy.admin_url}/rollback", headers={"Authorization": f"Basic {TOKEN}"}) as resp:
            assert resp.status == 401
    status = await admin_get(proxy, "/status")
    assert (status["state"], status["weight"], len(status["history"])) == ("progressing", 5, 1)


async def test_control_actions_answer_the_new_status(canary):
    proxy = await canary()
    steps = [
        ("/pause", {"reason": "looking at logs"}, ("paused", 5)),
        ("/resume", {}, ("progressing", 5)),
        ("/promote", {"reason": "looks good"}, ("progressing", 25)),
        ("/weight", {"percent": 40, "reason": "hand pin"}, ("manual", 40)),
        ("/rollback", {"reason": "bad canary"}, ("rolled_back", 0)),
        ("/reset", None, ("progressing", 5)),
    ]
    for path, body, (state, weight) in steps:
        code, answer = await admin_post(proxy, path, body)
        assert code == 200, answer
        assert (answer["state"], answer["weight"]) == (state, weight), path
        assert answer["config"]["path"] == str(proxy.config)
    history = await admin_get(proxy, "/history")
    assert [h["action"] for h in history] == ["start", "pause", "resume", "promote", "set_weight", "rollback", "reset"]
    assert all(h["trigger"] == "operator" for h in history[1:])
    assert history[5]["reason"] == "bad canary" and history[5]["weight"] == 0
    assert (await admin_get(proxy, "/status"))["state"] == "progressing"


async def test_bad_bodies_get_a_400_naming_the_problem(canary):
    proxy = await canary()
    cases = [
        ("/rollback", b"{not json", "not valid JSON"),
        ("/rollback", b"[1, 2]", "JSON object"),
        ("/pause", b'{"reason": 5}', "reason"),
        ("/promote", b'{"percent": 5}', "unknown field(s) percent"),
        ("/weight", b"{}", "percent: required"),
        ("/weight", b'{"percent": 101}', "percent"),
        ("/weight", b'{"percent": "50"}', "percent"),
        ("/weight", b'{"percent": 12.5}', "percent"),
        ("/weight", b'{"percent": true}', "percent"),
    ]
    for path, raw, named in cases:
        code, answer = await admin_post(proxy, path, raw=raw)
        assert code == 400, (path, raw, answer)
        assert named in answer["error"], (raw, answer)
    code, answer = await admin_post(proxy, "/rollback", raw=b'{"reason": "' + b"x" * 20_000 + b'"}')
    assert code == 413 and answer["error"]
    status = await admin_get(proxy, "/status")
    assert (status["state"], status["weight"]) == ("progressing", 5)


async def test_without_a_configured_token_serve_writes_one_for_the_cli(canary, tmp_path, upstreams):
    proxy = await canary(control_config(tmp_path / "canary.yaml", upstreams, token=None))
    token_file = tmp_path / "var" / "admin.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert (await admin_post(proxy, "/pause", {}, token=TOKEN))[0] == 401
    code, answer = await admin_post(proxy, "/pause", {}, token=token)
    assert code == 200 and answer["state"] == "paused"
