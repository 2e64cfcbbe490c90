"""The config: parse, validate and watch the YAML file; the error hierarchy.

    settings   immutable values a valid file means
    loader     YAML -> Settings, every problem as FILE:LINE: key: message
    schema     the node reader behind the loader
    durations  "100ms" / "10m" <-> seconds
    watch      notice an edited file; what /status says of it
    errors     every exception canary-proxy raises, rooted in CanaryError

The bottom layer: it imports nothing from `proxy` or `rollout`.
"""
