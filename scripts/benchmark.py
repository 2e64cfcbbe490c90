"""Benchmark canary-proxy against the upstream itself and nginx, on this machine, in one run.

    python scripts/benchmark.py             # full run, ~2.5 minutes
    python scripts/benchmark.py --quick     # ~1 minute: 3 s per server, one round
    python scripts/benchmark.py --duration 15 --clients lean --json out.json
    python scripts/benchmark.py --workers-compare --clients lean   # --workers 1 vs 2 only
    python scripts/benchmark.py --fallback-compare --clients lean  # routing.fallback off vs on only
    python scripts/benchmark.py --protocols  # WebSockets (idle memory, echo) and TLS vs plain only

What runs (each server one process; proxies pinned to core 0, upstream and load to core 1):

* a fixed upstream: nginx returning a 12-byte body (a built-in asyncio server without nginx);
* 1. direct to it, 2. the real `canary serve` at weight 50 with analysis running (once per
  HTTP/1.1 client: the lean client, the default, and aiohttp's ClientSession),
  3. nginx as a reverse proxy with `split_clients` 50/50;
* the same load generator for all (wrk -t1 if installed, else a built-in async one):
  50 connections for throughput and p50/p99, 1 connection for the added latency;
* the concurrency table: 1/10/50/100 concurrent requests to a 1 s upstream, direct vs
  proxy (time for the batch); peak RSS of the proxy with 2,000 requests to a 2 s upstream
  in flight; throughput with analysis on versus off (one process, its config reloaded
  between analysis.interval 1s and 1d).

The servers are loaded in interleaved rounds and the best round of each is reported; each
row also shows the server's CPU time per request (from /proc): 1 / that is its throughput
per core when it has one, the steadier figure on a shared machine. See docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load import BODY, LoadResult, Results, Row, batch, have_wrk, wrk  # noqa: E402
from bench_report import print_report  # noqa: E402
from bench_servers import (  # noqa: E402
    Children, canary_command, canary_config, cpu_seconds, free_port, nginx_split_config,
    nginx_upstream_config, nginx_version, rss_kib,
)

__all__ = ["main"]

BATCH_SIZES = (1, 10, 50, 100)
ANALYSIS_ON, ANALYSIS_OFF = "1s", "1d"  # analysis.interval: judged every second / never in a run
SLOW_REQUESTS = 2000


@dataclass
class Target:
    """One server under load: its URL and the pid whose CPU time is counted."""

    name: str
    url: str
    pid: int
    runs: list[tuple[LoadResult, float | None]] = field(default_factory=list)
    single: list[LoadResult] = field(default_factory=list)
    config: tuple[str, dict[str, Any]] | None = None  # a canary instance's config name and settings


class Benchmark:
    def __init__(self, args: argparse.Namespace, children: Children, workdir: Path) -> None:
        self.args = args
        self.children = children
        self.dir = workdir
        two_cores = (os.cpu_count() or 1) >= 2
        self.proxy_core = 0 if two_cores else None
        self.load_core = 1 if two_cores else None
        self.results = Results()

    # -- load -------------------------------------------------------------------------
    def load(self, url: str, connections: int, seconds: float, body: int = 0) -> LoadResult:
        """`body`: POSTs with that many bytes (always the built-in generator)."""
        if have_wrk() and not self.args.builtin_load and not body:
            return wrk(url, connections, seconds, core=self.load_core)
        script = str(Path(__file__).with_name("bench_load.py"))
        command = [sys.executable, script, "load", url, str(connections), str(seconds), str(body)]
        if self.load_core is not None:
            command = ["taskset", "-c", str(self.load_core), *command]
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
        return LoadResult(**json.loads(out.strip().splitlines()[-1]))

    def load_rounds(self, targets: list[Target]) -> None:
        """Interleaved rounds: a burst of load elsewhere on the machine slows one round
        of every target alike, and the best round of each is reported."""
        rounds = self.args.rounds
        for target in targets:
            self.load(target.url, self.args.connections, 1)  # warm up
        for _ in range(rounds):
            for target in targets:
                before = cpu_seconds(target.pid)
                result = self.load(target.url, self.args.connections, self.args.duration / rounds)
                cpu = (cpu_seconds(target.pid) - before) / result.requests if result.requests else None
                target.runs.append((result, cpu))
        for _ in range(rounds):
            for target in targets:
                target.single.append(self.load(target.url, 1, max(1.0, self.args.duration / 2 / rounds)))
        for target in targets:
            self.results.rows.append(_row(target))

    # -- servers ----------------------------------------------------------------------
    def start_upstream(self) -> tuple[int, int, int]:
        """The fixed fast upstream (two ports: baseline, canary); returns its pid too."""
        ports = [free_port(), free_port()]
        if nginx_version() and not self.args.builtin_upstream:
            conf = nginx_upstream_config(self.dir, ports, BODY.decode())
            proc = self.children.start("nginx-upstream", ["nginx", "-p", str(self.dir), "-c", str(conf)], core=self.load_core)
            self.results.machine["upstream"] = f"nginx {nginx_version()}"
        else:
            proc = self.start_builtin(ports, "builtin-upstream")
            self.results.machine["upstream"] = "built-in asyncio server"
        self.children.wait_listening(proc, ports[1])
        return ports[0], ports[1], proc.pid

    def start_builtin(self, ports: list[int], name: str) -> subprocess.Popen[bytes]:
        script = str(Path(__file__).with_name("bench_load.py"))
        proc = self.children.start(name, [sys.executable, script, "upstream", *map(str, ports)], core=self.load_core)
        self.children.wait_listening(proc, ports[-1])
        return proc

    def start_canary(self, name: str, client: str, baseline: int, canary: int) -> Target:
        port = free_port()
        settings = dict(
            port=port, admin_port=free_port(), baseline=f"http://127.0.0.1:{baseline}",
            canary=f"http://127.0.0.1:{canary}", pool=SLOW_REQUESTS + 500, client=client,
        )
        conf = canary_config(self.dir, name, analysis_interval=ANALYSIS_ON, **settings)
        proc = self.children.start(name, canary_command(conf), core=self.proxy_core)
        self.children.wait_listening(proc, port)
        return Target(name, f"http://127.0.0.1:{port}/", proc.pid, config=(name, settings))

    def set_analysis(self, target: Target, interval: str, *, fallback: bool = False) -> None:
        """Rewrite the instance's config with another analysis interval (and routing.fallback
        on or off); SIGHUP reloads it."""
        assert target.config is not None
        name, settings = target.config
        canary_config(self.dir, name, analysis_interval=interval, fallback=fallback, **settings)
        os.kill(target.pid, signal.SIGHUP)
        time.sleep(0.3)

    def start_nginx_split(self, baseline: int, canary: int) -> Target:
        port = free_port()
        conf = nginx_split_config(self.dir, port, baseline, canary)
        proc = self.children.start("nginx-split", ["nginx", "-p", str(self.dir), "-c", str(conf)], core=self.proxy_core)
        self.children.wait_listening(proc, port)
        return Target("nginx split_clients 50/50", f"http://127.0.0.1:{port}/", proc.pid)

    # -- phases -----------------------------------------------------------------------
    def run(self) -> Results:
        baseline, canary, upstream_pid = self.start_upstream()
        targets = [Target("direct (the upstream itself)", f"http://127.0.0.1:{baseline}/", upstream_pid)]
        if nginx_version() and not self.args.no_nginx:
            targets.append(self.start_nginx_split(baseline, canary))
        proxies = {}
        for client in self.args.clients:
            proxies[client] = self.start_canary(f"canary-{client}", client, baseline, canary)
            proxies[client].name = f"canary-proxy, {client} client"
        _progress(f"{len(targets) + len(proxies)} servers up; {self.args.rounds} interleaved rounds of load")
        self.load_rounds([*targets, *proxies.values()])
        for row in self.results.rows:
            _progress(f"{row.name}: {row.load.rps:,.0f} req/s, 1-conn p50 {row.one_conn.p50 * 1e6:.0f} µs")
        for client, target in proxies.items():
            self.analysis_on_off(client, target)
            self.children.stop_pid(target.pid)
        self.slow_phase()
        return self.results

    def analysis_on_off(self, client: str, target: Target) -> None:
        """The same process with analysis judging every second (on) and once a day (off),
        alternating, so neither process layout nor drift in the machine's load decides."""
        runs: dict[str, list[tuple[LoadResult, float | None]]] = {ANALYSIS_ON: [], ANALYSIS_OFF: []}
        rounds = 2 * self.args.rounds  # short and many: the noise of a shared machine averages out
        for _ in range(rounds):
            for interval in (ANALYSIS_OFF, ANALYSIS_ON):
                self.set_analysis(target, interval)
                before = cpu_seconds(target.pid)
                result = self.load(target.url, self.args.connections, self.args.duration / rounds)
                runs[interval].append((result, (cpu_seconds(target.pid) - before) / max(1, result.requests)))
        best = {key: max(result.rps for result, _ in value) for key, value in runs.items()}
        cpu = {key: min(c for _, c in value if c is not None) for key, value in runs.items()}
        self.results.analysis[client] = {
            "on_rps": best[ANALYSIS_ON], "off_rps": best[ANALYSIS_OFF],
            "on_cpu_per_request": cpu[ANALYSIS_ON], "off_cpu_per_request": cpu[ANALYSIS_OFF],
        }
        _progress(f"analysis on/off ({client}): {best[ANALYSIS_ON]:,.0f} / {best[ANALYSIS_OFF]:,.0f} req/s")

    def slow_phase(self) -> None:
        ports = [free_port(), free_port()]
        self.start_builtin(ports, "slow-upstream")
        direct = f"http://127.0.0.1:{ports[0]}"
        self.results.batches["direct"] = {n: asyncio.run(batch(f"{direct}/sleep/1", n)) for n in BATCH_SIZES}
        for client in self.args.clients:
            target = self.start_canary(f"canary-{client}-slow", client, ports[0], ports[1])
            url = target.url.rstrip("/")
            self.results.batches[f"proxy, {client}"] = {n: asyncio.run(batch(f"{url}/sleep/1", n)) for n in BATCH_SIZES}
            memory = self.results.memory[client] = asyncio.run(_memory(url, target.pid))
            _progress(f"{SLOW_REQUESTS:,} slow requests ({client}): {memory['errors']:.0f} errors, {memory['kib_per_connection']:.1f} KiB each")
            self.children.stop_pid(target.pid)


