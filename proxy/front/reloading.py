"""Config hot reload for `canary serve`: the file poll, SIGHUP, and a missing file.

One reload at a time, read and parsed in a thread (the event loop keeps serving while a
big file is parsed; one over `limits.max_config_bytes` is rejected unread), and once more
when asked again meanwhile. A file that stays missing past the settle time is reported in
`ConfigStatus.error` and the log while the last good config keeps serving; once back it
is read again. What a valid file changes is the server's business (`apply`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog

from config.errors import ConfigError
from config.loader import load_settings
from config.settings import Settings
from config.watch import ConfigStatus, ConfigWatcher

__all__ = ["SETTLE", "ConfigReloader"]

log = structlog.get_logger("canary.server")
SETTLE = 0.2  # a changed (or vanished) file must stay so this long before it is acted on


class ConfigReloader:
    def __init__(
        self,
        path: Path | None,
        *,
        status: ConfigStatus,
        clock: Callable[[], float],
        max_bytes: Callable[[], int],
        apply: Callable[[Settings], None],
        ready: Callable[[], bool],
    ) -> None:
        self.path = path
        self.status = status
        self._clock = clock
        self._max_bytes = max_bytes
        self._apply = apply
        self._ready = ready  # before the rollout state is loaded there is nothing to apply to
        self._watcher = ConfigWatcher(path) if path else None
        self._pending_since: float | None = None
        self._missing_since: float | None = None
        self._missing_reported = False
        self._task: asyncio.Future[None] | None = None
        self._again = False

    def poll(self, now: float) -> None:
        """Called from the server's tick (about every 0.25 s)."""
        if self._watcher is None:
            return
        if self._watcher.changed():
            self._pending_since = now  # wait for the editor to finish writing
        elif self._pending_since is not None and now - self._pending_since >= SETTLE:
            self.request()
        self._watch_missing(now)

    def _watch_missing(self, now: float) -> None:
        assert self._watcher is not None
        if self._watcher.present:
            if self._missing_since is not None:
                reported, self._missing_since = self._missing_reported, None
                self._missing_reported = False
                if reported:
                    self.request()
            return
        if self._missing_since is None:
            self._missing_since = now
        elif not self._missing_reported and now - self._missing_since >= SETTLE:
            self._missing_reported = True
            self.status.error = (
                f"{self.path}: the config file is missing; the last good config keeps serving "
                f"(restore the file: it is read again as soon as it is back)"
            )
            log.error("config_missing", path=str(self.path))

    def request(self) -> None:
        """Reload in the background (SIGHUP, or an edit the poll saw)."""
        if self.path is None or not self._ready():
            return
        if self._watcher is not None:  # this read covers the edit the poll may also have seen
            self._watcher.mark_seen()
            self._pending_since = None
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.ensure_future(self._until_current())

    async def _until_current(self) -> None:
        while True:
            self._again = False
            try:
                await self.reload()
            except Exception:
                log.exception("reload_failed")
            if not self._again:
                return

    async def reload(self) -> bool:
        """Re-read the file; a bad one is reported and the last good one kept."""
        path = self.path
        if path is None or not self._ready():
            return False
        try:
            fresh = await asyncio.to_thread(load_settings, path, max_bytes=self._max_bytes())
        except ConfigError as exc:
            self.status.error = str(exc)
            self.status.reloads_failed += 1
            log.error("config_rejected", path=str(path), problems=[str(p) for p in exc.problems])
            return False
        self._apply(fresh)
        self.status.error = None
        self.status.loaded_at = self._clock()
        self.status.reloads_ok += 1
        log.info("config_reloaded", path=str(path))
        return True

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
