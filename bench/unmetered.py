"""`berth server` with the gateway's per-request metrics switched off in this process: the
counterfactual that `bench.hot_path_cost --what observability` measures the metrics against. Never a
product setting.

    python -m bench.unmetered server --port 0 ...   # as `berth server`, without its latency histograms

The gateway's `_record` keeps one thing, the count of answers by status (the harness reads it to
count what each run answered), and drops the rest: the latency, queue-wait and added-latency
histograms. Everything else (auth, routing, admission, the replica) is the product's own code.
"""

from __future__ import annotations

from berth.gateway.app import Gateway


def _record(self: Gateway, endpoint: str, entity: str, status: int, read_at: float, outcome: object) -> None:
    key = (endpoint, entity, status)
    counter = self._counters.get(key)
    if counter is None:
        counter = self._counters[key] = self.metrics.requests.labels(endpoint, entity, str(status))
    counter.inc()


def main() -> None:
    Gateway._record = _record  # type: ignore[method-assign]
    from berth.cli import main as berth_main

    berth_main()


if __name__ == "__main__":
    main()