async def _memory(url: str, pid: int) -> dict[str, float]:
    """Peak RSS growth of the proxy while SLOW_REQUESTS requests to a 2 s upstream are in flight."""
    await batch(f"{url}/", 200)  # warm: code paths, pools, buffers
    await asyncio.sleep(0.5)
    before = rss_kib(pid)
    peak = before
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    seconds, errors = await batch(f"{url}/sleep/2", SLOW_REQUESTS, timeout=30)
    done.set()
    await sampler
    return {
        "rss_before_kib": before, "rss_peak_kib": peak, "errors": errors, "seconds": seconds,
        "kib_per_connection": (peak - before) / SLOW_REQUESTS,
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _row(target: Target) -> Row:
    best = max(target.runs, key=lambda run: run[0].rps)[0]
    cpus = [cpu for _, cpu in target.runs if cpu]
    single = min(target.single, key=lambda result: result.p50)
    errors = sum(result.errors for result, _ in target.runs) + sum(result.errors for result in target.single)
    best = LoadResult(best.requests, best.seconds, best.rps, best.p50, best.p99, errors)
    return Row(target.name, best, single, min(cpus) if cpus else None, [run[0].rps for run in target.runs])


def _progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=9.0, help="seconds of load per server at --connections (default 9)")
    parser.add_argument("--quick", action="store_true", help="3 s per server, one round (~1 minute)")
    parser.add_argument("--connections", type=int, default=50, help="connections for throughput (default 50)")
    parser.add_argument("--clients", default="lean,aiohttp", help="HTTP/1.1 clients to run: lean,aiohttp")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported (default 3)")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx split_clients row")
    parser.add_argument("--builtin-upstream", action="store_true", help="use the built-in upstream even with nginx")
    parser.add_argument("--builtin-load", action="store_true", help="use the built-in load generator even with wrk")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--fallback-compare", action="store_true",
        help="only compare routing.fallback off with on when nothing fails (the first of --clients; ~1 minute)",
    )
    parser.add_argument(
        "--replicas", action="store_true",
        help="only the Redis figures: three replicas on one Redis — round trips per replica per second, "
        "broken canary to weight 0 everywhere, Redis SIGSTOPped 10 s (scripts/bench_replicas.py; ~1 minute)",
    )
    parser.add_argument(
        "--workers-compare", action="store_true",
        help="only compare `canary serve --workers 1` with `--workers 2` (the first of --clients; ~1 minute)",
    )
    parser.add_argument(
        "--protocols", action="store_true",
        help="only the WebSocket and TLS figures (scripts/bench_protocols.py; ~1 minute)",
    )
    parser.add_argument("--websockets", type=int, default=1000, help="idle WebSockets for --protocols (default 1000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replicas:
        from bench_replicas import main as replicas_main

        return replicas_main(["--json", str(args.json)] if args.json else [])
    if args.quick:
        args.duration, args.rounds = 3.0, 1
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    _raise_fd_limit()
    signal.signal(signal.SIGTERM, _interrupt)  # clean up the servers on SIGTERM too
    with tempfile.TemporaryDirectory(prefix="canary-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers run as another user
        children = Children(workdir)
        bench = Benchmark(args, children, workdir)
        if bench.load_core is not None:
            os.sched_setaffinity(0, {bench.load_core})  # the batch clients run in this process
        bench.results.machine.update(_machine(args))
        try:
            if args.workers_compare:
                return _workers_compare(bench, args)
            if args.fallback_compare:
                return _fallback_compare(bench, args)
            if args.protocols:
                return _protocols(bench, args)
            results = bench.run()
        except KeyboardInterrupt:
            print("interrupted; stopping the servers", file=sys.stderr)
            return 130
        finally:
            children.stop_all()
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(asdict(results), indent=2, default=str))
    return 0


def _workers_compare(bench: Benchmark, args: argparse.Namespace) -> int:
    """One worker against two (scripts/bench_workers.py); the load is not pinned."""
    from bench_workers import compare_workers, print_workers

    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    bench.load_core = None
    baseline, canary, _pid = bench.start_upstream()
    rows = compare_workers(
        bench.children, bench.dir, upstream=(baseline, canary), client=args.clients[0], load=bench.load,
        connections=args.connections, seconds=args.duration / args.rounds, rounds=args.rounds,
    )
    print(json.dumps(bench.results.machine))
    print_workers(rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": bench.results.machine, "workers": [asdict(r) for r in rows]}, indent=2))
    return 0


FALLBACK_BODY = 1024  # bytes of the POSTs: a chat request, kept in memory for a replay


def _fallback_compare(bench: Benchmark, args: argparse.Namespace) -> int:
    """The same `canary serve` (weight 50, nothing failing) with routing.fallback off and on,
    alternating by reload: GETs, and POSTs with a 1 KiB body (kept for a replay when on)."""
    baseline, canary, _pid = bench.start_upstream()
    target = bench.start_canary("canary-fallback", args.clients[0], baseline, canary)
    rounds, seconds = 2 * args.rounds, args.duration / args.rounds
    runs: dict[tuple[str, bool, int], list[LoadResult]] = {}
    for _ in range(rounds):
        for fallback in (False, True):
            bench.set_analysis(target, ANALYSIS_ON, fallback=fallback)
            for body in (0, FALLBACK_BODY):
                for kind, connections, span in (("load", args.connections, seconds), ("one", 1, max(1.0, seconds / 2))):
                    runs.setdefault((kind, fallback, body), []).append(bench.load(target.url, connections, span, body))
    rows = {}
    for body in (0, FALLBACK_BODY):
        request = f"POST {body} B" if body else "GET"
        for fallback in (False, True):
            best = max(runs[("load", fallback, body)], key=lambda r: r.rps)
            single = min(runs[("one", fallback, body)], key=lambda r: r.p50)
            rows[f"{request}, fallback {'on' if fallback else 'off'}"] = {
                "rps": round(best.rps), "p99_ms": round(best.p99 * 1e3, 2), "p50_1conn_us": round(single.p50 * 1e6),
                "errors": best.errors,
            }
    print(json.dumps(bench.results.machine))
    print(f"{'':28} {'req/s':>8} {'p99 ms':>8} {'p50 µs at 1 conn':>17}")
    for name, row in rows.items():
        print(f"{name:28} {row['rps']:>8,} {row['p99_ms']:>8} {row['p50_1conn_us']:>17}")
    if args.json:
        args.json.write_text(json.dumps({"machine": bench.results.machine, "fallback": rows}, indent=2))
    return 0


def _protocols(bench: Benchmark, args: argparse.Namespace) -> int:
    """WebSockets through the proxy (idle memory, echo rate) and TLS vs plain req/s."""
    from bench_protocols import measure_protocols, print_protocols

    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))  # the WebSocket clients run here
    baseline, _canary, _pid = bench.start_upstream()
    figures = measure_protocols(
        bench.children, bench.dir, proxy_core=bench.proxy_core, upstream_core=bench.load_core, load=bench.load,
        websockets=args.websockets, connections=args.connections, seconds=args.duration / args.rounds,
        http_upstream=baseline,
    )
    print(json.dumps(bench.results.machine))
    print_protocols(figures)
    if args.json:
        args.json.write_text(json.dumps({"machine": bench.results.machine, "protocols": asdict(figures)}, indent=2))
    return 0


def _machine(args: argparse.Namespace) -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "load_generator": "wrk -t1" if have_wrk() and not args.builtin_load else "built-in (asyncio)",
        "connections": args.connections,
        "duration": args.duration,
        "rounds": args.rounds,
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    sys.exit(main())
