"""Autoscaling: pure decision code shared by the live reconciler and `berth simulate`.

`signals` defines what a policy sees and answers, `settings` every period and threshold,
`horizontal` and `vertical` the two axes, `forecast` the predictive minimum, and `apa` the policy
that combines them.
"""

from berth.autoscaler.apa import Autoscaler
from berth.autoscaler.forecast import Forecaster
from berth.autoscaler.settings import AutoscalerSettings
from berth.autoscaler.signals import Bounds, Decision, Policy, Sample, ScaleState

__all__ = ["Autoscaler", "AutoscalerSettings", "Bounds", "Decision", "Forecaster", "Policy", "Sample", "ScaleState"]
