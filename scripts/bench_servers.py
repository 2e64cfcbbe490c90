"""The benchmark's child processes: upstreams, `canary serve`, nginx — pinned and reaped.

Every child is started through `Children`, pinned to one core (`sched_setaffinity`), and
asked by the kernel to die with the benchmark (`PR_SET_PDEATHSIG`), so neither Ctrl-C nor
a crash of the benchmark leaves a server behind; `Children.stop_all` ends them in order.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = [
    "Children",
    "canary_config",
    "cpu_seconds",
    "free_port",
    "nginx_split_config",
    "nginx_upstream_config",
    "nginx_version",
    "rss_kib",
]

REPO = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1


def _child_setup(core: int | None) -> None:
    """Runs in the child between fork and exec."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Children:
    """The processes this benchmark started; only these are ever signalled."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, command: Sequence[str], *, core: int | None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self._log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, env={**os.environ, **(env or {})}, preexec_fn=lambda: _child_setup(core),
        )
        log.close()
        proc.name = name  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    def wait_listening(self, proc: subprocess.Popen[bytes], port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.returncode}:\n{self.log_tail(proc)}")  # type: ignore[attr-defined]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{proc.name} is not listening on {port} after {timeout:g}s:\n{self.log_tail(proc)}")  # type: ignore[attr-defined]

    def log_tail(self, proc: subprocess.Popen[bytes], lines: int = 15) -> str:
        path = self._log_dir / f"{proc.name}.log"  # type: ignore[attr-defined]
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_pid(self, pid: int) -> None:
        for proc in list(self._procs):
            if proc.pid == pid:
                self.stop(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (nginx: master and worker)."""
    total = 0.0
    for one in [pid, *_proc_children(pid)]:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_kib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) if match else 0


def nginx_version() -> str | None:
    try:
        out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False).stderr
    except FileNotFoundError:
        return None
    match = re.search(r"nginx/(\S+)", out)
    return match.group(1) if match else None


_NGINX_HEAD = """worker_processes 1;
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}.err warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  default_type text/plain;
  client_body_temp_path {dir}/{name}_body;
  proxy_temp_path {dir}/{name}_proxy;
"""


def nginx_upstream_config(directory: Path, ports: Sequence[int], body: str) -> Path:
    """nginx as the fixed upstream: a tiny body from memory on each port."""
    listens = "".join(f"    listen 127.0.0.1:{port} backlog=4096;\n" for port in ports)
    text = _NGINX_HEAD.format(dir=directory, name="upstream") + (
        f"  server {{\n{listens}    location / {{ return 200 \"{body}\"; }}\n  }}\n}}\n"
    )
    path = directory / "nginx-upstream.conf"
    path.write_text(text)
    return path


def nginx_split_config(directory: Path, port: int, baseline: int, canary: int) -> Path:
    """nginx as the comparison proxy: `split_clients` 50/50, random per request (like
    canary-proxy without a sticky key), the same X-Forwarded-* and arm header."""
    text = _NGINX_HEAD.format(dir=directory, name="split") + f"""
  upstream baseline {{ server 127.0.0.1:{baseline}; keepalive 128; }}
  upstream canary {{ server 127.0.0.1:{canary}; keepalive 128; }}
  split_clients "${{request_id}}" $arm {{ 50% baseline; * canary; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://$arm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      add_header X-Canary-Arm $arm;
    }}
  }}
}}
"""
    path = directory / "nginx-split.conf"
    path.write_text(text)
    return path


def canary_config(
    directory: Path, name: str, *, port: int, admin_port: int, baseline: str, canary: str,
    analysis_interval: str, pool: int, client: str = "lean", fallback: bool = False,
) -> Path:
    """A real `canary serve` config: weight pinned at 50, analysis judging every interval,
    both arms on the HTTP/1.1 `client` (lean or aiohttp)."""
    upstream = (
        "{{url: \"{url}\", client: %s, timeout: {{connect: 5s, total: 30s}}, "
        "pool: {{max_connections: %d, max_keepalive: 256}}}}" % (client, pool)
    )
    text = f"""# written by scripts/benchmark.py
listen: "127.0.0.1:{port}"
drain_timeout: 5s
admin: {{listen: "127.0.0.1:{admin_port}", token: "benchmark"}}
upstreams:
  baseline: {upstream.format(url=baseline)}
  canary: {upstream.format(url=canary)}
rollout: {{weight: 50}}
routing: {{fallback: {{enabled: {str(fallback).lower()}}}}}
analysis: {{interval: {analysis_interval}}}
state: {{path: "{directory}/{name}-state.json"}}
logging: {{level: warning, format: json}}
"""
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


def canary_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "proxy", "serve", "-c", str(config)]
