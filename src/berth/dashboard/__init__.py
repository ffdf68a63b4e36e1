"""The dashboard: one HTML page, its script, and uPlot (vendored, MIT: `static/uPlot.LICENSE`), served by
the gateway at `/dashboard` with no token; the page asks for one and keeps it in the browser's session
storage. It reads the control-plane API: the endpoint list, and each endpoint's `series` (per-second
requests, errors, latency, replicas, concurrency, the autoscaler's decisions)."""

from __future__ import annotations

from functools import cache
from importlib import resources

PREFIX = "/dashboard"
_TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
          ".css": b"text/css; charset=utf-8"}


@cache
def _files() -> dict[str, tuple[bytes, bytes]]:
    """Every file of the page, read once: name → (content type, bytes)."""
    out = {}
    for file in resources.files(__package__).joinpath("static").iterdir():
        kind = _TYPES.get(file.name[file.name.rfind("."):])
        if kind is not None and file.is_file():
            out[file.name] = (kind, file.read_bytes())
    return out


def asset(path: str) -> tuple[bytes, bytes] | None:
    """(content type, bytes) of the dashboard file a request path names; None for anything else."""
    return _files().get(path[len(PREFIX):].lstrip("/") or "index.html")
