"""The admin listener: the JSON API for status and the control actions, Prometheus metrics
and the dashboard page with its static assets (`static/`).

`app` builds the aiohttp application over a running server; `metrics` turns the outcome
recorder and the rollout state into Prometheus families at scrape time.
"""
