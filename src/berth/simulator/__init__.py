"""Trace-driven simulator: replays synthetic traces against autoscaling policies."""
