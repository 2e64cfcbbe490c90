"""Control commands: status, promote, pause, resume, rollback, reset, set-weight.

They talk to the admin listener over HTTP (stdlib urllib, never through an HTTP proxy from
the environment). The listener and its token come from `--admin URL` / CANARY_ADMIN_URL
and CANARY_ADMIN_TOKEN, or from the config (`-c FILE` / CANARY_CONFIG): `admin.listen`,
`admin.token`, else the `admin.token` file `canary serve` wrote beside the state file.
With the proxy down, `rollback -c FILE` records the rollback in the state store instead.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from config.errors import AdminError, AdminUnreachable, CanaryError, ConfigError, StateError
from config.loader import load_settings
from config.settings import HostPort, Settings
from proxy.cli.status import format_status, format_summary

__all__ = ["AdminClient", "AdminTarget", "UsageError", "add_control_commands", "locate_admin"]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
_ACTIONS = {  # command -> (endpoint, help)
    "promote": ("promote", "go to the next stage now (skipping the bake)"),
    "pause": ("pause", "hold automatic promotion (analysis and automatic rollback keep running)"),
    "resume": ("resume", "release a pause / manual weight / rollback and continue the staged plan"),
    "rollback": ("rollback", "weight to 0 at once (works with the proxy down when given -c FILE)"),
    "reset": ("reset", "start the staged plan again from the first stage"),
    "set-weight": ("weight", "pin the canary weight by hand (state manual)"),
}


class UsageError(CanaryError):
    """Exit 2: the command line or the config does not say enough to act."""


@dataclass(frozen=True, kw_only=True)
class AdminTarget:
    url: str | None  # None: the config does not say (admin.listen port 0); see url_problem
    token: str | None
    token_source: str  # where the token came from, or why there is none (for messages)
    settings: Settings | None
    url_problem: str = ""


class AdminHTTPError(AdminError):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


# -- finding the admin listener ----------------------------------------------------------
def locate_admin(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> AdminTarget:
    url = args.admin or environ.get("CANARY_ADMIN_URL") or None
    settings = _load_config(args.config, have_url=url is not None)
    problem = ""
    if url is None:
        if settings is None:
            raise UsageError(
                "don't know where the admin listener is: pass -c FILE (or set CANARY_CONFIG), "
                "or --admin URL (or set CANARY_ADMIN_URL)"
            )
        url, problem = admin_url(settings.admin.listen, settings.source)
    token, source = _find_token(settings, environ)
    return AdminTarget(
        url=_normalize(url) if url else None, token=token, token_source=source, settings=settings, url_problem=problem
    )


def _load_config(path: str | None, *, have_url: bool) -> Settings | None:
    if not path:
        return None
    try:
        return load_settings(path)
    except ConfigError as exc:
        # A broken edit is exactly when an operator may need `rollback`: fall back to what
        # the file still says about the admin listener and the state store.
        settings = _admin_hints(path)
        if settings is None and not have_url:
            raise UsageError(f"{exc}\nfix the config, or pass --admin URL and set CANARY_ADMIN_TOKEN") from None
        print(f"warning: the config {path} is invalid; using only its admin and state keys:\n{exc}", file=sys.stderr)
        return settings


def _admin_hints(path: str) -> Settings | None:
    """`admin.*`, `state.path` and `rollout.weight` read leniently from an invalid config
    (the rest ignored); None when even those are broken."""
    from pathlib import Path

    import yaml

    from config.loader import parse_settings

    try:
        raw = yaml.safe_load(Path(path).read_text())
        keep = {key: raw[key] for key in ("admin", "state") if key in raw}
        weight = (raw.get("rollout") or {}).get("weight")
    except (OSError, yaml.YAMLError, TypeError, AttributeError):
        return None
    keep["upstreams"] = {arm: {"url": "http://127.0.0.1:1"} for arm in ("baseline", "canary")}
    for rollout in ({"weight": weight}, {}):
        try:
            return parse_settings(
                yaml.safe_dump({**keep, "rollout": rollout}), filename=path,
                base_dir=Path(path).resolve().parent, env=os.environ,
            )
        except ConfigError:
            continue
    return None


def admin_url(listen: HostPort, source: object = None) -> tuple[str | None, str]:
    """The URL to reach `admin.listen` from this machine (a wildcard bind means loopback),
    or None and why not."""
    if listen.port == 0:
        return None, (
            f"{source}: admin.listen has port 0 (picked at start-up): pass --admin URL with "
            f"the port from the `serving` log line"
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    return f"http://{HostPort(host=host, port=listen.port)}", ""


def _find_token(settings: Settings | None, environ: Mapping[str, str]) -> tuple[str | None, str]:
    if environ.get("CANARY_ADMIN_TOKEN"):
        return environ["CANARY_ADMIN_TOKEN"], "CANARY_ADMIN_TOKEN"
    if settings is None:
        return None, "no token: set CANARY_ADMIN_TOKEN or pass -c FILE"
    if settings.admin.token:
        return settings.admin.token, f"admin.token in {settings.source}"
    from proxy.front.server import token_path

    path = token_path(settings)
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        return None, f"no admin.token in the config and no token file {path} (has `canary serve` run?)"
    except OSError as exc:
        return None, f"cannot read the token file {path} ({exc.strerror}): run as the user of `canary serve` or set CANARY_ADMIN_TOKEN"
    return token or None, f"the token file {path}"


def _normalize(url: str) -> str:
    if "://" not in url:
        url = f"http://{url}"
    return url.rstrip("/")


# -- talking to it ---------------------------------------------------------------------
class AdminClient:
    def __init__(self, target: AdminTarget, *, timeout: float = 10.0) -> None:
        assert target.url is not None, target.url_problem
        self.target = target
        self.url = target.url
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str) -> Any:
        return self._request("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        url = f"{self.url}{path}"
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
            if self.target.token:
                headers["Authorization"] = f"Bearer {self.target.token}"
        try:
            request = urllib.request.Request(url, data=data, method=method, headers=headers)
        except ValueError as exc:
            raise UsageError(f"invalid admin URL {self.url!r}: {exc}") from None
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AdminHTTPError(exc.code, self._explain(exc)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminUnreachable(
                f"cannot reach the admin listener at {self.url} ({reason}): is `canary serve` running?"
            ) from None
        except ValueError as exc:
            raise AdminError(f"{url} did not answer JSON ({exc}): is that the admin listener?") from None

    def _explain(self, exc: urllib.error.HTTPError) -> str:
        try:
            message = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError, OSError):
            message = ""
        if exc.code == 401:
            if not self.target.token:
                return f"the admin listener needs a token; {self.target.token_source}"
            return f"the admin listener rejected the token from {self.target.token_source} (401)"
        return f"{exc.code} from {exc.url}: {message or exc.reason}"


# -- the commands ------------------------------------------------------------------------
def _run(args: argparse.Namespace, body: Callable[[AdminClient], int]) -> int:
    try:
        target = locate_admin(args)
    except UsageError as exc:
        print(f"canary {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if target.url is None:
        if args.command == "rollback":  # the store still takes it; a running proxy adopts it
            return _offline_rollback(target, args.reason, "admin.listen has port 0, so no proxy can be asked")
        print(f"canary {args.command}: {target.url_problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return body(AdminClient(target, timeout=args.timeout))
    except UsageError as exc:
        print(f"canary {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AdminHTTPError as exc:
        print(f"canary {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.status == 400 else EXIT_RUNTIME
    except AdminError as exc:
        print(f"canary {args.command}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


def cmd_status(args: argparse.Namespace) -> int:
    def show(client: AdminClient) -> int:
        status = client.get("/status")
        if not isinstance(status, dict) or "state" not in status:
            raise AdminError(f"{client.url}/status is not canary-proxy's status: is that the admin listener?")
        if args.json:
            print(json.dumps(status, indent=2, sort_keys=True))
        else:
            print(format_status(status, admin_url=client.url))
        return EXIT_OK

    return _run(args, show)


def cmd_action(args: argparse.Namespace) -> int:
    endpoint = _ACTIONS[args.command][0]
    body: dict[str, Any] = {"reason": args.reason} if args.reason else {}
    if args.command == "set-weight":
        body["percent"] = args.percent

    def act(client: AdminClient) -> int:
        try:
            status = client.post(f"/{endpoint}", body)
        except AdminUnreachable:
            if args.command == "rollback":
                return _offline_rollback(client.target, args.reason, f"proxy not reachable at {client.url}")
            raise
        print(format_summary(status))
        return EXIT_OK

    return _run(args, act)


def _offline_rollback(target: AdminTarget, reason: str, why: str) -> int:
    """The proxy cannot be asked: write the rollback to the state store (locked, so safe
    next to a running proxy, which adopts it on its next tick); the next start obeys it."""
    if target.settings is None:
        print(f"canary rollback: {why}\nto record a rollback with the proxy down, pass -c FILE", file=sys.stderr)
        return EXIT_RUNTIME
    from rollout.controller import record_offline_rollback
    from rollout.redis_store import offline_store

    close: Callable[[], None] = lambda: None
    try:
        store, path, close = offline_store(target.settings)
        stored = record_offline_rollback(
            store,
            reason=reason or "operator rollback (recorded in the state store)",
            now=time.time(),
            config_weight=target.settings.rollout.weight,
        )
    except StateError as exc:
        print(f"canary rollback: {why}, and the state store refused the rollback: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        close()
    print(
        f"{why}; rollback recorded in {path} (state {stored.state.state}, weight {stored.state.weight}%):\n"
        f"the next start serves weight 0, and a running proxy applies it within a tick"
    )
    return EXIT_OK


def _bounded(convert: Callable[[str], float], low: float, high: float, what: str) -> Callable[[str], Any]:
    """An argparse type: a number in [low, high] (low excluded for seconds)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (low <= value <= high) or (convert is float and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


_percent = _bounded(int, 0, 100, "a whole percent 0..100")
_seconds = _bounded(float, 0, 3600, "seconds in (0, 3600]")


def _add_common(parser: argparse.ArgumentParser, add_config_arg: Callable[..., None]) -> None:
    add_config_arg(parser)
    parser.add_argument("--admin", metavar="URL", default=None,
                        help="the admin listener, e.g. http://127.0.0.1:8081 (default: $CANARY_ADMIN_URL, "
                             "else admin.listen from the config); the token comes from $CANARY_ADMIN_TOKEN")
    parser.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="how long to wait for the admin listener (default 10)")


def add_control_commands(sub: argparse._SubParsersAction, add_config_arg: Callable[..., None]) -> None:
    status = sub.add_parser("status", help="rollout state, weight, stage, per-arm figures, last decisions")
    _add_common(status, add_config_arg)
    status.add_argument("--json", action="store_true", help="print the admin listener's /status JSON")
    status.set_defaults(handler=cmd_status)
    for command, (_endpoint, help_text) in _ACTIONS.items():
        parser = sub.add_parser(command, help=help_text, description=help_text)
        _add_common(parser, add_config_arg)
        if command == "set-weight":
            parser.add_argument("percent", type=_percent, metavar="PERCENT", help="0..100")
        parser.add_argument("--reason", default="", metavar="TEXT", help="recorded in the history and logs")
        parser.set_defaults(handler=cmd_action)
