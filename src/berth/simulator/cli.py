"""`berth simulate`: run the bake-off matrix and write its report.

    python -c 'import sys; from berth.simulator.cli import main; sys.exit(main())' [options]

Options: --families (comma-separated, default all six), --policies (comma-separated, default every
policy; "hpa-sweep" expands to the HPA target sweep, which runs on diurnal only), --seeds N (default 3;
bursty and sparse 10; an explicit N applies to every family), --smoke (short traces, one seed: the test
suite's ≤ 60 s matrix), --out DIR (default ./simulate-out), --workers (default 2). Writes DIR/report.md
(tables, paired CIs, goal checks), DIR/runs.csv and DIR/<family>.png, and prints the report.
--lag NAME=S,... overrides metric lags (whole seconds). Exit status: 0, 1 if a run errored, 2 on bad options.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from berth.simulator import matrix, report, traces


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berth simulate", description="Trace-driven autoscaler bake-off.")
    p.add_argument("--families", default=",".join(traces.FAMILIES),
                   help=f"comma-separated trace families (default: {','.join(traces.FAMILIES)})")
    p.add_argument("--policies", default=",".join(matrix.DEFAULT_POLICIES),
                   help="comma-separated policies (default: all; hpa-sweep = the HPA target sweep)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per family (default 3; bursty and sparse 10)")
    p.add_argument("--smoke", action="store_true", help="short traces, one seed (≤ 60 s)")
    p.add_argument("--out", default="simulate-out", help="output directory (default ./simulate-out)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--lag", default="", help="metric-lag overrides in whole seconds, e.g. hpa=30,kpa=2 "
                   "(defaults: hpa 15, kpa 1, ray-serve 1, apa-* 1, references 0)")
    p.add_argument("--quiet", action="store_true", help="do not print progress or the report")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in traces.FAMILIES]
    if unknown:
        print(f"unknown families: {', '.join(unknown)}; choose from {', '.join(traces.FAMILIES)}", file=sys.stderr)
        return 2
    try:
        policies = matrix.expand_policies(p.strip() for p in args.policies.split(",") if p.strip())
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    lags: dict[str, int] = {}
    for item in (x.strip() for x in args.lag.split(",") if x.strip()):
        name, _, value = item.partition("=")
        try:
            lags[name.strip()] = int(value)
        except ValueError:
            print(f"bad --lag entry {item!r} (want NAME=SECONDS)", file=sys.stderr)
            return 2
    if args.seeds is not None and args.seeds < 1:
        print("--seeds must be at least 1", file=sys.stderr)
        return 2
    unavailable = {name: why for name in policies if (why := matrix.available(name))}
    runnable = [p for p in policies if p not in unavailable]
    tasks = matrix.tasks_for(families, runnable, args.seeds, args.smoke, lags)
    if not tasks:
        print("nothing to run", file=sys.stderr)
        return 2

    def progress(result: object, done: int, total: int) -> None:
        if args.quiet:
            return
        r = result  # RunResult
        status = "ERROR" if r.error else f"{r.metrics.get('wall_s', 0.0):5.1f} s"  # type: ignore[attr-defined]
        print(f"[{done:3d}/{total}] {r.family:14s} {r.policy:15s} seed {r.seed:2d}  {status}",  # type: ignore[attr-defined]
              file=sys.stderr, flush=True)

    results, wall = matrix.run_matrix(tasks, workers=args.workers, progress=progress)
    command = "berth simulate " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text, _checks = report.write_report(results, Path(args.out), wall_s=wall, smoke=args.smoke, command=command,
                                       unavailable=unavailable)
    if not args.quiet:
        print(text)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
