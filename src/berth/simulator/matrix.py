"""The bake-off matrix: families × policies × seeds, run on a process pool.

Policies (each gets the same trace, replica model, bounds, warm pool and starting replicas; they differ
only in their decision code and the metric lag their pipeline has in real deployments):

| name              | policy                                                              | lag |
|-------------------|---------------------------------------------------------------------|-----|
| apa-full          | `berth.autoscaler.apa.Autoscaler(settings)`                         | 1 s |
| apa-horizontal    | `Autoscaler(settings, vertical=False)`                              | 1 s |
| apa-forecast      | `Autoscaler(settings, forecast=Forecaster)` from `trace.history(7)` (diurnal only) | 1 s |
| hpa               | `HPA(target = 0.7 × initial per-replica concurrency)`               | 15 s |
| hpa@F             | `HPA(target = F × concurrency)`, F in `HPA_SWEEP` (diurnal only)    | 15 s |
| kpa               | `KPA(container_concurrency = per-replica concurrency)` (target 0.7 × CC) | 1 s |
| ray-serve         | `RayServe(target_ongoing_requests = 0.7 × per-replica concurrency)` (1)              | 1 s |
| fixed-peak        | `references.FixedPeak(trace)`                                       | 0 |
| oracle            | `references.Oracle(trace)`                                          | 0 |

(1) max_ongoing_requests is the engine's per-replica cap, the same for every policy.

Choices, so the baselines are not straw men:
- Every policy aims at the same 0.7 utilisation of the same per-replica concurrency (Ray Serve's default
  target_ongoing_requests is 2 regardless of the cap; we give it 0.7 × cap like the others, and the same
  replica bounds rather than its default max_replicas 1). `settings.max_concurrency` is the model's hard cap
  so the full autoscaler's vertical axis cannot exceed what the engine allows either.
- Lags: HPA 15 s (a metrics-server scrape; the reference's low end of 15–60 s), KPA 1 s (queue-proxy
  scrape), Ray Serve 1 s here because its 10 s push and 30 s look-back are modelled inside the class, APA 1 s.
  References see the truth (0 s).
- The warm pool, bounds and start are the trace's (`traces.py`), identical for everyone.

Policies are imported lazily by name: a policy whose module is missing is reported as unavailable and
skipped; the rest of the matrix runs.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from berth.autoscaler.signals import Policy
from berth.simulator import traces
from berth.simulator.engine import Engine, RunResult
from berth.simulator.traces import Trace

TARGET = 0.7
HPA_SWEEP = (0.6, 0.8, 0.9, 1.0)  # with "hpa" itself (0.7): five points of its (cost, attainment) curve
DEFAULT_POLICIES = ("apa-full", "apa-horizontal", "apa-forecast", "hpa", "hpa-sweep", "kpa", "ray-serve",
                    "fixed-peak", "oracle")
REFERENCES = ("fixed-peak", "oracle")
MANY_SEED_FAMILIES = ("bursty", "sparse")  # the reference's 10 seeds: their tails vary widely between seeds


def _settings(trace: Trace):  # type: ignore[no-untyped-def]
    from berth.autoscaler.settings import AutoscalerSettings

    return AutoscalerSettings().with_(max_concurrency=trace.model.max_concurrency)


def _apa(name: str, *, vertical: bool = True, forecast: bool = False) -> Callable[[Trace], Policy]:
    def build(trace: Trace) -> Policy:
        apa = importlib.import_module("berth.autoscaler.apa")
        fc = None
        if forecast:
            fc = _forecaster(trace)
        settings = _settings(trace)
        if fc is not None:  # lead: a cold start and a bucket ahead, on the trace's (compressed) clock
            settings = settings.with_(forecast_lead=2 * trace.model.cold_median_s + trace.history_bucket_s)
        return apa.Autoscaler(settings, vertical=vertical, forecast=fc, name=name)  # type: ignore[no-any-return]

    return build


def _forecaster(trace: Trace):  # type: ignore[no-untyped-def]
    """A Forecaster on the trace's clock (compressed days), trained on 7 days of per-minute history."""
    forecast = importlib.import_module("berth.autoscaler.forecast")
    fc = forecast.Forecaster(bucket_s=trace.history_bucket_s, day_s=trace.day_s, spread=0)
    fc.learn(-7 * trace.day_s, trace.history(7))
    return fc


def _hpa(name: str, fraction: float) -> Callable[[Trace], Policy]:
    def build(trace: Trace) -> Policy:
        baselines = importlib.import_module("berth.simulator.baselines")
        return baselines.HPA(target=fraction * trace.model.concurrency, name=name)  # type: ignore[no-any-return]

    return build


def _kpa(trace: Trace) -> Policy:
    baselines = importlib.import_module("berth.simulator.baselines")
    return baselines.KPA(container_concurrency=trace.model.concurrency, name="kpa")  # type: ignore[no-any-return]


def _ray(trace: Trace) -> Policy:
    baselines = importlib.import_module("berth.simulator.baselines")
    return baselines.RayServe(target_ongoing_requests=TARGET * trace.model.concurrency,  # type: ignore[no-any-return]
                              name="ray-serve")


def _fixed_peak(trace: Trace) -> Policy:
    from berth.simulator.references import FixedPeak

    return FixedPeak(trace)


