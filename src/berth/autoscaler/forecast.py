"""The predictive minimum: learn an endpoint's daily and weekly traffic shape, provision ahead of it.

Arrivals are counted in buckets (`forecast_bucket`, a minute). The profile keeps, for each bucket of
the week, an exponentially weighted mean of the counts seen there; with less than a week of history
the same bucket of the previous days stands in. The forecast for a time is the highest expected
rate over the bucket it falls in and its neighbours (a ramp is a few minutes wide, and a day's
shape shifts by some minutes), and the minimum it implies is the replicas that rate needs at the
target utilisation. The profile is plain data (`to_dict`/`from_dict`) so the store keeps it across
restarts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

DAY_S = 86_400.0
WEEK_DAYS = 7


@dataclass
class Forecaster:
    """Per-bucket traffic profile of one served entity. Times are seconds on the caller's clock.

    `day_s` is the length of a day on that clock (a simulator compresses it); `alpha` is the weight of
    a new week's count in the bucket's mean.
    """

    bucket_s: float = 60.0
    day_s: float = DAY_S
    alpha: float = 0.5
    spread: int = 1  # buckets either side taken into a forecast
    weekly: dict[int, float] = field(default_factory=dict)  # bucket of week -> mean count
    daily: dict[int, float] = field(default_factory=dict)  # bucket of day -> mean count
    first_t: float | None = None
    last_t: float | None = None
    _open: tuple[int, int] | None = None  # (bucket index, count so far)

    @property
    def buckets_per_day(self) -> int:
        return max(1, round(self.day_s / self.bucket_s))

    @property
    def buckets_per_week(self) -> int:
        return self.buckets_per_day * WEEK_DAYS

    def observe(self, t: float, arrivals: int) -> None:
        """Count `arrivals` at time `t` (calls in time order, any granularity)."""
        index = math.floor(t / self.bucket_s)
        if self._open is not None and index != self._open[0]:
            self._close(*self._open)
            for missing in range(self._open[0] + 1, index):  # silent buckets count as zero
                self._close(missing, 0)
            self._open = None
        count = self._open[1] if self._open is not None else 0
        self._open = (index, count + arrivals)
        if self.first_t is None:
            self.first_t = t
        self.last_t = t

    def learn(self, start_t: float, counts: list[int] | Any) -> None:
        """Feed history as per-bucket counts starting at `start_t`."""
        for i, count in enumerate(counts):
            self.observe(start_t + i * self.bucket_s, int(count))
        if self._open is not None:
            self._close(*self._open)
            self._open = None

    def _close(self, index: int, count: int) -> None:
        for table, key in ((self.weekly, index % self.buckets_per_week), (self.daily, index % self.buckets_per_day)):
            old = table.get(key)
            table[key] = float(count) if old is None else (1 - self.alpha) * old + self.alpha * count

    @property
    def history_s(self) -> float:
        if self.first_t is None or self.last_t is None:
            return 0.0
        return self.last_t - self.first_t

    def expected(self, t: float) -> float | None:
        """Expected arrivals per second around time `t`; None until a day of history exists."""
        if self.history_s < self.day_s:
            return None
        use_week = self.history_s >= WEEK_DAYS * self.day_s
        table, size = (self.weekly, self.buckets_per_week) if use_week else (self.daily, self.buckets_per_day)
        index = math.floor(t / self.bucket_s)
        values = [table.get((index + k) % size) for k in range(-self.spread, self.spread + 1)]
        known = [v for v in values if v is not None]
        if not known:
            return None
        return max(known) / self.bucket_s

    def peak_rate(self, t0: float, t1: float) -> float | None:
        """The highest expected rate over [t0, t1]."""
        rates = []
        t = t0
        while t <= t1:
            rate = self.expected(t)
            if rate is not None:
                rates.append(rate)
            t += self.bucket_s
        return max(rates) if rates else None

    def to_dict(self) -> dict[str, Any]:
        return {"bucket_s": self.bucket_s, "day_s": self.day_s, "alpha": self.alpha, "spread": self.spread,
                "weekly": {str(k): v for k, v in self.weekly.items()},
                "daily": {str(k): v for k, v in self.daily.items()},
                "first_t": self.first_t, "last_t": self.last_t}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Forecaster:
        return cls(bucket_s=float(data["bucket_s"]), day_s=float(data["day_s"]), alpha=float(data["alpha"]),
                   spread=int(data.get("spread", 1)),
                   weekly={int(k): float(v) for k, v in data.get("weekly", {}).items()},
                   daily={int(k): float(v) for k, v in data.get("daily", {}).items()},
                   first_t=data.get("first_t"), last_t=data.get("last_t"))


def predicted_minimum(rate: float | None, latency_s: float | None, per_replica_target: float) -> int:
    """Replicas the predicted rate needs: ceil(rate × latency ÷ target), 0 without a forecast."""
    if not rate or not latency_s:
        return 0
    return math.ceil(rate * latency_s / per_replica_target - 1e-9)
