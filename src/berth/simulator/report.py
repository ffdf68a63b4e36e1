"""Tables, paired-seed statistics, the goal checks, the CSV and the plots of one matrix run.

- Per family, a table of medians over seeds: p50 / p99 / p99.9 latency (queueing included, ms), % of
  requests within 2× / 5× / 10× the SLO base (the model's median service time at concurrency 1; 429s and
  requests never started count as misses), 429s, replica-seconds (starting + ready + draining), the gap to
  the oracle's replica-seconds, time to capacity and SLO misses in the first 120 s (step), misses in the
  morning ramp (diurnal), recovery time (profile change), cold-start % (sparse), scaling actions,
  direction reversals within 5 min, and per-replica concurrency changes.
- Paired-seed differences against apa-full (same trace and request costs per seed) on replica-seconds and
  attainment at 5×, with t-based 95 % CIs; a baseline Pareto-dominates apa-full only if its CI shows it
  strictly better on one axis and not worse on the other.
- The goal checks of the issue, each PASS/FAIL with its figures.
- `runs.csv` (every run, its metrics, seed and trace parameters) and one PNG per family (load, replicas,
  rolling 10 s p99 over time, one line per policy, seed 0).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from berth.simulator.engine import RunResult

BASELINES = ("hpa", "kpa", "ray-serve")
FULL = "apa-full"
ORDER = ("apa-full", "apa-horizontal", "apa-forecast", "hpa", "kpa", "ray-serve", "fixed-peak", "oracle")


def _order(name: str) -> tuple[int, str]:
    return (ORDER.index(name), name) if name in ORDER else (len(ORDER), name)


def group(results: Iterable[RunResult]) -> dict[str, dict[str, list[RunResult]]]:
    """family → policy → runs sorted by seed (errored runs left out)."""
    out: dict[str, dict[str, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.error is None:
            out[r.family][r.policy].append(r)
    for fam in out.values():
        for runs in fam.values():
            runs.sort(key=lambda r: r.seed)
    return out


def _median(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.median(vals)) if vals else math.nan


def _metric(runs: Sequence[RunResult], key: str) -> float:
    return _median([r.metrics.get(key, math.nan) for r in runs])


@dataclass(frozen=True)
class PairedCI:
    n: int
    mean: float
    lo: float
    hi: float

    def fmt(self, digits: int = 1) -> str:
        if self.n == 0:
            return "n/a"
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def paired_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedCI:
    """CI of mean(a − b) over paired seeds (Student t)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    n = d.size
    if n == 0:
        return PairedCI(0, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n == 1:  # one seed: no interval, so no claim either way
        return PairedCI(1, mean, -math.inf, math.inf)
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return PairedCI(n, mean, mean - half, mean + half)


def _paired(runs_a: Sequence[RunResult], runs_b: Sequence[RunResult], key: str) -> tuple[list[float], list[float]]:
    by_b = {r.seed: r for r in runs_b}
    xs, ys = [], []
    for r in runs_a:
        other = by_b.get(r.seed)
        if other is not None:
            xs.append(float(r.metrics[key]))
            ys.append(float(other.metrics[key]))
    return xs, ys


@dataclass(frozen=True)
class Dominance:
    family: str
    baseline: str
    cost: PairedCI  # baseline − apa-full replica-seconds
    attainment: PairedCI  # baseline − apa-full attainment at 5× (pp)

    @property
    def dominates(self) -> bool:
        cheaper = self.cost.hi < 0
        costlier = self.cost.lo > 0
        better = self.attainment.lo > 0
        worse = self.attainment.hi < 0
        return (cheaper and not worse) or (better and not costlier)


def dominance(fam: dict[str, list[RunResult]], family: str) -> list[Dominance]:
    out = []
    full = fam.get(FULL)
    if not full:
        return out
    for name in BASELINES:
        runs = fam.get(name)
        if not runs:
            continue
        cost = paired_ci(*_paired(runs, full, "replica_s"))
        att = paired_ci(*_paired(runs, full, "attain_5x"))
        out.append(Dominance(family, name, cost, att))
    return out


# --- tables -----------------------------------------------------------------------------------------------
def _fmt(v: float, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "never"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def family_table(family: str, fam: dict[str, list[RunResult]]) -> str:
    oracle = fam.get("oracle")
    extra: list[tuple[str, str, int]] = []
    if family == "step":
        extra = [("TTC s", "ttc_s", 0), ("misses 120 s", "misses_120s", 0)]
    elif family.startswith("diurnal"):
        extra = [("ramp misses", "ramp_misses", 0)]
    elif family == "profile_change":
        extra = [("recovery s", "recovery_s", 0), ("post 5× %", "post_change_attain_5x", 2),
                 ("min conc after", "min_concurrency_after", 0)]
    elif family == "sparse":
        extra = [("cold %", "cold_pct", 1), ("idle replica-s", "idle_replica_s", 0)]
    head = ["policy", "seeds", "p50 ms", "p99 ms", "p99.9 ms", "2× %", "5× %", "10× %", "429s", "replica-s",
            "vs oracle"] + [e[0] for e in extra] + ["actions", "reversals", "vertical"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(fam, key=_order):
        runs = fam[name]
        gap = math.nan
        if oracle:
            rs, ro = _paired(runs, oracle, "replica_s")
            gaps = [100.0 * (a - b) / b for a, b in zip(rs, ro, strict=True) if b > 0]
            gap = _median(gaps)
        row = [name, str(len(runs)), _fmt(_metric(runs, "p50_ms"), 2), _fmt(_metric(runs, "p99_ms"), 1),
               _fmt(_metric(runs, "p999_ms"), 1), _fmt(_metric(runs, "attain_2x"), 2),
               _fmt(_metric(runs, "attain_5x"), 2), _fmt(_metric(runs, "attain_10x"), 2),
               _fmt(_metric(runs, "rejected"), 0), _fmt(_metric(runs, "replica_s"), 0),
               "–" if math.isnan(gap) else f"{gap:+.0f} %"]
        row += [_fmt(_metric(runs, key), d) for _, key, d in extra]
        row += [_fmt(_metric(runs, "actions"), 0), _fmt(_metric(runs, "reversals"), 0),
                _fmt(_metric(runs, "vertical_changes"), 0)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def dominance_table(rows: Sequence[Dominance]) -> str:
    lines = ["| family | baseline | Δ replica-s (baseline − apa-full), 95 % CI | Δ 5× attainment pp, 95 % CI | "
             "dominates apa-full? |", "|---|---|---|---|---|"]
    for d in rows:
        lines.append(f"| {d.family} | {d.baseline} | {d.cost.fmt(0)} | {d.attainment.fmt(3)} | "
                     f"{'YES' if d.dominates else 'no'} |")
    return "\n".join(lines)


# --- goal checks ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not evaluable (a policy or family missing)
    detail: str

    def line(self) -> str:
        mark = "PASS" if self.ok else ("FAIL" if self.ok is not None else "N/A ")
        return f"[{mark}] {self.name}: {self.detail}"


def _mean(runs: Sequence[RunResult], key: str) -> float:
    vals = [float(r.metrics[key]) for r in runs if key in r.metrics]
    return float(np.mean(vals)) if vals else math.nan


def hpa_curve(fam: dict[str, list[RunResult]]) -> list[tuple[float, float, str]]:
    """(mean attainment at 5×, mean replica-seconds, name) of every HPA target run on this family."""
    pts = []
    for name, runs in fam.items():
        if name == "hpa" or name.startswith("hpa@"):
            pts.append((_mean(runs, "attain_5x"), _mean(runs, "replica_s"), name))
    return sorted(pts)


def frontier(curve: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """HPA's cost-at-attainment frontier: the sweep points no other point beats on both axes, by attainment.

    A sweep is not monotone (a target at or over the cap thrashes and costs more than a lower one), so
    "HPA's replica-seconds at attainment a" is the cheapest HPA setting reaching at least a.
    """
    pts = sorted(curve, key=lambda p: (-p[0], p[1]))  # best attainment first
    out: list[tuple[float, float, str]] = []
    best = math.inf
    for p in pts:
        if p[1] < best:
            out.append(p)
            best = p[1]
    return sorted(out)


def interpolate_cost(curve: Sequence[tuple[float, float, str]], attainment: float) -> tuple[float, str]:
    """HPA's replica-seconds at `attainment`: linear between neighbours on its frontier (see `frontier`)."""
    front = frontier(curve)
    xs = np.array([p[0] for p in front])
    ys = np.array([p[1] for p in front])
    if attainment > xs.max():
        i = int(xs.argmax())
        return float(ys[i]), (f"above HPA's best attainment ({xs.max():.3f} %): compared with its most reliable "
                              f"setting, {front[i][2]}")
    if attainment <= xs.min():
        i = int(xs.argmin())
        return float(ys[i]), (f"at or below HPA's lowest frontier attainment ({xs.min():.3f} %): its cheapest "
                              f"setting, {front[i][2]}, already does at least as well")
    return float(np.interp(attainment, xs, ys)), "interpolated along its frontier"


def goal_checks(grouped: dict[str, dict[str, list[RunResult]]], *, wall_s: float, smoke: bool,
                vertical_period_s: float = 30.0) -> list[Check]:
    checks: list[Check] = []
    # 1. never Pareto-dominated
    rows = [d for fam, policies in grouped.items() for d in dominance(policies, fam)]
    if rows:
        dom = [d for d in rows if d.dominates]
        checks.append(Check("HPA, KPA and Ray Serve never Pareto-dominate apa-full on (replica-s, 5× attainment)",
                            not dom, "dominated by " + ", ".join(f"{d.baseline} on {d.family}" for d in dom)
                            if dom else f"{len(rows)} family × baseline pairs checked, none dominates"))
    else:
        checks.append(Check("never Pareto-dominated", None, "apa-full or the baselines did not run"))
    # 2. step spike
    step = grouped.get("step", {})
    if FULL in step:
        ttc = _metric(step[FULL], "ttc_s")
        ok_ttc = ttc <= 60.0
        detail = f"time to capacity {_fmt(ttc, 0)} s (≤ 60)"
        ok = ok_ttc
        if "hpa" in step:
            ours, theirs = _metric(step[FULL], "misses_120s"), _metric(step["hpa"], "misses_120s")
            ratio = ours / theirs if theirs > 0 else (0.0 if ours == 0 else math.inf)
            detail += f"; SLO misses in the first 120 s {ours:,.0f} vs HPA {theirs:,.0f} = {ratio:.2f}× (≤ 0.5)"
            ok = ok and ratio <= 0.5
        else:
            detail += "; HPA did not run"
        checks.append(Check("step spike: capacity within 60 s with a warm pool, ≤ ½ of HPA's misses in 120 s",
                            ok, detail))
    else:
        checks.append(Check("step spike", None, "apa-full did not run on step"))
    # 3. diurnal cost at equal attainment
    di = grouped.get("diurnal", {})
    curve = hpa_curve(di)
    if FULL in di and len(curve) >= 2:
        att, rs = _mean(di[FULL], "attain_5x"), _mean(di[FULL], "replica_s")
        hpa_rs, how = interpolate_cost(curve, att)
        ratio = rs / hpa_rs
        pts = ", ".join(f"{n} {a:.3f} %/{c:,.0f}" for a, c, n in curve)
        checks.append(Check(f"diurnal: ≤ 0.85× HPA's replica-seconds at equal attainment ({len(curve)}-point sweep)",
                            ratio <= 0.85 and len(curve) >= 5,
                            f"apa-full {att:.3f} % at {rs:,.0f} replica-s; HPA at that attainment {hpa_rs:,.0f} "
                            f"({how}); ratio {ratio:.3f} (≤ 0.85). Sweep: {pts}"))
    else:
        checks.append(Check("diurnal cost at equal attainment", None, "apa-full or the HPA sweep did not run"))
    # 4. profile change
    pc = grouped.get("profile_change", {})
    if FULL in pc:
        rec = _metric(pc[FULL], "recovery_s")
        limit = 2 * vertical_period_s
        checks.append(Check("model-profile change: p99 back within SLO within two vertical cycles", rec <= limit,
                            f"recovery {_fmt(rec, 0)} s after the change (≤ {limit:g} s; rolling 10 s p99, 429s "
                            f"counted as misses, held for 60 s)"))
    else:
        checks.append(Check("model-profile change", None, "apa-full did not run on profile_change"))
    # 5. predictive minimum: judged on the CPU diurnal, where ramp misses come from capacity (on the I/O
    # diurnal every policy, the oracle included, has the same ramp misses: the service-time tail's).
    dc = grouped.get("diurnal-cpu", {})
    if FULL in dc and "apa-forecast" in dc:
        mf, mn = _mean(dc["apa-forecast"], "ramp_misses"), _mean(dc[FULL], "ramp_misses")
        rf, rn = _mean(dc["apa-forecast"], "replica_s"), _mean(dc[FULL], "replica_s")
        checks.append(Check("predictive minimum (diurnal-cpu): fewer morning-ramp misses with the forecast, "
                            "≤ 1.05× replica-s", mf < mn and rf <= 1.05 * rn,
                            f"ramp misses {mf:,.0f} with vs {mn:,.0f} without; replica-s {rf:,.0f} vs {rn:,.0f} "
                            f"= {rf / rn:.3f}× (≤ 1.05)"))
    else:
        checks.append(Check("predictive minimum", None, "apa-forecast or apa-full did not run on diurnal-cpu"))
    # 6. runtime
    limit = 60.0 if smoke else 600.0
    checks.append(Check(f"{'smoke' if smoke else 'full'} matrix within {limit:.0f} s", wall_s <= limit,
                        f"{wall_s:.1f} s wall"))
    return checks


# --- files ------------------------------------------------------------------------------------------------
def write_csv(results: Sequence[RunResult], path: Path) -> None:
    metric_keys: list[str] = []
    param_keys: list[str] = []
    for r in results:
        for k in r.metrics:
            if k not in metric_keys:
                metric_keys.append(k)
        for k in r.params:
            if k not in param_keys:
                param_keys.append(k)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["family", "policy", "seed", "lag_s", "error", *metric_keys, *(f"param.{k}" for k in param_keys)])
        for r in sorted(results, key=lambda r: (r.family, _order(r.policy), r.seed)):
            params = [json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
                      for v in (r.params.get(k, "") for k in param_keys)]
            w.writerow([r.family, r.policy, r.seed, r.lag_s, (r.error or "").splitlines()[0] if r.error else "",
                        *(_csv_num(r.metrics.get(k, "")) for k in metric_keys), *params])


def _csv_num(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return "inf" if math.isinf(v) else ("" if math.isnan(v) else round(float(v), 6))
    return v


def plot_family(family: str, fam: dict[str, list[RunResult]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: next((r for r in rs if r.seed == 0 and r.series is not None), None) for name, rs in fam.items()}
    runs = {k: v for k, v in runs.items() if v is not None and not k.startswith("hpa@")}
    if not runs:
        return False
    fig, axes = plt.subplots(4, 1, figsize=(12, 11), sharex=True, gridspec_kw={"height_ratios": [1, 1.2, 1.2, 0.8]})
    first = next(iter(runs.values()))
    assert first.series is not None
    t = np.arange(first.series["arrivals"].size)
    axes[0].plot(t, first.series["arrivals"], color="0.3", lw=0.6)
    axes[0].set_ylabel("load (req/s)")
    slo_ms = float(first.metrics.get("slo_ms", math.nan))
    for name in sorted(runs, key=_order):
        series = runs[name].series
        assert series is not None
        axes[1].step(t, series["ready"] + series["starting"], where="post", lw=0.9, label=name)
        axes[2].plot(t, series["p99_rolling_ms"], lw=0.7, label=name)
        misses = np.convolve(series["misses"], np.ones(10) / 10, mode="same")
        axes[3].plot(t, np.maximum(misses, 0.1), lw=0.7, label=name)
    axes[1].set_ylabel("replicas (ready + starting)")
    axes[2].set_ylabel("rolling 10 s p99 (ms)\n(completed requests)")
    axes[2].set_yscale("log")
    if not math.isnan(slo_ms):
        axes[2].axhline(slo_ms, color="k", ls="--", lw=0.8, label=f"SLO {slo_ms:g} ms")
    axes[3].set_ylabel("SLO misses/s\n(5×, 429s incl., 10 s mean)")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("time (s)")
    axes[1].legend(loc="upper right", fontsize=7, ncol=2)
    axes[0].set_title(f"{family} (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: Sequence[RunResult], out: Path, *, wall_s: float, smoke: bool, command: str,
                 unavailable: dict[str, str] | None = None) -> tuple[str, list[Check]]:
    """Write tables (report.md), runs.csv and <family>.png under `out`; returns the report text and checks."""
    out.mkdir(parents=True, exist_ok=True)
    grouped = group(results)
    write_csv(results, out / "runs.csv")
    parts = [f"# berth simulate{' (smoke)' if smoke else ''}", "", f"Command: `{command}`", "",
             f"{len(results)} runs in {wall_s:.1f} s wall. Medians over seeds; latency includes queueing; "
             "attainment counts 429s and requests never started as misses; SLO base = the model's median "
             "service time at concurrency 1.", ""]
    errors = [r for r in results if r.error]
    if unavailable:
        parts += ["Unavailable policies: " + "; ".join(f"{k} ({v})" for k, v in unavailable.items()), ""]
    if errors:
        parts += ["Errored runs:", ""] + [f"- {r.family}/{r.policy}/seed {r.seed}: {r.error.splitlines()[0]}"
                                          for r in errors if r.error] + [""]
    for family in sorted(grouped):
        fam = grouped[family]
        params = next(iter(fam.values()))[0].params
        desc = ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("family", "seed", "smoke"))
        parts += [f"## {family}", "", f"Trace: {desc}", "", family_table(family, fam), ""]
        if plot_family(family, fam, out / f"{family}.png"):
            parts += [f"![{family}]({family}.png)", ""]
    rows = [d for fam, policies in sorted(grouped.items()) for d in dominance(policies, fam)]
    if rows:
        parts += ["## Paired-seed differences vs apa-full", "", dominance_table(rows), ""]
    checks = goal_checks(grouped, wall_s=wall_s, smoke=smoke)
    parts += ["## Goal checks", "", *(f"- {c.line()}" for c in checks), ""]
    text = "\n".join(parts)
    (out / "report.md").write_text(text)
    return text, checks