def _oracle(trace: Trace) -> Policy:
    from berth.simulator.references import Oracle

    return Oracle(trace)


@dataclass(frozen=True)
class PolicySpec:
    name: str
    build: Callable[[Trace], Policy]
    lag_s: int
    families: tuple[str, ...] | None = None  # None: every family


def policy_specs() -> dict[str, PolicySpec]:
    specs = [
        PolicySpec("apa-full", _apa("apa-full"), 1),
        PolicySpec("apa-horizontal", _apa("apa-horizontal", vertical=False), 1),
        PolicySpec("apa-forecast", _apa("apa-forecast", forecast=True), 1, ("diurnal", "diurnal-cpu")),
        PolicySpec("hpa", _hpa("hpa", TARGET), 15),
        *(PolicySpec(f"hpa@{f:g}", _hpa(f"hpa@{f:g}", f), 15, ("diurnal", "diurnal-cpu")) for f in HPA_SWEEP),
        PolicySpec("kpa", _kpa, 1),
        PolicySpec("ray-serve", _ray, 1),
        PolicySpec("fixed-peak", _fixed_peak, 0),
        PolicySpec("oracle", _oracle, 0),
    ]
    return {s.name: s for s in specs}


def expand_policies(names: Iterable[str]) -> list[str]:
    """Policy names with "hpa-sweep" expanded to the sweep points."""
    out: list[str] = []
    for name in names:
        if name == "hpa-sweep":
            out.extend(f"hpa@{f:g}" for f in HPA_SWEEP)
        else:
            out.append(name)
    known = policy_specs()
    unknown = [n for n in out if n not in known]
    if unknown:
        raise ValueError(f"unknown policies: {', '.join(unknown)}; choose from {', '.join(known)} or hpa-sweep")
    return list(dict.fromkeys(out))


def available(name: str) -> str | None:
    """None if the policy can be built, else why not."""
    spec = policy_specs()[name]
    try:
        spec.build(traces.make("step", 0, smoke=True, before_s=1, during_s=1, after_s=1))
    except (ImportError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    except ValueError as exc:  # e.g. a trace without history
        if spec.families and "step" not in spec.families:
            return None
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass(frozen=True)
class Task:
    family: str
    seed: int
    policy: str
    smoke: bool
    keep_series: bool
    lag_s: int | None = None  # None: the policy's default lag


_TRACE_CACHE: dict[tuple[str, int, bool], Trace] = {}


def _trace(family: str, seed: int, smoke: bool) -> Trace:
    key = (family, seed, smoke)
    trace = _TRACE_CACHE.get(key)
    if trace is None:
        if len(_TRACE_CACHE) >= 2:
            _TRACE_CACHE.pop(next(iter(_TRACE_CACHE)))
        trace = _TRACE_CACHE[key] = traces.make(family, seed, smoke=smoke)
    return trace


def run_task(task: Task) -> RunResult:
    """One cell of the matrix (in a worker). Errors come back as a result with `error` set."""
    spec = policy_specs()[task.policy]
    lag = spec.lag_s if task.lag_s is None else task.lag_s
    try:
        trace = _trace(task.family, task.seed, task.smoke)
        policy = spec.build(trace)
        return Engine(trace, policy, lag_s=lag, keep_series=task.keep_series, policy_name=task.policy).run()
    except Exception as exc:
        return RunResult(task.family, task.policy, task.seed, lag, {"family": task.family}, {}, None,
                         error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}")


# Rough relative cost of a run, to start the long ones first (better packing on a small pool).
_COST = {"diurnal": 20.0, "diurnal-cpu": 20.0, "step": 6.0, "profile_change": 4.0, "heavy_tail": 1.5, "sparse": 1.0,
         "bursty": 0.5}


def tasks_for(families: Iterable[str], policies: Iterable[str], seeds: int | None, smoke: bool,
              lags: dict[str, int] | None = None) -> list[Task]:
    """The matrix's cells, longest first. `lags` overrides metric lags by policy name (an "hpa" entry also
    applies to the hpa@F sweep)."""
    lags = lags or {}
    out: list[Task] = []
    specs = policy_specs()
    for family in families:
        n = 1 if smoke else (seeds if seeds is not None else (10 if family in MANY_SEED_FAMILIES else 3))
        for seed in range(n):
            for name in policies:
                fams = specs[name].families
                if fams is not None and family not in fams:
                    continue
                lag = lags.get(name, lags.get("hpa") if name.startswith("hpa@") else None)
                out.append(Task(family, seed, name, smoke, keep_series=seed == 0, lag_s=lag))
    out.sort(key=lambda t: -_COST.get(t.family, 1.0))
    return out


def run_matrix(tasks: list[Task], *, workers: int = 2,
               progress: Callable[[RunResult, int, int], None] | None = None) -> tuple[list[RunResult], float]:
    """Run every task (on `workers` processes; 1 runs in this process). Returns the results and the wall time."""
    start = time.perf_counter()
    results: list[RunResult] = []
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(run_task(task))
            if progress:
                progress(results[-1], len(results), len(tasks))
    else:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
        with ctx.Pool(processes=min(workers, os.cpu_count() or workers, len(tasks))) as pool:
            for result in pool.imap_unordered(run_task, tasks, chunksize=1):
                results.append(result)
                if progress:
                    progress(result, len(results), len(tasks))
    return results, time.perf_counter() - start
