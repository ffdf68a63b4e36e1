"""`berth simulate --smoke`: the whole bake-off on short traces, through the CLI entry point, in ≤ 60 s."""

from __future__ import annotations

import csv
import time

from berth.simulator import traces
from berth.simulator.cli import main


def test_smoke_matrix_writes_tables_csv_and_plots(tmp_path):
    out = tmp_path / "sim"
    start = time.perf_counter()
    code = main(["--smoke", "--out", str(out), "--quiet"])
    elapsed = time.perf_counter() - start
    assert code == 0
    assert elapsed <= 60.0, f"the smoke matrix took {elapsed:.1f} s"
    text = (out / "report.md").read_text()
    for family in traces.FAMILIES:
        assert f"## {family}" in text
        png = out / f"{family}.png"
        assert png.exists()
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Goal checks" in text
    assert "| policy | seeds | p50 ms | p99 ms | p99.9 ms |" in text
    with (out / "runs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    families = {r["family"] for r in rows}
    assert families == set(traces.FAMILIES)
    policies = {r["policy"] for r in rows}
    assert {"fixed-peak", "oracle"} <= policies
    assert all(r["error"] == "" for r in rows)
    assert all(r["param.seed"] != "" and r["seed"] == "0" for r in rows)
    for r in rows:  # nothing lost: arrived = completed + refused + still in the system
        assert int(r["arrived"]) == int(r["completed"]) + int(r["rejected"]) + int(r["in_system"])
