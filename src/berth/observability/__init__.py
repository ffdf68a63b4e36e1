"""Observability: Prometheus metrics (and later inference tables and traces)."""
