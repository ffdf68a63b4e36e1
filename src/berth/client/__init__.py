"""Clients of a running Berth server: credentials discovery and the HTTP client the CLI uses."""
