"""Rate limits: exact sliding windows, shared by a host's gateway processes (`local`) or across hosts
through Redis (`redis`); `rules` says which windows a request counts in, `window` is the pure core."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Limiter(Protocol):
    async def admit(self, windows: Sequence[tuple[str, int, int]]) -> float:
        """Check and record one request in every (key, calls, window seconds): 0.0 when admitted
        (counted in all), else seconds until it would fit (counted in none)."""
        ...
