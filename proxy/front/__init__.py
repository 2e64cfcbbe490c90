"""The request path: the proxy listener, routing, header rewriting and the server's lifecycle.

A client's request enters `forward` (aiohttp's low-level server), `routing` picks its arm,
`headers` rewrites hop-by-hop and forwarding headers, and the answer streams back through
the arm's transport from `proxy.upstream`. `server` wires both listeners, the rollout tick,
hot reload, signals and drain for `canary serve`.
"""
