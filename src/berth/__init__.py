"""Berth: a self-hosted model-serving platform with Databricks-compatible endpoints."""

__version__ = "0.1.0"
__all__ = ["__version__"]
