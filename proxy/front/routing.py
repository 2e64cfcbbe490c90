"""Choosing an arm for a request: the split, the sticky key, the force header, the paths.

The router holds one immutable `RoutingSnapshot`; changing the weight or the routing
settings swaps the snapshot in one assignment, so a request in progress always sees one
consistent view and the hot path never parses config.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Protocol

from config.settings import ArmName, RoutingSettings, StickyKey

__all__ = ["Router", "RoutingSnapshot", "sticky_bucket", "BUCKETS"]

BUCKETS = 10_000  # a sticky key maps to one of these; weight w% sends buckets < w*100


def sticky_bucket(key: str) -> int:
    """A stable bucket for a key: the same on every process, restart and platform."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % BUCKETS


def _segment_prefixes(paths: tuple[str, ...]) -> tuple[str, ...]:
    """`/api` takes part for `/api` and `/api/...`, not for `/apiary`."""
    return tuple(p if p.endswith("/") else p + "/" for p in paths)


@dataclass(frozen=True, kw_only=True)
class RoutingSnapshot:
    weight: int
    paths: tuple[str, ...]
    sticky_key: StickyKey | None
    force_header: str
    arm_header: str
    shadow: bool = False  # state `shadow`: eligible baseline requests are mirrored to the canary
    prefixes: tuple[str, ...] = ()  # derived from `paths`: each ending in "/"

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefixes", _segment_prefixes(self.paths))

    def takes_part(self, path: str) -> bool:
        return path.startswith(self.prefixes) or path in self.paths

    def forced(self, headers: Mapping[str, str]) -> bool:
        """Whether the force header picks the arm (the split does not apply)."""
        return bool(self.force_header) and headers.get(self.force_header) in ("canary", "baseline")

    @classmethod
    def from_settings(cls, routing: RoutingSettings, weight: int) -> RoutingSnapshot:
        return cls(
            weight=weight,
            paths=routing.paths,
            sticky_key=routing.sticky_key,
            force_header=routing.force_header,
            arm_header=routing.arm_header,
        )


class RequestLike(Protocol):
    path: str
    raw_path: str
    headers: Mapping[str, str]
    cookies: Mapping[str, str]


class Router:
    """Implements the rollout's `TrafficSplit`: the controller only calls `set_weight`."""

    def __init__(self, snapshot: RoutingSnapshot, *, rng: Callable[[], float] = random.random) -> None:
        self.snapshot = snapshot
        self._rng = rng
        self.on_weight: Callable[[int, int], None] | None = None  # told (before, after) on a change

    def set_weight(self, weight: int) -> None:
        before = self.snapshot.weight
        self.snapshot = replace(self.snapshot, weight=weight)
        if self.on_weight is not None and before != weight:
            self.on_weight(before, weight)

    def set_shadow(self, active: bool) -> None:
        self.snapshot = replace(self.snapshot, shadow=active)

    def set_routing(self, routing: RoutingSettings) -> None:
        fresh = RoutingSnapshot.from_settings(routing, self.snapshot.weight)
        self.snapshot = replace(fresh, shadow=self.snapshot.shadow)

    def choose_arm(self, request: RequestLike) -> ArmName:
        snap = self.snapshot
        headers = request.headers
        if snap.force_header:
            forced = headers.get(snap.force_header)
            if forced == "canary" or forced == "baseline":
                return forced
        # Decoding the path costs ~1 µs per request; with "/" among the prefixes, a raw
        # origin-form target ("/...") is known to match without it.
        matches_all = "/" in snap.paths and request.raw_path.startswith("/")
        if not matches_all and not snap.takes_part(request.path):
            return "baseline"
        weight = snap.weight
        if weight <= 0:
            return "baseline"
        if weight >= 100:
            return "canary"
        key = None
        sticky = snap.sticky_key
        if sticky is not None:
            key = headers.get(sticky.name) if sticky.source == "header" else request.cookies.get(sticky.name)
        if key:
            return "canary" if sticky_bucket(key) < weight * (BUCKETS // 100) else "baseline"
        return "canary" if self._rng() * 100 < weight else "baseline"
