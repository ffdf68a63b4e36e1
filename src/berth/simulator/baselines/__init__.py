"""Upstream autoscalers re-implemented as `Policy` objects, with upstream defaults, for the simulator bake-off.

- `HPA`: Kubernetes HorizontalPodAutoscaler (autoscaling/v2) on a Pods metric (reference §a.1);
- `KPA`: the Knative Pod Autoscaler's decider plus its scale-to-zero grace (§a.2);
- `RayServe`: Ray Serve's default `replica_queue_length_autoscaling_policy` (§a.4).

Each is deterministic and pure: no I/O, no clock reads; all state lives in the instance.
"""

from berth.simulator.baselines.hpa import HPA
from berth.simulator.baselines.kpa import KPA
from berth.simulator.baselines.ray_serve import RayServe

__all__ = ["HPA", "KPA", "RayServe"]
