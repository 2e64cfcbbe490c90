"""canary-proxy's proxy side: moves bytes and records outcomes.

    front/     the request path: listener, routing, headers, forwarding; `canary serve`'s lifecycle
    upstream/  the transport interface and its clients (lean, aiohttp session, httpx HTTP/2), the pools
    admin/     the admin API, Prometheus metrics, the dashboard and its assets
    cli/       the `canary` command line and the status rendering
    demo/      `canary demo`: simulated upstreams, traffic, the live report
    logs       structlog set-up with redaction, shared by serve, the CLI and the demo

Decisions live in `rollout/`, the config in `config/`; dependencies point
proxy -> rollout -> config.
"""
