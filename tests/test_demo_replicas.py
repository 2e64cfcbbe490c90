"""`canary demo --replicas 3`: three proxies behind the traffic, one Redis, one rollout."""

from __future__ import annotations

import re
from pathlib import Path

from tests.admin_support import run_cli
from tests.test_demo import run_demo


async def test_three_replicas_roll_back_a_failing_canary_together(tmp_path: Path) -> None:
    code, out, err, _took = await run_demo(tmp_path, "--replicas", "3", "--canary-error-rate", "0.3")
    assert code == 0, err
    assert "Traceback" not in err
    assert re.search(r"^Result:\s+ROLLED BACK", out, re.MULTILINE), out
    assert "3 replicas sharing one Redis" in out and "backend: redis" in out
    replicas = re.findall(r"^  replica (\S+) +weight +(\d+)% +(\S+)( +decider)?$", out, re.MULTILINE)
    assert len({r[0] for r in replicas}) == 3, out
    assert {(weight, state) for _id, weight, state, _d in replicas} == {("0", "rolled_back")}
    assert sum(bool(r[3]) for r in replicas) == 1  # one decider


async def test_without_redis_server_the_demo_says_what_to_install(tmp_path: Path) -> None:
    result = await run_cli("demo", "--fast", "--replicas", "3", env={"PATH": str(tmp_path), "TMPDIR": str(tmp_path)})
    assert result.code == 1
    assert "--replicas needs redis-server" in result.err and "apt-get install redis-server" in result.err
    assert "Traceback" not in result.err
