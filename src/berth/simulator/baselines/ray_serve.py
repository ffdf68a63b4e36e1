"""Ray Serve's default autoscaling policy with the `AutoscalingConfig` defaults (reference §a.4).

Every control-loop interval (0.1 s) the controller runs `autoscaling_policy.py`:
`_get_cold_start_scale_up_replicas` (from zero running replicas any request scales up at once), else
`_core_replica_queue_length_policy` (desired = total requests / target), `_apply_scaling_factors`,
`_apply_bounds`, and `_apply_delay_logic`: a consecutive-decision counter that applies an upscale only
after more than upscale_delay_s / 0.1 consecutive "up" ticks (300) and a downscale after more than
downscale_delay_s / 0.1 "down" ticks (6000).

The metric is the mean `Sample.demand` over `look_back_period_s` (30 s), as the handles push it every
`metrics_interval_s` (10 s): the value is refreshed only when `now` enters a new push interval, and is
held in between. A request queued while no replica is running triggers an immediate push
(`router.py wrap_queued_request`, the scaled-to-zero optimised push).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from berth.autoscaler.signals import Bounds, Decision, Sample, ScaleState, mean, since


class RayServe:
    """`replica_queue_length_autoscaling_policy` with its delay counter; the replica range comes from `bounds`."""

    def __init__(self, target_ongoing_requests: float, *, metrics_interval_s: float = 10.0,
                 look_back_period_s: float = 30.0, upscale_delay_s: float = 30.0, downscale_delay_s: float = 600.0,
                 downscale_to_zero_delay_s: float | None = None, upscaling_factor: float = 1.0,
                 downscaling_factor: float = 1.0, control_loop_interval_s: float = 0.1,
                 name: str = "ray-serve") -> None:
        if target_ongoing_requests <= 0:
            raise ValueError("target_ongoing_requests must be positive")
        self.name = name
        self.period_s = control_loop_interval_s
        self.target_ongoing_requests = target_ongoing_requests
        self.metrics_interval_s = metrics_interval_s
        self.look_back_period_s = look_back_period_s
        self.upscale_delay_s = upscale_delay_s
        self.downscale_delay_s = downscale_delay_s
        self.downscale_to_zero_delay_s = downscale_to_zero_delay_s
        self.upscaling_factor = upscaling_factor
        self.downscaling_factor = downscaling_factor
        self.cycle = 0
        self.decision_counter = 0
        self.total_num_requests = 0.0  # the last pushed metric
        self._push_index: int | None = None  # which metrics interval the last push fell in

    def decide(self, now: float, samples: Sequence[Sample], state: ScaleState, bounds: Bounds) -> Decision:
        self.cycle += 1
        low, high = bounds.replica_range(state.concurrency)
        latest = samples[-1] if samples else None
        running = latest.ready if latest else 0  # ctx.current_num_replicas: running replicas
        target_now = state.desired  # ctx.target_num_replicas
        pushed = self._push(now, samples, latest, running)
        total = self.total_num_requests
        inputs: dict[str, float] = {"running": running, "target_num_replicas": target_now, "total": total,
                                    "pushed": float(pushed), "min": low, "max": high}

        if running == 0:  # _get_cold_start_scale_up_replicas: no delay, counter untouched
            waiting = latest is not None and (latest.queued > 0 or latest.arrived > 0)
            if total > 0 or waiting:
                desired = max(math.ceil(1 * self.upscaling_factor), target_now)
                reason = f"Cold start: requests are waiting and no replica is running, so ask for {desired}."
            else:
                desired, reason = target_now, "No replica is running and no request is waiting."
        else:
            # _core_replica_queue_length_policy
            error_ratio = total / (self.target_ongoing_requests * running)
            wanted = running * error_ratio
            scaled = self._apply_scaling_factors(wanted, running)
            bounded = max(low, min(high, scaled))  # _apply_bounds
            desired = self._apply_delay_logic(bounded, target_now)
            inputs.update(error_ratio=error_ratio, desired_raw=wanted, scaled=scaled, bounded=bounded,
                          decision_counter=self.decision_counter)
            if desired != target_now:
                reason = (f"{total:.2f} requests over target {self.target_ongoing_requests:g} per replica, held "
                          f"long enough: scale to {desired}.")
            elif bounded != target_now:
                reason = (f"Wants {bounded} replicas; consecutive-decision counter at {self.decision_counter}, "
                          f"not yet past the delay.")
            else:
                reason = f"{total:.2f} requests at {running} running replica(s) is on target."
        clamped = max(low, min(high, desired))
        axis = "zero" if (clamped == 0) != (target_now == 0) else "horizontal"
        return Decision(t=now, policy=self.name, desired=clamped, concurrency=state.concurrency,
                        previous=target_now, previous_concurrency=state.concurrency, reason=reason, axis=axis,
                        cycle=self.cycle, inputs=inputs)

    def _push(self, now: float, samples: Sequence[Sample], latest: Sample | None, running: int) -> bool:
        """Refresh the metric when `now` enters a new push interval, or on a cold-start push; True if it did."""
        index = math.floor(now / self.metrics_interval_s + 1e-9)
        cold = running == 0 and latest is not None and (latest.queued > 0 or latest.arrived > 0)
        if self._push_index is not None and index <= self._push_index and not cold:
            return False
        self._push_index = index
        window = since(samples, latest.t - self.look_back_period_s) if latest is not None else ()
        self.total_num_requests = mean([s.demand for s in window])
        return True

    def _apply_scaling_factors(self, desired: float, current: int) -> int:
        """`autoscaling_policy.py _apply_scaling_factors`."""
        delta = desired - current
        factor = self.upscaling_factor if delta > 0 else self.downscaling_factor
        scaled = math.ceil(current + factor * delta)
        if math.ceil(float(desired)) < current and scaled == current:  # stuck by the factor: step down by one
            scaled -= 1
        return scaled

    def _apply_delay_logic(self, desired: int, target_now: int) -> int:
        """`autoscaling_policy.py _apply_delay_logic`: the consecutive-decision counter."""
        decision = target_now
        if desired > target_now:
            self.decision_counter = max(self.decision_counter, 0) + 1
            if self.decision_counter > int(self.upscale_delay_s / self.period_s):
                self.decision_counter = 0
                decision = desired
        elif desired < target_now:
            self.decision_counter = min(self.decision_counter, 0) - 1
            if target_now == 1:  # downscaling to zero is only allowed from 1 -> 0
                delay_s = (self.downscale_to_zero_delay_s if self.downscale_to_zero_delay_s is not None
                           else self.downscale_delay_s)
            else:
                delay_s = self.downscale_delay_s
                desired = max(1, desired)
            if self.decision_counter < -int(delay_s / self.period_s):
                self.decision_counter = 0
                decision = desired
        else:
            self.decision_counter = 0
        return decision
