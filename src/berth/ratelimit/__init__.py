"""Rate limits: exact sliding windows, locally shared across gateway processes or in Redis."""
