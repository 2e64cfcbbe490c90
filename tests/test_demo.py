"""`canary demo`: both endings end to end (as a user runs it), and the simulated upstream."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.cli.main import main
from proxy.demo.traffic import iter_sse_data
from proxy.demo.upstream import UPSTREAM_STATS, UpstreamProfile, make_demo_upstream

ROOT = Path(__file__).resolve().parent.parent
QUICK = dict(first_token=(0.001, 0.002), per_token=(0.001, 0.002), tokens=(5, 8))


# -- the demo as a subprocess -------------------------------------------------------------------


class DemoProcess:
    """`python -m proxy demo ...` with its stdout read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, tmp_path: Path, *args: str) -> DemoProcess:
        """The demo's temp dir (config, state, logs) goes under `tmp_path`."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "100", "TMPDIR": str(tmp_path)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "demo", "--fast", "--seed", "1", *args,
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
            if not line:
                raise AssertionError(f"no line matching {pattern!r} in:\n" + "".join(self.lines))
            self.lines.append(line.decode())
            found = re.search(pattern, self.lines[-1])
            if found:
                return found

    async def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        assert self.proc.returncode is not None
        return self.proc.returncode, "".join(self.lines) + out.decode(), err.decode()


async def run_demo(tmp_path: Path, *args: str) -> tuple[int, str, str, float]:
    started = time.monotonic()
    demo = await DemoProcess.start(tmp_path, *args)
    code, out, err = await demo.finish()
    return code, out, err, time.monotonic() - started


def stored_state(out: str) -> dict:
    path = re.search(r"state\s+(\S+canary-state\.json)", out)
    assert path, out
    return json.loads(Path(path.group(1)).read_text())


def logged_events(out: str) -> list[dict]:
    path = re.search(r"logs\s+(\S+canary\.log)", out)
    assert path, out
    return [json.loads(line) for line in Path(path.group(1)).read_text().splitlines()]


async def test_demo_promotes_a_healthy_canary_to_100_percent(tmp_path: Path) -> None:
    code, out, err, _took = await run_demo(tmp_path)

    assert code == 0, err
    assert "Traceback" not in err
    assert re.search(r"^Result:\s+PROMOTED: the canary .* serves 100% of traffic", out, re.M), out
    for weight, then in ((5, "then promoted to 25%"), (25, "then promoted to 50%"), (50, "then promoted to 100%")):
        assert re.search(rf"^\s*(Stages:)?\s+{weight}% for +\d+\.\ds, {then}$", out, re.M), out
    assert re.search(r"^\s+100% for +\d+\.\ds, then the rollout completed$", out, re.M), out
    assert "\r" not in out  # not a terminal: plain progress lines
    assert re.search(r"^ +\d+\.\ds +25% \(2/4\) progressing \| baseline +\d+ ", out, re.M), out
    assert str(tmp_path) in out
    state = stored_state(out)["state"]
    assert (state["state"], state["weight"]) == ("promoted", 100)
    assert [e["action"] for e in logged_events(out) if e["event"] == "rollout_transition"] == [
        "start", "promote", "promote", "promote", "promote"
    ]


async def test_demo_rolls_back_a_failing_canary_and_says_why(tmp_path: Path) -> None:
    code, out, err, _took = await run_demo(tmp_path, "--canary-error-rate", "0.3")

    assert code == 0, err
    assert re.search(r"^Result:\s+ROLLED BACK", out, re.M), out
    why = re.search(r"canary error rate (\d+\.\d)% \((\d+)/(\d+), CI [^)]*\) past errors\.critical 10%", out)
    assert why, out
    assert 15 < float(why.group(1)) < 60 and int(why.group(3)) >= 20  # measured, above min_requests
    assert re.search(r"^Measured:\s+canary +\d+ requests at this stage, \d+ errors", out, re.M), out
    assert re.search(r"^Thresholds: errors warning 5% / critical 10%", out, re.M), out
    assert re.search(r"then rolled back to 0%$", out, re.M), out
    state = stored_state(out)["state"]
    assert (state["state"], state["weight"]) == ("rolled_back", 0)


async def test_demo_protect_rolls_back_a_broken_canary_while_clients_see_no_error(tmp_path: Path) -> None:
    code, out, err, _took = await run_demo(tmp_path, "--protect", "--canary-error-rate", "0.3")

    assert code == 0, err
    assert re.search(r"^Result:\s+ROLLED BACK", out, re.M), out
    assert re.search(r"^\s+0\.\ds START 0% -> 0% \(config, now shadow\)", out, re.M), out
    assert re.search(r"^Stages:\s+shadow for +\d+\.\ds, then rolled back to 0%$", out, re.M), out
    protected = re.search(
        r"^Protected:\s+errors seen by clients (\d+) vs errors the canary made (\d+) \((\d+) shadow copies sent",
        out, re.M,
    )
    assert protected, out
    client_errors, canary_errors, mirrored = map(int, protected.groups())
    assert client_errors == 0 and canary_errors >= 10 and mirrored >= 20
    assert re.search(r"served by baseline [\d,]+ \(0 failed\), canary 0 \(0 failed\)", out), out
    transitions = [e for e in logged_events(out) if e["event"] == "rollout_transition"]
    assert [(e["action"], e["state"]) for e in transitions] == [("start", "shadow"), ("rollback", "rolled_back")]


async def test_ctrl_c_stops_the_demo_cleanly(tmp_path: Path) -> None:
    demo = await DemoProcess.start(tmp_path)
    await demo.wait_for_line(r"START 0% -> 5%")
    demo.proc.send_signal(signal.SIGINT)
    code, out, err = await demo.finish(timeout=15)

    assert code == 130
    assert "Interrupted: everything is shut down." in out
    assert "Traceback" not in err and "Traceback" not in out


async def test_keep_running_leaves_the_proxy_and_admin_up_until_ctrl_c(tmp_path: Path) -> None:
    demo = await DemoProcess.start(tmp_path, "--canary-error-rate", "0.3", "--keep-running")
    proxy = (await demo.wait_for_line(r"proxy\s+(http://127\.0\.0\.1:\d+)/v1/chat")).group(1)
    admin = (await demo.wait_for_line(r"dashboard\s+(http://127\.0\.0\.1:\d+)/")).group(1)
    async with aiohttp.ClientSession() as session:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        async with session.post(f"{proxy}/v1/chat/completions", json=body, headers={"X-User-Id": "me"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Canary-Arm"] == "baseline"  # rolled back: weight 0
        async with session.get(f"{admin}/healthz") as resp:
            assert resp.status == 200
    demo.proc.send_signal(signal.SIGINT)
    code, out, err = await demo.finish(timeout=15)
    assert code == 0, err
    assert "Stopped." in out and "Traceback" not in err


def test_a_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--canary-error-rate", "1.5"])
    assert exit_info.value.code == 2
    assert "must be a share between 0 and 1" in capsys.readouterr().err


# -- the simulated upstream -----------------------------------------------------------------------


def chat(stream: bool, **extra: object) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


async def test_upstream_streams_openai_style_sse_events(aiohttp_client) -> None:
    profile = UpstreamProfile(
        flavour="async", model="demo", first_token=(0.0, 0.0), per_token=(0.02, 0.02), tokens=(8, 8)
    )
    client = await aiohttp_client(make_demo_upstream(profile))
    async with client.post("/v1/chat/completions", json=chat(True)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        arrivals, events = [], []
        async for data in iter_sse_data(resp.content):
            arrivals.append(time.monotonic())
            events.append(data)

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    words = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:-1]]
    assert len(words) == 8 and all(w.strip() for w in words)
    assert arrivals[-1] - arrivals[1] >= 0.1  # token by token, not one buffered body


async def test_upstream_sse_framing_is_exact(aiohttp_client) -> None:
    client = await aiohttp_client(make_demo_upstream(UpstreamProfile(flavour="async", model="demo", **QUICK)))
    resp = await client.post("/v1/chat/completions", json=chat(True))
    raw = await resp.read()
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    frames = raw.split(b"\n\n")[:-1]
    assert all(frame.startswith(b"data: ") and b"\n" not in frame for frame in frames)


async def test_upstream_answers_plain_json_and_lists_models(aiohttp_client) -> None:
    client = await aiohttp_client(make_demo_upstream(UpstreamProfile(flavour="legacy-sync", model="demo", **QUICK)))
    resp = await client.post("/v1/chat/completions", json=chat(False, max_tokens=3))
    body = await resp.json()
    assert resp.status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 3
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "demo"
    bad = await client.post("/v1/chat/completions", json={"stream": True})
    assert bad.status == 400 and (await bad.json())["error"]["type"] == "invalid_request_error"


async def test_failing_canary_answers_openai_style_errors(aiohttp_client) -> None:
    profile = UpstreamProfile(flavour="async", model="demo", error_rate=1.0, **QUICK)
    client = await aiohttp_client(make_demo_upstream(profile))
    for stream in (True, False):
        resp = await client.post("/v1/chat/completions", json=chat(stream), headers={"X-Request-Id": f"r{stream}"})
        assert resp.status in (500, 503)
        error = (await resp.json())["error"]
        assert error["type"] == "server_error" and error["message"]
    assert client.app[UPSTREAM_STATS].errors == 2


async def test_a_seed_and_request_id_fix_the_answer(aiohttp_client) -> None:
    answers = []
    for _ in range(2):
        client = await aiohttp_client(make_demo_upstream(UpstreamProfile(flavour="async", model="d", seed=7, **QUICK)))
        resp = await client.post("/v1/chat/completions", json=chat(False), headers={"X-Request-Id": "req-1"})
        answers.append((await resp.json())["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]


async def test_legacy_sync_upstream_queues_beyond_its_workers(aiohttp_client) -> None:
    profile = UpstreamProfile(
        flavour="legacy-sync", model="d", workers=2, first_token=(0.05, 0.05), per_token=(0, 0), tokens=(1, 1)
    )
    client = await aiohttp_client(make_demo_upstream(profile))
    started = time.monotonic()
    answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat(False)) for _ in range(4)))
    assert [a.status for a in answers] == [200] * 4
    assert time.monotonic() - started >= 0.1  # two rounds of two workers
    assert client.app[UPSTREAM_STATS].queued_peak == 2


async def test_demo_of_a_canary_at_8_percent_errors_never_promotes_it_and_shows_the_evidence(tmp_path: Path) -> None:
    code, out, err, _ = await run_demo(tmp_path, "--canary-error-rate", "0.08", "--time-limit", "20")

    assert code == 0, err
    assert "PROMOTED" not in out and "promoted to" not in out, out
    stepped = re.search(r"^Result:\s+STEPPED BACK and paused at 0%", out, re.M)
    waiting = re.search(r"^Result:\s+NOT FINISHED in time: state progressing at weight 5%", out, re.M)
    assert stepped or waiting, out
    assert re.search(r"canary error rate \d+\.\d% \(\d+/\d+, CI \d+\.\d%–\d+\.\d%\)", out), out
    assert re.search(r"^Measured:\s+canary +\d+ requests at this stage, \d+ errors", out, re.M), out


async def test_demo_of_a_canary_half_a_second_slower_is_caught_by_the_regression_test(tmp_path: Path) -> None:
    code, out, err, _ = await run_demo(tmp_path, "--canary-latency", "0.5", "--time-limit", "30")

    assert code == 0, err
    assert re.search(r"^Result:\s+STEPPED BACK and paused at 0% \(a warning signal\)", out, re.M), out
    assert re.search(r"^Why:\s+warning: canary latency regression: \d+\.\d% of canary requests", out, re.M), out
    assert "= max(1.5 x baseline p95" in out
