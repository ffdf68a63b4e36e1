"""Every period and window of the autoscaler in one frozen object.

`time_scale` multiplies every duration at once (0.1 makes a 5 s cycle 0.5 s) so tests and demos can
run the same decision code faster; no decision function reads a clock or a constant of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class AutoscalerSettings:
    """Durations are in seconds at `time_scale` 1; read them through the scaled properties."""

    time_scale: float = 1.0
    sample_period: float = 1.0  # how often each entity's concurrency is sampled
    up_period: float = 5.0  # a scale-up decision this often ...
    up_window: float = 20.0  # ... over this much history (or the last up period, if higher: a step shows at once)
    down_period: float = 5.0  # a scale-down decision this often ...
    down_window: float = 300.0  # ... only if every recommendation in this window was at least as low
    vertical_period: float = 30.0  # per-replica concurrency is revisited this often
    scale_to_zero_idle: float = 1800.0  # no request for this long: scale to zero (with scale_to_zero_enabled)
    # Not durations:
    target_utilisation: float = 0.7  # scale so that demand ÷ provisioned concurrency is about this
    up_limit_factor: float = 2.0  # one cycle grows to at most this × what the latest demand needs ...
    up_limit_min: int = 4  # ... or by this many replicas, whichever is more
    tolerance: float = 0.1  # no change when demand is within this fraction of the target
    surge_ratio: float = 2.0  # between cycles: a sample needing this × the replicas (+ up_limit_min) scales up now
    # Vertical axis: thresholds with hysteresis, relative to the model's uncontended latency.
    stress_latency_ratio: float = 2.0  # p-latency over this × uncontended: stressed
    relaxed_latency_ratio: float = 1.15  # under this (and CPU low): room to admit more; over it after a raise: undo
    stress_cpu: float = 0.9
    relaxed_cpu: float = 0.6
    stress_memory: float = 0.85
    contention_level: float = 1.5  # latency is contention only with this many requests in flight per replica
    min_completions: int = 20  # fewer requests than this in a period: no verdict on latency
    uncontended_weight: float = 0.5  # weight of a new period in the uncontended-latency estimate
    uncontended_drift: float = 0.02  # without a direct measure the estimate may rise this much a period
    stable_cycles: int = 2  # a signal must hold this many vertical cycles before the relaxed step
    down_step: float = 0.5  # stressed: concurrency × (1 - down_step), quick
    up_step: float = 0.25  # relaxed: concurrency × (1 + up_step), cautious
    min_concurrency: int = 1  # per-replica floor
    max_concurrency: int = 256  # per-replica ceiling
    # Predictive minimum.
    forecast_bucket: float = 60.0  # the traffic profile is kept in buckets this long
    forecast_lead: float = 300.0  # raise the minimum this long before the predicted demand

    _DURATIONS = ("sample_period", "up_period", "up_window", "down_period", "down_window", "vertical_period",
                  "scale_to_zero_idle", "forecast_bucket", "forecast_lead")

    def scaled(self, name: str) -> float:
        """A duration at this time scale."""
        if name not in self._DURATIONS:
            raise KeyError(name)
        return float(getattr(self, name)) * self.time_scale

    @property
    def sample_s(self) -> float:
        return self.scaled("sample_period")

    @property
    def up_period_s(self) -> float:
        return self.scaled("up_period")

    @property
    def up_window_s(self) -> float:
        return self.scaled("up_window")

    @property
    def down_period_s(self) -> float:
        return self.scaled("down_period")

    @property
    def down_window_s(self) -> float:
        return self.scaled("down_window")

    @property
    def vertical_period_s(self) -> float:
        return self.scaled("vertical_period")

    @property
    def scale_to_zero_idle_s(self) -> float:
        return self.scaled("scale_to_zero_idle")

    @property
    def history_s(self) -> float:
        """How much sample history a caller must keep."""
        return max(self.down_window_s, self.up_window_s, self.vertical_period_s) + 2 * self.sample_s

    def with_(self, **changes: float) -> AutoscalerSettings:
        return replace(self, **changes)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
