"""The benchmark's printed report: the tables and the issue-5 targets, met or missed."""

from __future__ import annotations

from typing import Any, Callable

from bench_load import Results, Row

__all__ = ["print_report"]

TARGET_RATIO = 0.30  # req/s per core through the proxy versus nginx split_clients
TARGET_ADDED_P50 = 250e-6
TARGET_KIB_PER_CONNECTION = 15.0
TARGET_ANALYSIS_COST = 0.05


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  " + "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _find(results: Results, prefix: str) -> Row | None:
    return next((row for row in results.rows if row.name.startswith(prefix)), None)


def _throughput(results: Results) -> str:
    direct, nginx = _find(results, "direct"), _find(results, "nginx")
    rows = []
    for row in results.rows:
        cpu = row.cpu_per_request
        rows.append([
            row.name, f"{row.load.rps:,.0f}", _ms(row.load.p50), _ms(row.load.p99),
            _us(cpu) if cpu else "-", f"{1 / cpu:,.0f}" if cpu else "-",
            f"{row.load.rps / nginx.load.rps:.2f}" if nginx else "-",
            f"{row.load.rps / direct.load.rps:.2f}" if direct else "-",
            _us(row.one_conn.p50),
            f"+{_us(row.one_conn.p50 - direct.one_conn.p50)}" if direct and row is not direct else "-",
            str(row.load.errors + row.one_conn.errors),
        ])
    header = ["", "req/s", "p50", "p99", "CPU/req", "req/s/core*", "× nginx", "× direct", "p50 @1 conn", "added", "errors"]
    return _table(header, rows) + "\n  * 1 / (the server's CPU time per request): its throughput with one whole core"


def _batches(results: Results) -> str:
    names = list(results.batches)
    sizes = sorted({n for figures in results.batches.values() for n in figures})
    rows = [
        [str(n), *(f"{results.batches[name][n][0]:.2f} s" + (f" ({results.batches[name][n][1]} err)" if results.batches[name][n][1] else "") for name in names)]
        for n in sizes
    ]
    return _table(["concurrent", *names], rows)


def _memory(results: Results) -> str:
    rows = [
        [client, str(int(m["errors"])), f"{m['seconds']:.2f} s", f"{m['rss_before_kib'] / 1024:.1f} MiB",
         f"{m['rss_peak_kib'] / 1024:.1f} MiB", f"{m['kib_per_connection']:.1f} KiB"]
        for client, m in results.memory.items()
    ]
    return _table(["client", "errors", "batch time", "RSS before", "RSS peak", "growth/connection"], rows)


def _analysis(results: Results) -> str:
    rows = []
    for client, a in results.analysis.items():
        rows.append([
            client, f"{a['on_rps']:,.0f}", f"{a['off_rps']:,.0f}", f"{(1 - a['on_rps'] / a['off_rps']) * 100:+.1f}%",
            f"{_us(a['on_cpu_per_request'])} / {_us(a['off_cpu_per_request'])}",
            f"{(1 - a['off_cpu_per_request'] / a['on_cpu_per_request']) * 100:+.1f}%",
        ])
    header = ["client", "on req/s", "off req/s", "cost by req/s", "CPU/req on / off", "cost by CPU"]
    return _table(header, rows)


def _verdicts(results: Results) -> str:
    nginx, direct = _find(results, "nginx"), _find(results, "direct")
    clients = list(results.analysis) or list(results.memory)
    checks: list[tuple[str, Callable[[str], tuple[str, bool] | None]]] = []

    def ratio(client: str) -> tuple[str, bool] | None:
        row = _find(results, f"canary-proxy, {client}")
        if not row or not nginx:
            return None
        value = row.load.rps / nginx.load.rps
        by_cpu = f", by CPU {nginx.cpu_per_request / row.cpu_per_request:.2f}×" if row.cpu_per_request and nginx.cpu_per_request else ""
        return f"{value:.2f}×{by_cpu}", value >= TARGET_RATIO

    def added(client: str) -> tuple[str, bool] | None:
        row = _find(results, f"canary-proxy, {client}")
        if not row or not direct:
            return None
        value = row.one_conn.p50 - direct.one_conn.p50
        return f"+{_us(value)}", value <= TARGET_ADDED_P50

    def memory(client: str) -> tuple[str, bool] | None:
        m = results.memory.get(client)
        if not m:
            return None
        ok = m["errors"] == 0 and m["kib_per_connection"] <= TARGET_KIB_PER_CONNECTION
        return f"{int(m['errors'])} errors, {m['kib_per_connection']:.1f} KiB", ok

    def analysis(client: str) -> tuple[str, bool] | None:
        a = results.analysis.get(client)
        if not a:
            return None
        by_rps = 1 - a["on_rps"] / a["off_rps"]
        by_cpu = 1 - a["off_cpu_per_request"] / a["on_cpu_per_request"]  # judged: steadier
        return f"{by_cpu * 100:+.1f}% by CPU, {by_rps * 100:+.1f}% by req/s", by_cpu < TARGET_ANALYSIS_COST

    checks = [
        (f"req/s per core ≥ {TARGET_RATIO:.2f}× nginx", ratio),
        (f"added p50 at 1 connection ≤ {_us(TARGET_ADDED_P50)}", added),
        (f"2,000 in flight: 0 errors, ≤ {TARGET_KIB_PER_CONNECTION:g} KiB/conn", memory),
        (f"analysis on vs off < {TARGET_ANALYSIS_COST:.0%}", analysis),
    ]
    rows = []
    for label, check in checks:
        cells = []
        for client in clients:
            got = check(client)
            cells.append("n/a" if got is None else f"{got[0]}  {'met' if got[1] else 'MISSED'}")
        rows.append([label, *cells])
    return _table(["target (issue 5)", *(f"{c} client" for c in clients)], rows)


def print_report(results: Results) -> None:
    m: dict[str, Any] = results.machine
    print(
        f"\ncanary-proxy benchmark: {m['cpus']} CPUs, Python {m['python']}, upstream {m['upstream']}, "
        f"load {m['load_generator']}, {m['connections']} connections, {m['duration']:g} s per server "
        f"in {m['rounds']} interleaved rounds (best round shown)\n"
        f"(proxies pinned to core 0; upstream, load generator and batch clients on core 1; "
        f"load average at start {m['load_average_at_start']})\n"
    )
    print(_throughput(results))
    if results.batches:
        print("\nConcurrency: N requests at once to an upstream that answers after 1 s (time for the batch)")
        print(_batches(results))
    if results.memory:
        print("\nMemory: 2,000 requests to a 2 s upstream in flight through the proxy")
        print(_memory(results))
    if results.analysis:
        print("\nAnalysis on (interval 1s) versus off (1d): one instance reloaded between alternating runs")
        print(_analysis(results))
    print()
    print(_verdicts(results))
