"""Store URLs as users write them, and the SQLAlchemy engine for one, with errors a person can act on."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

POSTGRES_HINT = "pip install 'berth-serve[postgres]'"
CONNECT_TIMEOUT_S = 10


class StoreError(RuntimeError):
    """The store cannot be used: a bad URL, a missing driver, an unreachable database or an unknown schema."""


def normalise_url(url: str) -> str:
    """`postgresql://…` and `postgres://…` name the psycopg (3) driver; a URL that names its driver is kept."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def safe_url(url: str | URL) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparseable URL>"


def create_engine(url: str) -> sa.Engine:
    """An engine for a (normalised) store URL; `StoreError` for a malformed URL or a driver not installed."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"The store URL {url!r} is not a SQLAlchemy URL (e.g. postgresql://user@host/db).") from exc
    kwargs: dict[str, object] = {}
    if parsed.get_backend_name() != "sqlite":
        kwargs["pool_pre_ping"] = True  # a database restarted under a long-lived server: reconnect, not fail
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        return sa.create_engine(parsed, **kwargs)
    except ImportError as exc:
        driver = parsed.get_driver_name()
        hint = POSTGRES_HINT if driver == "psycopg" else f"install the Python package that provides {exc.name!r}"
        raise StoreError(f"The store URL {safe_url(parsed)} needs the {driver} driver, which is not installed: "
                         f"{hint}.") from exc
    except sa.exc.ArgumentError as exc:  # e.g. a dialect SQLAlchemy does not know
        raise StoreError(f"The store URL {safe_url(parsed)} cannot be used: {exc}") from exc
