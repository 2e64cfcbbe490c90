"""The `canary` command line: a thin edge that parses arguments and calls into the rest.

`main` holds the parser and `serve` / `validate`; `control` the commands that talk to the
admin API (status, promote, pause, resume, rollback, reset, set-weight) and the offline
rollback; `status` renders a status document for people.
"""
