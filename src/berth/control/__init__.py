"""The control plane: the Databricks-compatible REST API, endpoint state, and the reconciler."""
