"""`workers: N | auto` in the file and `canary serve --workers N` on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.errors import ConfigError
from config.loader import format_problems, load_settings
from config.workers import cpu_count
from tests.admin_support import run_cli

UPSTREAMS = """upstreams:
  baseline: {url: "http://127.0.0.1:9001"}
  canary: {url: "http://127.0.0.1:9002"}
"""


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None):
    path = tmp_path / "canary.yaml"
    path.write_text(text + UPSTREAMS)
    return load_settings(path, env=env or {})


def test_one_worker_by_default_auto_is_one_per_core(tmp_path):
    assert load(tmp_path, "").workers == 1
    assert load(tmp_path, "workers: auto\n").workers == cpu_count()
    assert load(tmp_path, "workers: 3\n").workers == 3
    assert load(tmp_path, "workers: ${W}\n", env={"W": "auto"}).workers == cpu_count()


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "many", "257", "true"])
def test_a_bad_worker_count_names_the_key_and_what_it_takes(tmp_path, value):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f"workers: {value}\n")
    text = format_problems(caught.value)
    assert ':1: workers: expected a number of processes from 1 to 256 or "auto"' in text, text


async def test_serve_refuses_a_bad_workers_flag_with_a_usage_error(tmp_path):
    path = tmp_path / "canary.yaml"
    path.write_text(UPSTREAMS)
    result = await run_cli("serve", "-c", str(path), "--workers", "none")
    assert result.code == 2
    assert 'expected a number of processes from 1 to 256 or "auto"' in result.err
