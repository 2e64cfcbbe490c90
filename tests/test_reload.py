"""Hot reload of a real `canary serve`: valid edits apply under load within 2 s, invalid ones
are rejected and reported while the last good config keeps serving, SIGHUP reloads at once."""

from __future__ import annotations

import asyncio
import os
import signal

from tests.admin_support import Traffic, admin_get, admin_post, edit, run_cli, stays, until_status, upstream_url
from tests.serve_process import write_config


def rejected(proxy, after: int) -> list[dict]:
    return [e for e in proxy.events[after:] if e.get("event") == "config_rejected"]


async def test_weight_edit_applies_within_2s_under_load_without_a_failed_request(canary, upstreams):
    proxy = await canary(weight=0)
    async with Traffic(proxy.proxy_url, read_arm_from_body=True) as traffic:
        assert set(traffic.arms_since(0)) == {"baseline"}
        loop = asyncio.get_running_loop()
        edited_at = loop.time()
        edit(proxy.config, "weight: 0", "weight: 100")
        status = await until_status(proxy, lambda s: s["weight"] == 100, timeout=2.0)
        assert loop.time() - edited_at < 2.0
        assert status["state"] == "manual" and status["config"]["error"] is None
        applied = len(traffic.results)
        await traffic.wait_for(100)
        assert set(traffic.arms_since(applied + traffic.workers)) == {"canary"}

        # A changed upstream gets a new client; requests on the old one finish first.
        edit(proxy.config, upstream_url(upstreams["canary"]), upstream_url(upstreams["baseline"]))
        await until_status(proxy, lambda s: s["config"]["reloads"]["ok"] == 2, timeout=2.0)
        switched = len(traffic.results)
        await traffic.wait_for(100)
        assert set(traffic.arms_since(switched + traffic.workers)) == {"baseline"}
    assert not traffic.failures and set(traffic.statuses()) == {200}, traffic.statuses()
    history = await admin_get(proxy, "/history")
    actions = [(t["action"], t["trigger"], t["weight"]) for t in history]
    # the weight edit is an operator action by config; the upstream edit is a plain reload
    assert actions[-2:] == [("set_weight", "config", 100), ("reload", "config", 100)]
    assert any(e.get("event") == "config_reloaded" for e in proxy.events)


async def test_broken_edits_are_rejected_and_reported_while_the_old_weight_serves(canary):
    proxy = await canary(weight=100)
    config = proxy.config
    good = config.read_text()
    async with Traffic(proxy.proxy_url) as traffic:
        await reject_a_bad_value_as_validate_reports_it(proxy)
        edit(config, "rollout:\n", "rollout: [\n")  # bad YAML
        await until_status(proxy, lambda s: s["config"]["reloads"]["rejected"] == 2, timeout=2.0)
        await reject_a_half_written_file(proxy, good)

        # Briefly missing (an editor's delete-and-recreate) is not a change at all.
        config.unlink()
        before = len(traffic.results)
        await stays(lambda: not config.exists(), 0.6)
        await traffic.wait_for(20)
        assert set(traffic.arms_since(before)) == {"canary"}
        status = await until_status(proxy, lambda s: True)
        assert (status["weight"], status["config"]["reloads"]["rejected"]) == (100, 4)

        # Fixed: accepted, the error clears, the new weight serves.
        write_config(config, good.replace("weight: 100", "weight: 0"))
        status = await until_status(proxy, lambda s: s["weight"] == 0, timeout=2.0)
        assert status["config"]["error"] is None and status["config"]["reloads"]["ok"] == 1
        fixed = len(traffic.results)
        await traffic.wait_for(60)
        assert set(traffic.arms_since(fixed + traffic.workers)) == {"baseline"}
    assert not traffic.failures and set(traffic.statuses()) == {200}
    assert len(rejected(proxy, 0)) == 4


async def reject_a_bad_value_as_validate_reports_it(proxy) -> None:
    seen = len(proxy.events)
    edit(proxy.config, "weight: 100", "weight: 150")
    status = await until_status(proxy, lambda s: s["config"]["error"] is not None, timeout=2.0)
    validate = await run_cli("validate", "-c", str(proxy.config))
    assert validate.code == 2 and status["config"]["error"] == validate.out.strip()
    assert "rollout.weight" in status["config"]["error"] and status["weight"] == 100
    await proxy.wait_for_event("config_rejected", after=seen)
    assert "\n".join(rejected(proxy, seen)[0]["problems"]) == status["config"]["error"]


async def reject_a_half_written_file(proxy, good: str) -> None:
    """A file still being written is rejected; once complete it is read again."""
    with open(proxy.config, "w") as half:
        half.write(good[: good.index("canary:")])
        half.flush()
        status = await until_status(proxy, lambda s: s["config"]["reloads"]["rejected"] == 3, timeout=2.0)
        assert "upstreams.canary" in status["config"]["error"] and status["weight"] == 100
        half.write(good[good.index("canary:"):].replace("weight: 100", "weight: 150"))
    await until_status(proxy, lambda s: s["config"]["reloads"]["rejected"] == 4, timeout=2.0)


async def test_an_unrelated_edit_after_a_rollback_leaves_it_rolled_back(canary):
    proxy = await canary(weight=50)
    code, status = await admin_post(proxy, "/rollback", {"reason": "operator saw errors"})
    assert code == 200 and status["state"] == "rolled_back"
    edit(proxy.config, "window: 60s", "window: 30s")
    status = await until_status(proxy, lambda s: s["config"]["reloads"]["ok"] == 1, timeout=2.0)
    assert (status["state"], status["weight"]) == ("rolled_back", 0)
    last = status["history"][-1]
    assert (last["action"], last["trigger"], last["state"], last["weight"]) == ("reload", "config", "rolled_back", 0)
    assert status["history"][-2]["action"] == "rollback"
    # A changed weight is an operator action, so it does leave the rollback.
    edit(proxy.config, "weight: 50", "weight: 30")
    status = await until_status(proxy, lambda s: s["config"]["reloads"]["ok"] == 2, timeout=2.0)
    assert (status["state"], status["weight"]) == ("manual", 30)


async def test_sighup_reloads_at_once(canary):
    proxy = await canary(weight=30)
    config = proxy.config
    before = os.stat(config)
    text = config.read_text().replace("weight: 30", "weight: 70")
    with open(config, "r+") as same_file:  # same inode, size and mtime: the poll sees nothing
        same_file.write(text)
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
    proxy.proc.send_signal(signal.SIGHUP)
    status = await until_status(proxy, lambda s: s["weight"] == 70, timeout=1.0)
    assert status["state"] == "manual" and status["config"]["error"] is None
