"""Which limiter a gateway process uses: the host's shared files, or Redis when configured."""

from __future__ import annotations

from pathlib import Path

from berth.ratelimit import Limiter
from berth.ratelimit.local import HostLimiter


def make_limiter(redis_url: str | None, directory: Path) -> Limiter:
    if redis_url:
        from berth.ratelimit.redis import RedisLimiter

        return RedisLimiter(redis_url)
    return HostLimiter(directory)


async def close_limiter(limiter: Limiter) -> None:
    if isinstance(limiter, HostLimiter):
        limiter.close()
    else:
        await limiter.aclose()  # type: ignore[attr-defined]
