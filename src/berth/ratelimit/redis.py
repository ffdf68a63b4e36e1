"""Rate-limit windows shared across hosts through Redis: one sorted set per key, one Lua script.

The script trims each of the request's keys to the window, checks that every one holds fewer than
its `calls`, and only then records the request in all of them — atomically on the server, timed by
the server's own `TIME` (so gateway hosts' clocks never matter). Scores are microseconds; the logic
is the one of `berth.ratelimit.window`, so the same arrivals give the same answers (tested by passing
explicit times instead of `TIME`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

US = 1_000_000

# KEYS: one sorted set per window. ARGV[1]: a member id unique to this request; ARGV[2]: "" (use
# the server's TIME) or a time in µs; then per key: calls, window (µs). Returns the µs to wait (0: admitted).
SCRIPT = """
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[2])
end
local longest = 0
for i, key in ipairs(KEYS) do
  local calls = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count >= calls then
    local oldest = redis.call('ZRANGE', key, count - calls, count - calls, 'WITHSCORES')
    local wait = tonumber(oldest[2]) + window - now
    if wait > longest then longest = wait end
  end
end
if longest > 0 then return longest end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[1])
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[2 + 2 * i]) / 1000) + 1000)
end
return 0
"""


class RedisLimiter:
    """Exact sliding windows in the Redis server at `url`, shared by every gateway that uses it."""

    def __init__(self, url: str, *, prefix: str = "berth:rl:") -> None:
        self.url = url
        self.prefix = prefix
        self.client: Any = aioredis.Redis.from_url(url)
        self._script = self.client.register_script(SCRIPT)

    async def admit_at(self, windows: Sequence[tuple[str, int, int]], now_us: int | None) -> float:
        """Check and record one request in every (key, calls, window seconds); `now_us` None: the
        server's clock. 0.0 when admitted, else seconds until it would fit."""
        args: list[Any] = [secrets.token_hex(8), "" if now_us is None else now_us]
        for _, calls, seconds in windows:
            args += [calls, seconds * US]
        waited = await self._script(keys=[self.prefix + key for key, _, _ in windows], args=args)
        return int(waited) / US

    async def admit(self, windows: Sequence[tuple[str, int, int]]) -> float:
        return await self.admit_at(windows, None)

    async def ping(self) -> None:
        await self.client.ping()

    async def aclose(self) -> None:
        await self.client.aclose()
