"""Benchmarks: `python -m bench.serving` compares Berth with `mlflow models serve` under wrk."""
