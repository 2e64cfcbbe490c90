"""`canary status|promote|pause|resume|rollback|reset|set-weight` as child processes against a
real `canary serve`, and with the proxy stopped; scripts/toggle_async.sh."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.admin_support import TOKEN, Traffic, admin_get, control_config, free_port, run_cli, until_status
from tests.serve_process import write_config


async def test_status_prints_a_readable_summary_and_json(canary):
    proxy = await canary()
    async with Traffic(proxy.proxy_url) as traffic:
        await traffic.wait_for(60)
    async with aiohttp.ClientSession() as client:  # the canary sure to have figures (5 < 20: no verdict)
        for _ in range(5):
            async with client.get(f"{proxy.proxy_url}/work", headers={"X-Canary": "canary"}) as resp:
                assert resp.status == 200
    readable = await run_cli("status", "-c", str(proxy.config), "--admin", proxy.admin_url)
    assert readable.code == 0, readable.err
    text = readable.out
    assert "PROGRESSING" in text and "weight 5% (stage 1 of 4)" in text
    for line_start in ("baseline", "canary"):
        assert any(line.startswith(line_start) and "%" in line for line in text.splitlines()), text
    assert "error rate" in text and "p95" in text and "p99" in text
    assert "verdict  INSUFFICIENT DATA" in text and "score/boundary" in text and "anytime CI" in text
    assert "last transitions" in text and "first start: stage 1 at 5%" in text

    as_json = await run_cli("status", "--json", "--admin", proxy.admin_url)
    assert as_json.code == 0
    status = json.loads(as_json.out)
    assert status["state"] == "progressing" and status["arms"]["canary"]["requests"] >= 1


async def test_control_commands_change_the_running_rollout(canary):
    proxy = await canary()
    args = ("-c", str(proxy.config), "--admin", proxy.admin_url)
    steps = [
        (("pause",), ("paused", 5)),
        (("resume",), ("progressing", 5)),
        (("promote",), ("progressing", 25)),
        (("set-weight", "60"), ("manual", 60)),
        (("rollback", "--reason", "latency regression"), ("rolled_back", 0)),
        (("reset",), ("progressing", 5)),
    ]
    for command, (state, weight) in steps:
        result = await run_cli(*command, *args)
        assert result.code == 0, result.err
        assert f"state {state}, weight {weight}%" in result.out
        status = await admin_get(proxy, "/status")
        assert (status["state"], status["weight"]) == (state, weight), command
    rollback = [h for h in await admin_get(proxy, "/history") if h["action"] == "rollback"]
    assert rollback[0]["reason"] == "latency regression" and rollback[0]["trigger"] == "operator"


async def test_finds_the_listener_and_token_file_from_the_config_or_env(canary, tmp_path, upstreams):
    config = control_config(tmp_path / "canary.yaml", upstreams, token=None, admin_port=free_port())
    proxy = await canary(config)
    by_flag = await run_cli("pause", "-c", str(config))
    assert by_flag.code == 0, by_flag.err
    by_env = await run_cli("resume", env={"CANARY_CONFIG": str(config)})
    assert by_env.code == 0, by_env.err
    token = (tmp_path / "var" / "admin.token").read_text().strip()
    env = {"CANARY_ADMIN_URL": proxy.admin_url, "CANARY_ADMIN_TOKEN": token}
    assert (await run_cli("set-weight", "30", env=env)).code == 0
    assert (await admin_get(proxy, "/status"))["weight"] == 30


async def test_wrong_token_usage_and_config_errors(canary, tmp_path):
    proxy = await canary()
    broken = tmp_path / "broken.yaml"
    broken.write_text("admin: {listen: 12}\n")
    wrong, missing, nowhere, bad_percent, invalid = await asyncio.gather(
        run_cli("promote", env={"CANARY_ADMIN_URL": proxy.admin_url, "CANARY_ADMIN_TOKEN": "nope"}),
        run_cli("promote", "--admin", proxy.admin_url),
        run_cli("status"),
        run_cli("set-weight", "101", "--admin", proxy.admin_url),
        run_cli("status", "-c", str(broken)),
    )
    assert wrong.code == 1 and "rejected the token from CANARY_ADMIN_TOKEN" in wrong.err
    assert missing.code == 1 and "needs a token" in missing.err
    assert nowhere.code == 2 and "pass -c FILE" in nowhere.err
    assert bad_percent.code == 2 and "0..100" in bad_percent.err
    assert invalid.code == 2 and f"{broken}:1: admin.listen" in invalid.err
    for result in (wrong, missing, nowhere, bad_percent, invalid):
        assert "Traceback" not in result.err
    assert (await admin_get(proxy, "/status"))["weight"] == 5


async def test_with_the_proxy_down_rollback_is_recorded_and_the_next_start_obeys(canary, tmp_path, upstreams):
    config = control_config(tmp_path / "canary.yaml", upstreams, weight=50, admin_port=free_port())
    proxy = await canary(config)
    assert (await admin_get(proxy, "/status"))["weight"] == 50
    assert await proxy.stop() == 0

    commands = (("status",), ("promote",), ("set-weight", "10"))
    for down in await asyncio.gather(*(run_cli(*command, "-c", str(config)) for command in commands)):
        assert down.code == 1 and "cannot reach the admin listener" in down.err and "Traceback" not in down.err
    result = await run_cli("rollback", "-c", str(config), "--reason", "pager: 5xx spike")
    assert result.code == 0, result.err
    assert "proxy not reachable" in result.out and "rollback recorded" in result.out

    restarted = await canary(config)
    status = await admin_get(restarted, "/status")
    assert (status["state"], status["weight"]) == ("rolled_back", 0)
    assert status["history"][-1]["reason"] == "pager: 5xx spike"
    async with Traffic(restarted.proxy_url) as traffic:
        await traffic.wait_for(30)
    assert set(traffic.arms_since(0)) == {"baseline"}


async def test_offline_rollback_is_safe_next_to_a_running_proxy(canary):
    """admin.listen port 0 cannot be asked, so the rollback goes to the locked state store;
    the running proxy adopts it on its next tick (no lost update)."""
    proxy = await canary(weight=50)
    result = await run_cli("rollback", "-c", str(proxy.config), "--reason", "from the store")
    assert result.code == 0, result.err
    assert "admin.listen has port 0" in result.out and "rollback recorded" in result.out
    status = await until_status(proxy, lambda s: s["state"] == "rolled_back", 5)
    assert status["weight"] == 0 and status["history"][-1]["reason"] == "from the store"
    other = await run_cli("status", "-c", str(proxy.config))
    assert other.code == 2 and "--admin URL" in other.err


async def test_toggle_script_wraps_resume_rollback_status(canary):
    proxy = await canary()
    env = {"CANARY_ADMIN_URL": proxy.admin_url, "CANARY_ADMIN_TOKEN": TOKEN}
    disable = await run_cli("scripts/toggle_async.sh", "disable", env=env)
    assert disable.code == 0, disable.err
    assert (await admin_get(proxy, "/status"))["state"] == "rolled_back"
    status = await run_cli("scripts/toggle_async.sh", "status", env=env)
    assert status.code == 0 and "ROLLED_BACK" in status.out
    enable = await run_cli("scripts/toggle_async.sh", "enable", env=env)
    assert enable.code == 0, enable.err
    assert (await admin_get(proxy, "/status"))["state"] == "progressing"
    usage = await run_cli("scripts/toggle_async.sh", "sideways", env=env)
    assert usage.code == 2 and "enable|disable|status" in usage.err



async def test_rollback_works_while_the_config_has_a_broken_edit(canary, tmp_path, upstreams):
    config = control_config(tmp_path / "canary.yaml", upstreams, weight=50, admin_port=free_port())
    proxy = await canary(config)
    write_config(config, config.read_text().replace("bake: 1h", "bake: soon"))  # the running proxy rejects it
    await until_status(proxy, lambda s: s["config"]["error"] is not None, 5)
    result = await run_cli("rollback", "-c", str(config), "--reason", "broken edit, bad canary")
    assert result.code == 0, result.err
    assert "config" in result.err and "rollout.bake" in result.err  # warned, not refused
    status = await admin_get(proxy, "/status")
    assert (status["state"], status["weight"]) == ("rolled_back", 0)


async def test_pointing_at_the_wrong_listener_or_a_bad_url_is_a_clear_error(canary):
    proxy = await canary()
    wrong, bad, timeout = await asyncio.gather(
        run_cli("status", "--admin", proxy.proxy_url),
        run_cli("status", "--admin", "http://[bad"),
        run_cli("status", "--admin", proxy.admin_url, "--timeout", "-1"),
    )
    assert wrong.code == 1 and "is that the admin listener" in wrong.err
    assert bad.code == 2 and "invalid admin URL" in bad.err
    assert timeout.code == 2 and "seconds" in timeout.err
    for result in (wrong, bad, timeout):
        assert "Traceback" not in result.err
