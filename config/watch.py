"""Notice that the config file changed, by polling its stat signature (no threads).

The caller polls `changed()` from its own tick loop (about every 0.5 s), like uvicorn's
stat reloader. A file that is briefly missing, as during an editor's save, is not a
change; its reappearance with a new signature is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ConfigStatus", "ConfigWatcher", "Signature"]

Signature = tuple[int, int, int]  # (st_mtime_ns, st_ino, st_size)


@dataclass
class ConfigStatus:
    """What `/status` says of the config file: which one, when it was last loaded, the
    error of the last rejected edit (None once a good one applied) and the reload counts."""

    path: str | None
    loaded_at: float
    error: str | None = None
    reloads_ok: int = 0
    reloads_failed: int = 0


class ConfigWatcher:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.present = True  # whether the file was there at the last look
        self._seen: Signature | None = self._signature()

    def _signature(self) -> Signature | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_ino, stat.st_size)

    def changed(self) -> bool:
        """True once per new signature; False while the file is missing or unchanged."""
        current = self._signature()
        self.present = current is not None
        if current is None or current == self._seen:
            return False
        self._seen = current
        return True

    def mark_seen(self) -> None:
        """Take the file as it is now as seen (e.g. after loading it); keeps the old one if missing."""
        current = self._signature()
        if current is not None:
            self._seen = current
